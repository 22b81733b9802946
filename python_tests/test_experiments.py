"""The optimizer-comparison experiments: datasets read from files written here in the real
FashionMNIST (IDX) and CIFAR-100 (pickle) formats, the models, the training loop and its
checkpoints, the runners, the classic reference optimizers against torch.optim, and the CLI."""

import json
import math
import pickle
import struct

import numpy as np
import pytest
import torch

from dldna_fused import optim, reference
from dldna_fused.experiments import (SimpleNetwork, get_data_loaders, get_dataset, load_model,
                                     load_models_by_pattern, plot_training_results, run_advanced_experiment,
                                     run_basic_experiment, train_model)
from dldna_fused.experiments.data import as_tensor_dataset
from dldna_fused.experiments.models import model_for
from dldna_fused.experiments.training import model_name


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file (the MNIST format): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_root(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


@pytest.fixture
def cifar_root(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 30), ("test", 10)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(np.arange(n) % 100),
                 "coarse_labels": list(np.arange(n) % 20), "filenames": [f"img{i}.png" for i in range(n)],
                 "batch_label": split}
        with open(base / split, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return tmp_path


def test_fashion_mnist_is_read_from_idx_files(fashion_root):
    train, test = get_dataset("FashionMNIST", root=str(fashion_root))
    assert (len(train), len(test)) == (40, 12)
    image, label = train[3]
    assert image.shape == (1, 28, 28) and label == 3
    # The vectorized loader gives exactly what torchvision's per-item transform gives.
    fast = as_tensor_dataset(train, "FashionMNIST")
    torch.testing.assert_close(fast[3][0], image, rtol=1e-6, atol=1e-6)
    train_loader, test_loader = get_data_loaders("FashionMNIST", batch_size=8, root=str(fashion_root))
    x, y = next(iter(train_loader))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.long


def test_cifar100_is_read_from_pickle_files(cifar_root):
    train, test = get_dataset("CIFAR100", root=str(cifar_root))
    assert (len(train), len(test)) == (30, 10)
    image, label = train[7]
    assert image.shape == (3, 32, 32) and label == 7
    torch.testing.assert_close(as_tensor_dataset(train, "CIFAR100")[7][0], image, rtol=1e-6, atol=1e-6)
    train_loader, _ = get_data_loaders("cifar100", batch_size=4, root=str(cifar_root), train_size=12)
    assert len(train_loader.dataset) == 12


@pytest.mark.parametrize("dataset,folder", [("FashionMNIST", "FashionMNIST/raw"), ("CIFAR100", "cifar-100-python")])
def test_missing_files_say_where_to_put_them_and_how_to_download(tmp_path, dataset, folder):
    with pytest.raises(FileNotFoundError) as info:
        get_dataset(dataset, root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / folder) in message and "download=True" in message


def test_digits_is_the_default_and_needs_no_files():
    train, test = get_dataset()
    assert (len(train), len(test)) == (1438, 359)
    assert set(test.tensors[1].tolist()) == set(range(10))
    x = train.tensors[0]
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01  # normalized by the train stats
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("mnist")


@pytest.fixture(scope="module")
def tiny_digits():
    return get_data_loaders("digits", batch_size=32, train_size=160, test_size=64)


@pytest.mark.parametrize("model_type", ["mlp", "cnn", "transformer"])
def test_one_epoch_smoke_per_model_type(tiny_digits, tmp_path, model_type):
    train_loader, test_loader = tiny_digits
    result = run_advanced_experiment(optim.AdamW, model_type, train_loader, test_loader, dict(lr=1e-3), "cpu", 2,
                                     results_dir=tmp_path)
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "gradient_norm", "memory",
                "epoch_time"):
        assert len(result[key]) == 2 and all(math.isfinite(v) for v in result[key]), key
    assert result["memory"][0] > result["state_memory"][0] > 0
    rows = (tmp_path / f"adamw_{model_type}.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,train_loss")
    assert json.loads((tmp_path / f"adamw_{model_type}.json").read_text())["optimizer"] == "adamw"
    # One epoch through train_model: its checkpoint rebuilds the same model.
    x, _ = next(iter(test_loader))
    model = model_for(model_type, tuple(x.shape[1:]), 10)
    metrics = train_model(model, train_loader, test_loader, "cpu", epochs=1, save_dir=tmp_path / "ckpt",
                          retrain=True, progress=False)
    assert all(math.isfinite(metrics[k][0]) for k in ("train_losses", "test_losses"))
    loaded, info = load_model(f"{model_name(model)}-epoch1.pth", path=tmp_path / "ckpt")
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_runs_of_one_loader_see_the_same_batches(tiny_digits):
    train_loader, test_loader = tiny_digits
    first = run_basic_experiment(optim.Adam, train_loader, test_loader, dict(lr=1e-3), "cpu", 1, results_dir=None)
    second = run_basic_experiment(optim.Adam, train_loader, test_loader, dict(lr=1e-3), "cpu", 1, results_dir=None)
    assert first["train_loss"] == second["train_loss"] and first["test_loss"] == second["test_loss"]


def test_train_model_checkpoints_round_trip(tiny_digits, tmp_path):
    train_loader, test_loader = tiny_digits
    torch.manual_seed(0)
    model = SimpleNetwork(torch.nn.Tanh(), input_shape=64, hidden_shape=[32, 16])
    metrics = train_model(model, train_loader, test_loader, "cpu", optimizer=optim.Adam(model.parameters()),
                          epochs=3, save_dir=tmp_path, retrain=True, progress=False)
    assert metrics["epochs"] == [1, 2, 3] and len(metrics["test_accuracies"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "SimpleNetwork-Tanh-epoch1.pth", "SimpleNetwork-Tanh-epoch2.pth", "SimpleNetwork-Tanh-epoch3.pth",
        "SimpleNetwork-Tanh.pth"]
    loaded, info = load_model("SimpleNetwork-Tanh.pth", path=tmp_path)
    assert info["epoch"] == 3 and isinstance(loaded.act_func, torch.nn.Tanh)
    x, _ = next(iter(test_loader))
    torch.testing.assert_close(loaded(x), model(x))
    models, labels = load_models_by_pattern(["Tanh"], [1, 3], path=tmp_path)
    assert labels == ["Tanh epoch 1", "Tanh epoch 3"] and len(models) == 2
    # Without retrain the final checkpoint is loaded, not trained again.
    fresh = SimpleNetwork(torch.nn.Tanh(), input_shape=64, hidden_shape=[32, 16])
    again = train_model(fresh, train_loader, test_loader, "cpu", epochs=3, save_dir=tmp_path, progress=False)
    assert again == metrics
    torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(FileNotFoundError, match="epoch9"):
        load_models_by_pattern(["Tanh"], [9], path=tmp_path)


def test_sophia_hessian_is_updated_inside_the_loop(tiny_digits):
    train_loader, test_loader = tiny_digits
    captured = {}

    class Spy(optim.Sophia):
        def update_hessian(self, scaler=None):
            captured["calls"] = captured.get("calls", 0) + 1
            super().update_hessian(scaler)

        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            captured["opt"] = self

    run_basic_experiment(Spy, train_loader, test_loader, dict(lr=1e-3, k=2), "cpu", 1, results_dir=None)
    assert captured["calls"] == len(train_loader) // 2  # every k = 2 steps
    opt = captured["opt"]
    assert all(opt.state[p]["hessian"].abs().sum() > 0 for g in opt.param_groups for p in g["params"])


CLASSIC = [
    pytest.param(reference.SGD, torch.optim.SGD, dict(lr=0.1), id="sgd"),
    pytest.param(reference.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), id="sgd-momentum"),
    pytest.param(reference.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.01),
                 id="sgd-chapter-dampening"),
    pytest.param(reference.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.8, nesterov=True, maximize=True),
                 id="sgd-nesterov-maximize"),
    pytest.param(reference.AdaGrad, torch.optim.Adagrad, dict(lr=0.1), id="adagrad"),
    pytest.param(reference.AdaGrad, torch.optim.Adagrad,
                 dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-6),
                 id="adagrad-decay-wd-init"),
    pytest.param(reference.RMSProp, torch.optim.RMSprop, dict(lr=0.01), id="rmsprop"),
    pytest.param(reference.RMSProp, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True,
                                                              weight_decay=0.01), id="rmsprop-centered-momentum"),
    pytest.param(reference.RMSProp, torch.optim.RMSprop, dict(lr=0.01, centered=True, maximize=True),
                 id="rmsprop-centered-maximize"),
]


@pytest.mark.parametrize("ours,theirs,kwargs", CLASSIC)
def test_classic_references_match_torch_over_10_steps(ours, theirs, kwargs):
    shapes = [(5,), (3, 7), (0,), (2, 3, 4)]
    params = [torch.randn(s) for s in shapes]
    mine = [torch.nn.Parameter(p.clone()) for p in params]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    a, b = ours(mine, **kwargs), theirs(torch_params, foreach=False, **kwargs)
    for step in range(10):
        for i, (p, q) in enumerate(zip(mine, torch_params)):
            g = None if (i + step) % 3 == 2 else torch.randn(p.shape)
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        a.step()
        b.step()
    for p, q in zip(mine, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in b.state[q].items():
            torch.testing.assert_close(a.state[p][key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_plot_training_results_writes_a_png(tmp_path):
    runs = {"a": {"train_loss": [1.0, 0.5], "train_accuracy": [0.5, 0.7], "gradient_norm": [1, 2], "memory": [3, 3]},
            "b": {"train_loss": [1.2, 0.4], "train_accuracy": [0.4, 0.8], "gradient_norm": [2, 1], "memory": [1, 1]}}
    fig = plot_training_results(runs, mode="train", title="t", save_path=tmp_path / "curves.png")
    assert len(fig.axes) == 4 and (tmp_path / "curves.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="mode"):
        plot_training_results(runs, mode="valid")


def test_compare_cli_on_digits_writes_results_and_plots(tmp_path, capsys):
    from dldna_fused.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "digits", "--optimizers", "sgd,adam,adafactor,torch-adam", "--epochs", "2",
                 "--train-size", "400", "--set", "adam.lr=2e-3", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["sgd", "adam", "adafactor", "torch-adam"]
    assert results["runs"]["adam"]["config"] == {"lr": 2e-3}
    for name in ("curves_train.png", "curves_test.png"):
        assert (out / name).stat().st_size > 1000
    table = capsys.readouterr().out
    assert "final test acc" in table and "torch-adam" in table
    with pytest.raises(SystemExit, match="unknown 'nadam'"):
        main(["compare", "--optimizers", "nadam", "--out", str(out)])


@pytest.mark.parametrize("setting,match", [
    ("lion.lrr=1e-3", r"--set lion.lrr: Lion has no argument 'lrr' \(have: lr, betas, weight_decay"),
    ("lion.lr=-1", r"--set lion: Lion\(lr=-1\) is refused: Invalid learning rate"),
])
def test_compare_names_a_bad_setting_before_training(tmp_path, setting, match):
    # It ended in a raw TypeError traceback, after training the optimizers listed before it.
    from dldna_fused.cli import main

    with pytest.raises(SystemExit, match=match):
        main(["compare", "--optimizers", "adam,lion", "--set", setting, "--out", str(tmp_path), "--no-progress"])
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
