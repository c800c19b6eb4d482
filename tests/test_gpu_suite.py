"""``bench/gpu_suite.py`` cannot rot: its dry run (CPU tensors, tiny models, the tests and
op benchmarks through the Triton interpreter) runs every step, and a failing step is
recorded while the others still run. It runs from a source checkout (it puts the checkout
on ``PYTHONPATH``), so CI's installed-wheel job skips it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.py"
pytestmark = pytest.mark.skipif(
    bool(os.environ.get("CAHFP_OPS_EXPECT_INSTALLED")) or not SUITE.exists(), reason="runs from a source checkout"
)


def _suite(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    done = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(tmp_path), *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=900)  # fmt: skip
    report = json.loads((tmp_path / "suite.json").read_text())
    return done, report, (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    done, report, summary = _suite(tmp_path)
    failed = {k: str(v.get("tail", v))[-1500:] for k, v in report["steps"].items() if not v.get("ok")}
    assert done.returncode == 0 and not failed, failed
    assert list(report["steps"]) == ["env", "build", "cuda-tests", "bench-aggregate", "bench-slice", "bench-topk",
                                     "bench-scores", "bench-robust", "bench-model", "bench-round", "fedsim-vgg16",
                                     "fedsim-resnet20"]  # fmt: skip
    tests = report["steps"]["cuda-tests"]["junit"]
    assert tests["tests"] - tests["skipped"] >= 15 and tests["failures"] == tests["errors"] == 0
    for step in ("bench-aggregate", "bench-model", "bench-round", "bench-robust", "fedsim-vgg16"):
        assert report["steps"][step]["data"]["results"], step
    fedsim = report["steps"]["fedsim-vgg16"]["data"]["results"][0]
    assert 0 < fedsim["server_seconds_per_round"] < fedsim["seconds_per_round"]
    for heading in ("## Ops", "## Whole state_dicts", "## Rounds", "## Robust reducers", "## Simulator", "## Targets"):
        assert heading in summary, heading
    assert " %" in summary and "CPU" in summary
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.log", "suite.json", "summary.md"]


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    done, report, summary = _suite(tmp_path, "--only", "env", "build", "bench-topk", CAHFP_GPU_SUITE_FAIL="build")
    assert done.returncode == 1
    steps = report["steps"]
    assert list(steps) == ["env", "build", "bench-topk"]
    assert steps["build"]["rc"] == 3 and not steps["build"]["ok"] and "an injected failure" in steps["build"]["tail"]
    assert steps["env"]["ok"] and steps["bench-topk"]["ok"] and steps["bench-topk"]["data"]["results"]
    assert "| build | failed (exit 3) |" in summary and "| bench-topk | ok |" in summary
    bad = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path), "--only", "nope"], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown steps ['nope']" in bad.stderr
