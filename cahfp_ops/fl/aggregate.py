"""Whole-model aggregation of compact client state_dicts: batch and streaming.

:func:`aggregate_state` aggregates K compact client state_dicts in one
``reconstruct_aggregate_many`` call. :class:`StreamingAggregator` takes clients one at a time
with O(model) memory whatever K; its partial sums are a value, :class:`AggregatePartials`,
that merges (several aggregators) and flattens (one all-reduce over processes).
Floating entries (parameters, BatchNorm running stats) are aggregated alike; integer entries
(``num_batches_tracked``) follow :func:`largest_reported`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cahfp_ops import MODES, reconstruct_aggregate_many

KeepMap = Mapping[str, Tensor | None]


def largest_reported(current: Tensor, reported: Tensor) -> Tensor:
    """The rule for integer entries (``num_batches_tracked``): the new global value is the
    largest of the global value and the values reported by clients with a positive weight."""
    return torch.maximum(current, torch.as_tensor(reported).to(device=current.device, dtype=current.dtype))


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
            continue
        if counted:  # one stack per entry: this runs for every integer entry of every round
            out[name] = largest_reported(
                v, torch.stack([torch.as_tensor(c[name]).to(v.dtype) for c in counted]).amax(0)
            )
        else:
            out[name] = v.clone()
    return out


@dataclass
class AggregatePartials:
    """The partial sums of a streaming aggregation, as a value.

    Attributes:
        sums: tensor name -> float64 tensor of the global's shape: weighted sums of
            ``c_k - w`` (reconstruct) or of ``c_k`` (overlap) at each client's kept entries.
        cover: tensor name -> float64 ``(R, Cin)`` (``(R,)`` for 1-D) sums of the weights of
            the clients keeping each entry.
        ints: integer entry name -> its value so far under :func:`largest_reported`.
        weight_sum: the sum of the client weights (float).
        count: clients folded in, weight 0 included.
    """

    sums: dict[str, Tensor]
    cover: dict[str, Tensor]
    ints: dict[str, Tensor]
    weight_sum: float = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, global_state: Mapping[str, Tensor]) -> AggregatePartials:
        """Empty partial sums for ``global_state`` (integer entries start at the global value)."""
        sums, cover, ints = {}, {}, {}
        for name, w in global_state.items():
            if w.is_floating_point():
                sums[name] = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
                cover[name] = torch.zeros(w.shape[:2], dtype=torch.float64, device=w.device)
            else:
                ints[name] = w.clone()
        return cls(sums, cover, ints)

    def merge(self, other: AggregatePartials) -> None:
        """Add ``other``'s partial sums to these, in place (same tensors)."""
        if other.sums.keys() != self.sums.keys() or other.ints.keys() != self.ints.keys():
            raise ValueError("AggregatePartials.merge: the partial sums hold different tensors")
        for name in self.sums:
            self.sums[name] += other.sums[name]
            self.cover[name] += other.cover[name]
        for name in self.ints:
            self.ints[name] = largest_reported(self.ints[name], other.ints[name])
        self.weight_sum += other.weight_sum
        self.count += other.count

    def flatten(self) -> tuple[Tensor, Tensor]:
        """``(floats, ints)``: one float64 vector holding every sum, every cover, the weight
        sum and the count (merged by addition), and one int64 vector holding the integer
        entries (merged by maximum, :func:`largest_reported`), both in sorted name order."""
        names = sorted(self.sums)
        device = next(iter(self.sums.values())).device if names else torch.device("cpu")
        floats = torch.cat(
            [self.sums[n].reshape(-1) for n in names]
            + [self.cover[n].reshape(-1) for n in names]
            + [torch.tensor([self.weight_sum, float(self.count)], dtype=torch.float64, device=device)]
        )
        int_names = sorted(self.ints)
        values = [self.ints[n].reshape(()).to(device=device, dtype=torch.int64) for n in int_names]
        ints = torch.stack(values) if values else torch.zeros(0, dtype=torch.int64, device=device)
        return floats, ints

    def unflatten(self, floats: Tensor, ints: Tensor) -> AggregatePartials:
        """New partial sums shaped like these, read from vectors laid out as :meth:`flatten` writes them."""
        offset = 0
        out = {}
        for store in ("sums", "cover"):
            part = {}
            for n in sorted(self.sums):
                t = getattr(self, store)[n]
                part[n] = floats[offset : offset + t.numel()].view_as(t).clone()
                offset += t.numel()
            out[store] = part
        int_values = {
            n: v.to(device=self.ints[n].device, dtype=self.ints[n].dtype).reshape(self.ints[n].shape)
            for n, v in zip(sorted(self.ints), ints)
        }
        return AggregatePartials(
            out["sums"], out["cover"], int_values, float(floats[offset]), int(round(float(floats[offset + 1])))
        )


class StreamingAggregator:
    """Aggregate client updates as they arrive, in O(model) memory.

    ``add(update, rows, cols, weight)`` folds in one client: its compact state_dict and, per
    tensor name, its kept rows / cols (missing or None: all). ``result()`` returns the new
    global state_dict: in ``reconstruct`` mode ``w + sum_k p_k E_k(c_k - w)``, in ``overlap``
    mode the weighted mean over the clients keeping each element, exactly as the batch ops
    define them. Sums are float64, so the result matches the batch path within float32
    rounding and is deterministic for a fixed arrival order. ``partials()`` gives the partial
    sums (:class:`AggregatePartials`); ``merge(other)`` adds another aggregator's; merged
    partials give the single-aggregator result up to float64 rounding.
    """

    def __init__(self, global_state: Mapping[str, Tensor], mode: str = "reconstruct"):
        if mode not in MODES:
            raise ValueError(f"StreamingAggregator: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.global_state = dict(global_state)
        self._partials = AggregatePartials.zeros(self.global_state)

    @property
    def count(self) -> int:
        """Clients folded in so far (weight 0 included)."""
        return self._partials.count

    @property
    def weight_sum(self) -> float:
        return self._partials.weight_sum

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
        p = self._partials
        p.count += 1
        if weight == 0:
            return
        p.weight_sum += float(weight)
        for name, w in self.global_state.items():
            c = update[name]
            if not w.is_floating_point():
                p.ints[name] = largest_reported(p.ints[name], c)
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
            p.sums[name].index_put_(index, weight * value, accumulate=True)
            ones = torch.full(p.cover[name][index].shape, float(weight), dtype=torch.float64, device=w.device)
            p.cover[name].index_put_(index, ones, accumulate=True)

    def partials(self) -> AggregatePartials:
        """The partial sums so far (the live value: :meth:`AggregatePartials.merge` on it changes this aggregator)."""
        return self._partials

    def load_partials(self, partials: AggregatePartials) -> None:
        """Replace the partial sums (e.g. with all processes' sums after an all-reduce)."""
        if partials.sums.keys() != self._partials.sums.keys() or partials.ints.keys() != self._partials.ints.keys():
            raise ValueError("StreamingAggregator.load_partials: the partial sums hold different tensors")
        self._partials = partials

    def merge(self, other: StreamingAggregator) -> None:
        """Add another aggregator's partial sums (same global state and mode)."""
        if other.mode != self.mode or other.global_state.keys() != self.global_state.keys():
            raise ValueError("StreamingAggregator.merge: the aggregators differ in mode or tensors")
        self._partials.merge(other.partials())

    def result(self) -> dict[str, Tensor]:
        """The new global state_dict (the global model itself when no weight arrived)."""
        p = self._partials
        out = {}
        for name, w in self.global_state.items():
            if not w.is_floating_point():
                out[name] = p.ints[name].clone()
                continue
            cover = p.cover[name]
            covered = (cover > 0).reshape(*cover.shape, *([1] * (w.dim() - cover.dim())))
            if self.mode == "reconstruct":
                value = w.to(torch.float64) + p.sums[name] / max(p.weight_sum, 1e-300)
            else:
                den = cover.clamp(min=1e-300).reshape(covered.shape)
                value = p.sums[name] / den
            out[name] = torch.where(covered, value.to(w.dtype), w)
        return out
