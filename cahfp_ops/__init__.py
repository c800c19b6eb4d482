"""cahfp-ops: fused, deterministic kernels for heterogeneous federated pruning (CA-HFP).

The kernel layer. Public ops (each backed by a registered ``torch.ops.cahfp.*`` operator):
:func:`curvature_scores`, :func:`topk_channel_masks`, :func:`slice_channels`,
:func:`reconstruct_aggregate`, and the whole-model forms :func:`slice_channels_many`,
:func:`reconstruct_aggregate_many`. Backends: :func:`use_backend` / ``CAHFP_OPS_BACKEND``.
Validation: :func:`validation` / :func:`set_validation` / ``CAHFP_OPS_VALIDATE``.

The federated-learning layer (channel plans, compact models, aggregation, importance,
masks, the server, sharding, the model zoo) is :mod:`cahfp_ops.fl`; import it yourself.
"""

from __future__ import annotations

from . import reference
from ._dispatch import BACKENDS, get_backend, resolve_backend, use_backend
from ._dtypes import DTypeError, acc_dtype
from ._validation import set_validation, validation, validation_enabled
from .cpp import load_cpp
from .layout import (
    PackedModel,
    PackedScalars,
    RoundLayout,
    Workspace,
    accumulate_packed,
    aggregate_packed,
    empty_buffer,
    finish_partials,
    fold_packed,
    slice_packed,
)
from .ops import (
    MODES,
    REDUCERS,
    curvature_scores,
    reconstruct_aggregate,
    reconstruct_aggregate_many,
    slice_channels,
    slice_channels_many,
    topk_channel_masks,
)

__version__ = "0.3.0"

__all__ = [
    "BACKENDS",
    "MODES",
    "REDUCERS",
    "DTypeError",
    "PackedModel",
    "PackedScalars",
    "RoundLayout",
    "Workspace",
    "acc_dtype",
    "accumulate_packed",
    "aggregate_packed",
    "curvature_scores",
    "empty_buffer",
    "finish_partials",
    "fold_packed",
    "get_backend",
    "load_cpp",
    "reconstruct_aggregate",
    "reconstruct_aggregate_many",
    "reference",
    "resolve_backend",
    "set_validation",
    "slice_channels",
    "slice_packed",
    "slice_channels_many",
    "topk_channel_masks",
    "use_backend",
    "validation",
    "validation_enabled",
]
