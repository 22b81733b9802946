"""The chapter's calls, as it writes them, on the default data; and the edges a Hugging Face or
Lightning user meets (issue 17)."""

import argparse
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import NEEDS_GUDHI
from dldna_fused import optim, reference
from dldna_fused.experiments import SimpleNetwork, get_data_loaders, get_device, train_model
from dldna_fused.init import (analyze_initialization, create_detailed_analysis_table, init_methods,
                              init_weights_lecun, init_weights_lmomentum, init_weights_scaled_orthogonal)
from dldna_fused.landscape import bottleneck_distance, persistence_diagram
from dldna_fused.reference import BaseOptimizer


def test_the_chapters_initialization_analysis_runs_verbatim_on_digits(capsys):
    chapter_methods = {
        "lecun": init_weights_lecun,
        "xavier_normal": nn.init.xavier_normal_,
        "kaiming_normal": nn.init.kaiming_normal_,
        "orthogonal": nn.init.orthogonal_,
        "scaled_orthogonal": init_weights_scaled_orthogonal,
        "l-momentum": init_weights_lmomentum,
    }
    device = get_device()
    train_dataloader, test_dataloader = get_data_loaders()
    results = analyze_initialization(
        model_class=lambda: SimpleNetwork(act_func=nn.PReLU()),
        init_methods=chapter_methods,
        train_loader=train_dataloader,
        test_loader=test_dataloader,
        epochs=3,
        device=device,
    )
    create_detailed_analysis_table(results)
    assert set(results) == set(chapter_methods)
    assert results["kaiming_normal"]["error_rate"] < 20
    assert "Error Rate" in capsys.readouterr().out
    assert set(init_methods) >= set(chapter_methods)


def test_simple_network_takes_its_input_size_from_the_data_unless_given(tmp_path):
    train_dataloader, test_dataloader = get_data_loaders()
    model = SimpleNetwork(act_func=nn.ReLU(), hidden_shape=[512, 64])
    first = model.layers[1].weight
    optimizer = reference.SGD(params=model.parameters(), lr=1e-3, momentum=0.9)
    train_model(model, train_dataloader, test_dataloader, get_device(), optimizer=optimizer, epochs=1,
                batch_size=256, save_dir=tmp_path / "opts" / "ReLU", retrain=True)
    assert model.input_shape == 64 and model.layers[1].weight is first  # resized in place
    assert optimizer.param_groups[0]["params"][0] is first
    explicit = SimpleNetwork(input_shape=784)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        explicit(next(iter(train_dataloader))[0])


CHAPTER_SGD = '''
class SGD(BaseOptimizer):
    """Implements SGD with momentum."""
    def __init__(self, params: Iterable[nn.Parameter], lr: float,
                 maximize: bool = False, momentum: float = 0.0):
        super().__init__(params, lr)
        self.maximize = maximize
        self.momentum = momentum
        self.momentum_buffer_list: List[Optional[torch.Tensor]] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            grad = p.grad if not self.maximize else -p.grad
            if self.momentum != 0.0:
                buf = self.momentum_buffer_list[i]
                if buf is None:
                    buf = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1-self.momentum)
                grad = buf
                self.momentum_buffer_list[i] = buf
            p.add_(grad, alpha=-self.lr)
'''


def test_the_chapters_sgd_runs_on_base_optimizer_and_matches_the_chapter_momentum_switch():
    from typing import Iterable, List, Optional  # noqa: F401, UP035 (the chapter's imports)

    namespace = dict(BaseOptimizer=BaseOptimizer, Iterable=Iterable, List=List, Optional=Optional, nn=nn, torch=torch)
    exec(CHAPTER_SGD, namespace)  # noqa: S102 - the chapter's class, verbatim
    start = torch.randn(10)
    a, b = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    chapter = namespace["SGD"]([a], lr=0.1, momentum=0.9)
    ours = reference.SGD([b], lr=0.1, momentum=0.9, chapter_momentum=True)
    for _ in range(4):
        g = torch.randn(10)
        a.grad, b.grad = g.clone(), g.clone()
        chapter.step()
        ours.step()
    torch.testing.assert_close(a, b)
    chapter.zero_grad()
    assert a.grad is None
    with pytest.raises(ValueError, match="dampening = momentum"):
        reference.SGD([b], lr=0.1, momentum=0.9, dampening=0.5, chapter_momentum=True)


def test_reference_adam_takes_the_chapters_keywords():
    start = torch.randn(6)
    a, b = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    chapter = reference.Adam(params=[a], lr=1e-3, beta1=0.8, beta2=0.99, eps=1e-8)
    torch_style = reference.Adam([b], lr=1e-3, betas=(0.8, 0.99), eps=1e-8)
    assert chapter.param_groups[0]["betas"] == (0.8, 0.99)
    for _ in range(3):
        g = torch.randn(6)
        a.grad, b.grad = g.clone(), g.clone()
        chapter.step()
        torch_style.step()
    assert torch.equal(a, b)


@NEEDS_GUDHI
def test_bottleneck_distance_takes_what_persistence_diagram_returns():
    x = np.linspace(-2, 2, 21)
    bowl = np.add.outer(x ** 2, x ** 2)
    bumpy = bowl + 0.3 * np.sin(4 * np.add.outer(x, x))
    d1, d2 = persistence_diagram(bowl), persistence_diagram(bumpy)
    per_dim = bottleneck_distance(d1, d2)
    assert set(per_dim) == {0, 1} and all(v >= 0 for v in per_dim.values())
    assert bottleneck_distance(d1, d2, dim=0) == per_dim[0] == bottleneck_distance(d1[0], d2[0])
    assert bottleneck_distance(d1, d1) == {0: 0.0, 1: 0.0}
    with pytest.raises(TypeError, match="not one of each"):
        bottleneck_distance(d1, d2[0])


# ---- Adafactor with schedulers and torch.compile ----------------------------------------------------

def test_adafactor_get_lr_is_the_step_size_transformers_reports():
    p = nn.Parameter(torch.randn(8, 4))
    opt = optim.Adafactor([p])
    for _ in range(3):
        p.grad = torch.randn(8, 4)
        opt.step()
    group, state = opt.param_groups[0], opt.state[p]
    expected = max(1e-3, float(state["RMS"])) * min(1e-2, 1 / math.sqrt(3))
    assert opt._get_lr(group, state) == pytest.approx(expected)


def test_transformers_adafactor_schedule_works():
    transformers = pytest.importorskip("transformers")
    p = nn.Parameter(torch.randn(8, 4))
    opt = optim.Adafactor([p])
    schedule = transformers.optimization.AdafactorSchedule(opt)
    for _ in range(2):
        p.grad = torch.randn(8, 4)
        opt.step()
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(opt._get_lr(opt.param_groups[0], opt.state[p]))


@pytest.mark.slow
@pytest.mark.parametrize("cls", [optim.Adafactor, optim.AdamW], ids=["adafactor", "adamw"])
def test_optimizers_compile_without_graph_breaks(cls):
    p = nn.Parameter(torch.randn(8, 4))
    q = nn.Parameter(torch.randn(5))
    opt = cls([p, q])
    p.grad, q.grad = torch.randn(8, 4), torch.randn(5)
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---- Sophia in loops it does not control ------------------------------------------------------------

def test_sophia_warns_once_when_the_hessian_is_never_updated():
    p = nn.Parameter(torch.randn(4))
    opt = optim.Sophia([p], k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(60):
            p.grad = torch.randn(4)
            opt.step()
    messages = [str(w.message) for w in caught if "without a Hessian update" in str(w.message)]
    assert len(messages) == 1 and "20 steps" in messages[0]


def test_sophia_that_updates_its_hessian_does_not_warn():
    p = nn.Parameter(torch.randn(4))
    opt = optim.Sophia([p], k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(60):
            p.grad = torch.randn(4)
            opt.step()
            if opt.should_update_hessian():
                p.grad = torch.randn(4)
                opt.update_hessian()


# ---- the command line -------------------------------------------------------------------------------

def test_help_shows_every_default(capsys):
    from dldna_fused import cli

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "(default: float32)" in out and "(default: 20)" in out


@pytest.mark.parametrize("command", ["bench", "compare", "init", "landscape"])
def test_help_says_each_default_once(capsys, command):
    # Options whose help says its default got torch's "(default: ...)" appended as well.
    from dldna_fused import cli

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    for entry in " ".join(capsys.readouterr().out.split()).split(" --")[1:]:
        assert entry.lower().count("default") <= 1, entry


def test_bench_warns_when_the_machine_is_busy(monkeypatch, capsys):
    from dldna_fused import bench

    monkeypatch.setattr(bench, "_time", lambda *args, **kwargs: [0.001, 0.004, 0.005])
    bench.copy_bandwidth(1000, torch.float32, "cpu", 1, 3)
    assert "the machine is busy" in capsys.readouterr().err
    monkeypatch.setattr(bench, "_time", lambda *args, **kwargs: [0.001, 0.0011, 0.0012])
    bench.copy_bandwidth(1000, torch.float32, "cpu", 1, 3)
    assert "busy" not in capsys.readouterr().err


def test_parser_of_the_landscape_threshold_says_it_is_a_loss():
    from dldna_fused.landscape import cli as landscape_cli

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    landscape_cli.add_arguments(parser)
    assert "a loss difference" in " ".join(parser.format_help().split())


# ---- results files ------------------------------------------------------------------------------

def test_results_are_named_one_way_and_never_overwritten(tmp_path):
    from dldna_fused.experiments.runner import _optimizer_name, save_results

    class Adam(torch.optim.Adam):  # a user's own class: named in lower case like the registered ones
        pass

    assert _optimizer_name(reference.SGD) == "sgd" and _optimizer_name(Adam) == "adam"
    first = save_results({"train_loss": [1.0, 0.5]}, tmp_path / "adam_mlp")
    second = save_results({"train_loss": [2.0]}, tmp_path / "adam_mlp")
    assert first[0].name == "adam_mlp.csv" and second[0] != first[0] and second[0].name.startswith("adam_mlp-")
    assert first[0].read_text().count("\n") == 3  # the first run's file is untouched
    third = save_results({"train_loss": [3.0]}, tmp_path / "adam_mlp")
    assert len({first[1], second[1], third[1]}) == 3


def test_the_chapters_model_sizes_are_named_configurations():
    from dldna_fused.experiments.models import model_for

    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert 1.1e6 < count(model_for("cnn", (3, 32, 32), 100, size="chapter")) < 1.3e6
    assert count(model_for("cnn", (3, 32, 32), 100)) < 2e5
    with torch.device("meta"):  # 64M parameters: counted without allocating them
        assert 55e6 < count(model_for("transformer", (3, 32, 32), 100, size="chapter")) < 70e6
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        model_for("cnn", (3, 32, 32), 100, size="huge")


# ---- figures ---------------------------------------------------------------------------------------

def test_figures_say_what_they_show():
    from dldna_fused import reference
    from dldna_fused.experiments.plots import plot_training_results
    from dldna_fused.init.variance import plot_variance_propagation
    from dldna_fused.landscape import train_loss_surface, visualize_optimization_path, visualize_weight_space

    runs = {"a": {"train_loss": [1.0, 0.5], "test_loss": [1.1, 0.6], "train_accuracy": [0.5, 0.7],
                  "test_accuracy": [0.4, 0.6], "gradient_norm": [1.0, 0.9], "memory": [1.0, 1.0]}}
    test_figure = plot_training_results(runs, mode="test")
    assert [ax.get_title() for ax in test_figure.axes] == ["test loss", "test accuracy"]  # no train-time metrics
    ticks = test_figure.axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)  # no fractional epochs

    params = (-5.0, 0.0, 0.0, 1.0, 1.0, 5.0)
    paths = [train_loss_surface(lambda p: reference.SGD(p, lr=0.1, momentum=0.5), [-1, 1], 5, params),
             train_loss_surface(lambda p: optim.Adam(p, lr=0.1), [-1, 1], 5, params)]
    assert paths[0].label == "SGD lr=0.1 momentum=0.5" and paths[1].label == "Adam lr=0.1"
    grid = np.linspace(-1, 1, 5)
    X, Y = np.meshgrid(grid, grid)
    figure = visualize_optimization_path(X, Y, X * 0, params[:5], params[5], paths)
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == [paths[0].label, paths[1].label]

    variance = {"sane": {"forward": [1.0, 0.9, 0.8], "backward": [1.0, 1.0, 1.0]},
                "exploding": {"forward": [1.0, 1e20, 1e35], "backward": [1e30, 1e10, 1.0]}}
    labels = [t.get_text() for t in plot_variance_propagation(variance).axes[0].get_legend().get_texts()]
    assert labels == ["sane", "exploding (off scale: 1e+35)"]

    pca = visualize_weight_space(np.random.default_rng(0).normal(size=(10, 2)), [f"epoch {i}" for i in range(1, 11)])
    colorbar = pca.axes[1]
    assert [int(t) for t in colorbar.get_yticks()] == list(range(1, 11))


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    lambda opt: torch.optim.lr_scheduler.LinearLR(opt),
], ids=["lambda", "cosine", "linear"])
def test_a_scheduler_on_relative_step_adafactor_says_what_to_do(make):
    p = nn.Parameter(torch.randn(4, 3))
    relative = optim.Adafactor([p])
    with pytest.raises(TypeError, match="pass relative_step=False and an lr"):
        make(relative)
    assert "initial_lr" not in relative.param_groups[0]  # the scheduler's None is taken back
    scheduled = optim.Adafactor([p], lr=1e-2, relative_step=False)
    scheduler = make(scheduled)
    p.grad = torch.randn(4, 3)
    scheduled.step()
    scheduler.step()
    # The groups stay plain where it matters: state_dict and a reload round trip.
    saved = scheduled.state_dict()
    assert type(saved["param_groups"][0]) is dict
    fresh = optim.Adafactor([p])
    fresh.load_state_dict(saved)
    with pytest.raises(TypeError, match="relative_step=False"):
        make(optim.Adafactor([nn.Parameter(torch.randn(2, 2))]))
