"""Loss landscapes II: the Gaussian fit and optimizer paths on it, wavelet decomposition,
persistent homology, training dynamics, their plots and the CLI's --extras."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import NEEDS_GUDHI, NEEDS_PYWT
from dldna_fused import optim, reference
from dldna_fused.landscape import (GaussianFitError, analyze_loss_surface_multiscale, bottleneck_distance,
                                   decompose_surface, gaussian_surface, get_opt_params, persistence_diagram,
                                   persistence_summary, plot_persistence_diagram, train_loss_surface,
                                   visualize_gaussian_fit, visualize_optimization_path, visualize_training_dynamics)


def grid(n=41, r=2.0):
    lam = np.linspace(-r, r, n)
    return np.meshgrid(lam, lam)


@pytest.mark.parametrize("A,x0,y0,s1,s2,offset", [(-2.0, 0.3, -0.4, 0.8, 1.2, 3.0), (1.5, -0.5, 0.2, 0.6, 0.9, -1.0)],
                         ids=["bowl", "hill"])
def test_fit_recovers_a_noisy_gaussian_within_two_percent(A, x0, y0, s1, s2, offset):
    X, Y = grid()
    rng = np.random.default_rng(0)
    Z = gaussian_surface(X, Y, A, x0, y0, s1, s2, offset) + 0.01 * rng.standard_normal(X.shape)
    popt, pcov, fitted_offset = get_opt_params(X, Y, Z)
    assert pcov.shape == (6, 6)
    for got, true in zip([*popt, fitted_offset], [A, x0, y0, s1, s2, offset]):
        assert got == pytest.approx(true, rel=0.02, abs=0.005)


def test_data_no_gaussian_fits_is_a_clear_failure():
    X, Y = grid()
    checkerboard = np.sign(np.sin(4 * X) * np.sin(4 * Y))
    with pytest.raises(GaussianFitError, match="no Gaussian fits this surface"):
        get_opt_params(X, Y, checkerboard)
    with pytest.raises(GaussianFitError, match="nan"):
        get_opt_params(X, Y, np.full(X.shape, np.nan))


def test_a_surface_that_never_levels_off_warns_about_the_quadratic_limit():
    X, Y = grid()
    with pytest.warns(UserWarning, match="quadratic limit"):
        popt, _, _ = get_opt_params(X, Y, X**2 + 2 * Y**2)
    assert popt[0] < 0  # a bowl


def test_gradient_descent_on_a_quadratic_matches_its_closed_form():
    a, b, lr, steps = 1.0, 3.0, 0.1, 25
    start = np.array([1.5, -0.8])
    path = train_loss_surface(lambda p: reference.SGD(p, lr=lr), None, steps, start=start,
                              surface=lambda p: 0.5 * (a * p[0] ** 2 + b * p[1] ** 2))
    k = np.arange(steps + 1)
    expected = np.stack([start[0] * (1 - lr * a) ** k, start[1] * (1 - lr * b) ** k], axis=1)
    np.testing.assert_allclose(path, expected, rtol=1e-5, atol=1e-7)


OPTIMIZERS = {
    "sgd": lambda p: reference.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: reference.SGD(p, lr=0.05, momentum=0.8),
    "adam-reference": lambda p: reference.Adam(p, lr=0.1),
    "adam-fused": lambda p: optim.Adam(p, lr=0.1),
    "lion-fused": lambda p: optim.Lion(p, lr=0.02),
    "sophia-fused": lambda p: optim.Sophia(p, lr=0.05),
    "adafactor-fused": lambda p: optim.Adafactor(p, lr=0.1, relative_step=False),
    "torch-adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "torch-rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_path_on_the_fitted_surface_stays_finite(name):
    params = (-2.0, 0.3, -0.4, 0.8, 1.2, 3.0)
    path = train_loss_surface(OPTIMIZERS[name], [-2, 2], 100, params, seed=3)
    assert path.shape == (101, 2) and np.all(np.isfinite(path))
    start_loss = gaussian_surface(*path[0], *params)
    assert gaussian_surface(*path[-1], *params) < start_loss  # every one descends


@NEEDS_PYWT
def test_wavelet_coefficients_match_pywt_and_energies_partition_the_surface():
    import pywt

    rng = np.random.default_rng(1)
    z = rng.standard_normal((64, 64)).cumsum(0).cumsum(1)
    result = decompose_surface(z, "db2", levels=3, mode="periodization")
    expected = pywt.wavedec2(z, "db2", mode="periodization", level=3)
    assert len(result["coefficients"]) == 4
    np.testing.assert_array_equal(result["coefficients"][0], expected[0])
    for ours, theirs in zip(result["coefficients"][1:], expected[1:]):
        assert [c.shape for c in ours] == [c.shape for c in theirs]
    energy = result["energy"]
    assert energy["approximation"] + sum(energy["details"]) == pytest.approx(energy["total"], rel=1e-10)
    assert sum(energy["fractions"]) == pytest.approx(1.0)


@NEEDS_PYWT
def test_a_smooth_bowl_has_almost_no_detail_energy():
    x = np.linspace(-1, 1, 32)
    X, Y = np.meshgrid(x, x)
    fractions = decompose_surface(3 * X**2 + 5 * Y**2 + X * Y + 0.5)["energy"]["fractions"]
    assert fractions[0] > 0.99 and sum(fractions[1:]) < 0.01
    # A ripple (about 5 samples per period) lands in the details: at least half its energy.
    smooth, ripple = X**2 + Y**2, 0.2 * np.sin(20 * X) * np.sin(20 * Y)
    added = sum(decompose_surface(smooth + ripple)["energy"]["details"]) - sum(
        decompose_surface(smooth)["energy"]["details"])
    assert added > 0.5 * (ripple**2).sum()


@NEEDS_PYWT
def test_wavelet_level_is_clamped_to_pywt_max():
    import pywt

    z = np.random.default_rng(2).standard_normal((32, 32))
    max_level = pywt.dwt_max_level(32, pywt.Wavelet("db2").dec_len)
    with pytest.warns(UserWarning, match="exceeds pywt.dwt_max_level"):
        result = decompose_surface(z, levels=max_level + 3)
    assert result["level"] == max_level


def two_basins(n=51):
    X, Y = grid(n, 3.0)
    return -np.exp(-((X + 1.5) ** 2 + Y**2)) - 0.8 * np.exp(-((X - 1.5) ** 2 + Y**2))


@NEEDS_GUDHI
def test_two_separated_basins_give_exactly_two_persistent_minima():
    diagram = persistence_diagram(two_basins())
    summary = persistence_summary(diagram, threshold=0.1)
    assert summary["minima_above_threshold"] == 2
    h0 = diagram[0]
    assert np.isinf(h0[:, 1]).sum() == 1  # the global minimum never dies
    assert h0[np.isinf(h0[:, 1]), 0][0] == pytest.approx(two_basins().min())
    assert 0.5 < summary["longest_finite_lifetime"] < 0.8


@NEEDS_GUDHI
def test_bottleneck_distance_is_zero_on_identical_diagrams_and_symmetric():
    d1 = persistence_diagram(two_basins())[0]
    d2 = persistence_diagram(two_basins() + 0.05 * np.random.default_rng(3).standard_normal((51, 51)))[0]
    assert bottleneck_distance(d1, d1) == 0.0
    assert bottleneck_distance(d1, d2) == pytest.approx(bottleneck_distance(d2, d1))
    assert bottleneck_distance(d1, d2) > 0
    assert bottleneck_distance(np.array([[0.0, np.inf]]), np.array([[0.0, np.inf], [1.0, np.inf]])) == math.inf
    assert bottleneck_distance(np.array([[0.0, np.inf]]), np.array([[0.25, np.inf]])) == pytest.approx(0.25)


def tiny_loader():
    torch.manual_seed(0)
    x = torch.randn(96, 6)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [lambda p: optim.Adam(p, lr=1e-2), lambda p: optim.Sophia(p, lr=1e-2, k=2)],
                         ids=["adam", "sophia"])
def test_training_dynamics_has_one_finite_entry_per_epoch(make, tmp_path):
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    metrics = visualize_training_dynamics(model, make(model.parameters()), tiny_loader(), nn.CrossEntropyLoss(),
                                          num_epochs=4, save_path=tmp_path / "dyn.png", progress=False)
    assert set(metrics) == {"loss", "grad_norm", "param_change", "weight_norm", "loss_improvement"}
    for key, values in metrics.items():
        assert len(values) == 4 and all(math.isfinite(v) for v in values), key
    assert metrics["loss_improvement"][1] == pytest.approx(metrics["loss"][0] - metrics["loss"][1])
    assert len(metrics.figure.axes) == 5 and (tmp_path / "dyn.png").stat().st_size > 1000


@NEEDS_GUDHI
@NEEDS_PYWT
def test_every_plot_writes_a_png(tmp_path):
    X, Y = grid(21)
    Z = gaussian_surface(X, Y, -2.0, 0.3, -0.4, 0.8, 1.2, 3.0)
    popt, _, offset = get_opt_params(X, Y, Z)
    visualize_gaussian_fit(X, Y, Z, popt, offset, -2, 2, 21, elev=30, azim=45, save_path=tmp_path / "a.png")
    paths = [train_loss_surface(OPTIMIZERS[n], [-2, 2], 30, (*popt, offset)) for n in ("sgd", "adam-fused")]
    visualize_optimization_path(X, Y, Z, popt, offset, paths, ["sgd", "adam"], act_name="ReLU",
                                save_path=tmp_path / "b.png")
    analyze_loss_surface_multiscale(surface=(X[:16, :16], Y[:16, :16], Z[:16, :16]), save_path=tmp_path / "c.png")
    plot_persistence_diagram(persistence_diagram(two_basins()), save_path=tmp_path / "d.png")
    for name in "abcd":
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


@NEEDS_PYWT
def test_multiscale_computes_its_own_surface_from_a_model():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few power iterations suffice here
        result = analyze_loss_surface_multiscale(model, tiny_loader(), nn.CrossEntropyLoss(), "cpu", grid=16,
                                                 directions="random", plot=False)
    assert result["surface"][2].shape == (16, 16) and result["level"] >= 1


@NEEDS_GUDHI
@NEEDS_PYWT
def test_landscape_cli_extras_write_their_figures(tmp_path, capsys):
    from dldna_fused.cli import main

    out = tmp_path / "land"
    assert main(["landscape", "--epochs", "2", "--grid", "5", "--samples", "64", "--top-n", "2", "--perplexity", "1",
                 "--extras", "all", "--out", str(out), "--no-progress"]) == 0
    for name in ("gaussian_fit", "optimizer_paths", "multiscale", "persistence", "dynamics"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    summary = json.loads((out / "landscape.json").read_text())
    assert set(summary["dynamics"]) == {"loss", "grad_norm", "param_change", "weight_norm", "loss_improvement"}
    assert summary["topology"]["minima_above_threshold"] >= 1
    # The numbers the README quotes are printed too, not only written to landscape.json.
    printed = capsys.readouterr().out
    A = summary["gaussian_fit"]["popt"][0]
    assert f"Gaussian fit: A = {A:.4g}" in printed and "distance from the centre: SGD " in printed
    assert f"{100 * summary['multiscale_energy']['fractions'][0]:.2f}%" in printed
    assert f"persistence: {summary['topology']['minima_above_threshold']} minima above" in printed
    assert f"training loss {summary['dynamics']['loss'][0]:.3g} -> {summary['dynamics']['loss'][-1]:.3g}" in printed
