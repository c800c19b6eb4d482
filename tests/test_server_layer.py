"""Streaming vs batch aggregation, curvature proxies and scores, mask assignment, the server
round object, faults and atomic save / restore."""

import pytest
import torch
import torch.nn.functional as F

import cahfp_ops
from cahfp_ops import curvature_scores
from cahfp_ops.fl import zoo
from cahfp_ops.fl.aggregate import StreamingAggregator, aggregate_state
from cahfp_ops.fl.importance import CurvatureTracker, group_scores, magnitude_scores
from cahfp_ops.fl.masks import assign_keep_sets, kept_count
from cahfp_ops.fl.server import Server
from helpers import fl_round_setup, retained_tensor_bytes, to_padded


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_streaming_matches_batch_and_merges(gen, mode):
    _, plan, keeps, sd, states = fl_round_setup(gen)
    weights = [5.0, 1.0, 0.0, 2.5]
    rows, cols = plan.tensor_keep_sets(keeps)
    batch = aggregate_state(sd, states, rows, cols, weights, mode)
    agg = StreamingAggregator(sd, mode)
    parts = [StreamingAggregator(sd, mode), StreamingAggregator(sd, mode)]
    for k, st in enumerate(states):
        r_k = {n: v[k] for n, v in rows.items()}
        c_k = {n: v[k] for n, v in cols.items()}
        agg.add(st, r_k, c_k, weights[k])
        parts[k % 2].add(st, r_k, c_k, weights[k])
    parts[0].merge(parts[1])
    single, merged = agg.result(), parts[0].result()
    for name, v in sd.items():
        if v.is_floating_point():
            torch.testing.assert_close(single[name], batch[name], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(merged[name], single[name], rtol=1e-6, atol=1e-6)  # float32 partials
        else:  # num_batches_tracked: the largest count any client reports
            counted = [int(s[name]) for s, w in zip(states, weights) if w > 0]
            assert int(single[name]) == int(batch[name]) == max(counted + [int(v)])
    again = StreamingAggregator(sd, mode)
    for k, st in enumerate(states):
        again.add(st, {n: v[k] for n, v in rows.items()}, {n: v[k] for n, v in cols.items()}, weights[k])
    for name in sd:
        assert torch.equal(again.result()[name], single[name])



def _keeps_of(rows, cols, k):
    return {n: v[k] for n, v in rows.items()}, {n: v[k] for n, v in cols.items()}


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
@pytest.mark.parametrize("path", ["keep sets", "layout"])
@pytest.mark.parametrize("clip", [False, True])
def test_add_many_equals_add_one_at_a_time_bit_for_bit(gen, mode, path, clip):
    """Windows of clients (sizes 3, 1, 4) give the Folds and the partial sums of add() on each
    client in order, bit for bit: with a non-finite client, an oversized one (rejected, or
    clipped), a weight-0 client, and a client whose data comes in another dtype."""
    from cahfp_ops.fl import Server

    net, plan, keeps, sd, _ = fl_round_setup(gen, K=8)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    server = Server(net, x, criterion="random")
    assigned = server.assign({c: 0.5 + 0.05 * c for c in range(8)})
    states = [dict(assigned[c].state) for c in range(8)]
    for k in range(8):  # trained replies: deltas of various sizes
        states[k] = {n: v + 0.01 * (k + 1) * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + k
                     for n, v in states[k].items()}  # fmt: skip
    name = next(n for n, v in states[2].items() if v.is_floating_point() and v.numel())
    states[2][name].view(-1)[0] = float("nan")
    states[5] = {n: v * 40 if v.is_floating_point() else v for n, v in states[5].items()}
    states[6] = {n: v.half() if v.is_floating_point() else v for n, v in states[6].items()}
    weights = [1.0, 2.0, 1.0, 0.0, 3.0, 1.0, 0.5, 2.0]
    rows, cols = server.plan.tensor_keep_sets([server.assignments[c].keeps for c in range(8)])
    base = dict(server.state)
    one, many = StreamingAggregator(base, mode), StreamingAggregator(base, mode)
    kw = dict(max_update=0.3, clip=clip)
    if path == "layout":
        slots = [server._slots[c] for c in range(8)]
        f_one = [one.add(states[k], weight=weights[k], layout=server.layout, client=slots[k], **kw) for k in range(8)]
        f_many = []
        for a, b in ((0, 3), (3, 4), (4, 8)):
            f_many += many.add_many(states[a:b], weights[a:b], layout=server.layout, clients=slots[a:b], **kw)
    else:
        f_one = [one.add(states[k], *_keeps_of(rows, cols, k), weights[k], **kw) for k in range(8)]
        f_many = []
        for a, b in ((0, 3), (3, 4), (4, 8)):
            ks = [_keeps_of(rows, cols, k) for k in range(a, b)]
            f_many += many.add_many(states[a:b], weights[a:b], [r for r, _ in ks], [c for _, c in ks], **kw)
    assert f_many == f_one
    assert not f_one[2].accepted and f_one[2].nonfinite
    assert f_one[5].accepted == clip and (f_one[5].clip_scale is not None) == clip
    assert one.count == many.count and one.weight_sum == many.weight_sum
    r_one, r_many = one.result(), many.result()
    for n in base:
        assert torch.equal(r_one[n], r_many[n]), n
        assert bool(torch.isfinite(r_many[n].float()).all()), n
    # the partial sums stay usable: another window (on the other buffer set) still matches
    if path == "layout":
        for k in (0, 1):
            one.add(states[k], weight=1.0, layout=server.layout, client=slots[k])
        many.add_many(states[:2], [1.0, 1.0], layout=server.layout, clients=slots[:2])
    else:
        for k in (0, 1):
            one.add(states[k], *_keeps_of(rows, cols, k), 1.0)
        ks = [_keeps_of(rows, cols, k) for k in (0, 1)]
        many.add_many(states[:2], [1.0, 1.0], [r for r, _ in ks], [c for _, c in ks])
    r_one, r_many = one.result(), many.result()
    assert all(torch.equal(r_one[n], r_many[n]) for n in base)

def test_add_many_takes_both_keep_set_forms_bit_for_bit(gen):
    """``{name: [K keep sets]}`` (the *_many ops' form, also padded) and ``[K x {name: keep}]``
    give the same folds and result; a list of keep sets says which forms it takes."""
    global_sd = {"a.weight": torch.randn(8, 5, generator=gen), "a.bias": torch.randn(8, generator=gen),
                 "b.weight": torch.randn(3, 8, generator=gen)}  # fmt: skip
    keep = [torch.tensor([0, 3, 4]), None, torch.arange(0, 8, 2)]
    by_name = {"a.weight": keep, "a.bias": to_padded(keep, 8)}, {"b.weight": keep}
    by_client = [{"a.weight": k, "a.bias": k} for k in keep], [{"b.weight": k} for k in keep]
    updates = [dict(m) for m in cahfp_ops.slice_channels_many(global_sd, *by_name)]
    results = []
    for rows, cols in (by_name, by_client):
        agg = StreamingAggregator(global_sd)
        folds = agg.add_many(updates, [1.0, 2.0, 3.0], rows, cols)
        assert [f.accepted for f in folds] == [True, True, True]
        results.append(agg.result())
    assert all(torch.equal(results[0][k], results[1][k]) for k in global_sd)
    with pytest.raises(TypeError, match=r"rows\[0\] is a Tensor; pass rows as one mapping per update.*\*_many"):
        StreamingAggregator(global_sd).add_many(updates, [1.0, 2.0, 3.0], keep, None)
    with pytest.raises(ValueError, match=r"rows\['a.weight'\] holds 2 keep sets for 3 updates"):
        StreamingAggregator(global_sd).add_many(updates, [1.0, 2.0, 3.0], {"a.weight": keep[:2]}, None)


def test_add_many_checks_its_arguments(gen):
    _, plan, keeps, sd, states = fl_round_setup(gen)
    agg = StreamingAggregator(sd)
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        agg.add_many(states[:2], [1.0])
    with pytest.raises(ValueError, match="weights must be finite numbers >= 0"):
        agg.add_many(states[:2], [1.0, -1.0])
    with pytest.raises(ValueError, match="pass layout and clients together"):
        agg.add_many(states[:2], [1.0, 1.0], clients=[0, 1])
    assert agg.add_many([], []) == [] and agg.count == 0


def _retained_after(agg_cls, sd, clients: int) -> tuple[int, bool]:
    """Tensor bytes an aggregator holds after ``clients`` updates, and whether it kept any update."""
    agg = agg_cls(sd)
    updates = [{k: v.clone() for k, v in sd.items()} for _ in range(clients)]  # alive: addresses stay unique
    for update in updates:
        agg.add(update, weight=1.0)
    held = {t.untyped_storage().data_ptr() for update in updates for t in update.values()}
    nbytes, ptrs = retained_tensor_bytes(agg)
    return nbytes, bool(ptrs & held)


def test_streaming_memory_is_per_model(gen):
    """What the aggregator holds does not grow with the clients and holds no update:
    the global state plus float32 sums and covers (float64 for float64 entries) and integer
    entries, O(model)."""
    _, _, _, sd, _ = fl_round_setup(gen)
    one, kept_one = _retained_after(StreamingAggregator, sd, 1)
    many, kept_many = _retained_after(StreamingAggregator, sd, 20)
    model = sum(v.untyped_storage().nbytes() for v in sd.values())
    def acc(v):
        return 8 if v.dtype == torch.float64 else 4

    sums = sum(acc(v) * (v.numel() + v.shape[:2].numel()) for v in sd.values() if v.is_floating_point())
    ints = sum(v.untyped_storage().nbytes() for v in sd.values() if not v.is_floating_point())
    assert one == many == model + sums + ints
    assert not kept_one and not kept_many



def test_windowed_streaming_memory_is_two_sets_of_partial_sums(gen):
    """add_many holds a second set of partial sums (to fold into), and nothing that grows
    with the clients or windows, and no update."""
    _, _, _, sd, _ = fl_round_setup(gen)
    model = sum(v.untyped_storage().nbytes() for v in sd.values())
    sums = sum((8 if v.dtype == torch.float64 else 4) * (v.numel() + v.shape[:2].numel())
               for v in sd.values() if v.is_floating_point())  # fmt: skip
    ints = sum(v.untyped_storage().nbytes() for v in sd.values() if not v.is_floating_point())
    held = []
    for windows in (1, 5):
        agg = StreamingAggregator(sd)
        updates = [[{k: v.clone() for k, v in sd.items()} for _ in range(3)] for _ in range(windows)]
        for window in updates:
            agg.add_many(window, [1.0] * len(window))
        ptrs = {t.untyped_storage().data_ptr() for w in updates for u in w for t in u.values()}
        nbytes, kept = retained_tensor_bytes(agg)
        assert not (kept & ptrs)
        held.append(nbytes)
    assert held[0] == held[1] == model + 2 * sums + ints

def test_streaming_memory_check_catches_a_hoarding_aggregator(gen):
    """The measurement above fails for an aggregator that keeps its updates."""

    class Hoarding(StreamingAggregator):
        def add(self, update, rows=None, cols=None, weight=1.0):
            self.kept = [*getattr(self, "kept", []), update]
            super().add(update, rows, cols, weight)

    _, _, _, sd, _ = fl_round_setup(gen)
    (one, _), (many, kept) = _retained_after(Hoarding, sd, 1), _retained_after(Hoarding, sd, 20)
    assert many > one and kept


def test_secant_and_fisher_proxies(gen):
    w = [{"p": torch.randn(5, 3, generator=gen)} for _ in range(4)]
    lr, steps = 0.1, 2
    sec, fis = CurvatureTracker("secant", beta=0.5), CurvatureTracker("fisher", beta=0.5)
    for st in w:
        sec.observe(st, lr, steps)
        fis.observe(st, lr, steps)
    g = [(w[t]["p"] - w[t + 1]["p"]) / (lr * steps) for t in range(3)]
    torch.testing.assert_close(sec.g["p"], g[2])
    h1 = (g[1] - g[0]).abs() / ((w[1]["p"] - w[0]["p"]).abs() + 1e-8)
    h2 = (g[2] - g[1]).abs() / ((w[2]["p"] - w[1]["p"]).abs() + 1e-8)
    torch.testing.assert_close(sec.h["p"], 0.5 * h1 + 0.5 * h2)
    torch.testing.assert_close(fis.h["p"], 0.25 * g[0] ** 2 + 0.25 * g[1] ** 2 + 0.5 * g[2] ** 2)


def test_group_scores_sum_members_and_blocks(gen):
    model, plan, _, sd, _ = fl_round_setup(gen)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in sd.items() if v.is_floating_point()}
    hess = {k: torch.rand(v.shape, generator=gen) for k, v in grads.items()}
    scores = group_scores(plan, sd, grads, hess)
    g = plan.group("conv2")
    manual = torch.zeros(g.size)
    for m in g.members:
        s = curvature_scores(sd[m.name], grads[m.name], hess[m.name], dim=m.dim)
        manual += s.reshape(g.size, m.block).sum(1)
    torch.testing.assert_close(scores["conv2"], manual)
    per_client = group_scores(plan, sd, {k: v.expand(3, *v.shape) for k, v in grads.items()}, hess)
    assert per_client["conv2"].shape == (3, g.size)
    torch.testing.assert_close(per_client["conv2"][1], manual)
    l1 = magnitude_scores(plan, sd, 1)["conv1"]
    torch.testing.assert_close(l1, sd["conv1.weight"].abs().sum((1, 2, 3)))


def test_assign_keep_sets_counts_and_order():
    from cahfp_ops.fl.plan import ChannelGroup, ChannelPlan, Member

    plan = ChannelPlan([ChannelGroup("a", 10, [Member("a.weight", 0)]), ChannelGroup("b", 4, [Member("b.weight", 0)])])
    scores = {"a": torch.arange(10.0), "b": torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]])}
    out = assign_keep_sets(plan, [0.5, {"b": 0.5}], scores)
    assert out[0]["a"].tolist() == [5, 6, 7, 8, 9] and out[0]["b"].tolist() == [1, 3]
    assert "a" not in out[1] and out[1]["b"].tolist() == [0, 3]
    with pytest.raises(ValueError, match="ratio"):
        assign_keep_sets(plan, [1.0], scores)


def test_keep_set_tables_match_the_per_client_keep_sets(gen):
    """``assign_keep_tables`` (one padded table per group, groups of one size in one top-k
    call) gives each client the keep sets ``assign_keep_sets`` does, row by row, and a layout
    built from the tables equals the one built from the per-client keep sets."""
    from cahfp_ops.fl.masks import assign_keep_tables, keep_sets_of_tables
    from cahfp_ops.fl.trace import trace_plan

    model = zoo.resnet20()
    plan = trace_plan(model, torch.randn(1, 3, 32, 32, generator=gen))
    K = 7
    scores = {g.name: torch.randn(K, g.size, generator=gen) if i % 2 else torch.randn(g.size, generator=gen)
              for i, g in enumerate(plan.groups)}  # fmt: skip
    first = plan.groups[0].name
    ratios = [0.5, 0.0, 0.75, {first: 0.3}, 0.9, 0.25, {}]
    per_client = assign_keep_sets(plan, ratios, scores)
    tables = assign_keep_tables(plan, ratios, scores)
    rows = keep_sets_of_tables(tables, ratios)
    for k in range(K):
        assert list(rows[k]) == list(per_client[k]) and len(rows[k]) == len(per_client[k])
        for g, keep in per_client[k].items():
            assert torch.equal(rows[k][g], keep) and g in rows[k]
            table_row = tables[g][k]
            assert torch.equal(table_row[table_row >= 0], keep)
    assert set(tables) == {g.name for g in plan.groups}  # client 0 prunes every group
    for g in plan.groups:  # unpruned clients' rows: every channel
        assert torch.equal(tables[g.name][1, : g.size], torch.arange(g.size))
    # the old one-call-per-group rule, by hand, for a per-client-scored group
    g = plan.groups[1]
    counts = [kept_count(r if isinstance(r, float) else r.get(g.name, 0.0), g.size) if
              (r if isinstance(r, float) else r.get(g.name, 0.0)) > 0 else g.size for r in ratios]  # fmt: skip
    for k, c in enumerate(counts):
        want = scores[g.name][k].topk(c).indices.sort().values
        assert torch.equal(tables[g.name][k, :c], want)
    state = model.state_dict()
    a, b = plan.layout(state, tables), plan.layout(state, per_client)
    assert torch.equal(a.row_inv, b.row_inv) and torch.equal(a.col_inv, b.col_inv)
    assert (a.counts_host == b.counts_host).all() and (a.offsets_host == b.offsets_host).all()
    with pytest.raises(ValueError, match="one K"):
        plan.layout(state, {first: tables[first], plan.groups[1].name: tables[plan.groups[1].name][:3]})


def _train_fn(x, y):
    def train(cid, model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, 10.0 + cid

    return train


@pytest.mark.parametrize("criterion", ["curvature", "l1", "l2", "random"])
def test_server_rounds(gen, criterion):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    server = Server(zoo.small_cnn(8), x[:2], criterion=criterion, warmup_rounds=1, local_steps=2)
    ratios = {0: 0.0, 1: 0.5, 2: 0.75}
    for _ in range(3):
        report = server.run_round(ratios, _train_fn(x, y))
        assert report.accepted == [0, 1, 2] and not report.rejected
    rec = report.clients
    assert rec[0].params_down == report.full_params > rec[1].params_down > rec[2].params_down
    assert rec[0].training_flops == report.full_training_flops > rec[2].training_flops
    assert rec[1].bytes_up == 4 * rec[1].params_up and all(r.status == "accepted" for r in rec.values())
    assert server.round == 3 and server.criterion.ready


def test_faults_are_rejected_and_round_goes_on(gen):
    x = torch.randn(16, 1, 8, 8, generator=gen)
    server = Server(zoo.small_cnn(8), x[:2])
    server.assign({c: 0.5 for c in range(6)})
    good = {
        c: {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in a.state.items()}
        for c, a in server.assignments.items()
    }
    bad = dict(good)
    bad[1] = {k: v for k, v in good[1].items() if k != "fc2.bias"}
    bad[2] = dict(good[2], **{"conv1.weight": torch.zeros(3, 3)})
    bad[3] = dict(good[3], **{"fc1.bias": torch.full_like(good[3]["fc1.bias"], float("nan"))})
    bad[4] = dict(good[4], extra=torch.zeros(1))
    bad[6] = dict(good[0], **{"bn1.num_batches_tracked": torch.tensor(1.5)})  # wrong dtype
    server.assignments[6] = server.assignments[0]
    del bad[5]  # dropped out
    before = {k: v.clone() for k, v in server.state.items()}
    report = server.aggregate(bad, {c: 1.0 for c in range(7)})
    assert report.accepted == [0] and report.absent == [5]
    assert "dtype" in report.rejected[6]
    assert "missing" in report.rejected[1] and "client 1" in report.rejected[1]
    assert "shape" in report.rejected[2] and "non-finite" in report.rejected[3] and "unknown" in report.rejected[4]
    assert not torch.equal(server.state["fc2.bias"], before["fc2.bias"])
    # a round where everyone fails leaves the model unchanged
    server.assign({0: 0.5})
    state = {k: v.clone() for k, v in server.state.items()}
    report = server.aggregate({0: {"nope": torch.zeros(1)}})
    assert report.accepted == [] and all(torch.equal(state[k], server.state[k]) for k in state)


def test_save_restore_gives_bit_identical_rounds(gen, tmp_path):
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    ratios = {0: 0.25, 1: 0.5, 2: 0.75}
    torch.manual_seed(0)
    a = Server(zoo.small_cnn(8), x[:2], criterion="random", seed=7)
    a.run_round(ratios, _train_fn(x, y))
    a.run_round(ratios, _train_fn(x, y))
    path = tmp_path / "server.pt"
    a.save(path)
    assert not list(tmp_path.glob(".*.cahfp-tmp"))  # no temporary file left behind
    b = Server(zoo.small_cnn(8), x[:2], criterion="random", seed=123)
    b.load(path)
    torch.manual_seed(1)  # the clients' own randomness (dropout) is not server state
    ra = a.run_round(ratios, _train_fn(x, y))
    torch.manual_seed(1)
    rb = b.run_round(ratios, _train_fn(x, y))
    assert ra.accepted == rb.accepted
    for c in ratios:
        for g in a.assignments[c].keeps:
            assert torch.equal(a.assignments[c].keeps[g], b.assignments[c].keeps[g])
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k


def test_personalized_scores_use_each_clients_update(gen):
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    torch.manual_seed(0)
    server = Server(zoo.small_cnn(8), x[:2], personalized=True, warmup_rounds=0, local_steps=2)
    ratios = {0: 0.5, 1: 0.5}
    for _ in range(3):
        server.run_round(ratios, _train_fn(x, y))
    assert set(server.criterion.client_grads) == {0, 1}
    # pseudo-gradients are zero exactly where the client pruned
    a = server.assignments[0]
    g = server.criterion.client_grads[0]["conv1.weight"]
    pruned = torch.ones(g.shape[0], dtype=torch.bool)
    pruned[a.keeps["conv1"]] = False
    assert not g[pruned].any()
    scores = server.scores([0, 1, 7])
    assert scores["conv1"].shape == (3, 16)
    assert not torch.equal(scores["conv1"][0], scores["conv1"][1])


def test_criterion_shorthands_and_instances(gen):
    from cahfp_ops.fl import CurvatureImportance, Importance, MagnitudeImportance, RandomImportance

    x = torch.randn(4, 1, 8, 8, generator=gen)
    expected = {"curvature": CurvatureImportance, "l1": MagnitudeImportance, "l2": MagnitudeImportance}
    expected["random"] = RandomImportance
    for name, cls in expected.items():
        server = Server(zoo.small_cnn(8), x[:2], criterion=name)
        assert isinstance(server.criterion, cls) and server.criterion.name == name
    fisher = CurvatureImportance("fisher", personalized=True)
    assert Server(zoo.small_cnn(8), x[:2], criterion=fisher).criterion is fisher
    with pytest.raises(ValueError, match="criterion"):
        Server(zoo.small_cnn(8), x[:2], criterion="l3")

    class Constant(Importance):
        """A user's own criterion: the highest channel indices win."""

        name = "constant"

        def scores(self, plan, state, clients, generator):
            return {g.name: torch.arange(g.size, dtype=torch.float32) for g in plan.groups}

    server = Server(zoo.small_cnn(8), x[:2], criterion=Constant(), warmup_rounds=0)
    keeps = server.assign({0: 0.5})[0].keeps
    for g in server.plan.groups:
        assert torch.equal(keeps[g.name], torch.arange(g.size - kept_count(0.5, g.size), g.size))


def test_magnitude_importance_scores_filter_norms(gen):
    from cahfp_ops.fl import MagnitudeImportance

    _, plan, _, sd, _ = fl_round_setup(gen)
    for p in (1, 2):
        scores = MagnitudeImportance(p).scores(plan, sd, [0, 1], gen)
        w = sd["conv1.weight"].flatten(1)
        torch.testing.assert_close(scores["conv1"], w.abs().sum(1) if p == 1 else w.pow(2).sum(1).sqrt())


def test_adopt_external_global_arrays(gen):
    x = torch.randn(4, 1, 8, 8, generator=gen)
    server = Server(zoo.small_cnn(8), x[:2], warmup_rounds=0)
    assert not server.adopt({k: v.clone() for k, v in server.state.items()})  # same values: nothing changes
    assert not server.criterion.ready
    new = {k: (v + 1 if v.is_floating_point() else v).double() for k, v in server.state.items()}
    assert server.adopt(new)
    assert all(server.state[k].dtype == v.dtype for k, v in zoo.small_cnn(8).state_dict().items())
    assert torch.equal(server.state["conv1.weight"], (new["conv1.weight"]).float())
    assert server.criterion.ready  # the curvature criterion saw the adopted model as the next one
    with pytest.raises(ValueError, match="missing"):
        server.adopt({k: v for k, v in server.state.items() if k != "fc1.bias"})
    with pytest.raises(ValueError, match="shape"):
        server.adopt({**server.state, "fc1.bias": torch.zeros(3)})


def test_round_report_has_one_record_per_client(gen):
    x = torch.randn(32, 1, 8, 8, generator=gen)
    server = Server(zoo.small_cnn(8), x[:2], criterion="random")
    server.assign({0: 0.0, 1: 0.5, 2: 0.5})
    replies = {0: dict(server.assignments[0].state), 1: {"junk": torch.zeros(1)}, 7: {}}
    report = server.aggregate(replies, {0: 3.0, 1: 1.0, 7: 1.0})
    assert list(report.clients) == [0, 1, 7, 2]
    assert [r.status for r in report.clients.values()] == ["accepted", "rejected", "rejected", "absent"]
    assert report.accepted == [0] and report.absent == [2] and set(report.rejected) == {1, 7}
    assert report.clients[0].weight == 3.0 and report.clients[1].params_up == 0
    assert report.clients[2].params_down == server.assignments[2].params > 0 and report.clients[7].params_down == 0
    report.reject(2, "node failed")
    assert report.rejected[2] == "node failed" and not report.absent


def test_streaming_server_windows_equal_one_reply_at_a_time(gen, monkeypatch):
    """The server's streaming round folds STREAM_WINDOW replies per kernel pass; the model and
    the report are those of folding one reply at a time, bit for bit."""
    from cahfp_ops.fl import server as server_module

    net, *_ = fl_round_setup(gen, K=6)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    outcomes = []
    for window in (1, 4, 64):
        monkeypatch.setattr(server_module, "STREAM_WINDOW", window)
        torch.manual_seed(0)
        server = Server(net, x, criterion="random", max_update=0.05)
        assigned = server.assign({c: 0.5 for c in range(6)})
        g = torch.Generator().manual_seed(1)
        replies = {c: {n: v + 0.01 * (c + 1) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                       for n, v in a.state.items()} for c, a in assigned.items()}  # fmt: skip
        replies[3] = {n: v * 100 if v.is_floating_point() else v for n, v in replies[3].items()}
        report = server.aggregate(replies, {c: float(c + 1) for c in range(6)}, streaming=True)
        outcomes.append((server.state, report.accepted, [report.clients[c].update_size for c in range(6)]))
    for state, accepted, sizes in outcomes[1:]:
        assert accepted == outcomes[0][1] and sizes == outcomes[0][2]
        assert all(torch.equal(state[n], outcomes[0][0][n]) for n in state)
    assert 3 not in outcomes[0][1]


def test_streaming_workspace_reuses_its_buffers_and_changes_nothing(gen):
    """Aggregators made one after the other on one Workspace fold into the same two sets of
    buffers (no new pages round after round) and give what an aggregator without one gives,
    whichever call comes first on the previous round's (unzeroed) buffers."""
    from cahfp_ops import Workspace

    _, plan, keeps, sd, states = fl_round_setup(gen)
    rows, cols = plan.tensor_keep_sets(keeps)
    ks = [_keeps_of(rows, cols, k) for k in range(len(states))]
    ws = Workspace()
    storages = []
    views_seen: dict = {}  # name -> the distinct sums / cover views an aggregator handed out (kept alive)
    for first in ("window", "one", "window", "partials"):
        with_ws, plain = StreamingAggregator(sd, workspace=ws), StreamingAggregator(sd)
        if first == "partials":
            assert all(not t.any() for t in with_ws.partials().sums.values())
        for agg in (with_ws, plain):
            if first == "one":
                agg.add(states[3], *ks[3], 1.5)
            agg.add_many(states[:3], [1.0, 2.0, 0.5], [r for r, _ in ks[:3]], [c for _, c in ks[:3]])
            if first != "one":
                agg.add(states[3], *ks[3], 1.5)
        a, b = with_ws.result(), plain.result()
        assert all(torch.equal(a[n], b[n]) for n in sd)
        flats = list(with_ws.partials().flats.values()) + list(with_ws._spare.values())
        storages.append(sorted(t.untyped_storage().data_ptr() for pair in flats for t in pair))
        p = with_ws.partials()
        for n in p.sums:
            seen = views_seen.setdefault(n, [])
            seen.extend(t for t in (p.sums[n], p.cover[n]) if not any(t is u for u in seen))
    assert all(s == storages[0] for s in storages)
    # the views are the workspace's, kept with its buffers: two sets (sums and cover each), not one per round
    assert all(len(seen) <= 4 for seen in views_seen.values())
