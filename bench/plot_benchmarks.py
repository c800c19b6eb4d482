"""Plot the speedups in a pytest-benchmark JSON file (``--benchmark-json``) as a PNG.

For every group (op and shape), the median time of each peer (the reference and the
plain-PyTorch implementations) divided by the median time of the cahfp implementation
(``cahfp[cpp]`` on CPU, ``cahfp[triton]`` on CUDA, unless ``--ours`` says otherwise);
bars above 1 mean cahfp is faster. Also prints the table.

    pytest bench --benchmark-only --benchmark-group-by=group --benchmark-json=bench/out/bench.json
    python bench/plot_benchmarks.py bench/out/bench.json -o bench/out/speedups.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def speedups(data: dict, ours: str | None = None) -> dict[str, dict[str, float]]:
    """group -> peer -> peer median / ours median."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        medians[bench["group"]][info.get("impl", bench["name"])] = bench["stats"]["median"]
    out = {}
    for group, times in medians.items():
        mine = ours if ours in times else next((n for n in ("cahfp[cpp]", "cahfp[triton]") if n in times), None)
        if mine is None:
            continue
        out[group] = {n: t / times[mine] for n, t in times.items() if not n.startswith("cahfp")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: next to the JSON)")
    p.add_argument("--ours", default=None, help="implementation to compare the others against")
    args = p.parse_args()
    data = json.loads(args.json.read_text())
    table = speedups(data, args.ours)
    if not table:
        raise SystemExit("no group holds a cahfp implementation")
    for group, peers in table.items():
        print(f"{group:45s} " + "  ".join(f"{n} {s:.1f}x" for n, s in sorted(peers.items())))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table)
    peers = sorted({n for v in table.values() for n in v})
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(groups) * max(1, len(peers) / 2) + 1.5))
    height = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        ys = [g + i * height for g in range(len(groups))]
        xs = [table[grp].get(peer, 0.0) for grp in groups]
        ax.barh(ys, xs, height=height, label=peer)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup of cahfp over the implementation (peer time / cahfp time, log scale)")
    machine = data.get("machine_info", {})
    ax.set_title(
        f"cahfp-ops speedups ({machine.get('cpu', {}).get('brand_raw', machine.get('machine', ''))})", fontsize=9
    )
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.output or args.json.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
