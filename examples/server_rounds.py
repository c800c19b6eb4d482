"""A few CA-HFP server rounds on a real model with the model and server layer.

The server traces the model's channel groups, gives each client a physically smaller
model (its pruning ratio of every group, by curvature-aware scores after a random warm-up
round), the clients train on local data (here: random images, a stand-in), and the server
aggregates the heterogeneous replies. One client sends a corrupted update each round to show
the fault handling. Prints, per round, what every client downloaded and computes.

    python examples/server_rounds.py [--model resnet20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cahfp_ops.fl import zoo
from cahfp_ops.fl.server import Server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=sorted(zoo.ZOO))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    cifar = args.model.startswith(("vgg", "resnet"))
    shape = (3, 32, 32) if cifar else (1, 8, 8)
    model = zoo.ZOO[args.model]()
    data = {c: (torch.randn(32, *shape), torch.randint(0, 10, (32,))) for c in range(4)}
    server = Server(model, torch.randn(2, *shape), criterion="curvature", warmup_rounds=1, lr=0.05, local_steps=1)
    print(f"{args.model}: {len(server.plan.groups)} prunable channel groups; kept whole: {len(server.plan.frozen)}")
    ratios = {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75}

    def train(cid, compact):
        x, y = data[cid]
        opt = torch.optim.SGD(compact.parameters(), lr=0.05, momentum=0.9)
        compact.train()
        loss = F.cross_entropy(compact(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {k: v.detach().clone() for k, v in compact.state_dict().items()}
        if cid == 3:  # a faulty client
            name = next(k for k, v in state.items() if v.is_floating_point())
            state[name][0] = float("nan")
        return state, len(y)

    for r in range(args.rounds):
        t0 = time.perf_counter()
        report = server.run_round(ratios, train)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"\nround {r}: accepted {report.accepted}, {ms:.0f} ms")
        for why in report.rejected.values():
            print(f"  rejected: {why}")
        print(f"  {'client':>6} {'ratio':>6} {'params down':>12} {'of full':>8} {'train MFLOPs/sample':>20}")
        for cid in ratios:
            n, f = report.clients[cid].params_down, report.clients[cid].training_flops
            print(f"  {cid:>6} {ratios[cid]:>6.2f} {n:>12,} {n / report.full_params:>8.1%} {f / 1e6:>20.2f}")


if __name__ == "__main__":
    main()
