"""The models users bring (``model_suite.SUITE``): every one traces with the defaults, gives a
compact model whose forward has the full model's output shape, runs a ``Server`` round with
full shapes back, and keeps about what Torch-Pruning keeps at ratio 0.5. Models beyond the
rules (``model_extras``) never crash: what cannot be pruned is left whole with a reason."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from model_extras import EXTRAS, DataDependent
from model_suite import SUITE
from torch import nn

from cahfp_ops.fl import ChannelGroup, ChannelPlan, Member, Server, build_compact, count_params, extract, trace_plan
from cahfp_ops.fl.masks import kept_count

NORM_FREE_OR_BN = ["resnet18", "resnet50", "resnext", "mobilenet_v2", "densenet", "inception", "text_cnn", "lstm",
                   "unet"]  # fmt: skip


def _plan(name: str):
    make, inp, _ = SUITE[name]
    torch.manual_seed(0)
    model, x = make().eval(), inp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "prunes little" warning for any of them
        plan = trace_plan(model, x)
    return model, x, plan


def _keeps(plan: ChannelPlan, ratio: float, gen: torch.Generator) -> dict:
    return {g.name: torch.randperm(g.size, generator=gen)[: kept_count(ratio, g.size)].sort().values
            for g in plan.groups}  # fmt: skip


@pytest.mark.parametrize("name", list(SUITE))
def test_model_traces_compacts_and_runs_a_server_round(name, gen):
    model, x, plan = _plan(name)
    assert plan.groups, plan.frozen
    with torch.no_grad():
        full = model(x)
    compact = build_compact(model, extract(model.state_dict(), plan, [_keeps(plan, 0.5, gen)])[0]).eval()
    with torch.no_grad():
        out = compact(x)
    assert out.shape == full.shape and torch.isfinite(out).all()
    assert count_params(compact) < count_params(model)

    server = Server(model, x, criterion="l1", seed=1)

    def train(cid, net):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        loss = net(x).float().square().mean()
        loss.backward()
        opt.step()
        return {k: v.detach() for k, v in net.state_dict().items()}, 1.0

    report = server.run_round({0: 0.5, 1: 0.25, 2: 0.0}, train)
    assert sorted(report.accepted) == [0, 1, 2], report
    for k, v in model.state_dict().items():
        assert server.state[k].shape == v.shape, k
        if v.is_floating_point():
            assert torch.isfinite(server.state[k]).all(), k
    with torch.no_grad():
        assert server.global_model().eval()(x).shape == full.shape


def _zero_pruned(model: nn.Module, plan: ChannelPlan, keeps: dict) -> nn.Module:
    """The full model with every pruned channel's producing entries zeroed (running_var 1)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    # Embeddings and transposed convs make their channels on dim 1 of their weight
    on_dim1 = {f"{n}.weight" for n, m in modules.items() if isinstance(m, (nn.Embedding, nn.ConvTranspose2d))}
    for g in plan.groups:
        mask = torch.ones(g.size, dtype=torch.bool)
        mask[keeps[g.name]] = False
        pruned = mask.nonzero().flatten()
        for m in g.members:
            producing = m.dim == (1 if m.name in on_dim1 else 0)
            if producing and m.name in sd:
                idx = g.expand(pruned, m)
                sd[m.name].index_fill_(m.dim, idx, 1.0 if m.name.endswith("running_var") else 0.0)
    full = copy.deepcopy(model)
    full.load_state_dict(sd)
    return full


@pytest.mark.parametrize("name", NORM_FREE_OR_BN)
def test_compact_model_computes_what_the_zeroed_full_model_computes(name, gen):
    """Every member is the right slice: the compact forward equals the full model with the pruned
    channels zeroed (models whose norms do not mix channels)."""
    model, x, plan = _plan(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
    keeps = _keeps(plan, 0.5, gen)
    compact = build_compact(model, extract(model.state_dict(), plan, [keeps])[0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), _zero_pruned(model, plan, keeps).eval()(x), rtol=1e-4, atol=1e-4)


def _torch_pruning_share(name: str) -> float | None:
    """The parameter share Torch-Pruning 1.6.1 keeps at ratio 0.5 (None where it fails)."""
    tp = pytest.importorskip("torch_pruning")
    make, inp, last = SUITE[name]
    torch.manual_seed(0)
    model = make().eval()
    before = count_params(model)
    try:
        pruner = tp.pruner.MetaPruner(model, inp(), importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=last(model))  # fmt: skip
        pruner.step()
        with torch.no_grad():
            model(inp())
    except Exception:  # Torch-Pruning cannot prune this model
        return None
    return count_params(model) / before


@pytest.mark.parametrize("name", list(SUITE))
def test_kept_share_at_half_against_torch_pruning(name, gen):
    """At ratio 0.5 a model keeps at most Torch-Pruning's share + 10 points (or 30 %, whichever is
    more) where Torch-Pruning runs, and at most 60 % where it does not."""
    model, x, plan = _plan(name)
    ours = count_params(build_compact(model, extract(model.state_dict(), plan, [_keeps(plan, 0.5, gen)])[0]))
    ours /= count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _torch_pruning_share(name)
    bound = 0.60 if theirs is None else max(theirs + 0.10, 0.30)
    assert ours <= bound, f"{name}: keeps {ours:.3f}, Torch-Pruning {theirs}, bound {bound:.3f}"


def test_models_beyond_the_rules_run_and_say_why():
    for name, (make, inp) in EXTRAS.items():
        torch.manual_seed(0)
        model, x = make().eval(), inp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            plan = trace_plan(model, x)
        keeps = {g.name: torch.arange(0, g.size, 2) for g in plan.groups}
        compact = build_compact(model, extract(model.state_dict(), plan, [keeps])[0]).eval()
        with torch.no_grad():
            assert compact(x).shape == model(x).shape, name
        assert plan.frozen and all(isinstance(why, str) and why for why in plan.frozen.values()), name
    vit = trace_plan(EXTRAS["timm_vit"][0](), EXTRAS["timm_vit"][1](), warn=False)
    assert "on dim 2" in vit.frozen["embed"] and "'cls'" in vit.frozen["embed"]
    assert "computed value" in vit.frozen["qkv"]  # reshape(B, N, 3, heads, C // heads)
    unusual = EXTRAS["unusual"]
    with pytest.warns(UserWarning, match="prunes no channel group.*biggest layers left whole"):
        plan = trace_plan(unusual[0](), unusual[1]())
    assert "no affine parameters" in plan.frozen["c3"]
    with pytest.raises(ValueError, match="strict=True"):
        trace_plan(unusual[0](), unusual[1](), strict=True)


def test_untraceable_control_flow_names_the_module_and_the_way_out():
    with pytest.raises(ValueError, match=r"cannot trace .*control flow.*ChannelPlan"):
        trace_plan(DataDependent(), torch.randn(1, 3, 8, 8))


def test_a_plan_that_breaks_the_compact_model_is_narrowed_not_raised():
    """A group whose pruning the compact model cannot run (here: a hard-coded width in forward)
    is left whole with the error; the rest of the plan stays."""

    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return self.fc(y.view(y.shape[0], 8, -1).mean(-1))  # 8: hard-coded

    plan = trace_plan(HardCoded(), torch.randn(2, 3, 9, 9), warn=False)
    assert [g.name for g in plan.groups] == ["a"]
    assert "breaks the compact model" in plan.frozen["b"]


def test_group_norm_and_layer_norm_follow_the_plan(gen):
    """GroupNorm prunes whole groups (its num_groups follows), LayerNorm's normalized_shape and
    a depthwise conv's groups follow the kept channels, at ratios that do not divide evenly."""
    model, x, plan = _plan("gn_resnet")
    for ratio in (0.3, 0.6):
        compact = build_compact(model, extract(model.state_dict(), plan, [_keeps(plan, ratio, gen)])[0]).eval()
        with torch.no_grad():
            assert compact(x).shape == (2, 10)
        originals = dict(model.named_modules())
        for n, m in compact.named_modules():
            if isinstance(m, nn.GroupNorm):  # whole groups: as many channels per group as before
                before = originals[n]
                assert m.weight.shape[0] == m.num_channels == m.num_groups * (before.num_channels // before.num_groups)
    model, x, plan = _plan("convnext")
    compact = build_compact(model, extract(model.state_dict(), plan, [_keeps(plan, 0.6, gen)])[0]).eval()
    block = compact.blocks[0]
    assert block.norm.normalized_shape == (block.dw.out_channels,) and block.dw.groups == block.dw.out_channels


def test_hand_declared_plan_is_checked_when_built():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    hidden = ChannelGroup("hidden", 8, [Member("0.weight", 0), Member("0.bias", 0), Member("2.weight", 1)])
    plan = ChannelPlan([hidden], state=model.state_dict())
    assert plan.kept_share(0.5, model.state_dict()) < 1.0
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        ChannelPlan([ChannelGroup("hidden", 7, hidden.members)], state=model.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        ChannelPlan([ChannelGroup("hidden", 8, [Member("0.weight", 0, offset=6, channels=4)])])
