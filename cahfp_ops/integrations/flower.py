"""Flower integration: a CA-HFP Strategy for Flower's message API (flwr >= 1.22).

Flower's ``FedAvg`` assumes every node returns arrays shaped like the global model; with
heterogeneous pruning they do not. :class:`CAHFPStrategy` is a ``FedAvg`` that overrides only
what heterogeneous submodels need, the way Flower's own ``FedProx`` overrides one method:

* ``configure_train``: ``FedAvg`` samples the nodes and builds the messages; each node's
  content is then replaced by its *compact* arrays (a physically smaller model), its keep
  sets and its pruning ratio;
* ``aggregate_train``: the heterogeneous replies are checked one by one (errors, malformed or
  non-finite arrays are rejected and counted in the metrics) and folded into the full global
  model by the :class:`cahfp_ops.fl.Server`; training metrics use ``FedAvg``'s
  ``train_metrics_aggr_fn`` over the accepted replies.

Node sampling, evaluation (the full global model) and evaluation metrics are ``FedAvg``'s.

Client side: :func:`compact_model` builds the compact module from a received message's
content, :func:`reply_content` packs the trained arrays and metrics.

Install with ``pip install "cahfp-ops[flower]"``; this module imports flwr, the rest of
cahfp_ops never does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

from torch import nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.logger import log
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("cahfp_ops.integrations.flower needs Flower: pip install 'cahfp-ops[flower]'") from exc

from ..fl import RoundReport, Server, build_compact

KEEP_KEY = "cahfp-keep-sets"

Ratio = float | Mapping[int, float] | Callable[[int], float]


class CAHFPStrategy(FedAvg):
    """Heterogeneous federated pruning over Flower messages.

    Args:
        server: the CA-HFP server (model, channel plan, criterion, aggregation mode).
        ratio: the nodes' pruning ratios: one for all, a mapping node id -> ratio (missing
            nodes: 0), or a function of the node id.
        streaming: fold replies in one at a time (O(model) memory) rather than in one batch.
        **fedavg: ``FedAvg``'s arguments (``fraction_train``, ``min_train_nodes``,
            ``fraction_evaluate``, ``min_evaluate_nodes``, ``min_available_nodes``,
            ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key``,
            ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``).

    Sampling follows ``FedAvg``: it waits for ``min_available_nodes`` connected nodes and uses
    Python's ``random`` module (seed it for reproducible sampling).
    """

    def __init__(self, server: Server, ratio: Ratio = 0.5, *, streaming: bool = True, **fedavg):
        super().__init__(**fedavg)
        self.server = server
        self.ratio = ratio
        self.streaming = streaming
        self.reports: list[RoundReport] = []

    def node_ratio(self, node_id: int) -> float:
        """The pruning ratio of node ``node_id``."""
        if callable(self.ratio):
            return float(self.ratio(node_id))
        if isinstance(self.ratio, Mapping):
            return float(self.ratio.get(node_id, 0.0))
        return float(self.ratio)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """``FedAvg``'s sampled messages, each carrying its node's compact arrays, keep sets and ratio."""
        if arrays is not None and len(arrays):
            self.server.adopt(arrays.to_torch_state_dict())
        # FedAvg samples in random order; node order fixes the server's mask draws, so sort.
        messages = sorted(
            super().configure_train(server_round, arrays, config, grid), key=lambda m: m.metadata.dst_node_id
        )
        ratios = {m.metadata.dst_node_id: self.node_ratio(m.metadata.dst_node_id) for m in messages}
        assignments = self.server.assign(ratios)
        out = []
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            a = assignments[node_id]
            cfg = ConfigRecord(dict(msg.content[self.configrecord_key]))
            cfg["cahfp-ratio"] = ratios[node_id]
            content = RecordDict(
                {
                    self.arrayrecord_key: ArrayRecord(dict(a.state)),
                    self.configrecord_key: cfg,
                    KEEP_KEY: ArrayRecord(dict(a.keeps)),
                }
            )
            out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node_id))
        log(INFO, "configure_train: compact models of %s", sorted({a.params for a in assignments.values()}))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, then reconstruct-aggregate the accepted ones into the full global model."""
        updates, weights, failed, contents = {}, {}, {}, {}
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
            updates[node_id], weights[node_id], contents[node_id] = update, weight, msg.content
        report = self.server.aggregate(updates, weights, streaming=self.streaming)
        for node_id, reason in failed.items():
            report.reject(node_id, reason)
        self.reports.append(report)
        for reason in report.rejected.values():
            log(INFO, "aggregate_train: rejected: %s", reason)
        metrics = {"accepted": len(report.accepted), "rejected": len(report.rejected), "absent": len(report.absent)}
        accepted = [contents[n] for n in report.accepted]
        if accepted:
            metrics.update(dict(self.train_metrics_aggr_fn(accepted, self.weighted_by_key)))
        return ArrayRecord(self.server.state), MetricRecord(metrics)

    def summary(self) -> None:
        s = self.server
        log(
            INFO,
            "\t├──> CA-HFP: criterion %s, aggregation %s, %s channel groups",
            s.criterion,
            s.mode,
            len(s.plan.groups),
        )
        log(INFO, "\t│\t└── Ratio: %s", self.ratio if not callable(self.ratio) else "per node (function)")
        super().summary()


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
