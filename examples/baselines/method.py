"""The one interface of a baseline: a :class:`Method` record, its submodel choice and its
aggregation rule, which the simulator's shared round loop (``fedsim.run``) reads. A method that
cannot run through that loop (its clients choose their own masks, or prune weights rather than
channels) also has its own round loop, ``run(cfg, method, data, parts, progress, label)``,
returning the same summary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One federated method as the simulator runs it.

    Attributes:
        name: the name on the command line, in tables and JSON.
        criterion: the submodel choice: which channels a client keeps (an importance shorthand
            of ``cahfp_ops.fl.make_importance``); None: every client trains the full model.
        modes: the aggregation rule: the modes it takes (``reconstruct`` / ``overlap``;
            HeteroFL also ``label-split``: overlap plus its label split); the first is its default.
        weighting: a client's aggregation weight: ``"samples"`` (its sample count) or
            ``"count"`` (1 per client).
        warmup: whether the first rounds use random channels (score-based criteria only).
        prox_mu: FedProx's proximal coefficient (0: none).
        rank_local_work: whether a client's local steps scale with ``1 - r`` (its rank's ratio).
        widths: sampled widths (FjORD): each round a client trains a width drawn uniformly from
            these, at most its capacity ``1 - r``; None: its rank's ratio.
        static_bn: HeteroFL's static batch normalisation: the global model is evaluated with
            BatchNorm statistics recomputed over the clients' training data (cumulative
            average), not with the averaged running statistics.
    """

    name: str
    criterion: str | None
    modes: tuple[str, ...] = ("reconstruct",)
    weighting: str = "samples"
    warmup: bool = True
    prox_mu: float = 0.0
    rank_local_work: bool = False
    widths: tuple[float, ...] | None = None
    static_bn: bool = False

    @property
    def prunes(self) -> bool:
        return self.criterion is not None


def round_ratios(method: Method, capacity: dict[int, float], generator) -> dict[int, float]:
    """Each client's pruning ratio this round: its rank's ratio (pruning methods), 0 (full
    model), or with sampled widths the ratio of a width drawn uniformly from ``method.widths``
    at most the client's capacity ``1 - r``."""
    if not method.prunes:
        return {k: 0.0 for k in capacity}
    if method.widths is None:
        return dict(capacity)
    import torch

    out = {}
    for k, r in capacity.items():
        allowed = [p for p in method.widths if p <= 1 - r + 1e-9] or [min(method.widths)]
        out[k] = 1.0 - allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
    return out
