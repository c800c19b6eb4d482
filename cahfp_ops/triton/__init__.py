"""The Triton backend: kernels for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``).

One file per op family (``scores``, ``masks``, ``slice``, ``aggregate``, ``robust``, ``packed``,
the same names as in ``cahfp_ops/reference/`` and ``csrc/cpu/``); one function per operator
(``cahfp_ops._operators.OPERATORS``) taking the canonical inputs every backend takes
(see ``cahfp_ops/_operators.py``) and are called from inside the matching registered
``torch.ops.cahfp`` operator (``torch.library.custom_op`` + ``register_fake``).
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
    "finish_partials",
    "fold_packed",
    "slice_packed",
    "curvature_scores",
    "reconstruct_aggregate",
    "reconstruct_aggregate_many",
    "robust_aggregate",
    "slice_channels",
    "slice_channels_many",
    "topk_channel_masks",
]
