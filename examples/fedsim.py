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
Methods: FedAvg (no pruning), magnitude (L1 filter norm, FedMP-like), random masks, CA-HFP
(curvature scores), each pruned method with reconstruction (CA-HFP) or overlap averaging
(HeteroFL) aggregation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fedsim_attack  # noqa: E402
from fedsim_data import Dataset, dirichlet_partition, load  # noqa: E402

from cahfp_ops import MODES, load_cpp  # noqa: E402
from cahfp_ops.fl import zoo  # noqa: E402
from cahfp_ops.fl.server import Server  # noqa: E402

RANKS = {0: (0.25, 0.0), 1: (0.25, 0.5), 2: (0.5, 0.75), 3: (0.75, 0.9)}
METHODS = {"fedavg": None, "magnitude": "l1", "random": "random", "cahfp": "curvature"}


@dataclass
class Config:
    data: str = "digits"
    data_dir: str | None = None
    model: str = "small_cnn"
    clients: int = 10
    alpha: float = 1.0
    rank: int = 2
    rounds: int = 30
    local_epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 128
    warmup_rounds: int = 2
    seed: int = 0
    device: str = "cpu"


def client_ratios(rank: int, n: int) -> list[float]:
    """First half of the clients at the rank's first ratio, the rest at its second."""
    low, high = RANKS[rank]
    return [low if k < (n + 1) // 2 else high for k in range(n)]


def batch_size_for(n_samples: int, cap: int) -> int:
    """Batch ``cap`` (128), scaled down so that a local epoch has at least 8 steps."""
    return max(1, min(cap, math.ceil(n_samples / 8)))


def make_model(name: str, data: Dataset) -> torch.nn.Module:
    c, h, _ = data.image_shape
    if name in ("small_cnn", "mlp"):
        return zoo.ZOO[name](image_size=h, in_channels=c, num_classes=data.num_classes)
    return zoo.ZOO[name](num_classes=data.num_classes, in_channels=c)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(y)


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
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, data).to(dev)
    sizes = [len(p) for p in parts]
    steps = sum(math.ceil(n / batch_size_for(n, cfg.batch_size)) for n in sizes) / len(sizes) * cfg.local_epochs
    criterion = METHODS[method] or "random"
    server = Server(
        model,
        data.x_train[:2].to(dev),
        criterion=criterion,
        mode=mode,
        warmup_rounds=cfg.warmup_rounds,
        lr=cfg.lr,
        local_steps=max(1, round(steps)),
        seed=cfg.seed,
        **(server_options or {}),
    )
    ratios = {k: (0.0 if METHODS[method] is None else r) for k, r in enumerate(client_ratios(cfg.rank, cfg.clients))}
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    x_test, y_test = data.x_test.to(dev), data.y_test.to(dev)

    def train(cid: int, compact: torch.nn.Module):
        compact = compact.to(dev).train()
        sent = {k: v.detach().clone() for k, v in compact.state_dict().items()} if tamper else None
        opt = torch.optim.SGD(compact.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        idx = parts[cid]
        bs = batch_size_for(len(idx), cfg.batch_size)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + server.round * 1009 + cid)
        for _ in range(cfg.local_epochs):
            order = idx[torch.randperm(len(idx), generator=g)]
            for i in range(0, len(order), bs):
                b = order[i : i + bs].to(dev)
                if len(b) < 2:
                    continue
                loss = F.cross_entropy(compact(x_train[b]), y_train[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        trained = {k: v.detach().clone() for k, v in compact.state_dict().items()}
        return (tamper(cid, sent, trained) if tamper else trained), float(len(idx))

    history, times = [], []
    rounds = range(cfg.rounds)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=label or f"{method}/{mode}", leave=False)
    report, rejected = None, 0
    for _ in rounds:
        t0 = time.perf_counter()
        report = server.run_round(ratios, train)
        times.append(time.perf_counter() - t0)
        rejected += len(report.rejected)
        history.append(evaluate(server.global_model().to(dev), x_test, y_test))
        if progress:
            rounds.set_postfix(acc=f"{history[-1]:.3f}")
    k = list(ratios)
    return {
        "method": method,
        "mode": mode,
        "accuracy": history,
        "final_accuracy": history[-1],
        "best_accuracy": max(history),
        "full_params": report.full_params,
        "params_down_per_client": sum(report.clients[c].params_down for c in k) / len(k),
        "params_up_per_client": sum(report.clients[c].params_up for c in k) / len(k),
        "training_mflops_per_client": sum(report.clients[c].training_flops for c in k) / len(k) / 1e6,
        "full_training_mflops": report.full_training_flops / 1e6,
        "seconds_per_round": sum(times) / len(times),
        "rejected": len(report.rejected),
        "rejected_total": rejected,
    }


def format_table(results: list[dict]) -> str:
    head = (
        "| method | aggregation | final acc | best acc | params down / up per client | of full "
        "| train MFLOPs/sample per client | s / round |"
    )
    lines = [head, "| --- | --- | --: | --: | --: | --: | --: | --: |"]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['mode'] if r['method'] != 'fedavg' else '-'} | {r['final_accuracy']:.3f} | "
            f"{r['best_accuracy']:.3f} | {r['params_down_per_client']:,.0f} / {r['params_up_per_client']:,.0f} | "
            f"{r['params_down_per_client'] / r['full_params']:.0%} | {r['training_mflops_per_client']:.2f} | "
            f"{r['seconds_per_round']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method, line style per aggregation
    for r in results:
        label = r["method"] if r["method"] == "fedavg" else f"{r['method']} ({r['mode']})"
        ax.plot(
            range(1, len(r["accuracy"]) + 1),
            r["accuracy"],
            label=label,
            color=colors.get(r["method"]),
            linestyle="-" if r["mode"] == "reconstruct" else "--",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(cfg: Config, data: Dataset, runs: list[tuple[str, str]], progress: bool = True) -> list[dict]:
    parts = dirichlet_partition(data.y_train, cfg.clients, cfg.alpha, cfg.seed)
    return [run(cfg, m, mode, data, parts, progress) for m, mode in runs]


def default_runs() -> list[tuple[str, str]]:
    return [("fedavg", "reconstruct")] + [(m, mode) for m in ("magnitude", "random", "cahfp") for mode in MODES]


def sweep(cfg: Config, data: Dataset, out: Path, progress: bool = True) -> str:
    """Table I: methods x alpha (reconstruction). Table II: score x aggregation at cfg.alpha."""
    alphas = (0.1, 1.0, 10.0)
    table1 = {}
    for a in alphas:
        c = Config(**{**asdict(cfg), "alpha": a})
        for r in compare(c, data, [(m, "reconstruct") for m in METHODS], progress):
            table1[(r["method"], a)] = r["final_accuracy"]
    table2 = {}
    for r in compare(cfg, data, [(m, mode) for m in ("magnitude", "random", "cahfp") for mode in MODES], progress):
        table2[(r["method"], r["mode"])] = r["final_accuracy"]
    lines = [
        f"Data {data.name}, model {cfg.model}, {cfg.clients} clients, rank {cfg.rank}, {cfg.rounds} rounds, "
        f"seed {cfg.seed}; final test accuracy.",
        "",
        "Table I: methods x Dirichlet alpha (reconstruction aggregation)",
        "",
        "| method | " + " | ".join(f"alpha={a:g}" for a in alphas) + " |",
        "| --- | " + " | ".join("--:" for _ in alphas) + " |",
    ]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(f"{table1[(m, a)]:.3f}" for a in alphas) + " |")
    lines += [
        "",
        f"Table II: importance score x aggregation (alpha={cfg.alpha:g})",
        "",
        "| score | reconstruction | overlap (HeteroFL) |",
        "| --- | --: | --: |",
    ]
    for m in ("magnitude", "random", "cahfp"):
        lines.append(f"| {m} | {table2[(m, 'reconstruct')]:.3f} | {table2[(m, 'overlap')]:.3f} |")
    text = "\n".join(lines)
    (out / f"sweep_{data.name}.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--data", default=d.data, choices=["digits", "fmnist", "cifar10", "cifar100", "synthetic"])
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
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on 2 cores, two threads made the tiny steps ~3x slower)",
    )
    p.add_argument("--methods", nargs="+", default=None, help="method[/mode] ... (default: all)")
    p.add_argument("--sweep", action="store_true", help="run the Table I / Table II grid and write markdown")
    p.add_argument("--attack", nargs="+", default=None, choices=list(fedsim_attack.ATTACKS),
                   help="poisoning demo: hostile clients vs mean / update bound / median / trimmed mean")  # fmt: skip
    p.add_argument("--attackers", type=int, default=2, help="--attack: hostile clients (clients 0..n-1)")
    p.add_argument("--attack-scale", type=float, default=4.0, help="--attack: update multiplier s")
    p.add_argument("--trim", type=float, default=0.2, help="--attack: trimmed-mean trim per end")
    p.add_argument("--seeds", type=int, default=3, help="--attack: seeds per setting")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    model = a.model or ("resnet20" if a.data.startswith("cifar") else "small_cnn")
    cfg = Config(
        a.data,
        a.data_dir,
        model,
        a.clients,
        a.alpha,
        a.rank,
        a.rounds,
        a.local_epochs,
        a.lr,
        0.9,
        a.batch_size,
        a.warmup_rounds,
        a.seed,
        a.device,
    )
    try:
        data = load(cfg.data, cfg.data_dir, cfg.seed)
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
        print(f"\nwrote {a.out / f'attack_{data.name}'}.md, .json and .png in {time.perf_counter() - t0:.0f} s")
        return
    if a.sweep:
        print(sweep(cfg, data, a.out, progress))
        print(f"\nwrote {a.out / f'sweep_{data.name}.md'} in {time.perf_counter() - t0:.0f} s")
        return
    runs = default_runs()
    if a.methods:
        runs = [(m.split("/")[0], m.split("/")[1] if "/" in m else "reconstruct") for m in a.methods]
    results = compare(cfg, data, runs, progress)
    title = (
        f"{data.name}, {cfg.model}, {cfg.clients} clients, alpha={cfg.alpha:g}, rank {cfg.rank} "
        f"(ratios {RANKS[cfg.rank][0]:.0%}/{RANKS[cfg.rank][1]:.0%})"
    )
    print(title)
    print(format_table(results))
    stem = f"fedsim_{data.name}_{cfg.model}_a{cfg.alpha:g}_r{cfg.rank}"
    (a.out / f"{stem}.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=1))
    plot(results, a.out / f"{stem}.png", title)
    print(f"\nwrote {a.out / stem}.json and .png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
