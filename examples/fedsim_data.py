"""Data for the federated simulator: datasets from local files or packages, and the
Dirichlet label partition (digits and the partition come from :mod:`cahfp_ops.fl.data`).

* ``digits``: scikit-learn's 8x8 digits (ships inside scikit-learn, no download).
* ``fmnist``: FashionMNIST from its IDX files (``train-images-idx3-ubyte[.gz]`` ...) in ``--data-dir``.
* ``cifar10`` / ``cifar100``: the CIFAR python pickles (``cifar-10-batches-py/``,
  ``cifar-100-python/``) in ``--data-dir``.
* ``synthetic``: random class-dependent images, for tests.
* ``synthetic_cifar``: the same, CIFAR-shaped (3 x 32 x 32, 10 classes; 5,000 training
  images unless ``samples`` says otherwise, a fifth as many test images), for timing runs.

Nothing is downloaded: a missing file raises FileNotFoundError saying what to put where.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from cahfp_ops.fl.data import Dataset, dirichlet_partition, load_digits, normalise

__all__ = ["Dataset", "dirichlet_partition", "load", "load_cifar", "load_digits", "load_fashion_mnist", "synthetic"]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00":
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(data_dir: Path, names: list[str], what: str) -> Path:
    for sub in ("", "FashionMNIST/raw", "fashion-mnist", "raw"):
        for name in names:
            for suffix in ("", ".gz"):
                p = data_dir / sub / (name + suffix)
                if p.is_file():
                    return p
    raise FileNotFoundError(
        f"{what}: none of {names} (optionally .gz) found under {data_dir}; put the dataset's files there "
        "(this simulator never downloads)"
    )


def load_fashion_mnist(data_dir: str | Path) -> Dataset:
    """FashionMNIST from its IDX files (28x28 grey, 60,000 train / 10,000 test)."""
    root = Path(data_dir)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        xi = _read_idx(_find(root, [f"{prefix}-images-idx3-ubyte"], "FashionMNIST"))
        yi = _read_idx(_find(root, [f"{prefix}-labels-idx1-ubyte"], "FashionMNIST"))
        parts[split] = (torch.tensor(xi, dtype=torch.float32).unsqueeze(1) / 255.0, torch.tensor(yi, dtype=torch.int64))
    xtr, xte = normalise(parts["train"][0], parts["test"][0])
    return Dataset("fmnist", xtr, parts["train"][1], xte, parts["test"][1], 10)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(data_dir: str | Path, classes: int = 10) -> Dataset:
    """CIFAR-10 / CIFAR-100 from the python pickles (32x32 RGB, 50,000 train / 10,000 test)."""
    root = Path(data_dir)
    if classes == 10:
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [base / "test_batch"], b"labels"
    else:
        base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        train_files, test_files, key = [base / "train"], [base / "test"], b"fine_labels"
    missing = [str(p) for p in train_files + test_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-{classes}: missing {missing[0]} (and {len(missing) - 1} more); put the python-version "
            "pickles there (this simulator never downloads)"
        )

    def read(files):
        xs, ys = [], []
        for p in files:
            d = _unpickle(p)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return torch.tensor(np.concatenate(xs), dtype=torch.float32) / 255.0, torch.tensor(np.concatenate(ys))

    (xtr, ytr), (xte, yte) = read(train_files), read(test_files)
    xtr, xte = normalise(xtr, xte)
    return Dataset(f"cifar{classes}", xtr, ytr, xte, yte, classes)


def synthetic(n_train: int = 400, n_test: int = 100, shape=(1, 8, 8), classes: int = 10, seed: int = 0) -> Dataset:
    """Random images whose mean depends on the class (learnable, for tests)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, *shape, generator=g)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return protos[y] + 0.8 * torch.randn(n, *shape, generator=g), y

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, classes)


def load(name: str, data_dir: str | Path | None = None, seed: int = 0, samples: int | None = None) -> Dataset:
    """``samples``: training images of the synthetic datasets (default 400 / 5,000)."""
    if name == "digits":
        return load_digits(seed)
    if name == "synthetic":
        return synthetic(samples or 400, max(1, (samples or 400) // 4), seed=seed)
    if name == "synthetic_cifar":
        n = samples or 5000
        data = synthetic(n, max(1, n // 5), shape=(3, 32, 32), seed=seed)
        return Dataset("synthetic_cifar", data.x_train, data.y_train, data.x_test, data.y_test, data.num_classes)
    if data_dir is None:
        raise FileNotFoundError(f"dataset {name!r} is read from local files: pass --data-dir")
    if name == "fmnist":
        return load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_dir, int(name[5:]))
    raise ValueError(f"unknown dataset {name!r}")
