"""The simulator's methods: each one's submodel choice, local training and aggregation rule.

A :class:`Method` is a small record the shared training loop (``fedsim.run``) reads: which
channels a client keeps (an importance criterion of ``cahfp_ops.fl``), how the server combines
the replies (reconstruction or overlap, weighted by samples or counted per client), and what
local training adds (a proximal term, less local work on weaker devices, sampled widths).

Choices where the papers leave room, with the section they rest on:

* ``fedprox`` (Li et al., MLSys 2020, Sec. 3-4): FedAvg plus ``mu/2 * ||w - w_global||^2`` in
  the local loss (``mu = 0.01``), and the variable local work of Sec. 5.2 (stragglers do fewer
  local steps): a client of the heterogeneity rank's pruning ratio ``r`` runs ``(1 - r)`` of the
  local steps (at least one) on the full model; sample-weighted FedAvg aggregation.
* ``prunefl`` (Jiang et al., IEEE TNNLS 2022): adaptive unstructured pruning of a masked dense
  model by accumulated squared gradients, sparse aggregation and sparse-transfer accounting;
  its choices are listed in ``fedsim_prunefl.py``.
* ``dapperfl`` (Jia et al., NeurIPS 2024): model fusion pruning by the client after local
  training, domain adaptive regularisation, aggregation of the pruned models recovered with the
  global one; its choices are listed in ``fedsim_dapperfl.py``.
* ``fedmp`` (Jiang et al., ICDE 2022): structured pruning by L1 filter norm of the global model
  at the client's ratio; the CA-HFP paper's Table I pairs it with reconstruction (default),
  ``/overlap`` is available. ``magnitude`` is kept as an alias.
* ``heterofl`` (Diao et al., ICLR 2021, Sec. 3.1-3.2): static prefix submodels (the first
  ``(1 - r) C`` channels of every layer) and its combine rule: each entry is the plain mean over
  the clients that hold it (count based: weight 1 per client), the global value where none does.
  ``heterofl/label-split`` adds HeteroFL's optional label-split masking of the classifier
  (its ``mask`` option, ``fedsim_labelsplit.py``): a client's logits of classes absent from its
  data are set to 0 in training, and each classifier row is averaged over the clients holding
  its class only. Static batch normalisation (sBN, Sec. 3.2): BatchNorm normalises by batch
  statistics in training, and the statistics used to evaluate the global model are the
  cumulative ones of its pass over the clients' training data (HeteroFL queries the clients
  after training; the simulator makes the same pass over the union of their data before each
  evaluation).
* ``fedrolex`` (Alam et al., NeurIPS 2022, Sec. 3.2): the same widths as rolling windows whose
  start advances by one channel per round (cyclic), with HeteroFL's count-based overlap rule and
  its static batch normalisation (FedRolex builds on HeteroFL's training code). Without sBN the
  averaged running statistics of a channel date from the rounds it last sat in the window,
  while its weights kept changing: on the default digits run that cost FedRolex about 10
  points (0.791 ± 0.133 against 0.891 ± 0.028 with the statistics recomputed; HeteroFL,
  whose windows never move, 0.979 against 0.975).
* ``fjord`` (Horváth et al., NeurIPS 2021, Sec. 3): ordered dropout with nested prefix widths
  from ``{0.25, 0.5, 0.75, 1}``; a client of capacity ``p_max = 1 - r`` trains, each round, a
  width drawn uniformly from those ``<= p_max`` (the paper draws per local batch; the simulator
  trains one submodel per client and round, so it draws per round), and the server averages
  each entry over the clients that trained it, weighted by their samples.
* ``random``: random channels at the client's ratio (control); ``cahfp``: the curvature-aware
  scores of the paper, reconstruction (default) or overlap.

"""

from __future__ import annotations

from dataclasses import dataclass

FJORD_WIDTHS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Method:
    """One federated method as the simulator runs it.

    Attributes:
        name: the name on the command line, in tables and JSON.
        criterion: which channels a client keeps (an importance shorthand of
            ``cahfp_ops.fl.make_importance``); None: every client trains the full model.
        modes: the aggregation modes it takes (``reconstruct`` / ``overlap``; HeteroFL also
            ``label-split``: overlap plus its label split); the first is its default.
        weighting: a client's aggregation weight: ``"samples"`` (its sample count) or
            ``"count"`` (1 per client).
        warmup: whether the first rounds use random channels (score-based criteria only).
        prox_mu: FedProx's proximal coefficient (0: none).
        rank_local_work: whether a client's local steps scale with ``1 - r`` (its rank's ratio).
        sampled_width: whether a client's width is drawn each round (FjORD) below its capacity.
        static_bn: HeteroFL's static batch normalisation: the global model is evaluated with
            BatchNorm statistics recomputed over the clients' training data (cumulative
            average), not with the averaged running statistics.
        runner: ``"server"`` (the channel-plan server of ``cahfp_ops.fl``), or the method's
            own loop: ``"prunefl"`` (weight-level masks, ``fedsim_prunefl.py``), ``"dapperfl"``
            (client-side pruning after training, ``fedsim_dapperfl.py``).
    """

    name: str
    criterion: str | None
    modes: tuple[str, ...] = ("reconstruct",)
    weighting: str = "samples"
    warmup: bool = True
    prox_mu: float = 0.0
    rank_local_work: bool = False
    sampled_width: bool = False
    static_bn: bool = False
    runner: str = "server"

    @property
    def prunes(self) -> bool:
        return self.criterion is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fedavg", None),
        Method("fedprox", None, prox_mu=0.01, rank_local_work=True),
        Method("prunefl", "gradient", ("overlap",), warmup=False, runner="prunefl"),
        Method("dapperfl", "l1", ("reconstruct",), warmup=False, runner="dapperfl"),
        Method("fedmp", "l1", ("reconstruct", "overlap")),
        Method("heterofl", "prefix", ("overlap", "label-split"), weighting="count", warmup=False, static_bn=True),
        Method("fedrolex", "rolling", ("overlap",), weighting="count", warmup=False, static_bn=True),
        Method("fjord", "prefix", ("overlap",), warmup=False, sampled_width=True),
        Method("random", "random", ("reconstruct", "overlap")),
        Method("cahfp", "curvature", ("reconstruct", "overlap")),
    )
}
ALIASES = {"magnitude": "fedmp"}
DEFAULT_METHODS = ("fedavg", "fedprox", "fedmp", "heterofl", "fedrolex", "fjord", "cahfp")


def get(name: str) -> Method:
    """The method of a command-line name (aliases resolved)."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS) + sorted(ALIASES)}")
    return METHODS[key]


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    """``method[/mode]`` specs -> (method, mode) pairs (``all``: every method in its default
    mode); a mode a method does not take is an error."""
    runs = []
    for spec in specs:
        if spec == "all":
            runs += [(m.name, m.modes[0]) for m in METHODS.values()]
            continue
        name, _, mode = spec.partition("/")
        m = get(name)
        mode = mode or m.modes[0]
        if mode not in m.modes:
            raise ValueError(f"method {m.name!r} aggregates with {m.modes}, not {mode!r}")
        runs.append((m.name, mode))
    return list(dict.fromkeys(runs))


def round_ratios(method: Method, capacity: dict[int, float], generator) -> dict[int, float]:
    """Each client's pruning ratio this round: its rank's ratio (pruning methods), 0 (full
    model), or for a sampled width the ratio of a width drawn uniformly from
    :data:`FJORD_WIDTHS` at most the client's capacity ``1 - r``."""
    if not method.prunes:
        return {k: 0.0 for k in capacity}
    if not method.sampled_width:
        return dict(capacity)
    import torch

    out = {}
    for k, r in capacity.items():
        allowed = [p for p in FJORD_WIDTHS if p <= 1 - r + 1e-9] or [min(FJORD_WIDTHS)]
        out[k] = 1.0 - allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
    return out
