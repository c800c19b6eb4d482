"""The compiled CPU kernels: the portable library (stable ABI, baseline x86-64 with runtime
AVX2 / AVX-512 dispatch) against the host-tuned build of an earlier release, side by side.

Configurations, each in its own process (a process loads one ``_cahfp_cpp`` library):

* ``old``: the C++ sources of ``--old-ref`` (default ``v0.2.0``: ATen API, JIT-compiled with
  ``-mavx2 -mfma -mf16c`` on an AVX2 host, as that release did),
* ``baseline``, ``avx2``, ``avx512``: the current library capped at that variant,
* ``auto``: the current library as shipped (best variant for this CPU).

Every configuration times the same workloads (``workloads.py``: the VGG-16 layer ops and the
whole-model calls), validation off so that the kernels dominate; the whole cycle of
configurations is repeated ``--cycles`` times and the median per configuration is reported,
so slow drifts of a shared machine hit every configuration alike. Results are checked to
agree bit for bit across the current variants.

    python bench/bench_isa.py --threads 2 --cycles 3
    python bench/bench_isa.py --library cahfp_ops/_C.so    # time a built wheel's library
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    ("reconstruct_aggregate", None, 10),
    ("reconstruct_aggregate", None, 100),
    ("slice_channels", None, 100),
    ("curvature_scores", None, 10),
    ("topk_channel_masks", None, 100),
    ("reconstruct_aggregate_many", "vgg16", 100),
    ("reconstruct_aggregate_many", "resnet56", 100),
    ("slice_channels_many", "resnet56", 100),
]


def _build_old(ref: str, workdir: Path) -> Path:
    """Compile the C++ sources of git ``ref`` the way that release did; return the library."""
    src = workdir / "old"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "csrc"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    code = f"""
import torch
from torch.utils.cpp_extension import load
import glob
load(name="cahfp_old_build", sources=sorted(glob.glob({str(src / "csrc" / "cpu" / "*.cpp")!r})),
     extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-mavx2", "-mfma", "-mf16c"], extra_ldflags=["-fopenmp"],
     is_python_module=False, build_directory={str(src)!r}, verbose=False)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return src / "cahfp_old_build.so"


def _bench_path() -> str:
    """PYTHONPATH for a worker: this folder (its modules import each other by name) first."""
    return os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)


WORKER = r"""
import json, statistics, sys, time
from collections.abc import Mapping
import torch
config, library, threads, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
if library:
    torch.ops.load_library(library)  # before cahfp_ops looks: it then uses this library
import workloads  # bench/ is on PYTHONPATH
import cahfp_ops
from cahfp_ops import cpp
assert cpp.load_cpp(), cpp.load_error()
if config in cpp.ISA_NAMES:
    cpp.set_cpu_isa(config)
if config == "old":  # the old library has no per-round layout ops: its whole-model ops, as it shipped them
    from cahfp_ops import ops
    cahfp_ops.reconstruct_aggregate_many = lambda w, c, r, k, coef, mode="reconstruct": \
        ops._aggregate_many_per_tensor(w, c, r, k, coef, mode=mode)
    cahfp_ops.slice_channels_many = lambda w, r=None, c=None, *, num_clients=None: \
        ops._slice_many_per_tensor(w, r, c, num_clients=num_clients)
out = {"isa": cpp.cpu_isa() if config != "old" else "old build", "times": {}, "digest": {}}
for op, model, K in json.loads(sys.argv[5]):
    case = workloads.SINGLE_OPS[op](K, torch.device("cpu")) if model is None else \
        workloads.MODEL_OPS[op](model, K, torch.device("cpu"))
    fn = case.ours(novalidate=True)
    res = fn()
    def tensors(x):
        if isinstance(x, Mapping):  # dicts and PackedModels
            x = list(x.values())
        return [t for item in x for t in tensors(item)] if isinstance(x, (list, tuple)) else [x]
    flat = tensors(res)
    out["digest"][case.group] = float(sum(t.double().sum() for t in flat if t.is_floating_point()))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    out["times"][case.group] = statistics.median(times)
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--old-ref", default="v0.2.0")
    p.add_argument("--library", default=None, help="current library to time (default: whatever cahfp_ops loads)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        print(f"building the {args.old_ref} kernels ...", file=sys.stderr, flush=True)
        old = _build_old(args.old_ref, Path(tmp))
        configs = {
            "old": str(old),
            "baseline": args.library or "",
            "avx2": args.library or "",
            "avx512": args.library or "",
            "auto": args.library or "",
        }
        results: dict[str, list[dict]] = {c: [] for c in configs}
        for cycle in range(args.cycles):
            for config, library in configs.items():
                res = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        WORKER,
                        config,
                        library,
                        str(args.threads),
                        str(args.repeat),
                        json.dumps(CASES),
                    ],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "CAHFP_OPS_VALIDATE": "0", "PYTHONPATH": _bench_path()},
                )
                line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    if "not supported by this CPU" in res.stderr:
                        print(f"skip {config}: not supported by this CPU", file=sys.stderr)
                        continue
                    raise SystemExit(f"{config} failed:\n{res.stderr[-3000:]}")
                results[config].append(json.loads(line[len("RESULT ") :]))
                print(f"cycle {cycle + 1}/{args.cycles}: {config} done", file=sys.stderr, flush=True)
    configs = [c for c in results if results[c]]
    groups = list(results[configs[0]][0]["times"])
    # The current variants must agree exactly (the old build may differ in the last bits).
    current = [c for c in configs if c != "old"]
    for g in groups:
        digests = {results[c][0]["digest"][g] for c in current}
        assert len(digests) == 1, (g, digests)
    med = {c: {g: statistics.median(r["times"][g] for r in results[c]) for g in groups} for c in configs}
    import torch

    print(
        f"torch {torch.__version__}, {args.threads} threads, median of {args.cycles} cycles x {args.repeat} runs, "
        f"validation off; auto = {results['auto'][0]['isa'] if results.get('auto') else '?'}"
    )
    header = f"{'case':40s}" + "".join(f"{c + ' ms':>13s}" for c in configs) + f"{'old/auto':>10s}"
    print(header)
    for g in groups:
        cells = "".join(f"{med[c][g]:13.2f}" for c in configs)
        ratio = med["old"][g] / med["auto"][g] if "old" in med and "auto" in med else float("nan")
        print(f"{g:40s}{cells}{ratio:10.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"configs": configs, "median_ms": med, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
