"""Channel plans (tracing), compact models, and parameter / FLOP counts."""

import pytest
import torch
from torch import nn

from cahfp_ops.fl import zoo
from cahfp_ops.fl.aggregate import aggregate_state
from cahfp_ops.fl.compact import build_compact, count_flops, count_params, extract
from cahfp_ops.fl.masks import kept_count
from cahfp_ops.fl.plan import ChannelGroup, ChannelPlan, Member
from cahfp_ops.fl.trace import trace_plan

CASES = {
    "vgg11": (lambda: zoo.vgg11(), (2, 3, 32, 32), 8),
    "vgg16": (lambda: zoo.vgg16(), (2, 3, 32, 32), 13),
    "resnet20": (lambda: zoo.resnet20(), (2, 3, 32, 32), 9),
    "resnet32": (lambda: zoo.resnet32(), (2, 3, 32, 32), 15),
    "resnet56": (lambda: zoo.resnet56(), (2, 3, 32, 32), 27),
    "small_cnn8": (lambda: zoo.small_cnn(8), (2, 1, 8, 8), 3),
    "small_cnn28": (lambda: zoo.small_cnn(28), (2, 1, 28, 28), 3),
    "mlp8": (lambda: zoo.mlp(8), (2, 1, 8, 8), 2),
    "mlp28": (lambda: zoo.mlp(28), (2, 1, 28, 28), 2),
}


def random_keeps(plan, gen, ratio):
    return {
        g.name: torch.randperm(g.size, generator=gen)[: kept_count(ratio, g.size)].sort().values for g in plan.groups
    }


def zero_pruned(model, plan, keeps):
    """The full model with every pruned channel's producer rows, bias and norm zeroed."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for g in plan.groups:
        pruned = torch.ones(g.size, dtype=torch.bool)
        pruned[keeps[g.name]] = False
        for m in g.members:
            if m.dim == 0:
                sd[m.name][pruned] = 1.0 if m.name.endswith("running_var") else 0.0
    full = build_compact(model, sd)
    return full


@pytest.mark.parametrize("name", list(CASES))
def test_plan_and_compact_forward_equivalence(name, gen):
    make, shape, n_groups = CASES[name]
    torch.manual_seed(0)
    model = make()
    for m in model.modules():  # non-trivial norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(shape, generator=gen)
    plan = trace_plan(model, x)
    assert len(plan.groups) == n_groups, plan
    keeps = random_keeps(plan, gen, 0.5)
    compact_state = extract(model.state_dict(), plan, [keeps])[0]
    compact = build_compact(model, compact_state).eval()
    assert count_params(compact) < count_params(model)
    assert count_flops(compact, x)["macs"] < count_flops(model, x)["macs"]
    with torch.no_grad():
        expected = zero_pruned(model, plan, keeps).eval()(x)
        got = compact(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_slice_then_aggregate_returns_global_model(gen, mode):
    model = zoo.resnet20()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    plan = trace_plan(model, x)
    keeps = [random_keeps(plan, gen, r) for r in (0.25, 0.5, 0.75)]
    sd = model.state_dict()
    states = extract(sd, plan, keeps)
    rows, cols = plan.tensor_keep_sets(keeps)
    new = aggregate_state(sd, states, rows, cols, [3.0, 2.0, 1.0], mode)
    for k, v in sd.items():
        if mode == "reconstruct" or not v.is_floating_point():
            assert torch.equal(new[k], v), k
        else:
            torch.testing.assert_close(new[k], v)


def test_hand_counts_mlp():
    model = zoo.MLP(64, (128, 64), 10)
    x = torch.randn(2, 64)
    assert count_params(model) == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert count_flops(model, x) == {"macs": 17024, "forward_flops": 34048, "training_flops": 102144}
    plan = trace_plan(model, x)
    keeps = {g.name: torch.arange(g.size // 2) for g in plan.groups}
    compact = build_compact(model, extract(model.state_dict(), plan, [keeps])[0])
    assert count_params(compact) == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert count_flops(compact, x)["macs"] == 64 * 64 + 64 * 32 + 32 * 10


def test_hand_counts_small_cnn():
    model = zoo.small_cnn(8)  # conv 1->16 on 8x8, conv 16->32 on 4x4, fc 128->64, fc 64->10
    x = torch.randn(1, 1, 8, 8)
    assert count_flops(model, x)["macs"] == 64 * 16 * 9 + 16 * 32 * 16 * 9 + 128 * 64 + 64 * 10
    plan = trace_plan(model, x)
    fc1_in = [m for m in plan.group("conv2").members if m.name == "fc1.weight"][0]
    assert fc1_in.dim == 1 and fc1_in.block == 4  # 2x2 spatial positions per conv2 channel
    keeps = {"conv1": torch.arange(8), "conv2": torch.tensor([0, 5, 9]), "fc1": torch.arange(10)}
    compact = build_compact(model, extract(model.state_dict(), plan, [keeps])[0])
    assert compact.fc1.weight.shape == (10, 12)
    assert count_flops(compact, x)["macs"] == 64 * 8 * 9 + 8 * 3 * 16 * 9 + 12 * 10 + 10 * 10


def test_residual_modes():
    model = zoo.resnet20()
    x = torch.randn(2, 3, 32, 32)
    internal = trace_plan(model, x, residual="internal")
    assert all(g.name.endswith(".conv1") for g in internal.groups)
    assert "conv1" in internal.frozen and "fc" in internal.frozen
    tied = trace_plan(model, x)  # the default
    # option-A shortcuts zero-pad the stream's channels between stages: every stream stays whole
    assert [g.name for g in tied.groups] == [g.name for g in internal.groups]
    assert any("padding" in why for why in tied.frozen.values())

    class Identity(nn.Module):  # identity shortcuts: the stream is one tied group
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.Conv2d(8, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(h + self.a(h))
            h = torch.relu(h + self.b(h))
            return self.fc(torch.flatten(self.pool(h), 1))

    small = Identity().eval()
    with pytest.warns(UserWarning, match="prunes no channel group"):
        assert trace_plan(small, x, residual="internal").groups == []  # everything reaches an addition
    tied_small = trace_plan(small, x, residual="tie")
    assert [(g.name, g.size) for g in tied_small.groups] == [("stem", 8)]
    names = {m.name for m in tied_small.groups[0].members}
    assert names == {"stem.weight", "stem.bias", "a.weight", "a.bias", "b.weight", "b.bias", "fc.weight"}
    keeps = {"stem": torch.tensor([0, 2, 3, 7])}
    compact = build_compact(small, extract(small.state_dict(), tied_small, [keeps])[0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), zero_pruned(small, tied_small, keeps)(x), rtol=1e-5, atol=1e-5)


def test_unsupported_op_names_module():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.cumsum(self.conv(x), 1).mean((2, 3)))

    plan = trace_plan(Odd(), torch.randn(1, 3, 8, 8), warn=False)  # never raises by default
    assert "cumsum" in plan.frozen["conv"]
    with pytest.raises(ValueError, match="cumsum"):
        trace_plan(Odd(), torch.randn(1, 3, 8, 8), strict=True)


def test_explicit_plan():
    model = zoo.mlp(8)
    plan = ChannelPlan(
        [ChannelGroup("hidden", 128, [Member("net.1.weight", 0), Member("net.1.bias", 0), Member("net.3.weight", 1)])]
    )
    plan.check(model.state_dict())
    with pytest.raises(ValueError, match="net.3.weight"):
        ChannelPlan([ChannelGroup("bad", 100, [Member("net.3.weight", 1)])]).check(model.state_dict())
    with pytest.raises(ValueError, match="two groups"):
        ChannelPlan([ChannelGroup("a", 1), ChannelGroup("a", 1)])


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("make", [lambda: zoo.resnet20(), lambda: zoo.vgg11()])
def test_tracing_and_server_leave_the_model_as_given(make):
    """Shape propagation runs on a copy: BatchNorm running stats, num_batches_tracked and the
    train/eval flags of the caller's model stay bit for bit as they were."""
    from cahfp_ops.fl import Server

    torch.manual_seed(0)
    model = make().train()
    model.features[1].eval() if hasattr(model, "features") else model.bn1.eval()  # a mixed-mode model
    x = torch.randn(4, 3, 32, 32)
    state, flags = _snapshot(model)
    trace_plan(model, x)
    Server(model, x, criterion="l1")
    after_state, after_flags = _snapshot(model)
    assert after_flags == flags
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], state[k]) for k in state)


def test_tracing_check_catches_a_train_mode_forward():
    """The check above fails for a train-mode forward like the one tracing used to run."""
    model = zoo.resnet20().train()
    state, _ = _snapshot(model)
    model(torch.randn(4, 3, 32, 32))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert len(changed) == 57


def test_batch_of_one_with_batchnorm1d():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.bn(self.fc1(x))))

    from cahfp_ops.fl import Server

    model = Head().train()
    plan = trace_plan(model, torch.randn(1, 6))
    assert [g.name for g in plan.groups] == ["fc1"]
    assert {m.name for m in plan.groups[0].members} >= {"bn.running_mean", "fc2.weight"}
    server = Server(model, torch.randn(1, 6), criterion="random")
    assert server.assign({0: 0.5})[0].state["fc1.weight"].shape == (4, 6)


def test_tensor_keep_sets_share_one_list_per_group():
    """Members of a group with the same block get the same list object (the ops canonicalise it once)."""
    model = zoo.vgg11()
    plan = trace_plan(model, torch.randn(1, 3, 32, 32))
    g = plan.groups[0]
    keeps = [{g.name: torch.tensor([0, 5])}, {}]
    rows, cols = plan.tensor_keep_sets(keeps)
    lists = [rows[m.name] if m.dim == 0 else cols[m.name] for m in g.members]
    assert len(lists) >= 6 and all(x is lists[0] for x in lists)
    assert torch.equal(lists[0][0], torch.tensor([0, 5])) and lists[0][1] is None
