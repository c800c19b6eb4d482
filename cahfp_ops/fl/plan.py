"""Channel plans: the prunable channel groups of a model and everything each channel couples.

A :class:`ChannelGroup` is C channels (or units of channels: whole heads, whole conv groups)
that are kept or pruned together. Its members are the state_dict entries holding them: the
producing Conv/Linear's output rows (dim 0) and bias, the norms' weights, biases and running
stats, and every consumer's input columns (dim 1; a Linear after ``flatten`` consumes ``block``
= H*W consecutive columns per channel). A member may hold only part of its group (one input of
a concatenation: ``offset``, ``channels``) or several copies of it (an LSTM's four gates, a
fused q/k/v projection: ``copies``).

:func:`cahfp_ops.fl.trace_plan` finds the groups with ``torch.fx``; a :class:`ChannelPlan` can
also be declared by hand for models tracing cannot handle (README, "Models tracing cannot
handle"). A plan turns per-group keep sets into per-tensor row and column keep sets for
``slice_channels_many`` / ``reconstruct_aggregate_many``, or into a round's layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cahfp_ops import RoundLayout

RESIDUAL_MODES = ("internal", "tie")


@dataclass(frozen=True)
class Member:
    """One state_dict entry of a group, along ``dim`` (0: rows, 1: columns).

    Channel ``c`` owns indices ``[c*block, (c+1)*block)`` of the dim. A member that holds only
    channels ``[offset, offset + channels)`` of its group (``channels`` None: all of them from
    ``offset`` 0) indexes them from 0; with ``copies`` > 1 the dim holds that many equal
    stretches, one after the other (an LSTM's gates, q/k/v rows of one tensor).
    """

    name: str
    dim: int
    block: int = 1
    offset: int = 0
    copies: int = 1
    channels: int | None = None

    def span(self, group_size: int) -> int:
        """How many of the group's channels the member holds."""
        return group_size - self.offset if self.channels is None else self.channels

    def length(self, group_size: int) -> int:
        """The member's dim length: ``copies * span * block``."""
        return self.copies * self.span(group_size) * self.block

    def whole(self) -> bool:
        """Whether it holds the whole group once (channel c at ``[c*block, (c+1)*block)``)."""
        return self.offset == 0 and self.copies == 1 and self.channels is None

    def spec(self, group: int) -> tuple[int, ...]:
        """The member's ``cahfp_ops.layout.DimSpec`` for group index ``group``."""
        return (group, self.block) if self.whole() else (group, self.block, self.offset, self.copies)


@dataclass
class ChannelGroup:
    """``size`` channels kept or pruned together; ``members`` hold them."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)

    def expand(self, keep: Tensor, member: Member) -> Tensor:
        """The member's kept indices along its dim for channel keep set ``keep`` (ascending)."""
        if member.whole() and member.block == 1:
            return keep
        n = member.span(self.size)
        if not member.whole():
            keep = keep[(keep >= member.offset) & (keep < member.offset + n)] - member.offset
        if member.block > 1:
            offs = torch.arange(member.block, device=keep.device)
            keep = (keep.unsqueeze(1) * member.block + offs).flatten()
        if member.copies > 1:
            keep = torch.cat([keep + s * n * member.block for s in range(member.copies)])
        return keep


class ChannelPlan:
    """The prunable channel groups of a model (see module docs)."""

    def __init__(
        self,
        groups: Sequence[ChannelGroup],
        frozen: Mapping[str, str] | None = None,
        state: Mapping[str, Tensor] | None = None,
    ):
        """``groups``: the channel groups; ``frozen``: producer -> why its channels stay whole;
        ``state``: a model's state_dict to check the groups against now (:meth:`check`)."""
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
                if m.block < 1 or m.copies < 1 or m.offset < 0 or m.span(g.size) < 1 or (
                    m.offset + m.span(g.size) > g.size
                ):
                    raise ValueError(f"channel plan: member {m.name!r} of {g.name!r} does not fit a group of "
                                     f"{g.size} channels: {m}")  # fmt: skip
                key = (m.name, m.dim)
                if key in seen:
                    raise ValueError(f"channel plan: {m.name!r} dim {m.dim} is in groups {seen[key]!r} and {g.name!r}")
                seen[key] = g.name
        if state is not None:
            self.check(state)

    def __repr__(self) -> str:
        return f"ChannelPlan({len(self.groups)} groups: {', '.join(f'{g.name}[{g.size}]' for g in self.groups)})"

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def check(self, state_dict: Mapping[str, Tensor]) -> None:
        """Every member exists in ``state_dict`` with ``copies * span * block`` entries along its
        dim (``size * block`` for a member holding its whole group); else ValueError."""
        for g in self.groups:
            for m in g.members:
                if m.name not in state_dict:
                    raise ValueError(f"channel plan: group {g.name!r} names {m.name!r}, which the model lacks")
                t = state_dict[m.name]
                if t.dim() <= m.dim or t.shape[m.dim] != m.length(g.size):
                    held = f"{m.copies} x " if m.copies > 1 else ""
                    held += f"{m.span(g.size)} (of {g.size})" if not m.whole() else f"{g.size}"
                    raise ValueError(
                        f"channel plan: {m.name!r} has shape {tuple(t.shape)}; group {g.name!r} needs "
                        f"{held} x {m.block} entries along dim {m.dim}"
                    )

    def kept_share(self, ratio: float, state: Mapping[str, Tensor]) -> float:
        """The share of ``state``'s floating entries a client pruned at ``ratio`` in every
        group keeps (exact for members holding whole groups; ranges count pro rata)."""
        total = kept = 0.0
        frac: dict[tuple[str, int], float] = {}
        for g in self.groups:
            k = max(1, math.ceil((1.0 - ratio) * g.size - 1e-6))
            for m in g.members:
                frac[(m.name, m.dim)] = k / g.size
        for name, t in state.items():
            if not t.is_floating_point():
                continue
            total += t.numel()
            kept += t.numel() * frac.get((name, 0), 1.0) * (frac.get((name, 1), 1.0) if t.dim() > 1 else 1.0)
        return kept / total if total else 1.0

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
            by_block: dict[tuple, list] = {}
            for m in g.members:
                key = (m.block, m.offset, m.copies, m.channels)
                if key not in by_block:
                    by_block[key] = [None if keeps[k] is None else g.expand(keeps[k], m) for k in range(K)]
                target = rows if m.dim == 0 else cols
                target[m.name] = by_block[key]
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
                spec[(m.name, m.dim)] = m.spec(len(sizes))
            sizes.append(g.size)
            keeps.append(per_client)
        return RoundLayout.from_groups(
            [tuple(t.shape) for _, t in floats],
            [spec.get((n, 0)) for n, _ in floats],
            [spec.get((n, 1)) for n, _ in floats],
            sizes, keeps, K, names=[n for n, _ in floats], device=floats[0][1].device, op="ChannelPlan.layout",
            reuse=False,  # a round's keep sets are new: no lookup among recent layouts
        )  # fmt: skip
