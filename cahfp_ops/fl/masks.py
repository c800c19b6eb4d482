"""Mask assignment: client pruning ratios -> kept channels of every group."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

from cahfp_ops import topk_channel_masks

from .plan import ChannelPlan

Ratio = float | Mapping[str, float]


def kept_count(ratio: float, channels: int) -> int:
    """How many channels are kept at pruning ratio ``ratio`` in a group of ``channels`` (SPEC.md)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    return max(1, math.ceil((1.0 - ratio) * channels - 1e-6))


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
    K = len(ratios)
    out: list[dict[str, Tensor]] = [{} for _ in range(K)]
    for g in plan.groups:
        r = [rk.get(g.name, 0.0) if isinstance(rk, Mapping) else float(rk) for rk in ratios]
        pruned = [k for k in range(K) if r[k] > 0]
        if not pruned:
            continue
        s = scores[g.name]
        s = s.expand(K, -1) if s.dim() == 1 else s
        rows = s[pruned]
        counts = [kept_count(r[k], g.size) for k in pruned]
        _, idx = topk_channel_masks(rows, counts)
        for j, k in enumerate(pruned):  # row j: its counts[j] kept channels, then -1 padding
            out[k][g.name] = idx[j, : counts[j]]
    return out
