"""Sharded aggregation across processes with ``torch.distributed``.

Each process folds its share of the clients into a :class:`~cahfp_ops.fl.aggregate.StreamingAggregator`;
:func:`all_reduce_aggregator` then combines the processes' partial sums
(:class:`~cahfp_ops.fl.aggregate.AggregatePartials`) with two all-reduces of their flattened
form, after which every process holds the aggregate of all clients and ``result()`` gives the
new global model everywhere. Partial sums are float64, so the result equals the
single-process aggregation up to float64 rounding.
"""

from __future__ import annotations

import torch.distributed as dist

from .aggregate import StreamingAggregator


def all_reduce_aggregator(agg: StreamingAggregator, group: dist.ProcessGroup | None = None) -> StreamingAggregator:
    """Combine ``agg``'s partial sums over ``group`` in place (every rank must call it) and return it.

    Works with any backend that reduces float64 and int64 (gloo on CPU; NCCL for CUDA
    tensors). Two calls whatever the model's size: the sums are added, the integer entries
    take their maximum.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_aggregator: torch.distributed is not initialised")
    partials = agg.partials()
    floats, ints = partials.flatten()
    dist.all_reduce(floats, op=dist.ReduceOp.SUM, group=group)
    if ints.numel():
        dist.all_reduce(ints, op=dist.ReduceOp.MAX, group=group)
    agg.load_partials(partials.unflatten(floats, ints))
    return agg
