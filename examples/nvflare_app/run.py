"""The CA-HFP digits job in NVIDIA FLARE's simulator.

python examples/nvflare_app/run.py [--sites 4] [--rounds 5] [--workspace DIR] [--export DIR]

Every site trains a physically smaller copy of the small CNN (the first half of the sites
pruned 50 %, the rest 75 %) on its Dirichlet(1) share of scikit-learn's digits; the server
(``cahfp_ops.integrations.nvflare.CAHFPController``) reconstruct-aggregates the heterogeneous
replies into the full model and evaluates it on the test split each round. The per-round
accuracy is printed at the end. ``--export DIR`` writes the job folder instead, for NVFlare's
own command: ``nvflare simulator DIR/cahfp_digits -w WORKSPACE -n 4 -t 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

APP = Path(__file__).resolve().parent
sys.path.insert(0, str(APP))  # digits_task, as the job's sites import it

from digits_task import INPUT_SHAPE, MODEL, site_ratios  # noqa: E402

from cahfp_ops.integrations.nvflare import ROUNDS_FILE, make_job  # noqa: E402

JOB = "cahfp_digits"


def build_job(sites: int, rounds: int, fail_site: str = ""):
    """The NVFlare job: the CA-HFP controller on the server, client.py on every site. The
    scripts are named relative to this folder (the current one while the job is written), so
    the job refers to them inside its own custom folder and runs wherever it is copied."""
    return make_job(
        JOB,
        "client.py",
        train_args=f"--sites {sites}" + (f" --fail-site {fail_site}" if fail_site else ""),
        model=MODEL,
        input_shape=INPUT_SHAPE,
        server_args={"criterion": "curvature", "warmup_rounds": 2, "lr": 0.1, "local_steps": 8},
        ratio=site_ratios(sites),
        num_rounds=rounds,
        min_clients=sites,
        evaluator="digits_task.evaluate",
        files=["digits_task.py"],
    )


def rounds_of(workspace: Path) -> list[dict]:
    """What the controller recorded per round (``cahfp_rounds.json`` in the server's run folder)."""
    found = sorted(workspace.rglob(ROUNDS_FILE))
    return json.loads(found[-1].read_text()) if found else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workspace", default=None, help="the simulator's workspace (default: a temporary folder)")
    p.add_argument("--export", default=None, help="write the job folder here instead of running it")
    p.add_argument("--fail-site", default="", help="a site whose training raises (it is reported, the job goes on)")
    args = p.parse_args()
    export = Path(args.export).resolve() if args.export else None
    workspace = Path(args.workspace).resolve() if args.workspace else None
    os.chdir(APP)
    job = build_job(args.sites, args.rounds, args.fail_site)
    if export:
        job.export_job(str(export))
        print(f"job written to {export / JOB}; run it with: nvflare simulator "
              f"{export / JOB} -w WORKSPACE -n {args.sites} -t {args.sites}")  # fmt: skip
        return
    with tempfile.TemporaryDirectory() as tmp:
        workspace = workspace or Path(tmp)
        job.simulator_run(str(workspace), n_clients=args.sites, threads=args.sites)
        history = rounds_of(workspace)
    if len(history) != args.rounds:
        sys.exit(f"the job ran {len(history)} of {args.rounds} rounds")
    for r in history:
        rejected = "; ".join(f"{s}: {why}" for s, why in r["rejected"].items()) or "-"
        print(f"round {r['round']}: accuracy {r['eval']['accuracy']:.3f}, accepted {len(r['accepted'])}, "
              f"train loss {r['train'].get('train_loss', float('nan')):.3f}, rejected {rejected}")  # fmt: skip


if __name__ == "__main__":
    main()
