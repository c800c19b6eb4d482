"""Channel plans: the prunable channel groups of a model and everything each channel couples.

A :class:`ChannelGroup` is C channels that are kept or pruned together. Its members are the
state_dict entries holding them: the producing Conv/Linear's output rows (dim 0) and bias, the
following BatchNorm's weight, bias and running stats, and every consumer's input columns (dim 1;
a Linear after ``flatten`` consumes ``block`` = H*W consecutive columns per channel).

:func:`trace_plan` finds the groups with ``torch.fx``; :class:`ChannelPlan` can also be declared
by hand for models tracing cannot handle. A plan turns per-group keep sets into per-tensor row
and column keep sets for ``slice_channels_many`` / ``reconstruct_aggregate_many``.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cahfp_ops import RoundLayout

RESIDUAL_MODES = ("internal", "tie")


@dataclass(frozen=True)
class Member:
    """One state_dict entry of a group: channel c owns indices ``[c*block, (c+1)*block)`` of ``dim``."""

    name: str
    dim: int
    block: int = 1


@dataclass
class ChannelGroup:
    """``size`` channels kept or pruned together; ``members`` hold them."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)

    def expand(self, keep: Tensor, member: Member) -> Tensor:
        """The member's kept indices along its dim for channel keep set ``keep``."""
        if member.block == 1:
            return keep
        offs = torch.arange(member.block, device=keep.device)
        return (keep.unsqueeze(1) * member.block + offs).flatten()


class ChannelPlan:
    """The prunable channel groups of a model (see module docs)."""

    def __init__(self, groups: Sequence[ChannelGroup], frozen: Mapping[str, str] | None = None):
        self.groups = list(groups)
        self.frozen = dict(frozen or {})  # producer -> why its channels stay whole
        seen: dict[tuple[str, int], str] = {}
        names = set()
        for g in self.groups:
            if g.name in names:
                raise ValueError(f"channel plan: two groups are named {g.name!r}")
            names.add(g.name)
            for m in g.members:
                if m.dim not in (0, 1):
                    raise ValueError(f"channel plan: member {m.name!r} of {g.name!r} has dim {m.dim}; use 0 or 1")
                key = (m.name, m.dim)
                if key in seen:
                    raise ValueError(f"channel plan: {m.name!r} dim {m.dim} is in groups {seen[key]!r} and {g.name!r}")
                seen[key] = g.name

    def __repr__(self) -> str:
        return f"ChannelPlan({len(self.groups)} groups: {', '.join(f'{g.name}[{g.size}]' for g in self.groups)})"

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def check(self, state_dict: Mapping[str, Tensor]) -> None:
        """Every member exists in ``state_dict`` with ``size * block`` entries along its dim."""
        for g in self.groups:
            for m in g.members:
                if m.name not in state_dict:
                    raise ValueError(f"channel plan: group {g.name!r} names {m.name!r}, which the model lacks")
                t = state_dict[m.name]
                if t.dim() <= m.dim or t.shape[m.dim] != g.size * m.block:
                    raise ValueError(
                        f"channel plan: {m.name!r} has shape {tuple(t.shape)}; group {g.name!r} needs "
                        f"{g.size} x {m.block} entries along dim {m.dim}"
                    )

    def tensor_keep_sets(
        self, group_keeps: Sequence[Mapping[str, Tensor | None]]
    ) -> tuple[dict[str, list[Tensor | None]], dict[str, list[Tensor | None]]]:
        """Per-client group keep sets -> (rows, cols): tensor name -> K keep sets (None: all).

        ``group_keeps[k][group]``: client k's kept channels of ``group`` (ascending int64), or
        missing / None for all channels. The result feeds ``slice_channels_many`` and
        ``reconstruct_aggregate_many``. Members of a group with the same block share one list
        object (the ops canonicalise it once): treat the lists as read-only.
        """
        K = len(group_keeps)
        rows: dict[str, list] = {}
        cols: dict[str, list] = {}
        for g in self.groups:
            keeps = [gk.get(g.name) for gk in group_keeps]
            if all(k is None for k in keeps):
                continue
            # One list per block size, shared by the group's members: the whole-model ops
            # canonicalise a shared keep-set object once per call.
            by_block: dict[int, list] = {}
            for m in g.members:
                if m.block not in by_block:
                    by_block[m.block] = [None if keeps[k] is None else g.expand(keeps[k], m) for k in range(K)]
                target = rows if m.dim == 0 else cols
                target[m.name] = by_block[m.block]
        return rows, cols

    def layout(
        self,
        state: Mapping[str, Tensor],
        group_keeps: Sequence[Mapping[str, Tensor | None]] | Mapping[str, Tensor],
    ) -> RoundLayout:
        """The round's :class:`~cahfp_ops.layout.RoundLayout` for ``state``'s floating entries
        (in ``state``'s order), built by channel group: each group's K keep sets are checked
        and mapped once, whatever the number of tensors they prune.

        ``group_keeps[k][group]``: client k's kept channels of ``group`` (ascending int64), or
        missing / None for all channels; or, one table per group, ``group_keeps[group]``: a
        ``(K, m)`` int64 table, row k client k's kept channels ascending then -1 padding
        (:func:`~cahfp_ops.fl.masks.assign_keep_tables`; groups left out are not pruned).
        """
        tables = isinstance(group_keeps, Mapping)
        if tables:
            shapes = {int(t.shape[0]) for t in group_keeps.values()}
            if len(shapes) > 1 or any(t.dim() != 2 for t in group_keeps.values()):
                raise ValueError("ChannelPlan.layout: keep-set tables must be (K, m) with one K")
            K = shapes.pop() if shapes else 0
        else:
            K = len(group_keeps)
        if K == 0:
            raise ValueError("ChannelPlan.layout: no clients")
        floats = [(n, t) for n, t in state.items() if t.is_floating_point()]
        if not floats:
            raise ValueError("ChannelPlan.layout: the state has no floating entries")
        spec: dict[tuple[str, int], tuple[int, int]] = {}
        sizes, keeps = [], []
        for g in self.groups:
            if tables:
                per_client = group_keeps.get(g.name)
                if per_client is None:
                    continue
            else:
                per_client = [gk.get(g.name) for gk in group_keeps]
                if all(k is None for k in per_client):
                    continue
            for m in g.members:
                spec[(m.name, m.dim)] = (len(sizes), m.block)
            sizes.append(g.size)
            keeps.append(per_client)
        return RoundLayout.from_groups(
            [tuple(t.shape) for _, t in floats],
            [spec.get((n, 0)) for n, _ in floats],
            [spec.get((n, 1)) for n, _ in floats],
            sizes, keeps, K, names=[n for n, _ in floats], device=floats[0][1].device, op="ChannelPlan.layout",
            reuse=False,  # a round's keep sets are new: no lookup among recent layouts
        )  # fmt: skip


# Ops and modules through which a channel passes unchanged (elementwise, pooling, dropout).
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.MaxPool1d,
    nn.AvgPool1d,
)
_PASS_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    torch.sigmoid,
    F.hardswish,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
# Ops that mix or re-map channels: the channels reaching them cannot be pruned.
_TIE_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, F.pad, operator.getitem, operator.mul, torch.mul}
_TIE_METHODS = {"add", "add_", "mul", "view", "reshape", "permute", "transpose"}
_ADD = {operator.add, operator.iadd, torch.add}


def _is_producer(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)


def _flatten_block(node: torch.fx.Node) -> int | None:
    """Spatial block size when ``node`` flattens (N, C, *spatial) from dim 1, else None."""
    src = node.args[0] if node.args else None
    meta = getattr(src, "meta", {}).get("tensor_meta") if isinstance(src, torch.fx.Node) else None
    if meta is None:
        return None
    return math.prod(meta.shape[2:])


def trace_plan(model: nn.Module, example_input: Tensor, residual: str = "internal") -> ChannelPlan:
    """Find the prunable channel groups of ``model`` by tracing it with ``torch.fx``.

    Args:
        model: the model; Conv2d (groups=1) and Linear layers produce channels.
        example_input: one input batch (shapes size the Linear-after-flatten blocks).
        residual: ``"internal"`` (default): channels that reach a residual addition stay whole,
            so only block-internal channels are pruned; ``"tie"``: producers whose channels
            meet in an addition form one group (pruned together), unless they are also
            padded, concatenated or sliced, which leaves them whole.

    Raises:
        ValueError: an op the tracer does not know sits between a producer and its consumers
            (the message names it); declare such groups by hand with :class:`ChannelPlan`.
    """
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"trace_plan: residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    gm = _traced_with_shapes(model, example_input)
    modules = dict(gm.named_modules())
    params = dict(model.state_dict())
    groups: dict[str, ChannelGroup] = {}
    frozen: dict[str, str] = {}
    adds: dict[torch.fx.Node, list[str]] = {}

    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_producer(modules[node.target]):
            continue
        prod = node.target
        mod = modules[prod]
        size = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        members = [Member(f"{prod}.weight", 0)]
        if mod.bias is not None:
            members.append(Member(f"{prod}.bias", 0))
        stack = [(user, 1) for user in node.users]
        visited = set()
        while stack:
            cur, block = stack.pop()
            if (cur, block) in visited:
                continue
            visited.add((cur, block))
            nxt = [(u, block) for u in cur.users]
            if cur.op == "output":
                frozen.setdefault(prod, "feeds the model output")
                continue
            if cur.op == "call_module":
                m = modules[cur.target]
                if _is_producer(m):
                    members.append(Member(f"{cur.target}.weight", 1, block))
                    continue
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    for p in ("weight", "bias", "running_mean", "running_var"):
                        if f"{cur.target}.{p}" in params:
                            members.append(Member(f"{cur.target}.{p}", 0))
                    stack += nxt
                    continue
                if isinstance(m, nn.Flatten):
                    stack += [(u, block * (_flatten_block(cur) or 1)) for u in cur.users]
                    continue
                if isinstance(m, _PASS_MODULES):
                    stack += nxt
                    continue
                if isinstance(m, nn.Conv2d):
                    frozen.setdefault(prod, f"feeds grouped conv {cur.target!r}")
                    continue
                raise ValueError(
                    f"trace_plan: module {cur.target!r} ({type(m).__name__}) after {prod!r} is not supported; "
                    "declare the channel groups with ChannelPlan"
                )
            if cur.op == "call_function" and cur.target is torch.flatten:
                stack += [(u, block * (_flatten_block(cur) or 1)) for u in cur.users]
                continue
            if cur.op == "call_method" and cur.target == "flatten":
                stack += [(u, block * (_flatten_block(cur) or 1)) for u in cur.users]
                continue
            if (cur.op == "call_function" and cur.target in _PASS_FUNCTIONS) or (
                cur.op == "call_method" and cur.target in _PASS_METHODS
            ):
                stack += nxt
                continue
            is_add = (cur.op == "call_function" and cur.target in _ADD) or (
                cur.op == "call_method" and cur.target in ("add", "add_")
            )
            if is_add and residual == "tie":
                adds.setdefault(cur, []).append(prod)
                stack += nxt
                continue
            if (cur.op == "call_function" and cur.target in _TIE_FUNCTIONS) or (
                cur.op == "call_method" and cur.target in _TIE_METHODS
            ):
                what = "a residual addition" if is_add else f"{getattr(cur.target, '__name__', cur.target)}"
                frozen.setdefault(prod, f"reaches {what} ({cur.name})")
                continue
            raise ValueError(
                f"trace_plan: op {cur.target!r} ({cur.op}) after module {prod!r} is not supported; "
                "declare the channel groups with ChannelPlan"
            )
        groups[prod] = ChannelGroup(prod, size, _dedupe(members))

    if residual == "tie":

        def from_producer(n: object) -> bool:
            """Does input ``n`` carry a producer's channels unchanged (through norms, pass-through ops, adds)?"""
            while isinstance(n, torch.fx.Node):
                if n.op == "call_module":
                    m = modules[n.target]
                    if _is_producer(m):
                        return True
                    if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, *_PASS_MODULES)):
                        return False
                elif n in adds:
                    return all(from_producer(a) for a in n.args if isinstance(a, torch.fx.Node))
                elif not (
                    (n.op == "call_function" and n.target in _PASS_FUNCTIONS)
                    or (n.op == "call_method" and n.target in _PASS_METHODS)
                ):
                    return False
                n = n.args[0]
            return False

        mixed = {a for a in adds if not all(from_producer(x) for x in a.args if isinstance(x, torch.fx.Node))}
        groups, frozen = _tie(groups, frozen, adds, mixed)
    plan = ChannelPlan([g for name, g in groups.items() if name not in frozen], frozen)
    plan.check(params)
    return plan


def _traced_with_shapes(model: nn.Module, example_input: Tensor) -> torch.fx.GraphModule:
    """``model``'s fx graph with tensor shapes recorded on every node.

    Shapes come from one forward of a deep copy in eval mode without autograd, so the
    caller's model stays bit for bit as given (no BatchNorm running stats or
    ``num_batches_tracked`` change, no train/eval flag flips) and a batch of one works.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    probe = copy.deepcopy(model).eval()
    gm = torch.fx.symbolic_trace(probe)
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    return gm


def _dedupe(members: list[Member]) -> list[Member]:
    out, seen = [], set()
    for m in members:
        if (m.name, m.dim) not in seen:
            seen.add((m.name, m.dim))
            out.append(m)
    return out


def _tie(groups: dict[str, ChannelGroup], frozen: dict[str, str], adds: dict, mixed: set) -> tuple[dict, dict]:
    """Merge producers meeting in additions into one group (union-find); a merged group with
    any frozen member, or meeting in an addition that also adds channels from elsewhere (a
    padded or sliced shortcut), stays whole."""
    parent = {name: name for name in groups}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for producers in adds.values():
        for p in producers[1:]:
            parent[find(p)] = find(producers[0])
    merged: dict[str, list[str]] = {}
    for name in groups:
        merged.setdefault(find(name), []).append(name)
    for add in mixed:
        for p in adds[add]:
            frozen.setdefault(p, f"meets a shortcut of other channels in {add.name}")
    new_groups: dict[str, ChannelGroup] = {}
    new_frozen = dict(frozen)
    for root, names in merged.items():
        if len(names) == 1:
            new_groups[root] = groups[root]
            continue
        label = "+".join(names)
        sizes = {groups[n].size for n in names}
        why = [frozen[n] for n in names if n in frozen]
        if len(sizes) > 1:
            why.append(f"tied producers have different widths {sorted(sizes)}")
        members = _dedupe([m for n in names for m in groups[n].members])
        new_groups[label] = ChannelGroup(label, sizes.pop() if len(sizes) == 1 else 0, members)
        if why:
            new_frozen[label] = "; ".join(dict.fromkeys(why))
        for n in names:
            new_frozen.pop(n, None)
    return new_groups, new_frozen
