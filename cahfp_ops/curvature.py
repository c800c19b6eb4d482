"""Channel importance: the CA-HFP curvature criterion and the baselines.

:class:`CurvatureTracker` estimates, on the server and from successive global models only,
the gradient proxy ``g_t = (w_t - w_{t+1}) / (lr * local_steps)`` and a diagonal curvature
proxy ``h``: ``"secant"`` (default) ``|g_t - g_{t-1}| / (|w_t - w_{t-1}| + eps)`` smoothed by an
exponential moving average, or ``"fisher"``, an EMA of ``g_t**2`` (SPEC.md). Group scores sum
``curvature_scores`` over every member of a channel group (:func:`group_scores`).
:func:`magnitude_scores` (L1 / L2 filter norm, FedMP-like) and :func:`random_scores` are the
baselines.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .ops import curvature_scores
from .plan import ChannelGroup, ChannelPlan

CURVATURES = ("secant", "fisher")


class CurvatureTracker:
    """Gradient and curvature proxies from successive global models (see module docs)."""

    def __init__(self, method: str = "secant", beta: float = 0.9, eps: float = 1e-8):
        if method not in CURVATURES:
            raise ValueError(f"CurvatureTracker: method must be one of {CURVATURES}, got {method!r}")
        self.method, self.beta, self.eps = method, beta, eps
        self.w_prev: dict[str, Tensor] = {}
        self.dw_prev: dict[str, Tensor] = {}
        self.g: dict[str, Tensor] = {}
        self.h: dict[str, Tensor] = {}

    @property
    def ready(self) -> bool:
        """True once a gradient proxy exists (one full round after the first model)."""
        return bool(self.g)

    def observe(self, state: Mapping[str, Tensor], lr: float = 1.0, local_steps: int = 1) -> None:
        """Feed the next global model ``w_{t+1}`` (the first call only records ``w_0``)."""
        new = {k: v.detach().float().clone() for k, v in state.items() if v.is_floating_point()}
        if self.w_prev:
            scale = 1.0 / (lr * local_steps)
            g_new = {k: (self.w_prev[k] - new[k]) * scale for k in new}
            for k, g in g_new.items():
                if self.method == "fisher":
                    h_new = g * g
                elif k in self.g and k in self.dw_prev:
                    h_new = (g - self.g[k]).abs() / (self.dw_prev[k].abs() + self.eps)
                else:
                    continue
                self.h[k] = h_new if k not in self.h else self.beta * self.h[k] + (1 - self.beta) * h_new
            self.dw_prev = {k: new[k] - self.w_prev[k] for k in new}
            self.g = g_new
        self.w_prev = new

    def state_dict(self) -> dict:
        return {
            "method": self.method,
            "beta": self.beta,
            "eps": self.eps,
            "w_prev": self.w_prev,
            "dw_prev": self.dw_prev,
            "g": self.g,
            "h": self.h,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.method, self.beta, self.eps = state["method"], state["beta"], state["eps"]
        for key in ("w_prev", "dw_prev", "g", "h"):
            setattr(self, key, {k: v.clone() for k, v in state[key].items()})


def _member_scores(
    group: ChannelGroup,
    state: Mapping[str, Tensor],
    grads: Mapping[str, Tensor] | None,
    hess: Mapping[str, Tensor] | None,
) -> Tensor:
    total = None
    for m in group.members:
        w = state[m.name]
        if not w.is_floating_point():
            continue
        g = None if grads is None else grads.get(m.name)
        h = None if hess is None else hess.get(m.name)
        if g is None and h is None:
            continue
        batched = (g is not None and g.dim() > w.dim()) or (h is not None and h.dim() > w.dim())
        s = curvature_scores(w, g, h, dim=m.dim, batched=True if batched else None)
        if m.block > 1:
            s = s.reshape(*s.shape[:-1], group.size, m.block).sum(-1)
        total = s if total is None else total + s
    if total is None:
        raise ValueError(f"group_scores: no member of group {group.name!r} has a gradient or curvature proxy")
    return total


def group_scores(
    plan: ChannelPlan,
    state: Mapping[str, Tensor],
    grads: Mapping[str, Tensor] | None,
    hess: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per group: ``sum |g*w| + 0.5*max(h,0)*w^2`` over every member, ``(C,)`` float32.

    ``grads`` / ``hess`` may carry a leading client dim ``(K, *shape)`` for personalised
    scores; then each group's scores are ``(K, C)``.
    """
    return {g.name: _member_scores(g, state, grads, hess) for g in plan.groups}


def tracker_scores(plan: ChannelPlan, state: Mapping[str, Tensor], tracker: CurvatureTracker) -> dict[str, Tensor]:
    """CA-HFP scores of the current global model from the tracker's proxies."""
    return group_scores(plan, state, tracker.g, tracker.h or None)


def magnitude_scores(plan: ChannelPlan, state: Mapping[str, Tensor], p: int = 1) -> dict[str, Tensor]:
    """L1 (``p=1``) or L2 (``p=2``) norm of each producing filter (the group's first member)."""
    out = {}
    for g in plan.groups:
        w = state[g.members[0].name].float()
        out[g.name] = w.abs().flatten(1).sum(1) if p == 1 else w.pow(2).flatten(1).sum(1).sqrt()
    return out


def random_scores(plan: ChannelPlan, generator: torch.Generator, num_clients: int = 1) -> dict[str, Tensor]:
    """Independent random scores per client: ``(num_clients, C)`` per group."""
    return {g.name: torch.rand(num_clients, g.size, generator=generator) for g in plan.groups}
