"""Mask assignment: client pruning ratios -> kept channels of every group."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cahfp_ops import topk_channel_masks

from .plan import ChannelPlan

Ratio = float | Mapping[str, float]


def kept_count(ratio: float, channels: int) -> int:
    """How many channels are kept at pruning ratio ``ratio`` in a group of ``channels`` (SPEC.md)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    return max(1, math.ceil((1.0 - ratio) * channels - 1e-6))


def assign_keep_tables(
    plan: ChannelPlan, ratios: Sequence[Ratio], scores: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Each group's kept channels for every client, as one padded table per group.

    Args: as :func:`assign_keep_sets`.

    Returns:
        group -> ``(K, m)`` int64: row k holds client k's kept channels ascending (the
        highest-scoring ``kept_count``; all ``C`` channels for a client with ratio 0), then -1
        padding; ``m`` is the largest count. Groups no client prunes are left out. The form
        :meth:`ChannelPlan.layout` takes without a per-client pass.
    """
    K = len(ratios)
    shared = _shared_ratios(ratios)
    by_size: dict[int, list] = {}  # groups of one size share one top-k call
    for g in plan.groups:
        r = _group_ratios(ratios, shared, g.name)
        if not any(x > 0 for x in r):
            continue
        s = scores[g.name]
        by_size.setdefault(g.size, []).append(
            (g.name, s.expand(K, -1) if s.dim() == 1 else s, [kept_count(x, g.size) if x > 0 else g.size for x in r])
        )
    out: dict[str, Tensor] = {}
    for members in by_size.values():
        rows = members[0][1] if len(members) == 1 else torch.cat([m[1].to(members[0][1].dtype) for m in members])
        _, idx = topk_channel_masks(rows, torch.tensor([c for m in members for c in m[2]]))
        for i, (name, _, counts) in enumerate(members):
            out[name] = idx[i * K : (i + 1) * K, : max(counts)]
    return {g.name: out[g.name] for g in plan.groups if g.name in out}


def _shared_ratios(ratios: Sequence[Ratio]) -> list[float | None]:
    """Each client's ratio when it is one number for every group, else None."""
    return [None if isinstance(rk, Mapping) else float(rk) for rk in ratios]


def _group_ratios(ratios: Sequence[Ratio], shared: list[float | None], group: str) -> list[float]:
    """Each client's pruning ratio of ``group``."""
    return [x if x is not None else rk.get(group, 0.0) for x, rk in zip(shared, ratios)]


class KeepSetRows(Mapping):
    """One client's keep sets as rows of the round's keep-set tables: ``keeps[group]`` is a
    view of its row (made on first access), for the groups the client prunes (``groups``)."""

    __slots__ = ("_tables", "_row", "_counts", "_groups", "_views")

    def __init__(self, tables: Mapping[str, Tensor], row: int, counts: Mapping[str, list[int]], groups: list[str]):
        self._tables, self._row, self._counts = tables, row, counts
        self._groups = dict.fromkeys(groups)  # ordered, with O(1) membership
        self._views: dict[str, Tensor] = {}

    def __getitem__(self, group: str) -> Tensor:
        view = self._views.get(group)
        if view is None:
            if group not in self._groups:
                raise KeyError(group)
            view = self._views[group] = self._tables[group][self._row, : self._counts[group][self._row]]
        return view

    def __iter__(self):
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, group) -> bool:
        return group in self._groups

    def __repr__(self) -> str:
        return f"KeepSetRows({dict(self)!r})"


def keep_sets_of_tables(tables: Mapping[str, Tensor], ratios: Sequence[Ratio]) -> list[KeepSetRows]:
    """Per-client keep sets from :func:`assign_keep_tables`: group -> ascending int64 keep set
    (views of the tables' rows, made on first access; groups a client does not prune left
    out), as :func:`assign_keep_sets` returns them."""
    counts = {name: (table >= 0).sum(1).tolist() for name, table in tables.items()}
    pruned: list[list[str]] = [[] for _ in ratios]
    shared = _shared_ratios(ratios)
    for name in tables:
        for k, x in enumerate(_group_ratios(ratios, shared, name)):
            if x > 0:
                pruned[k].append(name)
    return [KeepSetRows(tables, k, counts, groups) for k, groups in enumerate(pruned)]


def assign_keep_sets(
    plan: ChannelPlan, ratios: Sequence[Ratio], scores: Mapping[str, Tensor]
) -> list[dict[str, Tensor]]:
    """Each client's kept channels of every group: the highest-scoring ``kept_count`` channels.

    Args:
        ratios: one per client: a ratio for every group, or a mapping group -> ratio
            (groups it leaves out are not pruned).
        scores: group -> ``(C,)`` (shared) or ``(K, C)`` (per client) scores.

    Returns:
        K dicts group -> ascending int64 keep set (groups with ratio 0 are left out: all kept).
    """
    return [dict(k) for k in keep_sets_of_tables(assign_keep_tables(plan, ratios, scores), ratios)]
