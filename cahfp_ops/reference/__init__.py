"""The pure-PyTorch reference backend (backend ``torch``), one module per op family.

The functions take the canonical inputs every backend takes (see
``cahfp_ops/_operators.py``): N-D weights, ``(K, m)`` int64 keep sets padded with -1, a
normalised ``(K,)`` float64 coefficient tensor. They are written for clarity, not speed:
they define what the compiled backends must compute. Use them through the public API with
``cahfp_ops.use_backend("torch")``.
"""

from .aggregate import reconstruct_aggregate, reconstruct_aggregate_many
from .masks import topk_channel_masks
from .packed import accumulate_packed, aggregate_packed, finish_partials, fold_packed, slice_packed
from .robust import robust_aggregate
from .scores import curvature_scores
from .slice import slice_channels, slice_channels_many

__all__ = [
    "accumulate_packed",
    "aggregate_packed",
    "curvature_scores",
    "finish_partials",
    "fold_packed",
    "reconstruct_aggregate",
    "reconstruct_aggregate_many",
    "robust_aggregate",
    "slice_channels",
    "slice_channels_many",
    "slice_packed",
    "topk_channel_masks",
]
