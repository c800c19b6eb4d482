"""Width-FL channel choices: static prefix submodels (HeteroFL) and rolling windows (FedRolex),
and their aggregation rules through the Server, checked against hand computations."""

import pytest
import torch
from torch import nn

from cahfp_ops.fl import PrefixImportance, RollingImportance, Server, make_importance


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


def hidden_keeps(server: Server, ratios: dict) -> dict:
    assigned = server.assign(ratios)
    return {c: a.keeps[next(iter(a.keeps))].tolist() for c, a in assigned.items()}


def test_prefix_submodels_nest_and_stay():
    server = Server(mlp(), torch.randn(2, 3), criterion=PrefixImportance(), warmup_rounds=0)
    for _ in range(3):
        keeps = hidden_keeps(server, {"a": 0.5, "b": 0.75, "c": 0.25})
        assert keeps == {"a": [0, 1, 2, 3], "b": [0, 1], "c": [0, 1, 2, 3, 4, 5]}
        server.aggregate({c: a.state for c, a in server.assignments.items()})


def test_rolling_windows_advance_one_channel_per_round_and_wrap():
    server = Server(mlp(), torch.randn(2, 3), criterion="rolling", warmup_rounds=0)
    assert isinstance(server.criterion, RollingImportance)
    seen = []
    for _ in range(9):
        seen.append(hidden_keeps(server, {"a": 0.5})["a"])
        server.aggregate({c: a.state for c, a in server.assignments.items()})
    assert seen[0] == [0, 1, 2, 3] and seen[1] == [1, 2, 3, 4] and seen[5] == [0, 5, 6, 7]
    assert seen[7] == [0, 1, 2, 7] and seen[8] == seen[0]  # 8 channels: back at the start after 8 rounds
    crit = RollingImportance(step=3)
    crit.load_state_dict(server.criterion.state_dict())
    assert crit.observed == server.criterion.observed
    with pytest.raises(ValueError, match="step"):
        RollingImportance(step=0)
    assert isinstance(make_importance("prefix"), PrefixImportance)


def test_heterofl_count_based_overlap_by_hand():
    """HeteroFL's combine: each entry is the plain mean over the clients that hold it (count
    based: weight 1 per client), the global value where none does."""
    server = Server(mlp(), torch.randn(2, 3), criterion=PrefixImportance(), mode="overlap", warmup_rounds=0)
    g = {k: v.clone() for k, v in server.state.items()}
    assigned = server.assign({"wide": 0.25, "narrow": 0.75})  # hidden units 0..5 and 0..1
    replies = {c: {k: torch.full_like(v, 1.0 if c == "wide" else 3.0) for k, v in a.state.items()}
               for c, a in assigned.items()}  # fmt: skip
    server.aggregate(replies, {"wide": 1.0, "narrow": 1.0})
    w0 = server.state["0.weight"]
    assert torch.equal(w0[:2], torch.full((2, 3), 2.0))  # both clients: (1 + 3) / 2
    assert torch.equal(w0[2:6], torch.full((4, 3), 1.0))  # the wide client alone
    assert torch.equal(w0[6:], g["0.weight"][6:])  # nobody: the global value
    w2 = server.state["2.weight"]  # (2, 8): columns follow the hidden units
    assert torch.equal(w2[:, :2], torch.full((2, 2), 2.0)) and torch.equal(w2[:, 6:], g["2.weight"][:, 6:])


def test_sample_weighted_overlap_by_hand():
    """FjORD's rule: each entry is the sample-weighted mean over the clients that trained it."""
    server = Server(mlp(), torch.randn(2, 3), criterion=PrefixImportance(), mode="overlap", warmup_rounds=0)
    assigned = server.assign({"wide": 0.25, "narrow": 0.75})
    replies = {c: {k: torch.full_like(v, 1.0 if c == "wide" else 3.0) for k, v in a.state.items()}
               for c, a in assigned.items()}  # fmt: skip
    server.aggregate(replies, {"wide": 30.0, "narrow": 10.0})
    w0 = server.state["0.weight"]
    assert torch.allclose(w0[:2], torch.full((2, 3), (30 * 1.0 + 10 * 3.0) / 40))
    assert torch.equal(w0[2:6], torch.full((4, 3), 1.0))
