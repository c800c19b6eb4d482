"""cahfp-ops: fused, deterministic kernels for heterogeneous federated pruning (CA-HFP).

Public ops (each backed by a registered ``torch.ops.cahfp.*`` operator):
:func:`curvature_scores`, :func:`topk_channel_masks`, :func:`slice_channels`,
:func:`reconstruct_aggregate`, and the whole-model forms :func:`slice_channels_many`,
:func:`reconstruct_aggregate_many`. Backends: :func:`use_backend` /
``CAHFP_OPS_BACKEND``. Validation: :func:`validation` / :func:`set_validation` /
``CAHFP_OPS_VALIDATE``.
"""

from __future__ import annotations

from . import reference
from ._backend import BACKENDS, get_backend, resolve_backend, use_backend
from ._extension import load_cpp
from ._inputs import DTypeError
from ._validation import set_validation, validation, validation_enabled
from .ops import (
    curvature_scores,
    reconstruct_aggregate,
    reconstruct_aggregate_many,
    slice_channels,
    slice_channels_many,
    topk_channel_masks,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DTypeError",
    "curvature_scores",
    "get_backend",
    "load_cpp",
    "reconstruct_aggregate",
    "reconstruct_aggregate_many",
    "reference",
    "resolve_backend",
    "set_validation",
    "slice_channels",
    "slice_channels_many",
    "topk_channel_masks",
    "use_backend",
    "validation",
    "validation_enabled",
]
