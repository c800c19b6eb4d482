"""Run the CA-HFP Flower app with Flower's run command in its simulation runtime.

python examples/flower_app/run.py [--nodes 10] [--rounds 10] [--stop-superlink]

This is ``flwr run examples/flower_app --stream --run-config "num-server-rounds=R"
--federation-config "num-supernodes=N"``: Flower builds the app, starts a local SuperLink in
simulation mode when none is running (it keeps running afterwards, as with ``flwr run``;
``--stop-superlink`` stops the one this command started) and streams the run's log. The exit
status is 1 when the run failed (``flwr run`` itself exits 0 then).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

APP = Path(__file__).resolve().parent


def flwr_command(nodes: int, rounds: int) -> list[str]:
    """The ``flwr run`` command line for this app."""
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    return [
        flwr, "run", str(APP), "--stream",
        "--run-config", f"num-server-rounds={rounds}",
        "--federation-config", f"num-supernodes={nodes}",
    ]  # fmt: skip


def local_superlinks(port: str) -> set[int]:
    """Process ids of the local SuperLinks serving ``port`` (the ones ``flwr run`` starts)."""
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {port}"], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


def stop(pids: set[int], running: Callable[[], set[int]], timeout: float = 20.0) -> None:
    """SIGTERM to each process group (a SuperLink leads its own session, with its simulation
    processes), then wait for them to end (SIGKILL after ``timeout`` seconds)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pids & running() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids & running():
            return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--stop-superlink", action="store_true", help="stop the local SuperLink this run started")
    args = p.parse_args()
    port = os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
    before = local_superlinks(port)
    failed = False
    try:
        with subprocess.Popen(flwr_command(args.nodes, args.rounds), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as proc:  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                failed |= "Exit Code:" in line  # flwr run exits 0 even when the run failed
        rc = proc.returncode or int(failed)
    finally:
        if args.stop_superlink:
            stop(local_superlinks(port) - before, lambda: local_superlinks(port))
    sys.exit(rc)


if __name__ == "__main__":
    main()
