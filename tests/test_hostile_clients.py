"""The server under faulty and hostile clients (SPEC, server section): every bad reply is
rejected with a reason naming the client, the round goes on, the global model stays finite
and equals, bit for bit, the aggregation of the accepted replies alone."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from cahfp_ops.fl import zoo
from cahfp_ops.fl.server import Server

K = 5


def _server(gen, **kw) -> Server:
    x = torch.randn(2, 1, 8, 8, generator=gen)
    server = Server(zoo.small_cnn(8), x, criterion="random", **kw)
    server.assign({c: 0.5 for c in range(K)})
    return server


def _replies(server: Server, gen, scale: float = 0.01) -> dict:
    return {
        c: {n: t + scale * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t.clone()
            for n, t in a.state.items()}
        for c, a in server.assignments.items()
    }  # fmt: skip


def _filled(reply: dict, value: float, dtype=None) -> dict:
    return {
        n: torch.full_like(t, value, dtype=dtype or t.dtype) if t.is_floating_point() else t for n, t in reply.items()
    }


def _finite(server: Server) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in server.state.values() if v.is_floating_point())


def _same_state(a: Server, b: Server) -> bool:
    return all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def _check_equals_accepted_alone(server: Server, twin: Server, replies: dict, weights, report, streaming) -> None:
    """``twin`` (a copy of ``server`` before the round) aggregating only the accepted replies
    (with their weights) reaches the same model, bit for bit."""
    kept = {c: replies[c] for c in report.accepted}
    w = None if weights is None else {c: weights[c] for c in report.accepted}
    twin.aggregate(kept, w, streaming=streaming)
    assert _same_state(server, twin)


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_weights_are_rejected_per_client(gen, streaming):
    server = _server(gen)
    replies = _replies(server, gen)
    weights = {0: 3.0, 1: math.inf, 2: float("nan"), 3: None, 4: "12"}
    extra = {5: True, 6: -1.0, 7: np.int64(4), 8: torch.tensor(2.0), 9: torch.ones(2)}
    server.assign({c: 0.5 for c in range(10)})
    replies = _replies(server, gen)
    weights.update(extra)
    del weights[4]  # missing
    twin = copy.deepcopy(server)
    report = server.aggregate(replies, weights, streaming=streaming)
    assert report.accepted == [0, 7, 8]
    reasons = report.rejected
    assert set(reasons) == {1, 2, 3, 4, 5, 6, 9}
    assert "inf" in reasons[1] and "nan" in reasons[2] and "NoneType" in reasons[3] and "no weight" in reasons[4]
    assert "bool" in reasons[5] and "-1.0" in reasons[6] and "one real number" in reasons[9]
    assert all(f"client {c}" in r for c, r in reasons.items())
    assert report.clients[7].weight == 4.0 and report.clients[8].weight == 2.0
    assert _finite(server)
    _check_equals_accepted_alone(server, twin, replies, weights, report, streaming)


@pytest.mark.parametrize("streaming", [False, True])
def test_huge_weights_are_scaled_not_overflowed(gen, streaming):
    server = _server(gen)
    replies = _replies(server, gen)
    twin = copy.deepcopy(server)
    server.aggregate(replies, {c: 1e308 for c in range(K)}, streaming=streaming)
    twin.aggregate(replies, {c: 1.0 for c in range(K)}, streaming=streaming)
    assert _finite(server) and _same_state(server, twin)


@pytest.mark.parametrize("streaming", [False, True])
def test_values_that_overflow_the_global_dtype_are_rejected(gen, streaming):
    """1e300 in a float64 reply is finite in float64 but not in the float32 model."""
    server = _server(gen)
    replies = _replies(server, gen)
    replies[1] = _filled(replies[1], 1e300, torch.float64)
    twin = copy.deepcopy(server)
    report = server.aggregate(replies, streaming=streaming)
    assert list(report.rejected) == [1] and "non-finite" in report.rejected[1]
    assert _finite(server)
    _check_equals_accepted_alone(server, twin, replies, None, report, streaming)


@pytest.mark.parametrize("streaming", [False, True])
def test_alternating_extreme_replies_never_make_the_model_non_finite(gen, streaming):
    """3e38 one round, -3e38 the next: the second delta overflows float32 and is rejected."""
    x = torch.randn(2, 1, 8, 8, generator=gen)
    server = Server(zoo.small_cnn(8), x, criterion="random")
    rejected = []
    for sign in (1, -1, 1, -1):
        server.assign({0: 0.5})
        report = server.aggregate({0: _filled(server.assignments[0].state, sign * 3e38)}, streaming=streaming)
        rejected.append(bool(report.rejected))
        assert _finite(server)
    assert rejected[0] is False and rejected[1] is True


@pytest.mark.parametrize("streaming", [False, True])
def test_meta_and_malformed_tensors_are_rejected(gen, streaming):
    server = _server(gen)
    replies = _replies(server, gen)
    replies[2] = {n: t.to("meta") if t.is_floating_point() else t for n, t in replies[2].items()}
    name = next(n for n, t in replies[3].items() if t.is_floating_point())
    replies[3] = dict(replies[3], **{name: replies[3][name].to(torch.complex64)})
    replies[4] = "not a state_dict"
    twin = copy.deepcopy(server)
    report = server.aggregate(replies, streaming=streaming)
    assert "meta" in report.rejected[2] and "complex64" in report.rejected[3] and "str" in report.rejected[4]
    assert report.accepted == [0, 1]
    _check_equals_accepted_alone(server, twin, replies, None, report, streaming)


def test_a_round_takes_replies_once(gen):
    server = _server(gen)
    replies = _replies(server, gen)
    server.aggregate(replies)
    state = copy.deepcopy(server.state)
    report = server.aggregate(replies)
    assert report.accepted == [] and all("late" in r for r in report.rejected.values())
    assert _same_state(server, type("S", (), {"state": state})()) and server.round == 1
    assert not report.absent  # no round is open: nobody is expected


def test_duplicates_first_well_formed_reply_counts(gen):
    server = _server(gen)
    replies = _replies(server, gen)
    other = _replies(server, gen)
    broken = _filled(replies[1], float("nan"))
    stream = [(0, replies[0]), (1, broken), (0, other[0]), (1, replies[1], 2.0), (2, replies[2]),
              (3, replies[3]), (4, replies[4]), (1, other[1]), (9, replies[0])]  # fmt: skip
    twin = copy.deepcopy(server)
    report = server.aggregate(stream, {c: 1.0 for c in range(K)})
    assert report.accepted == [0, 1, 2, 3, 4] and report.rejected == {9: "client 9 was not assigned in round 0"}
    assert report.clients[1].weight == 2.0  # its own weight, from its counted reply
    dup = [(d.client, d.reason) for d in report.duplicates]
    assert [c for c, _ in dup] == [0, 1, 1]
    assert "already replied" in dup[0][1] and "non-finite" in dup[1][1] and "already replied" in dup[2][1]
    twin.aggregate({c: replies[c] for c in range(K)}, {0: 1.0, 1: 2.0, 2: 1.0, 3: 1.0, 4: 1.0})
    assert _same_state(server, twin)


def test_round_tags_refuse_late_and_untagged_replies(gen):
    server = _server(gen)
    replies = _replies(server, gen)
    assert all(a.round == 0 for a in server.assignments.values())
    tags = {0: 0, 1: 0, 2: -1, 3: 1}  # 4: untagged
    report = server.aggregate(replies, rounds=tags)
    assert report.accepted == [0, 1]
    assert "round -1" in report.rejected[2] and "round 1" in report.rejected[3] and "no round tag" in report.rejected[4]


@pytest.mark.parametrize("streaming", [False, True])
def test_clip_scales_an_oversized_delta_to_the_bound(gen, streaming):
    server = _server(gen, bound_action="clip", max_update=0.05)
    replies = _replies(server, gen, scale=0.01)  # RMS ~0.01: under the absolute bound
    replies[3] = _replies(server, gen, scale=100.0)[3]  # RMS ~100: clipped
    report = server.aggregate(replies, streaming=streaming)
    assert report.accepted == list(range(K)) and list(report.clipped) == [3]
    assert report.update_bound == 0.05
    rec = report.clients[3]
    assert rec.update_size > 50 and rec.clip_scale == pytest.approx(0.05 / rec.update_size)
    assert _finite(server)
    max_change = max(float((server.state[n] - v).abs().max()) for n, v in _server(gen).state.items()
                     if v.is_floating_point())  # fmt: skip
    assert max_change < 1.0  # without clipping client 3 moves entries by ~100 / K


def test_clipped_reply_equals_its_hand_scaled_version(gen):
    """Clipping is exactly ``g + s (c - g)`` on the kept entries, then plain aggregation."""
    server = _server(gen, bound_action="clip", update_bound=None, max_update=0.5)
    replies = _replies(server, gen, scale=3.0)
    twin = copy.deepcopy(server)
    twin.max_update = None
    report = server.aggregate(replies)
    assert list(report.clipped) == list(range(K))
    scaled = {}
    for c, reply in replies.items():
        s = report.clients[c].clip_scale
        g = twin.assignments[c].state
        scaled[c] = {n: (g[n] + s * (t - g[n])) if t.is_floating_point() else t for n, t in reply.items()}
    twin.aggregate(scaled)
    for n, v in server.state.items():
        torch.testing.assert_close(v, twin.state[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_absolute_bound_applies_with_a_single_client(gen, action):
    """The relative bound needs 3 clients; the absolute one (DP-style) always applies."""
    x = torch.randn(2, 1, 8, 8, generator=gen)
    server = Server(zoo.small_cnn(8), x, criterion="random", max_update=0.1, bound_action=action)
    server.assign({0: 0.5})
    report = server.aggregate({0: _replies(server, gen, scale=10.0)[0]})
    assert report.update_bound == 0.1 and report.update_median is not None
    if action == "reject":
        assert "exceeds the bound" in report.rejected[0]
    else:
        assert report.accepted == [0] and report.clients[0].clip_scale < 0.02


def test_report_shows_sizes_median_and_bound(gen):
    server = _server(gen)
    replies = _replies(server, gen)
    replies[4] = _replies(server, gen, scale=1.0)[4]
    report = server.aggregate(replies)
    sizes = [report.clients[c].update_size for c in range(K)]
    assert report.update_median == pytest.approx(float(np.median(sizes)))
    assert report.update_bound == pytest.approx(10 * report.update_median)
    assert list(report.rejected) == [4] and "exceeds the bound" in report.rejected[4]


def test_server_settings_are_checked():
    model, x = zoo.small_cnn(8), torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="bound_action"):
        Server(model, x, bound_action="drop")
    with pytest.raises(ValueError, match="max_update"):
        Server(model, x, max_update=-1.0)


@pytest.mark.parametrize("reduce", ["median", "trimmed_mean"])
def test_robust_reducer_for_a_round(gen, reduce):
    """A round with reduce=...: bad replies still rejected, the accepted ones combined by the
    robust reducer exactly as the op combines them; streaming refuses it."""
    import cahfp_ops

    server = _server(gen, reduce=reduce, trim=0.2)
    replies = _replies(server, gen)
    replies[2] = _filled(replies[2], float("nan"))
    before = {n: v.clone() for n, v in server.state.items()}
    keeps = {c: server.assignments[c].keeps for c in server.assignments}
    with pytest.raises(ValueError, match="streaming"):
        server.aggregate(replies, streaming=True)
    report = server.aggregate(replies, {c: float(c + 1) for c in range(K)})
    assert report.accepted == [0, 1, 3, 4] and report.reduce == reduce
    rows, cols = server.plan.tensor_keep_sets([keeps[c] for c in report.accepted])
    floats = {n: v for n, v in before.items() if v.is_floating_point()}
    expected = cahfp_ops.reconstruct_aggregate_many(
        floats, [{n: replies[c][n] for n in floats} for c in report.accepted],
        {n: r for n, r in rows.items() if n in floats}, {n: c for n, c in cols.items() if n in floats},
        [float(c + 1) for c in report.accepted], reduce=reduce, trim=0.2,
    )  # fmt: skip
    for n in floats:
        assert torch.equal(server.state[n], expected[n])


@pytest.mark.parametrize("streaming", [False, True])
def test_packed_replies_with_malformed_integer_entries_are_rejected(gen, streaming):
    """A packed reply (one buffer plus its integer scalars) whose scalars are the wrong shape,
    kind or device is rejected, not read: it once aborted the round in the integer rule."""
    from cahfp_ops import PackedModel, PackedScalars

    server = _server(gen)
    assigned = server.assignments
    assert isinstance(assigned[0].state.extras, PackedScalars)

    def packed(c, extras):
        s = assigned[c].state
        buf = s.buffer + 0.01 * torch.randn(s.buffer.shape, generator=gen)
        return PackedModel(buf, s.layout, s.client, s.names, extras=extras)

    ex = assigned[1].state.extras
    name = ex.names[0]
    replies = {
        0: packed(0, PackedScalars(ex.names, ex.values + 3)),  # well formed
        1: packed(1, {**{n: ex[n] for n in ex}, name: torch.zeros(1000, dtype=torch.int64)}),  # wrong shape
        2: packed(2, PackedScalars(ex.names, ex.values.double())),  # floating where integers belong
        3: packed(3, {**{n: ex[n] for n in ex}, name: torch.tensor(1, device="meta")}),  # no data
        4: packed(4, PackedScalars(ex.names, ex.values.clone())),
    }
    twin = copy.deepcopy(server)
    report = server.aggregate(replies, streaming=streaming)
    assert report.accepted == [0, 4]
    assert "(1000,)" in report.rejected[1] and "float64" in report.rejected[2] and "meta" in report.rejected[3]
    assert int(server.state[name]) == int(ex.values[0]) + 3  # the integer rule: the largest accepted value
    _check_equals_accepted_alone(server, twin, replies, None, report, streaming)


def _tampered_packed_replies(server: Server, gen) -> dict:
    """Clients 0 and 8 well formed; 1-6 a PackedModel whose buffer was replaced; 7 a dict
    reply with a tensor one row too many."""
    from cahfp_ops import PackedModel

    replies = {}
    for c, a in server.assignments.items():
        s = a.state
        buf = s.buffer + 0.01 * torch.randn(s.buffer.shape, generator=gen)
        replies[c] = PackedModel(buf, s.layout, s.client, s.names, extras=s.extras)
    n = replies[1].buffer.numel()
    replies[1].buffer = replies[1].buffer[:-1].clone()  # one element short
    replies[2].buffer = torch.cat([replies[2].buffer, replies[2].buffer[:1]])  # one too long
    replies[3].buffer = replies[3].buffer[:0]  # empty
    replies[4].buffer = replies[4].buffer.view(1, n)  # reshaped
    replies[5].buffer = replies[5].buffer.long()  # integer
    replies[6].buffer = torch.empty(n, device="meta")  # no data
    d = dict(replies[7].items())
    name = next(k for k, v in d.items() if v.is_floating_point() and v.dim() >= 2)
    d[name] = torch.cat([d[name], d[name][:1]])
    replies[7] = d
    return replies


@pytest.mark.parametrize("streaming", [False, True])
def test_packed_replies_with_a_replaced_buffer_are_rejected_not_read(gen, streaming):
    """A reply whose packed buffer is one short, one long, empty, 2-D, integer or on the meta
    device (and a dict reply with an extra row) is rejected with a reason; the round goes on
    and equals, bit for bit, the round without those clients."""
    server = _server(gen)
    server.assign({c: 0.5 for c in range(9)})
    replies = _tampered_packed_replies(server, gen)
    twin = copy.deepcopy(server)
    report = server.aggregate(replies, streaming=streaming)
    assert report.accepted == [0, 8]
    assert set(report.rejected) == set(range(1, 8))
    assert all(f"client {c}" in report.rejected[c] for c in report.rejected)
    assert "int64" in report.rejected[5] and "meta" in report.rejected[6]
    assert "shape" in report.rejected[4] and "shape" in report.rejected[7]
    assert _finite(server)
    _check_equals_accepted_alone(server, twin, replies, None, report, streaming)


def test_add_many_rejects_malformed_updates_with_a_fold(gen):
    """StreamingAggregator.add_many on the layout path: a short buffer and a wrong-shaped dict
    tensor come back as rejected Folds with a reason; the partial sums equal add_many on the
    well-formed updates alone, bit for bit."""
    from cahfp_ops.fl.aggregate import StreamingAggregator

    server = _server(gen)
    server.assign({c: 0.5 for c in range(9)})
    replies = _tampered_packed_replies(server, gen)
    slots = [server._slots[c] for c in range(9)]
    base = dict(server.state)
    agg, alone = StreamingAggregator(base), StreamingAggregator(base)
    folds = agg.add_many(list(replies.values()), [1.0] * 9, layout=server.layout, clients=slots)
    assert [f.accepted for f in folds] == [True] + [False] * 7 + [True]
    assert all(f.reason.startswith("malformed") and math.isnan(f.update_size) for f in folds[1:8])
    alone.add_many([replies[0], replies[8]], [1.0, 1.0], layout=server.layout, clients=[slots[0], slots[8]])
    assert agg.count == alone.count == 2
    a, b = agg.result(), alone.result()
    assert all(torch.equal(a[n], b[n]) for n in base)
