"""With validation off, malformed keep sets and client tensors never make a backend read or
write out of bounds.

Every case runs in a subprocess per backend, so a crash (a segfault, a device assert) is a
failed test rather than a lost test run. Weights and clients sit inside NaN guard regions:
a read outside them shows up as NaN in the result, a write as a changed guard. The C++ and
reference backends may raise on such input (the compiled kernels bounds-check); the Triton
kernels may not (a GPU kernel cannot raise: it masks), and no backend may crash, read or
write outside its buffers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import backends_under_test

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import cahfp_ops

    GUARD = 64
    def guarded(shape, gen):
        n = 1
        for s in shape:
            n *= s
        whole = torch.full((n + 2 * GUARD,), float("nan"))
        inner = whole[GUARD:GUARD + n]
        inner.copy_(torch.randn(n, generator=gen))
        return whole, inner.view(shape)

    def intact(*wholes):
        return all(bool(torch.isnan(w[:GUARD]).all() and torch.isnan(w[-GUARD:]).all()) for w in wholes)

    gen = torch.Generator().manual_seed(0)
    w_whole, w = guarded((6, 5, 3), gen)
    t = torch.tensor
    cases = {
        "slice rows past the end": lambda: cahfp_ops.slice_channels(w, t([0, 7])),
        "slice negative padded rows": lambda: cahfp_ops.slice_channels(w, t([[-5, 1], [0, 1]])),
        "slice cols past the end": lambda: cahfp_ops.slice_channels(w, None, [t([0, 9]), t([1])]),
        "slice huge rows": lambda: cahfp_ops.slice_channels(w, [t([2**40]), t([1, 2])]),
        "aggregate client of the wrong trailing size": lambda: cahfp_ops.reconstruct_aggregate(
            w, [guarded((2, 5, 2), gen)[1]], [t([0, 1])]),
        "aggregate rows past the end": lambda: cahfp_ops.reconstruct_aggregate(
            w, [guarded((2, 5, 3), gen)[1]], [t([0, 7])]),
        "aggregate client smaller than its keep set": lambda: cahfp_ops.reconstruct_aggregate(
            w, [guarded((2, 3, 3), gen)[1]], [t([0, 1, 2])], [t([0, 1, 2, 4])]),
        "aggregate negative padded cols, overlap": lambda: cahfp_ops.reconstruct_aggregate(
            w, [guarded((2, 2, 3), gen)[1]] * 2, t([[0, 1], [1, 2]]), t([[-3, 1], [0, 8]]), mode="overlap"),
        "aggregate_many wrong trailing size": lambda: cahfp_ops.reconstruct_aggregate_many(
            [w], [[guarded((2, 5, 1), gen)[1]]], [[t([1, 4])]]),
        "median, rows past the end and a short client": lambda: cahfp_ops.reconstruct_aggregate(
            w, [guarded((2, 5, 2), gen)[1], guarded((1, 2, 3), gen)[1]], [t([0, 7]), t([2, 3])],
            [None, t([0, 1, 9])], reduce="median"),
    }
    results = {}
    for name, call in cases.items():
        try:
            out = call()
        except Exception as e:  # raising on bad input is allowed
            results[name] = {"raised": type(e).__name__}
            continue
        outs = out if isinstance(out, (list, tuple)) else [out]
        results[name] = {"nan_read": any(bool(torch.isnan(o).any()) for o in outs)}
    results["guards intact"] = intact(w_whole)
    print(json.dumps(results))
    """
)


@pytest.mark.parametrize("backend", backends_under_test())
def test_bad_keep_sets_and_clients_stay_in_bounds_with_validation_off(backend):
    env = dict(os.environ, CAHFP_OPS_VALIDATE="0", CAHFP_OPS_BACKEND=backend)
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the {backend} backend crashed:\n{done.stderr[-3000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("guards intact"), f"{backend}: a weight guard was written"
    if backend == "triton":
        raised = {name: r["raised"] for name, r in results.items() if "raised" in r}
        assert not raised, f"the Triton kernels raised instead of masking: {raised}"
    read_outside = [name for name, r in results.items() if r.get("nan_read")]
    assert not read_outside, f"{backend} read outside its buffers in: {read_outside}"
    assert len(results) == 10
