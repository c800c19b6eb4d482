"""Run the CA-HFP Flower app in Flower's simulation engine: 10 nodes on this machine.

python examples/flower_app/run.py [--nodes 10] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    import app
    from flwr.simulation import run_simulation

    os.environ["CAHFP_FLOWER_ROUNDS"] = str(args.rounds)  # read by the ServerApp (same process)
    run_simulation(
        server_app=app.server,
        client_app=app.client,
        num_supernodes=args.nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


if __name__ == "__main__":
    main()
