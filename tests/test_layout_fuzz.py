"""A seeded fuzz of the per-round layout API against a dense float64 oracle, on every backend.

Each seed draws a layout of 1-6 tensors (1-D, 2-D and conv-shaped; channel groups in blocks,
whole or as channel ranges in copies, on dim 0, dim 1 or a later dim; dims that are not
pruned), K = 1-7 clients with random, full or empty keep sets, every client
form (one packed buffer, its separate tensors, non-contiguous tensors) and every floating dtype
for the weights and the uploads. Slicing must be exact; aggregation, its reply statistics,
folding and finishing must match the float64 oracle within the dtype's tolerance; folding must
equal per-client accumulation bit for bit. Outputs are poisoned (the ``backend`` fixture).
"""

from __future__ import annotations

import math

import pytest
import torch

import cahfp_ops
from cahfp_ops import RoundLayout, accumulate_packed, aggregate_packed, finish_partials, fold_packed
from helpers import DTYPES, TOL, assert_close, oracle_aggregate

# 21, 37, 138: layouts with a later column dim and clients sending separate tensors of it, which
# every backend once misread (a later column dim taken for dim 1)
SEEDS = [*range(8), 21, 37, 138]


def _ints(gen, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _random_keep(gen, size: int) -> torch.Tensor:
    kind = _ints(gen, 0, 7)
    if kind == 0:
        return torch.zeros(0, dtype=torch.int64)  # keeps nothing: empty overlaps
    if kind == 1:
        return torch.arange(size)
    return (torch.rand(size, generator=gen) < torch.rand(1, generator=gen)).nonzero().flatten()


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous view (rows and columns swapped in memory, or
    every other element of a larger buffer)."""
    if t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    view = torch.empty(2 * t.numel(), dtype=t.dtype)[::2]
    return view.copy_(t)


def random_case(seed: int) -> dict:
    """A random layout and everything to check it with (see the module docs)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    G = _ints(gen, 1, 3)
    sizes = [_ints(gen, 1, 7) for _ in range(G)]
    N = 1 if seed % 2 == 0 else _ints(gen, 2, 6)  # every other seed: a one-tensor layout
    shapes, rows, cols = [], [], []

    def draw_spec(blocks: int, dims: tuple[int, ...] = ()) -> tuple[tuple | None, int]:
        """A dim's spec (whole group, a channel range in copies, or None) and its length."""
        kind = _ints(gen, 0, 5)
        if kind == 0:
            return None, _ints(gen, 1, 5)
        g, b = _ints(gen, 0, G - 1), _ints(gen, 1, blocks)
        if kind <= 2 and not dims:
            return (g, b), sizes[g] * b
        o = _ints(gen, 0, sizes[g] - 1)
        n, c = _ints(gen, 1, sizes[g] - o), _ints(gen, 1, 2)
        spec = (g, b, o, c, dims[_ints(gen, 0, len(dims) - 1)]) if dims else (g, b, o, c)
        return spec, c * n * b

    for _ in range(N):
        rank = [1, 2, 4][_ints(gen, 0, 2)]
        spec_r, d0 = draw_spec(2)
        if rank == 1:
            shapes.append((d0,))
            rows.append(spec_r)
            cols.append(None)
            continue
        later = rank == 4 and spec_r is None and _ints(gen, 0, 1)  # a column spec on dim 2 or 3
        spec_c, d = draw_spec(3, (2, 3) if later else ())
        later = later and spec_c is not None  # an unpruned dim: the columns stay dim 1
        shape = [d0, d] if rank == 2 else [d0, d, _ints(gen, 1, 3), _ints(gen, 1, 3)]
        if later:
            shape[1] = _ints(gen, 1, 3)
            shape[spec_c[4]] = d
        shapes.append(tuple(shape))
        rows.append(spec_r)
        cols.append(spec_c)
    K = _ints(gen, 1, 7)
    keeps = [[_random_keep(gen, s) for _ in range(K)] for s in sizes]
    wdtype = DTYPES[_ints(gen, 0, 3)]
    cdtype = DTYPES[_ints(gen, 0, 3)] if _ints(gen, 0, 1) else wdtype
    names = [f"t{n}" for n in range(N)]
    layout = RoundLayout.from_groups(shapes, rows, cols, sizes, keeps, K, names=names)
    weights = [torch.randn(s, generator=gen).to(wdtype) for s in shapes]

    def expand(spec, k: int, size: int) -> torch.Tensor | None:
        """The kept indices of a dim of ``size`` entries under ``spec`` for client k."""
        if spec is None:
            return None
        g, b = spec[:2]
        o, c = spec[2:4] if len(spec) > 2 else (0, 1)
        n = size // (b * c)
        keep = keeps[g][k]
        keep = keep[(keep >= o) & (keep < o + n)] - o
        one = (keep.unsqueeze(1) * b + torch.arange(b)).reshape(-1)
        return torch.cat([one + s * n * b for s in range(c)])

    def col_dim(n: int) -> int:
        return cols[n][4] if cols[n] is not None and len(cols[n]) == 5 else 1

    tensor_rows = [[expand(rows[n], k, shapes[n][0]) for k in range(K)] for n in range(N)]
    tensor_cols = [[expand(cols[n], k, shapes[n][col_dim(n)]) if len(shapes[n]) > 1 else None for k in range(K)]
                   for n in range(N)]  # fmt: skip
    compact = [[torch.randn(s, generator=gen).to(cdtype) for s in layout.compact_shapes(k)] for k in range(K)]
    forms = []
    for k in range(K):
        form = ["packed", "separate", "strided"][_ints(gen, 0, 2)]
        if form == "packed":
            forms.append(torch.cat([t.reshape(-1) for t in compact[k]]) if N else torch.zeros(0))
        elif form == "separate":
            forms.append(list(compact[k]))
        else:  # non-contiguous views of the same values
            forms.append([_strided(t) for t in compact[k]])
    coef = torch.rand(K, generator=gen, dtype=torch.float64) + 0.05
    if K > 1 and _ints(gen, 0, 2) == 0:
        coef[_ints(gen, 0, K - 1)] = 0.0  # a zero coefficient: its client adds nothing
    return dict(layout=layout, weights=weights, rows=tensor_rows, cols=tensor_cols, compact=compact, forms=forms,
                coef=coef, wdtype=wdtype, cdtype=cdtype, N=N, K=K, col_dims=[col_dim(n) for n in range(N)])  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
def test_layout_api_matches_the_float64_oracle(backend, seed):
    c = random_case(seed)
    layout, weights, K, N = c["layout"], c["weights"], c["K"], c["N"]
    # slicing: exact, every client, every tensor
    buffers = layout.slice(weights)
    for k in range(K):
        views = cahfp_ops.PackedModel(buffers[k], layout, k)
        for n, w in enumerate(weights):
            r = c["rows"][n][k]
            want = w if r is None else w[r]
            if w.dim() > 1 and c["cols"][n][k] is not None:
                want = want.index_select(c["col_dims"][n], c["cols"][n][k])
            assert torch.equal(views[f"t{n}"], want), (k, n)
    coef = c["coef"]
    if not coef.sum() > 0:
        coef = torch.ones(K, dtype=torch.float64)
    acc = torch.float64 if c["wdtype"] == torch.float64 else torch.float32
    scale = 4.0 if c["cdtype"] != c["wdtype"] else 1.0  # an upload rounded into the accumulation dtype
    for mode in ("reconstruct", "overlap"):
        out, stats = aggregate_packed(layout, weights, c["forms"], coef / coef.sum(), mode)
        for n, (w, got) in enumerate(zip(weights, layout.full_views(out))):
            d = c["col_dims"][n]  # a later pruned dim: the oracle sees it moved to dim 1
            want = oracle_aggregate(w.movedim(d, 1) if d > 1 else w,
                                    [t.movedim(d, 1) if d > 1 else t for t in (c["compact"][k][n] for k in range(K))],
                                    c["rows"][n], c["cols"][n], coef, mode)  # fmt: skip
            assert_close(got, want.movedim(1, d) if d > 1 else want, c["wdtype"], scale)
        for k in range(K):
            g = layout.slice(weights)[k]
            cb = torch.cat([t.reshape(-1) for t in c["compact"][k]]) if N else g
            want = float((cb.to(acc).double() - g.to(acc).double()).square().sum())
            assert stats[k, 0] == 0
            assert math.isclose(float(stats[k, 1]), want, rel_tol=1e-4, abs_tol=1e-9), (mode, k)
        # streaming: one fold of every client, then the result, equals the batch call; bit for
        # bit K one-client accumulations
        total = sum(w.numel() for w in weights)
        # cover: per tensor R x Cin of its (R, Cin, T) view (a later column dim: R spans the dims before it)
        cover_n = sum(R * Cin for R, Cin, _ in (layout.tables()["meta"][:, :3].tolist()))
        zeros = (torch.zeros(total, dtype=acc), torch.zeros(cover_n, dtype=acc))
        s, cv, st = fold_packed(layout, weights, c["forms"], coef, mode, *zeros)
        assert torch.equal(st[:, 0], stats[:, 0])
        fin = finish_partials(weights, s, cv, float(coef.sum()), mode, layout=layout)
        rtol, atol = TOL[c["wdtype"]]
        torch.testing.assert_close(fin.double(), out.double(), rtol=4 * rtol, atol=4 * atol * scale)
        one_s, one_c = torch.zeros(total, dtype=acc), torch.zeros(cover_n, dtype=acc)
        for k in range(K):
            accumulate_packed(layout.client(k), weights, c["forms"][k], float(coef[k]), mode, one_s, one_c)
        assert torch.equal(one_s, s) and torch.equal(one_c, cv)


@pytest.mark.parametrize("K", [1, 3])
def test_whole_model_op_takes_any_mix_of_dtype_groups(backend, K):
    """A dtype group of one tensor (a one-tensor layout) next to others, clients as separate
    tensors and as packed models: equal to the per-tensor op bit for bit."""
    gen = torch.Generator().manual_seed(K)
    sd = {"a": torch.randn(5, 4, generator=gen), "b": torch.randn(6, 5, generator=gen).double(),
          "c": torch.randn(6, generator=gen).double(), "d": torch.randn(3, 2, 3, generator=gen).half()}  # fmt: skip
    rows = {"a": [torch.tensor([0, 3]), torch.tensor([1, 2, 4]), torch.tensor([4])][:K],
            "b": [torch.tensor([5]), None, torch.tensor([0, 2])][:K], "d": torch.tensor([0, 2])}  # fmt: skip
    rows["c"] = rows["b"]
    cols = {"b": [torch.tensor([1, 3]), torch.tensor([0]), None][:K]}
    clients = cahfp_ops.slice_channels_many(sd, rows, cols)
    clients = [{n: t + 0.25 * torch.randn(t.shape, generator=gen).to(t.dtype) for n, t in m.items()} for m in clients]
    out = cahfp_ops.reconstruct_aggregate_many(sd, clients, rows, cols)
    for n, w in sd.items():
        want = cahfp_ops.reconstruct_aggregate(w, [m[n] for m in clients], rows.get(n), cols.get(n))
        assert torch.equal(out[n], want), n


@pytest.mark.skipif(not cahfp_ops.load_cpp(), reason="the C++ kernels are not available")
def test_client_forms_give_the_same_bits_on_many_layouts():
    """Many more random layouts, on the C++ kernel alone (cheap): every client form (separate,
    non-contiguous, on any column dim) aggregates bit for bit as the clients' packed buffers."""
    with cahfp_ops.use_backend("cpp"):
        for seed in range(8, 208):
            c = random_case(seed)
            packed = [torch.cat([t.reshape(-1) for t in comp]) for comp in c["compact"]]
            coef = c["coef"] + (1.0 if float(c["coef"].sum()) == 0 else 0.0)
            want = aggregate_packed(c["layout"], c["weights"], packed, coef)
            got = aggregate_packed(c["layout"], c["weights"], c["forms"], coef)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), seed


@pytest.mark.parametrize("step", [1, 40, cahfp_ops.layout._COL_KEEP_STEP])
def test_column_table_holds_each_clients_kept_columns_in_order(monkeypatch, step):
    """The column table (``col_keep``) the kernels read: client k's kept columns of tensor n
    (its channels for a 1-D tensor), ascending, at ``col_keep[k, col_off[n]:]``, then -1;
    built in steps of ``step`` table entries (1: a tensor at a time; 40: several small tensors
    at a time; the default: every table at once)."""
    monkeypatch.setattr(cahfp_ops.layout, "_COL_KEEP_STEP", step)
    for seed in SEEDS + list(range(40, 60)):
        c = random_case(seed)
        c["layout"]._tables.clear()  # built in this test's steps (equal keep sets give a cached layout back)
        t = c["layout"].tables()
        meta, col_keep = t["meta"].tolist(), t["col_keep"]
        ends = [m[4] for m in meta[1:]] + [col_keep.shape[1]]
        for n, (_R, Cin, _T, _ro, off) in enumerate(meta):
            for k in range(c["K"]):
                kept = c["cols"][n][k] if len(c["layout"].shapes[n]) > 1 else c["rows"][n][k]
                kept = torch.arange(Cin) if kept is None else kept
                want = torch.full((ends[n] - off,), -1, dtype=torch.int32)
                want[: kept.numel()] = kept.to(torch.int32)
                assert torch.equal(col_keep[k, off : ends[n]], want), (seed, n, k)
