"""One CA-HFP server: assign -> extract -> clients train -> aggregate -> update curvature.

    server = Server(model, example_input, criterion="curvature")
    report = server.run_round(ratios={cid: r, ...}, train=my_train_fn, weights={cid: n_samples})

or, step by step (what a framework integration does): ``assignments = server.assign(ratios)``;
send ``assignments[cid].state`` (a compact state_dict; ``server.build(cid)`` gives the module);
collect replies; ``report = server.aggregate(replies, weights)``. A bad reply (wrong keys or
shapes, non-finite values) is rejected with a reason naming the client and the round goes on;
clients that do not reply are simply absent. ``save`` / ``load`` keep the whole server state
(global model, curvature history, round number, RNG state) atomically; a restored server
produces bit-identical next rounds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .aggregate import StreamingAggregator, aggregate_state
from .compact import build_compact, count_flops, count_params, extract
from .curvature import CurvatureTracker, group_scores, magnitude_scores, random_scores, tracker_scores
from .masks import Ratio, assign_keep_sets
from .ops import MODES, reconstruct_aggregate_many
from .plan import ChannelPlan, trace_plan

CRITERIA = ("curvature", "l1", "l2", "random")


def _client_keeps(rows: Mapping, cols: Mapping, j: int) -> tuple[dict, dict]:
    """Client j's (rows, cols) keep sets from per-tensor lists of per-client keep sets."""
    return {n: v[j] for n, v in rows.items()}, {n: v[j] for n, v in cols.items()}


@dataclass
class Assignment:
    """What one client gets this round."""

    keeps: dict[str, Tensor]  # group -> kept channels (absent: all)
    state: dict[str, Tensor]  # compact state_dict
    params: int  # parameters down (and expected up)
    bytes: int  # bytes down (and expected up)
    training_flops: int  # per sample, of the compact model


@dataclass
class RoundReport:
    round: int
    accepted: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)  # client -> reason
    absent: list = field(default_factory=list)
    params_down: dict = field(default_factory=dict)
    params_up: dict = field(default_factory=dict)
    bytes_down: dict = field(default_factory=dict)
    bytes_up: dict = field(default_factory=dict)
    training_flops: dict = field(default_factory=dict)
    full_params: int = 0
    full_training_flops: int = 0


class Server:
    """A CA-HFP server round object (see module docs).

    Args:
        model: the global model (its state is copied; the module is the architecture).
        example_input: one input batch (for tracing and FLOP counts).
        plan: a channel plan; default ``trace_plan(model, example_input, residual)``.
        criterion: ``"curvature"`` (CA-HFP), ``"l1"`` / ``"l2"`` (filter norm), ``"random"``.
        curvature: ``"secant"`` or ``"fisher"`` curvature proxy.
        mode: ``"reconstruct"`` (CA-HFP) or ``"overlap"`` (HeteroFL) aggregation.
        warmup_rounds: rounds with random masks before scores are used (curvature needs two
            rounds of history in any case).
        lr, local_steps: the clients' SGD step size and steps per round (scale of ``g``).
        seed: seeds the server's generator (random masks).
        personalized: with ``criterion="curvature"``, score each client with its own
            pseudo-gradient from its last accepted update (``(w_t - E_k(c_k)) / (lr * steps)``,
            zero where it pruned) and the shared curvature proxy; clients without one yet use
            the global proxy. Keeps one dense gradient per client seen (O(K x model) memory).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        plan: ChannelPlan | None = None,
        *,
        criterion: str = "curvature",
        curvature: str = "secant",
        mode: str = "reconstruct",
        residual: str = "internal",
        warmup_rounds: int = 1,
        lr: float = 0.1,
        local_steps: int = 1,
        seed: int = 0,
        personalized: bool = False,
    ):
        if criterion not in CRITERIA:
            raise ValueError(f"Server: criterion must be one of {CRITERIA}, got {criterion!r}")
        if mode not in MODES:
            raise ValueError(f"Server: mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.example_input = example_input
        self.plan = plan if plan is not None else trace_plan(model, example_input, residual)
        self.criterion, self.mode = criterion, mode
        self.warmup_rounds, self.lr, self.local_steps = warmup_rounds, lr, local_steps
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.plan.check(self.state)
        self.tracker = CurvatureTracker(curvature)
        self.tracker.observe(self.state)
        self.generator = torch.Generator().manual_seed(seed)
        self.round = 0
        self.personalized = personalized
        self.client_grads: dict[Hashable, dict[str, Tensor]] = {}
        self.assignments: dict[Hashable, Assignment] = {}
        self._full_flops = count_flops(model, example_input)["training_flops"]
        self._flops_cache: dict[tuple, int] = {}

    # ------------------------------------------------------------------ assign / extract
    def scores(self, ids: list[Hashable]) -> dict[str, Tensor]:
        """Group scores for this round's clients (random during warm-up or while curvature lacks
        history): ``(C,)`` shared, or ``(K, C)`` per client."""
        use_random = self.criterion == "random" or self.round < self.warmup_rounds
        if self.criterion == "curvature" and not self.tracker.ready:
            use_random = True
        if use_random:
            return random_scores(self.plan, self.generator, len(ids))
        if self.criterion == "curvature":
            if self.personalized and any(c in self.client_grads for c in ids):
                grads = {
                    name: torch.stack([self.client_grads.get(c, self.tracker.g)[name] for c in ids])
                    for name in self.tracker.g
                }
                return group_scores(self.plan, self.state, grads, self.tracker.h or None)
            return tracker_scores(self.plan, self.state, self.tracker)
        return magnitude_scores(self.plan, self.state, p=1 if self.criterion == "l1" else 2)

    def assign(self, ratios: Mapping[Hashable, Ratio]) -> dict[Hashable, Assignment]:
        """Keep sets and compact state_dicts for the clients of this round."""
        ids = list(ratios)
        keeps = assign_keep_sets(self.plan, [ratios[c] for c in ids], self.scores(ids))
        states = extract(self.state, self.plan, keeps)
        self.assignments = {}
        for cid, keep, st in zip(ids, keeps, states):
            shapes = tuple((k, tuple(v.shape)) for k, v in st.items())
            flops = self._flops_cache.get(shapes)
            if flops is None:  # depends on the compact shapes only
                flops = count_flops(build_compact(self.model, st), self.example_input)["training_flops"]
                self._flops_cache[shapes] = flops
            nbytes = sum(v.numel() * v.element_size() for v in st.values() if v.is_floating_point())
            self.assignments[cid] = Assignment(keep, st, count_params(st), nbytes, flops)
        return self.assignments

    def build(self, cid: Hashable) -> nn.Module:
        """The compact module for client ``cid`` (loaded with its compact state)."""
        return build_compact(self.model, self.assignments[cid].state)

    # ------------------------------------------------------------------ aggregate
    def check_update(self, cid: Hashable, update: Mapping[str, Tensor]) -> str | None:
        """Why client ``cid``'s reply cannot be used, or None when it is well formed."""
        if cid not in self.assignments:
            return f"client {cid!r} was not assigned this round"
        expected = self.assignments[cid].state
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
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"client {cid!r}: {k!r} holds non-finite values"
        return None

    def aggregate(
        self,
        updates: Mapping[Hashable, Mapping[str, Tensor]],
        weights: Mapping[Hashable, float] | None = None,
        *,
        streaming: bool = False,
    ) -> RoundReport:
        """Fold the replies of this round into the global model; bad replies are rejected.

        ``streaming=True`` folds the clients in one at a time (:class:`StreamingAggregator`,
        O(model) memory whatever the number of clients) instead of one batch call."""
        report = RoundReport(
            round=self.round, full_params=count_params(self.state), full_training_flops=self._full_flops
        )
        good = []
        for cid, update in updates.items():
            why = self.check_update(cid, update)
            if why is None and weights is not None and not float(weights.get(cid, 0.0)) >= 0:
                why = f"client {cid!r} has a negative or missing weight"
            if why is None:
                good.append(cid)
            else:
                report.rejected[cid] = why
        report.absent = [c for c in self.assignments if c not in updates]
        for cid in self.assignments:
            a = self.assignments[cid]
            report.params_down[cid], report.bytes_down[cid] = a.params, a.bytes
            report.training_flops[cid] = a.training_flops
        for cid in good:
            a = self.assignments[cid]
            report.params_up[cid], report.bytes_up[cid] = a.params, a.bytes
        report.accepted = good
        w = [float(weights[c]) if weights is not None else 1.0 for c in good]
        if good and sum(w) > 0:
            rows, cols = self.plan.tensor_keep_sets([self.assignments[c].keeps for c in good])
            if self.personalized and self.criterion == "curvature":
                self._store_client_grads(good, updates, rows, cols)
            if streaming:
                agg = StreamingAggregator(self.state, self.mode)
                for j, c in enumerate(good):
                    agg.add(updates[c], *_client_keeps(rows, cols, j), w[j])
                self.state = agg.result()
            else:
                self.state = aggregate_state(self.state, [updates[c] for c in good], rows, cols, w, self.mode)
        self.tracker.observe(self.state, self.lr, self.local_steps)
        self.round += 1
        return report

    def _store_client_grads(self, good: list, updates: Mapping, rows: Mapping, cols: Mapping) -> None:
        """Each client's pseudo-gradient: (w_t - E_k(c_k)) / (lr * steps); zero where it pruned."""
        floats = {k: v for k, v in self.state.items() if v.is_floating_point()}
        scale = 1.0 / (self.lr * self.local_steps)
        for j, cid in enumerate(good):
            rows_j, cols_j = _client_keeps(rows, cols, j)
            r = {n: [keep] for n, keep in rows_j.items()}  # one client: lists of one keep set
            c = {n: [keep] for n, keep in cols_j.items()}
            expanded = reconstruct_aggregate_many(floats, [{k: updates[cid][k] for k in floats}], r, c)
            self.client_grads[cid] = {k: (floats[k].float() - expanded[k].float()) * scale for k in floats}

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

    def global_model(self) -> nn.Module:
        """A full-size module loaded with the current global state."""
        return build_compact(self.model, self.state)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the server state atomically (temporary file in the same folder, then rename)."""
        payload = {
            "state": self.state,
            "tracker": self.tracker.state_dict(),
            "round": self.round,
            "generator": self.generator.get_state(),
            "criterion": self.criterion,
            "mode": self.mode,
            "client_grads": self.client_grads,
        }
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".cahfp-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote (same model, plan and settings)."""
        payload = torch.load(os.fspath(path), weights_only=True)
        self.state = payload["state"]
        self.tracker.load_state_dict(payload["tracker"])
        self.round = payload["round"]
        self.generator.set_state(payload["generator"])
        self.criterion, self.mode = payload["criterion"], payload["mode"]
        self.client_grads = payload.get("client_grads", {})
        self.assignments = {}
