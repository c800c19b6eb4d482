"""The packed wire form shared by the framework integrations.

A client's floating compact tensors travel as **one 1-D array** (the tensors flattened end to
end, in the global model's order), with integer entries (``num_batches_tracked``) as arrays of
their own; the names of the packed tensors and their shapes go alongside (shapes flattened:
per tensor its number of dims, then the dims). This module holds the packing and unpacking;
each integration decides where the array, names and shapes sit in its own messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..layout import PackedModel


def packed_parts(model: PackedModel) -> tuple[Tensor, dict[str, Tensor], list[str], list[int]]:
    """``(buffer, extras, names, dims)`` of an assignment's packed model: the 1-D buffer, the
    unpacked entries, the packed tensors' names and their flattened shapes."""
    shapes = model.layout.compact_shapes(model.client)
    dims = [d for shape in shapes for d in (len(shape), *shape)]
    return model.buffer, dict(model.extras), [str(n) for n in model.names], dims


def unpack(buffer: Tensor, names: Sequence[str], dims: Sequence[int]) -> dict[str, Tensor]:
    """The named tensors of a packed buffer (views of it). Raises ValueError when the buffer,
    names and flattened shapes do not fit together."""
    shapes, i = [], 0
    dims = [int(d) for d in dims]
    while i < len(dims):
        n = dims[i]
        if n < 0 or i + 1 + n > len(dims):
            raise ValueError("the packed shapes are malformed")
        shapes.append(tuple(dims[i + 1 : i + 1 + n]))
        i += 1 + n
    sizes = [math.prod(s) for s in shapes]
    if len(shapes) != len(names) or buffer.dim() != 1 or sum(sizes) != buffer.numel():
        raise ValueError(f"the packed arrays do not match their {len(names)} names and shapes")
    return {str(n): part.view(s) for n, part, s in zip(names, torch.split(buffer, sizes), shapes)}


def pack(state: Mapping[str, Tensor], names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """``(buffer, rest)``: the tensors ``names`` of ``state`` flattened end to end in that
    order (detached), and the entries not packed."""
    buffer = torch.cat([state[n].detach().reshape(-1) for n in names])
    packed = set(names)
    return buffer, {k: v for k, v in state.items() if k not in packed}


def as_packed(buffer: Tensor, assigned: PackedModel, extras: Mapping[str, Tensor]) -> PackedModel:
    """A packed reply laid out as its assignment, so the server reads it as one buffer.
    Raises ValueError when the buffer does not have the assignment's size."""
    return PackedModel(buffer, assigned.layout, assigned.client, assigned.names, extras=extras)
