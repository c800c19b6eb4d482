"""Checking client replies before they touch the global model.

:func:`check_reply` says why a reply cannot be used (wrong container, missing or unknown
tensors, wrong shape or kind, meta tensors, non-finite values), or returns None;
:func:`check_weight` does the same for the client's aggregation weight. Each reason names the
client. A reply is untrusted input: nothing here raises on what a client sent.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping

import torch
from torch import Tensor

from cahfp_ops import PackedModel, PackedScalars


def check_reply(cid: Hashable, expected: Mapping[str, Tensor], update: object, *, finite: bool = True) -> str | None:
    """Why client ``cid``'s reply ``update`` does not match its compact state ``expected``, or None.

    ``finite=False`` leaves the values unread (the server checks finiteness in the same pass
    as its aggregation kernel). A :class:`~cahfp_ops.layout.PackedModel` laid out as
    ``expected`` is checked as one buffer; one whose buffer does not fit its own layout
    (:meth:`~cahfp_ops.PackedModel.problem`) is rejected before any view of it is made.
    """
    if isinstance(update, PackedModel):
        problem = update.problem()  # a replaced buffer (short, long, reshaped, another kind): no views of it
        if problem is not None:
            return f"client {cid!r}: packed reply: {problem}"
    if isinstance(update, PackedModel) and isinstance(expected, PackedModel):
        if update.matches(expected.layout, expected.client, expected.names) and set(update.extras) == set(
            expected.extras
        ):
            if update.buffer.is_floating_point() and update.buffer.device == expected.buffer.device and (
                not finite or bool(torch.isfinite(update.buffer.to(expected.buffer.dtype)).all())
            ):
                return _extras_problem(cid, expected.extras, update.extras, finite)
    if not isinstance(update, Mapping):
        return f"client {cid!r} sent a {type(update).__name__}, not a state_dict"
    missing = [k for k in expected if k not in update]
    if missing:
        return f"client {cid!r} is missing {len(missing)} tensors, e.g. {missing[0]!r}"
    extra = [k for k in update if k not in expected]
    if extra:
        return f"client {cid!r} sent unknown tensors, e.g. {extra[0]!r}"
    return _entries_problem(cid, expected, update, finite)


def _entries_problem(cid: Hashable, expected: Mapping[str, Tensor], update: Mapping[str, Tensor],
                     finite: bool) -> str | None:  # fmt: skip
    """The first problem of ``update``'s entries against ``expected``'s (names checked before)."""
    for k, ref in expected.items():
        problem = _entry_problem(cid, k, update[k], ref, finite)
        if problem:
            return problem
    return None


def _entry_problem(cid: Hashable, k: str, t: object, ref: Tensor, finite: bool) -> str | None:
    """Why entry ``k`` of a reply, ``t``, cannot stand for ``ref``, or None."""
    if not isinstance(t, Tensor):
        return f"client {cid!r}: {k!r} is not a tensor"
    if tuple(t.shape) != tuple(ref.shape):
        return f"client {cid!r}: {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
    if t.is_floating_point() != ref.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        return f"client {cid!r}: {k!r} has dtype {t.dtype}, expected {ref.dtype}"
    if t.device.type == "meta":
        return f"client {cid!r}: {k!r} is on the meta device (it has no data)"
    if finite and t.is_floating_point() and not bool(torch.isfinite(t.to(ref.dtype)).all()):
        return f"client {cid!r}: {k!r} holds non-finite values"
    return None


def _extras_problem(cid: Hashable, expected: Mapping[str, Tensor], update: Mapping[str, Tensor],
                    finite: bool) -> str | None:  # fmt: skip
    """The unpacked entries of a packed reply (same names as ``expected``'s, checked before),
    checked entry by entry; scalars packed on both sides as one tensor."""
    if isinstance(update, PackedScalars) and isinstance(expected, PackedScalars) and update.names == expected.names:
        return _entry_problem(cid, "its packed scalars", update.values, expected.values, finite)
    return _entries_problem(cid, expected, update, finite)


def check_weight(cid: Hashable, weights: Mapping[Hashable, object] | None) -> tuple[str | None, float | None]:
    """``(reason, None)`` when client ``cid``'s aggregation weight cannot be used, else
    ``(None, weight)`` as a float (no weights given: 1.0 for everyone).

    A weight is a finite real number >= 0: an int, a float, a NumPy scalar or a one-element
    real tensor; a bool, a string, None, NaN, an infinity or a negative number is rejected.
    """
    if weights is None:
        return None, 1.0
    if cid not in weights:
        return f"client {cid!r} has no weight", None
    w = weights[cid]
    if isinstance(w, torch.Tensor):
        if w.numel() != 1 or w.dtype == torch.bool or w.is_complex() or w.device.type == "meta":
            return f"client {cid!r} has a weight that is not one real number ({w.dtype}, shape {tuple(w.shape)})", None
        w = w.item()
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        return f"client {cid!r} has a weight of type {type(w).__name__}, not a number", None
    value = float(w)
    if not math.isfinite(value) or value < 0:
        return f"client {cid!r} has weight {value!r}; it must be a finite number >= 0", None
    return None, value
