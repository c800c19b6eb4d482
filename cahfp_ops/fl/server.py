"""One CA-HFP server: assign -> extract -> clients train -> aggregate -> update importance.

    server = Server(model, example_input, criterion="curvature")
    report = server.run_round(ratios={cid: r, ...}, train=my_train_fn)

or, step by step (what a framework integration does): ``assignments = server.assign(ratios)``;
send ``assignments[cid].state`` (a compact state_dict; ``server.build(cid)`` gives the module);
collect replies; ``report = server.aggregate(replies, weights)``. A bad reply is rejected with
a reason naming the client (:mod:`cahfp_ops.fl.replies`) and the round goes on; clients that do
not reply are absent. The report holds one :class:`ClientRecord` per client of the round.
Global arrays held elsewhere (a framework's copy) come in with :meth:`Server.adopt`.
``save`` / ``load`` keep the whole server state (global model, importance history, round
number, RNG state) atomically (:mod:`cahfp_ops.fl.checkpoint`); a restored server produces
bit-identical next rounds.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cahfp_ops import MODES, load_cpp

from .aggregate import StreamingAggregator, aggregate_state
from .checkpoint import load_checkpoint, save_atomic
from .compact import build_compact, count_flops, count_params, extract
from .importance import Importance, make_importance, random_scores
from .masks import Ratio, assign_keep_sets
from .plan import ChannelPlan, trace_plan
from .replies import check_reply, check_weight
from .report import ClientRecord, RoundReport


@dataclass
class Assignment:
    """What one client gets this round."""

    keeps: dict[str, Tensor]  # group -> kept channels (absent: all)
    state: dict[str, Tensor]  # compact state_dict
    params: int  # parameters down (and expected up)
    bytes: int  # bytes down (and expected up)
    training_flops: int  # per sample, of the compact model


class Server:
    """A CA-HFP server round object (see module docs).

    Args:
        model: the global model (its state is copied; the module is the architecture; it is
            not changed).
        example_input: one input batch (for tracing and FLOP counts; a batch of one works).
        plan: a channel plan; default ``trace_plan(model, example_input, residual)``.
        criterion: an :class:`~cahfp_ops.fl.importance.Importance`, or the shorthand
            ``"curvature"`` (CA-HFP), ``"l1"`` / ``"l2"`` (filter norm), ``"random"``.
        curvature, personalized: with the ``"curvature"`` shorthand, the curvature proxy
            (``"secant"`` or ``"fisher"``) and per-client scoring (see ``CurvatureImportance``).
        mode: ``"reconstruct"`` (CA-HFP) or ``"overlap"`` (HeteroFL) aggregation.
        warmup_rounds: rounds with random masks before scores are used (a criterion that is
            not ready yet, e.g. curvature without two rounds of history, also gets random masks).
        lr, local_steps: the clients' SGD step size and steps per round (scale of ``g``).
        seed: seeds the server's generator (random masks).
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
        residual: str = "internal",
        warmup_rounds: int = 1,
        lr: float = 0.1,
        local_steps: int = 1,
        seed: int = 0,
        personalized: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"Server: mode must be one of {MODES}, got {mode!r}")
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
        self._flops_cache: dict[tuple, int] = {}

    # ------------------------------------------------------------------ assign / extract
    def scores(self, ids: list[Hashable]) -> dict[str, Tensor]:
        """Group scores for this round's clients (random during warm-up or while the criterion is
        not ready): ``(C,)`` shared, or ``(K, C)`` per client."""
        if self.round < self.warmup_rounds or not self.criterion.ready:
            return random_scores(self.plan, self.generator, len(ids))
        return self.criterion.scores(self.plan, self.state, ids, self.generator)

    def assign(self, ratios: Mapping[Hashable, Ratio]) -> dict[Hashable, Assignment]:
        """Keep sets and compact state_dicts for the clients of this round."""
        ids = list(ratios)
        keeps = assign_keep_sets(self.plan, [ratios[c] for c in ids], self.scores(ids))
        states = extract(self.state, self.plan, keeps)
        self.assignments = {}
        for cid, keep, st in zip(ids, keeps, states):
            nbytes = sum(v.numel() * v.element_size() for v in st.values() if v.is_floating_point())
            self.assignments[cid] = Assignment(keep, st, count_params(st), nbytes, self._training_flops(st))
        return self.assignments

    def _training_flops(self, compact_state: Mapping[str, Tensor]) -> int:
        """Per-sample training FLOPs of a compact model (they depend on its shapes only)."""
        shapes = tuple((k, tuple(v.shape)) for k, v in compact_state.items())
        if shapes not in self._flops_cache:
            compact = build_compact(self.model, compact_state)
            self._flops_cache[shapes] = count_flops(compact, self.example_input)["training_flops"]
        return self._flops_cache[shapes]

    def build(self, cid: Hashable) -> nn.Module:
        """The compact module for client ``cid`` (loaded with its compact state)."""
        return build_compact(self.model, self.assignments[cid].state)

    # ------------------------------------------------------------------ aggregate
    def check_update(self, cid: Hashable, update: Mapping[str, Tensor]) -> str | None:
        """Why client ``cid``'s reply cannot be used, or None when it is well formed."""
        if cid not in self.assignments:
            return f"client {cid!r} was not assigned this round"
        return check_reply(cid, self.assignments[cid].state, update)

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
        report = self._check_round(updates, weights)
        good = report.accepted
        w = [report.clients[c].weight for c in good]
        if good and sum(w) > 0:
            rows, cols = self.plan.tensor_keep_sets([self.assignments[c].keeps for c in good])
            replies = [updates[c] for c in good]
            self.criterion.observe_replies(self.state, good, replies, rows, cols, self.lr, self.local_steps)
            if streaming:
                agg = StreamingAggregator(self.state, self.mode)
                for j, reply in enumerate(replies):
                    agg.add(reply, {n: v[j] for n, v in rows.items()}, {n: v[j] for n, v in cols.items()}, w[j])
                self.state = agg.result()
            else:
                self.state = aggregate_state(self.state, replies, rows, cols, w, self.mode)
        self.criterion.observe(self.state, self.lr, self.local_steps)
        self.round += 1
        return report

    def _check_round(
        self, updates: Mapping[Hashable, Mapping[str, Tensor]], weights: Mapping[Hashable, float] | None
    ) -> RoundReport:
        """One record per client: each reply checked (then its weight), each silent assignee absent."""
        report = RoundReport(self.round, full_params=count_params(self.state), full_training_flops=self._full_flops)
        for cid, update in updates.items():
            why = self.check_update(cid, update) or check_weight(cid, weights)
            a = self.assignments.get(cid)
            record = ClientRecord(cid, "rejected" if why else "accepted", why)
            if a is not None:
                record.params_down, record.bytes_down, record.training_flops = a.params, a.bytes, a.training_flops
                if why is None:
                    record.params_up, record.bytes_up = a.params, a.bytes
                    record.weight = float(weights[cid]) if weights is not None else 1.0
            report.clients[cid] = record
        for cid, a in self.assignments.items():
            if cid not in updates:
                report.clients[cid] = ClientRecord(
                    cid, "absent", params_down=a.params, bytes_down=a.bytes, training_flops=a.training_flops
                )
        return report

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
