"""Federated simulator: the CA-HFP experiments on small data, as the project's main job.

    python examples/fedsim.py                         # digits, 10 clients, every method, table + JSON + plot
    python examples/fedsim.py --sweep                 # Table I (methods x alpha) and Table II (score x mode)
    python examples/fedsim.py --attack signflip scale # hostile clients: mean vs bound vs median vs trimmed mean
    python examples/fedsim.py --data fmnist --data-dir ~/data --model small_cnn
    python examples/fedsim.py --data cifar10 --data-dir ~/data --model resnet20 --device cuda

Protocol (the paper's): N clients (default 10) with a Dirichlet(alpha) label partition; system
heterogeneity rank 0-3 sets the clients' pruning ratios (rank 0: half 25 %, half unpruned;
1: 25 % / 50 %; 2: 50 % / 75 %; 3: 75 % / 90 %); local SGD with momentum 0.9, lr 0.1, one local
epoch, batch 128 scaled down for small data (at least 8 steps per epoch); every client every round.
Methods (one module each in ``baselines/``): FedAvg, FedProx, PruneFL, FedMP (L1 filter norm), DapperFL,
HeteroFL, FedRolex, FjORD, random masks and CA-HFP, each with its published aggregation rule
(reconstruction or overlap averaging where a method takes either). Clients whose compact models
have equal shapes train together in one vmapped step (``fedsim_batched.py``; ``--batched``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import fedsim_attack  # noqa: E402
from baselines import heterofl  # noqa: E402
from fedsim_clients import Clients  # noqa: E402
from fedsim_core import (  # noqa: E402, F401  (Config, RANKS, ...: the simulator's API, as before)
    RANKS,
    Config,
    batch_size_for,
    client_ratios,
    evaluate,
    local_sgd,
    make_model,
    mean_local_steps,
    round_iter,
    setup,
    static_bn_statistics,
    summary,
)
from fedsim_data import Dataset, dirichlet_partition, load  # noqa: E402
from fedsim_report import format_table, plot, summarise, sweep  # noqa: E402, F401  (summarise: the simulator's API)

from cahfp_ops import load_cpp  # noqa: E402
from cahfp_ops.fl import zoo  # noqa: E402
from cahfp_ops.fl.server import Server  # noqa: E402

METHODS = baselines.METHODS


def run(
    cfg: Config,
    method: str,
    mode: str,
    data: Dataset,
    parts: list[torch.Tensor],
    progress: bool = True,
    server_options: dict | None = None,
    tamper: Callable[[int, dict, dict], dict] | None = None,
    label: str | None = None,
) -> dict:
    """One federated training run; returns the per-round history and the summary.

    ``server_options``: extra :class:`~cahfp_ops.fl.server.Server` arguments (``reduce``,
    ``trim``, ``update_bound``, ...). ``tamper(cid, sent, trained)``: what client ``cid``
    replies instead of its trained compact state_dict (``sent``: the compact global it
    received), for attack experiments.
    """
    m = baselines.get(method)
    own = baselines.own_loop(m)
    if own is not None:  # a method with its own round loop (on the same data, model and local SGD)
        return own(cfg, m.name, data, parts, progress, label)
    dev, model, capacity, (x_train, y_train), (x_test, y_test) = setup(cfg, data)
    server = Server(
        model,
        data.x_train[:2].to(dev),
        criterion=m.criterion or "random",
        mode="overlap" if mode == heterofl.MODE else mode,
        warmup_rounds=cfg.warmup_rounds if m.warmup else 0,
        lr=cfg.lr,
        local_steps=mean_local_steps(cfg, parts),
        seed=cfg.seed,
        residual=cfg.residual,
        **(server_options or {}),
    )
    width_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    label_split = mode == heterofl.MODE  # HeteroFL's option: overlap plus the classifier's label split
    masks = heterofl.label_masks(data.y_train, parts, data.num_classes) if label_split else None
    head = heterofl.classifier_names(model, data.num_classes) if label_split else None
    local = Clients(cfg, m, parts, capacity, x_train, y_train, masks, tamper)
    server_time = [0.0]  # this round's server work so far, in seconds

    def on_server(fn: Callable, *args):
        """``fn(*args)``, its wall time (the device synchronised) added to the server's share."""
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = fn(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        server_time[0] += time.perf_counter() - t0
        return out

    def one_round(ratios: dict[int, float]):
        """assign -> build -> the clients train (``--batched``: equal shapes together) -> aggregate;
        with label split, the classifier's rows recombined afterwards from the clients holding
        each class (the other tensors keep the server's result)."""
        assignments = on_server(server.assign, ratios)
        if cfg.batched == "off":
            replies = {cid: local.train(cid, on_server(server.build, cid), server.round) for cid in assignments}
            updates, weights = {c: r[0] for c, r in replies.items()}, {c: r[1] for c, r in replies.items()}
        else:
            compacts = {cid: on_server(server.build, cid).to(dev).train() for cid in assignments}
            updates, weights = local.train_grouped(compacts, server.round)
        previous = {n: server.state[n] for n in head if n is not None} if head else None
        report = on_server(server.aggregate, updates, weights)
        if head and report.accepted:
            fixed = heterofl.aggregate_label_split(server.plan, assignments, previous, updates, masks,
                                                   report.accepted, head)  # fmt: skip
            server.adopt({**server.state, **fixed})  # HeteroFL's prefix criterion ignores what it observes
        return report

    history, times, server_times = [], [], []
    rounds = round_iter(cfg, progress, label or f"{method}/{mode}")
    report, rejected = None, 0
    down = up = flops = 0.0
    for _ in rounds:
        t0 = time.perf_counter()
        server_time[0] = 0.0
        ratios = baselines.round_ratios(m, capacity, width_gen)
        report = one_round(ratios)
        times.append(time.perf_counter() - t0)
        server_times.append(server_time[0])
        rejected += len(report.rejected)
        clients = list(report.clients.values())
        down += sum(c.params_down for c in clients) / len(clients)
        up += sum(c.params_up for c in clients) / len(clients)
        flops += sum(c.training_flops for c in clients) / len(clients)
        final = server.global_model().to(dev)
        if m.static_bn:
            static_bn_statistics(final, x_train)
        history.append(evaluate(final, x_test, y_test))
        if progress:
            rounds.set_postfix(acc=f"{history[-1]:.3f}")
    return summary(m.name, mode, cfg, history, times, report.full_params, down, up, flops / cfg.rounds / 1e6,
                   report.full_training_flops / 1e6, (len(report.rejected), rejected), server_times)  # fmt: skip


def compare(cfg: Config, data: Dataset, runs: list[tuple[str, str]], progress: bool = True,
            seeds: int = 1) -> list[dict]:  # fmt: skip
    """Every (method, mode) on seeds ``cfg.seed .. cfg.seed + seeds - 1`` (each seed its own
    partition, initialisation and sampling; the methods of a seed share them)."""
    out = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        c = Config(**{**asdict(cfg), "seed": seed})
        parts = dirichlet_partition(data.y_train, c.clients, c.alpha, seed)
        out += [run(c, m, mode, data, parts, progress) for m, mode in runs]
    return out


def default_runs() -> list[tuple[str, str]]:
    return [(m, METHODS[m].modes[0]) for m in baselines.DEFAULT_METHODS]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--data", default=d.data,
                   choices=["digits", "fmnist", "cifar10", "cifar100", "synthetic", "synthetic_cifar"])
    p.add_argument("--samples", type=int, default=None,
                   help="synthetic data: training images (default 400; synthetic_cifar 5,000)")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="folder with the FashionMNIST IDX or CIFAR pickle files")
    p.add_argument("--model", default=None, choices=sorted(zoo.ZOO), help="default: small_cnn, resnet20 for CIFAR")
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration (0.1, 1, 10)")
    p.add_argument("--rank", type=int, default=d.rank, choices=sorted(RANKS), help="system heterogeneity rank")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--local-epochs", type=int, default=d.local_epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--warmup-rounds", type=int, default=d.warmup_rounds)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--residual", default=d.residual, choices=["tie", "internal"],
                   help="residual streams pruned as one group each (tie) or kept whole (internal)")
    p.add_argument("--batched", default=d.batched, choices=["auto", "on", "off"],
                   help="train clients of equal compact shapes together: on (groups of 2 or more), off, or auto "
                   "(where measured faster: groups of 6 or more on CPU, 2 or more on CUDA)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on 2 cores, two threads made the tiny steps ~3x slower)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=None,
                   help="method[/mode] ... or all (default: " + " ".join(baselines.DEFAULT_METHODS) + "); methods: "
                   + ", ".join(METHODS) + " (magnitude = fedmp)")  # fmt: skip
    p.add_argument("--sweep", action="store_true", help="run the Table I / Table II grid and write markdown")
    p.add_argument("--attack", nargs="+", default=None, choices=list(fedsim_attack.ATTACKS),
                   help="poisoning demo: hostile clients vs mean / update bound / median / trimmed mean")  # fmt: skip
    p.add_argument("--attackers", type=int, default=2, help="--attack: hostile clients (clients 0..n-1)")
    p.add_argument("--attack-scale", type=float, default=4.0, help="--attack: update multiplier s")
    p.add_argument("--trim", type=float, default=0.2, help="--attack: trimmed-mean trim per end")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (mean ± sd; paired difference vs cahfp)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = Config(a.data, a.data_dir, a.model or ("resnet20" if "cifar" in a.data else "small_cnn"), a.clients,
                 a.alpha, a.rank, a.rounds, a.local_epochs, a.lr, 0.9, a.batch_size, a.warmup_rounds, a.seed,
                 a.device, a.batched, residual=a.residual)  # fmt: skip
    try:
        data = load(cfg.data, cfg.data_dir, cfg.seed, a.samples)
    except FileNotFoundError as exc:
        raise SystemExit(f"fedsim: {exc}") from None
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    progress = not a.no_progress
    load_cpp()  # a first-use compile happens here, before any progress bar or round timer
    t0 = time.perf_counter()
    if a.attack:
        fedsim_attack.check_attackers(a.attackers, cfg.clients)
        text = fedsim_attack.run_attacks(run, cfg, data, a.attack, a.attackers, a.attack_scale,
                                         a.trim, a.seeds, a.out, progress)  # fmt: skip
        print(text)
        print(f"\nwrote {a.out / f'attack_{data.name}_x{a.attack_scale:g}'}.md, .json and .png "
              f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
        return
    try:
        runs = baselines.parse_runs(a.methods) if a.methods else None
    except ValueError as exc:
        raise SystemExit(f"fedsim: {exc}") from None
    if a.seeds < 1:
        raise SystemExit(f"fedsim: --seeds must be >= 1, got {a.seeds}")
    if a.sweep:
        print(sweep(compare, cfg, data, a.out, progress, a.seeds, runs))
        print(f"\nwrote {a.out / f'sweep_{data.name}.md'} in {time.perf_counter() - t0:.0f} s")
        return
    results = compare(cfg, data, runs or default_runs(), progress, a.seeds)
    title = (
        f"{data.name}, {cfg.model}, {cfg.clients} clients, alpha={cfg.alpha:g}, rank {cfg.rank} "
        f"(ratios {RANKS[cfg.rank][0]:.0%}/{RANKS[cfg.rank][1]:.0%})"
    )
    print(title)
    print(format_table(results))
    stem = f"fedsim_{data.name}_{cfg.model}_a{cfg.alpha:g}_r{cfg.rank}"
    meta = {"config": asdict(cfg), "seeds": list(range(cfg.seed, cfg.seed + a.seeds))}
    (a.out / f"{stem}.json").write_text(json.dumps({**meta, "summary": summarise(results), "results": results},
                                                   indent=1))  # fmt: skip
    plot(results, a.out / f"{stem}.png", title)
    print(f"\nwrote {a.out / stem}.json and .png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
