"""One server pipeline: the same hostile round through every path the server takes (batch or
streaming, packed or named replies, a model of one floating dtype or several, mean or a robust
reducer) gives the same decisions, and on each path the new model is the aggregation of the
accepted (clipped) replies alone."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cahfp_ops import PackedModel
from cahfp_ops.fl.server import Server

K = 7
WEIGHTS = {0: 30, 1: 10, 2: 20, 3: 25, 4: 5, 5: 40, 6: 15}


class Mixed(nn.Module):
    """Two floating dtypes: a float32 conv stack, a float64 classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 4).double()

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)).double())


class Plain(Mixed):
    """The same model in one dtype."""

    def __init__(self):
        super().__init__()
        self.fc = self.fc.float()

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def _server(model_cls, **kw) -> Server:
    torch.manual_seed(0)
    server = Server(model_cls(), torch.randn(2, 1, 6, 6), criterion="random", seed=3, update_bound=None,
                    max_update=0.5, **kw)  # fmt: skip
    server.assign({c: (0.0, 0.25, 0.5, 0.75)[c % 4] for c in range(K)})
    return server


def _hostile_round(server: Server, packed: bool, gen) -> tuple[list, dict]:
    """Replies in arrival order: good ones, one with a NaN, one far over the bound, one malformed
    (a tensor missing), a duplicate of a good one, one with a negative weight."""
    replies = []
    for c, a in server.assignments.items():
        noisy = {n: t + 0.01 * torch.randn(t.shape, generator=gen).to(t.dtype) if t.is_floating_point()
                 else t + c for n, t in a.state.items()}  # fmt: skip
        replies.append([c, noisy])
    first = next(n for n, t in replies[1][1].items() if t.is_floating_point())
    replies[1][1][first] = replies[1][1][first].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    replies[2][1] = {n: t * 40 if t.is_floating_point() else t for n, t in replies[2][1].items()}  # over the bound
    del replies[4][1][first]  # malformed
    if packed:
        for item in replies:
            a = server.assignments[item[0]].state
            if isinstance(a, PackedModel) and first in item[1]:
                buffer = torch.cat([item[1][n].reshape(-1) for n in a.names])
                item[1] = PackedModel(buffer, a.layout, a.client, a.names, extras={n: item[1][n] for n in a.extras})
    arrivals = [(c, r, WEIGHTS[c]) for c, r in replies]
    arrivals.append((0, arrivals[0][1], 30))  # a duplicate: rejected
    arrivals[6] = (6, arrivals[6][1], -1.0)  # a bad weight: rejected
    return arrivals, {c: r for c, r, _ in arrivals}


def _run(model_cls, streaming: bool, packed: bool, reduce: str = "mean", action: str = "reject"):
    server = _server(model_cls, reduce=reduce, bound_action=action)
    twin = copy.deepcopy(server)
    arrivals, by_client = _hostile_round(server, packed, torch.Generator().manual_seed(11))
    report = server.aggregate(arrivals, streaming=streaming)
    decisions = {c: r.status for c, r in report.clients.items()}
    reasons = {c: re.sub(r"[0-9.]+", "#", r.reason) for c, r in report.clients.items() if r.reason}
    clipped = set(report.clipped)
    # the same round with the accepted (clipped) replies alone: the same model, bit for bit
    alone = {}
    for c in report.accepted:
        reply = by_client[c]
        scale = report.clients[c].clip_scale
        if scale is not None:
            g = dict(twin.assignments[c].state)
            reply = {n: (g[n].float() + scale * (reply[n].float() - g[n].float())).to(g[n].dtype)
                     if t.is_floating_point() else t for n, t in dict(reply).items()}  # fmt: skip
        alone[c] = reply
    twin_report = twin.aggregate({c: alone[c] for c in alone}, {c: WEIGHTS[c] for c in alone}, streaming=streaming)
    if not clipped:
        assert sorted(twin_report.accepted) == sorted(report.accepted)
        assert all(torch.equal(server.state[k], twin.state[k]) for k in server.state)
    assert all(torch.isfinite(v).all() for v in server.state.values() if v.is_floating_point())
    return decisions, reasons, clipped, server.state


PATHS = [(cls, streaming, packed) for cls in (Plain, Mixed) for streaming in (False, True) for packed in (False, True)
         if not (packed and cls is Mixed)]  # fmt: skip  (a model of several dtypes travels as named tensors)


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_one_hostile_round_through_every_path(action):
    results = {(cls.__name__, s, p): _run(cls, s, p, action=action) for cls, s, p in PATHS}
    first = next(iter(results.values()))
    for key, (decisions, reasons, clipped, _state) in results.items():
        assert decisions == first[0], key
        assert reasons == first[1], key
        assert clipped == first[2], key
    expected = {0: "accepted", 1: "rejected", 2: "rejected" if action == "reject" else "accepted", 3: "accepted",
                4: "rejected", 5: "accepted", 6: "rejected"}  # fmt: skip
    assert first[0] == expected
    assert "non-finite values" in first[1][1] and ">= #" in first[1][6] and "is missing" in first[1][4]
    if action == "clip":
        assert first[2] == {2}
    # one dtype: every path reaches the same model (float32 rounding between batch and streaming)
    plain = [state for (name, *_), (*_, state) in results.items() if name == "Plain"]
    mixed = [state for (name, *_), (*_, state) in results.items() if name == "Mixed"]
    for group in (plain, mixed):
        for state in group[1:]:
            for k, v in state.items():
                torch.testing.assert_close(v, group[0][k], rtol=1e-5, atol=1e-6)
    for k, v in mixed[0].items():  # several dtypes: the same decisions and the same floats
        torch.testing.assert_close(v.to(plain[0][k].dtype), plain[0][k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_cls", [Plain, Mixed])
@pytest.mark.parametrize("reduce", ["median", "trimmed_mean"])
def test_robust_reducers_apply_the_same_checks(model_cls, reduce):
    decisions, reasons, clipped, state = _run(model_cls, streaming=False, packed=False, reduce=reduce)
    mean = _run(model_cls, streaming=False, packed=False)
    assert decisions == mean[0] and reasons == mean[1]
    assert any(not torch.equal(state[k], mean[3][k]) for k in state if state[k].is_floating_point())
    with pytest.raises(ValueError, match="streaming aggregation supports reduce='mean' only"):
        _run(model_cls, streaming=True, packed=False, reduce=reduce)


def test_several_dtypes_get_the_relative_bound_too():
    """The relative update bound (10 x the round's median) applies to a model of several dtypes."""
    torch.manual_seed(0)
    server = Server(Mixed(), torch.randn(2, 1, 6, 6), criterion="random", seed=3)
    server.assign({c: 0.5 for c in range(5)})
    gen = torch.Generator().manual_seed(5)
    replies = {c: {n: t + (100.0 if c == 4 else 0.01) * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                   if t.is_floating_point() else t for n, t in a.state.items()}
               for c, a in server.assignments.items()}  # fmt: skip
    report = server.aggregate(replies)
    assert report.rejected.keys() == {4} and "exceeds the bound" in report.rejected[4]
    assert math.isfinite(report.update_bound)
