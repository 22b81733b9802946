"""Train the same MLP on scikit-learn's digits with torch.optim.AdamW and with dldna_fused's AdamW,
and show that the drop-in replacement follows the same trajectory.

    .venv/bin/python examples/adamw_drop_in.py
"""

import copy

import torch
from sklearn.datasets import load_digits

import dldna_fused

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
runs = {
    "torch.optim.AdamW": (m := copy.deepcopy(model), torch.optim.AdamW(m.parameters(), lr=1e-2)),
    "dldna_fused.optim.AdamW": (m := copy.deepcopy(model), dldna_fused.optim.AdamW(m.parameters(), lr=1e-2)),
}
for epoch in range(20):
    losses = {}
    for name, (net, opt) in runs.items():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses[name] = loss.item()
    if epoch % 5 == 4:
        print(f"epoch {epoch + 1:2d}: " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()))
(a, _), (b, _) = runs.values()
diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
print(f"largest parameter difference after 20 steps: {diff:.2e}")
