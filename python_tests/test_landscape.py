"""Loss landscapes I: Hessian eigenpairs, trace and density against the exact Hessian of a small
MLP, filter normalization, grid evaluation that leaves the model bitwise unchanged, linear
interpolation end points, weight-space embeddings, and `dldna-fused landscape`."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dldna_fused.landscape import (analyze_weight_space, filter_normalize, hessian_density, hessian_eigenvectors,
                                   hessian_trace, linear_interpolation, orthogonalize_directions,
                                   random_directions, visualize_linear_interpolation, visualize_loss_surface,
                                   visualize_weight_space, xy_perturb_loss)


@pytest.fixture(scope="module")
def exact():
    """A 38-parameter float64 MLP, a loader of 64 samples in uneven batches, and its exact Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    loss_func = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_of(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            params[n] = theta[i:i + k].reshape(s)
            i += k
        return loss_func(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = torch.autograd.functional.hessian(loss_of, flat)
    return model, loader, loss_func, H


def test_top_eigenpairs_match_the_exact_hessian(exact):
    model, loader, loss_func, H = exact
    values, vectors, report = hessian_eigenvectors(model, loss_func, loader, top_n=4, max_iter=3000, tol=1e-10,
                                                   return_report=True)
    ev, evec = torch.linalg.eigh(H)
    order = ev.abs().argsort(descending=True)
    assert all(r["converged"] and r["residual"] < 1e-10 for r in report)
    for k in range(4):
        assert values[k] == pytest.approx(ev[order[k]].item(), rel=1e-4)
        v = torch.cat([t.reshape(-1) for t in vectors[k]])
        assert abs(v @ evec[:, order[k]]).item() > 0.999
        assert [t.shape for t in vectors[k]] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_which_picks_the_largest_or_the_most_negative(exact, which):
    model, loader, loss_func, H = exact
    ev, evec = torch.linalg.eigh(H)
    assert ev.min() < 0  # the fixture's Hessian has negative curvature to find
    values, vectors, report = hessian_eigenvectors(model, loss_func, loader, top_n=3, tol=1e-8, which=which,
                                                   return_report=True)
    order = ev.argsort(descending=which == "LA")
    assert all(r["converged"] and r["residual"] <= 1e-8 for r in report)
    for k in range(3):
        assert values[k] == pytest.approx(ev[order[k]].item(), rel=1e-6, abs=1e-10)
        v = torch.cat([t.reshape(-1) for t in vectors[k]])
        assert abs(v @ evec[:, order[k]]).item() > 0.999
    with pytest.raises(ValueError, match="which must be one of LM, LA, SA"):
        hessian_eigenvectors(model, loss_func, loader, which="BE")
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        hessian_eigenvectors(model, loss_func, loader, max_iter=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        hessian_eigenvectors(model, loss_func, loader, tol=float("nan"))


def test_lanczos_stops_on_the_measured_residual_and_counts_its_products(exact):
    """The report's residual is ||Hv - lambda v|| / |lambda| measured after the stop, and Lanczos
    takes fewer products than the parameters (38) to reach it for the top pair."""
    model, loader, loss_func, H = exact
    values, vectors, report = hessian_eigenvectors(model, loss_func, loader, top_n=1, tol=1e-6, return_report=True)
    v = torch.cat([t.reshape(-1) for t in vectors[0]])
    residual = ((H @ v - values[0] * v).norm() / abs(values[0])).item()
    assert report[0]["residual"] == pytest.approx(residual, rel=1e-3, abs=1e-12) and residual <= 1e-6
    assert report[0]["iterations"] < 38


def test_products_in_blocks_and_with_rebuilt_graphs_equal_single_ones(exact):
    """A block of vectors gives the rows' single products; a loader past max_retained_batches
    rebuilds each batch's graph and gives the same products as retained graphs."""
    from dldna_fused.landscape.hessian import HessianOperator, eval_mode

    model, loader, loss_func, H = exact
    with eval_mode(model):
        retained = HessianOperator(model, loss_func, loader, "cpu")
        rebuilt = HessianOperator(model, loss_func, loader, "cpu", max_retained_batches=0)
        assert retained.retained and not rebuilt.retained and rebuilt._graphs is None
        X = torch.randn(5, retained.size, dtype=torch.float64)
        block = retained(X)
        torch.testing.assert_close(block, X @ H.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rebuilt(X), block, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(retained(X[2]), block[2], rtol=1e-12, atol=1e-14)
        assert retained.products == 6 and rebuilt.products == 5


def test_unconverged_eigenpairs_are_reported_and_warned(exact):
    model, loader, loss_func, _ = exact
    with pytest.warns(UserWarning, match="did not converge"):
        _, _, report = hessian_eigenvectors(model, loss_func, loader, top_n=1, max_iter=2, return_report=True)
    assert report[0]["converged"] is False and report[0]["iterations"] == 2


def test_model_mode_is_restored_and_is_cuda_falls_back(exact):
    model, loader, loss_func, _ = exact
    model.train()
    context = pytest.warns(UserWarning, match="is_cuda=True") if not torch.cuda.is_available() else None
    if context:
        with context:
            hessian_eigenvectors(model, loss_func, loader, top_n=1, max_iter=5, tol=1.0, is_cuda=True)
    assert model.training


def test_hutchinson_trace_is_within_three_standard_errors(exact):
    model, loader, loss_func, H = exact
    estimate, stderr = hessian_trace(model, loss_func, loader, n_samples=300, seed=1)
    assert stderr > 0
    assert abs(estimate - H.trace().item()) < 3 * stderr


def test_hutchpp_trace_is_within_three_standard_errors_and_tighter(exact):
    model, loader, loss_func, H = exact
    plain = hessian_trace(model, loss_func, loader, n_samples=30, seed=1)
    estimate, stderr = hessian_trace(model, loss_func, loader, n_samples=30, seed=1, method="hutch++", block=4)
    assert 0 < stderr < plain[1]
    assert abs(estimate - H.trace().item()) < 3 * stderr
    with pytest.raises(ValueError, match="method must be one of hutchinson, hutch"):
        hessian_trace(model, loss_func, loader, method="xtrace")
    with pytest.raises(ValueError, match="n_samples must be >= 4"):
        hessian_trace(model, loss_func, loader, n_samples=3, method="hutch++")


def test_slq_density_integrates_to_one_and_its_mean_is_trace_over_n(exact):
    model, loader, loss_func, H = exact
    d = hessian_density(model, loss_func, loader, n_iter=38, n_runs=30, seed=2)
    grid, density = d["grid"], d["density"]
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-4)
    for weights in d["weights"]:
        assert weights.sum() == pytest.approx(1.0)
    # Each run's mean is v^T H v for a normalized Rademacher v: unbiased for tr(H) / n.
    means = np.array([(w * nodes).sum() for w, nodes in zip(d["weights"], d["nodes"])])
    n = H.shape[0]
    assert np.trapezoid(grid * density, grid) == pytest.approx(means.mean(), rel=1e-3)
    assert abs(means.mean() - H.trace().item() / n) < 3 * means.std(ddof=1) / math.sqrt(len(means))
    # With m = n Lanczos steps the nodes are the exact eigenvalues.
    assert d["nodes"][0].max() == pytest.approx(torch.linalg.eigvalsh(H).max().item(), rel=1e-6)


def conv_mlp():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_filter_normalized_directions_have_the_weights_filter_norms():
    torch.manual_seed(0)
    model = conv_mlp()
    d = random_directions(model, 1, seed=3)[0]
    for direction, p in zip(d, model.parameters()):
        if p.dim() <= 1:
            assert torch.count_nonzero(direction) == 0
        else:
            torch.testing.assert_close(direction.reshape(len(p), -1).norm(dim=1), p.detach().reshape(len(p), -1).norm(dim=1),
                                       rtol=1e-5, atol=1e-6)
    kept = filter_normalize([torch.randn_like(p) for p in model.parameters()], model, one_dim="keep")
    bias = list(model.parameters())[1]
    assert kept[1].norm().item() == pytest.approx(bias.norm().item(), rel=1e-5)


def test_orthogonalized_directions_are_orthogonal_and_keep_their_norms():
    model = conv_mlp()
    d1, d2 = random_directions(model, 2, seed=4, normalize=None)
    o1, o2 = orthogonalize_directions([d1, d2])
    dot = sum((a * b).sum() for a, b in zip(o1, o2)).item()
    assert abs(dot) < 1e-4
    assert math.sqrt(sum((b * b).sum() for b in o2)) == pytest.approx(math.sqrt(sum((b * b).sum() for b in d2)),
                                                                      rel=1e-5)


@pytest.fixture
def small_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))
    model(torch.randn(8, 1, 4, 4))  # give BatchNorm running statistics
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 4, (40,))
    return model, DataLoader(TensorDataset(x, y), batch_size=16), nn.CrossEntropyLoss()


def snapshot(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def assert_bitwise_unchanged(model, saved):
    for now, before in zip(list(model.parameters()) + list(model.buffers()), saved):
        assert torch.equal(now, before)


def test_grid_centre_is_the_unperturbed_loss_and_the_model_is_unchanged(small_setup):
    model, loader, loss_func = small_setup
    model.train()
    saved = snapshot(model)
    lambdas = np.linspace(-0.5, 0.5, 7).astype(np.float32)
    X, Y, Z = xy_perturb_loss(model, random_directions(model, 2), loader, loss_func, lambdas, lambdas[:5] * 2)
    assert X.shape == Y.shape == Z.shape == (5, 7)
    assert X[0, 6] == lambdas[6] and Y[4, 0] == 2 * lambdas[4]
    model.eval()
    with torch.no_grad():
        expected = sum(loss_func(model(x), y).item() * len(x) for x, y in loader) / 40
    model.train()
    assert Z[3, 3] == pytest.approx(expected, rel=1e-6)  # lambda1[3] = lambda2[3] = 0
    assert_bitwise_unchanged(model, saved)
    assert model.training


def test_model_is_restored_after_an_error_inside_the_loss(small_setup):
    model, loader, _ = small_setup
    saved = snapshot(model)
    calls = []

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        xy_perturb_loss(model, random_directions(model, 2), loader, failing_loss, [0.3, 0.6], [0.1, 0.2])
    assert_bitwise_unchanged(model, saved)


def test_surface_points_are_the_perturbed_models_losses(small_setup):
    model, loader, loss_func = small_setup
    d1, d2 = random_directions(model, 2, seed=5)
    _, _, Z = xy_perturb_loss(model, [d1, d2], loader, loss_func, [0.0, 0.4], [-0.2, 0.0])
    perturbed = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    shift = 0.4 * torch.nn.utils.parameters_to_vector(d1) - 0.2 * torch.nn.utils.parameters_to_vector(d2)
    import copy
    other = copy.deepcopy(model).eval()
    torch.nn.utils.vector_to_parameters(perturbed + shift, other.parameters())
    with torch.no_grad():
        expected = sum(loss_func(other(x), y).item() * len(x) for x, y in loader) / 40
    assert Z[0, 1] == pytest.approx(expected, rel=1e-5)


def test_interpolation_end_points_reproduce_each_models_loss(small_setup):
    model1, loader, loss_func = small_setup
    torch.manual_seed(1)
    model2 = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))
    model2(torch.randn(8, 1, 4, 4) * 3)

    def loss_of(m):
        m.eval()
        with torch.no_grad():
            return sum(loss_func(m(x), y).item() * len(x) for x, y in loader) / 40

    saved = snapshot(model1)
    alphas, losses, accuracies = linear_interpolation(model1, model2, loader, loss_func, "cpu")
    assert len(alphas) == len(losses) == len(accuracies) == 21
    assert losses[0] == pytest.approx(loss_of(model1), rel=1e-6)
    assert losses[-1] == pytest.approx(loss_of(model2), rel=1e-6)
    _, frozen, _ = linear_interpolation(model1, model2, loader, loss_func, "cpu", alphas=[1.0],
                                        interpolate_buffers=False)
    assert frozen[0] != pytest.approx(losses[-1])  # model1's BatchNorm statistics with model2's weights
    assert_bitwise_unchanged(model1, saved)


def test_weight_space_embeddings():
    torch.manual_seed(0)
    models = [nn.Linear(6, 3) for _ in range(6)]
    pca, explained = analyze_weight_space(models, None, "pca", return_explained_variance=True)
    assert pca.shape == (6, 2) and 0 < explained.sum() <= 1 + 1e-9 and explained[0] >= explained[1]
    tsne = analyze_weight_space(models, None, "tsne", perplexity=2)
    assert tsne.shape == (6, 2)
    with pytest.raises(ValueError, match="perplexity must be in \\(0, number of models = 6\\)"):
        analyze_weight_space(models, None, "tsne", perplexity=30)


def test_every_plot_writes_a_png(tmp_path, small_setup):
    model, loader, loss_func = small_setup
    surface = xy_perturb_loss(model, random_directions(model, 2), loader, loss_func, [-0.1, 0, 0.1], [-0.1, 0, 0.1])
    visualize_loss_surface([surface, surface], "t", plot_3d=True, save_path=tmp_path / "a.png")
    visualize_loss_surface([surface], "t", plot_3d=False, save_path=tmp_path / "b.png")
    visualize_linear_interpolation([0, 0.5, 1], [1, 0.5, 0.2], [0.1, 0.5, 0.9], "t", save_path=tmp_path / "c.png")
    visualize_weight_space(np.random.randn(4, 2), ["a", "b", "c", "d"], "PCA", [0.6, 0.3], save_path=tmp_path / "d.png")
    for name in "abcd":
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_landscape_cli_writes_every_figure(tmp_path):
    from dldna_fused.cli import main

    out = tmp_path / "land"
    assert main(["landscape", "--epochs", "3", "--grid", "5", "--samples", "64", "--top-n", "2", "--perplexity", "1",
                 "--out", str(out), "--no-progress"]) == 0
    for name in ("surface_hessian_3d", "surface_hessian_contour", "surface_random_3d", "surface_random_contour",
                 "interpolation", "weight_space_pca", "weight_space_tsne"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    summary = json.loads((out / "landscape.json").read_text())
    assert len(summary["eigenvalues"]) == 2 and summary["center_loss"] == pytest.approx(
        summary["interpolation"]["losses"][-1], rel=1e-5)


def test_landscape_cli_leaves_no_blank_lines_in_a_terminal(tmp_path):
    # On a terminal whose width tqdm cannot read (a pty of size 0, as under `script` or some CI
    # logs) every finished bar used to leave an empty line: four between the CLI's own lines.
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    run = subprocess.Popen([sys.executable, "-m", "dldna_fused", "landscape", "--epochs", "2", "--grid", "21",
                            "--samples", "64", "--top-n", "2", "--perplexity", "1", "--out", str(tmp_path)],
                           stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, cwd=tmp_path)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert run.wait(timeout=300) == 0
    os.close(leader)
    lines = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").split("\n")
    # tqdm's own "\r" redraws stay on a line; what the user sees per line is its last redraw.
    shown = [line.split("\r")[-1] for line in lines[:-1]]
    assert "wrote the figures and landscape.json" in shown[-1]
    assert all(line.strip() for line in shown), shown
