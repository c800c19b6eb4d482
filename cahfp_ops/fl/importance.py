"""Channel importance: the CA-HFP curvature criterion and the baselines, as small classes.

An :class:`Importance` scores every channel group of a plan for the clients of a round
(``scores``), and may learn from each new global model (``observe``) and from the clients'
replies (``observe_replies``). :class:`CurvatureImportance` is CA-HFP's criterion (optionally
personalised per client), :class:`MagnitudeImportance` the L1 / L2 filter norm (FedMP-like),
:class:`RandomImportance` random scores; :class:`PrefixImportance` (static prefix submodels,
HeteroFL) and :class:`RollingImportance` (rolling windows, FedRolex) are the width-FL channel
choices. :func:`make_importance` turns the shorthand names ``"curvature"``, ``"l1"``, ``"l2"``,
``"random"``, ``"prefix"``, ``"rolling"`` into instances.

:class:`CurvatureTracker` estimates, on the server and from successive global models only,
the gradient proxy ``g_t = (w_t - w_{t+1}) / (lr * local_steps)`` and a diagonal curvature
proxy ``h``: ``"secant"`` (default) ``|g_t - g_{t-1}| / (|w_t - w_{t-1}| + eps)`` smoothed by an
exponential moving average, or ``"fisher"``, an EMA of ``g_t**2`` (SPEC.md). Group scores sum
``curvature_scores`` over every member of a channel group (:func:`group_scores`).
:func:`magnitude_scores` (L1 / L2 filter norm, FedMP-like) and :func:`random_scores` are the
baselines.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from torch import Tensor

from cahfp_ops import curvature_scores, reconstruct_aggregate_many

from .plan import ChannelGroup, ChannelPlan, Member

CURVATURES = ("secant", "fisher")
CRITERIA = ("curvature", "l1", "l2", "random", "prefix", "rolling")


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


def member_channels(values: Tensor, group: ChannelGroup, member: Member) -> Tensor:
    """Per-index values along a member's dim ``(..., length)`` summed into the group's channels
    ``(..., C)``: over the member's block and copies, placed at its offset (0 elsewhere)."""
    if member.whole() and member.block == 1:
        return values
    n = member.span(group.size)
    v = values.reshape(*values.shape[:-1], member.copies, n, member.block).sum((-3, -1))
    if n == group.size:
        return v
    out = v.new_zeros(*v.shape[:-1], group.size)
    out[..., member.offset : member.offset + n] = v
    return out


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
        s = member_channels(curvature_scores(w, g, h, dim=m.dim, batched=True if batched else None), group, m)
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
        m = g.members[0]
        w = state[m.name].float().movedim(m.dim, 0)
        norms = w.abs().flatten(1).sum(1) if p == 1 else w.pow(2).flatten(1).sum(1)
        norms = member_channels(norms, g, m)
        out[g.name] = norms if p == 1 else norms.sqrt()
    return out


def random_scores(plan: ChannelPlan, generator: torch.Generator, num_clients: int = 1) -> dict[str, Tensor]:
    """Independent random scores per client: ``(num_clients, C)`` per group."""
    return {g.name: torch.rand(num_clients, g.size, generator=generator) for g in plan.groups}


# --------------------------------------------------------------------------- importance classes
class Importance:
    """Base class: scores every channel group of a plan for a round's clients.

    Subclasses implement :meth:`scores`; the hooks :meth:`observe` and
    :meth:`observe_replies` and the persistence methods default to doing nothing.
    """

    name = "importance"

    @property
    def ready(self) -> bool:
        """Whether :meth:`scores` is informative yet (the server uses random scores until then)."""
        return True

    def scores(
        self, plan: ChannelPlan, state: Mapping[str, Tensor], clients: Sequence[Hashable], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Group name -> ``(C,)`` float scores shared by all clients, or ``(K, C)`` one row per client."""
        raise NotImplementedError

    def observe(self, state: Mapping[str, Tensor], lr: float = 1.0, local_steps: int = 1) -> None:
        """Called with each new global model (``lr`` / ``local_steps``: the clients' SGD scale)."""

    def observe_replies(
        self,
        state: Mapping[str, Tensor],
        clients: Sequence[Hashable],
        updates: Sequence[Mapping[str, Tensor]],
        rows: Mapping[str, Sequence[Tensor | None]],
        cols: Mapping[str, Sequence[Tensor | None]],
        lr: float = 1.0,
        local_steps: int = 1,
    ) -> None:
        """Called with the accepted compact replies of a round, before they are aggregated into ``state``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomImportance(Importance):
    """Independent uniform random scores per client and group (random masks)."""

    name = "random"

    def scores(self, plan, state, clients, generator):
        return random_scores(plan, generator, len(clients))


class PrefixImportance(Importance):
    """Static prefix submodels (HeteroFL): channel ``c`` of a group scores ``C - c``, so a client
    keeping ``n`` channels keeps ``0 .. n-1``, every round, and narrower clients' submodels nest
    inside wider ones."""

    name = "prefix"

    def scores(self, plan, state, clients, generator):
        return {g.name: torch.arange(g.size, 0, -1, dtype=torch.float32) for g in plan.groups}


class RollingImportance(Importance):
    """Rolling-window submodels (FedRolex): a client keeping ``n`` of a group's ``C`` channels
    keeps the cyclic window ``o, o+1, ..., o+n-1 (mod C)``; the offset ``o`` starts at 0 and
    advances by ``step`` channels with every new global model observed after the first (each
    aggregated round), so over ``C / step`` rounds every channel is trained by every width.
    All clients share the window's start."""

    name = "rolling"

    def __init__(self, step: int = 1):
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"RollingImportance: step must be a positive int, got {step!r}")
        self.step = step
        self.observed = 0

    def scores(self, plan, state, clients, generator):
        shift = max(0, self.observed - 1) * self.step
        out = {}
        for g in plan.groups:
            distance = (torch.arange(g.size) - shift) % g.size  # 0 at the window's start
            out[g.name] = (g.size - distance).to(torch.float32)
        return out

    def observe(self, state, lr=1.0, local_steps=1):
        self.observed += 1

    def state_dict(self) -> dict:
        return {"observed": self.observed}

    def load_state_dict(self, state: Mapping) -> None:
        self.observed = int(state["observed"])

    def __repr__(self) -> str:
        return f"RollingImportance(step={self.step})"


class MagnitudeImportance(Importance):
    """The L1 (``p=1``) or L2 (``p=2``) norm of each producing filter, shared by all clients."""

    def __init__(self, p: int = 1):
        if p not in (1, 2):
            raise ValueError(f"MagnitudeImportance: p must be 1 or 2, got {p!r}")
        self.p = p
        self.name = f"l{p}"

    def scores(self, plan, state, clients, generator):
        return magnitude_scores(plan, state, p=self.p)

    def __repr__(self) -> str:
        return f"MagnitudeImportance(p={self.p})"


class CurvatureImportance(Importance):
    """CA-HFP: ``sum |g*w| + 0.5*max(h,0)*w**2`` over each group's members, with the gradient
    and curvature proxies of a :class:`CurvatureTracker` fed the successive global models.

    Args:
        curvature: ``"secant"`` or ``"fisher"`` curvature proxy.
        personalized: score each client with its own pseudo-gradient from its last accepted
            update (``(w_t - E_k(c_k)) / (lr * steps)``, zero where it pruned) and the shared
            curvature proxy; clients without one yet use the global proxy. Keeps one dense
            gradient per client seen (O(K x model) memory).
        beta, eps: the tracker's moving-average factor and secant guard.
    """

    name = "curvature"

    def __init__(self, curvature: str = "secant", personalized: bool = False, beta: float = 0.9, eps: float = 1e-8):
        self.tracker = CurvatureTracker(curvature, beta=beta, eps=eps)
        self.personalized = personalized
        self.client_grads: dict[Hashable, dict[str, Tensor]] = {}

    @property
    def ready(self) -> bool:
        return self.tracker.ready

    def scores(self, plan, state, clients, generator):
        if self.personalized and any(c in self.client_grads for c in clients):
            grads = {
                name: torch.stack([self.client_grads.get(c, self.tracker.g)[name] for c in clients])
                for name in self.tracker.g
            }
            return group_scores(plan, state, grads, self.tracker.h or None)
        return tracker_scores(plan, state, self.tracker)

    def observe(self, state, lr=1.0, local_steps=1):
        self.tracker.observe(state, lr, local_steps)

    def observe_replies(self, state, clients, updates, rows, cols, lr=1.0, local_steps=1):
        """Personalised only: each client's pseudo-gradient ``(w_t - E_k(c_k)) / (lr * steps)``."""
        if not self.personalized:
            return
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        scale = 1.0 / (lr * local_steps)
        for j, (cid, update) in enumerate(zip(clients, updates)):
            r = {n: [keeps[j]] for n, keeps in rows.items()}  # one client: lists of one keep set
            c = {n: [keeps[j]] for n, keeps in cols.items()}
            expanded = reconstruct_aggregate_many(floats, [{k: update[k] for k in floats}], r, c)
            self.client_grads[cid] = {k: (floats[k].float() - expanded[k].float()) * scale for k in floats}

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "client_grads": self.client_grads}

    def load_state_dict(self, state: Mapping) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.client_grads = dict(state.get("client_grads", {}))

    def __repr__(self) -> str:
        return f"CurvatureImportance({self.tracker.method!r}, personalized={self.personalized})"


def make_importance(criterion: str | Importance, curvature: str = "secant", personalized: bool = False) -> Importance:
    """An :class:`Importance` from an instance (returned as is) or a shorthand name in :data:`CRITERIA`."""
    if isinstance(criterion, Importance):
        return criterion
    if criterion == "curvature":
        return CurvatureImportance(curvature, personalized=personalized)
    if criterion in ("l1", "l2"):
        return MagnitudeImportance(p=int(criterion[1]))
    if criterion == "random":
        return RandomImportance()
    if criterion == "prefix":
        return PrefixImportance()
    if criterion == "rolling":
        return RollingImportance()
    raise ValueError(f"criterion must be an Importance or one of {CRITERIA}, got {criterion!r}")
