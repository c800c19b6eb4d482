"""The pytest-benchmark suite: every op, the whole-model calls and a server round, each
implementation (cahfp backends, the reference, the plain-PyTorch peers) side by side,
grouped per op and shape::

    pytest bench --benchmark-only --benchmark-group-by=group
    pytest bench --benchmark-only --benchmark-group-by=group --benchmark-json=bench/out/bench.json
    python bench/plot_benchmarks.py bench/out/bench.json    # speedups over each peer, PNG

Cases come from ``workloads.py`` (the roofline scripts use the same). Each case is checked
against its first implementation before it is timed. Options (environment):
``CAHFP_BENCH_DEVICE`` (``cpu`` or ``cuda``), ``CAHFP_BENCH_CLIENTS`` (``10,100``),
``CAHFP_BENCH_MODELS`` (``vgg16,resnet56``), ``CAHFP_BENCH_THREADS`` (default: torch's).
Timing is wall clock; on CUDA every call ends with a synchronise.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import workloads

DEVICE = torch.device(os.environ.get("CAHFP_BENCH_DEVICE", "cpu"))
CLIENTS = [int(k) for k in os.environ.get("CAHFP_BENCH_CLIENTS", "10,100").split(",")]
MODELS = os.environ.get("CAHFP_BENCH_MODELS", "vgg16,resnet56").split(",")
if os.environ.get("CAHFP_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CAHFP_BENCH_THREADS"]))


@functools.lru_cache(maxsize=4)
def _case(op: str, model: str | None, K: int) -> workloads.Workload:
    if model is None:
        case = workloads.SINGLE_OPS[op](K, DEVICE)
    else:
        case = workloads.MODEL_OPS[op](model, K, DEVICE)
    assert list(case.impls) == workloads.impl_names(op, DEVICE), (list(case.impls), op)
    case.check()
    return case


def _params():
    for op in workloads.SINGLE_OPS:
        for K in CLIENTS:
            for impl in workloads.impl_names(op, DEVICE):
                yield pytest.param(op, None, K, impl, id=f"{op}-vgg16conv-K{K}-{impl}")
    for op in workloads.MODEL_OPS:
        for model in MODELS:
            for K in CLIENTS:
                for impl in workloads.impl_names(op, DEVICE):
                    yield pytest.param(op, model, K, impl, id=f"{op}-{model}-K{K}-{impl}")


@pytest.mark.parametrize(("op", "model", "K", "impl"), list(_params()))
def test_bench(benchmark, op, model, K, impl):
    case = _case(op, model, K)
    fn = case.impls[impl]
    if DEVICE.type == "cuda":
        call = fn

        def fn():
            out = call()
            torch.cuda.synchronize()
            return out

    benchmark.group = case.group
    benchmark.extra_info.update(op=op, shape=case.shape, impl=impl, bytes=case.nbytes, device=str(DEVICE))
    rounds = 3 if K >= 100 or model else 5
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
