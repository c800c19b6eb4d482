"""Whole-model aggregation of compact client state_dicts: batch and streaming.

:func:`aggregate_state` aggregates K compact client state_dicts in one
``reconstruct_aggregate_many`` call. :class:`StreamingAggregator` takes clients one at a time
(or a window of arrived clients per call) with O(model) memory whatever K; its partial sums
are a value, :class:`AggregatePartials`, that merges (several aggregators) and flattens (one
all-reduce over processes).
Floating entries (parameters, BatchNorm running stats) are aggregated alike; integer entries
(``num_batches_tracked``) follow :func:`largest_reported`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cahfp_ops import (
    MODES,
    PackedModel,
    PackedScalars,
    RoundLayout,
    Workspace,
    acc_dtype,
    accumulate_packed,
    empty_buffer,
    finish_partials,
    fold_packed,
    reconstruct_aggregate_many,
    validation,
)

KeepMap = Mapping[str, Tensor | None]


def client_major(op: str, name: str, keep: object, K: int) -> list | None:
    """Per-client keep sets in the client-major form ``[K x {tensor: keep}]`` (None: all
    channels), from that form or from the ``*_many`` ops' form ``{tensor: [K keep sets]}``
    (or a padded ``(K, m)`` tensor, or one 1-D keep set shared by every client)."""
    if keep is None:
        return None
    if isinstance(keep, Mapping):
        out: list[dict] = [{} for _ in range(K)]
        for tensor, per_client in keep.items():
            for k, one in enumerate(_per_client(op, f"{name}[{tensor!r}]", per_client, K)):
                out[k][tensor] = one
        return out
    if isinstance(keep, (list, tuple)):
        if len(keep) != K:
            raise ValueError(f"{op}: {name} holds {len(keep)} entries for {K} updates (one mapping per update)")
        for k, one in enumerate(keep):
            if one is not None and not isinstance(one, Mapping):
                raise TypeError(
                    f"{op}: {name}[{k}] is a {type(one).__name__}; pass {name} as one mapping per update "
                    f"([K x {{tensor: keep}}]) or as {{tensor: [K keep sets]}} (the *_many ops' form)"
                )
        return list(keep)
    raise TypeError(
        f"{op}: {name} must be None, [K x {{tensor: keep}}] or {{tensor: [K keep sets]}}, got {type(keep).__name__}"
    )


def _per_client(op: str, name: str, keep: object, K: int) -> list:
    """One tensor's keep sets for K clients: a sequence of K, a padded ``(K, m)`` tensor, one
    1-D keep set shared by every client, or None."""
    if keep is None or (isinstance(keep, Tensor) and keep.dim() == 1):
        return [keep] * K
    if isinstance(keep, Tensor) and keep.dim() == 2:
        if keep.shape[0] != K:
            raise ValueError(f"{op}: {name} has {keep.shape[0]} rows for {K} updates")
        return [row[row >= 0] for row in keep]
    if isinstance(keep, (list, tuple)):
        if len(keep) != K:
            raise ValueError(f"{op}: {name} holds {len(keep)} keep sets for {K} updates")
        return list(keep)
    raise TypeError(f"{op}: {name} must be K keep sets, a padded (K, m) tensor, a 1-D keep set or None")


def _split(flat: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Views of ``shapes`` laid end to end in the 1-D ``flat``."""
    return [t.view(s) for t, s in zip(flat.split([math.prod(s) for s in shapes]), shapes)]


def largest_reported(current: Tensor, reported: Tensor) -> Tensor:
    """The rule for integer entries (``num_batches_tracked``): the new global value is the
    largest of the global value and the values reported by clients with a positive weight."""
    return torch.maximum(current, torch.as_tensor(reported).to(device=current.device, dtype=current.dtype))


def aggregate_state(
    global_state: Mapping[str, Tensor],
    client_states: Sequence[Mapping[str, Tensor]],
    rows: Mapping[str, Sequence[Tensor | None]],
    cols: Mapping[str, Sequence[Tensor | None]],
    weights: Sequence[float] | None = None,
    mode: str = "reconstruct",
) -> dict[str, Tensor]:
    """New global state_dict from K compact client state_dicts.

    ``rows`` / ``cols``: tensor name -> K keep sets (from ``ChannelPlan.tensor_keep_sets``).
    ``weights``: K non-negative client weights (e.g. sample counts; default equal).
    Integer entries follow :func:`largest_reported` (``reconstruct_aggregate_many`` applies
    that rule to a whole state_dict).
    """
    return dict(reconstruct_aggregate_many(global_state, client_states, rows, cols, weights, mode=mode))


@dataclass
class AggregatePartials:
    """The partial sums of a streaming aggregation, as a value.

    Attributes:
        sums: tensor name -> tensor of the global's shape (float32; float64 for float64
            entries): weighted sums of ``c_k - w`` (reconstruct) or of ``c_k`` (overlap) at
            each client's kept entries.
        cover: tensor name -> ``(R, Cin)`` (``(R,)`` for 1-D) sums of the weights of the
            clients keeping each entry, same dtype; for a tensor in ``views``, ``(R, Cin)`` of
            its view.
        ints: integer entry name -> its value so far under :func:`largest_reported`.
        weight_sum: the sum of the accepted clients' weights (float).
        count: clients folded in (accepted, weight 0 included).
        flats: per group of entries with one device and dtype (a tuple of their names), the
            1-D ``(sums, cover)`` buffers the entries of ``sums`` / ``cover`` are views of
            (what the accumulate kernel writes).
        views: tensor name -> ``(R, Cin, T)`` for the tensors whose columns are a later dim
            than 1 (folded on a layout built with a 5-tuple column spec): the view the layout
            gives them, and with it the shape of their cover weights. Empty: every tensor's
            columns are dim 1.
    """

    sums: dict[str, Tensor]
    cover: dict[str, Tensor]
    ints: dict[str, Tensor]
    weight_sum: float = 0.0
    count: int = 0
    flats: dict[tuple, tuple[Tensor, Tensor]] = field(default_factory=dict)
    views: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # adopt's views of each buffer it was given, by (names, address, size): add_many swaps
    # between two sets of buffers, and a model of hundreds of entries costs ~1 ms to re-view
    _views: dict[tuple, list[Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def zeros(
        cls,
        global_state: Mapping[str, Tensor],
        workspace: Workspace | None = None,
        *,
        fill: bool = True,
        views: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> AggregatePartials:
        """Empty partial sums for ``global_state`` (integer entries start at the global value);
        with ``workspace``, in its buffers (roles ``"partial sums i"`` / ``"partial cover i"``).
        ``fill=False``: the buffers are allocated but not zeroed (for a caller that zeroes or
        overwrites them before anything reads them). ``views``: as the attribute (tensors whose
        columns are a later dim, by name)."""
        views = dict(views or {})
        groups: dict[tuple, list[str]] = {}
        ints = {}
        for name, w in global_state.items():
            if w.is_floating_point():
                groups.setdefault((w.device, w.dtype), []).append(name)
            else:
                ints[name] = w.clone()
        sums, cover, flats = {}, {}, {}
        for i, ((device, dtype), names) in enumerate(groups.items()):
            acc = acc_dtype(dtype)
            shapes = [tuple(global_state[n].shape) for n in names]
            cover_shapes = [views[n][:2] if n in views else (s[0],) if len(s) == 1 else s[:2]
                            for n, s in zip(names, shapes)]  # fmt: skip
            if workspace is None:
                flat_s = empty_buffer(sum(math.prod(s) for s in shapes), acc, device, prefault=True)
                flat_c = empty_buffer(sum(math.prod(s) for s in cover_shapes), acc, device, prefault=True)
                views_s, views_c = _split(flat_s, shapes), _split(flat_c, cover_shapes)
            else:  # the workspace keeps the views with its buffers: none made anew round after round
                flat_s, views_s = workspace.get_views(f"partial sums {i}", shapes, acc, device)
                flat_c, views_c = workspace.get_views(f"partial cover {i}", cover_shapes, acc, device)
            if fill:
                flat_s.zero_(), flat_c.zero_()
            sums.update(zip(names, views_s))
            cover.update(zip(names, views_c))
            flats[tuple(names)] = (flat_s, flat_c)
        out = cls(sums, cover, ints, flats=flats, views=views)
        for names, (flat_s, flat_c) in flats.items():
            out._remember(names, flat_s, flat_c, [sums[n] for n in names], [cover[n] for n in names])
        return out

    def _remember(self, names: tuple, flat_s: Tensor, flat_c: Tensor, views_s: list[Tensor],
                 views_c: list[Tensor]) -> None:  # fmt: skip
        """Keep ``views_s`` / ``views_c`` (the group's entries as views of ``flat_s`` /
        ``flat_c``, laid out as ``flats[names]``) for :meth:`adopt` to hand out."""
        for store, flat, views in (("sums", flat_s, views_s), ("cover", flat_c, views_c)):
            self._views[(store, names, flat.data_ptr(), flat.numel())] = views

    def adopt(self, names: tuple, flat_s: Tensor, flat_c: Tensor) -> tuple[Tensor, Tensor]:
        """Make ``flat_s`` / ``flat_c`` (laid out as ``flats[names]``) the group's buffers, the
        entries of ``sums`` / ``cover`` views of them; returns the group's previous buffers."""
        old = self.flats[names]
        for store, entries, flat in (("sums", self.sums, flat_s), ("cover", self.cover, flat_c)):
            key = (store, names, flat.data_ptr(), flat.numel())
            views = self._views.get(key)
            if views is None:  # the views hold the buffer, so its address is not reused while cached
                views = self._views[key] = _split(flat, [tuple(entries[n].shape) for n in names])
            entries.update(zip(names, views))
        self.flats[names] = (flat_s, flat_c)
        return old

    def merge(self, other: AggregatePartials) -> None:
        """Add ``other``'s partial sums to these, in place (same tensors, same ``views``)."""
        if other.sums.keys() != self.sums.keys() or other.ints.keys() != self.ints.keys():
            raise ValueError("AggregatePartials.merge: the partial sums hold different tensors")
        if other.views != self.views:
            raise ValueError("AggregatePartials.merge: the partial sums lay out some tensor's columns differently")
        for name in self.sums:
            self.sums[name] += other.sums[name]
            self.cover[name] += other.cover[name]
        for name in self.ints:
            self.ints[name] = largest_reported(self.ints[name], other.ints[name])
        self.weight_sum += other.weight_sum
        self.count += other.count

    def flatten(self) -> tuple[Tensor, Tensor]:
        """``(floats, ints)``: one float64 vector holding every sum, every cover, the weight
        sum and the count (merged by addition), and one int64 vector holding the integer
        entries (merged by maximum, :func:`largest_reported`), both in sorted name order."""
        names = sorted(self.sums)
        device = next(iter(self.sums.values())).device if names else torch.device("cpu")
        floats = torch.cat(
            [self.sums[n].reshape(-1).double() for n in names]
            + [self.cover[n].reshape(-1).double() for n in names]
            + [torch.tensor([self.weight_sum, float(self.count)], dtype=torch.float64, device=device)]
        )
        int_names = sorted(self.ints)
        values = [self.ints[n].reshape(()).to(device=device, dtype=torch.int64) for n in int_names]
        ints = torch.stack(values) if values else torch.zeros(0, dtype=torch.int64, device=device)
        return floats, ints

    def unflatten(self, floats: Tensor, ints: Tensor) -> AggregatePartials:
        """New partial sums shaped like these, read from vectors laid out as :meth:`flatten` writes them."""
        out = AggregatePartials(*self._empty_like())
        offset = 0
        for store in ("sums", "cover"):
            for n in sorted(self.sums):
                t = getattr(out, store)[n]
                t.copy_(floats[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        for n, v in zip(sorted(self.ints), ints):
            out.ints[n] = v.to(device=self.ints[n].device, dtype=self.ints[n].dtype).reshape(self.ints[n].shape)
        out.weight_sum = float(floats[offset])
        out.count = int(round(float(floats[offset + 1])))
        return out

    def _empty_like(self) -> tuple:
        sums, cover, flats = {}, {}, {}
        for names, (fs, fc) in self.flats.items():
            new_s, new_c = torch.zeros_like(fs), torch.zeros_like(fc)
            sums.update(zip(names, _split(new_s, [tuple(self.sums[n].shape) for n in names])))
            cover.update(zip(names, _split(new_c, [tuple(self.cover[n].shape) for n in names])))
            flats[names] = (new_s, new_c)
        return sums, cover, {n: v.clone() for n, v in self.ints.items()}, 0.0, 0, flats, dict(self.views)


@dataclass(frozen=True)
class Fold:
    """What :meth:`StreamingAggregator.add` did with one client.

    ``accepted``: folded in (False: the partial sums are unchanged). ``nonfinite``: it held a
    value that is not finite in the global dtype (or a delta not finite in the accumulation
    dtype). ``update_size``: the root-mean-square of its delta ``c - w`` over its kept floating
    entries (NaN for a malformed update, which is not read). ``kept``: how many entries that
    is. ``reason``: why it was rejected (None when accepted): malformed (not a state_dict, a
    missing tensor, a wrong shape, dtype kind or device, a packed buffer of the wrong size),
    non-finite, or over ``max_update``.
    """

    accepted: bool
    nonfinite: bool
    update_size: float
    kept: int
    clip_scale: float | None = None  # the factor its delta was scaled by (``clip=True``), else None
    reason: str | None = None


class StreamingAggregator:
    """Aggregate client updates as they arrive, in O(model) memory.

    ``add(update, rows, cols, weight)`` checks and folds in one client: its compact
    state_dict (or :class:`~cahfp_ops.layout.PackedModel`) and, per tensor name, its kept rows
    / cols (missing or None: all); with ``layout=`` and ``client=`` (a round's
    :class:`~cahfp_ops.layout.RoundLayout`) the keep sets come from the layout instead, which
    is the fast path (a layout whose columns of some tensor are a later dim than 1 lays out
    the partial sums of that tensor as its view, :attr:`AggregatePartials.views`; once a
    client is folded in, every call keeps that column layout). One kernel call per client,
    all its tensors: a statistics pass, then the accumulation, so a client holding a
    non-finite value (or with an update larger than ``max_update``) is rejected without a
    trace. ``result()`` returns the new global
    state_dict: in ``reconstruct`` mode ``w + sum_k p_k E_k(c_k - w)``, in ``overlap`` mode the
    weighted mean over the clients keeping each element, as the batch ops define them. Sums
    are float32 (float64 for float64 entries), deterministic for a fixed arrival order; they
    match the batch path within float32 rounding. ``partials()`` gives the partial sums
    (:class:`AggregatePartials`); ``merge(other)`` adds another aggregator's.

    ``add_many(updates, weights, ...)`` folds a window of clients that have arrived together
    in one kernel pass over their data (:func:`~cahfp_ops.fold_packed`): the partial sums
    are read and written once per window instead of once per client, which is what makes
    streaming cost about what the batch call costs. It returns the same :class:`Fold` s and
    leaves the same partial sums, bit for bit, as ``add`` on each client in order. It keeps
    a second set of partial sums to fold into (O(model) more memory, allocated at the first
    call), so a rejection found after the pass leaves no trace: the window is folded again
    from the unchanged sums without it. After ``add_many`` the partial sums' tensors are
    the other set: read them through :meth:`partials` after adding, not from an earlier
    reference.

    ``workspace`` (a :class:`~cahfp_ops.Workspace`): both sets of partial sums live in its
    buffers, so an aggregator per round reuses last round's memory instead of mapping new
    pages (the server keeps one). One live aggregator per workspace: a new one on the same
    workspace overwrites the buffers the previous one's partial sums are views of. A new
    aggregator's first ``add_many`` folds from zeros without zeroing or reading its buffers
    first (:func:`~cahfp_ops.fold_packed` with no input sums)."""

    def __init__(
        self, global_state: Mapping[str, Tensor], mode: str = "reconstruct", *, workspace: Workspace | None = None
    ):
        if mode not in MODES:
            raise ValueError(f"StreamingAggregator: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.global_state = dict(global_state)
        self._workspace = workspace
        # The partial sums start unzeroed: a first add_many folds from zeros without a pass to
        # zero them (fold_packed with no input sums); anything else zeroes them first (_zeroed).
        self._partials = AggregatePartials.zeros(self.global_state, workspace, fill=False)
        self._unfilled = True
        self._spare: dict[tuple, tuple[Tensor, Tensor]] = {}  # add_many's second set of partial sums

    @property
    def count(self) -> int:
        """Clients folded in so far (weight 0 included)."""
        return self._partials.count

    @property
    def weight_sum(self) -> float:
        return self._partials.weight_sum

    def add(
        self,
        update: Mapping[str, Tensor],
        rows: KeepMap | None = None,
        cols: KeepMap | None = None,
        weight: float = 1.0,
        *,
        layout: RoundLayout | Sequence[RoundLayout] | None = None,
        client: int | None = None,
        max_update: float | None = None,
        clip: bool = False,
    ) -> Fold:
        """Check one client's compact state_dict and fold it in with weight ``weight`` (>= 0).

        ``max_update``: a client whose update size (RMS of its delta) exceeds it is rejected,
        or, with ``clip=True``, folded in with its delta scaled down to that size (one more
        pass over its data). Returns a :class:`Fold`; a rejected client leaves the partial
        sums unchanged. The partial sums are float32 (float64): weights far above the others
        (beyond about 1e30 times a delta) overflow them, so callers with extreme weights scale
        them first (the Server divides a round's weights by their largest).
        """
        if not _is_weight(weight):
            raise ValueError(f"StreamingAggregator.add: weight must be a finite number >= 0, got {weight!r}")
        if (layout is None) != (client is None):
            raise ValueError("StreamingAggregator.add: pass layout and client together")
        self._zeroed()  # add folds in place
        calls, problems = self._group_calls(
            "StreamingAggregator.add", [update], [rows], [cols], layout, None if client is None else [client]
        )
        if problems[0] is not None:
            return _malformed(problems[0])
        kept = sum(int(one.numels[0]) for _, one, *_ in calls)
        bound = math.inf if max_update is None else float(max_update) ** 2 * max(kept, 1)
        decided = None
        if (clip and bound < math.inf) or len(calls) > 1:
            # Statistics first (several dtype groups: all checked before any is folded; clip:
            # an oversized delta is scaled down), then the accumulation without a bound.
            bad, ssq = False, 0.0
            for _, one, ws, data, flat_s, flat_c in calls:
                with validation(False):  # the update was checked above; the rest is the aggregator's own
                    st = accumulate_packed(one, ws, data[0], 0.0, self.mode, flat_s, flat_c)
                ssq += float(st[1])
                bad = bool(st[0])
                if bad:
                    break
            decided = verdict(bad, ssq, kept, max_update, clip)
            if not decided.accepted:
                return decided
            if decided.clip_scale is not None:
                calls = [(n, o, ws, [clipped_data(o, ws, d[0], decided.clip_scale)], fs, fc)
                         for n, o, ws, d, fs, fc in calls]  # fmt: skip
            bound = math.inf
        ssq = 0.0
        for _, one, ws, data, flat_s, flat_c in calls:
            with validation(False):
                st = accumulate_packed(one, ws, data[0], float(weight), self.mode, flat_s, flat_c, max_ssq=bound)
            ssq += float(st[1])
            if not st[2]:  # rejected by the kernel: non-finite, or over the bound
                return verdict(bool(st[0]), ssq, kept, max_update, False)
        self._count_in(update, weight)
        return decided if decided is not None else verdict(False, ssq, kept, None, False)

    def add_many(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        rows: Sequence[KeepMap | None] | None = None,
        cols: Sequence[KeepMap | None] | None = None,
        *,
        layout: RoundLayout | Sequence[RoundLayout] | None = None,
        clients: Sequence[int] | None = None,
        max_update: float | None = None,
        clip: bool = False,
    ) -> list[Fold]:
        """Check and fold a window of clients in one pass over their data; returns their
        :class:`Fold` s, bit for bit what :meth:`add` on each of them in order returns, with
        the same partial sums afterwards.

        ``updates[j]``, ``weights[j]``: client j's compact state_dict (or
        :class:`~cahfp_ops.layout.PackedModel`) and weight (>= 0). Keep sets: ``rows[j]`` /
        ``cols[j]`` as :meth:`add` takes them (client-major: ``[K x {name: keep}]``), or
        ``{name: [K keep sets]}`` as the ``*_many`` ops take them, or ``layout=`` (a round's
        :class:`~cahfp_ops.layout.RoundLayout`, or one per dtype group for a model with several
        floating dtypes) with ``clients=`` (each update's client index in it), the fast path.
        ``max_update`` / ``clip``: as :meth:`add`, per client. The window's replies stay
        referenced until the call returns; its cost beyond the clients' data is one read and
        one write of the partial sums, so windows of a few tens of clients bring streaming
        close to the batch call.

        Example:
            >>> global_sd = {"w": torch.zeros(3, 2)}
            >>> rows = {"w": [torch.tensor([0, 1]), torch.tensor([1, 2])]}  # the *_many ops' form
            >>> agg = StreamingAggregator(global_sd)
            >>> folds = agg.add_many([{"w": torch.ones(2, 2)}, {"w": 3 * torch.ones(2, 2)}], [1, 1], rows)
            >>> [f.accepted for f in folds], agg.result()["w"][:, 0]
            ([True, True], tensor([0.5000, 2.0000, 1.5000]))
        """
        K = len(updates)
        if len(weights) != K:
            raise ValueError(f"StreamingAggregator.add_many: {K} updates but {len(weights)} weights")
        rows = client_major("StreamingAggregator.add_many", "rows", rows, K)
        cols = client_major("StreamingAggregator.add_many", "cols", cols, K)
        for wt in weights:
            if not _is_weight(wt):
                raise ValueError(f"StreamingAggregator.add_many: weights must be finite numbers >= 0, got {wt!r}")
        if (layout is None) != (clients is None):
            raise ValueError("StreamingAggregator.add_many: pass layout and clients together")
        if clients is not None and len(clients) != K:
            raise ValueError(f"StreamingAggregator.add_many: {K} updates but {len(clients)} clients")

        def window(sl: slice) -> list[Fold]:
            return self.add_many(
                updates[sl], weights[sl], None if rows is None else rows[sl], None if cols is None else cols[sl],
                layout=layout, clients=None if clients is None else clients[sl], max_update=max_update, clip=clip,
            )  # fmt: skip

        if K == 0:
            return []
        if K == 1:  # one client: folding in place (add) reads and writes only its part of the sums
            return [self.add(updates[0], None if rows is None else rows[0], None if cols is None else cols[0],
                             weights[0], layout=layout, client=None if clients is None else clients[0],
                             max_update=max_update, clip=clip)]  # fmt: skip
        calls, problems = self._group_calls(
            "StreamingAggregator.add_many", updates, rows or [None] * K, cols or [None] * K, layout, clients
        )
        if any(p is not None for p in problems):  # malformed updates: rejected, the others folded as a window
            good = [j for j, p in enumerate(problems) if p is None]

            def pick(seq: Sequence | None) -> list | None:
                return None if seq is None else [seq[j] for j in good]

            folded = iter(self.add_many(
                pick(updates), pick(weights), pick(rows), pick(cols), layout=layout, clients=pick(clients),
                max_update=max_update, clip=clip,
            ))  # fmt: skip
            return [next(folded) if p is None else _malformed(p) for p in problems]
        sig = [tuple(data_dtype(call[3][j]) for call in calls) for j in range(K)]
        split = next((j for j in range(1, K) if sig[j] != sig[0]), None)
        if split is not None:  # one kernel call reads one client dtype: fold runs of equal dtypes in turn
            return window(slice(None, split)) + window(slice(split, None))
        kept = [0] * K
        ssq = [0.0] * K
        bad = [False] * K
        coef = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        zero = self._unfilled  # the first window folds from zeros: no input sums to read
        outs = []
        for i, (names, sub, ws, data, flat_s, flat_c) in enumerate(calls):
            spare = self._spare.get(names)
            if spare is None:
                spare = self._spare[names] = self._second_set(i, names)
            if zero:
                flat_s = flat_c = None
            with validation(False):  # the updates were checked above; the rest is the aggregator's own
                s_out, c_out, st = fold_packed(sub, ws, data, coef.to(spare[0].device), self.mode, flat_s, flat_c,
                                               out=spare)  # fmt: skip
            outs.append((s_out, c_out))
            for j, (b, q) in enumerate(st.cpu().tolist()):
                bad[j] = bad[j] or bool(b)
                ssq[j] += q
                kept[j] += int(sub.numels[j])
        folds = [verdict(bad[j], ssq[j], kept[j], max_update, clip) for j in range(K)]
        if any(not f.accepted or f.clip_scale is not None for f in folds):
            # fold again from the unchanged sums: rejected clients at coefficient 0 (absent, bit
            # for bit), clipped ones with their scaled data
            coef = torch.tensor([float(w) if f.accepted else 0.0 for w, f in zip(weights, folds)], dtype=torch.float64)
            for (_, sub, ws, data, flat_s, flat_c), out in zip(calls, outs):
                data = [d if f.clip_scale is None else clipped_data(sub.client(j), ws, d, f.clip_scale)
                        for j, (d, f) in enumerate(zip(data, folds))]  # fmt: skip
                if zero:
                    flat_s = flat_c = None
                with validation(False):
                    fold_packed(sub, ws, data, coef.to(out[0].device), self.mode, flat_s, flat_c, out=out)
        for (names, *_), (s_out, c_out) in zip(calls, outs):
            self._spare[names] = self._partials.adopt(names, s_out, c_out)
        self._unfilled = False
        for u, wt, f in zip(updates, weights, folds):
            if f.accepted:
                self._count_in(u, wt)
        return folds

    def _group_calls(
        self, op: str, updates: Sequence, rows: Sequence, cols: Sequence, layout: RoundLayout | None,
        clients: Sequence[int] | None,
    ) -> tuple[list[tuple], list[str | None]]:  # fmt: skip
        """Per group of entries (one device and dtype): ``(names, layout of the updates, the
        global's tensors, each update's data, flat sums, flat cover)``; and per update why it
        is malformed (None: well formed; its data is then in every group's call). The layout
        is the round layout's clients (``layout`` / ``clients``) or one built from the updates'
        per-tensor keep sets (``rows[j]`` / ``cols[j]``, None: all channels)."""
        K = len(updates)
        calls = []
        problems: list[str | None] = [ints_problem(u, self._partials.ints) for u in updates]
        layouts = {} if layout is None else {one.names: one for one in _layouts(layout)}
        self._use_views(op, layouts)
        for names, (flat_s, flat_c) in self._partials.flats.items():
            ws = [self.global_state[n] for n in names]
            if layout is not None:
                lay = layouts.get(names)
                if lay is None:
                    raise ValueError(f"{op}: no layout lays out this model's entries {names[:3]}...")
                sub = lay.client(clients[0]) if K == 1 else lay.subset(list(clients))
                made = [update_data(u, lay, k, names, ws[0].dtype) for u, k in zip(updates, clients)]
            else:
                rs, cs = [r or {} for r in rows], [c or {} for c in cols]
                sub = RoundLayout.from_keep_sets(
                    dict(zip(names, ws)), _per_tensor_lists(rs, names),
                    _per_tensor_lists(cs, [n for n in names if self.global_state[n].dim() > 1]),
                    num_clients=K, op=op,
                )  # fmt: skip
                made = [update_data(u, sub, j, names, ws[0].dtype) for j, u in enumerate(updates)]
            problems = [p or q for p, (_, q) in zip(problems, made)]
            calls.append((names, sub, ws, [d for d, _ in made], flat_s, flat_c))
        return calls, problems

    def _use_views(self, op: str, layouts: Mapping[tuple, RoundLayout]) -> None:
        """The partial sums laid out as ``layouts`` lay out the tensors' columns (keep sets, no
        layouts: dim 1): while nothing is folded in, they are made anew to match; afterwards a
        call that lays some tensor's columns out otherwise is refused."""
        wanted = {}
        for names, lay in layouts.items():
            wanted.update((names[n], view) for n, view in lay.later_column_views.items())
        have = self._partials.views
        if wanted == have:
            return
        if self._partials.count == 0:
            self._partials = AggregatePartials.zeros(
                self.global_state, self._workspace, fill=not self._unfilled, views=wanted
            )
            self._spare = {}
            return
        name = next(n for n in sorted(wanted.keys() | have.keys()) if wanted.get(n) != have.get(n))

        def cols(views: dict) -> str:
            return f"a later dim, viewed as {views[name]}" if name in views else "dim 1"

        raise ValueError(
            f"{op}: the partial sums hold {name!r} with its columns on {cols(have)}; this call lays them "
            f"out on {cols(wanted)} (an aggregator keeps the column layout of its first layout)"
        )

    def _count_in(self, update: Mapping[str, Tensor], weight: float) -> None:
        """An accepted client counted: its weight, and its integer entries (weight > 0)."""
        p = self._partials
        p.count += 1
        p.weight_sum += float(weight)
        if weight > 0:
            for name in p.ints:
                p.ints[name] = largest_reported(p.ints[name], update[name])

    def _second_set(self, i: int, names: tuple) -> tuple[Tensor, Tensor]:
        """add_many's second set of partial-sum buffers for group i (entries ``names``), laid
        out as the first (which the workspace holds under the other roles); with a workspace,
        its views (kept with its buffers) are handed to the partial sums for :meth:`adopt`."""
        p = self._partials
        flat_s, flat_c = p.flats[names]
        if self._workspace is None:
            return tuple(empty_buffer(t.numel(), t.dtype, t.device, prefault=True) for t in (flat_s, flat_c))
        ws = self._workspace
        s_shapes, c_shapes = [p.sums[n].shape for n in names], [p.cover[n].shape for n in names]
        second_s, views_s = ws.get_views(f"second partial sums {i}", s_shapes, flat_s.dtype, flat_s.device)
        second_c, views_c = ws.get_views(f"second partial cover {i}", c_shapes, flat_c.dtype, flat_c.device)
        p._remember(names, second_s, second_c, views_s, views_c)
        return second_s, second_c

    def _zeroed(self) -> None:
        """Zero the partial sums if nothing has been folded into them yet."""
        if self._unfilled:
            for flat_s, flat_c in self._partials.flats.values():
                flat_s.zero_(), flat_c.zero_()
            self._unfilled = False

    def partials(self) -> AggregatePartials:
        """The partial sums so far (the live value: :meth:`AggregatePartials.merge` on it changes this aggregator)."""
        self._zeroed()
        return self._partials

    def load_partials(self, partials: AggregatePartials) -> None:
        """Replace the partial sums (e.g. with all processes' sums after an all-reduce)."""
        if partials.sums.keys() != self._partials.sums.keys() or partials.ints.keys() != self._partials.ints.keys():
            raise ValueError("StreamingAggregator.load_partials: the partial sums hold different tensors")
        self._partials = partials
        self._unfilled = False

    def merge(self, other: StreamingAggregator) -> None:
        """Add another aggregator's partial sums (same global state and mode)."""
        if other.mode != self.mode or other.global_state.keys() != self.global_state.keys():
            raise ValueError("StreamingAggregator.merge: the aggregators differ in mode or tensors")
        self._zeroed()
        self._partials.merge(other.partials())

    def result(self) -> dict[str, Tensor]:
        """The new global state_dict (the global model itself when no weight arrived): where
        some weight covers an element, ``w`` plus the weighted mean delta (reconstruct) or the
        weighted mean (overlap), else ``w``; one pass per group of entries
        (:func:`~cahfp_ops.finish_partials`), whose entries are views of one new buffer."""
        self._zeroed()
        p = self._partials
        out = {}
        for names, (flat_s, flat_c) in p.flats.items():
            ws = [self.global_state[n] for n in names]
            viewed = [w.reshape(p.views[n]) if n in p.views else w for n, w in zip(names, ws)]
            flat = finish_partials(viewed, flat_s, flat_c, max(p.weight_sum, 1e-300), self.mode)
            out.update(zip(names, _split(flat, [tuple(w.shape) for w in ws])))
        for name, w in self.global_state.items():
            if not w.is_floating_point():
                out[name] = p.ints[name].clone()
        return {name: out[name] for name in self.global_state}


def _is_weight(x: object) -> bool:
    """A client weight: a finite real number >= 0 (not a bool)."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _malformed(problem: str) -> Fold:
    """The :class:`Fold` of an update rejected unread: it is not the compact model it should be."""
    return Fold(False, False, math.nan, 0, reason=f"malformed: the update {problem}")


def verdict(bad: bool, ssq: float, kept: int, max_update: float | None, clip: bool) -> Fold:
    """What becomes of a client from its statistics, the one rule of every aggregation path
    (batch and streaming, the server's and the aggregator's): non-finite (``bad``), or an
    update size (RMS of its delta over its ``kept`` entries, ``ssq`` the sum of its squared
    deltas, pooled over every dtype group) over ``max_update``, is rejected, or clipped with
    ``clip``; else accepted. ``Fold.reason`` says why a client was rejected."""
    size = math.sqrt(ssq / max(kept, 1))
    if bad:
        return Fold(False, True, math.inf, kept, reason="holds non-finite values (in the global dtype or its update)")
    if max_update is not None and ssq > float(max_update) ** 2 * max(kept, 1):
        if not clip:
            return Fold(False, False, size, kept, reason=f"update size {size:.4g} exceeds the bound {max_update:.4g}")
        return Fold(True, False, size, kept, float(max_update) / size)
    return Fold(True, False, size, kept)


def _layouts(layout: RoundLayout | Sequence[RoundLayout]) -> list[RoundLayout]:
    """One round layout, or one per dtype group of a model with several floating dtypes."""
    return [layout] if isinstance(layout, RoundLayout) else list(layout)


def _per_tensor_lists(maps: Sequence[KeepMap], names: Sequence[str]) -> dict[str, list]:
    """Per tensor name, the clients' keep sets as one list (``maps[j].get(name)``). Tensors
    whose clients all hand the same keep-set objects share one list object, which the layout
    then checks and maps once (a channel group's keep sets are shared by its tensors)."""
    shared: dict[tuple, list] = {}
    out = {}
    for n in names:
        items = [m.get(n) for m in maps]
        out[n] = shared.setdefault(tuple(id(x) for x in items), items)
    return out


def data_dtype(data: Tensor | list[Tensor]) -> torch.dtype | None:
    """The dtype of one client's data for a kernel call (None: no tensors)."""
    if isinstance(data, Tensor):
        return data.dtype
    return data[0].dtype if data else None


def client_data(
    update: Mapping[str, Tensor], layout: RoundLayout, k: int, names: tuple, dtype: torch.dtype
) -> Tensor | list[Tensor]:
    """The client's packed buffer when ``update`` is laid out as ``layout`` lays out client k,
    else its tensors for ``names`` (cast to the global dtype when they mix dtypes). Raises
    ValueError when ``update`` cannot be client k's compact model (see :func:`update_data`)."""
    data, problem = update_data(update, layout, k, names, dtype)
    if problem is not None:
        raise ValueError(f"client {k}'s update {problem}")
    return data


def update_data(
    update: object, layout: RoundLayout, k: int, names: tuple, dtype: torch.dtype
) -> tuple[Tensor | list[Tensor] | None, str | None]:
    """``(data, None)`` as :func:`client_data` gives it, or ``(None, why)`` when ``update`` is
    not client k's compact model on ``layout`` (not a mapping, a missing tensor, a tensor of
    the wrong shape, kind or device, a packed buffer of the wrong size). Never raises: an
    update is untrusted input. Reads shapes only (one pass over the names)."""
    if isinstance(update, PackedModel):
        problem = update.problem()
        if problem is not None:
            return None, problem
        if update.matches(layout, k, names):
            problem = layout.client_problem(k, update.buffer)
            return (None, f"packed buffer {problem}") if problem else (update.buffer, None)
    if not isinstance(update, Mapping):
        return None, f"is a {type(update).__name__}, not a state_dict"
    missing = next((n for n in names if n not in update), None)
    if missing is not None:
        return None, f"has no tensor {missing!r}"
    tensors = [update[n] for n in names]
    if all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors) and len({t.dtype for t in tensors}) > 1:
        tensors = [t.to(dtype) for t in tensors]
    problem = layout.client_problem(k, tensors)
    if problem is not None:
        return None, ("tensor " + problem) if problem.startswith("[") else problem
    return tensors, None


def ints_problem(update: object, ints: Mapping[str, Tensor]) -> str | None:
    """Why ``update``'s integer entries cannot be read like the global ``ints`` (missing, not
    a tensor, floating, or another shape), or None. Scalars packed as one tensor
    (:class:`~cahfp_ops.PackedScalars`) are checked as that tensor."""
    if not ints:
        return None
    extras = update.extras if isinstance(update, PackedModel) else None
    if isinstance(extras, PackedScalars) and set(extras.names) == set(ints):
        v = extras.values
        if not isinstance(v, Tensor) or v.shape != (len(extras.names),) or _not_integer(v):
            return "has packed integer entries that are not one integer tensor per entry"
        if any(ints[n].dim() != 0 for n in extras.names):
            return "packs integer entries that are not scalars"
        return None
    for name, ref in ints.items():
        if name not in update:
            return f"has no entry {name!r}"
        t = update[name]
        if not isinstance(t, Tensor):
            return f"entry {name!r} is a {type(t).__name__}, not a tensor"
        if t.shape != ref.shape or _not_integer(t):
            return f"entry {name!r} is a {tuple(t.shape)} {t.dtype} tensor, expected {tuple(ref.shape)} {ref.dtype}"
    return None


def _not_integer(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.device.type == "meta"


def clipped_data(layout: RoundLayout, weights: list[Tensor], data: Tensor | list[Tensor], scale: float) -> Tensor:
    """A one-client ``layout``'s data with its delta scaled: ``g + scale * (c - g)``, where
    ``g`` is the global ``weights`` sliced to the client's keep sets. One packed buffer in the
    global dtype, computed in the accumulation dtype. With ``0 <= scale <= 1`` every value
    lies between ``g`` and ``c``, so a finite reply stays finite."""
    g = layout.slice(weights)[0]
    acc = acc_dtype(g.dtype)
    c = data if isinstance(data, Tensor) else torch.cat([t.reshape(-1) for t in data])
    g32 = g.to(acc)
    return (g32 + scale * (c.to(device=g.device, dtype=acc) - g32)).to(g.dtype)
