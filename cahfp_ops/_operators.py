"""The registered operators ``torch.ops.cahfp.*``: schemas, one fake kernel each, backend dispatch.

Canonical inputs, the same for every backend (the public functions in :mod:`cahfp_ops.ops`
and :mod:`cahfp_ops.layout` build them; each backend module implements one function per
operator, :data:`OPERATORS`, with these arguments):

* ``weight``: the N-D global tensor, output channels on dim 0, input channels on dim 1;
* ``rows`` / ``cols``: ``(K, m)`` int64 keep sets on the data's device, each row strictly
  ascending and padded with ``-1`` at its end; ``cols`` of a 1-D weight is ``(K, 1)`` zeros;
* ``clients``: K compact tensors ``(>= rows_k, >= cols_k, *weight.shape[2:])`` of one dtype
  (whole-model form: ``clients[n * K + k]`` is client k's tensor n);
* ``coef``: ``(K,)`` float64 on the data's device, normalised to sum 1 (``robust_aggregate``:
  as given, scaled by a power of two at most);
* ``row_counts`` / ``col_counts`` (whole-model slicing): kept counts ``[n * K + k]``.

The body of each operator picks the backend for the data's device and calls it; nothing
more. The fake kernels give output shapes and dtypes without computing, so the operators
work under ``torch.compile`` and ``opcheck``. Slicing and mean aggregation (single and
whole-model forms) have autograd formulas (``_autograd.py``, registered at the end of this
file); the other operators are not differentiable.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _autograd
from ._dispatch import backend_for
from ._dtypes import acc_dtype
from ._layout_tables import LayoutTables
from ._views import packed_slice_numel


# --------------------------------------------------------------------------- curvature_scores
@torch.library.custom_op("cahfp::curvature_scores", mutates_args=())
def curvature_scores_op(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    """weight / grad / hess: ``(K_i, *S)`` (K_i in {1, K}), one dtype; -> ``(K, S[dim])``."""
    return backend_for(weight.device).curvature_scores(weight, grad, hess, dim)


@curvature_scores_op.register_fake
def _(weight: Tensor, grad: Tensor | None, hess: Tensor | None, dim: int) -> Tensor:
    K = max(t.shape[0] for t in (weight, grad, hess) if t is not None)
    return weight.new_empty((K, weight.shape[dim + 1]), dtype=acc_dtype(weight.dtype))


# --------------------------------------------------------------------------- topk_channel_masks
@torch.library.custom_op("cahfp::topk_channel_masks", mutates_args=())
def topk_channel_masks_op(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    """scores ``(K, C)``, keep ``(K,)`` int64 -> mask ``(K, C)`` bool, indices ``(K, max_keep)`` int64."""
    return backend_for(scores.device).topk_channel_masks(scores, keep, max_keep)


@topk_channel_masks_op.register_fake
def _(scores: Tensor, keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    mask = scores.new_empty(scores.shape, dtype=torch.bool)
    indices = scores.new_empty((scores.shape[0], max_keep), dtype=torch.int64)
    return mask, indices


# --------------------------------------------------------------------------- robust_aggregate
@torch.library.custom_op("cahfp::robust_aggregate", mutates_args=())
def robust_aggregate_op(
    weight: Tensor,
    clients: list[Tensor],
    rows: Tensor,
    cols: Tensor,
    coef: Tensor,
    mode: str,
    reduce: str,
    trim: float,
) -> Tensor:
    """-> a new contiguous tensor shaped and typed like ``weight``: the weighted median or
    trimmed mean per element (SPEC, "Robust reducers"); ``coef`` ``(K,)`` float64 as given."""
    return backend_for(weight.device).robust_aggregate(weight, clients, rows, cols, coef, mode, reduce, trim)


@robust_aggregate_op.register_fake
def _(
    weight: Tensor,
    clients: list[Tensor],
    rows: Tensor,
    cols: Tensor,
    coef: Tensor,
    mode: str,
    reduce: str,
    trim: float,
) -> Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- slice_channels
@torch.library.custom_op("cahfp::slice_channels", mutates_args=())
def slice_channels_op(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    """-> packed 1-D buffer of ``total`` elements: client k's ``weight[rows_k][:, cols_k]``, in client order."""
    return backend_for(weight.device).slice_channels(weight, rows, cols, total)


@slice_channels_op.register_fake
def _(weight: Tensor, rows: Tensor, cols: Tensor, total: int) -> Tensor:
    return weight.new_empty((total,))


# --------------------------------------------------------------------------- reconstruct_aggregate
@torch.library.custom_op("cahfp::reconstruct_aggregate", mutates_args=())
def reconstruct_aggregate_op(
    weight: Tensor, clients: list[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str
) -> Tensor:
    """-> a new contiguous tensor shaped and typed like ``weight`` (see SPEC.md)."""
    return backend_for(weight.device).reconstruct_aggregate(weight, clients, rows, cols, coef, mode)


@reconstruct_aggregate_op.register_fake
def _(weight: Tensor, clients: list[Tensor], rows: Tensor, cols: Tensor, coef: Tensor, mode: str) -> Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- whole-model ops
@torch.library.custom_op("cahfp::reconstruct_aggregate_many", mutates_args=())
def reconstruct_aggregate_many_op(
    weights: list[Tensor], clients: list[Tensor], rows: list[Tensor], cols: list[Tensor], coef: Tensor, mode: str
) -> Tensor:
    """N weights (one dtype), ``clients[n * K + k]`` -> one packed buffer of the N results in order."""
    return backend_for(weights[0].device).reconstruct_aggregate_many(weights, clients, rows, cols, coef, mode)


@reconstruct_aggregate_many_op.register_fake
def _(
    weights: list[Tensor], clients: list[Tensor], rows: list[Tensor], cols: list[Tensor], coef: Tensor, mode: str
) -> Tensor:
    return weights[0].new_empty((sum(w.numel() for w in weights),))


@torch.library.custom_op("cahfp::slice_channels_many", mutates_args=())
def slice_channels_many_op(
    weights: list[Tensor], rows: list[Tensor], cols: list[Tensor], row_counts: list[int], col_counts: list[int]
) -> Tensor:
    """N weights (one dtype) -> one packed buffer, client-major: client 0's N compact tensors, then client 1's, ..."""
    return backend_for(weights[0].device).slice_channels_many(weights, rows, cols, row_counts, col_counts)


@slice_channels_many_op.register_fake
def _(
    weights: list[Tensor], rows: list[Tensor], cols: list[Tensor], row_counts: list[int], col_counts: list[int]
) -> Tensor:
    return weights[0].new_empty((packed_slice_numel(weights, rows[0].shape[0], row_counts, col_counts),))


# --------------------------------------------------------------------------- per-round layout ops
# Tables of a RoundLayout (cahfp_ops/layout.py): meta (N, 5) int64, row_inv (K, SR) int32,
# col_keep (K, SC) int32, counts (K, N, 2) int64, offsets / starts (K, N) int64: separate
# arguments here (a schema has no named tuples), one LayoutTables value on either side. They write
# into caller-given buffers (a workspace can own them) and return nothing. ``clients`` holds
# every client's data end to end and ``parts[k]`` says its form: 0 for one packed 1-D buffer
# (tensor n at ``offsets[k, n]``), N for its N compact tensors (a one-tensor layout cannot
# tell the two apart by their count). Whatever the tables, client lists and buffers hold,
# no backend reads or writes outside its tensors.
@torch.library.custom_op("cahfp::slice_packed", mutates_args=("out",))
def slice_packed_op(
    weights: list[Tensor], meta: Tensor, row_inv: Tensor, col_keep: Tensor, counts: Tensor, starts: Tensor, out: Tensor
) -> None:
    """Client k's compact tensor n -> ``out[starts[k, n]:]`` (one buffer per client, end to end)."""
    backend_for(out.device).slice_packed(weights, LayoutTables(meta, row_inv, col_keep, counts, starts), out)


@slice_packed_op.register_fake
def _(weights, meta, row_inv, col_keep, counts, starts, out) -> None:
    return None


def call_layout_op(op: torch._library.custom_ops.CustomOpDef, *args: object) -> None:
    """Call a layout operator (``slice_packed``, ``aggregate_packed``, ... : lists of tensors in,
    outputs written in place) with ``args``.

    In plain eager mode its body runs directly, under ``no_grad``: not compiling, no torch
    function or dispatch mode, no profiler, no tensor subclass, CPU or CUDA data. The
    operator's Python wrapper, alias check and redispatch cost about 0.7 us per tensor in
    its lists (20 ms of a ResNet-56 state_dict aggregation at K = 100, whose 100 clients pass
    27,700 tensors); the body is the operator's own, so both ways compute the same. Anything
    else (``torch.compile``, fake tensors, a profiler, which then sees the operator) goes
    through ``torch.ops.cahfp``.
    """
    tensors: list = []
    for a in args:
        if isinstance(a, Tensor):
            tensors.append(a)
        elif isinstance(a, list) and a and isinstance(a[0], Tensor):
            tensors.extend(a)
    body = getattr(op, "_init_fn", None)  # the decorated function (torch._library.custom_ops)
    if (
        body is None
        or not tensors
        or tensors[0].device.type not in ("cpu", "cuda")
        or torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch.autograd._profiler_enabled()
        or torch.overrides.has_torch_function(tensors)
    ):
        op(*args)
        return
    with torch.no_grad():
        body(*args)


def layout_plan(tables: LayoutTables, device: torch.device, owner: object) -> int:
    """The backend's plan of a layout's tables for ``aggregate_packed`` / ``fold_packed``
    (the C++ engine's per-round rows, column runs and bitsets, made once and released when
    ``owner`` is collected), or -1 where the backend plans nothing ahead."""
    backend = backend_for(device)
    make = getattr(backend, "plan_layout", None)
    if make is None:
        return -1
    plan = make(tables)
    weakref.finalize(owner, backend.release_layout_plan, plan).atexit = False
    return plan


def layout_plan_subset(plan: int, clients: Sequence[int], device: torch.device, owner: object) -> int:
    """The plan of some clients of a layout planned under ``plan`` (:func:`layout_plan`),
    released when ``owner`` (the clients' layout) is collected; -1 where the backend has none."""
    backend = backend_for(device)
    make = getattr(backend, "plan_subset", None)
    if make is None or plan < 0:
        return -1
    sub = make(plan, clients)
    weakref.finalize(owner, backend.release_layout_plan, sub).atexit = False
    return sub


@torch.library.custom_op("cahfp::aggregate_packed", mutates_args=("out", "stats"))
def aggregate_packed_op(
    weights: list[Tensor],
    clients: list[Tensor],
    parts: list[int],
    meta: Tensor,
    row_inv: Tensor,
    col_keep: Tensor,
    counts: Tensor,
    offsets: Tensor,
    coef: Tensor,
    agg_mode: str,
    out: Tensor,
    stats: Tensor,
    plan: int = -1,
) -> None:
    """Aggregate into ``out`` (N results packed); ``stats`` (K, 2): non-finite flag, sum of squared deltas.
    ``plan``: the backend's plan of the tables (:func:`layout_plan`), -1: none."""
    tables = LayoutTables(meta, row_inv, col_keep, counts, offsets)
    backend_for(out.device).aggregate_packed(weights, clients, parts, tables, coef, agg_mode, out, stats, plan)


@aggregate_packed_op.register_fake
def _(weights, clients, parts, meta, row_inv, col_keep, counts, offsets, coef, agg_mode, out, stats, plan=-1) -> None:
    return None


@torch.library.custom_op("cahfp::accumulate_packed", mutates_args=("sums", "cover", "stats"))
def accumulate_packed_op(
    weights: list[Tensor],
    client: list[Tensor],
    parts: list[int],
    meta: Tensor,
    row_inv: Tensor,
    col_keep: Tensor,
    counts: Tensor,
    offsets: Tensor,
    weight: float,
    max_ssq: float,
    agg_mode: str,
    sums: Tensor,
    cover: Tensor,
    stats: Tensor,
) -> None:
    """Fold one client into the partial sums ``sums`` / ``cover``; ``stats`` (2,) as above."""
    tables = LayoutTables(meta, row_inv, col_keep, counts, offsets)
    backend_for(sums.device).accumulate_packed(
        weights, client, parts, tables, weight, max_ssq, agg_mode, sums, cover, stats
    )


@accumulate_packed_op.register_fake
def _(weights, client, parts, meta, row_inv, col_keep, counts, offsets, weight, max_ssq, agg_mode, sums, cover,
      stats) -> None:  # fmt: skip
    return None


@torch.library.custom_op("cahfp::fold_packed", mutates_args=("sums_out", "cover_out", "stats"))
def fold_packed_op(
    weights: list[Tensor],
    clients: list[Tensor],
    parts: list[int],
    meta: Tensor,
    row_inv: Tensor,
    col_keep: Tensor,
    counts: Tensor,
    offsets: Tensor,
    coef: Tensor,
    agg_mode: str,
    sums_in: Tensor | None,
    cover_in: Tensor | None,
    sums_out: Tensor,
    cover_out: Tensor,
    stats: Tensor,
    plan: int = -1,
) -> None:
    """Fold the layout's K clients, in order, into the partial sums ``sums_in`` / ``cover_in``
    (both None: zeros), writing ``sums_out`` / ``cover_out``; ``stats`` (K, 2) as for
    ``aggregate_packed``."""
    tables = LayoutTables(meta, row_inv, col_keep, counts, offsets)
    backend_for(sums_out.device).fold_packed(
        weights, clients, parts, tables, coef, agg_mode, sums_in, cover_in, sums_out, cover_out, stats, plan
    )


@fold_packed_op.register_fake
def _(weights, clients, parts, meta, row_inv, col_keep, counts, offsets, coef, agg_mode, sums_in, cover_in,
      sums_out, cover_out, stats, plan=-1) -> None:  # fmt: skip
    return None


@torch.library.custom_op("cahfp::finish_partials", mutates_args=("out",))
def finish_partials_op(
    weights: list[Tensor], sums: Tensor, cover: Tensor, weight_sum: float, agg_mode: str, out: Tensor
) -> None:
    """The new global model from running partial sums, packed into ``out``."""
    backend_for(out.device).finish_partials(weights, sums, cover, weight_sum, agg_mode, out)


@finish_partials_op.register_fake
def _(weights, sums, cover, weight_sum, agg_mode, out) -> None:
    return None


# --------------------------------------------------------------------------- autograd
# Slicing and mean aggregation are linear in their tensors: their gradients are registered
# (cahfp_ops/_autograd.py). The other operators are not differentiable; the public functions
# call them without recording a graph, so their results never require grad.
torch.library.register_autograd(
    "cahfp::slice_channels", _autograd.backward_slice, setup_context=_autograd.setup_slice
)
torch.library.register_autograd(
    "cahfp::reconstruct_aggregate", _autograd.backward_aggregate, setup_context=_autograd.setup_aggregate
)
torch.library.register_autograd(
    "cahfp::slice_channels_many", _autograd.backward_slice_many, setup_context=_autograd.setup_slice_many
)
torch.library.register_autograd(
    "cahfp::reconstruct_aggregate_many", _autograd.backward_aggregate_many,
    setup_context=_autograd.setup_aggregate_many,
)  # fmt: skip


#: The registered operators' names (``torch.ops.cahfp.NAME``), in definition order: the one
#: list of the backend interface. Every backend module (``cpp``, ``triton``, ``reference``)
#: implements a function NAME for each, with the operator's arguments (the five layout tables
#: as one ``LayoutTables``), and the compiled library a ``torch.ops._cahfp_cpp.NAME`` kernel.
OPERATORS = tuple(
    op._name for op in globals().values() if isinstance(op, torch._library.custom_ops.CustomOpDef)
)
