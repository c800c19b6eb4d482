"""Whole-model aggregation of compact client state_dicts: batch and streaming.

:func:`aggregate_state` aggregates K compact client state_dicts in one
``reconstruct_aggregate_many`` call. :class:`StreamingAggregator` takes clients one at a time
with O(model) memory whatever K, and partial aggregators merge (for sharded aggregation).
Floating entries (parameters, BatchNorm running stats) are aggregated alike; integer entries
(``num_batches_tracked``) take the largest value any client with a positive weight reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .ops import MODES, reconstruct_aggregate_many

KeepMap = Mapping[str, Tensor | None]


def aggregate_state(
    global_state: Mapping[str, Tensor],
    client_states: Sequence[Mapping[str, Tensor]],
    rows: Mapping[str, Sequence[Tensor | None]],
    cols: Mapping[str, Sequence[Tensor | None]],
    weights: Sequence[float] | None = None,
    mode: str = "reconstruct",
) -> dict[str, Tensor]:
    """New global state_dict from K compact client state_dicts.

    ``rows`` / ``cols``: tensor name -> K keep sets (from ``ChannelPlan.tensor_keep_sets``).
    ``weights``: K non-negative client weights (e.g. sample counts; default equal).
    """
    floats = {k: v for k, v in global_state.items() if v.is_floating_point()}
    clients = [{k: c[k] for k in floats} for c in client_states]
    new = reconstruct_aggregate_many(floats, clients, rows, cols, weights, mode=mode)
    counted = [c for k, c in enumerate(client_states) if weights is None or float(weights[k]) > 0]
    out = {}
    for name, v in global_state.items():
        if name in new:
            out[name] = new[name]
        else:  # integer entries: the largest value any client with a positive weight reports
            out[name] = torch.stack([torch.as_tensor(c[name]).to(v.dtype) for c in counted] + [v]).max()
    return out


class StreamingAggregator:
    """Aggregate client updates as they arrive, in O(model) memory.

    ``add(update, rows, cols, weight)`` folds in one client: its compact state_dict and, per
    tensor name, its kept rows / cols (missing or None: all). ``result()`` returns the new
    global state_dict: in ``reconstruct`` mode ``w + sum_k p_k E_k(c_k - w)``, in ``overlap``
    mode the weighted mean over the clients keeping each element, exactly as the batch ops
    define them. Sums are float64, so the result matches the batch path within float32
    rounding and is deterministic for a fixed arrival order. ``merge(other)`` adds another
    aggregator's partial sums (weighted delta sums and weight sums); merged partials give the
    single-aggregator result up to float64 rounding.
    """

    def __init__(self, global_state: Mapping[str, Tensor], mode: str = "reconstruct"):
        if mode not in MODES:
            raise ValueError(f"StreamingAggregator: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.global_state = dict(global_state)
        self.sums: dict[str, Tensor] = {}
        self.cover: dict[str, Tensor] = {}  # per (row, col) weight sums
        self.ints: dict[str, Tensor] = {}
        self.weight_sum = 0.0
        self.count = 0
        for name, w in self.global_state.items():
            if w.is_floating_point():
                self.sums[name] = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
                self.cover[name] = torch.zeros(w.shape[:2], dtype=torch.float64, device=w.device)

    def add(
        self,
        update: Mapping[str, Tensor],
        rows: KeepMap | None = None,
        cols: KeepMap | None = None,
        weight: float = 1.0,
    ) -> None:
        """Fold in one client's compact state_dict with weight ``weight`` (>= 0)."""
        if not weight >= 0:
            raise ValueError(f"StreamingAggregator.add: weight must be >= 0, got {weight}")
        rows, cols = rows or {}, cols or {}
        self.count += 1
        if weight == 0:
            return
        self.weight_sum += float(weight)
        for name, w in self.global_state.items():
            c = update[name]
            if not w.is_floating_point():
                self.ints[name] = torch.maximum(self.ints.get(name, c), c)
                continue
            r = rows.get(name)
            r = torch.arange(w.shape[0], device=w.device) if r is None else r.to(w.device)
            if w.dim() == 1:
                index: tuple = (r,)
            else:
                k = cols.get(name)
                k = torch.arange(w.shape[1], device=w.device) if k is None else k.to(w.device)
                index = (r.unsqueeze(1), k.unsqueeze(0))
            value = c.to(torch.float64)
            if self.mode == "reconstruct":
                value = value - w[index].to(torch.float64)
            self.sums[name].index_put_(index, weight * value, accumulate=True)
            ones = torch.full(self.cover[name][index].shape, float(weight), dtype=torch.float64, device=w.device)
            self.cover[name].index_put_(index, ones, accumulate=True)

    def merge(self, other: StreamingAggregator) -> None:
        """Add another aggregator's partial sums (same global state and mode)."""
        if other.mode != self.mode or other.global_state.keys() != self.global_state.keys():
            raise ValueError("StreamingAggregator.merge: the aggregators differ in mode or tensors")
        for name in self.sums:
            self.sums[name] += other.sums[name]
            self.cover[name] += other.cover[name]
        for name, v in other.ints.items():
            self.ints[name] = torch.maximum(self.ints.get(name, v), v)
        self.weight_sum += other.weight_sum
        self.count += other.count

    def result(self) -> dict[str, Tensor]:
        """The new global state_dict (the global model itself when no weight arrived)."""
        out = {}
        for name, w in self.global_state.items():
            if not w.is_floating_point():
                out[name] = torch.maximum(self.ints[name], w) if name in self.ints else w.clone()
                continue
            cover = self.cover[name]
            covered = (cover > 0).reshape(*cover.shape, *([1] * (w.dim() - cover.dim())))
            if self.mode == "reconstruct":
                value = w.to(torch.float64) + self.sums[name] / max(self.weight_sum, 1e-300)
            else:
                den = cover.clamp(min=1e-300).reshape(covered.shape)
                value = self.sums[name] / den
            out[name] = torch.where(covered, value.to(w.dtype), w)
        return out
