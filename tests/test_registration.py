"""The operators are registered properly: torch.library.opcheck on every public
torch.ops.cahfp.* operator under each backend (single-tensor and whole-model forms), and
torch.compile(fullgraph=True) smoke tests. The compiled kernels' private namespace is
called only from inside these operators, so it needs no checks of its own."""

import pytest
import torch

import cahfp_ops
from helpers import make_keeps, to_padded


def _agg_args(gen, dtype=torch.float32, client_dtype=None):
    weight = torch.randn(7, 5, 3, generator=gen).to(dtype)
    rows = to_padded(make_keeps(gen, 7, 3, "random"), 7)
    cols = to_padded(make_keeps(gen, 5, 3, "mixed"), 5)
    clients = [
        torch.randn(int((rows[k] >= 0).sum()), int((cols[k] >= 0).sum()), 3, generator=gen).to(client_dtype or dtype)
        for k in range(3)
    ]
    coef = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    return weight, clients, rows, cols, coef


def _cases(gen):
    weight, clients, rows, cols, coef = _agg_args(gen)
    w4 = torch.randn(6, 4, 3, 3, generator=gen)
    total = int(sum(((rows[k] >= 0).sum() * (cols[k] >= 0).sum()).item() * 3 for k in range(3)))
    return {
        "reconstruct_aggregate": [
            (weight, clients, rows, cols, coef, "reconstruct"),
            (weight, clients, rows, cols, coef, "overlap"),
            _agg_args(gen, torch.float32, torch.float16) + ("reconstruct",),
            _agg_args(gen, torch.float64) + ("overlap",),
        ],
        "slice_channels": [(weight, rows, cols, total)],
        "topk_channel_masks": [(torch.randn(3, 9, generator=gen), torch.tensor([1, 4, 9]), 9)],
        "curvature_scores": [
            (w4.unsqueeze(0), torch.randn(2, *w4.shape, generator=gen), None, 0),
            (w4.unsqueeze(0), None, w4.unsqueeze(0).abs(), 1),
            (w4.unsqueeze(0), w4.unsqueeze(0), w4.unsqueeze(0), 2),
        ],
    }


@pytest.mark.parametrize(
    "op_name", ["reconstruct_aggregate", "slice_channels", "topk_channel_masks", "curvature_scores"]
)
def test_opcheck_public(backend, gen, op_name):
    op = getattr(torch.ops.cahfp, op_name)
    for args in _cases(gen)[op_name]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_smoke(backend, gen):
    weight = torch.randn(8, 6, 3, 3, generator=gen)
    rows = [torch.tensor([0, 3, 5, 7]), torch.tensor([1, 2, 3])]
    cols = [torch.tensor([0, 1, 5]), torch.tensor([2, 4])]
    grad = torch.randn_like(weight)

    def round_fn(weight, grad):
        scores = cahfp_ops.curvature_scores(weight, grad, grad.abs())
        mask, _ = cahfp_ops.topk_channel_masks(scores, 4)
        parts = cahfp_ops.slice_channels(weight, rows, cols)
        updated = [p * 0.5 + 1.0 for p in parts]
        out = cahfp_ops.reconstruct_aggregate(weight, updated, rows, cols, [1.0, 3.0])
        return out, mask

    with cahfp_ops.validation(False):
        eager = round_fn(weight, grad)
        compiled = torch.compile(round_fn, fullgraph=True, backend="aot_eager")(weight, grad)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def _working_cxx() -> bool:
    import os
    import shutil
    import subprocess

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    return bool(cxx) and subprocess.run([cxx, "--version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _working_cxx(), reason="inductor's CPU code generation needs a C++ compiler")
def test_compile_inductor_aggregate(gen):
    """The aggregation op inside an inductor-compiled function (C++ backend on CPU)."""
    weight, clients, rows, cols, coef = _agg_args(gen)

    def f(weight, clients):
        return torch.ops.cahfp.reconstruct_aggregate(weight, clients, rows, cols, coef, "reconstruct") * 2.0

    expected = f(weight, clients)
    got = torch.compile(f, fullgraph=True)(weight, clients)
    torch.testing.assert_close(got, expected)


def test_opcheck_public_many(backend, gen):
    """The whole-model operators, with N-D and 1-D tensors in one call."""
    w = [torch.randn(5, 4, 3, generator=gen), torch.randn(7, generator=gen), torch.randn(3, 6, generator=gen)]
    K = 2
    r = [to_padded(make_keeps(gen, t.shape[0], K, "random"), t.shape[0]) for t in w]
    c = [
        to_padded(make_keeps(gen, 4, K, "random"), 4),
        torch.zeros(K, 1, dtype=torch.int64),
        to_padded(make_keeps(gen, 6, K, "mixed"), 6),
    ]
    clients = []
    for n, t in enumerate(w):
        for k in range(K):
            nr, nc = int((r[n][k] >= 0).sum()), int((c[n][k] >= 0).sum())
            clients.append(torch.randn((nr,) if t.dim() == 1 else (nr, nc, *t.shape[2:]), generator=gen))
    coef = torch.tensor([0.4, 0.6], dtype=torch.float64)
    for mode in ("reconstruct", "overlap"):
        torch.library.opcheck(torch.ops.cahfp.reconstruct_aggregate_many, (w, clients, r, c, coef, mode))
    row_counts = [int((r[n][k] >= 0).sum()) for n in range(3) for k in range(K)]
    col_counts = [int((c[n][k] >= 0).sum()) for n in range(3) for k in range(K)]
    torch.library.opcheck(torch.ops.cahfp.slice_channels_many, (w, r, c, row_counts, col_counts))


def test_layout_ops_run_their_body_eagerly_and_the_operator_under_modes(gen):
    """In plain eager mode a layout operator's body runs directly (no wrapper cost per tensor);
    under a dispatch mode or a profiler the call goes through ``torch.ops.cahfp`` (which they
    then see). Both ways give the same bits."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    model = {"a": torch.randn(6, 5, 3, 3, generator=gen), "b": torch.randn(6, generator=gen)}
    rows = {"a": [torch.tensor([0, 2, 5]), torch.tensor([1, 2])], "b": [torch.tensor([0, 2, 5]), torch.tensor([1, 2])]}
    cols = {"a": [torch.tensor([1, 3]), None]}
    layout = cahfp_ops.RoundLayout.from_keep_sets(model, rows, cols)
    clients = [b + torch.randn(b.shape, generator=gen) for b in layout.slice(list(model.values()))]
    coef = torch.tensor([0.25, 0.75], dtype=torch.float64)

    def run():
        return cahfp_ops.aggregate_packed(layout, list(model.values()), clients, coef)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    eager = run()
    with Seen() as seen:
        moded = run()
    assert any("cahfp.aggregate_packed" in n for n in seen.names)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = run()
    assert any(e.key == "cahfp::aggregate_packed" for e in prof.key_averages())
    for a, b in ((eager, moded), (eager, profiled)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
