"""Every CUDA check and benchmark in one call, for a GPU machine lent for a few minutes.

    python bench/gpu_suite.py --out DIR [--commit SHA] [--budget-s 470] [--only STEP ...]
    python bench/gpu_suite.py --out DIR --dry-run      # CPU tensors, Triton interpreter, tiny sizes

Steps, in this order, each in its own process (a crash or a device error in one cannot hide
the others), each timed, with its output streamed to the console and to ``DIR/steps.log``:

1. ``env``: versions (Python, torch, Triton, CUDA, driver), the device, the commit;
2. ``build``: the C++ kernels (the CUDA tests compare against them);
3. ``cuda-tests``: ``tests/test_gpu.py`` (every op, the layout ops, the robust reducers,
   whole models and a server round on the device against C++; bitwise repeatability;
   CUDA-graph capture of an aggregation and of a validation-off round);
4. op benchmarks with ``--device cuda`` at K = 10 and 100: aggregation, slicing, top-k,
   scores, the robust reducers (fraction of the copy bandwidth measured paired with each
   call, speedups over the plain-PyTorch peers);
5. ``bench-model``: whole VGG-16 / ResNet-56 state_dicts at K = 10, 100, 1,000;
6. ``bench-round``: packed and streaming aggregation and a server round split into its steps;
7. ``fedsim-vgg16``, ``fedsim-resnet20``: a few rounds of the simulator with 100 clients on
   synthetic CIFAR-shaped data, time per round split into client training and server work.

A step that fails or runs out of time is recorded (exit status, the end of its output) and
the next one runs; steps that would start with less than 15 s of ``--budget-s`` left are
skipped and recorded as such. Writes ``DIR/suite.json`` (every step, with the benchmarks'
own JSON) and ``DIR/summary.md`` (tables naming the device, fractions of copy bandwidth in
percent, the targets), and prints the summary last. Exit status 0 when every step passed.

``--dry-run`` runs the same steps on CPU tensors with tiny models (``CAHFP_BENCH_TINY=1``):
the tests and the single-op benchmarks through the Triton interpreter (``TRITON_INTERPRET=1``);
the robust reducers, whole-model benchmarks and the simulator on the C++ kernels (the
interpreter takes minutes per whole-model call; the tests cover those kernels), so that CI
catches a step that no longer runs. ``bench/GPU.md`` says
how to run it on the lent machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

#: What the first GPU run is held to (issue targets; bench/RESULTS.md's GPU section).
TARGETS = {
    "aggregation, VGG-16 conv layers, K = 100 (of copy)": ">= 85 %",
    "whole ResNet-56 state_dict, K = 100 (of copy)": ">= 60 %",
    "server round, VGG-16, K = 100": "<= 3 ms",
}


@dataclass
class Step:
    """One step: ``cmd(dry, tmp)`` its command line, ``timeout`` its seconds on the GPU (and
    ``dry_timeout`` in a dry run), ``json_out`` the file (under ``tmp``) it writes, if any."""

    name: str
    what: str
    cmd: object
    timeout: float
    dry_timeout: float
    json_out: str | None = None
    interpreted: bool = False  # in a dry run: through the Triton interpreter (else C++)
    result: dict = field(default_factory=dict)


def _bench(script: str, full: list[str], dry: list[str], out: str, fixed: tuple[str, ...] = ()):
    def cmd(is_dry: bool, tmp: Path) -> list[str]:
        dev = ["--device", "cpu" if is_dry else "cuda"]
        return [PY, str(ROOT / "bench" / script), *fixed, *dev, *(dry if is_dry else full), "--json", str(tmp / out)]

    return cmd


def _fedsim(model: str, out: str):
    def cmd(is_dry: bool, tmp: Path) -> list[str]:
        size = ["--clients", "4", "--rounds", "1", "--samples", "64"] if is_dry else [
            "--clients", "100", "--rounds", "3", "--samples", "5000"]  # fmt: skip
        return [PY, str(ROOT / "examples" / "fedsim.py"), "--data", "synthetic_cifar", "--model", model,
                "--device", "cpu" if is_dry else "cuda", *size, "--warmup-rounds", "1", "--methods", "cahfp",
                "--seeds", "1", "--no-progress", "--out", str(tmp / out)]  # fmt: skip

    return cmd


def _self(step: str):
    def cmd(is_dry: bool, tmp: Path) -> list[str]:
        dry = ["--dry-run"] if is_dry else []
        return [PY, str(Path(__file__).resolve()), "--step", step, "--out", str(tmp), *dry]

    return cmd


def _pytest(is_dry: bool, tmp: Path) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(ROOT / "tests" / "test_gpu.py"),
            "--junitxml", str(tmp / "cuda_tests.xml")]  # fmt: skip


def steps() -> list[Step]:
    k2 = ["--clients", "2", "--repeat", "1"]
    return [
        Step("env", "versions and device", _self("env"), 30, 60, "env.json"),
        Step("build", "the C++ kernels", _self("build"), 150, 300),
        Step("cuda-tests", "tests/test_gpu.py on the device", _pytest, 150, 300, interpreted=True),
        Step("bench-aggregate", "reconstruct_aggregate, VGG-16 conv layers",
             _bench("bench_aggregate.py", ["--clients", "10", "100"], k2, "aggregate.json"), 45, 120,
             "aggregate.json", True),
        Step("bench-slice", "slice_channels",
             _bench("bench_ops.py", ["--clients", "10", "100"], k2, "slice.json", ("--op", "slice_channels")),
             25, 120, "slice.json", True),
        Step("bench-topk", "topk_channel_masks",
             _bench("bench_ops.py", ["--clients", "10", "100"], k2, "topk.json", ("--op", "topk_channel_masks")),
             20, 120, "topk.json", True),
        Step("bench-scores", "curvature_scores",
             _bench("bench_ops.py", ["--clients", "1", "10"], k2, "scores.json", ("--op", "curvature_scores")),
             20, 120, "scores.json", True),
        Step("bench-robust", "median and trimmed mean, VGG-16 conv layers",
             _bench("bench_robust.py", ["--clients", "10", "100"],
                    ["--clients", "4", "--repeat", "1", "--trim", "0.25", "--repeat-peer", "1"], "robust.json"),
             45, 120, "robust.json"),  # fmt: skip (its Triton kernel: minutes in the interpreter; cuda-tests has it)
        Step("bench-model", "whole state_dicts, VGG-16 and ResNet-56",
             _bench("bench_model.py", ["--clients", "10", "100", "1000"], [*k2, "--repeat-peers", "1"], "model.json"),
             100, 120, "model.json"),  # fmt: skip
        Step("bench-round", "packed and streaming aggregation, a server round in steps",
             _bench("bench_round.py", ["--clients", "10", "100", "--stream-clients", "1000"],
                    [*k2, "--stream-clients", "3", "--stream-window", "2"], "round.json"),
             90, 120, "round.json"),  # fmt: skip
        Step("fedsim-vgg16", "the simulator, VGG-16, 100 clients", _fedsim("vgg16", "fedsim_vgg16"), 60, 120),
        Step("fedsim-resnet20", "the simulator, ResNet-20, 100 clients", _fedsim("resnet20", "fedsim_resnet20"),
             45, 120),
    ]


def step_env(is_dry: bool) -> dict:
    """Implementation of the ``env`` step (run in its own process)."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform(), "cpus": os.cpu_count()}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import cahfp_ops

    info["cahfp_ops"] = cahfp_ops.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = p.name
        info["device_memory_GiB"] = round(p.total_memory / 2**30, 1)
        info["multiprocessors"] = p.multi_processor_count
        info["capability"] = f"{p.major}.{p.minor}"
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True)  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
        info["backend"] = cahfp_ops.resolve_backend(torch.device("cuda"))
    else:
        info["device"] = f"CPU ({platform.machine()})"
        if not is_dry:
            raise SystemExit(f"no CUDA device: torch {torch.__version__} sees none (run with --dry-run on CPU)")
    print(json.dumps(info, indent=1))
    return info


def step_build() -> None:
    import cahfp_ops

    if not cahfp_ops.load_cpp():
        raise SystemExit(f"the C++ kernels did not build or load: {cahfp_ops.cpp.kernel_status()}")
    print(f"C++ kernels: {cahfp_ops.cpp.kernel_status().source}")


def _env_for(step: Step, is_dry: bool, tmp: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))  # fmt: skip
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))  # the C++ build, on all cores
    if is_dry:
        env.update(CAHFP_BENCH_TINY="1", TRITON_INTERPRET="1")
        if step.interpreted:
            env.update(CAHFP_OPS_BACKEND="triton", CAHFP_BENCH_BACKENDS="triton", CAHFP_GPU_TEST_DEVICE="cpu")
        else:
            env.update(CAHFP_OPS_BACKEND="cpp", CAHFP_BENCH_BACKENDS="cpp")
    if os.environ.get("CAHFP_GPU_SUITE_FAIL") == step.name:  # the suite's own test: an injected failure
        env["CAHFP_GPU_SUITE_INJECT"] = "1"
    return env


def run_step(step: Step, is_dry: bool, tmp: Path, log, time_left: float) -> dict:
    """Run one step in its own process group; stream its output; kill it at its limit."""
    limit = min(step.dry_timeout if is_dry else step.timeout, time_left)
    cmd = step.cmd(is_dry, tmp)
    env = _env_for(step, is_dry, tmp)
    if env.get("CAHFP_GPU_SUITE_INJECT"):
        cmd = [PY, "-c", "import sys; print('an injected failure'); sys.exit(3)"]
    banner = f"\n===== {step.name}: {step.what} (limit {limit:.0f} s)\n$ {' '.join(cmd)}\n"
    print(banner, end="", flush=True)
    log.write(banner)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass

    timer = threading.Timer(limit, kill)
    timer.start()
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
        tail = (tail + [line])[-40:]
    rc = proc.wait()
    timer.cancel()
    seconds = time.perf_counter() - t0
    log.flush()
    result = {"what": step.what, "cmd": cmd, "seconds": round(seconds, 1), "rc": rc, "timed_out": timed_out.is_set(),
              "ok": rc == 0 and not timed_out.is_set(), "tail": "".join(tail)[-4000:]}  # fmt: skip
    if step.json_out and (tmp / step.json_out).exists():
        try:
            result["data"] = json.loads((tmp / step.json_out).read_text())
        except ValueError as exc:
            result["data_error"] = str(exc)
    if step.name.startswith("fedsim"):
        files = sorted((tmp / step.cmd(is_dry, tmp)[-1]).glob("*.json")) if step.cmd(is_dry, tmp)[-1] else []
        if files:
            result["data"] = json.loads(files[-1].read_text())
    if step.name == "cuda-tests" and (tmp / "cuda_tests.xml").exists():
        result["junit"] = _junit_counts(tmp / "cuda_tests.xml")
    status = "ok" if result["ok"] else ("TIMED OUT" if result["timed_out"] else f"FAILED (exit {rc})")
    line = f"===== {step.name}: {status} in {seconds:.1f} s\n"
    print(line, end="", flush=True)
    log.write(line)
    return result


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: int(suite.get(k, 0)) for k in keys} if suite is not None else {}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    return {**counts, "failed": failed}


# ------------------------------------------------------------------------------- summary


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f} %"


def _f(x, fmt=".3f") -> str:
    return "" if x is None else format(x, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("--:" if i else "---" for i in range(len(head))) + " |"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def summary(report: dict) -> str:
    env = report["steps"].get("env", {}).get("data", {})
    dev = env.get("device", "unknown device")
    lines = [f"# GPU suite: {dev}{' (dry run)' if report['dry_run'] else ''}", "",
             f"{report['date']}, commit {report['commit']}; torch {env.get('torch')}, Triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}, Python {env.get('python')}; driver / clocks: {env.get('nvidia_smi', '-')}. "
             f"Total {report['seconds']:.0f} s.", ""]  # fmt: skip
    lines += _table(["step", "status", "seconds"], [
        [name, "ok" if r.get("ok") else ("skipped: " + r["skipped"] if "skipped" in r else
                                         ("timed out" if r.get("timed_out") else f"failed (exit {r.get('rc')})")),
         _f(r.get("seconds"), ".1f")] for name, r in report["steps"].items()])  # fmt: skip
    tests = report["steps"].get("cuda-tests", {}).get("junit")
    if tests:
        lines += ["", f"CUDA tests: {tests.get('tests')} run, {tests.get('failures', 0) + tests.get('errors', 0)} "
                      f"failed, {tests.get('skipped')} skipped" + (": " + ", ".join(tests["failed"]) if tests["failed"]
                                                                   else ".")]  # fmt: skip
    ops = []
    for name, key in (("bench-slice", "slice_channels"), ("bench-topk", "topk_channel_masks"),
                      ("bench-scores", "curvature_scores")):  # fmt: skip
        for r in report["steps"].get(name, {}).get("data", {}).get("results", []):
            vs = ", ".join(f"{k[3:]} {v:.1f}x" for k, v in r.items() if k.startswith("vs_"))
            ops.append([key, r["K"], _f(r.get("ours_ms")), _f(r.get("GBps"), ".1f"), _pct(r.get("roofline")), vs])
    for r in report["steps"].get("bench-aggregate", {}).get("data", {}).get("results", []):
        ops.append(["reconstruct_aggregate", r["K"], _f(r.get("cahfp_ms")), _f(r.get("cahfp_GBps"), ".1f"),
                    _pct(r.get("cahfp_roofline")), f"index_add {r.get('cahfp_vs_indexadd', 0):.1f}x, "
                    f"naive {r.get('cahfp_vs_naive', 0):.1f}x"])  # fmt: skip
    if ops:
        lines += ["", f"## Ops ({dev})", ""]
        lines += _table(["op", "K", "ms", "GB/s", "of copy (paired)", "vs plain PyTorch"], ops)
    rob = report["steps"].get("bench-robust", {}).get("data", {}).get("results", [])
    if rob:
        lines += ["", f"## Robust reducers ({dev})", ""]
        keys = [k for k in rob[0] if isinstance(rob[0][k], (int, float, str))][:9]
        lines += _table(keys, [[_f(r.get(k), ".3f") if isinstance(r.get(k), float) else r.get(k) for k in keys]
                               for r in rob])  # fmt: skip
    model = report["steps"].get("bench-model", {}).get("data", {}).get("results", [])
    if model:
        lines += ["", f"## Whole state_dicts ({dev})", ""]
        lines += _table(["model", "K", "aggregate ms", "no validation ms", "of copy (paired)", "vs index_add",
                         "slice ms", "slice of copy (paired)", "slice vs plain"],
                        [[r["model"], r["K"], _f(r["agg_ms"]), _f(r["agg_novalidate_ms"]), _pct(r["agg_roofline"]),
                          f"{r['agg_vs_indexadd']:.1f}x", _f(r["slice_ms"]), _pct(r["slice_roofline"]),
                          f"{r['slice_vs_plain']:.1f}x"] for r in model])  # fmt: skip
    rnd = report["steps"].get("bench-round", {}).get("data", {})
    if rnd.get("results"):
        lines += ["", f"## Rounds ({dev}; copy bandwidth {rnd.get('copy_GBps', 0):.0f} GB/s)", ""]
        rows = []
        for r in rnd["results"]:
            if "ms" in r:
                rows.append([r["case"], r["what"], _f(r["ms"]), _pct(r.get("of_copy")),
                             "" if r.get("speedup") is None else f"{r['speedup']:.1f}x"])  # fmt: skip
            elif r["what"].startswith("server round"):
                kernels = r["slice kernel_ms_median"] + r["aggregate kernel_ms_median"]
                total = r["assign_ms_median"] + r["aggregate_ms_median"]
                rows.append([r["case"], r["what"] + ": assign + aggregate (median)", _f(total), "",
                             f"{total / kernels:.2f}x its kernel calls" if kernels else ""])  # fmt: skip
            elif r["what"] == "streaming":
                wins = ", ".join(f"{w}: {v['x_batch']:.2f}x" for w, v in r["windows"].items())
                rows.append([r["case"], "streaming, windows (x the batch call)", "", "", wins])
        lines += _table(["case", "what", "ms", "of copy", "vs"], rows)
    fs = []
    for name in ("fedsim-vgg16", "fedsim-resnet20"):
        for r in report["steps"].get(name, {}).get("data", {}).get("results", []):
            fs.append([r["method"], report["steps"][name]["data"]["config"]["model"], _f(r["seconds_per_round"]),
                       _f(r.get("client_seconds_per_round")), _f(r.get("server_seconds_per_round")),
                       _f(r["final_accuracy"])])  # fmt: skip
    if fs:
        lines += ["", f"## Simulator, synthetic CIFAR-shaped data ({dev})", ""]
        lines += _table(["method", "model", "s / round", "client training s", "server s", "final accuracy"], fs)
    lines += ["", "## Targets", ""]
    lines += _table(["what", "target", "measured"], [[k, v, _measured(report, k)] for k, v in TARGETS.items()])
    return "\n".join(lines) + "\n"


def _measured(report: dict, key: str) -> str:
    steps = report["steps"]
    if key.startswith("aggregation"):
        rows = [r for r in steps.get("bench-aggregate", {}).get("data", {}).get("results", []) if r["K"] == 100]
        return _pct(rows[0]["cahfp_novalidate_roofline"]) if rows else "not measured"
    if key.startswith("whole ResNet-56"):
        rows = [r for r in steps.get("bench-model", {}).get("data", {}).get("results", [])
                if r["model"] == "resnet56" and r["K"] == 100]  # fmt: skip
        return _pct(rows[0]["agg_roofline"]) if rows else "not measured"
    rows = [r for r in steps.get("bench-round", {}).get("data", {}).get("results", [])
            if r.get("what") == "server round" and r["case"] == "vgg16 K=100"]  # fmt: skip
    return f"{rows[0]['round_ms']:.2f} ms" if rows else "not measured"


# ---------------------------------------------------------------------------------- main


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or os.environ.get("CAHFP_COMMIT", "unknown")
    except OSError:
        return os.environ.get("CAHFP_COMMIT", "unknown")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where suite.json, summary.md and steps.log go")
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, the Triton interpreter, tiny sizes")
    p.add_argument("--budget-s", type=float, default=470, help="stop starting steps after this many seconds")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    p.add_argument("--commit", default=None, help="the commit under test (default: git, else $CAHFP_COMMIT)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a step's own process
    a = p.parse_args(argv)
    if a.step == "env":
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "env.json").write_text(json.dumps(step_env(a.dry_run)))
        return 0
    if a.step == "build":
        step_build()
        return 0
    all_steps = steps()
    unknown = set(a.only or ()) - {s.name for s in all_steps}
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; the steps: {[s.name for s in all_steps]}")
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(a.commit),
              "dry_run": a.dry_run, "steps": {}}  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td, open(a.out / "steps.log", "w") as log:
        tmp = Path(td)
        for step in all_steps:
            if a.only and step.name not in a.only:
                continue
            left = a.budget_s - (time.perf_counter() - t0) if not a.dry_run else float("inf")
            if left < 15:
                report["steps"][step.name] = {"what": step.what, "ok": False, "skipped": "out of time"}
                continue
            try:
                report["steps"][step.name] = run_step(step, a.dry_run, tmp, log, left)
            except Exception as exc:  # noqa: BLE001 (a broken step is recorded, the rest still run)
                report["steps"][step.name] = {"what": step.what, "ok": False, "rc": None, "error": repr(exc)}
            report["seconds"] = time.perf_counter() - t0
            (a.out / "suite.json").write_text(json.dumps(report, indent=1, default=str))  # after every step
    report["seconds"] = time.perf_counter() - t0
    (a.out / "suite.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        text = summary(report)
    except Exception:  # noqa: BLE001 (suite.json holds every figure; the summary must not lose them)
        text = "# GPU suite: the summary failed; read suite.json\n\n```\n" + traceback.format_exc() + "```\n"
        report["steps"]["summary"] = {"what": "summary.md", "ok": False, "error": traceback.format_exc()}
        (a.out / "suite.json").write_text(json.dumps(report, indent=1, default=str))
    (a.out / "summary.md").write_text(text)
    print("\n" + text)
    return 0 if all(r.get("ok") for r in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
