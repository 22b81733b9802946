"""Initialization toolkit: the methods' documented scales, the diagnostics against numpy's SVD,
variance propagation, the analysis table and `dldna-fused init`."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dldna_fused import init
from dldna_fused.experiments import SimpleNetwork, get_data_loaders


def numpy_diagnostics(w: np.ndarray) -> dict:
    s = np.linalg.svd(w, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    eff = float(np.exp(-(p * np.log(p)).sum()))
    return dict(spectral_norm=s[0], condition_number=s[0] / s[-1], effective_rank=eff,
                effective_rank_ratio=eff / min(w.shape), stable_rank=(s**2).sum() / s[0] ** 2)


@pytest.mark.parametrize("kind", ["random", "non-square", "wide", "rank-deficient"])
def test_diagnostics_agree_with_numpy_svd(kind):
    rng = np.random.default_rng(3)
    w = {"random": lambda: rng.normal(size=(30, 30)), "non-square": lambda: rng.normal(size=(40, 7)),
         "wide": lambda: rng.normal(size=(7, 40)),
         "rank-deficient": lambda: rng.normal(size=(20, 3)) @ rng.normal(size=(3, 20))}[kind]()
    ours = init.weight_diagnostics(torch.tensor(w))
    expected = numpy_diagnostics(w)
    for key in ("spectral_norm", "effective_rank", "effective_rank_ratio", "stable_rank"):
        assert ours[key] == pytest.approx(expected[key], rel=1e-9), key
    if kind == "rank-deficient":
        # sigma_min is rounding noise (~1e-15): the condition number is huge, not a number to compare.
        assert ours["condition_number"] > 1e12
    else:
        assert ours["condition_number"] == pytest.approx(expected["condition_number"], rel=1e-9)


def test_effective_rank_of_rank_one_and_identity():
    u, v = torch.randn(12, 1), torch.randn(1, 9)
    assert init.weight_diagnostics(u @ v)["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    d = init.weight_diagnostics(torch.eye(17))
    assert d["effective_rank"] == pytest.approx(17.0) and d["effective_rank_ratio"] == pytest.approx(1.0)
    assert d["condition_number"] == pytest.approx(1.0) and d["stable_rank"] == pytest.approx(17.0)


def test_conv_weights_are_flattened_per_output_filter():
    w = torch.randn(8, 3, 3, 3)
    assert init.weight_diagnostics(w) == pytest.approx(init.weight_diagnostics(w.reshape(8, 27)))


@pytest.mark.parametrize("method", [init.orthogonal, init.scaled_orthogonal])
def test_orthogonal_square_weights_have_condition_number_one(method):
    layer = nn.Linear(128, 128)
    method(layer)
    assert init.weight_diagnostics(layer.weight)["condition_number"] == pytest.approx(1.0, abs=1e-4)
    assert torch.count_nonzero(layer.bias) == 0


FAN_IN, FAN_OUT = 1000, 800
EXPECTED_STD = {
    "lecun": 1 / math.sqrt(FAN_IN),
    "xavier_normal": math.sqrt(2 / (FAN_IN + FAN_OUT)),
    "kaiming_normal": math.sqrt(2 / FAN_IN),
    # A semi-orthogonal 800 x 1000 matrix has ||W||_F^2 = 800, so its entries' RMS is 1/sqrt(1000).
    "orthogonal": 1 / math.sqrt(FAN_IN),
    "scaled_orthogonal": math.sqrt(2) / math.sqrt(FAN_IN),
    "l-momentum": 0.9,
    "emergence_promoting": math.sqrt(2 / FAN_IN),  # a single tensor gets the Kaiming base only
}


@pytest.mark.parametrize("name", list(EXPECTED_STD))
def test_each_method_gives_its_documented_std(name):
    w = torch.empty(FAN_OUT, FAN_IN)
    init.init_methods[name](w)
    n = w.numel()
    # The sample std of n normal draws has a relative standard error of 1/sqrt(2n); allow 5 of them.
    assert w.std().item() / EXPECTED_STD[name] == pytest.approx(1.0, abs=5 / math.sqrt(2 * n))
    assert abs(w.mean().item()) < 5 * EXPECTED_STD[name] / math.sqrt(n)


def test_conv_fan_in_counts_the_kernel():
    conv = nn.Conv2d(16, 32, 5)
    init.kaiming_normal(conv)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (16 * 25)), rel=0.05)


def test_emergence_promoting_scales_layers_around_the_middle():
    assert init.emergence_scales(4, 2.0) == [0.25, 0.5, 2.0, 4.0]
    assert init.emergence_scales(5, 2.0) == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert math.prod(init.emergence_scales(7, 1.3)) == pytest.approx(1.0)
    model = SimpleNetwork(nn.ReLU(), input_shape=2000, hidden_shape=[2000, 2000, 2000], num_labels=2000)
    init.emergence_promoting(model, alpha=1.5)
    stds = [layer.weight.std().item() / math.sqrt(2 / 2000) for _, layer in init.weight_layers(model)]
    assert stds == pytest.approx([1 / 2.25, 1 / 1.5, 1.5, 2.25], rel=0.01)


def test_tensor_initializers_from_torch_apply_to_every_layer():
    model = SimpleNetwork(nn.ReLU(), input_shape=20, hidden_shape=[30], num_labels=4)
    init.apply_init(nn.init.ones_, model)
    for _, layer in init.weight_layers(model):
        assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)


def deep_relu_stack(depth=20, width=256):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def test_variance_stays_flat_under_kaiming_and_decays_under_a_too_small_init():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    kaiming = init.variance_propagation(init.kaiming_normal(deep_relu_stack()), x)
    assert len(kaiming["forward"]) == 20
    ratio = kaiming["forward"][-1] / kaiming["forward"][0]
    assert 0.3 < ratio < 3.0
    assert 0.3 < kaiming["backward"][0] / kaiming["backward"][-1] < 3.0
    small = deep_relu_stack()
    with torch.no_grad():
        for _, layer in init.weight_layers(small):
            layer.weight.normal_(0, 0.5 * math.sqrt(2 / 256))
            layer.bias.zero_()
    decayed = init.variance_propagation(small, x)
    assert decayed["forward"][-1] / decayed["forward"][0] < 1e-8  # 0.25 per layer
    assert decayed["backward"][0] / decayed["backward"][-1] < 1e-8


def test_variance_propagation_leaves_the_model_as_it_was():
    model = deep_relu_stack(3, 8)
    model.train()
    grads = []
    for p in model.parameters():
        p.grad = torch.ones_like(p)
        grads.append(p.grad)
    init.variance_propagation(model, torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), nn.CrossEntropyLoss())
    assert model.training
    assert all(p.grad is g and torch.all(g == 1) for p, g in zip(model.parameters(), grads))


def test_convergence_speed_definition():
    assert init.convergence_speed([2.0, 2.0, 2.0]) == 1.0
    assert init.convergence_speed([2.0, 1.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(init.convergence_speed([2.0, float("nan")]))


def test_analyze_initialization_reports_every_column(capsys):
    train, test = get_data_loaders("digits", batch_size=64, train_size=256, test_size=128)
    results = init.analyze_initialization(
        lambda: SimpleNetwork(nn.PReLU(), input_shape=64, hidden_shape=[64, 32]),
        {"kaiming_normal": init.kaiming_normal, "torch xavier": nn.init.xavier_normal_, "orthogonal": init.orthogonal},
        train, test, epochs=2, progress=False)
    for r in results.values():
        assert 0 <= r["error_rate"] <= 100 and 0 < r["convergence_speed"] < 1
        assert r["execution_time"] > 0 and len(r["test_accuracies"]) == 2
    assert results["orthogonal"]["avg_condition_number"] == pytest.approx(1.0, abs=1e-4)
    table = init.create_detailed_analysis_table(results)
    assert "Effective Rank Ratio" in table and "torch xavier" in capsys.readouterr().out


def test_init_cli_on_digits_writes_table_and_plot(tmp_path, capsys):
    from dldna_fused.cli import main

    out = tmp_path / "init"
    assert main(["init", "--methods", "lecun,kaiming_normal,l-momentum", "--epochs", "1", "--hidden", "64,32",
                 "--depth", "6", "--width", "32", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "l-momentum" in printed and "Convergence Speed" in printed
    assert (out / "variance.png").stat().st_size > 1000
    data = json.loads((out / "results.json").read_text())
    assert set(data["analysis"]) == {"lecun", "kaiming_normal", "l-momentum"}
    assert len(data["variance"]["lecun"]["forward"]) == 7


def test_results_do_not_depend_on_the_order_of_the_methods():
    train, test = get_data_loaders("digits", batch_size=64, train_size=256, test_size=128)
    methods = {"lecun": init.lecun, "orthogonal": init.orthogonal}
    model_class = lambda: SimpleNetwork(nn.ReLU(), input_shape=64, hidden_shape=[32])  # noqa: E731
    forward = init.analyze_initialization(model_class, methods, train, test, epochs=1, progress=False)
    backward = init.analyze_initialization(model_class, dict(reversed(methods.items())), train, test, epochs=1,
                                           progress=False)
    for name in methods:
        assert forward[name]["step_losses"] == backward[name]["step_losses"]


def test_variance_plot_legends_do_not_cover_the_curves():
    # The backward panel's legend sat over the curves of layers 10-16.
    from dldna_fused.init.variance import plot_variance_propagation

    depth = 17
    results = {f"method{k}": {"forward": list(np.logspace(0, -k, depth)), "backward": list(np.logspace(-k, 0, depth))}
               for k in range(7)}
    fig = plot_variance_propagation(results, "t")
    fig.canvas.draw()
    for ax in fig.axes:
        legend, area = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert not legend.overlaps(area), ax.get_title()
