"""Checking client replies before they touch the global model.

:func:`check_reply` says why a reply cannot be used (wrong container, missing or unknown
tensors, wrong shape or kind, non-finite values), or returns None; :func:`check_weight` does
the same for the client's aggregation weight. Each reason names the client.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from torch import Tensor

from cahfp_ops import PackedModel


def check_reply(cid: Hashable, expected: Mapping[str, Tensor], update: object, *, finite: bool = True) -> str | None:
    """Why client ``cid``'s reply ``update`` does not match its compact state ``expected``, or None.

    ``finite=False`` leaves the values unread (the server checks finiteness in the same pass
    as its aggregation kernel). A :class:`~cahfp_ops.layout.PackedModel` laid out as
    ``expected`` is checked as one buffer.
    """
    if isinstance(update, PackedModel) and isinstance(expected, PackedModel):
        if update.matches(expected.layout, expected.client, expected.names) and set(update.extras) == set(
            expected.extras
        ):
            if update.buffer.is_floating_point() and (
                not finite or bool(torch.isfinite(update.buffer.to(expected.buffer.dtype)).all())
            ):
                return None
    if not isinstance(update, Mapping):
        return f"client {cid!r} sent a {type(update).__name__}, not a state_dict"
    missing = [k for k in expected if k not in update]
    if missing:
        return f"client {cid!r} is missing {len(missing)} tensors, e.g. {missing[0]!r}"
    extra = [k for k in update if k not in expected]
    if extra:
        return f"client {cid!r} sent unknown tensors, e.g. {extra[0]!r}"
    for k, ref in expected.items():
        t = update[k]
        if not isinstance(t, Tensor):
            return f"client {cid!r}: {k!r} is not a tensor"
        if tuple(t.shape) != tuple(ref.shape):
            return f"client {cid!r}: {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if t.is_floating_point() != ref.is_floating_point():
            return f"client {cid!r}: {k!r} has dtype {t.dtype}, expected {ref.dtype}"
        if finite and t.is_floating_point() and not bool(torch.isfinite(t.to(ref.dtype)).all()):
            return f"client {cid!r}: {k!r} holds non-finite values"
    return None


def check_weight(cid: Hashable, weights: Mapping[Hashable, float] | None) -> str | None:
    """Why client ``cid``'s aggregation weight cannot be used, or None (no weights: all equal)."""
    if weights is None:
        return None
    if not float(weights.get(cid, 0.0)) >= 0:
        return f"client {cid!r} has a negative or missing weight"
    return None
