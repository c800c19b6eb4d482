"""Kernel-layer safety: the validation switch per thread and task, coefficient normalisation
at the ends of the float64 range, NaN semantics shared by every backend, meta tensors refused."""

from __future__ import annotations

import asyncio
import threading
from fractions import Fraction

import pytest
import torch

import cahfp_ops
from cahfp_ops._inputs import normalise
from helpers import backends_under_test


def test_validation_switch_is_per_thread():
    """Inside one thread's ``validation(False)`` another thread's bad call is still checked."""
    inside, release, seen = threading.Event(), threading.Event(), {}

    def unchecked():
        with cahfp_ops.validation(False):
            seen["inner"] = cahfp_ops.validation_enabled()
            inside.set()
            release.wait(10)

    th = threading.Thread(target=unchecked)
    th.start()
    inside.wait(10)
    try:
        assert cahfp_ops.validation_enabled() and seen["inner"] is False
        with pytest.raises(ValueError, match="rows"):
            cahfp_ops.slice_channels(torch.randn(4, 3), torch.tensor([2, 1]))  # not ascending
    finally:
        release.set()
        th.join()


def test_overlapping_validation_blocks_in_threads_restore_each_threads_state():
    """Two threads' blocks that overlap in time (A enters, B enters, A leaves, B leaves) leave
    validation on afterwards; with one process-global flag B would restore A's 'off'."""
    steps = [threading.Event() for _ in range(3)]

    def a():
        with cahfp_ops.validation(False):
            steps[0].set()
            steps[1].wait(10)
        steps[2].set()

    def b():
        steps[0].wait(10)
        with cahfp_ops.validation(False):
            steps[1].set()
            steps[2].wait(10)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cahfp_ops.validation_enabled()
    results = []
    th = threading.Thread(target=lambda: results.append(cahfp_ops.validation_enabled()))
    th.start()
    th.join()
    assert results == [True]


def test_validation_and_backend_are_per_async_task():
    async def task(flag: bool, backend: str) -> tuple[bool, str]:
        with cahfp_ops.validation(flag), cahfp_ops.use_backend(backend):
            await asyncio.sleep(0.01)
            return cahfp_ops.validation_enabled(), cahfp_ops.get_backend()

    async def main():
        return await asyncio.gather(task(False, "torch"), task(True, "cpp"))

    assert asyncio.run(main()) == [(False, "torch"), (True, "cpp")]
    assert cahfp_ops.validation_enabled()


def test_set_validation_acts_on_the_calling_thread():
    other = []
    try:
        cahfp_ops.set_validation(False)
        th = threading.Thread(target=lambda: other.append(cahfp_ops.validation_enabled()))
        th.start()
        th.join()
        assert not cahfp_ops.validation_enabled() and other == [True]
    finally:
        cahfp_ops.set_validation(None)
    with pytest.raises(TypeError, match="enabled"):
        with cahfp_ops.validation("no"):
            pass


def _exact_overlap(w, clients, rows, cols, coef):
    """Overlap aggregation in exact rational arithmetic (float32 inputs, float64 coefficients)."""
    out = w.clone()
    R, C = w.shape
    for r in range(R):
        for c in range(C):
            num, den = Fraction(0), Fraction(0)
            for k, (cl, rk, ck) in enumerate(zip(clients, rows, cols)):
                if r in rk.tolist() and c in ck.tolist():
                    p = Fraction(coef[k])
                    num += p * Fraction(float(cl[rk.tolist().index(r), ck.tolist().index(c)]))
                    den += p
            if den:
                out[r, c] = float(num / den)
    return out


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("coef", [[1e308, 1e308, 3e307], [1e-320, 2e-320, 1e-320], [1.0, 1e-30, 3.0]])
@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_coefficients_at_the_ends_of_the_range(gen, backend, coef, mode):
    """A coefficient sum that overflows or underflows float64 normalises like its rescaled
    equivalent; a tiny coefficient is not lost (nor flushed to the float32 tiny)."""
    w = torch.randn(5, 4, generator=gen)
    rows = [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4]), torch.tensor([1, 3])]
    cols = [torch.tensor([0, 1]), torch.tensor([1, 2, 3]), torch.tensor([3])]
    clients = [torch.randn(len(r), len(c), generator=gen) for r, c in zip(rows, cols)]
    scale = max(coef)
    with cahfp_ops.use_backend(backend):
        out = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef, mode=mode)
        again = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, [c / scale for c in coef], mode=mode)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, again, rtol=1e-6, atol=1e-6)
    if mode == "overlap":
        torch.testing.assert_close(out, _exact_overlap(w, clients, rows, cols, coef), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "coef", [[3.0, 1.0, 0.5], [0.0, 2.0], [1e308, 1e308, 3e307], [1e-320, 2e-320], [1e-300, 1e-300], [7.0]]
)
def test_normalise_cpu_shortcut_is_the_device_formula(coef):
    """On the CPU, normalise divides by the sum it read once when that is a finite normal
    number; the device formula (rescale first where it is not) gives the same bits."""
    c = torch.tensor(coef, dtype=torch.float64)
    total = c.sum()
    ok = torch.isfinite(total) & (total >= torch.finfo(c.dtype).tiny)
    rescaled = c / torch.where(ok, torch.ones_like(total), c.amax())
    assert torch.equal(normalise(c), rescaled / rescaled.sum())


@pytest.mark.parametrize("backend", backends_under_test())
def test_nan_curvature_propagates_on_every_backend(gen, backend):
    """The SPEC's clamp(h, min=0) lets NaN through: a NaN curvature makes its channel's score NaN."""
    w = torch.randn(4, 3, generator=gen)
    g = torch.randn(4, 3, generator=gen)
    h = torch.randn(4, 3, generator=gen)
    h[1, 2] = float("nan")
    with cahfp_ops.use_backend(backend):
        s0 = cahfp_ops.curvature_scores(w, g, h, dim=0)
        s1 = cahfp_ops.curvature_scores(w, None, h, dim=1)
    with cahfp_ops.use_backend("torch"):
        r0 = cahfp_ops.curvature_scores(w, g, h, dim=0)
    assert torch.isnan(s0).tolist() == [False, True, False, False]
    assert torch.isnan(s1).tolist() == [False, False, True]
    torch.testing.assert_close(s0, r0, equal_nan=True)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m: cahfp_ops.slice_channels(torch.randn(4, 3, device=m), torch.tensor([0])), "weight"),
        (lambda m: cahfp_ops.slice_channels(torch.randn(4, 3), torch.tensor([0], device=m)), "rows"),
        (lambda m: cahfp_ops.reconstruct_aggregate(torch.randn(4, 3), [torch.randn(1, 3, device=m)],
                                                   [torch.tensor([0])]), "clients[0]"),
        (lambda m: cahfp_ops.reconstruct_aggregate(torch.randn(4, 3), [torch.randn(1, 3)], [torch.tensor([0])],
                                                   coef=torch.ones(1, device=m)), "coef"),
        (lambda m: cahfp_ops.curvature_scores(torch.randn(4, 3), torch.randn(4, 3, device=m), None), "grad"),
        (lambda m: cahfp_ops.topk_channel_masks(torch.randn(5, device=m), 2), "scores"),
    ],
)  # fmt: skip
def test_meta_tensors_are_refused_by_name(call, name):
    with pytest.raises(ValueError, match=rf"{name.replace('[', '.').replace(']', '.')} is on the meta device"):
        call("meta")
