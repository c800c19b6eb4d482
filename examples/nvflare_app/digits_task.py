"""The digits task shared by the NVFlare job's sites and its server: the model, each site's
Dirichlet(1) share of scikit-learn's digits, one local epoch of SGD, and the server-side
evaluation on the test split."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from cahfp_ops.fl.data import dirichlet_partition, load_digits

MODEL = "cahfp_ops.fl.zoo.small_cnn"  # the global model's factory (8x8 grey images, 10 classes)
INPUT_SHAPE = [2, 1, 8, 8]
RATIOS = (0.5, 0.75)  # heterogeneity rank 2: the first half of the sites 50 %, the rest 75 %


def site_ratios(num_sites: int) -> dict[str, float]:
    """Site name (NVFlare's simulator calls them site-1 ... site-N) -> pruning ratio."""
    return {f"site-{i + 1}": RATIOS[0] if i < (num_sites + 1) // 2 else RATIOS[1] for i in range(num_sites)}


@functools.lru_cache(maxsize=1)
def _data(num_sites: int):
    data = load_digits()
    return data, dirichlet_partition(data.y_train, num_sites, 1.0, seed=0)


def site_index(site: str) -> int:
    """``site-i`` -> i - 1."""
    return int(site.rsplit("-", 1)[1]) - 1


def site_data(site: str, num_sites: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training share of ``site`` (``site-i``: the i-th of ``num_sites`` partitions)."""
    data, parts = _data(num_sites)
    idx = parts[site_index(site)]
    return data.x_train[idx], data.y_train[idx]


def train_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, lr: float = 0.1) -> float:
    """One epoch of SGD (momentum 0.9, 8 batches); the batch order and the dropout draws come
    from ``seed``, so a run is reproducible. Returns the mean loss."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    bs = max(1, math.ceil(len(y) / 8))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    total = 0.0
    for i in range(0, len(y), bs):
        b = order[i : i + bs]
        if len(b) < 2:
            continue
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
    return total / len(y)


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    """Accuracy of the full global model on the digits test split (the server's evaluator)."""
    data = load_digits()
    with torch.no_grad():
        return {"accuracy": float((model(data.x_test).argmax(1) == data.y_test).float().mean())}
