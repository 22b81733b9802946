"""Hessian-vector product variants on the digits MLP and the toolkit's CNN (full batch, CPU):
ms per product for a retained double backward, a rebuilt graph, forward-over-reverse
(torch.func), and blocks of 8 by a batched double backward and by vmap. The evidence behind
[Note: Hessian-vector products] in dldna_fused/landscape/hessian.py.

    python benchmarks/hvp_variants.py
"""

import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from dldna_fused.experiments.data import get_dataset
from dldna_fused.experiments.models import SimpleNetwork, SmallCNN

K = 8


def median_ms(fn, per: int = 1, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / per * 1e3


def main() -> None:
    torch.manual_seed(0)
    train = get_dataset("digits")[0]
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([int(train[i][1]) for i in range(len(train))])
    loss_func = nn.CrossEntropyLoss()
    models = {"MLP 64-256-256-10": (SimpleNetwork(input_shape=64, hidden_shape=(256, 256), num_labels=10),
                                    x.reshape(len(x), -1)),
              "SmallCNN width 24": (SmallCNN(in_channels=1, num_labels=10, width=24), x)}
    print(f"{torch.get_num_threads()} threads, {len(x)} samples, ms per Hessian-vector product")
    for name, (model, inputs) in models.items():
        model.eval()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        graph = torch.autograd.grad(loss_func(model(inputs), y), params, create_graph=True)
        detached = {n: p.detach() for n, p in zip(names, params)}
        grad_fn = grad(lambda d: loss_func(functional_call(model, d, (inputs,)), y))
        v = [torch.randn_like(p) for p in params]
        V = [torch.randn(K, *p.shape) for p in params]

        def rebuilt():
            g = torch.autograd.grad(loss_func(model(inputs), y), params, create_graph=True)
            return torch.autograd.grad(g, params, grad_outputs=v)

        def forward_over_reverse(vectors):
            return jvp(grad_fn, (detached,), (vectors,))[1]

        rows = {
            "double backward, retained graph": median_ms(
                lambda: torch.autograd.grad(graph, params, grad_outputs=v, retain_graph=True)),
            "double backward, graph rebuilt": median_ms(rebuilt),
            "forward-over-reverse": median_ms(lambda: forward_over_reverse(dict(zip(names, v)))),
            f"block of {K}: batched double backward": median_ms(
                lambda: torch.autograd.grad(graph, params, grad_outputs=V, retain_graph=True, is_grads_batched=True),
                per=K),
            f"block of {K}: vmap forward-over-reverse": median_ms(
                lambda: vmap(forward_over_reverse)(dict(zip(names, V))), per=K),
        }
        print(f"{name} ({sum(p.numel() for p in params)} params)")
        for label, ms in rows.items():
            print(f"  {label:42s} {ms:8.2f}")


if __name__ == "__main__":
    main()
