"""The simulator's results: the comparison table (mean ± sd over seeds and each method's paired
difference to CA-HFP with a 95 % interval) and the accuracy plot (mean curves, ±1 sd bands).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from baselines import METHODS
from fedsim_stats import fmt_mean_sd, mean_sd, t975

from cahfp_ops import MODES


def summarise(results: list[dict], reference: tuple[str, str] = ("cahfp", "reconstruct")) -> list[dict]:
    """Per (method, mode), over seeds: final and best accuracy (mean, sd, values), the accounting,
    and the paired difference of final accuracy against ``reference`` run on the same seeds
    (mean and 95 % t interval half-width; None when the reference did not run)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["mode"]), []).append(r)
    ref = {r["seed"]: r["final_accuracy"] for r in groups.get(reference, [])}
    out = []
    for (method, mode), rs in groups.items():
        finals = [r["final_accuracy"] for r in rs]
        row = {"method": method, "mode": mode, "seeds": [r["seed"] for r in rs], "final": finals,
               "best": [r["best_accuracy"] for r in rs], **{k: rs[0][k] for k in (
                   "full_params", "params_down_per_client", "params_up_per_client", "training_mflops_per_client",
                   "full_training_mflops")},
               "seconds_per_round": statistics.mean(r["seconds_per_round"] for r in rs)}  # fmt: skip
        server_s = [r["server_seconds_per_round"] for r in rs if r.get("server_seconds_per_round") is not None]
        row["server_seconds_per_round"] = statistics.mean(server_s) if server_s else None
        diffs = [r["final_accuracy"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
        if (method, mode) != reference and diffs:
            mu, sd = mean_sd(diffs)
            row["diff"] = (mu, t975(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan"))
        out.append(row)
    return out


def _server_share(row: dict) -> str:
    s = row.get("server_seconds_per_round")
    return "" if s is None else f" ({s:.3f})"


def format_table(results: list[dict]) -> str:
    rows = summarise(results)
    n = max(len(r["seeds"]) for r in rows)
    head = (
        f"| method | aggregation | final acc ({n} seed{'s' if n > 1 else ''}) | best acc | final - cahfp [95 % CI] "
        "| params down / up per client | of full | train MFLOPs/sample per client | s / round (server) |"
    )
    lines = [head, "| --- | --- | --: | --: | --: | --: | --: | --: | --: |"]
    for r in rows:
        diff = "-"
        if "diff" in r:
            mu, half = r["diff"]
            diff = f"{mu:+.3f} [{mu - half:+.3f}, {mu + half:+.3f}]" if half == half else f"{mu:+.3f}"
        agg = r["mode"] if METHODS[r["method"]].prunes else "-"
        lines.append(
            f"| {r['method']} | {agg} | {fmt_mean_sd(r['final'])} | {fmt_mean_sd(r['best'])} | {diff} | "
            f"{r['params_down_per_client']:,.0f} / {r['params_up_per_client']:,.0f} | "
            f"{r['params_down_per_client'] / r['full_params']:.0%} | {r['training_mflops_per_client']:.2f} | "
            f"{r['seconds_per_round']:.2f}{_server_share(r)} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    """Mean test-accuracy curve per (method, mode) over seeds, with a ±1 sd band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method, line style per aggregation
    groups: dict[tuple[str, str], list[list[float]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["mode"]), []).append(r["accuracy"])
    for (method, mode), curves in groups.items():
        acc = torch.tensor(curves)
        mu = acc.mean(0)
        sd = acc.std(0) if len(curves) > 1 else torch.zeros_like(mu)
        xs = range(1, len(mu) + 1)
        label = method if not METHODS[method].prunes or len(METHODS[method].modes) == 1 else f"{method} ({mode})"
        style = "-" if mode == METHODS[method].modes[0] else "--"
        ax.plot(xs, mu, label=label, color=colors.get(method), linestyle=style)
        ax.fill_between(xs, mu - sd, mu + sd, color=colors.get(method), alpha=0.12, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(compare: Callable, cfg, data, out: Path, progress: bool = True, seeds: int = 1,
          runs: list[tuple[str, str]] | None = None) -> str:  # fmt: skip
    """Table I: methods (default aggregation) x alpha, with the accounting; Table II: score x
    aggregation at cfg.alpha. Mean ± sd of the final accuracy over ``seeds``. ``compare``: the
    simulator's ``compare(cfg, data, runs, progress, seeds)``, run per grid cell."""
    alphas = (0.1, 1.0, 10.0)
    runs = runs or [(m.name, m.modes[0]) for m in METHODS.values()]
    table1: dict[float, list[dict]] = {}
    for a in alphas:
        table1[a] = summarise(compare(dataclasses.replace(cfg, alpha=a), data, runs, progress, seeds))
    scores = ("fedmp", "random", "cahfp")
    table2 = summarise(compare(cfg, data, [(m, mode) for m in scores for mode in MODES], progress, seeds))
    text = sweep_tables(cfg, data.name, seeds, alphas, runs, table1, scores, table2)
    (out / f"sweep_{data.name}.md").write_text(text + "\n")
    return text


def sweep_tables(cfg, data_name: str, seeds: int, alphas: tuple, runs: list[tuple[str, str]],
                 table1: dict[float, list[dict]], scores: tuple, table2: list[dict]) -> str:  # fmt: skip
    """The sweep's Table I (methods x Dirichlet alpha, with the accounting) and Table II
    (score x aggregation), from :func:`summarise` rows."""
    lines = [
        f"Data {data_name}, model {cfg.model}, {cfg.clients} clients, rank {cfg.rank}, {cfg.rounds} rounds, "
        f"seeds {cfg.seed}..{cfg.seed + seeds - 1}; final test accuracy, mean ± sd over seeds.",
        "",
        "Table I: methods x Dirichlet alpha (each method's own aggregation)",
        "",
        "| method | aggregation | "
        + " | ".join(f"alpha={a:g}" for a in alphas)
        + " | params down / up per client | train MFLOPs/sample |",
        "| --- | --- | " + " | ".join("--:" for _ in alphas) + " | --: | --: |",
    ]
    for m, mode in runs:
        cells = [fmt_mean_sd(next(r for r in table1[a] if r["method"] == m)["final"]) for a in alphas]
        acct = next(r for r in table1[alphas[0]] if r["method"] == m)
        lines.append(
            f"| {m} | {mode if METHODS[m].prunes else '-'} | "
            + " | ".join(cells)
            + f" | {acct['params_down_per_client']:,.0f} / {acct['params_up_per_client']:,.0f}"
            + f" | {acct['training_mflops_per_client']:.2f} |"
        )
    lines += [
        "",
        f"Table II: importance score x aggregation (alpha={cfg.alpha:g})",
        "",
        "| score | reconstruction | overlap |",
        "| --- | --: | --: |",
    ]
    for m in scores:
        cells = [fmt_mean_sd(next(r for r in table2 if r["method"] == m and r["mode"] == mode)["final"])
                 for mode in MODES]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
