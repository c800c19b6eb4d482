"""Argument checks of the per-round layout ops (SPEC, "Bad input").

Each check raises :class:`ValueError` (:class:`TypeError` for a wrong type,
:class:`~cahfp_ops.DTypeError` for a wrong dtype) whose message starts with the function's
name and names the argument and, where it applies, the client index; nothing is modified
before they run. They read shapes, dtypes and devices only (O(K + N) host work for packed
clients, one comparison per tensor for clients sent as separate tensors, one host sync for a
coefficient tensor's values): the fast path stays fast. A layout's own shapes are what the
arguments are checked against; the kernels still bound-check every table entry, with
validation on or off.

:func:`client_problem` says what is wrong with one client's data without raising, so that
the server layer can reject an untrusted upload with that reason instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ._dtypes import FLOAT_DTYPES, DTypeError
from ._inputs import check_floating


class RoundLayout(Protocol):
    """What these checks read of a :class:`cahfp_ops.layout.RoundLayout` (which imports this
    module, so it is named here by its shape)."""

    num_clients: int
    num_tensors: int
    shapes: list[tuple[int, ...]]
    names: list | None
    numels: np.ndarray

    def compact_shapes(self, k: int) -> list[tuple[int, ...]]: ...


def _tensor_name(layout: RoundLayout, n: int) -> str:
    """How messages name tensor n: its index, and its name when the layout has names."""
    return f"[{n}] ({layout.names[n]!r})" if layout.names is not None else f"[{n}]"


def check_weights(op: str, layout: RoundLayout, weights: object) -> Tensor:
    """``weights``: a list of the layout's N full tensors, floating, of one dtype and device,
    each shaped as the layout says. Returns ``weights[0]``."""
    N = layout.num_tensors
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{op}: weights must be a list of the layout's {N} tensors, got {type(weights).__name__}")
    if len(weights) != N:
        raise ValueError(f"{op}: {len(weights)} weights for a layout of {N} tensors")
    ref = check_floating(op, "weights[0]", weights[0])
    if all(
        isinstance(w, Tensor) and w.dtype == ref.dtype and w.device == ref.device and w.shape == s
        for w, s in zip(weights, layout.shapes)
    ):
        return ref
    for n, (w, s) in enumerate(zip(weights, layout.shapes)):
        where = f"weights{_tensor_name(layout, n)}"
        check_floating(op, where, w)
        if w.dtype != ref.dtype:
            raise DTypeError(f"{op}: {where} is {w.dtype} but weights[0] is {ref.dtype}; one call takes one dtype")
        if w.device != ref.device:
            raise ValueError(f"{op}: {where} is on {w.device} but weights[0] is on {ref.device}")
        if tuple(w.shape) != tuple(s):
            raise ValueError(f"{op}: {where} has shape {tuple(w.shape)} but the layout says {tuple(s)}")
    return ref


def client_problem(
    layout: RoundLayout, k: int, data: object, device: torch.device, dtype: torch.dtype | None = None
) -> str | None:
    """What is wrong with ``data`` as client k's upload on ``layout``, or None.

    ``data``: one packed 1-D buffer of ``layout.numels[k]`` elements (its tensors end to end)
    or a list of its N compact tensors, shaped ``layout.compact_shapes(k)``; floating, on
    ``device``, and of ``dtype`` when given (one kernel call reads one client dtype). The
    reason is a phrase to follow the client's name ("has shape ...", "[3] is ...").
    """
    issue = _client_issue(layout, k, data, device, dtype)
    return None if issue is None else issue[1]


def _client_issue(
    layout: RoundLayout, k: int, data: object, device: torch.device, dtype: torch.dtype | None
) -> tuple[type[Exception], str] | None:
    """:func:`client_problem` with the exception class its reason calls for."""
    if isinstance(data, Tensor):
        want = int(layout.numels[k])
        if data.dtype not in FLOAT_DTYPES:
            return DTypeError, f"is a {data.dtype} buffer; client data must be floating"
        if data.device.type == "meta":
            return ValueError, "is on the meta device (it has no data)"
        if data.device != device:
            return ValueError, f"is on {data.device} but the weights are on {device}"
        if data.dim() != 1 or data.numel() != want:
            return ValueError, f"has shape {tuple(data.shape)}, but the layout packs client {k} into ({want},)"
        if dtype is not None and data.dtype != dtype:
            return DTypeError, f"is {data.dtype} but the other clients' data is {dtype} (one call reads one dtype)"
        return None
    N = layout.num_tensors
    if not isinstance(data, (list, tuple)):
        return TypeError, f"must be a packed buffer or a list of the layout's {N} tensors, got {type(data).__name__}"
    if len(data) != N:
        return ValueError, f"holds {len(data)} tensors but the layout has {N}"
    shapes = layout.compact_shapes(k)
    first = data[0].dtype if N and isinstance(data[0], Tensor) else None
    want_dtype = dtype if dtype is not None else first
    if want_dtype in FLOAT_DTYPES and all(
        isinstance(t, Tensor) and t.dtype == want_dtype and t.device == device and t.shape == s
        for t, s in zip(data, shapes)
    ):
        return None
    for n, (t, s) in enumerate(zip(data, shapes)):
        where = _tensor_name(layout, n)
        if not isinstance(t, Tensor):
            return TypeError, f"{where} is a {type(t).__name__}, not a tensor"
        if t.dtype not in FLOAT_DTYPES:
            return DTypeError, f"{where} is {t.dtype}; client data must be floating"
        if t.device.type == "meta":
            return ValueError, f"{where} is on the meta device (it has no data)"
        if t.device != device:
            return ValueError, f"{where} is on {t.device} but the weights are on {device}"
        if tuple(t.shape) != tuple(s):
            return ValueError, f"{where} has shape {tuple(t.shape)} but the layout gives client {k} {tuple(s)}"
        if t.dtype != want_dtype:
            return DTypeError, f"{where} is {t.dtype} but the client data is {want_dtype} (one call reads one dtype)"
    return None


def check_clients(op: str, layout: RoundLayout, clients: object, device: torch.device, name: str = "clients") -> None:
    """``clients``: one entry per client of the layout, each as :func:`client_problem` wants
    it, all of one floating dtype (the first client's)."""
    K = layout.num_clients
    if not isinstance(clients, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of {K} client buffers or tensor lists, "
                        f"got {type(clients).__name__}")  # fmt: skip
    if len(clients) != K:
        raise ValueError(f"{op}: {len(clients)} {name} for a layout of {K}")
    dtype = None
    for k, data in enumerate(clients):
        issue = _client_issue(layout, k, data, device, dtype)
        if issue is not None:
            where = name if name == "client" else f"{name}[{k}]"  # accumulate_packed takes one client
            raise issue[0](f"{op}: {where}{'' if issue[1].startswith('[') else ' '}{issue[1]}")
        if dtype is None:
            dtype = data.dtype if isinstance(data, Tensor) else (data[0].dtype if len(data) else None)


def check_coef(op: str, coef: object, K: int, device: torch.device, *, positive_sum: bool) -> None:
    """``coef``: a ``(K,)`` float64 tensor on ``device``, finite and >= 0 (the one convention
    of the layout ops: weights as given); ``positive_sum``: their sum must be > 0 (an
    aggregation normalises by it), else any sum (0 included: a fold that adds nothing)."""
    if not isinstance(coef, Tensor):
        raise TypeError(f"{op}: coef must be a ({K},) float64 tensor, got {type(coef).__name__}")
    if coef.dtype != torch.float64:
        raise DTypeError(f"{op}: coef must be float64, got {coef.dtype}")
    if coef.shape != (K,):
        raise ValueError(f"{op}: coef must hold {K} values (one per client), got shape {tuple(coef.shape)}")
    if coef.device != device:
        raise ValueError(f"{op}: coef is on {coef.device} but the weights are on {device}")
    if K == 0:
        return
    ok, total = torch.stack([(torch.isfinite(coef) & (coef >= 0)).all().double(), coef.sum()]).tolist()  # one sync
    if not ok:
        bad = ~(torch.isfinite(coef) & (coef >= 0))
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: coef[{k}] = {float(coef[k])} is negative or not finite")
    if positive_sum and not total > 0:
        raise ValueError(f"{op}: coef sums to zero; at least one client needs a positive weight")


def check_buffer(op: str, name: str, t: object, numel: int, dtype: torch.dtype, device: torch.device) -> None:
    """An output or partial-sum buffer: a contiguous ``(numel,)`` tensor of ``dtype`` on ``device``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != (numel,) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be a contiguous ({numel},) {dtype} tensor on {device}, "
            f"got {tuple(t.shape)} {t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}"
        )


def check_number(op: str, name: str, x: object, *, finite: bool = True) -> float:
    """A real number >= 0 (not a bool): finite, or with ``finite=False`` +inf too."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {type(x).__name__}")
    value = float(x)
    if math.isnan(value) or value < 0 or (finite and math.isinf(value)):
        raise ValueError(f"{op}: {name} must be a {'finite ' if finite else ''}number >= 0, got {x!r}")
    return value


def check_specs(
    op: str,
    shapes: Sequence[Sequence[int]],
    rows: Sequence[object],
    cols: Sequence[object],
    group_sizes: Sequence[int],
    names: Sequence | None,
) -> None:
    """A layout's structure: N shapes of at least one dim, per tensor a channel group
    (a ``cahfp_ops.layout.DimSpec``) or None for dim 0 (``rows``) and dim 1 or the dim it
    names (``cols``, ignored for a 1-D tensor), each group index among the G groups; a
    ``(group, block)`` dim is exactly ``group_sizes[g] * block`` long (channel c owns
    ``[c * block, (c + 1) * block)``), a ``(group, block, offset, copies)`` dim is ``copies``
    whole stretches of blocks of channels inside the group."""
    for what, seq in (("shapes", shapes), ("rows", rows), ("cols", cols), ("group_sizes", group_sizes)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {what} must be a sequence, got {type(seq).__name__}")
    N, G = len(shapes), len(group_sizes)
    if len(rows) != N or len(cols) != N:
        raise ValueError(f"{op}: rows and cols need one entry per tensor ({N}), got {len(rows)} and {len(cols)}")
    if names is not None and len(names) != N:
        raise ValueError(f"{op}: {len(names)} names for {N} tensors")
    for g, size in enumerate(group_sizes):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"{op}: group_sizes[{g}] must be an int >= 0, got {size!r}")
    for n, shape in enumerate(shapes):
        if (
            not isinstance(shape, (list, tuple, torch.Size)) or len(shape) == 0
            or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0 for d in shape)
        ):  # fmt: skip
            raise ValueError(f"{op}: shapes[{n}] must be a tensor shape of at least one dim, got {shape!r}")
        for dim, spec in ((0, rows[n]), (1, cols[n])):
            if spec is None or (dim == 1 and len(shape) == 1):
                continue
            what = f"{'rows' if dim == 0 else 'cols'}[{n}]"
            lengths = (2, 4, 5) if dim == 1 else (2, 4)
            if (
                not isinstance(spec, (list, tuple)) or len(spec) not in lengths
                or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in spec)
            ):  # fmt: skip
                form = "(group, block) or (group, block, offset, copies" + (", dim)" if dim else ")")
                raise TypeError(f"{op}: {what} must be None or {form} of ints, got {spec!r}")
            g, block = int(spec[0]), int(spec[1])
            if not 0 <= g < G:
                raise ValueError(f"{op}: {what} names group {g}, but there are {G} groups")
            if block < 1:
                raise ValueError(f"{op}: {what} has block {block}; a block is at least 1")
            at = dim
            if len(spec) == 5:
                at = int(spec[4])
                if not 1 <= at < len(shape):
                    raise ValueError(f"{op}: {what} prunes dim {at} of shapes[{n}] {tuple(shape)}")
                if at >= 2 and rows[n] is not None:
                    raise ValueError(f"{op}: {what} prunes dim {at}, so rows[{n}] must be None")
            if len(spec) == 2:
                if shape[at] != group_sizes[g] * block:
                    raise ValueError(
                        f"{op}: {what}: dim {at} of shapes[{n}] {tuple(shape)} has {shape[at]} entries, but group "
                        f"{g} of {group_sizes[g]} channels in blocks of {block} covers {group_sizes[g] * block}"
                    )
                continue
            offset, copies = int(spec[2]), int(spec[3])
            channels, rest = divmod(shape[at], block * copies) if copies >= 1 else (0, 1)
            if copies < 1 or rest or offset < 0 or offset + channels > group_sizes[g]:
                raise ValueError(
                    f"{op}: {what}: dim {at} of shapes[{n}] {tuple(shape)} has {shape[at]} entries, which are not "
                    f"{copies} copies of channels [{offset}, ...) of group {g} ({group_sizes[g]} channels) "
                    f"in blocks of {block}"
                )
