"""Sharded aggregation across processes with ``torch.distributed``.

Each process folds its share of the clients into a :class:`~cahfp_ops.aggregate.StreamingAggregator`;
:func:`all_reduce_aggregator` then sums the partial weighted delta sums and weight sums over the
process group (and takes the maximum of integer entries), after which every process holds the
aggregate of all clients and ``result()`` gives the new global model everywhere. Partial sums are
float64, so the result equals the single-process aggregation up to float64 rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .aggregate import StreamingAggregator


def all_reduce_aggregator(agg: StreamingAggregator, group: dist.ProcessGroup | None = None) -> StreamingAggregator:
    """Sum ``agg``'s partial aggregates over ``group`` in place (every rank must call it) and return it.

    Works with any backend that reduces float64 (gloo on CPU; NCCL for CUDA tensors). The
    tensors are reduced in one flat buffer per kind, so the call count does not grow with the model.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_aggregator: torch.distributed is not initialised")
    names = sorted(agg.sums)
    device = next(iter(agg.sums.values())).device if names else torch.device("cpu")
    flat = torch.cat(
        [agg.sums[n].reshape(-1) for n in names]
        + [agg.cover[n].reshape(-1) for n in names]
        + [torch.tensor([agg.weight_sum, float(agg.count)], dtype=torch.float64, device=device)]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for store in (agg.sums, agg.cover):
        for n in names:
            t = store[n]
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    agg.weight_sum, agg.count = float(flat[offset]), int(flat[offset + 1])
    int_names = sorted(n for n, v in agg.global_state.items() if not v.is_floating_point())
    if int_names:
        ints = torch.stack([agg.ints.get(n, agg.global_state[n]).reshape(()).to(torch.int64) for n in int_names]).to(
            device
        )
        dist.all_reduce(ints, op=dist.ReduceOp.MAX, group=group)
        for n, v in zip(int_names, ints):
            agg.ints[n] = v.to(agg.global_state[n].dtype).reshape(agg.global_state[n].shape)
    return agg
