"""Whole-model ops: reconstruct_aggregate_many / slice_channels_many equal the per-tensor ops."""

import pytest
import torch

import cahfp_ops
from helpers import compact_models, make_keeps, random_model, random_plan, to_padded


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("K", [1, 4])
def test_aggregate_many_equals_per_tensor(backend, gen, mode, K):
    model = random_model(gen)
    model["bn1.running_var"] = model["bn1.running_var"].double()  # a second dtype group
    rows, cols = random_plan(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    coef = (torch.rand(K, generator=gen) + 0.2).tolist()
    out = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, coef, mode=mode)
    assert list(out) == list(model)
    for name, w in model.items():
        single = cahfp_ops.reconstruct_aggregate(
            w, [c[name] for c in clients], rows.get(name), cols.get(name), coef, mode=mode
        )
        assert out[name].dtype == w.dtype and out[name].shape == w.shape
        assert torch.equal(out[name], single), name


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_outputs_on_offset_buffers_equal_per_tensor(backend, gen, mode, monkeypatch):
    """Every output buffer made a view at a non-zero storage offset (as the huge-page buffers
    of large models are): the whole-model results, read through their views, still equal the
    per-tensor ops. (A view laid out from the base's start once returned wrong values.)"""
    from cahfp_ops import _hugepages

    monkeypatch.setattr(_hugepages, "_MIN_BYTES", 0)
    monkeypatch.setattr(_hugepages, "_madvise", lambda: (lambda *args: 0))
    probe = _hugepages.empty(10, torch.float32, "cpu", prefault=True)
    assert probe.storage_offset() > 0 or probe.data_ptr() % _hugepages._HUGE_PAGE == 0
    model = random_model(gen)
    K = 3
    rows, cols = random_plan(gen, K)
    compact = cahfp_ops.slice_channels_many(model, rows, cols)
    clients = [{n: t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in c.items()}
               for c in compact]  # fmt: skip
    coef = [0.5, 1.0, 2.0]
    for given in (clients, compact):
        out = cahfp_ops.reconstruct_aggregate_many(model, given, rows, cols, coef, mode=mode)
        for name, w in model.items():
            single = cahfp_ops.reconstruct_aggregate(
                w, [c[name] for c in given], rows.get(name), cols.get(name), coef, mode=mode
            )
            assert torch.equal(out[name], single), name
    for name, w in model.items():
        single = cahfp_ops.slice_channels(w, rows.get(name, [None] * K), cols.get(name) if w.dim() > 1 else None)
        for k in range(K):
            assert torch.equal(compact[k][name], single[k]), (name, k)


@pytest.mark.parametrize("uploads", ["float16", "mixed"])
def test_aggregate_many_low_precision_uploads_equal_per_tensor(backend, gen, uploads):
    """Clients uploading float16 into a float32 model (all of them, or some tensors of one
    client): whole-model results equal the per-tensor ops, which read uniform uploads as
    they are and cast mixed ones to the weight's dtype."""
    model = random_model(gen)
    K = 3
    rows, cols = random_plan(gen, K)
    clients = compact_models(gen, model, rows, cols, K)
    if uploads == "float16":
        clients = [{n: t.half() for n, t in c.items()} for c in clients]
    else:
        first = next(iter(model))
        clients[1] = dict(clients[1], **{first: clients[1][first].half()})
    out = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, [1.0, 2.0, 0.5])
    for name, w in model.items():
        given = [c[name] for c in clients]
        if uploads == "mixed":  # the whole-model call casts every upload of a mixed group
            given = [t.to(w.dtype) for t in given]
        single = cahfp_ops.reconstruct_aggregate(w, given, rows.get(name), cols.get(name), [1.0, 2.0, 0.5])
        assert out[name].dtype == w.dtype and torch.equal(out[name], single), name


def test_aggregate_many_list_form(backend, gen):
    model = random_model(gen)
    names = list(model)
    rows, cols = random_plan(gen, 3)
    clients = compact_models(gen, model, rows, cols, 3)
    out = cahfp_ops.reconstruct_aggregate_many(
        [model[n] for n in names],
        [[c[n] for n in names] for c in clients],
        [rows.get(n) for n in names],
        [cols.get(n) for n in names],
    )
    expected = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols)
    for n, t in zip(names, out):
        assert torch.equal(t, expected[n])


def test_slice_then_aggregate_many_returns_model(backend, gen):
    model = random_model(gen)
    rows, cols = random_plan(gen, 5)
    compact = cahfp_ops.slice_channels_many(model, rows, cols)
    assert len(compact) == 5 and list(compact[0]) == list(model)
    out = cahfp_ops.reconstruct_aggregate_many(model, compact, rows, cols, [1, 2, 3, 4, 5])
    for name, w in model.items():
        assert torch.equal(out[name], w), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slice_many_equals_per_tensor(backend, gen, dtype):
    model = random_model(gen, dtype)
    K = 4
    rows, cols = random_plan(gen, K)
    compact = cahfp_ops.slice_channels_many(model, rows, cols)
    for name, w in model.items():
        single = cahfp_ops.slice_channels(w, rows.get(name, [None] * K), cols.get(name) if w.dim() > 1 else None)
        for k in range(K):
            assert torch.equal(compact[k][name], single[k]), (name, k)
    # client k's tensors are one contiguous run of the packed buffer, in order
    for k in range(K):
        filled = [t for t in compact[k].values() if t.numel()]
        ptrs = [t.data_ptr() for t in filled]
        sizes = [t.numel() * t.element_size() for t in filled]
        for a, b, s in zip(ptrs, ptrs[1:], sizes):
            assert b == a + s


def test_slice_many_needs_clients(backend, gen):
    with pytest.raises(ValueError, match="number of clients"):
        cahfp_ops.slice_channels_many([torch.randn(3, 2)])
    parts = cahfp_ops.slice_channels_many([torch.randn(3, 2)], num_clients=2)
    assert len(parts) == 2 and parts[0][0].shape == (3, 2)


def test_many_bad_input(backend, gen):
    model = random_model(gen)
    rows, cols = random_plan(gen, 2)
    clients = compact_models(gen, model, rows, cols, 2)
    del clients[1]["fc.bias"]
    with pytest.raises(ValueError, match=r"clients\[1\] has no tensor 'fc.bias'"):
        cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols)
    clients = compact_models(gen, model, rows, cols, 2)
    clients[0]["conv2.weight"] = clients[0]["conv2.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"clients\[0\] for 'conv2.weight'"):
        cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols)
    with pytest.raises(TypeError, match="mapping"):
        cahfp_ops.reconstruct_aggregate_many(model, clients, [None] * len(model))
    with pytest.raises(ValueError, match="non-empty"):
        cahfp_ops.reconstruct_aggregate_many(model, [])


def test_many_ops_opcheck_and_compile(backend, gen):
    model = random_model(gen)
    rows, cols = random_plan(gen, 3)
    clients = compact_models(gen, model, rows, cols, 3)
    with cahfp_ops.validation(False):
        eager = cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, [1.0, 2.0, 3.0])
        compiled = torch.compile(
            lambda m, c: cahfp_ops.reconstruct_aggregate_many(m, c, rows, cols, [1.0, 2.0, 3.0]),
            fullgraph=True,
            backend="aot_eager",
        )(model, clients)
    for name in model:
        assert torch.equal(eager[name], compiled[name])
    w = [torch.randn(5, 4, 3, generator=gen), torch.randn(7, generator=gen)]
    r = [to_padded(make_keeps(gen, 5, 2, "random"), 5), to_padded(make_keeps(gen, 7, 2, "random"), 7)]
    c = [to_padded(make_keeps(gen, 4, 2, "random"), 4), torch.zeros(2, 1, dtype=torch.int64)]
    cl = []
    for n in range(2):
        for k in range(2):
            nr, nc = int((r[n][k] >= 0).sum()), int((c[n][k] >= 0).sum())
            cl.append(torch.randn((nr, nc, 3) if n == 0 else (nr, 1), generator=gen))
    coef = torch.tensor([0.25, 0.75], dtype=torch.float64)
    torch.library.opcheck(torch.ops.cahfp.reconstruct_aggregate_many, (w, cl, r, c, coef, "reconstruct"))
    rc = [int((x >= 0).sum()) for n in range(2) for x in r[n]]
    cc = [int((x >= 0).sum()) for n in range(2) for x in c[n]]
    torch.library.opcheck(torch.ops.cahfp.slice_channels_many, (w, r, c, rc, cc))


def test_slice_many_counts_clients_from_every_entry(backend, gen):
    """K = 1 given only by a padded (1, m) keep set in one dtype group and a one-element list
    in another, next to shared keep sets: each backend works out K = 1."""
    w = {"a": torch.randn(5, 4, generator=gen), "b": torch.randn(6, 5, generator=gen).double(),
         "c": torch.randn(6, 3, generator=gen).double()}  # fmt: skip
    rows = {"a": [torch.tensor([0, 2])], "b": torch.tensor([[1, 3, -1]]), "c": torch.tensor([0, 5])}
    cols = {"a": torch.tensor([1, 3])}
    out = cahfp_ops.slice_channels_many(w, rows, cols)
    assert len(out) == 1
    assert torch.equal(out[0]["a"], w["a"][[0, 2]][:, [1, 3]])
    assert torch.equal(out[0]["b"], w["b"][[1, 3]]) and torch.equal(out[0]["c"], w["c"][[0, 5]])


@pytest.mark.parametrize("where", ["rows", "cols"])
def test_many_unknown_names_raise(backend, gen, where):
    """A typo in a keep-set mapping would leave one tensor whole and slice its neighbours."""
    model = random_model(gen)
    rows, cols = random_plan(gen, 2)
    clients = compact_models(gen, model, rows, cols, 2)
    bad = dict(rows if where == "rows" else cols)
    bad["fc.weigth"] = next(iter(bad.values()))
    args = {"rows": rows, "cols": cols, where: bad}
    snapshot = {k: v.clone() for k, v in model.items()}
    with pytest.raises(ValueError, match=rf"{where} names 1 tensor\(s\) that weights does not hold: 'fc.weigth'"):
        cahfp_ops.slice_channels_many(model, **args)
    with pytest.raises(ValueError, match=rf"{where} names 1 tensor\(s\).*'fc.weigth'"):
        cahfp_ops.reconstruct_aggregate_many(model, clients, **args)
    with pytest.raises(ValueError, match="fc.weigth"):
        cahfp_ops.reconstruct_aggregate_many(model, clients, **args, reduce="median")
    assert all(torch.equal(model[k], snapshot[k]) for k in model)


def _bn_model_state(gen) -> tuple[dict, dict, dict]:
    """A whole state_dict (num_batches_tracked included) and keep sets for 3 clients."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 4, 1))  # fmt: skip
    model.train()(torch.randn(2, 3, 5, 5))  # num_batches_tracked = 1, running stats moved
    keep = [torch.tensor([0, 2, 5]), None, torch.tensor([4])]
    rows = {n: keep for n in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var")}
    return model.state_dict(), rows, {"3.weight": keep}


@pytest.mark.parametrize("reduce", ["mean", "median"])
def test_whole_state_dict_integer_entries_are_copied_and_the_largest_reported(backend, gen, reduce):
    sd, rows, cols = _bn_model_state(gen)
    snapshot = {k: v.clone() for k, v in sd.items()}
    compact = cahfp_ops.slice_channels_many(sd, rows, cols)
    order = [k for k in sd if k != "1.num_batches_tracked"] + ["1.num_batches_tracked"]  # the packed ones first
    assert [list(m) for m in compact] == [order] * 3
    for m in compact:  # a copy each, not the global tensor
        assert m["1.num_batches_tracked"].item() == 1
        assert m["1.num_batches_tracked"].data_ptr() != sd["1.num_batches_tracked"].data_ptr()
    replies = [{k: v + 0.5 if v.is_floating_point() else v + 10 * (j + 1) for k, v in m.items()}
               for j, m in enumerate(compact)]  # fmt: skip
    coef = [1.0, 2.0, 0.0]  # client 2 (the largest count) has weight 0: not counted
    new = cahfp_ops.reconstruct_aggregate_many(sd, replies, rows, cols, coef, reduce=reduce)
    assert list(new) == list(sd) and new["1.num_batches_tracked"].item() == 21
    floats = {k: v for k, v in sd.items() if v.is_floating_point()}
    alone = cahfp_ops.reconstruct_aggregate_many(floats, [{k: r[k] for k in floats} for r in replies], rows, cols,
                                                 coef, reduce=reduce)  # fmt: skip
    assert all(torch.equal(new[k], alone[k]) for k in floats)
    assert all(torch.equal(sd[k], snapshot[k]) for k in sd)
    torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                        torch.nn.Conv2d(6, 4, 1)).load_state_dict(new)  # fmt: skip


def test_whole_state_dict_bad_integer_entries(backend, gen):
    sd, rows, cols = _bn_model_state(gen)
    replies = [dict(m) for m in cahfp_ops.slice_channels_many(sd, rows, cols)]
    with pytest.raises(ValueError, match=r"rows gives keep sets for '1.num_batches_tracked'.*drop it from rows"):
        cahfp_ops.slice_channels_many(sd, {**rows, "1.num_batches_tracked": rows["0.bias"]}, cols)
    bad = [dict(r) for r in replies]
    bad[1]["1.num_batches_tracked"] = torch.tensor(3.0)
    with pytest.raises(TypeError, match=r"clients\[1\]\['1.num_batches_tracked'\] must be an integer or bool tensor"):
        cahfp_ops.reconstruct_aggregate_many(sd, bad, rows, cols)
    del bad[1]["1.num_batches_tracked"]
    with pytest.raises(ValueError, match=r"clients\[1\] has no entry '1.num_batches_tracked'"):
        cahfp_ops.reconstruct_aggregate_many(sd, bad, rows, cols)
    bad[1]["1.num_batches_tracked"] = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"clients\[1\]\['1.num_batches_tracked'\] has shape \(2,\)"):
        cahfp_ops.reconstruct_aggregate_many(sd, bad, rows, cols)
