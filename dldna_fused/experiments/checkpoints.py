"""The checkpoints ``train_model`` writes and ``load_model`` reads, and the errors a bad file gets.

[Note: safe checkpoint loading]
A checkpoint is a pickle, and unpickling can call any function the file names. Users download
checkpoint folders and point ``load_model``, ``load_models_by_pattern`` and ``dldna-fused
landscape --checkpoints`` at them, so every read goes through ``torch.load(weights_only=True)``:
torch's restricted unpickler, which builds tensors and plain containers (dict, list, tuple, str,
numbers) and refuses every other global before calling it. Nothing a checkpoint holds is executed.
What we write (class name, config dict of plain values, state_dict, epoch, metrics) is all of that
kind, so the restriction costs nothing. python_tests/test_checkpoints.py scans the package, the
examples and the benchmarks for any torch.load that does not pass weights_only=True.

A file that cannot be read gets a named error that names it (each a CheckpointError, which is a
ValueError): UnsafeCheckpointError when it holds objects other than tensors and plain containers,
UnreadableCheckpointError when it is truncated, corrupt or not a torch file at all,
CheckpointFormatError when it is a torch file but not one of train_model's, and
IncompatibleCheckpointError when its weights do not fit the model (keys or shapes). The weights
are checked against the model before any is copied, so a refused checkpoint leaves the model as
it was.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

# The entries of a train_model checkpoint (save_checkpoint).
_ENTRIES = ("class", "config", "state_dict", "epoch", "metrics")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; ``path`` is the file."""

    def __init__(self, path, message: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class UnsafeCheckpointError(CheckpointError):
    """The file holds objects other than tensors and plain containers: loading them would run
    code the file names, so it is refused unread."""


class UnreadableCheckpointError(CheckpointError):
    """The file is truncated, corrupt, or not a file torch.save wrote."""


class CheckpointFormatError(CheckpointError):
    """A torch file, but not a checkpoint of train_model (missing or malformed entries)."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint's weights do not fit the model: other parameter names or shapes."""


def save_checkpoint(model: nn.Module, path: Path, epoch: int, metrics: dict) -> None:
    """Writes ``model``'s class name, config (when it has ``config()``), state_dict, ``epoch`` and
    ``metrics`` to ``path``: only tensors and plain values, so weights_only loading reads it."""
    config = model.config() if hasattr(model, "config") else None
    torch.save({"class": type(model).__name__, "config": config, "state_dict": model.state_dict(),
                "epoch": epoch, "metrics": metrics}, path)


def read_checkpoint(path, device="cpu") -> dict:
    """The checkpoint dict at ``path``, read with ``weights_only=True`` (see [Note: safe checkpoint
    loading]) onto ``device``. Raises FileNotFoundError for a missing file and a CheckpointError
    naming the file for anything that is not a well-formed train_model checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's restricted unpickler says "global" when it meets a class or function it will not
        # call; any other refusal is of a byte stream that is no pickle torch wrote.
        if "global" in str(error).lower():
            raise UnsafeCheckpointError(
                path, "holds objects other than tensors and plain containers (dict, list, tuple, str, numbers); "
                      "dldna_fused will not unpickle them, since doing so can run code the file names. "
                      f"Refused: {_refused_global(error)}") from None
        raise UnreadableCheckpointError(path, "is corrupt or not a checkpoint written by torch.save "
                                              "(its pickle cannot be read)") from None
    except (RuntimeError, EOFError, KeyError, OSError, ValueError, IndexError, AttributeError) as error:
        # A truncated zip, an empty file, or bytes that are neither a zip nor a legacy torch file.
        detail = str(error).split(".")[0].strip() or type(error).__name__
        raise UnreadableCheckpointError(path, f"is truncated, corrupt or not a torch checkpoint ({detail})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        what = f"a dict with keys {sorted(map(str, checkpoint))}" if isinstance(checkpoint, dict) \
            else f"a {type(checkpoint).__name__}"
        raise CheckpointFormatError(path, f"is {what}, not a train_model checkpoint (which holds "
                                          f"{', '.join(_ENTRIES)})")
    state_dict = checkpoint["state_dict"]
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise CheckpointFormatError(path, "its 'state_dict' is not a dict of parameter names to tensors")
    return checkpoint


def load_weights(model: nn.Module, state_dict: dict, path) -> None:
    """``model.load_state_dict(state_dict)`` after checking that every name and shape fits, so a
    checkpoint of another architecture raises IncompatibleCheckpointError naming ``path`` and the
    first differences, and leaves ``model`` unchanged (torch's own load copies what fits before it
    raises)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{label}: {', '.join(items[:4])}" + (f" (+{len(items) - 4} more)" if len(items) > 4 else ""))
    if problems:
        raise IncompatibleCheckpointError(path, f"its weights do not fit {type(model).__name__}; "
                                                + "; ".join(problems))
    model.load_state_dict(state_dict)


def _refused_global(error: BaseException) -> str:
    """The line of torch's message that names the refused global, or the message's gist."""
    for line in str(error).splitlines():
        if "global" in line.lower() and ("unsupported" in line.lower() or "not an allowed" in line.lower()):
            return line.strip().split(". Please")[0]
    return "a global that is not a tensor or plain container"
