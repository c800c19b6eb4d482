"""The Triton backend: kernels for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``).

One file per op; the six backend functions take the canonical inputs every backend takes
(see ``cahfp_ops/_operators.py``) and are called from inside the matching registered
``torch.ops.cahfp`` operator (``torch.library.custom_op`` + ``register_fake``).
"""

from .curvature_scores import curvature_scores
from .packed import accumulate_packed, aggregate_packed, finish_partials, fold_packed, slice_packed
from .reconstruct_aggregate import reconstruct_aggregate, reconstruct_aggregate_many
from .robust_aggregate import robust_aggregate
from .slice_channels import slice_channels, slice_channels_many
from .topk_channel_masks import topk_channel_masks

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
