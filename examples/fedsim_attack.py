"""Poisoning demo for the simulator: a few hostile clients against the server's defences.

    python examples/fedsim.py --attack signflip scale [--attackers 2] [--attack-scale 4] [--seeds 3]
    python examples/fedsim.py --attack scale --attack-scale 50

Clients ``0 .. attackers-1`` train honestly, then reply ``sent + s * (trained - sent)``
(``scale``: s = +attack_scale) or ``sent - attack_scale * (trained - sent)`` (``signflip``),
where ``sent`` is the compact global model they received: a boosted or reversed update of
a plausible size. Every attack (and ``none``, the clean reference) runs CA-HFP
(reconstruction) under each defence, on several seeds:

* ``mean``: the weighted mean with no update bound (undefended),
* ``mean+bound``: the mean with the server's default update bound (a reply whose RMS update
  exceeds 10x the round's median is rejected),
* ``median``: the weighted median (no bound),
* ``trimmed_mean``: the weighted trimmed mean, ``--trim`` of the weight cut from each end (no bound).

Weights are the clients' sample counts, so ``--trim`` must exceed the attackers' share of the
weight for the trimmed mean to cut them out. Writes a markdown table (final accuracy, mean ±
sd over seeds; replies rejected per round), the JSON of every run, and a bar plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedsim_stats import fmt_mean_sd, mean_sd

ATTACKS = ("scale", "signflip")
DEFENCES = ("mean", "mean+bound", "median", "trimmed_mean")


def defence_options(defence: str, trim: float) -> dict:
    """Server arguments of a defence."""
    return {
        "mean": {"update_bound": None},
        "mean+bound": {},
        "median": {"reduce": "median", "update_bound": None},
        "trimmed_mean": {"reduce": "trimmed_mean", "trim": trim, "update_bound": None},
    }[defence]


def make_tamper(attack: str, attackers: set[int], scale: float):
    """``tamper(cid, sent, trained)`` for the simulator: the attackers' replies; None for ``none``."""
    if attack == "none":
        return None
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS} or 'none', got {attack!r}")
    s = scale if attack == "scale" else -scale

    def tamper(cid: int, sent: dict, trained: dict) -> dict:
        if cid not in attackers:
            return trained
        return {k: sent[k] + s * (v - sent[k]) if v.is_floating_point() else v for k, v in trained.items()}

    return tamper


def run_attacks(run, cfg, data, attacks: list[str], attackers: int, scale: float, trim: float, seeds: int,
                out: Path, progress: bool = True) -> str:  # fmt: skip
    """Every attack (plus ``none``) x defence x seed with the simulator's ``run``; writes
    ``attack_<data>_x<scale>.{md,json,png}`` and returns the table."""
    from dataclasses import asdict

    from fedsim_data import dirichlet_partition

    runs, share = [], []
    for seed in range(cfg.seed, cfg.seed + seeds):
        c = type(cfg)(**{**asdict(cfg), "seed": seed})
        parts = dirichlet_partition(data.y_train, c.clients, c.alpha, seed)
        share.append(sum(len(p) for p in parts[:attackers]) / sum(len(p) for p in parts))
        for attack in ["none", *attacks]:
            tamper = make_tamper(attack, set(range(attackers)), scale)
            for defence in DEFENCES:
                r = run(c, "cahfp", "reconstruct", data, parts, progress,
                               server_options=defence_options(defence, trim), tamper=tamper,
                               label=f"{attack}/{defence}/seed {seed}")  # fmt: skip
                r.update(attack=attack, defence=defence, seed=seed)
                runs.append(r)
    text = format_attack_table(runs, cfg, attackers, scale, trim, seeds, share)
    stem = out / f"attack_{data.name}_x{scale:g}"
    stem.with_suffix(".md").write_text(text + "\n")
    meta = {"config": asdict(cfg), "attackers": attackers, "attack_scale": scale, "trim": trim, "seeds": seeds}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "runs": runs}, indent=1))
    plot_attacks(runs, stem.with_suffix(".png"), f"{data.name}: {attackers} of {cfg.clients} clients hostile")
    return text


def format_attack_table(runs: list[dict], cfg, attackers: int, scale: float, trim: float, seeds: int,
                        share: list[float]) -> str:  # fmt: skip
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    lines = [
        f"Data {cfg.data}, model {cfg.model}, {cfg.clients} clients (alpha {cfg.alpha:g}, rank {cfg.rank}), "
        f"{cfg.rounds} rounds, CA-HFP with reconstruction; clients 0..{attackers - 1} hostile "
        f"(attack scale {scale:g}; their share of the weight: {min(share):.0%}-{max(share):.0%}); "
        f"trimmed mean trim {trim:g}; final test accuracy, mean ± sd over {seeds} seed(s); "
        "replies rejected per round by the update bound.",
        "",
        "| attack | " + " | ".join(DEFENCES) + " |",
        "| --- | " + " | ".join("--:" for _ in DEFENCES) + " |",
    ]
    for attack in attacks:
        cells = []
        for d in DEFENCES:
            rs = [r for r in runs if r["attack"] == attack and r["defence"] == d]
            cell = fmt_mean_sd([r["final_accuracy"] for r in rs])
            rejected = sum(r["rejected_total"] for r in rs) / len(rs) / cfg.rounds
            if d == "mean+bound":
                cell += f" ({rejected:.1f} rej.)"
            cells.append(cell)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_attacks(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(DEFENCES)
    for j, d in enumerate(DEFENCES):
        means, sds = [], []
        for a in attacks:
            v = [r["final_accuracy"] for r in runs if r["attack"] == a and r["defence"] == d]
            mu, sd = mean_sd(v)
            means.append(mu)
            sds.append(sd)
        xs = [i + (j - (len(DEFENCES) - 1) / 2) * width for i in range(len(attacks))]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=d, color=f"C{j}")
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(DEFENCES))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_attackers(attackers: int, clients: int) -> None:
    if not 0 < attackers < clients:
        raise SystemExit(f"fedsim: --attackers must be in [1, {clients - 1}], got {attackers}")

