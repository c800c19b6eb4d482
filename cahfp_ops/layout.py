"""The per-round layout: every tensor's kept entries for every client, and one buffer per client.

A :class:`RoundLayout` is built once per round from the channel groups of a model and the
clients' keep sets: by group, not by tensor (a conv's rows, its bias, its norm's four
vectors and the next layer's columns all read one group's keep sets). It holds, as small
index tables on the data's device (``int32`` maps, ``int64`` counts and offsets):

* ``meta`` ``(N, 5)``: each tensor's ``(R, Cin, T)`` view (1-D tensors: ``(1, R, 1)``, one
  row whose columns are the channels) and its offsets in the row and column spaces;
* ``row_inv`` ``(K, SR)``: client k keeps row r of tensor n at compact row
  ``row_inv[k, row_off[n] + r]``, or -1;
* ``col_keep`` ``(K, SC)``: client k's kept columns of tensor n, ascending, at
  ``col_keep[k, col_off[n]:]`` (-1 after them);
* ``counts`` ``(K, N, 2)``: kept rows and columns; ``offsets`` ``(K, N)``: where client k's
  compact tensor n starts in client k's buffer (tensors end to end, in order).

Slicing (:meth:`RoundLayout.slice`), batch aggregation (:meth:`RoundLayout.aggregate`) and
streaming accumulation (:func:`accumulate_packed`, one client per call; :func:`fold_packed`,
several) run on these tables with a constant number of kernel launches whatever N and K. A
client's compact model is one contiguous buffer (what goes on the wire) seen through named
views: :class:`PackedModel`.

Buffer ownership: :meth:`RoundLayout.slice` returns new buffers unless given ``out=``; a
buffer passed as ``out`` is overwritten, so pass only one no client model still uses.
:class:`Workspace` keeps such buffers across rounds for callers that know their lifetime.

Every function here checks its arguments as the per-tensor ops do (SPEC, "Bad input";
:mod:`cahfp_ops._layout_checks`): a ``ValueError`` / ``TypeError`` naming the function, the
argument and the client, before anything is written, for O(K + N) host work. A layout is
shared (equal keep sets give the same layout back, ``_LAYOUTS``), so what it hands out
cannot change it: :meth:`RoundLayout.tables` returns copies, ``row_inv`` / ``col_inv``
likewise, and its numpy tables (``counts_host``, ``offsets_host``, ``sizes_host``,
``numels``) are read-only arrays (an in-place edit raises ``ValueError``).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import _hugepages, _layout_checks, _operators
from ._dtypes import acc_dtype
from ._inputs import KeepSets, canonical_keep, check_floating, check_mode, keep_set_entries, kept_counts, normalise
from ._layout_tables import LayoutTables
from ._validation import validation_enabled
from ._views import packed_views

__all__ = [
    "PackedModel",
    "PackedScalars",
    "RoundLayout",
    "Workspace",
    "accumulate_packed",
    "aggregate_packed",
    "empty_buffer",
    "finish_partials",
    "fold_packed",
    "packed_views",
    "slice_packed",
]

#: A tensor dim's channel group: ``(group, block)``: channel c of the group owns indices
#: ``[c * block, (c + 1) * block)`` of the dim, which spans the whole group; or ``(group,
#: block, offset, copies)``: the dim holds ``copies`` equal stretches, each covering channels
#: ``[offset, offset + n)`` of the group in blocks (``n = len / (copies * block)``; a
#: concatenated input, an LSTM's gates, a fused q/k/v projection); a column spec may add a
#: fifth entry ``dim`` >= 1, the tensor dim it prunes (default 1; with ``dim >= 2`` the
#: tensor's dim 0 is not pruned). None: the dim is never pruned.
DimSpec = "tuple[int, int] | tuple[int, int, int, int] | tuple[int, int, int, int, int] | None"


def dim_spec(spec: object, default_dim: int) -> tuple[int, int, int, int, int] | None:
    """``spec`` (a :data:`DimSpec`, checked by the caller) as ``(group, block, offset, copies,
    dim)``; ``offset == -1`` marks the 2-tuple form (the whole group)."""
    if spec is None:
        return None
    g, b = int(spec[0]), int(spec[1])
    if len(spec) == 2:
        return g, b, -1, 1, default_dim
    return g, b, int(spec[2]), int(spec[3]), int(spec[4]) if len(spec) == 5 else default_dim


@dataclass(frozen=True)
class _Structure:
    """What a layout derives from shapes and group assignments alone (cached across rounds)."""

    meta: np.ndarray  # (N, 5) int64
    views: tuple[tuple[int, int, int], ...]  # (R, Cin, T)
    row_vector: np.ndarray  # (N,) bool: a 1-D tensor
    col_dim: np.ndarray  # (N,) the tensor dim the column space indexes (1; >= 2 for a later dim)
    # Per tensor: the channel range a dim reads (index into ``ranges``, -1: not pruned) and
    # the entries per kept channel (copies * block).
    row_range: np.ndarray
    row_mult: np.ndarray
    col_range: np.ndarray
    col_mult: np.ndarray
    ranges: tuple[tuple[int, int, int], ...]  # (group, first channel, channels)
    partial: bool  # some dim covers part of its group or repeats it: per-client offsets needed
    # Per position of the row space (SR) and column space (SC): source column in the
    # concatenated group space (-1: not pruned), block, offset inside the block, local index,
    # channel range (-1: not pruned) and stretch (which copy).
    row_src: np.ndarray
    row_blk: np.ndarray
    row_sub: np.ndarray
    row_local: np.ndarray
    row_rng: np.ndarray
    row_str: np.ndarray
    col_src: np.ndarray
    col_blk: np.ndarray
    col_sub: np.ndarray
    col_local: np.ndarray
    col_rng: np.ndarray
    col_str: np.ndarray
    col_base: np.ndarray  # (SC,) the tensor's column offset
    rowvec_pos: np.ndarray  # row-space positions of 1-D tensors
    rowvec_n: np.ndarray  # their tensor indices
    device_maps: dict = field(default_factory=dict, compare=False)  # (space, device) -> _expand's tables

    @functools.cached_property
    def later_dims(self) -> tuple[int, ...]:
        """The tensors (2-D and up) whose columns are a dim other than 1."""
        return tuple(int(n) for n in np.flatnonzero((self.col_dim != 1) & ~self.row_vector))

    @functools.cached_property
    def partial_sizes(self) -> tuple[int, int]:
        """Elements of streaming partial sums over all tensors: ``(sums, cover)``."""
        return sum(R * Cin * T for R, Cin, T in self.views), sum(R * Cin for R, Cin, _ in self.views)


_STRUCTURES: OrderedDict = OrderedDict()


def _structure(
    shapes: tuple[tuple[int, ...], ...], rows: tuple, cols: tuple, group_sizes: tuple[int, ...]
) -> _Structure:
    key = (shapes, rows, cols, group_sizes)
    hit = _STRUCTURES.get(key)
    if hit is not None:
        _STRUCTURES.move_to_end(key)
        return hit
    N = len(shapes)
    goff = np.concatenate([[0], np.cumsum(group_sizes, dtype=np.int64)]) if group_sizes else np.zeros(1, np.int64)
    views, meta = [], np.zeros((N, 5), np.int64)
    row_vector = np.zeros(N, bool)
    col_dim = np.ones(N, np.int64)
    per_tensor = {k: np.full(N, -1, np.int64) for k in ("row_range", "col_range")}
    per_tensor.update({k: np.ones(N, np.int64) for k in ("row_mult", "col_mult")})
    ranges: dict[tuple[int, int, int], int] = {}
    partial = False
    r_parts: list[tuple] = []
    c_parts: list[tuple] = []
    rv_pos, rv_n = [], []
    SR = SC = 0
    for n, shape in enumerate(shapes):
        if len(shape) == 1:
            R, Cin, T = 1, shape[0], 1
            row_spec, col_spec = None, dim_spec(rows[n], 0)
            row_vector[n] = True
            rv_pos.append(SR)
            rv_n.append(n)
        else:
            row_spec, col_spec = dim_spec(rows[n], 0), dim_spec(cols[n], 1)
            d = col_spec[4] if col_spec is not None else 1
            col_dim[n] = d
            R, Cin, T = math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :])
        views.append((R, Cin, T))
        meta[n] = (R, Cin, T, SR, SC)
        for spec, size, parts, space in ((row_spec, R, r_parts, "row"), (col_spec, Cin, c_parts, "col")):
            local = np.arange(size, dtype=np.int64)
            if spec is None:
                zeros = np.zeros(size, np.int64)
                parts.append((np.full(size, -1, np.int64), np.ones(size, np.int64), zeros, local, zeros - 1, zeros))
                continue
            g, b, o, c, _ = spec
            if o < 0:
                o, c = 0, 1
            channels = size // max(1, c * b)
            if not (0 <= g < len(group_sizes) and b >= 1 and c >= 1 and 0 <= o and channels * c * b == size
                    and o + channels <= group_sizes[g]):  # fmt: skip
                # Checked whatever the validation switch: the index maps must stay inside the group.
                raise ValueError(f"RoundLayout: tensor {n}'s {space} spec {rows[n] if space == 'row' else cols[n]!r} "
                                 f"does not fit its {size} entries and the group sizes")  # fmt: skip
            partial |= c != 1 or o != 0 or channels != group_sizes[g]
            rid = ranges.setdefault((g, o, channels), len(ranges))
            per_tensor[f"{space}_range"][n], per_tensor[f"{space}_mult"][n] = rid, c * b
            within = local % (channels * b)
            parts.append((goff[g] + o + within // b, np.full(size, b, np.int64), within % b, local,
                          np.full(size, rid, np.int64), local // (channels * b)))  # fmt: skip
        c_parts[-1] = (*c_parts[-1], np.full(Cin, SC, np.int64))
        SR += R
        SC += Cin

    def cat(parts: list, i: int) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int64)

    st = _Structure(
        meta, tuple(views), row_vector, col_dim,
        per_tensor["row_range"], per_tensor["row_mult"], per_tensor["col_range"], per_tensor["col_mult"],
        tuple(ranges), partial,
        *(cat(r_parts, i) for i in range(6)), *(cat(c_parts, i) for i in range(7)),
        np.asarray(rv_pos, np.int64), np.asarray(rv_n, np.int64),
    )  # fmt: skip
    _STRUCTURES[key] = st
    if len(_STRUCTURES) > 16:
        _STRUCTURES.popitem(last=False)
    return st


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` made read-only (layouts are shared: an in-place edit would change every holder's)."""
    a.flags.writeable = False
    return a


def _table(a: np.ndarray, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    t = torch.from_numpy(np.require(a, requirements=["C", "W"])).to(dtype)  # a copy of a read-only array
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class RoundLayout:
    """Where every client's compact tensors live this round (see module docs).

    Build one with :meth:`build` (channel groups and their keep sets) or
    :meth:`from_keep_sets` (per-tensor keep sets, as the whole-model ops take them);
    :meth:`cahfp_ops.fl.ChannelPlan.layout` builds one from a channel plan.

    Attributes:
        names: the tensors' names (a state_dict's keys) or None for a list.
        shapes: the full tensors' shapes, ``num_clients``: K, ``device``.
        counts_host ``(K, N, 2)`` / ``offsets_host`` ``(K, N)`` / ``sizes_host`` ``(K, N)`` /
            ``numels`` ``(K,)``: the kept counts, offsets, compact sizes and per-client buffer
            sizes (elements), as read-only numpy arrays.
        row_inv ``(K, SR)`` / ``col_inv`` ``(K, SC)``: copies of the per-tensor inverse maps
            (client k's compact position of each row / column, or -1).
    """

    def __init__(
        self,
        structure: _Structure,
        shapes: tuple[tuple[int, ...], ...],
        names: tuple | None,
        device: torch.device,
        row_inv: Tensor,
        col_inv: Tensor,
        counts: np.ndarray,
    ):
        self._st = structure
        self.shapes = shapes
        self.names = names
        self.device = device
        self.num_clients = int(counts.shape[0])
        self._row_inv = row_inv
        self._col_inv = col_inv
        self.counts_host = _frozen(np.array(counts, np.int64, order="C"))
        T = np.asarray([v[2] for v in structure.views], np.int64)
        sizes = np.ascontiguousarray(counts[:, :, 0] * counts[:, :, 1] * T)
        self.sizes_host = _frozen(sizes)  # (K, N) elements of each compact tensor
        self.offsets_host = _frozen(np.ascontiguousarray(np.cumsum(sizes, axis=1) - sizes))
        self.numels = _frozen(sizes.sum(axis=1))
        self._tables: dict = {}
        self._plans: dict[str, int] = {}  # device -> the backend's plan of the tables (cached)
        self._parent: tuple[RoundLayout, tuple[int, ...]] | None = None  # a view's layout and its clients there
        self._shapes: dict[int, list[tuple[int, ...]]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        shapes: Sequence[Sequence[int]],
        rows: Sequence[tuple[int, int] | None],
        cols: Sequence[tuple[int, int] | None],
        group_sizes: Sequence[int],
        group_keeps: Sequence[Tensor],
        group_counts: np.ndarray,
        *,
        names: Sequence | None = None,
        device: torch.device | str = "cpu",
    ) -> RoundLayout:
        """A layout from channel groups.

        Args:
            shapes: the N full tensors' shapes.
            rows, cols: per tensor, the channel group of dim 0 / dim 1 as ``(group, block)``,
                or None when that dim is not pruned (``cols`` of a 1-D tensor is ignored).
            group_sizes: G channel counts.
            group_keeps: per group, the clients' keep sets as a canonical ``(K, m)`` int64
                tensor (ascending, -1 padded; :func:`cahfp_ops._inputs.canonical_keep`).
            group_counts: ``(K, G)`` kept channels per client and group.
            names, device: the tensors' names (or None) and the data's device.
        """
        op = "RoundLayout.build"
        device = torch.device(device)
        group_counts = np.asarray(group_counts, np.int64)
        if group_counts.ndim != 2 or group_counts.shape[1] != len(group_sizes):
            raise ValueError(f"{op}: group_counts must be (K, {len(group_sizes)}), got {group_counts.shape}")
        if validation_enabled():
            _layout_checks.check_specs(op, shapes, rows, cols, group_sizes, names)
            _check_group_keeps(op, group_sizes, group_keeps, group_counts, device)
        return cls._assemble(shapes, rows, cols, group_sizes, group_keeps, group_counts, names, device)

    @classmethod
    def _assemble(cls, shapes, rows, cols, group_sizes, group_keeps, group_counts, names, device) -> RoundLayout:
        """:meth:`build` on arguments checked by the caller."""
        shapes_t = tuple(tuple(int(d) for d in s) for s in shapes)
        rows_t = tuple(None if r is None else tuple(int(v) for v in r) for r in rows)
        cols_t = tuple(None if c is None else tuple(int(v) for v in c) for c in cols)
        st = _structure(shapes_t, rows_t, cols_t, tuple(int(s) for s in group_sizes))
        K = group_counts.shape[0]
        N = len(shapes_t)
        # Kept channels of every channel range a dim reads (K, ranges), and the compact
        # position of each range's first channel (0 for whole groups; host tables for others).
        gc = group_counts if group_counts.size else np.zeros((K, 1), np.int64)
        groups_of = np.asarray([g for g, _, _ in st.ranges] or [0], np.int64)
        rcount = gc[:, groups_of]
        rbase = np.zeros_like(rcount)
        if st.partial:
            host = {g: group_keeps[g].cpu().numpy() for g in {g for g, _, _ in st.ranges}}
            for r, (g, o, n) in enumerate(st.ranges):
                kept = host[g] >= 0
                rbase[:, r] = (kept & (host[g] < o)).sum(1)
                rcount[:, r] = (kept & (host[g] < o + n)).sum(1) - rbase[:, r]
        # Kept counts on the host: (K, N, 2).
        R = st.meta[:, 0]
        Cin = st.meta[:, 1]
        cc = np.where(st.col_range >= 0, rcount[:, np.clip(st.col_range, 0, None)] * st.col_mult, Cin)
        rc = np.where(st.row_range >= 0, rcount[:, np.clip(st.row_range, 0, None)] * st.row_mult, R)
        rc = np.where(st.row_vector, (cc > 0).astype(np.int64), rc)
        counts = np.stack([rc, cc], axis=2).astype(np.int64).reshape(K, N, 2)
        # Index maps on the device: group inverse maps, then one gather per space.
        SG = int(sum(group_sizes))
        # Group inverse maps, then two extra columns: SG takes the padding's scatter, SG + 1
        # is 0 for the dims that are not pruned (see _expand).
        ginv = torch.full((K, SG + 2), -1, dtype=torch.int32, device=device)
        ginv[:, SG + 1] = 0
        if group_keeps:
            cat = torch.cat([k.to(device=device, dtype=torch.int64) for k in group_keeps], dim=1)
            widths = [k.shape[1] for k in group_keeps]
            shift = _table(np.repeat(np.concatenate([[0], np.cumsum(group_sizes)[:-1]]), widths), device)
            limit = _table(np.repeat(np.asarray(group_sizes, np.int64), widths), device)
            pos = _table(np.concatenate([np.arange(w) for w in widths]), device, torch.int32)
            ok = (cat >= 0) & (cat < limit)
            idx = torch.where(ok, cat + shift, torch.full_like(cat, SG))
            ginv.scatter_(1, idx, pos.expand(K, -1).contiguous())
        offs = None
        if st.partial:
            offs = (_table(rbase, device, torch.int32), _table(rcount, device, torch.int32))
        row_inv = _expand(ginv, st, "row", device, offs)
        if st.rowvec_pos.size:
            kept = _table(counts[:, st.rowvec_n, 1] > 0, device, torch.bool)
            row_inv[:, _table(st.rowvec_pos, device)] = torch.where(kept, 0, -1).to(torch.int32)
        col_inv = _expand(ginv, st, "col", device, offs)
        return cls(st, shapes_t, tuple(names) if names is not None else None, device, row_inv, col_inv, counts)

    @classmethod
    def from_groups(
        cls,
        shapes: Sequence[Sequence[int]],
        rows: Sequence[tuple[int, int] | None],
        cols: Sequence[tuple[int, int] | None],
        group_sizes: Sequence[int],
        group_keeps: Sequence[KeepSets],
        num_clients: int,
        *,
        names: Sequence | None = None,
        device: torch.device | str = "cpu",
        op: str = "RoundLayout.from_groups",
        group_names: Sequence[str] | None = None,
        reuse: bool = True,
    ) -> RoundLayout:
        """:meth:`build` from raw keep sets: ``group_keeps[g]`` holds the ``num_clients`` clients'
        kept channels of group g in any form the ops take (a sequence of 1-D integer tensors or
        None, a padded ``(K, m)`` tensor, one shared 1-D keep set); each group is checked once,
        its errors naming it ``group_names[g]`` (default ``group_keeps[g]``). With ``reuse``, a
        layout recently built from keep sets of equal contents is returned instead of a new one
        (see ``_LAYOUTS``)."""
        device = torch.device(device)
        if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise ValueError(f"{op}: num_clients must be an int >= 1, got {num_clients!r}")
        K = int(num_clients)
        if validation_enabled():
            _layout_checks.check_specs(op, shapes, rows, cols, group_sizes, names)
        if len(group_keeps) != len(group_sizes):
            raise ValueError(f"{op}: {len(group_keeps)} groups of keep sets for {len(group_sizes)} group sizes")
        fingerprint = _keep_fingerprint(group_keeps, K, device) if reuse else None
        if fingerprint is not None:
            key = (
                tuple(tuple(s) for s in shapes), tuple(rows), tuple(cols), tuple(int(g) for g in group_sizes), K,
                tuple(names) if names is not None else None, str(device), validation_enabled(), fingerprint[0],
            )  # fmt: skip
            hit = _LAYOUTS.get(key)
            if hit is not None and torch.equal(hit[0], fingerprint[1]):
                _LAYOUTS.move_to_end(key)
                return hit[1]
        keeps, counts = [], []
        for g, (size, keep) in enumerate(zip(group_sizes, group_keeps)):
            name = group_names[g] if group_names is not None else f"group_keeps[{g}]"
            padded = canonical_keep(op, name, keep, int(size), K, device)
            keeps.append(padded)
            counts.append(kept_counts(keep, padded))
        gcounts = np.asarray(counts, np.int64).T.reshape(K, len(keeps)) if keeps else np.zeros((K, 0), np.int64)
        layout = cls._assemble(shapes, rows, cols, group_sizes, keeps, gcounts, names, device)
        if fingerprint is not None:
            _LAYOUTS[key] = (fingerprint[1], layout)
            if len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
                _LAYOUTS.popitem(last=False)
        return layout

    @classmethod
    def from_keep_sets(
        cls,
        weights: Sequence[Tensor] | Mapping[str, Tensor],
        rows: Sequence | Mapping | None = None,
        cols: Sequence | Mapping | None = None,
        *,
        num_clients: int | None = None,
        op: str = "RoundLayout.from_keep_sets",
    ) -> RoundLayout:
        """A layout from per-tensor keep sets, as :func:`cahfp_ops.slice_channels_many` takes them.

        Each distinct keep-set object (with the size it indexes) becomes one channel group,
        so keep sets shared by several tensors (``ChannelPlan.tensor_keep_sets`` shares them)
        are checked and mapped once.
        """
        keys, is_mapping, entries, K = keep_set_entries(op, weights, rows, cols, num_clients)
        device = None
        groups: dict[tuple, int] = {}
        sizes, keeps, group_names = [], [], []  # ``keeps`` also pins each keyed object while its id is a key
        shapes, row_specs, col_specs = [], [], []

        def group(name: str, keep: object, size: int) -> tuple[int, int] | None:
            if keep is None:
                return None
            gkey = (id(keep), size)
            if gkey not in groups:
                groups[gkey] = len(sizes)
                sizes.append(size)
                keeps.append(keep)
                group_names.append(name)
            return (groups[gkey], 1)

        for key, r, c in entries:
            w = weights[key]
            if not isinstance(w, Tensor):
                raise TypeError(f"{op}: weights[{key!r}] must be a torch.Tensor, got {type(w).__name__}")
            if w.dim() == 0:
                raise ValueError(f"{op}: weights[{key!r}] must have at least 1 dim")
            if device is None:
                device = w.device
            if w.dim() == 1 and c is not None:
                raise ValueError(f"{op}: cols must be None for a 1-D weight (it has no input channels)")
            shapes.append(tuple(w.shape))
            row_specs.append(group(f"rows[{key!r}]", r, w.shape[0]))
            col_specs.append(None if w.dim() == 1 else group(f"cols[{key!r}]", c, w.shape[1]))
        return cls.from_groups(
            shapes, row_specs, col_specs, sizes, keeps, K,
            names=keys if is_mapping else None, device=device or "cpu", op=op, group_names=group_names,
        )  # fmt: skip

    # ------------------------------------------------------------------ tables
    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def later_column_views(self) -> dict[int, tuple[int, int, int]]:
        """Tensor index -> its ``(R, Cin, T)`` view, for the tensors whose columns are a later
        dim than 1 (a 5-tuple column spec): how the kernels and streaming partial sums see
        them. Empty when every tensor's columns are dim 1. A new dict each call."""
        return {n: self._st.views[n] for n in self._st.later_dims}

    @property
    def row_inv(self) -> Tensor:
        """``(K, SR)`` int32: client k keeps row r of tensor n at compact row ``[k, row_off[n] + r]``
        (or -1); a copy."""
        return self._row_inv.clone()

    @property
    def col_inv(self) -> Tensor:
        """``(K, SC)`` int32: client k keeps column c of tensor n at compact column ``[k, col_off[n] + c]``
        (or -1); a copy."""
        return self._col_inv.clone()

    def tables(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """The index tables on ``device`` (default: the layout's): meta, row_inv, col_keep,
        counts, offsets, col_inv. Copies: the layout's own tables are shared with every
        holder of the layout (and with layouts found again for equal keep sets), so editing
        what this returns changes nothing else."""
        tables, col_inv = self._tables_and_col_inv(device)
        return {**{key: t.clone() for key, t in tables._asdict().items()}, "col_inv": col_inv.clone()}

    def _device_tables(self, device: torch.device | None = None) -> LayoutTables:
        """The layout's own index tables on ``device``, cached (what the kernels read)."""
        return self._tables_and_col_inv(device)[0]

    def _tables_and_col_inv(self, device: torch.device | None = None) -> tuple[LayoutTables, Tensor]:
        device = torch.device(device) if device is not None else self.device
        hit = self._tables.get(str(device))
        if hit is None:
            st = self._st
            K = self.num_clients
            SC = self._col_inv.shape[1]
            col_inv = self._col_inv.to(device)
            local = _table(st.col_local, device, torch.int32)
            # Each tensor's kept columns in order: client k's compact column j of the tensor
            # whose columns start at b goes to col_keep[k, b + j]. Consecutive whole tensors
            # per step, up to _COL_KEEP_STEP table entries (a larger tensor alone), so the
            # temporaries stay small (the whole table at once faulted in ~0.4 GB of fresh pages
            # at K = 1,000: 0.9 s for VGG-16) while a model of many small tensors takes a few
            # steps, not one per tensor (ResNet-56, K = 100: 4.6-4.7 ms instead of 9.3-17.6).
            col_keep = torch.empty((K, SC), dtype=torch.int32, device=device)
            bases = np.asarray(st.col_base, np.int64)
            starts = np.flatnonzero(np.r_[True, bases[1:] != bases[:-1]]) if SC else np.zeros(0, np.int64)
            for b, e in _spans(starts.tolist(), SC, max(1, _COL_KEEP_STEP // K)):
                seg = col_inv[:, b:e]
                # kept: its tensor's first column in the span plus its compact column; else a spare column
                dst = seg.to(torch.int64)
                if bases[e - 1] != b:  # several tensors
                    dst += _table(bases[b:e] - b, device)
                dst.masked_fill_(seg < 0, e - b)
                part = torch.full((K, e - b + 1), -1, dtype=torch.int32, device=device)
                part.scatter_(1, dst, local[b:e].expand(K, -1))
                col_keep[:, b:e] = part[:, : e - b]
            tables = LayoutTables(
                meta=_table(st.meta, device),
                row_inv=self._row_inv.to(device).contiguous(),
                col_keep=col_keep,
                counts=_table(self.counts_host, device),
                offsets=_table(self.offsets_host, device),
            )
            hit = self._tables[str(device)] = (tables, col_inv.contiguous())
        return hit

    def compact_shapes(self, k: int) -> list[tuple[int, ...]]:
        """Client k's compact tensor shapes (all clients' are built at once, on first use)."""
        hit = self._shapes.get(k)
        if hit is None:
            dims = self._st.col_dim.tolist()
            for j, row in enumerate(self.counts_host.tolist()):
                self._shapes[j] = [
                    (c[1],) if len(s) == 1
                    else (c[0], c[1], *s[2:]) if d == 1
                    else (*s[:d], c[1], *s[d + 1 :])
                    for c, s, d in zip(row, self.shapes, dims)
                ]  # fmt: skip
            hit = self._shapes[k]
        return hit

    def full_views(self, packed: Tensor) -> list[Tensor]:
        """Views of the N full-size tensors laid end to end in ``packed`` (an aggregation result)."""
        return packed_views(packed, list(self.shapes), packed.storage_offset())

    def kept_elements(self) -> np.ndarray:
        """``(K,)`` elements each client keeps (the size of its buffer)."""
        return self.numels.copy()

    def client_problem(self, k: int, data: object, dtype: torch.dtype | None = None) -> str | None:
        """What is wrong with ``data`` as client k's upload (a packed 1-D buffer of
        ``numels[k]`` elements, or its N compact tensors shaped ``compact_shapes(k)``; floating,
        on the layout's device, of ``dtype`` when given), or None. Never raises: an upload is
        untrusted input; the reason is a phrase to follow the client's name."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.num_clients:
            return f"is client {k!r}, but the layout has clients 0..{self.num_clients - 1}"
        return _layout_checks.client_problem(self, int(k), data, self.device, dtype)

    def client(self, k: int) -> RoundLayout:
        """The one-client layout of client k (for streaming accumulation)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.num_clients:
            raise ValueError(f"RoundLayout.client: k must be a client index in [0, {self.num_clients}), got {k!r}")
        return self._view([int(k)])

    def _view(self, idx: list[int]) -> RoundLayout:
        """The layout of clients ``idx`` (checked indices) sharing this one's structure: their
        rows of the tables, views when ``idx`` is consecutive (a window), else copies."""
        view = RoundLayout.__new__(RoundLayout)
        view._st = self._st
        view.shapes, view.names, view.device = self.shapes, self.names, self.device
        view.num_clients = len(idx)
        if idx and idx == list(range(idx[0], idx[0] + len(idx))):
            rows = slice(idx[0], idx[0] + len(idx))

            def pick(t: Tensor) -> Tensor:
                return t[rows]
        else:
            rows = idx
            sel = {}

            def pick(t: Tensor) -> Tensor:
                if t.device not in sel:
                    sel[t.device] = torch.tensor(idx, dtype=torch.int64, device=t.device)
                return t.index_select(0, sel[t.device])

        view._row_inv = pick(self._row_inv)
        view._col_inv = pick(self._col_inv)
        view.counts_host = _frozen(self.counts_host[rows])
        view.sizes_host = _frozen(self.sizes_host[rows])
        view.offsets_host = _frozen(self.offsets_host[rows])
        view.numels = _frozen(self.numels[rows])
        view._tables = self._rows_of_tables(pick)
        view._plans = {}
        view._parent = (self, tuple(idx))
        view._shapes = {j: self._shapes[k] for j, k in enumerate(idx) if k in self._shapes}
        return view

    def _plan(self, device: torch.device) -> int:
        """The backend's plan of this layout's tables on ``device`` (made on first use, kept
        with the layout; -1 where the backend plans nothing ahead, not cached)."""
        hit = self._plans.get(str(device), -1)
        if hit < 0:
            planned = -1 if self._parent is None else self._parent[0]._plans.get(str(device), -1)
            if planned >= 0:  # some clients of a planned layout (a window): their part of its plan
                hit = _operators.layout_plan_subset(planned, self._parent[1], device, self)
            else:
                hit = _operators.layout_plan(self._device_tables(device), device, self)
            if hit >= 0:
                self._plans[str(device)] = hit
        return hit

    def _rows_of_tables(self, pick) -> dict:
        """The cached tables of some clients (``pick`` selects their rows; ``meta`` is shared)."""
        return {dev: (tables._replace(**{key: pick(t) for key, t in tables._asdict().items() if key != "meta"}),
                      pick(col_inv))
                for dev, (tables, col_inv) in self._tables.items()}  # fmt: skip

    def subset(self, clients: Sequence[int]) -> RoundLayout:
        """The layout of some of the clients (in the given order); this layout itself when
        that is all of them in order (its tables stay cached)."""
        idx = list(clients)
        if idx == list(range(self.num_clients)):
            return self
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.num_clients
               for k in idx):  # fmt: skip
            raise ValueError(f"RoundLayout.subset: clients must be indices in [0, {self.num_clients}), got {idx}")
        return self._view([int(k) for k in idx])

    # ------------------------------------------------------------------ ops
    def slice(self, weights: Sequence[Tensor], *, out: Tensor | None = None) -> list[Tensor]:
        """Every client's compact model: K contiguous 1-D buffers (views of one allocation,
        client after client), tensor n of client k at ``offsets_host[k, n]``.

        ``weights``: the N full tensors (one floating dtype, the layout's device). ``out``: a
        1-D buffer of ``numels.sum()`` elements to write into (overwritten; see module docs).
        """
        return slice_packed(self, weights, out=out)

    def aggregate(
        self,
        weights: Sequence[Tensor],
        clients: Sequence[Tensor | Sequence[Tensor]],
        coef: Tensor,
        mode: str = "reconstruct",
        *,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Aggregate; returns ``(packed result, stats)`` (see :func:`aggregate_packed`)."""
        return aggregate_packed(self, weights, clients, coef, mode, out=out)


def _check_group_keeps(op: str, group_sizes: Sequence[int], group_keeps: Sequence[Tensor], group_counts: np.ndarray,
                       device: torch.device) -> None:  # fmt: skip
    """:meth:`RoundLayout.build`'s keep sets: per group a canonical ``(K, m)`` int64 table
    (rows ascending, in range, -1 padded at the end) whose kept counts are ``group_counts``."""
    K = group_counts.shape[0]
    if len(group_keeps) != len(group_sizes):
        raise ValueError(f"{op}: {len(group_keeps)} keep-set tables for {len(group_sizes)} groups")
    for g, (size, keep) in enumerate(zip(group_sizes, group_keeps)):
        if not isinstance(keep, Tensor) or keep.dim() != 2 or keep.dtype != torch.int64:
            raise ValueError(f"{op}: group_keeps[{g}] must be a (K, m) int64 tensor")
        canonical_keep(op, f"group_keeps[{g}]", keep, int(size), K, device)  # checks the rows
        counts = (keep >= 0).sum(dim=1).cpu().numpy()
        if not np.array_equal(counts, group_counts[:, g]):
            raise ValueError(f"{op}: group_counts[:, {g}] = {group_counts[:, g].tolist()} but the keep sets of "
                             f"group {g} hold {counts.tolist()}")  # fmt: skip


# Column-table entries (clients x columns) built per step (measured, ResNet-56 at K = 100
# and 1,000: 2^18 faster than 2^16 and 2^20).
_COL_KEEP_STEP = 1 << 18


def _spans(starts: list[int], end: int, width: int) -> Iterator[tuple[int, int]]:
    """``[b, e)`` spans of whole segments (segment i covers ``[starts[i], starts[i + 1])``,
    the last ends at ``end``): consecutive segments joined while a span stays within
    ``width`` (a wider segment is a span of its own)."""
    bounds = [*starts, end]
    i = 0
    while i < len(starts):
        j = i + 1
        while j < len(starts) and bounds[j + 1] - bounds[i] <= width:
            j += 1
        yield bounds[i], bounds[j]
        i = j


def _expand(ginv: Tensor, st: _Structure, space: str, device: torch.device,
            offs: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    """Per-tensor inverse maps ``(K, S)`` of the row or column space from the group inverse
    maps ``ginv`` ``(K, SG + 2)`` (its last column 0): position p of a pruned dim with block
    b reads its channel's compact position i and becomes ``i * b + sub`` (-1 where the channel
    is not kept); a dim that is not pruned reads the zero column with block 0 and becomes its
    local index. A dim covering part of its group, or several copies of it (``st.partial``),
    also needs ``offs``: per client and channel range, the compact position of the range's
    first channel and the range's kept count ``(K, ranges)``; position p of copy s then
    becomes ``(i - base) * b + sub + s * count * b``. One gather and one select over
    ``(K, S)``; the per-position tables are made once per structure and device."""
    K = ginv.shape[0]
    key = (space, str(device))
    maps = st.device_maps.get(key)
    if maps is None:
        src, blk, sub, local, rng, stretch = (
            (st.row_src, st.row_blk, st.row_sub, st.row_local, st.row_rng, st.row_str) if space == "row"
            else (st.col_src, st.col_blk, st.col_sub, st.col_local, st.col_rng, st.col_str)
        )  # fmt: skip
        pruned = src >= 0
        maps = (
            _table(np.where(pruned, src, ginv.shape[1] - 1), device),
            _table(np.where(pruned, blk, 0), device, torch.int32),
            _table(np.where(pruned, sub, local), device, torch.int32),
            _table(np.clip(rng, 0, None), device),
            _table(np.where(pruned, stretch, 0), device, torch.int32),
        )
        st.device_maps[key] = maps
    src_t, blk_t, sub_t, rng_t, str_t = maps
    if src_t.numel() == 0:
        return torch.zeros((K, 0), dtype=torch.int32, device=device)
    gathered = ginv[:, src_t]
    if offs is None:
        pos = gathered * blk_t + sub_t
    else:
        base, count = offs[0][:, rng_t], offs[1][:, rng_t]
        pos = (gathered - base) * blk_t + sub_t + str_t * count * blk_t
    return torch.where(gathered >= 0, pos, -1).to(torch.int32).contiguous()


# ---------------------------------------------------------------------- packed client models
class PackedScalars(Mapping):
    """Named 0-d entries held as one 1-D tensor: ``scalars[name]`` is a view of
    ``values[i]`` (made on first access, then kept, so writing it writes ``values``).

    It carries a model's integer scalars (BatchNorm's ``num_batches_tracked``) per client as
    one tensor instead of one per entry: copying, checking and reducing them is one tensor
    operation whatever the model's depth.
    """

    __slots__ = ("names", "values", "_index", "_views")

    def __init__(self, names: Sequence[str], values: Tensor):
        names = tuple(names)
        if values.dim() != 1 or values.numel() != len(names):
            raise ValueError(f"PackedScalars: {len(names)} names need a 1-D tensor of as many values, "
                             f"got shape {tuple(values.shape)}")  # fmt: skip
        self.names = names
        self.values = values
        self._index = {n: i for i, n in enumerate(names)}
        self._views: dict = {}

    def __getitem__(self, name):
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self.values[self._index[name]]
        return view

    def __iter__(self) -> Iterator:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"PackedScalars({len(self.names)} {self.values.dtype} entries)"


class PackedModel(Mapping):
    """A client's compact model as one contiguous 1-D buffer with named views.

    ``buffer`` holds the packed tensors end to end (in the layout's order); ``model[name]``
    is a view into it (made on first access), so writing a view writes the buffer.
    ``extras`` holds entries that are not packed (integer buffers such as
    ``num_batches_tracked``): a copy of the mapping given, or the :class:`PackedScalars`
    given itself. Iteration follows the layout's names, then the extras.
    """

    __slots__ = ("_buffer", "layout", "client", "names", "extras", "_views", "_name_set")

    def __init__(
        self,
        buffer: Tensor,
        layout: RoundLayout,
        client: int,
        names: Sequence | None = None,
        extras: Mapping[str, Tensor] | None = None,
    ):
        names = tuple(names) if names is not None else layout.names
        if names is None:
            names = tuple(range(layout.num_tensors))
        if len(names) != layout.num_tensors:
            raise ValueError(f"PackedModel: {len(names)} names for {layout.num_tensors} tensors")
        if buffer.dim() != 1 or buffer.numel() != int(layout.numels[client]):
            raise ValueError(
                f"PackedModel: client {client}'s buffer must be 1-D with {int(layout.numels[client])} elements, "
                f"got shape {tuple(buffer.shape)}"
            )
        self._buffer = buffer
        self.layout = layout
        self.client = client
        self.names = names
        self._name_set = frozenset(names)  # membership without a scan: replies are checked name by name
        self.extras = extras if isinstance(extras, PackedScalars) else dict(extras or {})
        self._views: dict | None = None

    @property
    def buffer(self) -> Tensor:
        """The packed 1-D buffer (replacing it drops the views made of the old one)."""
        return self._buffer

    @buffer.setter
    def buffer(self, value: Tensor) -> None:
        self._buffer = value
        self._views = None

    def problem(self) -> str | None:
        """Why the buffer does not hold this layout's client (it may have been replaced since it
        was built: a reply is untrusted), or None: a floating 1-D tensor of the client's size."""
        if not isinstance(self.layout, RoundLayout):
            return f"its layout is a {type(self.layout).__name__}, not a RoundLayout"
        k, K = self.client, self.layout.num_clients
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < K:
            return f"it names client {k!r} of a layout of {K}"
        if not isinstance(self.buffer, Tensor):
            return f"its buffer is a {type(self.buffer).__name__}, not a tensor"
        problem = _layout_checks.client_problem(self.layout, int(k), self.buffer, self.buffer.device)
        return None if problem is None else f"its buffer {problem}"

    def _all_views(self) -> dict:
        if self._views is None:
            problem = self.problem()
            if problem is not None:
                raise ValueError(f"PackedModel: {problem}")
            views = packed_views(self.buffer, self.layout.compact_shapes(self.client), self.buffer.storage_offset())
            self._views = dict(zip(self.names, views))
        return self._views

    def __getitem__(self, name):
        if name in self.extras:
            return self.extras[name]
        return self._all_views()[name]

    def __iter__(self) -> Iterator:
        yield from self.names
        yield from (k for k in self.extras if k not in self._name_set)

    def __len__(self) -> int:
        return len(self.names) + sum(1 for k in self.extras if k not in self._name_set)

    def __contains__(self, name) -> bool:
        return name in self.extras or name in self._name_set

    def copy(self) -> dict:
        """A plain dict of the entries (views stay views)."""
        return dict(self.items())

    def matches(self, layout: RoundLayout, client: int, names: Sequence | None) -> bool:
        """Whether the buffer is laid out as ``layout`` lays out client ``client`` under ``names``
        (its layout says so and the buffer is a floating 1-D tensor of that client's size)."""
        if self.problem() is not None:
            return False
        if self.layout is layout and self.client == client:
            return names is None or tuple(names) == self.names
        mine, theirs = self.layout, layout
        return (
            (names is None or tuple(names) == self.names)
            and mine.shapes == theirs.shapes
            and np.array_equal(mine.counts_host[self.client], theirs.counts_host[client])
        )

    def __repr__(self) -> str:
        return f"PackedModel({len(self.names)} tensors in one {self.buffer.dtype} buffer of {self.buffer.numel()})"


# ------------------------------------------------------------------ layouts by content
# Layouts recently built from keep-set sequences, keyed by the structure and the keep sets'
# lengths and checked against their contents: slicing a round and aggregating it later with
# the same keep sets (fresh objects every round, as users pass them) builds the layout once.
# A hit compares contents (one concatenation and one comparison), never object identity,
# so a keep set changed in place is a miss. Validation state is part of the key: a layout
# built with validation off is never handed to a call with it on.
_LAYOUTS: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 4


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Keep-set tensors whose form was checked (1-D, integer, on the device), by the ids of the
# objects in order, pinned so that an id cannot be reused while it is a key: the same objects
# coming back (a round's slicing, then its aggregation) skip the per-tensor checks. Their
# contents are compared on every lookup all the same.
_CHECKED_KEEPS: OrderedDict = OrderedDict()


def _keep_fingerprint(group_keeps: Sequence[KeepSets], K: int, device: torch.device) -> tuple[tuple, Tensor] | None:
    """(lengths, int64 contents) of keep sets given as sequences of K 1-D integer tensors on
    ``device``; None for any other form (those layouts are built, not looked up)."""
    parts: list = []
    for keep in group_keeps:
        if not isinstance(keep, (list, tuple)) or len(keep) != K:
            return None
        parts.extend(keep)
    if not parts:
        return None
    ids = tuple(map(id, parts))
    if ids in _CHECKED_KEEPS:
        _CHECKED_KEEPS.move_to_end(ids)
    else:
        for t in parts:
            if not isinstance(t, Tensor) or t.dim() != 1 or t.device != device or t.dtype not in _INDEX_DTYPES:
                return None
        _CHECKED_KEEPS[ids] = parts
        if len(_CHECKED_KEEPS) > _LAYOUT_CACHE_SIZE:
            _CHECKED_KEEPS.popitem(last=False)
    try:
        contents = torch.cat(parts)  # promotes mixed integer dtypes
    except (RuntimeError, TypeError):  # a checked object changed form in place since: built, not looked up
        return None
    if contents.dim() != 1 or contents.dtype not in _INDEX_DTYPES or contents.device != device:
        return None
    return tuple(t.numel() for t in parts), contents.to(torch.int64)


# ---------------------------------------------------------------------- kernel calls
def _check_layout(op: str, layout: object) -> None:
    if not isinstance(layout, RoundLayout):
        raise TypeError(f"{op}: layout must be a RoundLayout, got {type(layout).__name__}")


def slice_packed(layout: RoundLayout, weights: Sequence[Tensor], *, out: Tensor | None = None) -> list[Tensor]:
    """K client buffers (views of one allocation ``out``); see :meth:`RoundLayout.slice`."""
    op = "slice_packed"
    _check_layout(op, layout)
    total = int(layout.numels.sum())
    if validation_enabled():
        _layout_checks.check_weights(op, layout, weights)
    elif not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"{op}: weights must be a non-empty list of tensors")
    dtype = weights[0].dtype
    device = weights[0].device
    if out is None:
        out = _hugepages.empty(total, dtype, device)
    else:
        _layout_checks.check_buffer(op, "out", out, total, dtype, device)
    t = layout._device_tables(device)
    starts = layout.offsets_host + (np.cumsum(layout.numels) - layout.numels)[:, None]
    weights, _ = _as_views(layout, weights, [])
    if total:
        _operators.call_layout_op(
            _operators.slice_packed_op, list(weights), *t._replace(offsets=_table(starts, device)), out
        )
    bounds = np.concatenate([[0], np.cumsum(layout.numels)]).tolist()
    return [out[bounds[k] : bounds[k + 1]] for k in range(layout.num_clients)]


def _flat_clients(clients: Sequence[Tensor | Sequence[Tensor]], N: int) -> tuple[list[Tensor], list[int]]:
    """The kernels' client arguments: every client's buffer or N tensors in one list, and per
    client its form (``parts``: 0 for one packed buffer, made contiguous where it is not; N
    for its N tensors). The form is what the caller passed, never inferred from a count."""
    flat, parts = [], []
    for c in clients:
        if isinstance(c, Tensor):
            flat.append(c.contiguous())
            parts.append(0)
        else:
            flat.extend(c)
            parts.append(N)
    return flat, parts


def _as_views(
    layout: RoundLayout, weights: Sequence[Tensor], clients: Sequence[Tensor | Sequence[Tensor]]
) -> tuple[list[Tensor], list]:
    """``weights`` and ``clients`` as every backend reads them: a tensor whose columns are a
    later dim than 1 (a layout built with a 5-tuple column spec) as its ``(R, Cin, T)`` view,
    and a client's separate tensor of it, when it has its compact shape, as ``(rows, cols, T)``
    (the same elements in the same order: a view, or a copy of a non-contiguous one; any
    other shape goes as it is, for the backend to refuse). Other tensors, and packed buffers,
    as they are."""
    later = layout._st.later_dims
    if not later:
        return list(weights), list(clients)
    views = layout._st.views
    weights = list(weights)
    for n in later:
        weights[n] = weights[n].reshape(views[n])
    out = []
    for k, c in enumerate(clients):
        if not isinstance(c, Tensor):
            c, shapes = list(c), layout.compact_shapes(k)
            for n in later:
                if isinstance(c[n], Tensor) and tuple(c[n].shape) == tuple(shapes[n]):
                    rc, cc = (int(x) for x in layout.counts_host[k, n])
                    c[n] = c[n].reshape(rc, cc, views[n][2])
        out.append(c)
    return weights, out


def _check_client_args(op: str, layout: RoundLayout, weights: object, clients: object, name: str = "clients") -> Tensor:
    """With validation on: the weights and the clients against the layout (see
    :mod:`cahfp_ops._layout_checks`). Always: one entry per client. Returns ``weights[0]``."""
    if validation_enabled():
        ref = _layout_checks.check_weights(op, layout, weights)
        _layout_checks.check_clients(op, layout, clients, ref.device, name)
        return ref
    if not isinstance(weights, (list, tuple)) or not weights or not isinstance(clients, (list, tuple)):
        raise ValueError(f"{op}: weights and clients must be non-empty lists")
    if len(clients) != layout.num_clients:
        raise ValueError(f"{op}: {len(clients)} clients for a layout of {layout.num_clients}")
    return weights[0]


def aggregate_packed(
    layout: RoundLayout,
    weights: Sequence[Tensor],
    clients: Sequence[Tensor | Sequence[Tensor]],
    coef: Tensor,
    mode: str = "reconstruct",
    *,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Aggregate K clients on ``layout``; returns ``(out, stats)``.

    ``clients[k]``: client k's packed 1-D buffer (``layout.numels[k]`` elements), or its N
    compact tensors (shaped ``layout.compact_shapes(k)``); all of one floating dtype.
    ``coef``: ``(K,)`` float64 weights as given (finite, >= 0, a positive sum: sample counts,
    or already normalised), normalised here by their sum as :func:`~cahfp_ops.reconstruct_aggregate`
    does (the layout ops' one convention: :func:`fold_packed` takes the same weights and
    accumulates them as given). ``out``: the N results
    packed in order (new unless given). ``stats`` ``(K, 2)`` float64: column 0 is 1 where
    client k holds a value that is not finite in the global dtype (or a delta not finite in
    the accumulation dtype), column 1 the sum of squares of its deltas ``c - w`` over its
    kept elements, both from the same pass over the data as the aggregation (clients with
    coefficient 0 are read for the statistics but add nothing).
    """
    op = "aggregate_packed"
    _check_layout(op, layout)
    check_mode(op, mode)
    ref = _check_client_args(op, layout, weights, clients)
    device = ref.device
    total = sum(w.numel() for w in weights)
    if validation_enabled():
        _layout_checks.check_coef(op, coef, layout.num_clients, device, positive_sum=True)
        if out is not None:
            _layout_checks.check_buffer(op, "out", out, total, ref.dtype, device)
    weights, clients = _as_views(layout, weights, clients)
    flat, parts = _flat_clients(clients, layout.num_tensors)
    if out is None:
        out = _hugepages.empty(total, ref.dtype, device, prefault=True)
    stats = torch.empty((len(clients), 2), dtype=torch.float64, device=device)
    t = layout._device_tables(device)
    _operators.call_layout_op(
        _operators.aggregate_packed_op, list(weights), flat, parts, *t,
        normalise(coef), mode, out, stats, layout._plan(device),
    )  # fmt: skip
    return out, stats


def _partial_sizes(weights: Sequence[Tensor]) -> tuple[int, int]:
    """Elements of streaming partial sums for ``weights``: ``(sums, cover)``."""
    cover = sum(w.shape[0] if w.dim() == 1 else w.shape[0] * w.shape[1] for w in weights)
    return sum(w.numel() for w in weights), cover


def _check_partials(
    op: str, weights: Sequence[Tensor], mode: str, named: dict[str, Tensor], layout: RoundLayout | None = None
) -> None:
    """Validation of the streaming ops' arguments: ``mode``, and each named partial-sum buffer
    a contiguous 1-D tensor of the accumulation dtype on the weights' device, of the size its
    role needs (``sums*``: every weight element; ``cover*``: every tensor's ``R * Cin``), as
    ``layout`` lays the weights out (when given) or as the weights' shapes give."""
    check_mode(op, mode)
    if layout is not None and len(weights) != layout.num_tensors:
        raise ValueError(f"{op}: {len(weights)} weights for a layout of {layout.num_tensors} tensors")
    acc = acc_dtype(weights[0].dtype)
    sizes = dict(zip(("sums", "cover"), layout._st.partial_sizes if layout is not None else _partial_sizes(weights)))
    for name, t in named.items():
        _layout_checks.check_buffer(op, name, t, sizes[name.split("_")[0]], acc, weights[0].device)


def accumulate_packed(
    layout: RoundLayout,
    weights: Sequence[Tensor],
    client: Tensor | Sequence[Tensor],
    weight: float,
    mode: str,
    sums: Tensor,
    cover: Tensor,
    *,
    max_ssq: float = math.inf,
) -> Tensor:
    """Check one client (a one-client layout, :meth:`RoundLayout.client`), then fold it into
    ``sums`` / ``cover`` in place, unless it holds a non-finite value or its squared delta
    sum exceeds ``max_ssq`` (then nothing changes). Returns ``(3,)`` float64: non-finite
    flag, squared delta sum, accepted. ``client``: its packed buffer or its N tensors.
    ``weight``: finite, >= 0. ``sums``: 1-D, the weights' total size; ``cover``: 1-D, the
    sum of every tensor's ``R * Cin``; both float32 (float64 for float64 weights)."""
    op = "accumulate_packed"
    _check_layout(op, layout)
    if layout.num_clients != 1:
        raise ValueError(f"{op}: the layout holds {layout.num_clients} clients; pass one client's, layout.client(k)")
    ref = _check_client_args(op, layout, weights, [client], "client")
    if validation_enabled():
        _check_partials(op, weights, mode, {"sums": sums, "cover": cover}, layout)
        weight = _layout_checks.check_number(op, "weight", weight)
        max_ssq = _layout_checks.check_number(op, "max_ssq", max_ssq, finite=False)
    stats = torch.empty(3, dtype=torch.float64, device=ref.device)
    t = layout._device_tables(ref.device)
    weights, (client,) = _as_views(layout, weights, [client])
    flat, parts = _flat_clients([client], layout.num_tensors)
    _operators.call_layout_op(
        _operators.accumulate_packed_op, list(weights), flat, parts, *t,
        float(weight), float(max_ssq), mode, sums, cover, stats,
    )  # fmt: skip
    return stats


def fold_packed(
    layout: RoundLayout,
    weights: Sequence[Tensor],
    clients: Sequence[Tensor | Sequence[Tensor]],
    coef: Tensor,
    mode: str,
    sums: Tensor | None,
    cover: Tensor | None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold the layout's K clients, in order, into running partial sums in one pass over
    their data; returns ``(sums_out, cover_out, stats)``.

    Every element receives its clients' terms one at a time in client order, so the result
    is bit for bit that of K :func:`accumulate_packed` calls with weights ``coef`` (none
    rejected), and ``stats`` ``(K, 2)`` float64 holds the reply statistics of
    :func:`aggregate_packed` from the same pass. Nothing is rejected here: ``sums`` /
    ``cover`` are left as they are (unless ``out`` is them), so a caller that finds a
    client to reject in ``stats`` folds again from them with its coefficient set to 0, which
    is its absence bit for bit. ``clients[k]``: client k's packed buffer or its N tensors.
    ``coef``: ``(K,)`` float64, finite, >= 0, as given (not normalised). ``sums`` / ``cover``:
    as for :func:`accumulate_packed`, or both None: the fold starts from zeros (the first
    window of a round: no pass to zero the buffers, none to read the zeros back; the result
    is bit for bit that of folding into zeroed buffers). ``out``: the ``(sums_out,
    cover_out)`` buffers to write (new ones unless given; ``(sums, cover)`` themselves folds
    in place, leaving nothing to fold again from).
    """
    op = "fold_packed"
    _check_layout(op, layout)
    ref = _check_client_args(op, layout, weights, clients)
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise TypeError(f"{op}: out must be a (sums_out, cover_out) pair of tensors")
    if (sums is None) != (cover is None):
        raise TypeError(f"{op}: pass sums and cover together (both None: start from zeros)")
    if validation_enabled():
        if sums is not None:
            _check_partials(op, weights, mode, {"sums": sums, "cover": cover}, layout)
        else:
            check_mode(op, mode)
        if out is not None:
            _check_partials(op, weights, mode, {"sums_out": out[0], "cover_out": out[1]}, layout)
        _layout_checks.check_coef(op, coef, layout.num_clients, ref.device, positive_sum=False)
    if out is not None:
        sums_out, cover_out = out
    elif sums is not None:
        sums_out, cover_out = torch.empty_like(sums), torch.empty_like(cover)
    else:
        acc = acc_dtype(weights[0].dtype)
        sums_out, cover_out = (empty_buffer(n, acc, ref.device) for n in layout._st.partial_sizes)
    weights, clients = _as_views(layout, weights, clients)
    flat, parts = _flat_clients(clients, layout.num_tensors)
    stats = torch.empty((len(clients), 2), dtype=torch.float64, device=ref.device)
    t = layout._device_tables(ref.device)
    _operators.call_layout_op(
        _operators.fold_packed_op, list(weights), flat, parts, *t,
        coef, mode, sums, cover, sums_out, cover_out, stats, layout._plan(ref.device),
    )  # fmt: skip
    return sums_out, cover_out, stats


def finish_partials(
    weights: Sequence[Tensor],
    sums: Tensor,
    cover: Tensor,
    weight_sum: float,
    mode: str,
    *,
    out: Tensor | None = None,
    layout: RoundLayout | None = None,
) -> Tensor:
    """The new global model from streaming partial sums, in one pass; returns the N results
    packed in order (1-D, the weights' dtype; :func:`packed_views` splits it).

    Where an element's (row, column) cover weight is > 0: ``w + sums / weight_sum``
    (reconstruct) or ``sums / cover`` (overlap), in the accumulation dtype, then rounded to
    the weights' dtype; elsewhere ``w``, bit for bit. ``sums`` / ``cover``: as
    :func:`accumulate_packed` and :func:`fold_packed` keep them. ``weight_sum``: the sum of
    the folded clients' weights (finite, >= 0). ``out``: the buffer to write (new unless given).
    ``layout``: the layout the partial sums were folded on; needed when its columns of some
    tensor are a later dim than 1 (without it, every tensor's columns are taken as dim 1, and
    a 1-D tensor's as its only dim).
    """
    op = "finish_partials"
    if not isinstance(weights, (list, tuple)) or not weights or not all(isinstance(w, Tensor) for w in weights):
        raise TypeError(f"{op}: weights must be a non-empty list of tensors")
    if layout is not None:
        _check_layout(op, layout)
        if len(weights) != layout.num_tensors:
            raise ValueError(f"{op}: {len(weights)} weights for a layout of {layout.num_tensors} tensors")
    device = weights[0].device
    total = sum(w.numel() for w in weights)
    if validation_enabled():
        check_floating(op, "weights[0]", weights[0])
        if any(w.dtype != weights[0].dtype or w.device != device or w.dim() < 1 for w in weights):
            raise ValueError(f"{op}: weights must share one dtype and device, each at least 1-D")
        if layout is not None:
            _layout_checks.check_weights(op, layout, weights)
        _check_partials(op, weights, mode, {"sums": sums, "cover": cover}, layout)
        if out is not None:
            _layout_checks.check_buffer(op, "out", out, total, weights[0].dtype, device)
        weight_sum = _layout_checks.check_number(op, "weight_sum", weight_sum)
    if out is None:
        out = _hugepages.empty(total, weights[0].dtype, device, prefault=True)
    if layout is not None:
        weights, _ = _as_views(layout, weights, [])
    _operators.call_layout_op(
        _operators.finish_partials_op, list(weights), sums, cover, float(weight_sum), mode, out
    )
    return out


def empty_buffer(numel: int, dtype: torch.dtype, device: torch.device | str, *, prefault: bool = False) -> Tensor:
    """A 1-D ``torch.empty`` for a large buffer (tens of MB and up: a model's partial sums, an
    aggregation output), where available on 2 MB transparent huge pages, as the library's own
    large outputs are: a fresh buffer then costs a few hundred page faults instead of one per
    4 KB. ``prefault``: map the pages now (one element of each is written; contents stay
    unspecified), before a parallel kernel would fault them in one by one. Plain
    ``torch.empty`` off Linux, on other devices, for small buffers, or with
    ``CAHFP_OPS_HUGEPAGES=0``. The result may start at a non-zero storage offset."""
    return _hugepages.empty(numel, dtype, device, prefault=prefault)


# Sets of views a Workspace keeps per role (a role viewed with a few layouts in turn).
_WORKSPACE_VIEW_SETS = 4


class Workspace:
    """Buffers kept across rounds, keyed by role, reused when size, dtype and device match.

    ``get(role, numel, dtype, device)`` returns the same storage round after round (no new
    pages to fault in; a new one is made as :func:`empty_buffer` makes them, its pages
    mapped up front); the caller owns the contract that nothing else still reads a buffer
    it hands out again. :class:`~cahfp_ops.fl.StreamingAggregator` takes one for its
    partial sums (the server keeps one across rounds).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        # per role, views of its buffer by the shapes they were asked for (dropped with the buffer)
        self._views: dict[str, OrderedDict] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(role)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            buf = self._buffers[role] = _hugepages.empty(numel, dtype, device, prefault=True)
            self._views.pop(role, None)
        return buf[:numel]

    def get_views(
        self, role: str, shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, list[Tensor]]:
        """``(flat, views)``: the role's buffer as :meth:`get` returns it for the shapes' total
        size (1-D), and views of ``shapes`` laid end to end in it, in order. The views are
        made once per buffer and shapes and kept with the buffer (a model of hundreds of
        tensors costs about 1 ms to view anew each round); a new list is returned each call.

        Raises:
            TypeError / ValueError: ``role`` is not a str, or ``shapes`` is not a sequence of
                shapes of ints >= 0 (nothing is allocated).
        """
        op = "Workspace.get_views"
        if not isinstance(role, str):
            raise TypeError(f"{op}: role must be a str, got {type(role).__name__}")
        try:  # a key (torch.Size and tuples of ints hash alike)
            shapes = tuple(map(tuple, shapes))
        except TypeError:
            raise TypeError(f"{op}: shapes must be a sequence of shapes (sequences of ints)") from None
        cache = self._views.get(role)
        if cache is None or shapes not in cache:  # checked once: a cached key was checked when made
            for i, shape in enumerate(shapes):
                if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
                    raise ValueError(f"{op}: shapes[{i}] must hold ints >= 0, got {shape!r}")
        flat = self.get(role, sum(math.prod(s) for s in shapes), dtype, device)
        cache = self._views.setdefault(role, OrderedDict())  # (get drops it with a replaced buffer)
        views = cache.get(shapes)
        if views is None:
            views = cache[shapes] = packed_views(flat, [tuple(int(d) for d in s) for s in shapes])
            if len(cache) > _WORKSPACE_VIEW_SETS:
                cache.popitem(last=False)
        else:
            cache.move_to_end(shapes)
        return flat, list(views)
