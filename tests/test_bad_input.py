"""Every bad-input case raises a clear ValueError / TypeError naming the argument, and
modifies nothing."""

import pytest
import torch

import cahfp_ops
from cahfp_ops import DTypeError


@pytest.fixture
def agg_case(gen):
    weight = torch.randn(6, 5, 3, generator=gen)
    rows = [torch.tensor([0, 2, 4]), torch.tensor([1, 5])]
    cols = [torch.tensor([1, 3]), None]
    clients = [torch.randn(3, 2, 3, generator=gen), torch.randn(2, 5, 3, generator=gen)]
    return weight, clients, rows, cols


def _snapshot(*objs):
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append(o.clone())
        elif isinstance(o, (list, tuple)):
            out.append([x.clone() if isinstance(x, torch.Tensor) else x for x in o])
        else:
            out.append(o)
    return out


def _same(x, y):
    """Bit for bit the same tensor: dtype, shape, strides and every bit of every element (NaNs
    included, by their bit patterns). Meta tensors hold no values: their layout must match."""
    if (x.dtype, x.shape, x.device) != (y.dtype, y.shape, y.device):
        return False
    if x.device.type == "meta":
        return x.stride() == y.stride() and x.storage_offset() == y.storage_offset()
    if x.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return torch.equal(x.contiguous().view(bits), y.contiguous().view(bits))
    return torch.equal(x, y)


def _unchanged(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and _same(b, a)
        elif isinstance(b, list):
            assert isinstance(a, list) and len(a) == len(b)
            for x, y in zip(b, a):
                assert _same(x, y) if isinstance(x, torch.Tensor) else (x == y or (x != x and y != y))


def test_unchanged_check_sees_every_change():
    """The input checks above fail on a changed element, a changed NaN, a dropped item or a meta resize."""
    x = torch.tensor([1.0, float("nan"), 3.0])
    assert _same(x, x.clone())
    assert not _same(x, torch.tensor([1.0, float("nan"), 4.0]))  # shares a NaN, differs elsewhere
    assert not _same(x, torch.tensor([1.0, 2.0, 3.0]))
    assert not _same(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not _same(torch.empty(2, 3, device="meta"), torch.empty(3, 2, device="meta"))
    with pytest.raises(AssertionError):
        _unchanged([[x, x]], [[x]])
    with pytest.raises(AssertionError):
        _unchanged([x, x], [x])


AGG_CASES = [
    # (description, mutate(weight, clients, rows, cols) -> kwargs, error type, message fragment)
    ("rows not ascending", lambda w, c, r, k: dict(rows=[torch.tensor([2, 0, 4]), r[1]]), ValueError, "rows[0]"),
    ("rows repeated", lambda w, c, r, k: dict(rows=[torch.tensor([0, 2, 2]), r[1]]), ValueError, "ascending"),
    ("rows out of range", lambda w, c, r, k: dict(rows=[r[0], torch.tensor([1, 6])]), ValueError, "rows[1]"),
    ("rows negative", lambda w, c, r, k: dict(rows=[torch.tensor([-1, 2, 4]), r[1]]), ValueError, "rows[0]"),
    ("rows float", lambda w, c, r, k: dict(rows=[r[0].float(), r[1]]), TypeError, "rows[0]"),
    ("rows 2-D item", lambda w, c, r, k: dict(rows=[r[0].view(3, 1), r[1]]), ValueError, "rows[0]"),
    ("rows wrong object", lambda w, c, r, k: dict(rows=["0, 2, 4", r[1]]), TypeError, "rows[0]"),
    ("cols out of range", lambda w, c, r, k: dict(cols=[torch.tensor([1, 5]), None]), ValueError, "cols[0]"),
    ("wrong number of keep sets", lambda w, c, r, k: dict(rows=[r[0]]), ValueError, "rows"),
    ("padded rows wrong K", lambda w, c, r, k: dict(rows=torch.tensor([[0, 2, 4]])), ValueError, "rows"),
    ("padded gap", lambda w, c, r, k: dict(rows=torch.tensor([[0, -1, 4], [1, 5, -1]])), ValueError, "rows[0]"),
    ("client shape", lambda w, c, r, k: dict(clients=[c[0][:, :1], c[1]]), ValueError, "clients[0]"),
    ("client tail shape", lambda w, c, r, k: dict(clients=[c[0], c[1][..., :2]]), ValueError, "clients[1]"),
    ("client int", lambda w, c, r, k: dict(clients=[c[0].long(), c[1]]), TypeError, "clients[0]"),
    ("client not tensor", lambda w, c, r, k: dict(clients=[c[0], 3.0]), TypeError, "clients[1]"),
    ("empty clients", lambda w, c, r, k: dict(clients=[], rows=None, cols=None), ValueError, "empty"),
    ("clients not a sequence", lambda w, c, r, k: dict(clients=5), TypeError, "clients"),
    ("negative coef", lambda w, c, r, k: dict(coef=[1.0, -0.5]), ValueError, "coef[1]"),
    ("zero coef", lambda w, c, r, k: dict(coef=[0.0, 0.0]), ValueError, "coef"),
    ("nan coef", lambda w, c, r, k: dict(coef=[float("nan"), 1.0]), ValueError, "coef[0]"),
    ("coef length", lambda w, c, r, k: dict(coef=[1.0, 1.0, 1.0]), ValueError, "coef"),
    ("coef type", lambda w, c, r, k: dict(coef="equal"), TypeError, "coef"),
    ("weight int", lambda w, c, r, k: dict(weight=w.long()), TypeError, "weight"),
    ("weight not tensor", lambda w, c, r, k: dict(weight=w.tolist()), TypeError, "weight"),
    ("bad mode", lambda w, c, r, k: dict(mode="mean"), ValueError, "mode"),
    ("mode type", lambda w, c, r, k: dict(mode=1), TypeError, "mode"),
    ("stacked wrong rank", lambda w, c, r, k: dict(clients=torch.randn(2, 3, 5)), ValueError, "stacked"),
    ("stacked too small", lambda w, c, r, k: dict(clients=torch.randn(2, 2, 5, 3)), ValueError, "clients[0]"),
    ("device mismatch", lambda w, c, r, k: dict(clients=[c[0].to("meta"), c[1]]), ValueError, "clients[0]"),
]


@pytest.mark.parametrize("case", AGG_CASES, ids=[c[0] for c in AGG_CASES])
def test_reconstruct_aggregate_rejects(backend, agg_case, case):
    _, make, exc, fragment = case
    weight, clients, rows, cols = agg_case
    kwargs = dict(weight=weight, clients=clients, rows=rows, cols=cols, coef=None, mode="reconstruct")
    kwargs.update(make(weight, clients, rows, cols))
    before = _snapshot(*kwargs.values())
    with pytest.raises(exc) as info:
        cahfp_ops.reconstruct_aggregate(**kwargs)
    assert "reconstruct_aggregate" in str(info.value) and fragment in str(info.value)
    _unchanged(before, list(kwargs.values()))


def test_dtype_errors_are_both_type_and_value_errors(backend):
    with pytest.raises(TypeError):
        cahfp_ops.slice_channels(torch.arange(6).view(2, 3))
    with pytest.raises(ValueError):
        cahfp_ops.slice_channels(torch.arange(6).view(2, 3))
    with pytest.raises(DTypeError, match="rows"):
        cahfp_ops.slice_channels(torch.randn(4, 3), torch.tensor([0.0, 1.0]))


SLICE_CASES = [
    ("rows range", dict(rows=torch.tensor([0, 4])), ValueError, "rows"),
    ("cols descending", dict(cols=torch.tensor([2, 1])), ValueError, "cols"),
    ("cols on 1-D", dict(weight=torch.randn(4), cols=torch.tensor([0])), ValueError, "cols"),
    ("rows negative", dict(rows=torch.tensor([-1, 1])), ValueError, "rows"),
    ("per-client K mismatch", dict(rows=[None, None], cols=[None]), ValueError, "cols"),
    ("rows bool", dict(rows=torch.tensor([True, False])), TypeError, "rows"),
    ("rows a bool mask", dict(rows=torch.tensor([True, False, True, True])), TypeError,
     r"rows is a bool mask.*rows.nonzero\(\).flatten\(\)"),
    ("per-client bool mask", dict(rows=[torch.tensor([True, False, True, True])]), TypeError,
     r"rows\[0\] is a bool mask.*rows\[0\].nonzero"),
    ("rows unsorted", dict(rows=torch.tensor([2, 0])), ValueError, r"not strictly ascending \(sort it: keep.sort"),
    ("padded cols descending", dict(cols=torch.tensor([[0, 1], [2, 1]])), ValueError, r"cols\[1\]"),
    ("empty client list", dict(rows=[]), ValueError, r"rows is an empty list .*no clients"),
    ("empty client list of cols", dict(cols=[]), ValueError, r"cols is an empty list"),
]


@pytest.mark.parametrize("case", SLICE_CASES, ids=[c[0] for c in SLICE_CASES])
def test_slice_channels_rejects(backend, gen, case):
    _, kwargs, exc, fragment = case
    kwargs = {"weight": torch.randn(4, 3, generator=gen), **kwargs}
    before = _snapshot(*kwargs.values())
    with pytest.raises(exc, match=fragment):
        cahfp_ops.slice_channels(**kwargs)
    _unchanged(before, list(kwargs.values()))


TOPK_CASES = [
    ("keep zero", dict(keep=0), ValueError, r"keep\[0\]"),
    ("keep too big", dict(keep=[1, 2, 8]), ValueError, r"keep\[2\]"),
    ("keep count", dict(keep=[1, 2]), ValueError, "keep"),
    ("keep float", dict(keep=1.5), TypeError, "keep"),
    ("keep float tensor", dict(keep=torch.tensor([1.0, 2.0, 3.0])), TypeError, "keep"),
    ("keep bool", dict(keep=True), TypeError, "keep"),
    ("scores int", dict(scores=torch.ones(3, 7, dtype=torch.int64)), TypeError, "scores"),
    ("scores 3-D", dict(scores=torch.randn(2, 3, 7)), ValueError, "scores"),
    ("keep on meta", dict(keep=torch.tensor([1, 2, 3], device="meta")), ValueError, "keep is on the meta device"),
    ("no channels", dict(scores=torch.randn(0), keep=1), ValueError, r"scores has no channels \(shape \(0,\)\)"),
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_rejects(backend, gen, case):
    _, kwargs, exc, fragment = case
    kwargs = {"scores": torch.randn(3, 7, generator=gen), "keep": 2, **kwargs}
    before = _snapshot(*kwargs.values())
    with pytest.raises(exc, match=fragment):
        cahfp_ops.topk_channel_masks(**kwargs)
    _unchanged(before, list(kwargs.values()))


SCORE_CASES = [
    ("no terms", dict(grad=None, hess=None), ValueError, "both None"),
    ("shape mismatch", dict(grad=torch.randn(5, 4)), ValueError, "grad"),
    ("rank mismatch", dict(hess=torch.randn(2, 2, 4, 3)), ValueError, "hess"),
    ("client count mismatch", dict(grad=torch.randn(2, 4, 3), hess=torch.randn(3, 4, 3)), ValueError, "clients"),
    ("dim range", dict(dim=2), ValueError, "dim"),
    ("dim type", dict(dim=0.0), TypeError, "dim"),
    ("int grad", dict(grad=torch.ones(4, 3, dtype=torch.int32)), TypeError, "grad"),
    ("device", dict(grad=torch.randn(4, 3, device="meta")), ValueError, "grad"),
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_curvature_scores_rejects(backend, gen, case):
    _, kwargs, exc, fragment = case
    kwargs = {"weight": torch.randn(4, 3, generator=gen), "grad": torch.randn(4, 3, generator=gen), **kwargs}
    before = _snapshot(*kwargs.values())
    with pytest.raises(exc, match=fragment):
        cahfp_ops.curvature_scores(**kwargs)
    _unchanged(before, list(kwargs.values()))


def test_validation_switch(agg_case):
    """With validation off, value checks are skipped, but the compiled kernel still refuses
    out-of-range indices instead of reading out of bounds."""
    weight, clients, rows, cols = agg_case
    bad_rows = [rows[0], torch.tensor([1, 9])]
    assert cahfp_ops.validation_enabled()
    with cahfp_ops.validation(False):
        assert not cahfp_ops.validation_enabled()
        with cahfp_ops.use_backend("cpp"), pytest.raises(RuntimeError, match="rows"):
            cahfp_ops.reconstruct_aggregate(weight, clients, bad_rows, cols)
        # type errors are still raised
        with pytest.raises(TypeError):
            cahfp_ops.reconstruct_aggregate(weight.long(), clients, rows, cols)
        # well-formed input gives the same result
        fast = cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols)
    assert cahfp_ops.validation_enabled()
    assert torch.equal(fast, cahfp_ops.reconstruct_aggregate(weight, clients, rows, cols))


def test_validation_env(monkeypatch):
    monkeypatch.setenv("CAHFP_OPS_VALIDATE", "0")
    assert not cahfp_ops.validation_enabled()
    monkeypatch.setenv("CAHFP_OPS_VALIDATE", "1")
    assert cahfp_ops.validation_enabled()
    with pytest.raises(TypeError):
        cahfp_ops.set_validation("no")


# --------------------------------------------------------------------------- keep sets as Python lists
@pytest.mark.parametrize(
    "call",
    [
        lambda w, r: cahfp_ops.slice_channels(w, r),
        lambda w, r: cahfp_ops.reconstruct_aggregate(w, [w[:3]], r),
        lambda w, r: cahfp_ops.slice_channels_many([w], [r]),
        lambda w, r: cahfp_ops.reconstruct_aggregate_many([w], [[w[:3]]], [r]),
    ],
    ids=["slice", "aggregate", "slice_many", "aggregate_many"],
)
def test_flat_int_list_keep_set_says_what_to_pass(call):
    w = torch.randn(6, 4)
    before = w.clone()
    with pytest.raises(TypeError, match=r"rows is a flat list of ints; pass one keep set per client.*\[\[0, 2, 5\]\]"):
        call(w, [0, 2, 5])
    assert torch.equal(w, before)


def test_keep_sets_as_lists_of_ints_match_tensors(gen):
    w = torch.randn(7, 5, 3, generator=gen)
    rows = [[0, 3, 6], [2], []]
    cols = [[1, 4], [0, 1, 2, 3, 4], [2]]
    as_tensors = [torch.tensor(r, dtype=torch.int64) for r in rows], [torch.tensor(c) for c in cols]
    a = cahfp_ops.slice_channels(w, rows, cols)
    b = cahfp_ops.slice_channels(w, *as_tensors)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    clients = [t + 1 for t in b]
    agg_lists = cahfp_ops.reconstruct_aggregate(w, clients, rows, cols, coef=[1, 2, 3])
    agg_tensors = cahfp_ops.reconstruct_aggregate(w, clients, *as_tensors, coef=[1, 2, 3])
    assert torch.equal(agg_lists, agg_tensors)


@pytest.mark.parametrize("bad", [[[0, 1.5]], [[0, True]], [["0"]]])
def test_keep_set_list_with_non_ints_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"rows\[0\] must hold ints"):
        cahfp_ops.slice_channels(torch.randn(4, 3), bad)
