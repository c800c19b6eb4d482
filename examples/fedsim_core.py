"""The simulator's core, shared by every method's round loop: the configuration, the data and
model set-up, local SGD, evaluation and the run summary.

The server-driven methods run on it in ``fedsim.py``; the methods with their own round loop
(``baselines/prunefl.py``, ``baselines/dapperfl.py``) import it as well, so no module hands another
module around.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import fedsim_batched
import torch
import torch.nn.functional as F
from fedsim_data import Dataset
from torch import Tensor

from cahfp_ops.fl import zoo

RANKS = {0: (0.25, 0.0), 1: (0.25, 0.5), 2: (0.5, 0.75), 3: (0.75, 0.9)}


@dataclass
class Config:
    data: str = "digits"
    data_dir: str | None = None
    model: str = "small_cnn"
    clients: int = 10
    alpha: float = 1.0
    rank: int = 2
    rounds: int = 30
    local_epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 128
    warmup_rounds: int = 2
    seed: int = 0
    device: str = "cpu"
    batched: str = "auto"  # train clients of equal compact shapes together: auto | on | off (fedsim_batched)
    residual: str = "tie"  # channel plans: residual streams pruned as groups ("tie") or kept whole ("internal")


def client_ratios(rank: int, n: int) -> list[float]:
    """First half of the clients at the rank's first ratio, the rest at its second."""
    low, high = RANKS[rank]
    return [low if k < (n + 1) // 2 else high for k in range(n)]


def mask_logits(logits: Tensor, mask: Tensor | None) -> Tensor:
    """``logits`` ``(..., C)`` with the classes where ``mask`` ``(C,)`` is False set to 0
    (``mask`` None: unchanged). Works under ``vmap`` with a per-client mask."""
    if mask is None:
        return logits
    return torch.where(mask.to(logits.device), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))


def batch_size_for(n_samples: int, cap: int) -> int:
    """Batch ``cap`` (128), scaled down so that a local epoch has at least 8 steps."""
    return max(1, min(cap, math.ceil(n_samples / 8)))


def make_model(name: str, data: Dataset) -> torch.nn.Module:
    c, h, _ = data.image_shape
    if name in ("small_cnn", "mlp"):
        return zoo.ZOO[name](image_size=h, in_channels=c, num_classes=data.num_classes)
    return zoo.ZOO[name](num_classes=data.num_classes, in_channels=c)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(y)


def static_bn_statistics(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.nn.Module:
    """HeteroFL's static batch normalisation: replace ``model``'s BatchNorm running statistics
    (in place) by the cumulative mean and variance of one pass over ``x`` (the clients' training
    data) in training mode; no parameter changes. Returns ``model`` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            if len(x) - i >= 2:
                model(x[i : i + batch])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def local_sgd(cfg: Config, model: torch.nn.Module, idx: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor,
              generator: torch.Generator, work: float = 1.0, anchors=(), prox_mu: float = 0.0,
              after_step: Callable[[], None] | None = None,
              extra_loss: Callable[[], torch.Tensor] | None = None,
              label_mask: torch.Tensor | None = None) -> int:  # fmt: skip
    """Local training shared by every method: ``cfg.local_epochs`` epochs of momentum SGD over the
    client's samples ``idx`` (batches of :func:`batch_size_for`, a fresh order per epoch from
    ``generator``: the steps of :func:`fedsim_batched.batch_plan`), stopping after ``work`` of
    the steps (at least one); ``prox_mu / 2 * ||p - anchor||^2`` over ``anchors`` (FedProx);
    ``extra_loss()`` added after each forward (a regulariser reading hooks); ``after_step()``
    after each step (masks); ``label_mask`` ``(C,)`` bool: the logits of the classes it marks
    False are set to 0 (HeteroFL's label split).
    Returns the steps taken."""
    dev = x_train.device
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    bs = batch_size_for(len(idx), cfg.batch_size)
    done = 0
    for b in fedsim_batched.batch_plan(idx, bs, cfg.local_epochs, work, generator):
        b = b.to(dev)
        loss = F.cross_entropy(mask_logits(model(x_train[b]), label_mask), y_train[b])
        if anchors:
            loss = loss + prox_mu / 2 * sum((p - a).pow(2).sum() for p, a in anchors)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        done += 1
    return done


def setup(cfg: Config, data: Dataset):
    """What every method's round loop starts from: (device, the seeded initial model, client ->
    its rank's pruning ratio, (x, y) train and test tensors on the device)."""
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, data).to(dev)
    capacity = dict(enumerate(client_ratios(cfg.rank, cfg.clients)))
    train = (data.x_train.to(dev), data.y_train.to(dev))
    test = (data.x_test.to(dev), data.y_test.to(dev))
    return dev, model, capacity, train, test


def mean_local_steps(cfg: Config, parts: list[torch.Tensor]) -> int:
    """The clients' mean SGD steps per round (at least 1): the scale of a pseudo-gradient
    ``(w_t - w_{t+1}) / (lr * steps)``."""
    sizes = [len(p) for p in parts]
    return max(1, round(sum(math.ceil(n / batch_size_for(n, cfg.batch_size)) for n in sizes) / len(sizes)
                        * cfg.local_epochs))  # fmt: skip


def round_iter(cfg: Config, progress: bool, label: str):
    """``range(cfg.rounds)``, with a tqdm bar named ``label`` when ``progress``."""
    if not progress:
        return range(cfg.rounds)
    from tqdm import tqdm

    return tqdm(range(cfg.rounds), desc=label, leave=False)


def summary(method: str, mode: str, cfg: Config, history: list[float], times: list[float], full_params: int,
            down: float, up: float, mflops: float, full_mflops: float,
            rejected: tuple[int, int] = (0, 0), server_times: list[float] | None = None) -> dict:  # fmt: skip
    """A run's summary (what every method's loop returns): the accuracy per round, the
    accounting per client (``down`` / ``up``: values per client summed over rounds), timing
    (``server_times``: the server's share of each round, assign + build + aggregate; the rest
    of a round is client training and evaluation)."""
    server_s = None if not server_times else sum(server_times) / len(server_times)
    return {
        "method": method,
        "mode": mode,
        "seed": cfg.seed,
        "accuracy": history,
        "final_accuracy": history[-1],
        "best_accuracy": max(history),
        "full_params": full_params,
        "params_down_per_client": down / cfg.rounds,
        "params_up_per_client": up / cfg.rounds,
        "training_mflops_per_client": mflops,
        "full_training_mflops": full_mflops,
        "seconds_per_round": sum(times) / len(times),
        "server_seconds_per_round": server_s,
        "client_seconds_per_round": None if server_s is None else sum(times) / len(times) - server_s,
        "rejected": rejected[0],
        "rejected_total": rejected[1],
    }
