"""Datasets of the chapter's experiments: scikit-learn's digits (shipped with scikit-learn, the
default), and FashionMNIST and CIFAR-100 read by torchvision from a local folder.

Nothing is downloaded unless ``download=True`` is passed. Images are normalized per channel with
the training split's mean and standard deviation (fixed constants, so every split and every run
sees the same transform).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

DATASETS = ("digits", "FashionMNIST", "CIFAR100")
DEFAULT_ROOT = os.environ.get("DLDNA_DATA", "./data")

# Per-channel mean and std of each training split (images scaled to [0, 1]).
_STATS = {
    "digits": ((0.3047,), (0.3758,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"digits": 10, "FashionMNIST": 10, "CIFAR100": 100}
IMAGE_SHAPES = {"digits": (1, 8, 8), "FashionMNIST": (1, 28, 28), "CIFAR100": (3, 32, 32)}

_FILES = {
    "FashionMNIST": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "CIFAR100": ("cifar-100-python", ["train", "test", "meta"]),
}


def get_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _check_name(dataset: str) -> str:
    for name in DATASETS:
        if dataset.lower() == name.lower():
            return name
    raise ValueError(f"unknown dataset {dataset!r}; have: {', '.join(DATASETS)}")


def _normalize(images: torch.Tensor, dataset: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in _STATS[dataset])
    return (images - mean) / std


def _digits_split(train: bool) -> TensorDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    # A fixed, stratified-by-construction split: every 5th sample of each class is a test sample.
    order = np.argsort(digits.target, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    is_test = torch.from_numpy((rank % 5) == 4)
    keep = ~is_test if train else is_test
    return TensorDataset(_normalize(images[keep], "digits"), labels[keep])


def _missing_files_error(dataset: str, root: str) -> FileNotFoundError:
    folder, files = _FILES[dataset]
    where = Path(root) / folder
    return FileNotFoundError(
        f"{dataset} is not in {where}. Put the files {', '.join(files)} there (torchvision's layout; "
        f"FashionMNIST's may also be .gz), point root= (or $DLDNA_DATA) at the folder that holds "
        f"'{folder.split('/')[0]}', or download them once with get_dataset({dataset!r}, root={root!r}, "
        f"download=True) / `dldna-fused compare --dataset {dataset} --download`.")


def _torchvision_split(dataset: str, root: str, train: bool, download: bool) -> Dataset:
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*_STATS[dataset])])
    if dataset == "FashionMNIST":
        cls = torchvision.datasets.FashionMNIST
    else:
        base = torchvision.datasets.CIFAR100

        class LocalCIFAR100(base):
            """CIFAR-100 that accepts a local folder whose files exist without comparing their md5
            sums to the official ones (so a re-packed or trimmed copy loads); a download is still
            verified, by the archive's md5."""

            train_list = [[name, None] for name, _ in base.train_list]
            test_list = [[name, None] for name, _ in base.test_list]
            meta = {**base.meta, "md5": None}

        cls = LocalCIFAR100
    try:
        return cls(root, train=train, download=download, transform=transform)
    except RuntimeError as e:
        if download:
            raise
        raise _missing_files_error(dataset, root) from e


def get_dataset(dataset: str = "digits", root: str = DEFAULT_ROOT, download: bool = False):
    """``(train_dataset, test_dataset)`` of ``dataset`` ("digits", "FashionMNIST" or "CIFAR100");
    items are ``(normalized image tensor C x H x W, label)``.

    FashionMNIST and CIFAR-100 are read by torchvision from ``root`` (torchvision's folder layout)
    and downloaded only with ``download=True``; without their files this raises FileNotFoundError
    saying where they go. digits (1797 8 x 8 images, 1438 train / 359 test) ships with scikit-learn.
    """
    dataset = _check_name(dataset)
    if dataset == "digits":
        return _digits_split(True), _digits_split(False)
    return (_torchvision_split(dataset, root, True, download),
            _torchvision_split(dataset, root, False, download))


def as_tensor_dataset(ds: Dataset, dataset: str) -> TensorDataset:
    """A torchvision FashionMNIST/CIFAR100 dataset (or a Subset of one) as one normalized tensor
    dataset: the same values its transform gives item by item, converted in one vectorized pass."""
    if isinstance(ds, TensorDataset):
        return ds
    indices = None
    if isinstance(ds, Subset):
        indices, ds = torch.as_tensor(ds.indices), ds.dataset
    data = torch.as_tensor(np.asarray(ds.data))
    if data.dim() == 3:  # N x H x W (FashionMNIST)
        data = data.unsqueeze(1)
    else:  # N x H x W x C (CIFAR)
        data = data.permute(0, 3, 1, 2)
    targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    if indices is not None:
        data, targets = data[indices], targets[indices]
    return TensorDataset(_normalize(data.float() / 255.0, dataset), targets)


def get_data_loaders(dataset: str = "digits", batch_size: int = 64, root: str = DEFAULT_ROOT,
                     download: bool = False, train_size: int | None = None, test_size: int | None = None,
                     seed: int = 0, num_workers: int = 0):
    """``(train_loader, test_loader)`` for ``dataset``; the training loader shuffles (seeded).

    ``train_size``/``test_size`` keep a random subset of that many samples (for CPU runs). The
    images are held as tensors in memory, so loading costs no per-item image decoding.
    """
    name = _check_name(dataset)
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for ds, size in zip(get_dataset(name, root, download), (train_size, test_size)):
        ds = as_tensor_dataset(ds, name)
        if size is not None and size < len(ds):
            ds = Subset(ds, torch.randperm(len(ds), generator=generator)[:size].tolist())
        splits.append(ds)
    train, test = splits
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers),
            DataLoader(test, batch_size=max(batch_size, 256), shuffle=False, num_workers=num_workers))


def num_labels(loader: DataLoader) -> int:
    """1 + the largest label of ``loader``'s dataset: read from the tensors of a (Subset of a)
    TensorDataset, else by one pass over the loader."""
    ds = loader.dataset
    while isinstance(ds, Subset):
        ds = ds.dataset
    if isinstance(ds, TensorDataset):
        return int(ds.tensors[1].max()) + 1
    return int(max(int(y.max()) for _, y in loader)) + 1


def reseed(loader: DataLoader, seed: int) -> None:
    """Restarts ``loader``'s shuffling from ``seed`` (its own generator, or torch's global one), so
    that runs compared with each other see the batches in the same order."""
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)
