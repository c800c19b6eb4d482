"""A Flower app (ServerApp + ClientApp) running CA-HFP on scikit-learn's digits.

The ServerApp drives :class:`cahfp_ops.integrations.flower.CAHFPStrategy`: every node trains a
physically smaller copy of the small CNN (half the nodes pruned 50 %, half 75 %), and the
heterogeneous replies are reconstruct-aggregated into the full model. The ClientApp builds the
compact model from what it receives, trains one local epoch on its Dirichlet(1) share of the
digits, and replies. Run it like any Flower app, ``flwr run examples/flower_app --stream``
(``--run-config "num-server-rounds=5"``, ``--federation-config "num-supernodes=10"``), or with
``python examples/flower_app/run.py --nodes 10 --rounds 10``, which does the same.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from cahfp_ops.fl import zoo
from cahfp_ops.fl.compact import build_compact
from cahfp_ops.fl.data import dirichlet_partition, load_digits
from cahfp_ops.fl.server import Server
from cahfp_ops.integrations.flower import CAHFPStrategy, compact_model, reply_content

RATIOS = (0.5, 0.75)  # heterogeneity rank 2: half the nodes each


@functools.lru_cache(maxsize=1)
def _data(num_partitions: int):
    data = load_digits()
    return data, dirichlet_partition(data.y_train, num_partitions, 1.0, seed=0)


def _partition(context: Context):
    data, parts = _data(int(context.node_config["num-partitions"]))
    idx = parts[int(context.node_config["partition-id"])]
    return data.x_train[idx], data.y_train[idx]


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    x, y = _partition(context)
    model = compact_model(zoo.small_cnn(8), msg.content).train()
    lr = float(msg.content["config"].get("lr", 0.1))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    bs = max(1, math.ceil(len(y) / 8))
    g = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]))
    order = torch.randperm(len(y), generator=g)
    total = 0.0
    for i in range(0, len(y), bs):
        b = order[i : i + bs]
        if len(b) < 2:
            continue
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
    return Message(reply_content(model, len(y), {"train_loss": total / len(y)}, received=msg.content), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    data, _ = _data(int(context.node_config["num-partitions"]))
    model = build_compact(zoo.small_cnn(8), msg.content["arrays"].to_torch_state_dict()).eval()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return Message(
        RecordDict({"metrics": MetricRecord({"num-examples": len(data.y_test), "accuracy": acc})}), reply_to=msg
    )


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config.get("num-server-rounds", 10))
    torch.manual_seed(0)
    model = zoo.small_cnn(8)
    cahfp = Server(model, torch.randn(2, 1, 8, 8), criterion="curvature", warmup_rounds=2, lr=0.1, local_steps=8)
    ratio_of: dict[int, float] = {}

    def ratio(node_id: int) -> float:  # first half of the nodes (by id) 50 %, the rest 75 %
        if node_id not in ratio_of:
            nodes = sorted(grid.get_node_ids())
            ratio_of.update({n: RATIOS[0] if i < (len(nodes) + 1) // 2 else RATIOS[1] for i, n in enumerate(nodes)})
        return ratio_of.get(node_id, RATIOS[1])

    strategy = CAHFPStrategy(cahfp, ratio=ratio, fraction_evaluate=0.2, min_evaluate_nodes=1)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        train_config=ConfigRecord({"lr": 0.1}),
    )
    evaluated = result.evaluate_metrics_clientapp
    accuracy = evaluated[max(evaluated)]["accuracy"] if evaluated else float("nan")  # nan: no node evaluated
    accepted = [len(r.accepted) for r in strategy.reports]
    sizes = sorted({a.params for a in cahfp.assignments.values()})
    full = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    print(
        f"CA-HFP over Flower: {rounds} rounds, final accuracy {accuracy:.3f}; accepted per round {accepted}; "
        f"compact models of {sizes} values (full {full})"
    )
