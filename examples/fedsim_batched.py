"""Local training of several clients at once: clients whose compact models have equal shapes
train in lockstep, one forward and backward per step for the whole group (``torch.func.vmap``
over ``functional_call``, then one backward of the summed per-client losses).

It is the same training as :func:`fedsim.local_sgd`, client by client: each client draws its
batch order from its own generator exactly as ``local_sgd`` does, runs the same number of
steps with the same batch boundaries, momentum SGD with the same update, the FedProx term
against its own anchors. To fit clients of different data sizes into one call, a step's
batches are padded to the group's longest and masked: padded samples count neither in the
loss (a masked mean) nor in BatchNorm's batch statistics (BatchNorm layers are swapped for a
masked equivalent); a client whose steps are done sits out (its parameters and momentum are
kept by ``torch.where``). Results equal the client-by-client ones up to float rounding
(batched kernels sum in another order) and dropout's random draws; tests compare them.

HeteroFL's label split is covered (per-client masks of the logits). Not covered (those methods
train client by client): per-step hooks (``after_step``, PruneFL's
masks) and extra losses (DapperFL's regulariser).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap


class MaskedBatchNorm(nn.Module):
    """BatchNorm (1-D or 2-D, affine, tracking running statistics, training mode) whose batch
    statistics skip the samples where ``self.mask`` (shape (B,), 1.0 = real, 0.0 = padding) is
    zero. The new running statistics are left in ``self.new_stats`` (read after the call)
    instead of being written in place, so the module runs under ``vmap`` and ``grad``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if not (bn.affine and bn.track_running_stats) or bn.momentum is None:
            raise ValueError("MaskedBatchNorm needs an affine BatchNorm with running statistics and a momentum")
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.mask: torch.Tensor | None = None
        self.new_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        shape = (-1,) + (1,) * (x.dim() - 1)
        m = self.mask.reshape(shape).to(x.dtype)
        dims = [0] + list(range(2, x.dim()))
        per_sample = math.prod(x.shape[2:]) if x.dim() > 2 else 1
        n = (self.mask.sum() * per_sample).clamp(min=1.0)
        mean = (x * m).sum(dims) / n
        cshape = (1, -1) + (1,) * (x.dim() - 2)
        centred = x - mean.reshape(cshape)
        var = (centred.pow(2) * m).sum(dims) / n
        y = centred * torch.rsqrt(var.reshape(cshape) + self.eps)
        y = y * self.weight.reshape(cshape) + self.bias.reshape(cshape)
        unbiased = var.detach() * n / (n - 1).clamp(min=1.0)
        mom = self.momentum
        new_mean = (1 - mom) * self.running_mean + mom * mean.detach()
        self.new_stats = (new_mean, (1 - mom) * self.running_var + mom * unbiased)
        return y


def _swap_batchnorms(model: nn.Module) -> list[tuple[str, MaskedBatchNorm]]:
    """Replace every BatchNorm1d/2d of ``model`` (in place) by a :class:`MaskedBatchNorm` sharing
    its parameters and buffers; returns (module name, masked module) pairs."""
    swapped = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                masked = MaskedBatchNorm(child)
                setattr(mod, child_name, masked)
                swapped.append((f"{name}.{child_name}" if name else child_name, masked))
    return swapped


def batch_plan(idx: torch.Tensor, batch: int, epochs: int, work: float,
               generator: torch.Generator) -> list[torch.Tensor]:  # fmt: skip
    """The sample indices of each local step of one client (``fedsim.local_sgd`` trains on this
    plan too): one permutation of ``idx`` per epoch from ``generator``, cut into batches of
    ``batch``; batches shorter than 2 are skipped, and steps past ``work`` of the budget
    (``ceil(len(idx) / batch) * epochs``, at least one step)."""
    budget = math.ceil(len(idx) / batch) * epochs
    if work < 1.0:
        budget = max(1, round(budget * work))
    steps: list[torch.Tensor] = []
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=generator)]
        for i in range(0, len(order), batch):
            b = order[i : i + batch]
            if len(b) < 2 or len(steps) >= budget:
                continue
            steps.append(b)
    return steps


# Measured (small CNN on digits, one CPU thread, 130 samples a client, one local epoch): G
# clients alone vs together took 22.6 / 33.6 ms (G = 2), 44.5 / 41.1 (4), 87.5 / 66.2 (8),
# 109.1 / 72.8 (10): the vmapped step saves per-call overhead, not arithmetic, so it pays on
# the CPU only from about 5 clients a group. On a GPU every saved launch counts.
CPU_SMALLEST_GROUP = 6


def smallest_group(policy: str, device: torch.device) -> int:
    """The fewest clients a group needs to train together: ``"on"`` 2, ``"off"`` never,
    ``"auto"`` :data:`CPU_SMALLEST_GROUP` on the CPU and 2 elsewhere."""
    if policy not in ("auto", "on", "off"):
        raise ValueError(f"batched must be 'auto', 'on' or 'off', got {policy!r}")
    if policy == "off":
        return 1 << 62
    return CPU_SMALLEST_GROUP if policy == "auto" and device.type == "cpu" else 2


def shape_key(model: nn.Module) -> tuple:
    """Clients whose models have equal keys, shapes and dtypes can train in one group."""
    return tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())


def train_group(models: Sequence[nn.Module], plans: Sequence[list[torch.Tensor]], x: torch.Tensor, y: torch.Tensor,
                lr: float, momentum: float, prox_mu: float = 0.0,
                label_masks: torch.Tensor | None = None) -> list[int]:  # fmt: skip
    """Train ``models`` (equal shapes; updated in place) on their step plans (:func:`batch_plan`)
    in lockstep: momentum SGD (``torch.optim.SGD`` semantics, no dampening or weight decay),
    plus ``prox_mu / 2 * ||p - p_0||^2`` against each model's starting parameters when
    ``prox_mu > 0``; ``label_masks`` ``(G, C)`` bool: model ``g``'s logits of the classes
    marked False are set to 0 (HeteroFL's label split). Returns each model's steps taken."""
    G = len(models)
    if G == 0:
        return []
    dev = x.device
    template = copy.deepcopy(models[0]).train()
    bns = _swap_batchnorms(template)
    pnames = [n for n, _ in template.named_parameters()]
    bnames = [n for n, _ in template.named_buffers()]
    states = [m.state_dict() for m in models]
    params = {n: torch.stack([s[n] for s in states]).detach() for n in pnames}
    buffers = {n: torch.stack([s[n] for s in states]) for n in bnames}
    anchors = {n: p.clone() for n, p in params.items()} if prox_mu > 0 else None
    moment = {n: torch.zeros_like(p) for n, p in params.items()}
    stat_names = [(f"{name}.running_mean", f"{name}.running_var") for name, _ in bns]

    def loss_fn(p, b, anchor, xb, yb, mask, classes):
        for _, bn in bns:
            bn.mask = mask
        out = functional_call(template, {**p, **b}, (xb,))
        if classes is not None:
            out = torch.where(classes, out, torch.zeros((), dtype=out.dtype, device=out.device))
        n = mask.sum().clamp(min=1.0)
        loss = (F.cross_entropy(out, yb, reduction="none") * mask).sum() / n
        if anchor is not None:
            loss = loss + prox_mu / 2 * sum((p[k] - anchor[k]).pow(2).sum() for k in p)
        stats = tuple(t for _, bn in bns for t in bn.new_stats)
        return loss, stats

    # One vmapped forward; one backward of the summed losses gives every client its own
    # gradient (the clients share no parameters).
    classes = None if label_masks is None else label_masks.to(dev)
    forward = vmap(loss_fn, in_dims=(0, 0, 0 if anchors is not None else None, 0, 0, 0, None if classes is None else 0),
                   randomness="different")  # fmt: skip
    counts = [len(p) for p in plans]
    n_steps = max(counts)
    width = max((len(b) for plan in plans for b in plan), default=0)
    for t in range(n_steps):
        idx = torch.zeros(G, width, dtype=torch.long)
        mask = torch.zeros(G, width)
        for g, plan in enumerate(plans):
            if t < len(plan):
                idx[g, : len(plan[t])] = plan[t]
                mask[g, : len(plan[t])] = 1.0
        idx, mask = idx.to(dev), mask.to(dev, x.dtype)
        alive = [t < c for c in counts]
        everyone = all(alive)
        active = torch.tensor(alive, device=dev)
        leaves = {n: p.requires_grad_(True) for n, p in params.items()}
        losses, stats = forward(leaves, buffers, anchors, x[idx], y[idx], mask, classes)
        grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in pnames])
        with torch.no_grad():
            for n, gr in zip(pnames, grads):
                p = params[n].detach()
                m_new = moment[n].mul(momentum).add_(gr) if t else gr
                if everyone:
                    moment[n], params[n] = m_new, p.sub(m_new, alpha=lr)
                else:
                    keep = active.reshape((-1,) + (1,) * (p.dim() - 1))
                    moment[n] = torch.where(keep, m_new, moment[n])
                    params[n] = torch.where(keep, p.sub(moment[n], alpha=lr), p)
            for i, (mean_name, var_name) in enumerate(stat_names):
                keep = active.reshape(-1, 1)
                buffers[mean_name] = torch.where(keep, stats[2 * i], buffers[mean_name])
                buffers[var_name] = torch.where(keep, stats[2 * i + 1], buffers[var_name])
            for name, _ in bns:
                key = f"{name}.num_batches_tracked"
                buffers[key] = buffers[key] + active.to(buffers[key].dtype)
    for g, m in enumerate(models):
        m.load_state_dict({**{n: params[n][g] for n in pnames}, **{n: buffers[n][g] for n in bnames}})
    return counts
