"""Input checking and canonical forms shared by the public ops.

Every public op turns its flexible arguments (sequences, padded tensors, None)
into one canonical form before calling its registered operator:

* keep sets: a ``(K, m)`` int64 tensor on the data's device, each row strictly
  ascending and padded with ``-1`` at its end (``None`` becomes ``arange``);
* coefficients: a ``(K,)`` float64 tensor on the data's device, normalised to sum 1;
* client tensors: a list of K tensors (views of a stacked tensor stay views).

Validation raises :class:`ValueError` for bad values and :class:`TypeError` for
wrong types. A wrong dtype (non-floating data, non-integer keep set) raises
:class:`DTypeError`, which is both. Messages start with the op name and name the
argument and, where it applies, the client index.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from ._dtypes import FLOAT_DTYPES, INDEX_DTYPES, DTypeError
from ._validation import validation_enabled

#: The aggregation modes: CA-HFP reconstruction and HeteroFL-style overlap averaging.
MODES = ("reconstruct", "overlap")

KeepSet = Union[Tensor, Sequence[int], None]
KeepSets = Union[Tensor, Sequence[KeepSet], None]


def check_mode(op: str, mode: object) -> None:
    """``mode`` is one of :data:`MODES`."""
    if not isinstance(mode, str):
        raise TypeError(f"{op}: mode must be a str, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")

def check_floating(op: str, name: str, x: object) -> Tensor:
    """``x`` must be a floating tensor (float16, bfloat16, float32 or float64)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{op}: {name} must be floating (float16/bfloat16/float32/float64), got {x.dtype}")
    check_has_data(op, name, x)
    return x


def check_has_data(op: str, name: str, x: Tensor) -> None:
    """Meta tensors have shapes but no values: the ops compute values, so they refuse them."""
    if x.device.type == "meta":
        raise ValueError(f"{op}: {name} is on the meta device (it has no data)")


def check_same_device(op: str, name: str, x: Tensor, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_per_client(keep: object) -> bool:
    """True for per-client keep sets: a Python sequence or a 2-D tensor."""
    if isinstance(keep, Tensor):
        return keep.dim() == 2
    return isinstance(keep, (list, tuple))


def _check_index_tensor(op: str, name: str, x: object, ndim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be an integer tensor or None, got {type(x).__name__}")
    if x.dtype == torch.bool:
        raise DTypeError(
            f"{op}: {name} is a bool mask; a keep set holds the kept indices: pass {name}.nonzero().flatten() "
            "(for a (K, C) mask, one such keep set per row)"
        )
    if x.dtype not in INDEX_DTYPES:
        raise DTypeError(f"{op}: {name} must be an int64 or int32 tensor, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    check_has_data(op, name, x)
    return x


def _check_padded(
    op: str, name: str, padded: Tensor, size: int, names: Sequence[str], valid: Tensor | None = None
) -> None:
    """Check a (K, m) int64 keep-set tensor; ``names[k]`` names client k's row.

    ``valid`` marks the real entries (known lengths, e.g. from a sequence of keep
    sets); without it, entries >= 0 are real and the rest must be -1 padding at the end.
    """
    if padded.numel() == 0:
        return
    problems = []
    if valid is None:
        valid = padded >= 0
        gap = torch.zeros_like(valid)
        gap[:, 1:] = valid[:, 1:] & ~valid[:, :-1]
        problems += [
            (
                (~valid) & (padded != -1),
                "holds a negative index (only -1 padding at the end of a padded row is allowed)",
            ),
            (gap, "has an index after -1 padding (padding must come last)"),
        ]
    else:
        problems.append((valid & (padded < 0), "holds a negative index"))
    desc = torch.zeros_like(valid)
    desc[:, 1:] = valid[:, 1:] & valid[:, :-1] & (padded[:, 1:] <= padded[:, :-1])
    unsorted = "is not strictly ascending (sort it: keep.sort().values; with duplicates: keep.unique())"
    problems += [(valid & (padded >= size), f"holds an index outside [0, {size})"), (desc, unsorted)]
    bad = torch.stack([p.any(dim=1) for p, _ in problems])  # (checks, K)
    if bool(bad.any()):
        for (_, what), row in zip(problems, bad):
            ks = row.nonzero()
            if ks.numel():
                raise ValueError(f"{op}: {names[int(ks[0, 0])]} {what}")


def canonical_keep(op: str, name: str, keep: KeepSets, size: int, K: int, device: torch.device) -> Tensor:
    """Per-client keep sets -> (K, m) int64 tensor on ``device``, -1 padded.

    ``keep`` is None (all channels for every client), one 1-D keep set shared by
    every client, a sequence of K keep sets (each a 1-D integer tensor or None),
    or a padded (K, m) integer tensor.
    """
    validate = validation_enabled()
    if keep is None:
        return torch.arange(size, device=device).expand(K, size).contiguous()
    if isinstance(keep, Tensor):
        _check_index_tensor(op, name, keep, keep.dim() if keep.dim() in (1, 2) else 2)
        if keep.dim() == 1:
            row = keep.to(device=device, dtype=torch.int64).unsqueeze(0)
            if validate:
                _check_padded(op, name, row, size, [name], valid=torch.ones_like(row, dtype=torch.bool))
            return row.expand(K, row.shape[1]).contiguous()
        if keep.shape[0] != K:
            raise ValueError(f"{op}: {name} has {keep.shape[0]} rows but there are {K} clients")
        padded = keep.to(device=device, dtype=torch.int64).contiguous()
        if validate:
            _check_padded(op, name, padded, size, [f"{name}[{k}]" for k in range(K)])
        return padded
    if not isinstance(keep, (list, tuple)):
        raise TypeError(
            f"{op}: {name} must be None, an integer tensor or a sequence of them, got {type(keep).__name__}"
        )
    reject_flat_ints(op, name, keep)
    if len(keep) != K:
        raise ValueError(f"{op}: {name} has {len(keep)} keep sets but there are {K} clients")
    items = []
    for k, item in enumerate(keep):
        if item is None:
            items.append(torch.arange(size, device=device))
            continue
        if isinstance(item, (list, tuple)):
            item = _int_list_tensor(op, f"{name}[{k}]", item)
        item = _check_index_tensor(op, f"{name}[{k}]", item, 1)
        items.append(item.to(device=device, dtype=torch.int64))
    if not items:
        return torch.empty(0, 0, dtype=torch.int64, device=device)
    padded = torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=-1)
    if validate:
        lengths = torch.tensor([t.numel() for t in items], device=device)
        valid = torch.arange(padded.shape[1], device=device) < lengths.unsqueeze(1)
        _check_padded(op, name, padded, size, [f"{name}[{k}]" for k in range(K)], valid=valid)
    return padded


def reject_flat_ints(op: str, name: str, keep: object) -> None:
    """A flat list of ints is one keep set written as a list: say what to pass instead."""
    if isinstance(keep, (list, tuple)) and keep and all(is_int(v) for v in keep):
        shown = list(keep[:4]) + (["..."] if len(keep) > 4 else [])
        example = ", ".join(map(str, shown))
        raise TypeError(
            f"{op}: {name} is a flat list of ints; pass one keep set per client, e.g. {name}=[[{example}]] "
            f"for one client (a list of ints or a tensor per client), or torch.tensor([{example}]) for a "
            "keep set shared by every client"
        )


def _int_list_tensor(op: str, name: str, values: Sequence[object]) -> Tensor:
    """A client's keep set given as a list of ints -> int64 tensor."""
    if not all(is_int(v) for v in values):
        bad = next(v for v in values if not is_int(v))
        raise TypeError(f"{op}: {name} must hold ints, got {type(bad).__name__} {bad!r}")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def kept_counts(keep: KeepSets, padded: Tensor) -> list[int]:
    """How many channels each client keeps (a count per client), from the shapes of a
    sequence of keep sets or by counting the entries of a padded tensor."""
    if isinstance(keep, (list, tuple)):
        return [padded.shape[1] if t is None else len(t) if isinstance(t, (list, tuple)) else int(t.numel())
                for t in keep]
    if keep is None or (isinstance(keep, Tensor) and keep.dim() == 1):
        return [padded.shape[1]] * padded.shape[0]
    return (padded >= 0).sum(dim=1).tolist()


def canonical_coef(op: str, coef: object, K: int, device: torch.device, *, normalised: bool = True) -> Tensor:
    """Client weights -> (K,) float64 on ``device``, normalised to sum 1 (default: equal).

    ``normalised=False`` (the robust reducers): the weights as given, unless their sum
    overflows float64; then they are divided by a power of two (exact) so that it does not.
    """
    if coef is None:
        if not normalised:
            return torch.ones(K, dtype=torch.float64, device=device)
        return torch.full((K,), 1.0 / K, dtype=torch.float64, device=device)
    if isinstance(coef, Tensor):
        if validation_enabled() and (coef.dtype == torch.bool or coef.is_complex()):
            raise DTypeError(f"{op}: coef must be real numbers, got {coef.dtype}")
        check_has_data(op, "coef", coef)
        c = coef.to(device=device, dtype=torch.float64)
    elif isinstance(coef, (list, tuple)):
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in coef):
            raise TypeError(f"{op}: coef must hold real numbers")
        c = torch.tensor(list(coef), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"{op}: coef must be a sequence or a 1-D tensor, got {type(coef).__name__}")
    if c.dim() != 1 or c.numel() != K:
        raise ValueError(f"{op}: coef must hold {K} values (one per client), got shape {tuple(c.shape)}")
    if validation_enabled():
        bad = (~torch.isfinite(c)) | (c < 0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: coef[{k}] = {float(c[k])} is negative or not finite")
        if not bool(c.sum() > 0):
            raise ValueError(f"{op}: coef sums to zero; at least one client needs a positive weight")
    if not normalised:
        _, exponent = torch.frexp(c.amax())
        return torch.where(torch.isfinite(c.sum()), c, torch.ldexp(c, -exponent))
    return normalise(c)


def normalise(c: Tensor) -> Tensor:
    """``c / c.sum()`` that survives overflow and underflow of the sum: when the sum is not a
    finite normal number, ``c`` is first divided by its largest entry (no host sync on a
    GPU; on the CPU, outside a traced graph, the common case reads the sum once and divides by
    it, the same bits)."""
    total = c.sum()
    if c.device.type == "cpu" and not torch.compiler.is_compiling():  # (a traced graph keeps the formula)
        t = total.item()
        if math.isfinite(t) and t >= torch.finfo(c.dtype).tiny:
            return c / total
    ok = torch.isfinite(total) & (total >= torch.finfo(c.dtype).tiny)
    c = c / torch.where(ok, torch.ones_like(total), c.amax())
    return c / c.sum()


def named(container: object, what: str, op: str) -> tuple[list, bool]:
    """(keys, is_mapping) of a list of tensors or a name -> tensor mapping."""
    if isinstance(container, Mapping):
        return list(container.keys()), True
    if isinstance(container, (list, tuple)):
        return list(range(len(container))), False
    raise TypeError(f"{op}: {what} must be a sequence of tensors or a mapping (a state_dict)")


def check_names(op: str, weights: object, **keep_sets: object) -> None:
    """Every name a rows / cols mapping holds is a tensor of ``weights`` (a typo such as
    ``"fc.weigth"`` would otherwise leave that tensor whole and slice its neighbours)."""
    if not isinstance(weights, Mapping):
        return
    for name, arg in keep_sets.items():
        if isinstance(arg, Mapping):
            unknown = [key for key in arg if key not in weights]
            if unknown:
                shown = ", ".join(repr(k) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                raise ValueError(f"{op}: {name} names {len(unknown)} tensor(s) that weights does not hold: {shown}")


def per_tensor(arg: object, key: object, is_mapping: bool, op: str, name: str) -> object:
    """The per-tensor entry of a rows / cols argument of a whole-model op (None when absent)."""
    if arg is None:
        return None
    if isinstance(arg, Mapping):
        return arg.get(key)
    if isinstance(arg, (list, tuple)):
        if is_mapping:
            raise TypeError(f"{op}: {name} must be a mapping by tensor name when weights is a mapping")
        return arg[key]
    raise TypeError(f"{op}: {name} must be None, a sequence (one entry per tensor) or a mapping by name")


def count_clients(op: str, **keep_sets: KeepSets) -> int | None:
    """K from the per-client keep-set arguments (None when all are single keep sets)."""
    K = None
    for name, keep in keep_sets.items():
        reject_flat_ints(op, name, keep)
        if is_per_client(keep):
            n = len(keep) if isinstance(keep, (list, tuple)) else keep.shape[0]
            if K is not None and n != K:
                raise ValueError(f"{op}: {name} has {n} keep sets but another argument has {K}")
            K = n
    return K


def keep_set_entries(
    op: str, weights: object, rows: object, cols: object, num_clients: int | None
) -> tuple[list, bool, list[tuple], int]:
    """The whole-model ops' per-tensor keep sets: ``(keys, is_mapping, [(key, rows, cols)], K)``.

    K comes from the per-client entries (they must agree) or from ``num_clients``.
    """
    keys, is_mapping = named(weights, "weights", op)
    K = num_clients
    entries = []
    for key in keys:
        r = per_tensor(rows, key, is_mapping, op, "rows")
        c = per_tensor(cols, key, is_mapping, op, "cols")
        n = count_clients(op, rows=r, cols=c)
        if n is not None:
            if K is not None and n != K:
                raise ValueError(f"{op}: the keep sets of {key!r} describe {n} clients, others {K}")
            K = n
        entries.append((key, r, c))
    if K is None or K < 1:
        raise ValueError(f"{op}: the number of clients is unknown or zero; pass per-client keep sets or num_clients")
    return keys, is_mapping, entries, K
