"""Flower integration: a CA-HFP Strategy for Flower's message API (flwr >= 1.22).

Flower's own FedAvg assumes every node returns arrays shaped like the global model; with
heterogeneous pruning they do not. :class:`CAHFPStrategy` gives each node its pruning ratio:
``configure_train`` sends every node its *compact* arrays (a physically smaller model) plus
its keep sets, and ``aggregate_train`` folds the heterogeneous replies into the full global
model with the streaming reconstruct-aggregate of a :class:`cahfp_ops.server.Server`.
Replies with errors, malformed or non-finite arrays are rejected (counted in the metrics)
and nodes that do not answer are simply absent. Evaluation sends the full global model.

Client side: :func:`compact_model` builds the compact module from a received message's
content, :func:`reply_content` packs the trained arrays and metrics.

Install with ``pip install "cahfp-ops[flower]"``; this module imports flwr, the rest of
cahfp_ops never does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from logging import INFO

from torch import nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.common.logger import log
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("cahfp_ops.integrations.flower needs Flower: pip install 'cahfp-ops[flower]'") from exc

from ..compact import build_compact
from ..server import RoundReport, Server

KEEP_KEY = "cahfp-keep-sets"

Ratio = float | Mapping[int, float] | Callable[[int], float]


class CAHFPStrategy(Strategy):
    """Heterogeneous federated pruning over Flower messages.

    Args:
        server: the CA-HFP server (model, channel plan, criterion, aggregation mode).
        ratio: the nodes' pruning ratios: one for all, a mapping node id -> ratio (missing
            nodes: 0), or a function of the node id.
        fraction_train, min_train_nodes: share of the connected nodes asked to train per
            round, and the least number asked (all nodes when fewer are connected).
        fraction_evaluate, min_evaluate_nodes: the same for federated evaluation.
        weighted_by_key: the reply metric holding the node's example count (aggregation weight).
        streaming: fold replies in one at a time (O(model) memory) rather than in one batch.
        seed: seeds node sampling.
    """

    def __init__(
        self,
        server: Server,
        ratio: Ratio = 0.5,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        fraction_evaluate: float = 1.0,
        min_evaluate_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        streaming: bool = True,
        seed: int = 0,
    ):
        self.server = server
        self.ratio = ratio
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.fraction_evaluate, self.min_evaluate_nodes = fraction_evaluate, min_evaluate_nodes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key, self.configrecord_key = arrayrecord_key, configrecord_key
        self.streaming = streaming
        self.rng = random.Random(seed)
        self.reports: list[RoundReport] = []

    # ------------------------------------------------------------------ helpers
    def node_ratio(self, node_id: int) -> float:
        if callable(self.ratio):
            return float(self.ratio(node_id))
        if isinstance(self.ratio, Mapping):
            return float(self.ratio.get(node_id, 0.0))
        return float(self.ratio)

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if fraction <= 0 or not nodes:
            return []
        n = min(len(nodes), max(minimum, int(len(nodes) * fraction)))
        return sorted(self.rng.sample(nodes, n))

    def _sync(self, arrays: ArrayRecord) -> None:
        """Adopt the framework's global arrays when they differ from the server's (e.g. round 1)."""
        if arrays is None or not len(arrays):
            return
        incoming = arrays.to_torch_state_dict()
        state = self.server.state
        if incoming.keys() != state.keys():
            raise ValueError("CAHFPStrategy: the global arrays do not match the server's model")
        if any(not incoming[k].to(state[k].device).equal(state[k]) for k in state):
            self.server.state = {k: incoming[k].to(device=state[k].device, dtype=state[k].dtype) for k in state}
            self.server.tracker.observe(self.server.state)

    def _config(self, config: ConfigRecord, server_round: int, **extra) -> ConfigRecord:
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        for k, v in extra.items():
            cfg[k] = v
        return cfg

    # ------------------------------------------------------------------ Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node gets its compact arrays, its keep sets and its ratio."""
        self._sync(arrays)
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        assignments = self.server.assign({n: self.node_ratio(n) for n in nodes})
        messages = []
        for node_id, a in assignments.items():
            content = RecordDict(
                {
                    self.arrayrecord_key: ArrayRecord(a.state),
                    self.configrecord_key: self._config(
                        config, server_round, **{"cahfp-ratio": self.node_ratio(node_id)}
                    ),
                    KEEP_KEY: ArrayRecord({g: k for g, k in a.keeps.items()}),
                }
            )
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        log(
            INFO,
            "configure_train: %s nodes, compact models of %s",
            len(messages),
            sorted({a.params for a in assignments.values()}),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reconstruct-aggregate the heterogeneous replies into the full global model."""
        updates, weights, failed, metrics = {}, {}, {}, []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                failed[node_id] = f"node {node_id} replied with an error: {msg.error.reason}"
                continue
            try:
                update = msg.content[self.arrayrecord_key].to_torch_state_dict()
                record = next(iter(msg.content.metric_records.values()))
                weight = float(record[self.weighted_by_key])
            except Exception as exc:  # a reply without arrays or without its example count
                failed[node_id] = f"node {node_id} sent a malformed reply ({type(exc).__name__}: {exc})"
                continue
            updates[node_id], weights[node_id] = update, weight
            metrics.append((node_id, weight, record))
        report = self.server.aggregate(updates, weights, streaming=self.streaming)
        report.rejected.update(failed)
        report.absent = [n for n in report.absent if n not in failed]
        self.reports.append(report)
        for reason in report.rejected.values():
            log(INFO, "aggregate_train: rejected: %s", reason)
        out = {"accepted": len(report.accepted), "rejected": len(report.rejected), "absent": len(report.absent)}
        accepted = [(w, r) for n, w, r in metrics if n in report.accepted]
        out.update(_weighted_means(accepted, skip=self.weighted_by_key))
        return ArrayRecord(self.server.state), MetricRecord(out)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sampled nodes evaluate the full global model."""
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: self._config(config, server_round)})
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted means of the nodes' evaluation metrics."""
        pairs = []
        for msg in replies:
            if msg.has_error() or not msg.content.metric_records:
                continue
            record = next(iter(msg.content.metric_records.values()))
            if self.weighted_by_key in record:
                pairs.append((float(record[self.weighted_by_key]), record))
        return MetricRecord(_weighted_means(pairs, skip=self.weighted_by_key)) if pairs else None

    def summary(self) -> None:
        s = self.server
        log(
            INFO,
            "\t├── CA-HFP: criterion %s, aggregation %s, %s channel groups",
            s.criterion,
            s.mode,
            len(s.plan.groups),
        )
        log(INFO, "\t├── Ratio: %s", self.ratio if not callable(self.ratio) else "per node (function)")
        log(INFO, "\t└── Fraction train / evaluate: %s / %s", self.fraction_train, self.fraction_evaluate)


def _weighted_means(pairs: list[tuple[float, MetricRecord]], skip: str) -> dict[str, float]:
    total = sum(w for w, _ in pairs)
    if not pairs or total <= 0:
        return {}
    keys = set.intersection(*(set(r.keys()) for _, r in pairs)) - {skip}
    out = {}
    for k in sorted(keys):
        values = [(w, r[k]) for w, r in pairs]
        if all(isinstance(v, (int, float)) for _, v in values):
            out[k] = sum(w * float(v) for w, v in values) / total
    return out


# ---------------------------------------------------------------------- client side
def compact_model(model: nn.Module, content: RecordDict, arrayrecord_key: str = "arrays") -> nn.Module:
    """The compact module a node trains: ``model``'s architecture resized to the received arrays."""
    return build_compact(model, content[arrayrecord_key].to_torch_state_dict())


def reply_content(
    model: nn.Module,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str = "arrays",
) -> RecordDict:
    """A node's training reply: its trained compact arrays and metrics (with the example count)."""
    record = MetricRecord({weighted_by_key: int(num_examples), **dict(metrics or {})})
    return RecordDict({arrayrecord_key: ArrayRecord(model.state_dict()), "metrics": record})
