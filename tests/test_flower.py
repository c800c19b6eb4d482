"""The Flower strategy against real Flower objects (Message, ArrayRecord, ConfigRecord,
MetricRecord, Grid): compact configure messages, heterogeneous aggregation, error replies,
dropped nodes, and whole runs through Flower's own Strategy.start loop."""

import copy
import uuid

import pytest
import torch
import torch.nn.functional as F

flwr = pytest.importorskip("flwr")
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from cahfp_ops.fl import zoo  # noqa: E402
from cahfp_ops.fl.compact import build_compact  # noqa: E402
from cahfp_ops.fl.server import Server  # noqa: E402
from cahfp_ops.integrations.flower import (  # noqa: E402
    KEEP_KEY,
    PACKED_KEY,
    CAHFPStrategy,
    compact_model,
    compact_state,
    reply_content,
)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run identity; a running Flower app sets it, the tests set it here."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LocalGrid(Grid):
    """A Grid whose nodes are Python functions called in process (no network, no Ray)."""

    def __init__(self, nodes):
        self.nodes = nodes
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:  # as Flower's grids do: a fresh id on each pushed message, set in place
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        replies = [self.nodes[m.metadata.dst_node_id](m) for m in messages]
        return [r for r in replies if r is not None]


def make_node(base, data, behaviour="good"):
    x, y = data

    def handle(msg):
        if msg.metadata.message_type == MessageType.EVALUATE:
            model = build_compact(base, msg.content["arrays"].to_torch_state_dict()).eval()
            with torch.no_grad():
                acc = float((model(x).argmax(1) == y).float().mean())
            return Message(
                RecordDict({"metrics": MetricRecord({"num-examples": len(y), "accuracy": acc})}), reply_to=msg
            )
        if behaviour == "drop":
            return None
        if behaviour == "error":
            return Message(Error(code=1, reason="out of memory"), reply_to=msg)
        model = compact_model(base, msg.content).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        content = reply_content(model, len(y), {"train_loss": float(loss)}, received=msg.content)
        if behaviour == "nan":
            arrays = content["arrays"].to_torch_state_dict()
            arrays[PACKED_KEY if PACKED_KEY in arrays else "fc2.bias"][-1] = float("nan")
            content["arrays"] = ArrayRecord(arrays)
        if behaviour == "short":  # a packed buffer one element short
            arrays = content["arrays"].to_torch_state_dict()
            arrays[PACKED_KEY] = arrays[PACKED_KEY][:-1].clone()
            content["arrays"] = ArrayRecord(arrays)
        if behaviour == "no-count":
            content["metrics"] = MetricRecord({"train_loss": float(loss)})
        return Message(content, reply_to=msg)

    return handle


def _setup(gen, behaviours):
    torch.manual_seed(0)
    base = zoo.small_cnn(8)
    data = {
        n: (torch.randn(12, 1, 8, 8, generator=gen), torch.randint(0, 10, (12,), generator=gen)) for n in behaviours
    }
    server = Server(zoo.small_cnn(8), torch.randn(2, 1, 8, 8, generator=gen), warmup_rounds=1)
    grid = LocalGrid({n: make_node(base, data[n], b) for n, b in behaviours.items()})
    return server, grid


def test_configure_train_sends_compact_arrays_and_keep_sets(gen):
    server, grid = _setup(gen, {1: "good", 2: "good", 3: "good"})
    strategy = CAHFPStrategy(server, ratio={1: 0.0, 2: 0.5, 3: 0.75})
    msgs = list(strategy.configure_train(1, ArrayRecord(server.state), ConfigRecord({"lr": 0.1}), grid))
    assert [m.metadata.dst_node_id for m in msgs] == [1, 2, 3]
    sizes = {
        m.metadata.dst_node_id: sum(
            a.numel() for a in m.content["arrays"].to_torch_state_dict().values() if a.is_floating_point()
        )
        for m in msgs
    }
    assert sizes[1] == 13898 and sizes[2] == 3754 and sizes[3] == 1082
    assert set(msgs[1].content[KEEP_KEY].keys()) == {"conv1", "conv2", "fc1"} and not len(msgs[0].content[KEEP_KEY])
    cfg = msgs[1].content["config"]
    assert cfg["server-round"] == 1 and cfg["cahfp-ratio"] == 0.5 and cfg["lr"] == 0.1


def test_aggregate_train_handles_errors_drops_and_bad_arrays(gen):
    behaviours = {1: "good", 2: "good", 3: "error", 4: "drop", 5: "nan", 6: "no-count"}
    server, grid = _setup(gen, behaviours)
    strategy = CAHFPStrategy(server, ratio=0.5)
    msgs = strategy.configure_train(1, ArrayRecord(server.state), ConfigRecord(), grid)
    replies = grid.send_and_receive(msgs)
    # the same good replies through a separate, batch-aggregating server
    twin = copy.deepcopy(server)
    good = {r.metadata.src_node_id: r for r in replies if r.metadata.src_node_id in (1, 2)}
    expected = twin.aggregate({n: strategy.reply_state(n, r.content) for n, r in good.items()}, {n: 12.0 for n in good})
    arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.reports[-1]
    assert report.accepted == [1, 2] and expected.accepted == [1, 2]
    assert set(report.rejected) == {3, 5, 6} and report.absent == [4]
    assert "out of memory" in report.rejected[3] and "non-finite" in report.rejected[5]
    assert "malformed" in report.rejected[6]
    assert metrics["accepted"] == 2 and metrics["rejected"] == 3 and metrics["absent"] == 1
    assert "train_loss" in metrics
    got = arrays.to_torch_state_dict()
    for k, v in twin.state.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)


def test_whole_run_through_flower_start(gen):
    server, grid = _setup(gen, {1: "good", 2: "good", 3: "good", 4: "drop"})
    strategy = CAHFPStrategy(server, ratio=lambda n: 0.25 * (n - 1), min_train_nodes=4, min_evaluate_nodes=3)
    result = strategy.start(grid, ArrayRecord(server.state), num_rounds=3)
    assert server.round == 3 and len(strategy.reports) == 3
    assert all(r.accepted == [1, 2, 3] and r.absent == [4] for r in strategy.reports)
    final = result.arrays.to_torch_state_dict()
    for k, v in server.state.items():
        assert torch.equal(final[k], v)
    assert 3 in result.evaluate_metrics_clientapp and "accuracy" in result.evaluate_metrics_clientapp[3]


def test_flower_app_end_to_end_with_flwr_run(tmp_path):
    """The example app through Flower's run command (``flwr run``, a local SuperLink in
    simulation mode): 4 nodes, 2 rounds; the SuperLink it starts is stopped afterwards."""
    pytest.importorskip("ray")
    pytest.importorskip("sklearn")  # the app's clients read scikit-learn's digits
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "flower_app" / "run.py"
    port = random.Random(os.getpid()).randrange(40000, 60000, 2)  # apart from a user's SuperLink
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(port + 1)}  # fmt: skip
    res = subprocess.run(
        [sys.executable, str(script), "--nodes", "4", "--rounds", "2", "--stop-superlink"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "CA-HFP over Flower: 2 rounds" in res.stdout and "accepted per round [4, 4]" in res.stdout
    left = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {port}"], capture_output=True, text=True)
    assert not left.stdout.strip(), "the local SuperLink was left running"


def test_strategy_is_a_fedavg_overriding_only_the_train_side():
    """CAHFPStrategy reuses FedAvg's sampling, evaluation and metric aggregation."""
    from flwr.serverapp.strategy import FedAvg

    assert issubclass(CAHFPStrategy, FedAvg)
    own = {k for k, v in vars(CAHFPStrategy).items() if callable(v) and not k.startswith("__")}
    assert own == {"configure_train", "aggregate_train", "node_ratio", "reply_state", "summary", "_provenance_problem"}
    for inherited in ("configure_evaluate", "aggregate_evaluate"):
        assert getattr(CAHFPStrategy, inherited) is getattr(FedAvg, inherited)


def test_fedavg_arguments_pass_through(gen):
    server, _ = _setup(gen, {1: "good"})
    calls = []

    def metrics_fn(contents, key):
        calls.append(len(contents))
        return MetricRecord({"custom": 1.0})

    strategy = CAHFPStrategy(
        server, ratio=0.5, min_available_nodes=1, min_train_nodes=1, train_metrics_aggr_fn=metrics_fn
    )
    assert strategy.min_available_nodes == 1 and strategy.train_metrics_aggr_fn is metrics_fn
    _, grid = _setup(gen, {1: "good", 2: "good"})
    msgs = strategy.configure_train(1, ArrayRecord(server.state), ConfigRecord(), grid)
    _, metrics = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    assert calls == [2] and metrics["custom"] == 1.0 and metrics["accepted"] == 2


@pytest.mark.parametrize("packed", [True, False])
def test_wire_format_one_array_per_message_or_named_arrays(gen, packed):
    """Packed: each configure message and each reply carries its floating tensors as one array
    (the server reads it as one buffer); a short buffer is rejected as malformed. Named
    arrays (packed=False) give the same global model."""
    behaviours = {1: "good", 2: "good", 3: "good", 4: "short"} if packed else {1: "good", 2: "good", 3: "good"}
    server, grid = _setup(gen, behaviours)
    strategy = CAHFPStrategy(server, ratio={1: 0.0, 2: 0.5, 3: 0.75, 4: 0.5}, packed=packed, streaming=False)
    msgs = list(strategy.configure_train(1, ArrayRecord(server.state), ConfigRecord(), grid))
    for m in msgs:
        arrays = m.content["arrays"].to_torch_state_dict()
        floats = [k for k, v in arrays.items() if v.is_floating_point()]
        assert floats == ([PACKED_KEY] if packed else [k for k, v in server.state.items() if v.is_floating_point()])
        state = compact_state(m.content)
        assignment = server.assignments[m.metadata.dst_node_id].state
        assert list(state) == list(assignment) and all(torch.equal(state[k], assignment[k]) for k in state)
    replies = grid.send_and_receive(msgs)
    if packed:
        from cahfp_ops import PackedModel

        assert isinstance(strategy.reply_state(1, replies[0].content), PackedModel)
    strategy.aggregate_train(1, replies)
    report = strategy.reports[-1]
    assert report.accepted == [1, 2, 3]
    if packed:
        assert set(report.rejected) == {4} and "malformed" in report.rejected[4]
    assert all(torch.isfinite(v).all() for v in server.state.values() if v.is_floating_point())


def test_duplicate_late_and_unsampled_replies_are_flagged(gen):
    server, grid = _setup(gen, {1: "good", 2: "good", 3: "good"})
    strategy = CAHFPStrategy(server, ratio=0.5, streaming=False)
    msgs = list(strategy.configure_train(1, ArrayRecord(server.state), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    first = {r.metadata.src_node_id: r for r in replies}
    strategy.aggregate_train(1, replies + [first[2]])  # node 2 replies twice
    report = strategy.reports[-1]
    assert report.accepted == [1, 2, 3]
    assert [(d.client, "already replied" in d.reason) for d in report.duplicates] == [(2, True)]
    # round 2: round-1 replies arrive late; node 3 was not sampled
    msgs = [m for m in strategy.configure_train(2, ArrayRecord(server.state), ConfigRecord(), grid)]
    strategy._sent.pop(3)
    fresh = list(grid.send_and_receive([m for m in msgs if m.metadata.dst_node_id != 3]))
    strategy.aggregate_train(2, fresh + [first[1], first[3]])
    report = strategy.reports[-1]
    assert report.accepted == [1, 2]
    assert "not sampled" in report.rejected[3]
    assert [d.client for d in report.duplicates] == [1] and "answers message" in report.duplicates[0].reason
