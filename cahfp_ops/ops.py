"""The public ops: argument checking, canonical forms, then one registered operator call.

The examples in the docstrings run as doctests (``tests/test_readme.py``) with ``torch`` and
``cahfp_ops`` imported.

Shapes follow SPEC.md: a parameter tensor ``W`` has output channels on dim 0 and
input channels on dim 1 (when it has 2+ dims). Keep sets are 1-D int64/int32
tensors, strictly ascending, or ``None`` for all channels. Per-client keep sets
are a sequence (one keep set or None per client), a padded ``(K, m)`` integer
tensor (rows ascending, -1 padding at the end), or one 1-D keep set shared by all
clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from . import _entries, _operators
from ._dispatch import resolve_backend
from ._dtypes import FLOAT_DTYPES, DTypeError
from ._inputs import (
    MODES,  # noqa: F401  (public as cahfp_ops.ops.MODES, as before)
    KeepSets,
    canonical_coef,
    canonical_keep,
    check_floating,
    check_has_data,
    check_mode,
    check_names,
    check_same_device,
    count_clients,
    is_int,
    is_per_client,
    keep_set_entries,
    kept_counts,
    named,
    per_tensor,
)
from ._validation import validation, validation_enabled
from ._views import packed_views
from .layout import PackedModel, RoundLayout, aggregate_packed, slice_packed

Clients = Union[Tensor, Sequence[Tensor]]
REDUCERS = ("mean", "median", "trimmed_mean")


def curvature_scores(
    weight: Tensor,
    grad: Tensor | None = None,
    hess: Tensor | None = None,
    *,
    dim: int = 0,
    batched: bool | None = None,
) -> Tensor:
    """Curvature-aware channel importance ``sum |g*w| + 0.5*max(h,0)*w**2`` over all dims but ``dim``.

    Args:
        weight, grad, hess: floating tensors of shape ``S``, or ``(K, *S)`` with a
            leading client dim; those without it broadcast. A missing term counts
            as zero (``grad`` and ``hess`` cannot both be None).
        dim: the channel dim of ``S`` (negative counts from the end).
        batched: whether the inputs of highest rank carry a client dim. ``None``
            infers it: a client dim exists when the ranks differ. Pass ``True``
            when every input carries one.

    Returns:
        ``(S[dim],)`` or ``(K, S[dim])``, float32 (float64 when any input is float64).

    Not differentiable: the result never requires grad.

    Example:
        >>> w = torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]])  # 3 channels
        >>> cahfp_ops.curvature_scores(w, grad=torch.ones_like(w), hess=torch.ones_like(w))
        tensor([5.5000, 0.6250, 9.0000])
    """
    op = "curvature_scores"
    weight = check_floating(op, "weight", weight)
    given = {"weight": weight}
    for name, t in (("grad", grad), ("hess", hess)):
        if t is not None:
            given[name] = check_floating(op, name, t)
            check_same_device(op, name, t, weight, "weight")
    if grad is None and hess is None:
        raise ValueError(f"{op}: grad and hess are both None; at least one term is needed")
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"{op}: batched must be a bool or None, got {type(batched).__name__}")
    if not is_int(dim):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    ranks = {name: t.dim() for name, t in given.items()}
    top = max(ranks.values())
    has_k = batched if batched is not None else top != min(ranks.values())
    s_rank = top - 1 if has_k else top
    if s_rank < 1:
        raise ValueError(f"{op}: inputs need at least 1 dim per client, got ranks {ranks}")
    shape_s = None
    K = 1
    for name, t in given.items():
        if t.dim() == s_rank + 1 and has_k:
            K_t, s = t.shape[0], tuple(t.shape[1:])
            if K != 1 and K_t != K:
                raise ValueError(f"{op}: {name} has {K_t} clients but another input has {K}")
            K = max(K, K_t)
        elif t.dim() == s_rank:
            s = tuple(t.shape)
        else:
            raise ValueError(f"{op}: {name} has rank {t.dim()}; expected {s_rank} or {s_rank + 1} (ranks {ranks})")
        if shape_s is None:
            shape_s = s
        elif s != shape_s:
            raise ValueError(f"{op}: {name} has per-client shape {s} but weight has {shape_s}")
    if not -s_rank <= dim < s_rank:
        raise ValueError(f"{op}: dim={dim} is out of range for per-client shape {shape_s}")
    dim = dim % s_rank
    dtypes = {t.dtype for t in given.values()}
    common = dtypes.pop() if len(dtypes) == 1 else (torch.float64 if torch.float64 in dtypes else torch.float32)

    def canon(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        t = t.to(common)
        return (t if t.dim() == s_rank + 1 else t.unsqueeze(0)).contiguous()

    with torch.no_grad():  # not differentiable: the scores are a constant of the model
        out = _operators.curvature_scores_op(canon(weight), canon(grad), canon(hess), dim)
    return out if has_k else out.squeeze(0)


def topk_channel_masks(scores: Tensor, keep: int | Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` highest-scoring channels of every row.

    Args:
        scores: ``(C,)`` or ``(K, C)`` floating. NaN ranks below every number; ties
            go to the lower index.
        keep: an int, or one int per row (sequence or 1-D integer tensor), each in ``[1, C]``.

    Returns:
        ``mask``: bool, shaped like ``scores``, exactly ``keep_k`` True per row.
        ``indices``: int64 kept channels, ascending: ``(keep,)`` for 1-D scores,
        ``(K, max(keep))`` padded with -1 for 2-D scores.

    Example:
        >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [1.0, 0.0, 2.0, 3.0]])
        >>> mask, indices = cahfp_ops.topk_channel_masks(scores, [2, 3])
        >>> indices  # client 0 keeps 2 channels, client 1 keeps 3
        tensor([[ 1,  3, -1],
                [ 0,  2,  3]])
    """
    op = "topk_channel_masks"
    scores = check_floating(op, "scores", scores)
    if scores.dim() not in (1, 2):
        raise ValueError(f"{op}: scores must be (C,) or (K, C), got shape {tuple(scores.shape)}")
    rows = 1 if scores.dim() == 1 else scores.shape[0]
    C = scores.shape[-1]
    if is_int(keep):
        counts = [int(keep)] * rows
    elif isinstance(keep, Tensor):
        if keep.dtype.is_floating_point or keep.dtype in (torch.bool,) or keep.is_complex():
            raise DTypeError(f"{op}: keep must be an integer tensor (kept counts, one per row), got {keep.dtype}")
        check_has_data(op, "keep", keep)
        if keep.dim() != 1:
            raise ValueError(f"{op}: keep must be an int or a 1-D tensor, got shape {tuple(keep.shape)}")
        counts = keep.tolist()
    elif isinstance(keep, (list, tuple)):
        if not all(is_int(k) for k in keep):
            raise TypeError(f"{op}: keep must hold ints")
        counts = [int(k) for k in keep]
    else:
        raise TypeError(f"{op}: keep must be an int, a sequence of ints or a 1-D tensor, got {type(keep).__name__}")
    if len(counts) != rows:
        raise ValueError(f"{op}: keep has {len(counts)} values but scores has {rows} rows")
    if C == 0:
        raise ValueError(
            f"{op}: scores has no channels (shape {tuple(scores.shape)}); a channel group needs at least one"
        )
    for k, n in enumerate(counts):
        if not 1 <= n <= C:
            raise ValueError(f"{op}: keep[{k}] = {n} is outside [1, {C}]")
    keep_t = torch.tensor(counts, dtype=torch.int64, device=scores.device)
    s2 = scores.reshape(rows, C).contiguous()
    mask, indices = _operators.topk_channel_masks_op(s2, keep_t, max(counts) if counts else 0)
    if scores.dim() == 1:
        return mask[0], indices[0]
    return mask, indices


def _weight_keep(
    op: str, weight: Tensor, rows: KeepSets, cols: KeepSets, K: int, memo: dict | None = None
) -> tuple[Tensor, Tensor]:
    """Canonical (K, m) row and column keep sets for ``weight``.

    ``memo`` (whole-model ops) canonicalises a keep-set object shared by several tensors
    (a conv, its bias and norm, the next layer's inputs) once per call.
    """
    if weight.dim() == 0:
        raise ValueError(f"{op}: weight must have at least 1 dim")
    if weight.dim() == 1 and cols is not None:
        raise ValueError(f"{op}: cols must be None for a 1-D weight (it has no input channels)")

    def canon(name: str, keep: KeepSets, size: int) -> Tensor:
        if memo is None:
            return canonical_keep(op, name, keep, size, K, weight.device)
        key = (id(keep), size, weight.device)
        if key not in memo:
            memo[key] = (keep, canonical_keep(op, name, keep, size, K, weight.device))  # keep: pins the id
        return memo[key][1]

    padded_rows = canon("rows", rows, weight.shape[0])
    if weight.dim() == 1:
        padded_cols = torch.zeros(K, 1, dtype=torch.int64, device=weight.device)
    else:
        padded_cols = canon("cols", cols, weight.shape[1])
    return padded_rows, padded_cols


def slice_channels(weight: Tensor, rows: KeepSets = None, cols: KeepSets = None) -> Tensor | list[Tensor]:
    """Physically slice kept channels out of ``weight``.

    With single keep sets (1-D tensors or None): ``weight[rows][:, cols]`` as a new
    contiguous tensor. With per-client keep sets (a sequence or a padded ``(K, m)``
    tensor, for rows, cols or both; a single keep set then applies to every
    client): a list of K compact contiguous tensors, client k shaped
    ``(len(rows_k), len(cols_k), *weight.shape[2:])``, all views into one packed
    buffer written in one pass over ``weight``.

    Differentiable in ``weight`` (the gradient of a copy: each client's gradient placed at its
    kept entries, summed over clients).

    Example:
        >>> w = torch.arange(12.0).reshape(4, 3)
        >>> a, b = cahfp_ops.slice_channels(w, rows=[torch.tensor([0, 2]), None], cols=[torch.tensor([1]), None])
        >>> a
        tensor([[1.],
                [7.]])
        >>> b.shape
        torch.Size([4, 3])
    """
    op = "slice_channels"
    weight = check_floating(op, "weight", weight)
    K = count_clients(op, rows=rows, cols=cols)
    per_client = K is not None
    if per_client and K == 0:
        empty = "rows" if is_per_client(rows) and len(rows) == 0 else "cols"
        raise ValueError(f"{op}: {empty} is an empty list of per-client keep sets (no clients); "
                         "pass one keep set (or None) per client")  # fmt: skip
    Kc = K if per_client else 1
    padded_rows, padded_cols = _weight_keep(op, weight, rows, cols, Kc)
    row_counts = kept_counts(rows, padded_rows)
    col_counts = [1] * Kc if weight.dim() == 1 else kept_counts(cols, padded_cols)
    inner = weight[0, 0].numel() if weight.dim() >= 2 else 1
    sizes = [r * c * inner for r, c in zip(row_counts, col_counts)]
    packed = _operators.slice_channels_op(weight, padded_rows, padded_cols, sum(sizes))
    tail = tuple(weight.shape[2:])
    shapes = [(r,) if weight.dim() == 1 else (r, c, *tail) for r, c in zip(row_counts, col_counts)]
    parts = packed_views(packed, shapes)
    return parts if per_client else parts[0]


def reconstruct_aggregate(
    weight: Tensor,
    clients: Clients,
    rows: KeepSets = None,
    cols: KeepSets = None,
    coef: Sequence[float] | Tensor | None = None,
    *,
    mode: str = "reconstruct",
    reduce: str = "mean",
    trim: float = 0.1,
) -> Tensor:
    """Aggregate K compact client tensors into a new full-size tensor shaped like ``weight``.

    Args:
        weight: the global tensor ``(R, Cin, *tail)`` or ``(R,)``.
        clients: a sequence of K compact tensors (client k
            ``(len(rows_k), len(cols_k), *tail)``), or one stacked tensor
            ``(K, m_rows, m_cols, *tail)`` whose padding region is ignored. Any
            floating dtype (e.g. float16 uploads into a float32 global); clients of
            mixed dtypes are cast to ``weight``'s dtype first.
        rows, cols: per-client keep sets (None: all channels).
        coef: K non-negative weights with a positive sum (default equal),
            normalised by their sum. Clients with weight 0 are ignored.
        mode: ``"reconstruct"`` (CA-HFP: ``weight + sum_k p_k E_k(c_k - weight_k)``)
            or ``"overlap"`` (HeteroFL: weighted mean over the clients that keep
            each element).
        reduce: how the clients' values of an element are combined: ``"mean"`` (the two
            modes above, bit for bit), or a robust reducer over the element's participants
            (SPEC, "Robust reducers"): ``"median"`` (the coef-weighted median; an exact tie
            of the cumulative weight with half the total gives the midpoint of the two
            values) or ``"trimmed_mean"`` (``trim`` of the total weight cut from each end,
            the weighted mean of the rest). In ``reconstruct`` mode every client with a
            positive weight takes part (valued ``weight`` where it does not keep the element);
            in ``overlap`` mode only the clients keeping it. No FL framework offers robust
            aggregation of heterogeneous submodels; Flower's FedMedian / FedTrimmedAvg need
            equal shapes.
        trim: the fraction cut from each end by ``"trimmed_mean"``, in ``[0, 0.5)``.

    Returns:
        A new tensor with ``weight``'s shape and dtype. Elements no client keeps
        are bit-identical to ``weight``. Accumulation is float32 (float64 for float64).

    With ``reduce="mean"`` the result is differentiable in ``weight`` and in every client
    tensor (the coefficients are constants: a ``coef`` that requires grad is refused); the
    robust reducers are not differentiable (their result never requires grad).

    Example:
        >>> w = torch.zeros(3, 2)
        >>> rows = [torch.tensor([0, 1]), torch.tensor([1, 2])]  # client 0 trained rows 0-1, client 1 rows 1-2
        >>> clients = [torch.ones(2, 2), 3 * torch.ones(2, 2)]
        >>> cahfp_ops.reconstruct_aggregate(w, clients, rows, coef=[1, 1])  # pruned entries count as w
        tensor([[0.5000, 0.5000],
                [2.0000, 2.0000],
                [1.5000, 1.5000]])
        >>> cahfp_ops.reconstruct_aggregate(w, clients, rows, mode="overlap")  # mean of the keepers
        tensor([[1., 1.],
                [2., 2.],
                [3., 3.]])
    """
    op = "reconstruct_aggregate"
    check_mode(op, mode)
    _check_reduce(op, reduce, trim)
    weight, client_list, padded_rows, padded_cols = _prepare_aggregate(op, "", weight, clients, rows, cols)
    if reduce != "mean":
        coef_t = canonical_coef(op, coef, len(client_list), weight.device, normalised=False)
        with torch.no_grad():  # a median or trimmed mean has no gradient formula here
            return _operators.robust_aggregate_op(
                weight, client_list, padded_rows, padded_cols, coef_t, mode, reduce, float(trim)
            )
    _check_constant_coef(op, coef)
    coef_t = canonical_coef(op, coef, len(client_list), weight.device)
    return _operators.reconstruct_aggregate_op(weight, client_list, padded_rows, padded_cols, coef_t, mode)


def _check_constant_coef(op: str, coef: object) -> None:
    """The coefficients are constants of the aggregation (sample counts): no gradient flows to them."""
    if isinstance(coef, Tensor) and coef.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: coef requires grad, but the coefficients are constants here; pass coef.detach()")


def _wants_grad(weights: object) -> bool:
    """Whether a whole-model call must record a graph because of its global tensors: grad mode
    on and one of them requiring grad. (The client tensors are asked in the pass over them the
    call makes anyway, :func:`_client_tensors`.)"""
    if not torch.is_grad_enabled():
        return False
    values = weights.values() if isinstance(weights, Mapping) else weights if isinstance(weights, (list, tuple)) else ()
    return any(isinstance(t, Tensor) and t.requires_grad for t in values)


def _check_reduce(op: str, reduce: object, trim: object) -> None:
    if not isinstance(reduce, str):
        raise TypeError(f"{op}: reduce must be a str, got {type(reduce).__name__}")
    if reduce not in REDUCERS:
        raise ValueError(f"{op}: reduce must be one of {REDUCERS}, got {reduce!r}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)):
        raise TypeError(f"{op}: trim must be a number, got {type(trim).__name__}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"{op}: trim must be in [0, 0.5), got {trim!r}")


def _prepare_aggregate(
    op: str, where: str, weight: Tensor, clients: Clients, rows: KeepSets, cols: KeepSets, memo: dict | None = None
) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """Check one tensor's aggregation inputs; return (weight, clients, padded rows, padded cols).

    ``where`` names the tensor in messages of the whole-model op (e.g. ``" for 'conv1.weight'"``).
    Clients come back as a list with one dtype.
    """
    weight = check_floating(op, f"weight{where}", weight)
    if weight.dim() == 0:
        raise ValueError(f"{op}: weight{where} must have at least 1 dim")
    tail = tuple(weight.shape[2:])
    if isinstance(clients, Tensor):
        check_floating(op, f"clients{where}", clients)
        check_same_device(op, f"clients{where}", clients, weight, "weight")
        want = 2 if weight.dim() == 1 else weight.dim() + 1
        if clients.dim() != want or tuple(clients.shape[3:]) != tail:
            expect = "(K, m_rows)" if weight.dim() == 1 else f"(K, m_rows, m_cols, *{tail})"
            raise ValueError(f"{op}: stacked clients{where} must be {expect}, got shape {tuple(clients.shape)}")
        client_list = list(clients.unbind(0))
        stacked = True
    elif isinstance(clients, (list, tuple)):
        client_list = list(clients)
        stacked = False
        for k, c in enumerate(client_list):
            check_floating(op, f"clients[{k}]{where}", c)
            check_same_device(op, f"clients[{k}]{where}", c, weight, "weight")
    else:
        raise TypeError(
            f"{op}: clients must be a sequence of tensors or one stacked tensor, got {type(clients).__name__}"
        )
    K = len(client_list)
    if K == 0:
        raise ValueError(f"{op}: clients is empty; at least one client is needed")
    padded_rows, padded_cols = _weight_keep(op, weight, rows, cols, K, memo)
    if validation_enabled():
        _check_client_shapes(op, where, weight, client_list, rows, cols, padded_rows, padded_cols, stacked)
    if len({c.dtype for c in client_list}) > 1:
        client_list = [c.to(weight.dtype) for c in client_list]
    return weight, client_list, padded_rows, padded_cols


def _subset(arg: object, keys: list, is_mapping: bool, op: str, name: str) -> dict | None:
    """The per-tensor entries of a rows / cols argument for ``keys``, as a dict (None: all absent)."""
    if arg is None:
        return None
    return {key: per_tensor(arg, key, is_mapping, op, name) for key in keys}


def _dtype_groups(weights: object, keys: list, op: str) -> dict[tuple, list]:
    """Tensor keys grouped by (device, dtype), in order."""
    groups: dict[tuple, list] = {}
    for key in keys:
        w = check_floating(op, f"weights[{key!r}]", weights[key])
        groups.setdefault((w.device, w.dtype), []).append(key)
    return groups


def _client_tensors(
    op: str, model: object, k: int, keys: list, layout: RoundLayout, is_mapping: bool, checked: bool = True
) -> tuple[Tensor | list[Tensor], torch.dtype | None, bool]:
    """Client k's part of the op: its packed buffer when ``model`` is a :class:`PackedModel`
    laid out as ``layout`` lays out client k, else its tensors for ``keys`` (checked, unless
    ``checked`` is False: the kernel then checks them); the one dtype of that data (None: its
    tensors mix dtypes; its first tensor's when not ``checked``); and whether grad mode is
    on and some of it requires grad (the call then records a graph instead)."""
    if isinstance(model, PackedModel):
        problem = model.problem()
        if problem is not None:
            raise ValueError(f"{op}: clients[{k}] is a PackedModel: {problem}")
        if model.matches(layout, k, keys if is_mapping else None):
            return model.buffer, model.buffer.dtype, model.buffer.requires_grad and torch.is_grad_enabled()
    try:
        tensors = [model[key] for key in keys]
    except (KeyError, IndexError, TypeError):
        missing = next(key for key in keys if not _has(model, key))
        raise ValueError(f"{op}: clients[{k}] has no tensor {missing!r}") from None
    first = tensors[0].dtype if tensors and isinstance(tensors[0], Tensor) else None
    if not checked:
        try:
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        except AttributeError:  # not a tensor: the checks below word it
            pass
        else:
            return tensors, first, grad
    if validation_enabled():
        device = layout.device
        shapes = layout.compact_shapes(k)
        # One pass over the tensors when all is well (a model has hundreds of them per
        # client); the checks below, with their messages, only when something is not (or
        # when a tensor requires grad: then asked below).
        if first in FLOAT_DTYPES and all(
            isinstance(t, Tensor) and t.dtype == first and t.device == device and t.shape == want
            and not t.requires_grad
            for t, want in zip(tensors, shapes)
        ):  # fmt: skip
            return tensors, first, False
        for key, t, want in zip(keys, tensors, shapes):
            where = f" for {key!r}" if is_mapping else f"[{key}]"
            check_floating(op, f"clients[{k}]{where}", t)
            if t.device != device:
                raise ValueError(f"{op}: clients[{k}]{where} is on {t.device} but weight is on {device}")
            if t.shape != want:
                raise ValueError(f"{op}: clients[{k}]{where} has shape {tuple(t.shape)} but its keep sets give {want}")
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    return tensors, first if all(t.dtype == first for t in tensors) else None, grad


def _aggregate_group(
    op: str, layout: RoundLayout, sub: dict, clients: Sequence, coef: Tensor, mode: str, is_mapping: bool, checked: bool
) -> Tensor | None:
    """One (device, dtype) group of :func:`reconstruct_aggregate_many` on ``layout``: the
    packed results, or None where a client tensor requires grad (in grad mode)."""
    members = list(sub)
    parts = [_client_tensors(op, model, k, members, layout, is_mapping, checked) for k, model in enumerate(clients)]
    if any(grad for *_, grad in parts):
        return None
    per_client = [data for data, _, _ in parts]
    dtypes = {dtype for _, dtype, _ in parts}
    if len(dtypes) > 1 or None in dtypes:  # mixed uploads: one dtype per kernel call, the global's
        wd = sub[members[0]].dtype
        per_client = [c.to(wd) if isinstance(c, Tensor) else [t.to(wd) for t in c] for c in per_client]
    # Tensor lists were checked above (with the state_dict's names in the messages) or are
    # checked by the kernel, the weights made the layout: aggregate_packed need not check
    # the 100s of tensors again.
    lists_only = not any(isinstance(c, Tensor) for c in per_client)
    with validation(validation_enabled() and not lists_only):
        packed, _ = aggregate_packed(layout, list(sub.values()), per_client, coef, mode)
    return packed


def _has(model: object, key: object) -> bool:
    try:
        model[key]
    except (KeyError, IndexError, TypeError):
        return False
    return True


def reconstruct_aggregate_many(
    weights: Sequence[Tensor] | Mapping[str, Tensor],
    clients: Sequence[Sequence[Tensor] | Mapping[str, Tensor]],
    rows: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    cols: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    coef: Sequence[float] | Tensor | None = None,
    *,
    mode: str = "reconstruct",
    reduce: str = "mean",
    trim: float = 0.1,
) -> list[Tensor] | dict[str, Tensor]:
    """Whole-model :func:`reconstruct_aggregate`: many tensors (a state_dict) in a constant number of launches.

    Args:
        weights: N global tensors, a list or a name -> tensor mapping (state_dict).
        clients: K client models; client k is a list aligned with ``weights`` or a
            mapping with the same names, holding its compact tensors, or a
            :class:`~cahfp_ops.layout.PackedModel` (one buffer; read without touching its
            tensors one by one, e.g. what :func:`slice_channels_many` returns).
        rows, cols: per tensor (a list aligned with ``weights`` or a mapping by name;
            a missing entry means all channels), the per-client keep sets exactly as
            :func:`reconstruct_aggregate` takes them.
        coef, mode, reduce, trim: as in :func:`reconstruct_aggregate`, shared by all
            tensors (a robust reducer runs tensor by tensor: one call each).

    Returns:
        New tensors in the container type of ``weights``; entry n equals
        ``reconstruct_aggregate(weights[n], [c[n] for c in clients], rows[n], cols[n], coef, mode=mode)``
        bit for bit. They are views into one packed buffer per (device, dtype) group.

    The keep sets become a :class:`~cahfp_ops.layout.RoundLayout` (one channel group per
    distinct keep-set object) and each dtype group is one kernel call.

    A whole ``state_dict()`` is taken as it is: entries that are not floating (integer or bool,
    e.g. BatchNorm's ``num_batches_tracked``) become the largest of the global value and the
    values of the clients with a positive ``coef`` (every client must send them); rows / cols
    must not name them. When a global or client tensor requires grad (and grad mode is on),
    the call records a graph through the per-tensor operator (differentiable like
    :func:`reconstruct_aggregate`; results are then not views of one buffer).

    Example:
        >>> bn = torch.nn.BatchNorm1d(4)
        >>> sd = bn.state_dict()  # weight, bias, running stats, num_batches_tracked
        >>> keep = [torch.tensor([0, 2]), None]
        >>> rows = {"weight": keep, "bias": keep, "running_mean": keep, "running_var": keep}
        >>> clients = cahfp_ops.slice_channels_many(sd, rows)
        >>> replies = [{k: v + 1 for k, v in c.items()} for c in clients]
        >>> new = cahfp_ops.reconstruct_aggregate_many(sd, replies, rows, coef=[1, 3])
        >>> new["weight"], new["num_batches_tracked"]
        (tensor([2.0000, 1.7500, 2.0000, 1.7500]), tensor(1))
    """
    op = "reconstruct_aggregate_many"
    check_names(op, weights, rows=rows, cols=cols)
    check_mode(op, mode)
    _check_reduce(op, reduce, trim)
    floats, others = _peel_others(op, weights, rows, cols)
    if others:  # a whole state_dict: its integer entries follow the largest-reported rule
        if not isinstance(clients, (list, tuple)) or not clients:
            raise ValueError(f"{op}: clients must be a non-empty sequence of client models")
        counted = (canonical_coef(op, coef, len(clients), torch.device("cpu"), normalised=False) > 0).tolist()
        ints = _entries.largest_reported(op, weights, others, clients, counted)
        new = reconstruct_aggregate_many(floats, clients, rows, cols, coef, mode=mode, reduce=reduce, trim=trim)
        return _entries.merge(list(weights), new, ints)
    if reduce != "mean":
        return _robust_many(weights, clients, rows, cols, coef, mode, reduce, trim)
    # Under torch.compile (the layout is host-side bookkeeping) and when a graph is recorded
    # (the layout ops write into buffers), the per-tensor operator: traceable, differentiable.
    # A client tensor requiring grad is found in the pass over the clients below.
    if torch.compiler.is_compiling() or _wants_grad(weights):
        return _aggregate_many_differentiable(weights, clients, rows, cols, coef, mode)
    keys, is_mapping = named(weights, "weights", op)
    if not isinstance(clients, (list, tuple)) or not clients:
        raise ValueError(f"{op}: clients must be a non-empty sequence of client models")
    K = len(clients)
    results: dict = {}
    for (device, _), members in _dtype_groups(weights, keys, op).items():
        sub = {key: weights[key] for key in members}
        layout = RoundLayout.from_keep_sets(
            sub, _subset(rows, members, is_mapping, op, "rows"), _subset(cols, members, is_mapping, op, "cols"),
            num_clients=K, op=op,
        )  # fmt: skip
        if layout.num_clients != K:
            raise ValueError(f"{op}: the keep sets describe {layout.num_clients} clients but clients holds {K}")
        if is_mapping:
            layout.names = tuple(members)
        coef_t = canonical_coef(op, coef, K, device, normalised=False)  # aggregate_packed normalises them
        # The C++ kernel checks every client tensor's device, dtype and exact shape itself:
        # with it, this pass leaves them unchecked (about 0.3 us of Python per tensor, a
        # ResNet-56 round holds 27,700) and checks them, to word the error (or to cast mixed
        # dtypes), only when the kernel refuses one.
        fast = resolve_backend(device) == "cpp"
        try:
            packed = _aggregate_group(op, layout, sub, clients, coef_t, mode, is_mapping, checked=not fast)
        except (RuntimeError, TypeError, ValueError):
            if not fast:
                raise
            packed = _aggregate_group(op, layout, sub, clients, coef_t, mode, is_mapping, checked=True)
        if packed is None:  # a client tensor requires grad: record a graph instead
            return _aggregate_many_differentiable(weights, clients, rows, cols, coef, mode)
        for key, part in zip(members, packed_views(packed, [tuple(sub[key].shape) for key in members])):
            results[key] = part
    out = [results[key] for key in keys]
    return dict(zip(keys, out)) if is_mapping else out


def slice_channels_many(
    weights: Sequence[Tensor] | Mapping[str, Tensor],
    rows: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    cols: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    *,
    num_clients: int | None = None,
) -> list[list[Tensor]] | list[Mapping[str, Tensor]]:
    """Whole-model :func:`slice_channels`: every client's compact model in a constant number of launches.

    Args:
        weights: N global tensors, a list or a name -> tensor mapping (state_dict).
        rows, cols: per tensor (list aligned with ``weights`` or mapping by name; a
            missing entry means all channels), per-client keep sets as
            :func:`slice_channels` takes them.
        num_clients: K, needed only when no entry is per-client.

    Returns:
        K client models (client-major). For a mapping of one dtype: K
        :class:`~cahfp_ops.layout.PackedModel` (a read-only mapping; client k's tensors are
        views into one contiguous buffer, ``model.buffer``); for several dtypes, K dicts
        of views; for a list, K lists of views. Buffers lie client after client.

    A whole ``state_dict()`` is taken as it is: entries that are not floating (integer or bool,
    e.g. ``num_batches_tracked``) are copied to every client (a PackedModel holds them in its
    ``extras``); rows / cols must not name them. When a global tensor requires grad (and grad
    mode is on), the call records a graph through the per-tensor operator: K dicts (or lists)
    of differentiable views.

    Example:
        >>> sd = torch.nn.Linear(3, 4).state_dict()
        >>> keep = [torch.tensor([1, 3]), torch.tensor([0])]
        >>> models = cahfp_ops.slice_channels_many(sd, {"weight": keep, "bias": keep})
        >>> [tuple(m["weight"].shape) for m in models]
        [(2, 3), (1, 3)]
    """
    op = "slice_channels_many"
    check_names(op, weights, rows=rows, cols=cols)
    floats, others = _peel_others(op, weights, rows, cols)
    if others:  # a whole state_dict: every client gets its own copy of the integer entries
        if not floats:
            K = keep_set_entries(op, weights, rows, cols, num_clients)[3]
            return _entries.copies(weights, others, K)
        models = slice_channels_many(floats, rows, cols, num_clients=num_clients)
        extras = _entries.copies(weights, others, len(models))
        if isinstance(models[0], PackedModel):
            return [PackedModel(m.buffer, m.layout, m.client, extras=x) for m, x in zip(models, extras)]
        return [_entries.merge(list(weights), m, x) for m, x in zip(models, extras)]
    if torch.compiler.is_compiling() or _wants_grad(weights):  # traceable, differentiable (as above)
        return _slice_many_per_tensor(weights, rows, cols, num_clients=num_clients)
    keys, is_mapping, _, K = keep_set_entries(op, weights, rows, cols, num_clients)  # K from every entry
    if num_clients is None:
        num_clients = K
    groups = _dtype_groups(weights, keys, op)
    models: list[dict] | None = None
    packed_models: list[PackedModel] = []
    for (_, _), members in groups.items():
        sub = {key: weights[key] for key in members}
        layout = RoundLayout.from_keep_sets(
            sub, _subset(rows, members, is_mapping, op, "rows"), _subset(cols, members, is_mapping, op, "cols"),
            num_clients=num_clients, op=op,
        )  # fmt: skip
        if num_clients is not None and layout.num_clients != num_clients:
            raise ValueError(f"{op}: the keep sets describe {layout.num_clients} clients, num_clients is {num_clients}")
        num_clients = layout.num_clients
        buffers = slice_packed(layout, list(sub.values()))
        if is_mapping and len(groups) == 1:
            layout.names = tuple(members)
            packed_models = [PackedModel(b, layout, k) for k, b in enumerate(buffers)]
            break
        if models is None:
            models = [{} for _ in range(layout.num_clients)]
        for k, b in enumerate(buffers):
            models[k].update(zip(members, packed_views(b, layout.compact_shapes(k), b.storage_offset())))
    if packed_models:
        return packed_models
    assert models is not None
    if is_mapping:
        return [{key: m[key] for key in keys} for m in models]
    return [[m[key] for key in keys] for m in models]


def _aggregate_many_differentiable(weights, clients, rows, cols, coef, mode: str):
    """The per-tensor operator (traceable under ``torch.compile``, differentiable), the
    coefficients held constant."""
    _check_constant_coef("reconstruct_aggregate_many", coef)
    return _aggregate_many_per_tensor(weights, clients, rows, cols, coef, mode=mode)


def _peel_others(op: str, weights: object, rows: object, cols: object) -> tuple[object, list]:
    """A state_dict's floating entries (a new dict) and the names of its other entries; a list
    of tensors, or a mapping of floating tensors only, comes back as it is, with no others."""
    if not isinstance(weights, Mapping):
        return weights, []
    float_keys, others = _entries.split_keys(op, weights, rows=rows, cols=cols)
    if not others:
        return weights, []
    return {key: weights[key] for key in float_keys}, others


def _aggregate_many_per_tensor(
    weights: Sequence[Tensor] | Mapping[str, Tensor],
    clients: Sequence[Sequence[Tensor] | Mapping[str, Tensor]],
    rows: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    cols: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    coef: Sequence[float] | Tensor | None = None,
    *,
    mode: str = "reconstruct",
) -> list[Tensor] | dict[str, Tensor]:
    """The per-tensor form (what ``torch.compile`` traces): canonical keep sets tensor by tensor."""
    op = "reconstruct_aggregate_many"
    keys, is_mapping = named(weights, "weights", op)
    if not isinstance(clients, (list, tuple)) or not clients:
        raise ValueError(f"{op}: clients must be a non-empty sequence of client models")
    K = len(clients)
    prepared = []
    memo: dict = {}
    for key in keys:
        where = f" for {key!r}" if is_mapping else f"[{key}]"
        per_client = _client_entries(op, clients, key)
        prepared.append(
            _prepare_aggregate(
                op,
                where,
                weights[key],
                per_client,
                per_tensor(rows, key, is_mapping, op, "rows"),
                per_tensor(cols, key, is_mapping, op, "cols"),
                memo,
            )
        )
    results: dict[int, Tensor] = {}
    groups: dict[tuple, list[int]] = {}
    for n, (w, cl, _, _) in enumerate(prepared):
        groups.setdefault((w.device, w.dtype, cl[0].dtype), []).append(n)
    for (device, _, _), members in groups.items():
        coef_t = canonical_coef(op, coef, K, device)
        packed = _operators.reconstruct_aggregate_many_op(
            [prepared[n][0] for n in members],
            [c for n in members for c in prepared[n][1]],
            [prepared[n][2] for n in members],
            [prepared[n][3] for n in members],
            coef_t,
            mode,
        )
        for n, part in zip(members, packed_views(packed, [tuple(prepared[n][0].shape) for n in members])):
            results[n] = part
    out = [results[n] for n in range(len(keys))]
    return dict(zip(keys, out)) if is_mapping else out


def _client_entries(op: str, clients: Sequence, key: object) -> list[Tensor]:
    """Every client model's tensor ``key`` (a ValueError naming the client that lacks it)."""
    out = []
    for k, model in enumerate(clients):
        try:
            out.append(model[key])
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{op}: clients[{k}] has no tensor {key!r}") from None
    return out


def _robust_many(weights, clients, rows, cols, coef, mode: str, reduce: str, trim: float):
    """A robust reducer on a whole model: :func:`reconstruct_aggregate` tensor by tensor."""
    op = "reconstruct_aggregate_many"
    keys, is_mapping = named(weights, "weights", op)
    if not isinstance(clients, (list, tuple)) or not clients:
        raise ValueError(f"{op}: clients must be a non-empty sequence of client models")
    out = []
    for key in keys:
        per_client = _client_entries(op, clients, key)
        r = per_tensor(rows, key, is_mapping, op, "rows")
        c = per_tensor(cols, key, is_mapping, op, "cols")
        out.append(reconstruct_aggregate(weights[key], per_client, r, c, coef, mode=mode, reduce=reduce, trim=trim))
    return dict(zip(keys, out)) if is_mapping else out


def _slice_many_per_tensor(
    weights: Sequence[Tensor] | Mapping[str, Tensor],
    rows: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    cols: Sequence[KeepSets] | Mapping[str, KeepSets] | None = None,
    *,
    num_clients: int | None = None,
) -> list[list[Tensor]] | list[dict[str, Tensor]]:
    """The per-tensor form (what ``torch.compile`` traces): canonical keep sets tensor by tensor."""
    op = "slice_channels_many"
    keys, is_mapping, entries, K = keep_set_entries(op, weights, rows, cols, num_clients)
    canon = []
    memo: dict = {}
    for key, r, c in entries:
        w = check_floating(op, f"weights[{key!r}]", weights[key])
        pr, pc = _weight_keep(op, w, r, c, K, memo)
        rc = kept_counts(r, pr) if is_per_client(r) else [pr.shape[1]] * K
        cc = [1] * K if w.dim() == 1 else (kept_counts(c, pc) if is_per_client(c) else [pc.shape[1]] * K)
        canon.append((w, pr, pc, rc, cc))
    models: list[dict] = [{} for _ in range(K)]
    groups: dict[tuple, list[int]] = {}
    for n, (w, *_rest) in enumerate(canon):
        groups.setdefault((w.device, w.dtype), []).append(n)
    for members in groups.values():
        packed = _operators.slice_channels_many_op(
            [canon[n][0] for n in members],
            [canon[n][1] for n in members],
            [canon[n][2] for n in members],
            [x for n in members for x in canon[n][3]],
            [x for n in members for x in canon[n][4]],
        )
        where, shapes = [], []
        for k in range(K):
            for n in members:
                w, _, _, rc, cc = canon[n]
                where.append((k, n))
                shapes.append((rc[k],) if w.dim() == 1 else (rc[k], cc[k], *w.shape[2:]))
        for (k, n), part in zip(where, packed_views(packed, shapes)):
            models[k][n] = part
    if is_mapping:
        return [{key: m[n] for n, key in enumerate(keys)} for m in models]
    return [[m[n] for n in range(len(keys))] for m in models]


def _check_client_shapes(
    op: str,
    where: str,
    weight: Tensor,
    clients: list[Tensor],
    rows: KeepSets,
    cols: KeepSets,
    padded_rows: Tensor,
    padded_cols: Tensor,
    stacked: bool,
) -> None:
    """Client k must be (rows_k, cols_k, *tail) (stacked: at least that large)."""
    row_counts = kept_counts(rows, padded_rows)
    col_counts = [1] * len(clients) if weight.dim() == 1 else kept_counts(cols, padded_cols)
    tail = tuple(weight.shape[2:])
    for k, (c, r, cc) in enumerate(zip(clients, row_counts, col_counts)):
        want = (r,) if weight.dim() == 1 else (r, cc, *tail)
        shape = tuple(c.shape)
        if stacked:
            ok = len(shape) == len(want) and all(s >= w for s, w in zip(shape, want)) and shape[2:] == want[2:]
            if not ok:
                raise ValueError(
                    f"{op}: stacked clients[{k}]{where} has shape {shape}, too small for its keep sets {want}"
                )
        elif shape != want:
            raise ValueError(f"{op}: clients[{k}]{where} has shape {shape} but its keep sets give {want}")
