"""Loading a checkpoint never runs its code (issue 27): every torch.load in the package, the
examples and the benchmarks is weights_only=True, and each kind of bad file gets a named error
that names it, through load_model, load_models_by_pattern, train_model and `dldna-fused landscape
--checkpoints`, leaving the model as it was."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dldna_fused.experiments import (CheckpointFormatError, IncompatibleCheckpointError, SimpleNetwork,
                                     UnreadableCheckpointError, UnsafeCheckpointError, get_data_loaders, load_model,
                                     load_models_by_pattern, train_model)
from dldna_fused.experiments.checkpoints import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class _WritesMarker:
    """Unpickling this runs open(marker, "w"): a checkpoint that would leave a file if its code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model():
    torch.manual_seed(0)
    return SimpleNetwork(torch.nn.Tanh(), input_shape=64, hidden_shape=[16])


def _evil(folder: Path, name: str) -> Path:
    """A real train_model checkpoint of _model() with one extra entry whose unpickling writes
    ``folder/marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = _model()
    path = folder / name
    torch.save({"class": "SimpleNetwork", "config": model.config(), "state_dict": model.state_dict(),
                "epoch": 1, "metrics": {"payload": _WritesMarker(folder / "marker")}}, path)
    return path


def _checkpoint(folder: Path, name: str, model=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model if model is not None else _model(), folder / name, 1, {"epochs": [1]})
    return folder / name


# ---- the source scan ----------------------------------------------------------------------------

def _unsafe_loads(source: str) -> list[int]:
    """Lines of ``source`` calling torch.load (or torch.serialization.load) without
    weights_only=True, or pickle.load/loads, which has no safe mode."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load"):
            lines.append(node.lineno)
        elif name in ("torch.load", "torch.serialization.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                lines.append(node.lineno)
    return lines


def test_the_scan_finds_an_unsafe_load():
    # The scanner itself must be able to fail.
    assert _unsafe_loads("import torch\ntorch.load(f)\n") == [2]
    assert _unsafe_loads("torch.load(f, weights_only=False)") == [1]
    assert _unsafe_loads("import pickle\npickle.loads(b)") == [2]
    assert _unsafe_loads("torch.load(f, map_location='cpu', weights_only=True)") == []


def test_every_load_in_the_package_examples_and_benchmarks_is_weights_only():
    files = [f for folder in ("dldna_fused", "examples", "benchmarks", "docs") for f in (ROOT / folder).rglob("*.py")]
    assert len(files) > 50  # the scan did find the package
    offenders = [f"{f.relative_to(ROOT)}:{line}" for f in files for line in _unsafe_loads(f.read_text())]
    assert not offenders, f"loads that can run a file's code: {offenders}"


# ---- unsafe files ---------------------------------------------------------------------------------

def test_load_model_refuses_a_checkpoint_that_would_run_code(tmp_path):
    path = _evil(tmp_path, "SimpleNetwork-Tanh-epoch1.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"SimpleNetwork-Tanh-epoch1\.pth.*not unpickle") as info:
        load_model(path.name, path=tmp_path)
    assert info.value.path == path and "open" in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_load_models_by_pattern_refuses_it_too(tmp_path):
    _checkpoint(tmp_path, "SimpleNetwork-Tanh-epoch1.pth")
    _evil(tmp_path, "SimpleNetwork-Tanh-epoch2.pth")
    with pytest.raises(UnsafeCheckpointError, match="epoch2"):
        load_models_by_pattern(["Tanh"], [1, 2], path=tmp_path)
    assert not (tmp_path / "marker").exists()


def test_train_model_refuses_an_unsafe_final_checkpoint_and_leaves_the_model(tmp_path):
    train_loader, test_loader = get_data_loaders("digits", batch_size=32, train_size=64, test_size=32)
    _evil(tmp_path, "SimpleNetwork-Tanh.pth")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match=r"SimpleNetwork-Tanh\.pth"):
        train_model(model, train_loader, test_loader, "cpu", epochs=1, save_dir=tmp_path, progress=False)
    assert not (tmp_path / "marker").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- unreadable, foreign and mismatched files -------------------------------------------------------

def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flipped(path):
    data = bytearray(path.read_bytes())
    start = data.find(b"data.pkl") + 64  # inside the pickle stream of the zip's first record
    for i in range(start, start + 48):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": _truncated,
    "flipped-bytes": _flipped,
    "empty": lambda path: path.write_bytes(b""),
    "text": lambda path: path.write_text("epoch,loss\n1,0.5\n"),
    "random-bytes": lambda path: path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_an_unreadable_file_is_named(tmp_path, corruption):
    path = _checkpoint(tmp_path, "SimpleNetwork-Tanh-epoch1.pth")
    CORRUPTIONS[corruption](path)
    with pytest.raises(UnreadableCheckpointError, match=r"SimpleNetwork-Tanh-epoch1\.pth: is (truncated|corrupt)"):
        load_model(path.name, path=tmp_path)


@pytest.mark.parametrize("content", [
    pytest.param(lambda model: model.state_dict(), id="bare-state-dict"),
    pytest.param(lambda model: [t for t in model.state_dict().values()], id="list-of-tensors"),
    pytest.param(lambda model: {"state_dict": {"w": [1, 2]}}, id="state-dict-of-lists"),
    pytest.param(lambda model: {"state_dict": model.state_dict(), "class": "SimpleNetwork", "config": None},
                 id="no-config"),
    pytest.param(lambda model: {"state_dict": model.state_dict(), "class": "NoSuchNet", "config": {"act_func": "Tanh"}},
                 id="unknown-class"),
])
def test_a_torch_file_that_is_no_train_model_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "SimpleNetwork-Tanh-epoch1.pth"
    torch.save(content(_model()), path)
    with pytest.raises(CheckpointFormatError, match=r"SimpleNetwork-Tanh-epoch1\.pth"):
        load_model(path.name, path=tmp_path)


def test_a_checkpoint_of_another_architecture_is_named_and_loads_nothing(tmp_path):
    train_loader, test_loader = get_data_loaders("digits", batch_size=32, train_size=64, test_size=32)
    torch.manual_seed(1)
    other = SimpleNetwork(torch.nn.Tanh(), input_shape=64, hidden_shape=[16, 8])  # one more layer
    _checkpoint(tmp_path, "SimpleNetwork-Tanh.pth", other)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError,
                       match=r"SimpleNetwork-Tanh\.pth: .*unexpected: layers\.5\.weight.*shape mismatch: layers\.3\.weight"):
        train_model(model, train_loader, test_loader, "cpu", epochs=1, save_dir=tmp_path, progress=False)
    # torch's load_state_dict would have copied layers.1.* (which fit) before raising.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A checkpoint whose recorded config disagrees with its own weights fails the same way.
    torch.save({"class": "SimpleNetwork", "config": _model().config(), "state_dict": other.state_dict(),
                "epoch": 1, "metrics": {}}, tmp_path / "SimpleNetwork-Tanh-epoch1.pth")
    with pytest.raises(IncompatibleCheckpointError, match="epoch1"):
        load_model("SimpleNetwork-Tanh-epoch1.pth", path=tmp_path)


def test_a_good_checkpoint_still_loads_with_weights_only(tmp_path):
    model = _model()
    _checkpoint(tmp_path, "SimpleNetwork-Tanh-epoch1.pth", model)
    loaded, info = load_model("SimpleNetwork-Tanh-epoch1.pth", path=tmp_path)
    assert info == {"epoch": 1, "metrics": {"epochs": [1]}}
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), model(x))


# ---- the CLI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["unsafe", "truncated", "other-architecture"])
def test_landscape_reports_a_bad_checkpoint_and_exits_non_zero_without_a_traceback(tmp_path, kind):
    folder = tmp_path / "ckpt"
    if kind == "unsafe":
        bad = _evil(folder, "SimpleNetwork-ReLU-epoch1.pth")
        expected = "will not unpickle"
    elif kind == "truncated":
        bad = _checkpoint(folder, "SimpleNetwork-ReLU-epoch1.pth")
        _truncated(bad)
        expected = "truncated, corrupt"
    else:
        folder.mkdir()
        bad = folder / "SimpleNetwork-ReLU-epoch1.pth"
        torch.save({"class": "SimpleNetwork", "config": _model().config(),
                    "state_dict": SimpleNetwork(input_shape=64, hidden_shape=[4]).state_dict(), "epoch": 1,
                    "metrics": {}}, bad)
        expected = "do not fit"
    run = subprocess.run([sys.executable, "-m", "dldna_fused", "landscape", "--checkpoints", str(folder), "--epochs",
                          "1", "--out", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert str(bad) in run.stderr and expected in run.stderr, run.stderr
    assert not (folder / "marker").exists()
