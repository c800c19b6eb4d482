"""Random ragged inputs and dense float64 oracles for the op tests.

The oracles here are written independently of ``cahfp_ops.reference`` (dense
masks, float64), so the reference itself is checked too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from cahfp_ops.fl import extract, kept_count, small_cnn, trace_plan

# Per storage dtype: (rtol, atol) for results compared in float64. Outputs are
# rounded to the storage dtype, so the bound is about one unit in the last place
# plus float32 accumulation error.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOL)


def backends_under_test() -> list[str]:
    """Backends the op tests run on: ``CAHFP_TEST_BACKENDS`` (comma-separated), by default
    ``cpp`` and ``torch``, plus ``triton`` when its kernels can run on CPU tensors
    (the triton package is installed and ``TRITON_INTERPRET=1``), except against an
    installed wheel (``CAHFP_OPS_EXPECT_INSTALLED=1``, CI's first job): the Triton kernels
    are the same Python files installed or not, and CI's source job runs them, so the wheel
    job spends its time on what differs (the prebuilt C++ kernels, the packaging)."""
    default = "cpp,torch"
    interpreted = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted and not os.environ.get("CAHFP_OPS_EXPECT_INSTALLED"):
        default += ",triton"
    return [b for b in os.environ.get("CAHFP_TEST_BACKENDS", default).split(",") if b]


def random_keep(g: torch.Generator, size: int, *, min_keep: int = 0, p: float | None = None) -> torch.Tensor:
    """A random strictly ascending keep set over ``size`` channels (int64)."""
    if p is None:
        p = float(torch.rand(1, generator=g))
    kept = (torch.rand(size, generator=g) < p).nonzero().flatten()
    if kept.numel() < min_keep:
        kept = torch.randperm(size, generator=g)[:min_keep].sort().values
    return kept


def disjoint_keeps(g: torch.Generator, size: int, K: int) -> list[torch.Tensor]:
    """K pairwise disjoint keep sets (some may be empty)."""
    owner = torch.randint(0, K, (size,), generator=g)
    return [(owner == k).nonzero().flatten() for k in range(K)]


def make_keeps(g: torch.Generator, size: int, K: int, kind: str) -> list:
    """Per-client keep sets of a given kind: random, disjoint, full (all channels), none (None)."""
    if kind == "random":
        return [random_keep(g, size) for _ in range(K)]
    if kind == "disjoint":
        return disjoint_keeps(g, size, K)
    if kind == "full":
        return [torch.arange(size) for _ in range(K)]
    if kind == "none":
        return [None] * K
    if kind == "mixed":
        return [None if k % 3 == 2 else random_keep(g, size) for k in range(K)]
    raise ValueError(kind)


def to_padded(keeps: list, size: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    full = [torch.arange(size) if k is None else k for k in keeps]
    width = max((k.numel() for k in full), default=0)
    out = torch.full((len(full), width), -1, dtype=dtype)
    for i, k in enumerate(full):
        out[i, : k.numel()] = k.to(dtype)
    return out


def index_or_all(keep, size: int) -> torch.Tensor:
    return torch.arange(size) if keep is None else keep.to(torch.int64)


def dense_mask(shape, rows, cols) -> torch.Tensor:
    """Boolean mask of ``shape`` with True at ``rows x cols`` (all trailing dims)."""
    m = torch.zeros(shape[:2] if len(shape) > 1 else shape, dtype=torch.bool)
    r = index_or_all(rows, shape[0])
    if len(shape) == 1:
        m[r] = True
        return m
    c = index_or_all(cols, shape[1])
    m[r.unsqueeze(1), c.unsqueeze(0)] = True
    return m.reshape(*m.shape, *([1] * (len(shape) - 2))).expand(shape)


def expand(compact: torch.Tensor, shape, rows, cols) -> torch.Tensor:
    """Place a compact tensor at its kept positions of a float64 zero tensor of ``shape``."""
    full = torch.zeros(shape, dtype=torch.float64)
    r = index_or_all(rows, shape[0])
    if len(shape) == 1:
        full[r] = compact.double()
    else:
        c = index_or_all(cols, shape[1])
        full[r.unsqueeze(1), c.unsqueeze(0)] = compact.double()
    return full


def oracle_aggregate(weight, clients, rows, cols, coef, mode) -> torch.Tensor:
    """Dense float64 oracle of reconstruct_aggregate (list form)."""
    K = len(clients)
    coef = torch.ones(K, dtype=torch.float64) if coef is None else torch.as_tensor(coef, dtype=torch.float64)
    p = coef / coef.sum()
    rows = [None] * K if rows is None else rows
    cols = [None] * K if cols is None else cols
    w = weight.double()
    shape = tuple(weight.shape)
    num = torch.zeros(shape, dtype=torch.float64)
    den = torch.zeros(shape, dtype=torch.float64)
    for k in range(K):
        if p[k] == 0:
            continue
        m = dense_mask(shape, rows[k], cols[k]).double()
        full = expand(clients[k], shape, rows[k], cols[k])
        if mode == "reconstruct":
            num += p[k] * m * (full - w)
        else:
            num += p[k] * m * full
        den += p[k] * m
    if mode == "reconstruct":
        return torch.where(den > 0, w + num, w)
    return torch.where(den > 0, num / den.clamp(min=1e-300), w)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def bench_module(name: str) -> ModuleType:
    """Import a module of ``bench/`` (benchmark peers and models) by name."""
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def retained_tensor_bytes(obj: object) -> tuple[int, set[int]]:
    """Bytes of the distinct tensor storages reachable from ``obj`` through attributes,
    dicts, lists, tuples and dataclasses, and the set of their data pointers."""
    seen_objs: set[int] = set()
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen_objs:
            continue
        seen_objs.add(id(o))
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(o, dict):
            stack += list(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack += list(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            stack += list(vars(o).values())
    return sum(storages.values()), set(storages)


def random_model(gen, dtype=torch.float32):
    """A small 'state_dict' with conv, bias, norm, linear and odd shapes; keep sets coupled."""
    shapes = {
        "conv1.weight": (9, 3, 3, 3),
        "conv1.bias": (9,),
        "bn1.weight": (9,),
        "bn1.running_var": (9,),
        "conv2.weight": (6, 9, 3, 3),
        "fc.weight": (5, 6),
        "fc.bias": (5,),
        "odd.weight": (1, 1),
        "wide.weight": (2, 40, 1, 5),
    }
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def random_plan(gen, K):
    r1 = make_keeps(gen, 9, K, "random")
    r2 = make_keeps(gen, 6, K, "mixed")
    rows = {
        "conv1.weight": r1,
        "conv1.bias": r1,
        "bn1.weight": r1,
        "bn1.running_var": r1,
        "conv2.weight": r2,
        "wide.weight": [random_keep(gen, 2, min_keep=1) for _ in range(K)],
    }
    cols = {"conv2.weight": r1, "fc.weight": r2, "wide.weight": to_padded(make_keeps(gen, 40, K, "random"), 40)}
    return rows, cols


def compact_models(gen, model, rows, cols, K, dtype=None):
    out = []
    for k in range(K):
        m = {}
        for name, w in model.items():
            r = rows.get(name)
            c = cols.get(name)
            nr = w.shape[0] if r is None or r[k] is None else int((r[k] >= 0).sum())
            if w.dim() == 1:
                shape = (nr,)
            else:
                ck = None if c is None else c[k]
                nc = w.shape[1] if ck is None else int((ck >= 0).sum())
                shape = (nr, nc, *w.shape[2:])
            m[name] = torch.randn(shape, generator=gen).to(dtype or w.dtype)
        out.append(m)
    return out


def fl_round_setup(gen, K=4):
    """A small CNN, its plan, K clients' group keep sets, its state_dict and K trained compact states."""
    model = small_cnn(8)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    plan = trace_plan(model, x)
    keeps = [
        {g.name: torch.randperm(g.size, generator=gen)[: kept_count(r, g.size)].sort().values for g in plan.groups}
        for r in (0.25, 0.5, 0.75, 0.9)[:K]
    ]
    sd = model.state_dict()
    states = extract(sd, plan, keeps)
    for st in states:  # local training changed everything
        for v in st.values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=gen))
            else:
                v.add_(int(torch.randint(1, 5, (1,), generator=gen)))
    return model, plan, keeps, sd, states
