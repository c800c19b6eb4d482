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

Wire format (``packed=True``, the default): a node's floating compact tensors travel as **one
array** (``"cahfp-packed"``: the tensors flattened end to end, in the global model's order),
with integer entries (``num_batches_tracked``) as arrays of their own; the config record
names the packed tensors (``"cahfp-packed-names"``) and gives their shapes
(``"cahfp-packed-shapes"``: per tensor its number of dims, then the dims). A 277-tensor
ResNet-56 is then one array per message instead of 277, and the server aggregates the reply
as one buffer. :func:`compact_model` and :func:`reply_content` read and write both formats
(``reply_content`` answers in the format it was sent); a node with its own client code can
unpack with :func:`compact_state`, or the strategy can send named arrays (``packed=False``).
A packed reply whose buffer does not have its assignment's size is rejected as malformed.

Install with ``pip install "cahfp-ops[flower]"``; this module imports flwr, the rest of
cahfp_ops never does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

from torch import Tensor, nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.logger import log
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("cahfp_ops.integrations.flower needs Flower: pip install 'cahfp-ops[flower]'") from exc

from ..fl import ClientRecord, RoundReport, Server, build_compact
from ..layout import PackedModel
from ._wire import as_packed, pack, packed_parts, unpack

KEEP_KEY = "cahfp-keep-sets"
PACKED_KEY = "cahfp-packed"
NAMES_KEY = "cahfp-packed-names"
SHAPES_KEY = "cahfp-packed-shapes"

Ratio = float | Mapping[int, float] | Callable[[int], float]


class CAHFPStrategy(FedAvg):
    """Heterogeneous federated pruning over Flower messages.

    Args:
        server: the CA-HFP server (model, channel plan, criterion, aggregation mode).
        ratio: the nodes' pruning ratios: one for all, a mapping node id -> ratio (missing
            nodes: 0), or a function of the node id.
        streaming: fold replies in one at a time (O(model) memory) rather than in one batch.
            A robust reducer on the server (``Server(reduce="median" | "trimmed_mean")``)
            needs the whole round: the strategy then collects the replies and aggregates them
            in one batch whatever ``streaming`` says.
        packed: send each node its floating tensors as one array (see the module docs); False
            sends one named array per tensor.
        **fedavg: ``FedAvg``'s arguments (``fraction_train``, ``min_train_nodes``,
            ``fraction_evaluate``, ``min_evaluate_nodes``, ``min_available_nodes``,
            ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key``,
            ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``).

    Sampling follows ``FedAvg``: it waits for ``min_available_nodes`` connected nodes and uses
    Python's ``random`` module (seed it for reproducible sampling).

    Replies are untrusted: a reply from a node that was not sampled this round, one that
    answers another message than the one sent to its node (Flower's ``reply_to_message_id``
    against the sent message's id: a late or forged reply), an error reply, a malformed one
    and every later reply of a node that already replied are rejected with a reason; the
    report (``reports[-1]``) lists them, duplicates in ``duplicates``.
    """

    def __init__(self, server: Server, ratio: Ratio = 0.5, *, streaming: bool = True, packed: bool = True, **fedavg):
        super().__init__(**fedavg)
        self.server = server
        self.ratio = ratio
        self.streaming = streaming
        self.packed = packed
        self.reports: list[RoundReport] = []
        self._sent: dict[int, Message] = {}  # node -> the message sent to it this round
        self._sent_round: int | None = None

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
            if self.packed and isinstance(a.state, PackedModel):
                buffer, extras, cfg[NAMES_KEY], cfg[SHAPES_KEY] = packed_parts(a.state)
                arrays = ArrayRecord({PACKED_KEY: buffer, **extras})
            else:
                arrays = ArrayRecord(dict(a.state))
            content = RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: cfg, KEEP_KEY: ArrayRecord(dict(a.keeps))}
            )
            out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node_id))
        self._sent = {m.metadata.dst_node_id: m for m in out}
        self._sent_round = server_round
        log(INFO, "configure_train: compact models of %s", sorted({a.params for a in assignments.values()}))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, then reconstruct-aggregate the accepted ones into the full global model."""
        arrivals, failed, contents = [], [], {}
        for msg in replies:
            node_id = msg.metadata.src_node_id
            why = self._provenance_problem(server_round, msg)
            if why is None and msg.has_error():
                why = f"node {node_id} replied with an error: {msg.error.reason}"
            if why is None:
                try:
                    update = self.reply_state(node_id, msg.content)
                    record = next(iter(msg.content.metric_records.values()))
                    weight = record[self.weighted_by_key]
                except Exception as exc:  # a reply without arrays or without its example count
                    why = f"node {node_id} sent a malformed reply ({type(exc).__name__}: {exc})"
            if why is not None:
                failed.append((node_id, why))
                continue
            arrivals.append((node_id, update, weight))
            contents.setdefault(node_id, msg.content)
        streaming = self.streaming and self.server.reduce == "mean"
        report = self.server.aggregate(arrivals, streaming=streaming)
        for node_id, reason in failed:
            record = report.clients.get(node_id)
            if record is None or record.status == "absent":
                report.reject(node_id, reason)
            else:  # the node's counted (or first) reply is already recorded
                report.duplicates.append(ClientRecord(node_id, "rejected", reason))
        self.reports.append(report)
        for reason in report.rejected.values():
            log(INFO, "aggregate_train: rejected: %s", reason)
        metrics = {
            "accepted": len(report.accepted),
            "rejected": len(report.rejected),
            "absent": len(report.absent),
            "duplicates": len(report.duplicates),
        }
        accepted = [contents[n] for n in report.accepted]
        if accepted:
            metrics.update(dict(self.train_metrics_aggr_fn(accepted, self.weighted_by_key)))
        return ArrayRecord(self.server.state), MetricRecord(metrics)

    def _provenance_problem(self, server_round: int, msg: Message) -> str | None:
        """Why a reply does not belong to this round's messages, or None."""
        node_id = msg.metadata.src_node_id
        if server_round != self._sent_round or node_id not in self._sent:
            return f"node {node_id} was not sampled in round {server_round}"
        sent_id = self._sent[node_id].metadata.message_id
        reply_to = msg.metadata.reply_to_message_id
        if sent_id and reply_to != sent_id:
            return f"node {node_id}'s reply answers message {reply_to!r}, not the one sent in round {server_round}"
        return None

    def reply_state(self, node_id: int, content: RecordDict) -> Mapping[str, Tensor]:
        """A reply's compact state: named arrays as they came, or a packed reply as a
        :class:`~cahfp_ops.layout.PackedModel` laid out as the node's assignment (so the
        server reads it as one buffer). Raises ValueError for a packed reply that cannot be
        laid out so (wrong size or shape, or a node without a packed assignment)."""
        state = content[self.arrayrecord_key].to_torch_state_dict()
        if PACKED_KEY not in state:
            return state
        buffer = state.pop(PACKED_KEY)
        a = self.server.assignments.get(node_id)
        if a is None or not isinstance(a.state, PackedModel):
            raise ValueError(f"node {node_id} sent a packed reply without a packed assignment")
        return as_packed(buffer, a.state, state)

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
def compact_state(content: RecordDict, arrayrecord_key: str = "arrays", configrecord_key: str = "config") -> dict:
    """The compact state_dict a message carries, whether packed or as named arrays (packed
    tensors come back as views of the received buffer)."""
    state = content[arrayrecord_key].to_torch_state_dict()
    if PACKED_KEY not in state:
        return state
    cfg = content[configrecord_key]
    packed = unpack(state.pop(PACKED_KEY), list(cfg[NAMES_KEY]), list(cfg[SHAPES_KEY]))
    return {**packed, **state}


def compact_model(
    model: nn.Module, content: RecordDict, arrayrecord_key: str = "arrays", configrecord_key: str = "config"
) -> nn.Module:
    """The compact module a node trains: ``model``'s architecture resized to the received arrays."""
    return build_compact(model, compact_state(content, arrayrecord_key, configrecord_key))


def reply_content(
    model: nn.Module,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str = "arrays",
    *,
    received: RecordDict | None = None,
    configrecord_key: str = "config",
) -> RecordDict:
    """A node's training reply: its trained compact arrays and metrics (with the example count).

    ``received``: the content the node was sent; when it came packed, the reply is packed the
    same way (one array, in the sent order), else the arrays are named.
    """
    record = MetricRecord({weighted_by_key: int(num_examples), **dict(metrics or {})})
    state = model.state_dict()
    cfg = received[configrecord_key] if received is not None and configrecord_key in received else None
    if cfg is not None and NAMES_KEY in cfg:
        buffer, rest = pack(state, list(cfg[NAMES_KEY]))
        arrays = ArrayRecord({PACKED_KEY: buffer, **rest})
    else:
        arrays = ArrayRecord(state)
    return RecordDict({arrayrecord_key: arrays, "metrics": record})
