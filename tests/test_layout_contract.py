"""The per-round layout API under bad input, with validation on and off, on every backend.

``layout_bad_inputs.py`` runs its table of cases in a subprocess per backend and validation
setting, every tensor (the layout's own index tables included) placed against ``PROT_NONE``
guard pages: a stray read or write kills the process and fails the test with the case's
name. With validation on, each bad argument is a ``ValueError`` / ``TypeError`` naming the
function, the argument and the client, and nothing is modified; well-formed calls succeed
either way; tampered tables and lying client lists may raise but never touch memory outside
their tensors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from layout_bad_inputs import CASES

from helpers import backends_under_test

HERE = Path(__file__).resolve().parent


def _run(backend: str, validate: bool, places: str, kinds: str) -> dict:
    env = dict(os.environ, CAHFP_OPS_BACKEND=backend, CAHFP_OPS_VALIDATE="1" if validate else "0")
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(HERE / "layout_bad_inputs.py"), places, kinds], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    last = [line for line in done.stderr.splitlines() if line.startswith("CASE ")]
    assert done.returncode == 0, (
        f"{backend}, validation {validate}: exit status {done.returncode} in "
        f"{last[-1] if last else 'set-up'}\n{done.stderr[-3000:]}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# The interpreter runs a Triton kernel ~50x slower than the compiled C++ one: with validation
# on (the host checks, shared by all backends) one placement of the bad and good calls;
# the tampered tables, which only the kernels see, with both placements and validation off.
PLANS = {
    "cpp": {True: ("end,start", "bad,ok,any"), False: ("end,start", "bad,ok,any")},
    "torch": {True: ("end,start", "bad,ok,any"), False: ("end,start", "bad,ok,any")},
    "triton": {True: ("end", "bad,ok"), False: ("end,start", "bad,ok,any")},
}


@pytest.mark.slow
@pytest.mark.parametrize("validate", [True, False], ids=["validation-on", "validation-off"])
@pytest.mark.parametrize("backend", backends_under_test())
def test_layout_api_bad_inputs_against_guard_pages(backend, validate):
    places, kinds = PLANS.get(backend, PLANS["cpp"])[validate]
    report = _run(backend, validate, places, kinds)
    assert report["validation"] is validate
    problems = []
    for key, outcome in report["results"].items():
        name = key.split(": ", 1)[1]
        kind, pattern, _ = CASES[name]
        if kind == "ok" and not outcome.get("ok"):
            problems.append(f"{key}: a well-formed call failed: {outcome}")
        if kind == "bad" and validate:
            raised = set(outcome.get("raised", ()))
            if outcome.get("ok") or not raised & {"ValueError", "TypeError"}:
                problems.append(f"{key}: expected a ValueError or TypeError, got {outcome}")
            elif not re.search(pattern, outcome["message"]):
                problems.append(f"{key}: message {outcome['message']!r} does not match {pattern!r}")
            if not outcome["untouched"]:
                problems.append(f"{key}: a rejected call modified its inputs")
    expected = sum(kind in kinds.split(",") for kind, _, _ in CASES.values()) * len(places.split(","))
    assert len(report["results"]) == expected
    assert not problems, "\n".join(problems)


def test_guard_pages_fault_on_a_read_one_element_past_either_end():
    """The harness itself: a read just outside a guarded tensor kills the process."""
    for at, offset in (("end", "x.numel() * 4"), ("start", "-4")):
        code = (
            f"import ctypes, sys, torch; sys.path.insert(0, {str(HERE)!r})\n"
            "from guard_pages import guarded\n"
            f"x = guarded(torch.randn(37), {at!r})\n"
            "assert ctypes.c_float.from_address(x.data_ptr()).value == x[0].item()\n"
            f"print(ctypes.c_float.from_address(x.data_ptr() + {offset}).value)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == -11, (at, done.returncode, done.stderr[-500:])
