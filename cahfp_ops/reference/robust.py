"""The robust reducers: weighted median and trimmed mean (``cahfp::robust_aggregate``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._dtypes import acc_dtype
from .._views import as_3d
from ._common import kept_indices


def robust_aggregate(
    weight: Tensor,
    clients: Sequence[Tensor],
    rows: Tensor,
    cols: Tensor,
    coef: Tensor,
    mode: str,
    reduce: str,
    trim: float,
    *,
    chunk: int = 1 << 16,
) -> Tensor:
    """Robust reducers (SPEC, "Robust reducers"): per element, the weighted median
    (``reduce="median"``) or weighted trimmed mean (``"trimmed_mean"``, ``trim`` of the weight
    cut from each end) of the participants' deltas ``c_k - weight``, added to ``weight``.

    ``coef``: ``(K,)`` float64 as given (not normalised). Participants: clients with coef > 0;
    in ``reconstruct`` mode the ones that do not keep an element take part with delta 0, in
    ``overlap`` mode only keepers do. Values are sorted ascending with ties by client index
    (a stable sort); cumulative weights are float64 in sorted order. Elements no participant
    keeps are ``weight``; a NaN among an element's participants makes it NaN. Works through
    ``chunk`` elements at a time, so memory is O(K * chunk) beyond the output.
    """
    shape = weight.shape
    weight = as_3d(weight)
    clients = [as_3d(c) for c in clients]
    acc = acc_dtype(weight.dtype)
    R, Cin, T = weight.shape
    K = len(clients)
    device = weight.device
    coef = coef.to(device=device, dtype=torch.float64)
    out = torch.empty(R * Cin * T, dtype=weight.dtype, device=device)
    kept_sets = [(kept_indices(rows[k]), kept_indices(cols[k])) for k in range(K)]
    part_k = (coef > 0).unsqueeze(1)
    step = max(1, chunk // max(1, Cin * T))
    for r0 in range(0, R, step):  # a block of rows at a time: O(K * chunk) memory
        r1 = min(R, r0 + step)
        w = weight[r0:r1].to(acc).reshape(-1)
        d = torch.zeros(K, w.numel(), dtype=acc, device=device)
        kp = torch.zeros(K, w.numel(), dtype=torch.bool, device=device)
        for k, client in enumerate(clients):
            r, c = kept_sets[k]
            if r.numel() == 0 or c.numel() == 0 or not float(coef[k]) > 0:
                continue
            sel = ((r >= r0) & (r < r1)).nonzero().flatten()
            if sel.numel() == 0:
                continue
            local = ((r[sel] - r0)[:, None] * Cin + c[None, :])[..., None] * T + torch.arange(T, device=device)
            compact = client[sel][:, : c.numel()].to(acc).reshape(-1)
            pos = local.reshape(-1)
            d[k, pos] = compact - w[pos]
            kp[k, pos] = True
        part = kp if mode == "overlap" else part_k.expand_as(kp)
        wts = torch.where(part, coef.unsqueeze(1), 0.0)
        key = torch.where(part, d, torch.zeros_like(d))
        # non-participants last: sort by value, then (stably) by "not a participant"
        _, idx = torch.sort(torch.where(part, key, torch.full_like(key, float("inf"))), dim=0, stable=True)
        flag_order = torch.sort((~part.gather(0, idx)).to(torch.uint8), dim=0, stable=True).indices
        idx = idx.gather(0, flag_order)
        v = key.gather(0, idx)
        cum = wts.gather(0, idx).cumsum(0)
        total = cum[-1]
        if reduce == "median":
            first = (2 * cum >= total).to(torch.uint8).argmax(0)  # first i with cum_i >= W / 2
            a = v.gather(0, first.unsqueeze(0))[0]
            b = v.gather(0, (first + 1).clamp(max=K - 1).unsqueeze(0))[0]
            on_boundary = 2 * cum.gather(0, first.unsqueeze(0))[0] == total
            res = torch.where(on_boundary & (first + 1 < K), a + (b - a) / 2, a)
        else:
            lo, hi = trim * total, total - trim * total
            before = torch.cat([torch.zeros_like(cum[:1]), cum[:-1]])
            kept = (torch.minimum(cum, hi) - torch.maximum(before, lo)).clamp(min=0)
            share = (kept / kept.sum(0)).to(acc)
            res = torch.where(kept > 0, share * v, torch.zeros_like(v)).sum(0)
        res = torch.where((torch.isnan(d) & part).any(0), torch.full_like(res, float("nan")), res)
        covered = (kp & part_k).any(0)
        wr = weight[r0:r1].reshape(-1)
        out[r0 * Cin * T : r1 * Cin * T] = torch.where(covered, (w + res).to(weight.dtype), wr)
    return out.view(shape)
