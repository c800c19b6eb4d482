"""Federated data for simulations: scikit-learn's digits and the Dirichlet label partition.

The data every example runs on by default (nothing to download: the digits ship inside
scikit-learn, ``pip install "cahfp-ops[examples]"``), usable from the simulator, the Flower
app and user scripts alike:

* :func:`load_digits`: 1,797 8x8 grey images, a stratified train / test split, normalised
  with the training set's statistics;
* :func:`dirichlet_partition`: each client's share of every class ~ Dirichlet(alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Dataset:
    """A labelled image data set, split into train and test."""

    name: str
    x_train: Tensor  # (N, C, H, W) float32, normalised
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def normalise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets standardised per channel with the training set's mean and std."""
    dims = (0, 2, 3)
    mean, std = x_train.mean(dims, keepdim=True), x_train.std(dims, keepdim=True).clamp(min=1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits: 1,797 8x8 grey images ``(N, 1, 8, 8)``, a stratified train / test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    xtr, xte = normalise(x[~test], x[test])
    return Dataset("digits", xtr, y[~test], xte, y[test], 10)


def dirichlet_partition(labels: Tensor, n_clients: int, alpha: float, seed: int = 0, min_size: int = 2) -> list[Tensor]:
    """Split sample indices among clients with per-class proportions ~ Dirichlet(alpha).

    Small alpha gives each client few classes (non-IID); large alpha approaches an IID split.
    Resamples until every client has at least ``min_size`` samples. Returns one sorted int64
    index tensor per client.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.int64) for p in parts]
    raise ValueError(f"could not give each of {n_clients} clients {min_size} samples with alpha={alpha}")
