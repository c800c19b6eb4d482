"""The simulated clients of a server-driven method: each one trains the compact model it
receives on its share of the data and replies; clients whose compact models have equal shapes
train together in one vmapped step (``fedsim_batched.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import fedsim_batched
import torch
from baselines import Method
from fedsim_core import Config, batch_size_for, local_sgd


def snapshot(compact: torch.nn.Module) -> dict:
    """A detached copy of a module's state_dict."""
    return {k: v.detach().clone() for k, v in compact.state_dict().items()}


class Clients:
    """Local training of a method's clients on ``cfg``'s data.

    Args:
        cfg, method: the run's configuration and method (proximal term, local work, weighting).
        parts: client -> its sample indices. capacity: client -> its rank's pruning ratio.
        x_train, y_train: the training data on the device.
        masks: ``(K, C)`` bool label masks (HeteroFL's label split) or None.
        tamper: ``tamper(cid, sent, trained)``, what a hostile client replies instead.
    """

    def __init__(self, cfg: Config, method: Method, parts: list[torch.Tensor], capacity: dict[int, float],
                 x_train: torch.Tensor, y_train: torch.Tensor, masks: torch.Tensor | None = None,
                 tamper: Callable[[int, dict, dict], dict] | None = None):  # fmt: skip
        self.cfg, self.m, self.parts, self.capacity = cfg, method, parts, capacity
        self.x_train, self.y_train, self.masks, self.tamper = x_train, y_train, masks, tamper
        self.keep_sent = tamper is not None or method.prox_mu > 0

    def local_work(self, cid: int, round_: int) -> tuple[torch.Tensor, float, torch.Generator]:
        """Client ``cid``'s samples, share of the local steps and batch-order generator this round."""
        work = 1.0 - self.capacity[cid] if self.m.rank_local_work else 1.0  # FedProx: ratio r does (1 - r)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + round_ * 1009 + cid)
        return self.parts[cid], work, g

    def reply(self, cid: int, sent: dict | None, compact: torch.nn.Module) -> tuple[dict, float]:
        """(the reply, its weight): the trained state_dict (or what a hostile client sends)."""
        trained = snapshot(compact)
        weight = float(len(self.parts[cid])) if self.m.weighting == "samples" else 1.0
        return (self.tamper(cid, sent, trained) if self.tamper else trained), weight

    def train(self, cid: int, compact: torch.nn.Module, round_: int) -> tuple[dict, float]:
        """Client ``cid`` trains its compact model alone; returns its reply and weight."""
        compact = compact.to(self.x_train.device).train()
        sent = snapshot(compact) if self.keep_sent else None
        anchors = [(p, sent[n]) for n, p in compact.named_parameters()] if self.m.prox_mu > 0 else []
        idx, work, g = self.local_work(cid, round_)
        local_sgd(self.cfg, compact, idx, self.x_train, self.y_train, g, work, anchors, self.m.prox_mu,
                  label_mask=None if self.masks is None else self.masks[cid])  # fmt: skip
        return self.reply(cid, sent, compact)

    def train_grouped(self, compacts: dict[int, torch.nn.Module], round_: int) -> tuple[dict, dict]:
        """Every client trains its compact model; clients of equal shapes together (groups of
        at least ``fedsim_batched.smallest_group`` clients), the rest one by one. Returns
        (client -> reply, client -> weight)."""
        cfg = self.cfg
        groups: dict[tuple, list[int]] = {}
        for cid, cm in compacts.items():
            groups.setdefault(fedsim_batched.shape_key(cm), []).append(cid)
        updates, weights = {}, {}
        smallest = fedsim_batched.smallest_group(cfg.batched, self.x_train.device)
        for cids in groups.values():
            if len(cids) < smallest:  # a small group: the client-by-client loop
                for cid in cids:
                    updates[cid], weights[cid] = self.train(cid, compacts[cid], round_)
                continue
            sent = {cid: snapshot(compacts[cid]) for cid in cids} if self.keep_sent else {}
            plans = []
            for cid in cids:
                idx, work, g = self.local_work(cid, round_)
                plans.append(fedsim_batched.batch_plan(idx, batch_size_for(len(idx), cfg.batch_size),
                                                       cfg.local_epochs, work, g))  # fmt: skip
            fedsim_batched.train_group([compacts[c] for c in cids], plans, self.x_train, self.y_train, cfg.lr,
                                       cfg.momentum, self.m.prox_mu,
                                       None if self.masks is None else self.masks[cids])  # fmt: skip
            for cid in cids:
                updates[cid], weights[cid] = self.reply(cid, sent.get(cid), compacts[cid])
        return updates, weights
