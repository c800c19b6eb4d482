"""The non-floating entries of a whole state_dict (``num_batches_tracked`` and the like).

The whole-model ops take a model's ``state_dict()`` as it is. Its floating entries are sliced
and aggregated by the kernels; every other entry (integer or bool tensors) is not a channel
tensor and is handled here, by one rule each:

* slicing (:func:`copies`): every client gets its own copy of the global value;
* aggregation (:func:`largest_reported`): the new value is the largest of the global value
  and the values reported by the clients with a positive coefficient (the server's rule for
  ``num_batches_tracked``: a count of batches seen, never lowered by a client that saw fewer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._dtypes import DTypeError
from ._validation import validation_enabled


def is_other(value: object) -> bool:
    """True for an entry the kernels do not compute on: an integer or bool tensor."""
    return (
        isinstance(value, Tensor)
        and not value.is_floating_point()
        and not value.is_complex()
        and value.device.type != "meta"
    )


def split_keys(op: str, weights: Mapping, **keep_sets: object) -> tuple[list, list]:
    """A state_dict's names split into (floating entries, other entries), in order. A rows /
    cols mapping giving keep sets for an other entry is a ValueError: only floating entries
    hold channels."""
    keys = list(weights)
    others = [key for key in keys if is_other(weights[key])]
    if not others:
        return keys, []
    for name, arg in keep_sets.items():
        bad = [key for key in others if isinstance(arg, Mapping) and arg.get(key) is not None]
        if bad:
            raise ValueError(
                f"{op}: {name} gives keep sets for {bad[0]!r}, a {weights[bad[0]].dtype} entry; only floating "
                "entries hold channels (integer entries such as num_batches_tracked are copied / "
                "aggregated whole): drop it from " + name
            )
    other_set = set(others)
    return [key for key in keys if key not in other_set], others


def copies(weights: object, others: list, num_clients: int) -> list[dict]:
    """Per client, its own copy of every other entry."""
    return [{key: weights[key].clone() for key in others} for _ in range(num_clients)]


def largest_reported(
    op: str, weights: object, others: list, clients: Sequence, counted: Sequence[bool]
) -> dict:
    """The new value of every other entry: the largest of the global value and the values of
    the clients with ``counted[k]`` (a positive coefficient). Each client must hold each
    entry as a non-floating tensor of the global's shape."""
    out = {}
    for key in others:
        current = weights[key]
        reported = []
        for k, model in enumerate(clients):
            try:
                value = model[key]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"{op}: clients[{k}] has no entry {key!r}") from None
            if validation_enabled():
                if not isinstance(value, Tensor):
                    raise TypeError(f"{op}: clients[{k}][{key!r}] must be a torch.Tensor, got {type(value).__name__}")
                if not is_other(value):
                    raise DTypeError(
                        f"{op}: clients[{k}][{key!r}] must be an integer or bool tensor like the global "
                        f"{current.dtype} entry, got {value.dtype}"
                    )
                if value.shape != current.shape:
                    raise ValueError(
                        f"{op}: clients[{k}][{key!r}] has shape {tuple(value.shape)}, the global entry "
                        f"{tuple(current.shape)}"
                    )
            if counted[k]:
                reported.append(value.to(device=current.device, dtype=current.dtype))
        out[key] = torch.stack([current, *reported]).amax(0) if reported else current.clone()
    return out


def merge(keys: list, *parts: Mapping) -> dict:
    """One dict in the order of ``keys`` from several dicts that together hold every key."""
    out = {}
    for key in keys:
        for part in parts:
            if key in part:
                out[key] = part[key]
                break
    return out
