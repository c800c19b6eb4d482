"""One CA-HFP server: assign -> extract -> clients train -> aggregate -> update importance.

    server = Server(model, example_input, criterion="curvature")
    report = server.run_round(ratios={cid: r, ...}, train=my_train_fn)

or, step by step (what a framework integration does): ``assignments = server.assign(ratios)``;
send ``assignments[cid].state`` (a compact state_dict; ``server.build(cid)`` gives the module);
collect replies; ``report = server.aggregate(replies, weights)``. Replies are untrusted input
(the SPEC's server section): a malformed reply, a bad weight, a reply from a client not
assigned in the open round, a reply tagged with another round, a second reply of a client,
a non-finite value or an update far larger than the round's others is rejected with a reason
naming the client (:mod:`cahfp_ops.fl.replies`), and the round goes on; the new global model
equals, bit for bit, the aggregation of the accepted replies alone. Clients that do not reply
are absent. The report holds one :class:`ClientRecord` per client of the round.
Global arrays held elsewhere (a framework's copy) come in with :meth:`Server.adopt`.
``save`` / ``load`` keep the whole server state (global model, importance history, round
number, RNG state) atomically (:mod:`cahfp_ops.fl.checkpoint`); a restored server produces
bit-identical next rounds.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import statistics
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cahfp_ops import (
    MODES,
    REDUCERS,
    PackedModel,
    PackedScalars,
    RoundLayout,
    Workspace,
    aggregate_packed,
    load_cpp,
    reconstruct_aggregate_many,
    validation,
)

from .aggregate import Fold, StreamingAggregator, clipped_data, data_dtype, largest_reported, update_data, verdict
from .checkpoint import load_checkpoint, save_atomic
from .compact import build_compact, count_flops, count_params
from .importance import Importance, make_importance, random_scores
from .masks import Ratio, assign_keep_tables, keep_sets_of_tables
from .plan import ChannelPlan
from .replies import check_reply, check_weight
from .report import ClientRecord, RoundReport
from .trace import trace_plan

BOUND_ACTIONS = ("reject", "clip")
#: Replies folded per kernel call by streaming aggregation (``StreamingAggregator.add_many``):
#: the partial sums are read and written once per window; bit for bit the same result as
#: folding one reply at a time. Measured at K = 100 (2 threads, bench/RESULTS.md): windows of
#: 64 cost about 1.3x the batch call on VGG-16 and ResNet-56, windows of 16 about 2x, one
#: reply per call 6-10x.
STREAM_WINDOW = 64
_NO_WEIGHT = object()  # a reply tuple without a weight of its own


def _reply_list(updates: object) -> list[tuple]:
    """``(client, reply, weight or _NO_WEIGHT)`` in arrival order, from a mapping or from
    ``(client, reply)`` / ``(client, reply, weight)`` tuples."""
    if isinstance(updates, Mapping):
        return [(cid, u, _NO_WEIGHT) for cid, u in updates.items()]
    out = []
    for item in updates:
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise TypeError(
                "Server.aggregate: updates must be a mapping or (client, reply[, weight]) tuples, "
                f"got {type(item).__name__}"
            )
        out.append((item[0], item[1], item[2] if len(item) == 3 else _NO_WEIGHT))
    return out


def _on_device(update: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A well-formed reply with tensors on another device than the global model's, moved
    there (e.g. CPU uploads for a CUDA server); otherwise the reply itself."""
    if isinstance(update, PackedModel) and isinstance(expected, PackedModel):
        device = expected.buffer.device
        if update.buffer.device == device:
            return update
        extras = update.extras
        extras = PackedScalars(extras.names, extras.values.to(device)) if isinstance(extras, PackedScalars) else {
            k: v.to(device) for k, v in extras.items()}  # fmt: skip
        return PackedModel(update.buffer.to(device), update.layout, update.client, update.names, extras=extras)
    if all(update[k].device == v.device for k, v in expected.items()):
        return update
    return {k: update[k].to(v.device) for k, v in expected.items()}


@dataclass
class Assignment:
    """What one client gets this round."""

    keeps: dict[str, Tensor]  # group -> kept channels (absent: all)
    state: dict[str, Tensor] | None  # compact state_dict (None until its window is sliced: Server.windows)
    params: int  # parameters down (and expected up)
    bytes: int  # bytes down (and expected up)
    training_flops: int  # per sample, of the compact model
    round: int = 0  # the round it was assigned in (what a reply's round tag must say)


class Server:
    """A CA-HFP server round object (see module docs).

    Args:
        model: the global model (its state is copied; the module is the architecture; it is
            not changed).
        example_input: one input batch (for tracing and FLOP counts; a batch of one works).
        plan: a channel plan; default ``trace_plan(model, example_input, residual)`` (checked
            against the model either way).
        residual: ``"tie"`` (default: each residual stream is one group, pruned in step) or
            ``"internal"`` (channels that reach an addition stay whole); see ``trace_plan``.
        criterion: an :class:`~cahfp_ops.fl.importance.Importance`, or the shorthand
            ``"curvature"`` (CA-HFP), ``"l1"`` / ``"l2"`` (filter norm), ``"random"``.
        curvature, personalized: with the ``"curvature"`` shorthand, the curvature proxy
            (``"secant"`` or ``"fisher"``) and per-client scoring (see ``CurvatureImportance``).
        mode: ``"reconstruct"`` (CA-HFP) or ``"overlap"`` (HeteroFL) aggregation.
        warmup_rounds: rounds with random masks before scores are used (a criterion that is
            not ready yet, e.g. curvature without two rounds of history, also gets random masks).
        lr, local_steps: the clients' SGD step size and steps per round (scale of ``g``).
        seed: seeds the server's generator (random masks).
        update_bound: the relative update bound: a reply whose update size (RMS of its delta
            over its kept floating entries, pooled over tensors) exceeds this multiple of the
            round's median size (at least 3 well-formed clients with positive weight and a
            positive median; streaming: the previous round's accepted clients) is over the
            bound (None: no relative bound); see :meth:`aggregate`.
        max_update: an absolute bound on the update size, applied every round whatever the
            number of clients (DP-style clipping with ``bound_action="clip"``; None: none).
        bound_action: what happens to a reply over the bound (the smaller of the two):
            ``"reject"`` (default) or ``"clip"`` (its delta scaled down to the bound).
        reduce, trim: how the accepted replies are combined: ``"mean"`` (default; ``mode``'s
            weighted mean) or a robust reducer, ``"median"`` / ``"trimmed_mean"`` (SPEC,
            "Robust reducers"; see :func:`cahfp_ops.reconstruct_aggregate`). A robust reducer
            needs the whole round at once: ``aggregate(streaming=True)`` refuses it.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        plan: ChannelPlan | None = None,
        *,
        criterion: str | Importance = "curvature",
        curvature: str = "secant",
        mode: str = "reconstruct",
        residual: str = "tie",
        warmup_rounds: int = 1,
        lr: float = 0.1,
        local_steps: int = 1,
        seed: int = 0,
        personalized: bool = False,
        update_bound: float | None = 10.0,
        max_update: float | None = None,
        bound_action: str = "reject",
        reduce: str = "mean",
        trim: float = 0.1,
    ):
        if mode not in MODES:
            raise ValueError(f"Server: mode must be one of {MODES}, got {mode!r}")
        if bound_action not in BOUND_ACTIONS:
            raise ValueError(f"Server: bound_action must be one of {BOUND_ACTIONS}, got {bound_action!r}")
        for name, value in (("update_bound", update_bound), ("max_update", max_update)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"Server: {name} must be a finite number > 0 or None, got {value!r}")
        load_cpp()  # a first-use compile of the CPU kernels happens here, not inside a round
        self.criterion = make_importance(criterion, curvature=curvature, personalized=personalized)
        self.model = model
        self.example_input = example_input
        self.plan = plan if plan is not None else trace_plan(model, example_input, residual)
        self.mode = mode
        self.warmup_rounds, self.lr, self.local_steps = warmup_rounds, lr, local_steps
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.plan.check(self.state)
        self.criterion.observe(self.state)
        self.generator = torch.Generator().manual_seed(seed)
        self.round = 0
        self.assignments: dict[Hashable, Assignment] = {}
        self._full_flops = count_flops(model, example_input)["training_flops"]
        self._full_params = count_params(self.state)
        self._flops_cache: dict = {}
        self.update_bound = update_bound
        self.max_update = max_update
        self.bound_action = bound_action
        if reduce not in REDUCERS:
            raise ValueError(f"Server: reduce must be one of {REDUCERS}, got {reduce!r}")
        if not (isinstance(trim, (int, float)) and 0 <= trim < 0.5):
            raise ValueError(f"Server: trim must be in [0, 0.5), got {trim!r}")
        self.reduce, self.trim = reduce, float(trim)
        self._open = False  # whether the current round has assignments and takes replies
        self.layout: RoundLayout | None = None  # the round's layout when the model has one floating dtype
        self.layouts: dict[tuple[str, ...], RoundLayout] = {}  # names -> layout, per dtype group
        self._slots: dict[Hashable, int] = {}
        self._previous_sizes: list[float] = []
        self._workspace = Workspace()  # streaming rounds' partial sums, reused round after round
        self._slice_buffers: dict[tuple[str, ...], Tensor] = {}  # names -> the compact models' buffer, reused

    # ------------------------------------------------------------------ assign / extract
    def scores(self, ids: list[Hashable]) -> dict[str, Tensor]:
        """Group scores for this round's clients (random during warm-up or while the criterion is
        not ready): ``(C,)`` shared, or ``(K, C)`` per client."""
        if self.round < self.warmup_rounds or not self.criterion.ready:
            return random_scores(self.plan, self.generator, len(ids))
        return self.criterion.scores(self.plan, self.state, ids, self.generator)

    def assign(self, ratios: Mapping[Hashable, Ratio], *, window: int | None = None) -> dict[Hashable, Assignment]:
        """Keep sets and compact state_dicts for the clients of this round.

        The round's :class:`~cahfp_ops.layout.RoundLayout` s are built once from the channel
        plan and the keep sets, one per group of floating entries of one dtype and device
        (``self.layouts``; ``self.layout`` is the only one when the model has one floating
        dtype). One slicing call per group gives every client's compact model: one contiguous
        buffer per client (:class:`~cahfp_ops.layout.PackedModel`, ``Assignment.state``), or,
        with several dtype groups, a state_dict of views into one buffer per group.

        The slicing buffers are reused round after round: a round's compact models are valid
        until the next ``assign`` after the round was aggregated (copy one to keep it longer);
        an ``assign`` while the previous round is still open slices into fresh buffers.

        ``window``: hand the compact models out ``window`` clients at a time instead
        (:meth:`windows`), so that they take O(window) memory, not O(K): the assignments are
        made (keep sets, sizes, costs) with ``state`` None until their window is sliced. The
        models are the same bit for bit.
        """
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"Server.assign: window must be an int >= 1 or None, got {window!r}")
        ids = list(ratios)
        ratio_list = [ratios[c] for c in ids]
        tables = assign_keep_tables(self.plan, ratio_list, self.scores(ids))
        keeps = keep_sets_of_tables(tables, ratio_list)
        if self._open:  # the previous round's models may still be in use
            self._slice_buffers = {}
        self.assignments = {}
        self.layout = None
        self.layouts = {}
        self._slots = {}
        self._open = True
        if not ids:
            return self.assignments
        for names in _dtype_groups(self.state):
            sub = {n: self.state[n] for n in names}
            if tables:  # the server's own top-k tables: valid by construction, not checked again
                with validation(False):  # (the kernels still check every table entry's bounds)
                    self.layouts[names] = self.plan.layout(sub, tables)
            else:
                self.layouts[names] = self.plan.layout(sub, keeps)
        if len(self.layouts) == 1:
            self.layout = next(iter(self.layouts.values()))
        for j, (cid, keep) in enumerate(zip(ids, keeps)):
            self._slots[cid] = j
            params = sum(int(layout.numels[j]) for layout in self.layouts.values())
            nbytes = sum(int(layout.numels[j]) * self.state[names[0]].element_size()
                         for names, layout in self.layouts.items())  # fmt: skip
            self.assignments[cid] = Assignment(keep, None, params, nbytes, self._training_flops(j), self.round)
        if window is None:
            self._hand_out(ids)
        return self.assignments

    def windows(self, size: int) -> Iterable[dict[Hashable, Assignment]]:
        """This round's assignments ``size`` clients at a time, in assignment order, each
        window's compact models sliced into one buffer reused from window to window (a
        window's models are valid until the next window is made: send them first)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"Server.windows: size must be an int >= 1, got {size!r}")
        ids = list(self.assignments)
        for i in range(0, len(ids), size):
            yield self._hand_out(ids[i : i + size])

    def _hand_out(self, cids: list) -> dict[Hashable, Assignment]:
        """Slice the compact models of ``cids`` (one call per dtype group, into the reused
        buffers) and set their assignments' ``state``."""
        slots = [self._slots[c] for c in cids]
        extras = _extras_copies({k: v for k, v in self.state.items() if not v.is_floating_point()}, len(cids))
        per_group = []  # per dtype group: each client's PackedModel
        for names, layout in self.layouts.items():
            sub = layout.subset(slots)
            weights = [self.state[n] for n in names]
            total = int(sub.numels.sum())
            buf = self._slice_buffers.get(names)
            if buf is None or buf.numel() < total or buf.dtype != weights[0].dtype or buf.device != weights[0].device:
                buf = self._slice_buffers[names] = torch.empty(max(total, 1), dtype=weights[0].dtype,
                                                               device=weights[0].device)  # fmt: skip
            buffers = sub.slice(weights, out=buf[:total])
            per_group.append([PackedModel(b, layout, j) for j, b in zip(slots, buffers)])
        if len(per_group) == 1:
            states = [PackedModel(m.buffer, m.layout, m.client, extras=extras[i]) for i, m in enumerate(per_group[0])]
        else:  # several floating dtypes: a state_dict of views, one buffer per group
            states = []
            for i, models in enumerate(zip(*per_group)):
                views = dict(extras[i])
                for m in models:
                    views.update(m)
                states.append({n: views[n] for n in self.state})
        out = {}
        for cid, st in zip(cids, states):
            self.assignments[cid].state = st
            out[cid] = self.assignments[cid]
        return out

    def _training_flops(self, j: int) -> int:
        """Per-sample training FLOPs of client slot j's compact model (they depend on its
        shapes only: one model of those shapes is built, with empty values, per new shape)."""
        shapes = b"".join(layout.counts_host[j].tobytes() for layout in self.layouts.values())
        if shapes not in self._flops_cache:
            state = {n: v for n, v in self.state.items() if not v.is_floating_point()}
            for names, layout in self.layouts.items():
                for n, shape in zip(names, layout.compact_shapes(j)):
                    state[n] = torch.empty(shape, dtype=self.state[n].dtype, device=self.state[n].device)
            compact = build_compact(self.model, {n: state[n] for n in self.state})
            self._flops_cache[shapes] = count_flops(compact, self.example_input)["training_flops"]
        return self._flops_cache[shapes]

    def build(self, cid: Hashable) -> nn.Module:
        """The compact module for client ``cid`` (loaded with its compact state)."""
        state = self.assignments[cid].state
        if state is None:
            raise ValueError(f"Server.build: client {cid!r}'s compact model is not handed out yet (Server.windows)")
        return build_compact(self.model, state)

    # ------------------------------------------------------------------ aggregate
    def check_update(self, cid: Hashable, update: Mapping[str, Tensor], *, finite: bool = True) -> str | None:
        """Why client ``cid``'s reply cannot be used, or None when it is well formed
        (``finite=False``: values unread; the aggregation pass checks them)."""
        if not self._open:
            return (
                f"client {cid!r}: no round is open (round {self.round - 1} was aggregated; replies to it are late)"
                if self.round
                else f"client {cid!r}: no round is open (nothing was assigned)"
            )
        if cid not in self.assignments:
            return f"client {cid!r} was not assigned in round {self.round}"
        if self.assignments[cid].state is None:
            return f"client {cid!r}'s compact model was never handed out in round {self.round} (Server.windows)"
        return check_reply(cid, self.assignments[cid].state, update, finite=finite)

    def aggregate(
        self,
        updates: Mapping[Hashable, Mapping[str, Tensor]] | Iterable[tuple],
        weights: Mapping[Hashable, float] | None = None,
        *,
        streaming: bool = False,
        rounds: Mapping[Hashable, int] | None = None,
    ) -> RoundReport:
        """Fold the replies of this round into the global model; bad replies are rejected.

        ``updates``: client -> compact state_dict (or :class:`~cahfp_ops.layout.PackedModel`),
        or, in arrival order, ``(client, reply)`` / ``(client, reply, weight)`` tuples (a
        client may then appear more than once: its first well-formed reply counts, the others
        are rejected and listed in ``report.duplicates``). ``weights``: client -> finite
        number >= 0 (e.g. its sample count; None: equal), checked per client. ``rounds``:
        client -> the round its reply was made for (the ``Assignment.round`` it was sent); a
        reply tagged with another round, or untagged when tags are given, is rejected as late.

        Each reply's structure is checked first; its finiteness (in the global dtype, and of
        its delta in the accumulation dtype) and its update size come from the aggregation
        kernel's own pass over the data. A reply that is not finite, or over the update bound
        (see the class docs) with ``bound_action="reject"``, is rejected and the round is
        recomputed without it, so the new model equals the aggregation of the accepted replies
        alone; with ``"clip"`` its delta is scaled down to the bound. Weights are divided by
        the round's largest before they become coefficients, so any finite weights work.
        ``streaming=True`` folds the replies into running partial sums
        (:class:`StreamingAggregator`, O(model) memory whatever the number of clients),
        :data:`STREAM_WINDOW` replies per kernel pass, instead of one batch call. A round
        takes replies once: after it is aggregated, replies to it are rejected until the next
        :meth:`assign`.

        Every path is one pipeline: intake (the reply checks, :meth:`_check_round`) -> one
        kernel pass that yields each client's statistics (batch: ``aggregate_packed``;
        streaming: ``fold_packed`` in windows) -> one verdict per client
        (:func:`~cahfp_ops.fl.aggregate.verdict`: non-finite, over the bound, clipped) -> the
        pass again on the accepted when a client was rejected or clipped -> the reducer ->
        the criterion observes -> commit. A model with several floating dtypes runs it per
        dtype group, each client's statistics pooled over the groups.
        """
        if streaming and self.reduce != "mean":
            raise ValueError(
                f"Server.aggregate: reduce={self.reduce!r} needs every reply of the round at once; "
                "streaming aggregation supports reduce='mean' only"
            )
        report, chosen = self._check_round(updates, weights, rounds, finite=False)
        report.reduce = self.reduce
        good = report.accepted
        w = [report.clients[c].weight for c in good]
        top = max(w, default=0.0)
        if good and top > 0:
            coef = [x / top for x in w]  # scaled so that no sum of weights overflows
            run = self._streaming_pass if streaming else self._batch_pass
            new = run(report, chosen, good, coef)
            if new is not None:
                accepted = report.accepted
                self._observe_replies(accepted, chosen)
                counted = [chosen[c] for c in accepted if report.clients[c].weight > 0]
                self.state = self._with_ints(new, counted)
        if self._open:
            self.criterion.observe(self.state, self.lr, self.local_steps)
            self.round += 1
            self._open = False
        return report

    def _observe_replies(self, good: list, updates: Mapping) -> None:
        if type(self.criterion).observe_replies is Importance.observe_replies or not good:
            return
        rows, cols = self.plan.tensor_keep_sets([self.assignments[c].keeps for c in good])
        self.criterion.observe_replies(
            self.state, good, [updates[c] for c in good], rows, cols, self.lr, self.local_steps
        )

    def _record(self, report: RoundReport, cid: Hashable, fold: Fold) -> None:
        """One client's verdict into the report (the one place its reasons are worded)."""
        report.clients[cid].update_size = fold.update_size
        if fold.accepted:
            report.clients[cid].clip_scale = fold.clip_scale
        else:
            report.reject(cid, f"client {cid!r}: {fold.reason}")

    def _batch_pass(self, report: RoundReport, updates: Mapping, good: list, w: list[float]) -> dict | None:
        """The batch implementation of the pass: every reply in one ``aggregate_packed`` call per
        dtype group; the bound from this round's sizes. Returns the new floating entries (None:
        no accepted weight)."""
        groups = []  # per dtype group: (global tensors, the clients' layout, their data)
        for names, layout in self.layouts.items():
            floats = [self.state[n] for n in names]
            made = [update_data(updates[c], layout, self._slots[c], names, floats[0].dtype) for c in good]
            groups.append((names, floats, layout, made))
        problems = [next((p for *_, made in groups if (p := made[j][1]) is not None), None) for j in range(len(good))]
        if any(p is not None for p in problems):  # what the reply checks cannot see (e.g. its device)
            for c, p in zip(good, problems):
                if p is not None:
                    report.reject(c, f"client {c!r}: its reply {p}")
            ok = [j for j, p in enumerate(problems) if p is None]
            good, w = [good[j] for j in ok], [w[j] for j in ok]
            groups = [(names, floats, layout, [made[j] for j in ok]) for names, floats, layout, made in groups]
            if not good or max(w) <= 0:
                return None
        slots = [self._slots[c] for c in good]
        passes = []  # per group: (names, floats, the accepted clients' layout, their data)
        for names, floats, layout, made in groups:
            data = [d for d, _ in made]
            if len({data_dtype(d) for d in data}) > 1:  # one client dtype per kernel call: the global's
                wd = floats[0].dtype
                data = [d.to(wd) if isinstance(d, Tensor) else [t.to(wd) for t in d] for d in data]
            passes.append((names, floats, layout.subset(slots), data))
        outs, stats = self._packed_pass(passes, w)
        sizes = [math.inf if bad else math.sqrt(q / max(n, 1)) for bad, q, n in stats]
        bound = self._bound(report, [x for x, wc in zip(sizes, w) if wc > 0])  # positive-weight clients
        folds = [verdict(bad, q, n, bound, self.bound_action == "clip") for bad, q, n in stats]
        for c, fold in zip(good, folds):
            self._record(report, c, fold)
        keep = [j for j, f in enumerate(folds) if f.accepted]
        if len(keep) < len(good) or any(f.clip_scale is not None for f in folds):
            # the pass again: the rejected at coefficient 0 (absent, bit for bit), the clipped
            # with their delta scaled down to the bound
            w = [wc if f.accepted else 0.0 for wc, f in zip(w, folds)]
            if sum(w) <= 0:
                return None
            passes = [(names, floats, sub, _clipped(sub, floats, data, folds)) for names, floats, sub, data in passes]
            outs, _ = self._packed_pass(passes, w)
        if self.reduce != "mean":  # the verdicts above, then the robust reducer on the accepted
            accepted = [good[j] for j in keep]
            given = [report.clients[c].weight for c in accepted]  # as given: exact boundaries (SPEC)
            return self._robust(passes, keep, given, accepted)
        new = {}
        for (names, _, sub, _), out in zip(passes, outs):
            new.update(zip(names, sub.full_views(out)))
        return new

    def _packed_pass(self, passes: list, w: list[float]) -> tuple[list[Tensor], list[tuple[bool, float, int]]]:
        """One ``aggregate_packed`` call per dtype group: the packed results, and per client
        ``(non-finite, sum of squared deltas, kept entries)`` pooled over the groups."""
        outs = []
        pooled = [(False, 0.0, 0)] * len(w)
        for _, floats, sub, data in passes:
            coef = torch.tensor(w, dtype=torch.float64, device=floats[0].device)
            with validation(False):  # the replies were checked; weights, layout and coef are the server's own
                out, stats = aggregate_packed(sub, floats, data, coef, self.mode)
            outs.append(out)
            kept = sub.numels.tolist()
            pooled = [(b0 or bool(b), q0 + q, n0 + n)
                      for (b0, q0, n0), (b, q), n in zip(pooled, stats.cpu().tolist(), kept)]  # fmt: skip
        return outs, pooled

    def _robust(self, passes: list, slots: list[int], w: list[float], accepted: list) -> dict[str, Tensor]:
        """The accepted (clipped) replies combined by the robust reducer, tensor by tensor."""
        models: list[dict] = [{} for _ in slots]
        for names, _, sub, data in passes:
            for model, j in zip(models, slots):
                d = data[j]
                model.update(PackedModel(d, sub, j, names) if isinstance(d, Tensor) else zip(names, d))
        floats = {n: self.state[n] for names in self.layouts for n in names}
        rows, cols = self.plan.tensor_keep_sets([self.assignments[c].keeps for c in accepted])
        return reconstruct_aggregate_many(
            floats, models, {n: rows[n] for n in floats if n in rows}, {n: cols[n] for n in floats if n in cols}, w,
            mode=self.mode, reduce=self.reduce, trim=self.trim,
        )  # fmt: skip

    def _streaming_pass(self, report: RoundReport, updates: Mapping, good: list, w: list[float]) -> dict | None:
        """The streaming implementation of the pass: the replies folded into running partial
        sums, :data:`STREAM_WINDOW` per ``fold_packed`` call per dtype group (the verdicts
        inside, :meth:`StreamingAggregator.add_many`); the bound from the previous round's
        accepted sizes. Returns the new floating entries (None: no accepted weight)."""
        agg = StreamingAggregator(self.state, self.mode, workspace=self._workspace)
        bound = self._bound(report, self._previous_sizes)
        folds = _fold_windows(agg, [updates[c] for c in good], w, {"clients": [self._slots[c] for c in good]},
                              layout=list(self.layouts.values()), max_update=bound,
                              clip=self.bound_action == "clip")  # fmt: skip
        sizes = []
        for c, wc, fold in zip(good, w, folds):
            self._record(report, c, fold)
            if fold.accepted and wc > 0:
                sizes.append(min(fold.update_size, bound) if fold.clip_scale is not None else fold.update_size)
        self._previous_sizes = sizes
        if agg.weight_sum <= 0:
            return None
        return {n: v for n, v in agg.result().items() if v.is_floating_point()}

    def _with_ints(self, floats: dict[str, Tensor], counted: list) -> dict[str, Tensor]:
        ints = [(n, v) for n, v in self.state.items() if n not in floats]
        reported = _largest_ints(ints, counted)
        out = {}
        for name, v in self.state.items():
            if name in floats:
                out[name] = floats[name]
            elif counted:
                out[name] = largest_reported(v, reported[name])
            else:
                out[name] = v.clone()
        return out

    def _bound(self, report: RoundReport, sizes: list[float]) -> float | None:
        """The update bound: ``update_bound`` x the median of the finite ``sizes`` (at least 3
        of them and a positive median), and ``max_update``; the smaller applies (None: none).
        The median and the bound go into the report."""
        finite = [x for x in sizes if math.isfinite(x)]
        median = statistics.median(finite) if finite else None
        report.update_median = median
        bounds = []
        if self.update_bound is not None and len(finite) >= 3 and median and median > 0:
            bounds.append(self.update_bound * median)
        if self.max_update is not None:
            bounds.append(float(self.max_update))
        report.update_bound = min(bounds) if bounds else None
        return report.update_bound

    def _check_round(
        self,
        updates: Mapping[Hashable, Mapping[str, Tensor]] | Iterable[tuple],
        weights: Mapping[Hashable, float] | None,
        rounds: Mapping[Hashable, int] | None,
        *,
        finite: bool = True,
    ) -> tuple[RoundReport, dict]:
        """One record per client (its first well-formed reply, else its first reply), the
        other replies of repeating clients in ``duplicates``, each silent assignee absent.
        Returns the report and client -> the reply that counts (moved to the server's
        device where it was on another)."""
        report = RoundReport(self.round, full_params=self._full_params, full_training_flops=self._full_flops)
        replies = _reply_list(updates)
        repeats = {cid for cid, n in Counter(cid for cid, _, _ in replies).items() if n > 1}
        chosen: dict = {}
        for cid, update, weight in replies:
            why = self._round_tag_problem(cid, rounds)
            if why is None:  # a repeating client's replies are read now: the first well-formed counts
                why = self.check_update(cid, update, finite=finite or cid in repeats)
            value = None
            if why is None:
                why, value = check_weight(cid, weights if weight is _NO_WEIGHT else {cid: weight})
            if why is None and cid in chosen:
                why = f"client {cid!r} already replied in round {self.round}; only its first well-formed reply counts"
            a = self.assignments.get(cid) if self._open else None
            record = ClientRecord(cid, "rejected" if why else "accepted", why)
            if a is not None:
                record.params_down, record.bytes_down, record.training_flops = a.params, a.bytes, a.training_flops
                if why is None:
                    record.params_up, record.bytes_up = a.params, a.bytes
                    record.weight = value
            if why is None:
                chosen[cid] = _on_device(update, self.assignments[cid].state)
                if cid in report.clients:  # an earlier malformed reply of this client
                    report.duplicates.append(report.clients.pop(cid))
                report.clients[cid] = record
            elif cid in report.clients:
                report.duplicates.append(record)
            else:
                report.clients[cid] = record
        if self._open:
            for cid, a in self.assignments.items():
                if cid not in report.clients:
                    report.clients[cid] = ClientRecord(
                        cid, "absent", params_down=a.params, bytes_down=a.bytes, training_flops=a.training_flops
                    )
        return report, chosen

    def _round_tag_problem(self, cid: Hashable, rounds: Mapping[Hashable, int] | None) -> str | None:
        if rounds is None or not self._open:
            return None
        if cid not in rounds:
            return f"client {cid!r}: its reply has no round tag (round {self.round} is open)"
        tag = rounds[cid]
        if isinstance(tag, bool) or not isinstance(tag, numbers.Integral) or int(tag) != self.round:
            return f"client {cid!r}: its reply is for round {tag!r}, but round {self.round} is open (late or foreign)"
        return None

    def run_round(
        self,
        ratios: Mapping[Hashable, Ratio],
        train: Callable[[Hashable, nn.Module], tuple[Mapping[str, Tensor], float] | None],
    ) -> RoundReport:
        """assign -> build -> ``train(cid, compact_model)`` -> aggregate. ``train`` returns the
        trained compact state_dict and the client's weight (sample count), or None to drop out."""
        self.assign(ratios)
        updates, weights = {}, {}
        for cid in self.assignments:
            reply = train(cid, self.build(cid))
            if reply is not None:
                updates[cid], weights[cid] = reply
        return self.aggregate(updates, weights)

    # ------------------------------------------------------------------ the global model
    def adopt(self, state: Mapping[str, Tensor]) -> bool:
        """Make externally provided global arrays (e.g. a framework's copy) the global model.

        ``state`` must hold exactly the model's entries with their shapes; values are cast to
        the server's devices and dtypes. When they differ from the current global model, the
        criterion observes them as the next global model. Returns whether anything changed.
        """
        if state.keys() != self.state.keys():
            missing = sorted(self.state.keys() - state.keys())[:1]
            extra = sorted(state.keys() - self.state.keys())[:1]
            raise ValueError(f"Server.adopt: the arrays do not match the model (missing {missing}, unknown {extra})")
        for k, ref in self.state.items():
            if tuple(state[k].shape) != tuple(ref.shape):
                raise ValueError(f"Server.adopt: {k!r} has shape {tuple(state[k].shape)}, expected {tuple(ref.shape)}")
        new = {k: state[k].to(device=ref.device, dtype=ref.dtype) for k, ref in self.state.items()}
        if all(new[k].equal(self.state[k]) for k in new):
            return False
        self.state = new
        self.criterion.observe(self.state)
        return True

    def global_model(self) -> nn.Module:
        """A full-size copy of the model loaded with the current global state."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.state)
        return model

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the server state atomically (temporary file in the same folder, then rename)."""
        payload = {
            "state": self.state,
            "importance": self.criterion.name,
            "importance_state": self.criterion.state_dict(),
            "round": self.round,
            "generator": self.generator.get_state(),
            "mode": self.mode,
        }
        save_atomic(payload, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote (same model, plan, criterion and settings)."""
        payload = load_checkpoint(path)
        if payload["importance"] != self.criterion.name:
            raise ValueError(
                f"Server.load: the checkpoint was written with criterion {payload['importance']!r}, "
                f"this server uses {self.criterion.name!r}"
            )
        self.state = payload["state"]
        self.criterion.load_state_dict(payload["importance_state"])
        self.round = payload["round"]
        self.generator.set_state(payload["generator"])
        self.mode = payload["mode"]
        self.assignments = {}
        self.layout = None
        self.layouts = {}
        self._slots = {}


def _clipped(layout: RoundLayout, floats: list[Tensor], data: list, folds: list[Fold]) -> list:
    """The clients' data with each clipped client's delta scaled down (the others as they are)."""
    return [d if f.clip_scale is None else clipped_data(layout.client(j), floats, d, f.clip_scale)
            for j, (d, f) in enumerate(zip(data, folds))]  # fmt: skip


def _dtype_groups(state: Mapping[str, Tensor]) -> list[tuple[str, ...]]:
    """The names of ``state``'s floating entries, grouped by (device, dtype), in order."""
    groups: dict[tuple, list[str]] = {}
    for name, v in state.items():
        if v.is_floating_point():
            groups.setdefault((v.device, v.dtype), []).append(name)
    return [tuple(names) for names in groups.values()]


def _fold_windows(agg: StreamingAggregator, replies: list, weights: list[float], per_client: dict[str, list],
                  **fixed) -> list:  # fmt: skip
    """Fold replies that are all here into ``agg``, :data:`STREAM_WINDOW` per kernel pass;
    ``per_client``: ``add_many`` arguments holding one entry per reply (sliced with the
    window), ``fixed``: the others. Returns the replies' :class:`Fold` s in order."""
    folds = []
    for i in range(0, len(replies), STREAM_WINDOW):
        win = slice(i, i + STREAM_WINDOW)
        folds += agg.add_many(replies[win], weights[win], **{k: v[win] for k, v in per_client.items()}, **fixed)
    return folds

def _extras_copies(extras: dict[str, Tensor], K: int) -> list[Mapping[str, Tensor]]:
    """K private copies of the non-floating entries (each client may change its own). Scalars
    of one dtype (BatchNorm's ``num_batches_tracked``) are copied as one tensor per client, a
    :class:`~cahfp_ops.layout.PackedScalars` (views made only when read): one copy per client
    instead of one tensor per entry."""
    if not extras:
        return [{} for _ in range(K)]
    values = list(extras.values())
    if all(v.dim() == 0 for v in values) and len({(v.dtype, v.device) for v in values}) == 1:
        stacked = torch.stack(values)
        return [PackedScalars(extras, stacked.clone()) for _ in range(K)]
    return [{k: v.clone() for k, v in extras.items()} for _ in range(K)]


def _packed_scalars(reply: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """The 0-d entries ``names`` of a (checked) reply as one 1-D tensor: its
    :class:`~cahfp_ops.layout.PackedScalars` values when they hold exactly those names in that
    order, else one stack."""
    extras = reply.extras if isinstance(reply, PackedModel) else None
    if isinstance(extras, PackedScalars) and extras.names == tuple(names):
        return extras.values
    return torch.stack([torch.as_tensor(reply[n]) for n in names])


def _largest_ints(ints: list[tuple[str, Tensor]], counted: list) -> dict[str, Tensor]:
    """Per non-floating entry, the element-wise largest value the counted replies report (in the
    global entry's dtype). Scalars of one dtype: one stack per reply, not one per entry."""
    if not counted or not ints:
        return {}
    names = [n for n, _ in ints]
    dtypes = {v.dtype for _, v in ints}
    if all(v.dim() == 0 for _, v in ints) and len(dtypes) == 1:
        dtype = dtypes.pop()
        rows = [_packed_scalars(c, names) for c in counted]
        if all(r.shape == (len(names),) for r in rows):
            best = torch.stack(rows).to(dtype).amax(0)
            return dict(zip(names, best.unbind(0)))
    return {n: torch.stack([torch.as_tensor(c[n]).to(v.dtype) for c in counted]).amax(0) for n, v in ints}
