"""NVIDIA FLARE integration: heterogeneous submodels in NVFlare's simulator and jobs (nvflare >= 2.9).

NVFlare's ``FedAvg`` sends one model to every site and its aggregators only see equal-shaped
models. :class:`CAHFPController` is a ``ModelController`` that sends **one task per site**, each
carrying the site's compact model from a :class:`cahfp_ops.fl.Server`, and reconstruct-aggregates
the heterogeneous replies into the full global model:

* each round it samples sites (``num_clients`` of them, or all, with a seeded generator;
  sorted by name), asks the server for their compact models (one pruning ratio for all or a
  ratio per site) and sends each its own ``FLModel``;
* replies are untrusted: a site whose task fails (its script raised, it timed out), a reply
  that is malformed (no arrays, no example count, a packed buffer of the wrong size), tagged
  for another round or sent twice is rejected with a reason and reported; the job never stops
  for it (``ignore_result_error=True``). Replies are aggregated in site-name order, whatever
  order the network delivered them in, so a run is reproducible bit for bit;
* the full global model is published each round (``fl_ctx``'s global model, the
  ``AFTER_AGGREGATION`` event), saved to the run folder (``save_filename``, a ``torch.save`` of
  the state_dict) and, with ``evaluator``, evaluated on the server; what happened to every site
  goes to the log and to ``cahfp_rounds.json`` in the run folder.

The controller's arguments are JSON-friendly (NVFlare writes them into the job's config and
rebuilds the controller from them): the model is a factory's import path plus its keyword
arguments, the example input a shape, the server's options a dict. :func:`make_server` builds
the same :class:`~cahfp_ops.fl.Server` from the same arguments, so a run can be replayed
offline. :func:`make_job` returns a ready ``FedJob`` (controller on the server, the user's
training script on the clients, PyTorch tensors on the wire).

Client side, in the training script (NVFlare's Client API)::

    import nvflare.client as flare
    from cahfp_ops.integrations.nvflare import compact_model, reply

    flare.init()
    while flare.is_running():
        received = flare.receive()
        model = compact_model(my_model(), received)   # the physically smaller model
        ...                                           # train it on the site's data
        flare.send(reply(model, num_examples, {"train_loss": loss}, received=received))

Wire form (``packed=True``, the default), as in the Flower integration: the floating compact
tensors travel as one array (``params["cahfp-packed"]``), integer entries as arrays of their
own; ``meta["cahfp-packed-names"]`` / ``meta["cahfp-packed-shapes"]`` say how to unpack it.
``reply`` answers in the form it was sent. ``meta["cahfp-keep-sets"]`` lists the kept
channels per group, ``meta["cahfp-ratio"]`` the site's ratio. The example count travels in
``meta["num_examples"]`` (NVFlare's ``NUM_STEPS_CURRENT_ROUND`` is read when it is missing).

Install with ``pip install "cahfp-ops[nvflare]"``; this module imports nvflare, the rest of
cahfp_ops never does.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

try:
    from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_common.app_event_type import AppEventType
    from nvflare.app_common.workflows.model_controller import ModelController
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs
except ImportError as exc:  # pragma: no cover - exercised only without nvflare
    raise ImportError("cahfp_ops.integrations.nvflare needs NVFlare: pip install 'cahfp-ops[nvflare]'") from exc

from ..fl import ClientRecord, RoundReport, Server, build_compact
from ..layout import PackedModel
from ._wire import as_packed, pack, packed_parts, unpack

PACKED_KEY = "cahfp-packed"
NAMES_KEY = "cahfp-packed-names"
SHAPES_KEY = "cahfp-packed-shapes"
KEEP_KEY = "cahfp-keep-sets"
RATIO_KEY = "cahfp-ratio"
ROUND_KEY = "cahfp-round"
EXAMPLES_KEY = "num_examples"
ROUNDS_FILE = "cahfp_rounds.json"

__all__ = [
    "CAHFPController",
    "compact_model",
    "compact_state",
    "make_job",
    "make_server",
    "num_examples",
    "reply",
    "resolve",
]


def resolve(path: str) -> Any:
    """The object an import path names: ``"package.module.name"`` or ``"package.module:name"``."""
    if not isinstance(path, str) or not path:
        raise TypeError(f"an import path must be a non-empty string, got {path!r}")
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module.name'")
    return getattr(importlib.import_module(module), name)


def make_server(
    model: str,
    model_args: Mapping[str, Any] | None = None,
    input_shape: list[int] | tuple[int, ...] = (1, 3, 32, 32),
    server_args: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Server, Callable[[], nn.Module]]:
    """The server a :class:`CAHFPController` with these arguments runs, and the model factory.

    The model's initial weights come from ``torch.manual_seed(seed)`` before the factory is
    called; the example input is a seeded ``randn`` batch of ``input_shape``.
    """
    factory = resolve(model)
    args = dict(model_args or {})

    def build() -> nn.Module:
        return factory(**args)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    x = torch.randn(tuple(int(d) for d in input_shape), generator=torch.Generator().manual_seed(seed))
    return Server(module, x, **dict(server_args or {})), build


def num_examples(result: FLModel) -> float:
    """A reply's example count: ``meta["num_examples"]``, else NVFlare's
    ``NUM_STEPS_CURRENT_ROUND``. Raises KeyError when it has neither."""
    meta = result.meta or {}
    if EXAMPLES_KEY in meta:
        return meta[EXAMPLES_KEY]
    if FLMetaKey.NUM_STEPS_CURRENT_ROUND in meta:
        return meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND]
    raise KeyError(f"the reply has no example count (meta[{EXAMPLES_KEY!r}])")


class CAHFPController(ModelController):
    """Heterogeneous federated pruning as an NVFlare workflow (see the module docs).

    Args:
        model: import path of a function or class that builds the global model
            (``"cahfp_ops.fl.zoo.small_cnn"``); ``model_args`` its keyword arguments.
        input_shape: shape of the example input batch the server traces the model with.
        server_args: :class:`~cahfp_ops.fl.Server`'s keyword options (``criterion``, ``mode``,
            ``warmup_rounds``, ``lr``, ``local_steps``, ``seed``, ``update_bound``,
            ``max_update``, ``bound_action``, ``reduce``, ``trim``, ...).
        ratio: the sites' pruning ratio: one for all, or a mapping site name -> ratio (a
            site not named gets 0: the full model).
        num_rounds: rounds to run.
        num_clients: sites sampled per round (None: every connected site).
        seed: seeds the model's initial weights, the example input and the site sampling.
        packed: send each site its floating tensors as one array (False: one named array each).
        streaming: fold the accepted replies in one at a time (O(model) memory) rather than in
            one batch; a robust reducer always aggregates in one batch.
        train_timeout: seconds a site has for its task (0: no limit); a site past it is absent.
        task_name: the task the sites' executors handle.
        save_filename: the global model's file in the run folder (``torch.save`` of the
            state_dict, written each round; None: not saved).
        evaluator: import path of a function ``f(model: nn.Module) -> dict[str, float]`` run on
            the full global model after each round (None: no server-side evaluation).
        **kwargs: ``ModelController``'s (``persistor_id``, ``task_check_period``,
            ``ignore_result_error``: True unless given, so a failing site never stops the job).

    ``reports``: one :class:`~cahfp_ops.fl.RoundReport` per round; ``history``: per round the
    counts, rejection reasons, training metrics and evaluation (what ``cahfp_rounds.json`` holds).
    """

    def __init__(
        self,
        *args,
        model: str = "cahfp_ops.fl.zoo.small_cnn",
        model_args: dict | None = None,
        input_shape: list | None = None,
        server_args: dict | None = None,
        ratio: float | dict = 0.5,
        num_rounds: int = 5,
        num_clients: int | None = None,
        seed: int = 0,
        packed: bool = True,
        streaming: bool = True,
        train_timeout: int = 0,
        task_name: str = "train",
        save_filename: str | None = "cahfp_global_model.pt",
        evaluator: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("ignore_result_error", True)
        kwargs.setdefault("persistor_id", "")
        super().__init__(*args, **kwargs)
        if isinstance(ratio, Mapping):
            ratio = {str(k): float(v) for k, v in ratio.items()}
        elif not isinstance(ratio, (int, float)):
            raise TypeError(f"CAHFPController: ratio must be a number or a mapping site -> ratio, got {ratio!r}")
        if not isinstance(num_rounds, int) or num_rounds < 0:
            raise ValueError(f"CAHFPController: num_rounds must be an int >= 0, got {num_rounds!r}")
        if num_clients is not None and (not isinstance(num_clients, int) or num_clients < 1):
            raise ValueError(f"CAHFPController: num_clients must be an int >= 1 or None, got {num_clients!r}")
        self.model, self.model_args, self.input_shape = model, model_args, input_shape
        self.server_args, self.ratio, self.num_rounds, self.num_clients = server_args, ratio, num_rounds, num_clients
        self.seed, self.packed, self.streaming, self.train_timeout = seed, packed, streaming, train_timeout
        self.task_name, self.save_filename, self.evaluator = task_name, save_filename, evaluator
        self.server: Server | None = None
        self.reports: list[RoundReport] = []
        self.history: list[dict] = []
        self._lock = threading.Lock()
        self._replies: dict[str, tuple[FLModel, Any]] = {}  # site -> (reply, compact state)
        self._failed: list[tuple[str, str]] = []  # (site, reason), in arrival order
        self._round = -1
        self._metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    def start_controller(self, fl_ctx) -> None:
        fobs.register(TensorDecomposer)  # torch tensors on the wire (PyTorch exchange format)
        super().start_controller(fl_ctx)

    def make_server(self) -> Server:
        """The round server (override to build it differently); see :func:`make_server`."""
        server, self._build_model = make_server(
            self.model, self.model_args, self.input_shape or (1, 3, 32, 32), self.server_args, self.seed
        )
        return server

    def site_ratio(self, site: str) -> float:
        """The pruning ratio of ``site``."""
        if isinstance(self.ratio, Mapping):
            return float(self.ratio.get(site, 0.0))
        return float(self.ratio)

    def sample_sites(self, round_: int) -> list[str]:
        """This round's sites, sorted by name (a seeded sample of ``num_clients`` of them)."""
        sites = sorted(c.name for c in self.engine.get_clients())
        if self.num_clients is not None and self.num_clients < len(sites):
            sites = sorted(random.Random(self.seed * 1_000_003 + round_).sample(sites, self.num_clients))
        return sites

    # ------------------------------------------------------------------ the workflow
    def run(self) -> None:
        self.server = self.make_server()
        self.info(f"CA-HFP: {len(self.server.plan.groups)} channel groups, criterion {self.server.criterion.name}")
        for r in range(self.num_rounds):
            if self.abort_signal.triggered:
                return
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, r, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            sites = self.sample_sites(r)
            assignments = self.server.assign({s: self.site_ratio(s) for s in sites})
            with self._lock:
                self._replies, self._failed, self._round = {}, [], r
            for site in sites:
                self.send_model(
                    task_name=self.task_name,
                    data=self.task_model(site, assignments[site], r),
                    targets=[site],
                    timeout=self.train_timeout,
                    callback=self._receive,
                )
            while self.get_num_standing_tasks():
                if self.abort_signal.triggered:
                    self.info("abort signal: CA-HFP stops")
                    return
                time.sleep(self._task_check_period)
            self.event(AppEventType.BEFORE_AGGREGATION)
            report = self.aggregate_round()
            self.publish(r, report)

    def task_model(self, site: str, assignment, round_: int) -> FLModel:
        """The ``FLModel`` sent to ``site``: its compact arrays, keep sets, ratio and round."""
        meta: dict[str, Any] = {
            RATIO_KEY: self.site_ratio(site),
            ROUND_KEY: round_,
            KEEP_KEY: {g: [int(i) for i in k.tolist()] for g, k in assignment.keeps.items()},
        }
        if self.packed and isinstance(assignment.state, PackedModel):
            buffer, extras, meta[NAMES_KEY], meta[SHAPES_KEY] = packed_parts(assignment.state)
            params = {PACKED_KEY: buffer, **extras}
        else:
            params = dict(assignment.state)
        return FLModel(
            params_type=ParamsType.FULL,
            params=params,
            current_round=round_,
            total_rounds=self.num_rounds,
            meta=meta,
        )

    def _receive(self, result: FLModel) -> bool:
        """A site's reply (NVFlare's result callback): checked for provenance and form, kept
        for the round's aggregation or recorded as failed."""
        site = str(result.meta.get("client_name"))
        sent = result.meta.get("props") or {}
        with self._lock:
            why = None
            if sent.get(ROUND_KEY) != self._round:
                why = f"site {site}'s reply answers round {sent.get(ROUND_KEY)!r}, not round {self._round}"
            elif self.server is None or site not in self.server.assignments:
                why = f"site {site} was not sampled in round {self._round}"
            if why is None:
                try:
                    state = self.reply_state(site, result)
                    weight = num_examples(result)
                except Exception as exc:  # no arrays, no example count, a packed buffer of the wrong size
                    why = f"site {site} sent a malformed reply ({type(exc).__name__}: {exc})"
            if why is not None:
                self._failed.append((site, why))
                return False
            if site in self._replies:
                self._failed.append((site, f"site {site} replied more than once in round {self._round}"))
                return False
            self._replies[site] = (result, state, weight)
        return True

    def _accept_train_result(self, client_name: str, result, fl_ctx, is_unknown_task: bool = False) -> bool:
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task:
            with self._lock:
                self._failed.append((client_name, f"site {client_name}'s task failed (return code {rc})"))
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def reply_state(self, site: str, result: FLModel) -> Mapping[str, Tensor]:
        """A reply's compact state: named arrays as they came, or a packed reply laid out as
        the site's assignment. Raises ValueError for a reply without arrays or a packed buffer
        that does not fit the assignment."""
        params = dict(result.params or {})
        if not params:
            raise ValueError("the reply has no arrays")
        if PACKED_KEY not in params:
            return params
        buffer = params.pop(PACKED_KEY)
        a = self.server.assignments[site]
        if not isinstance(a.state, PackedModel) or not isinstance(buffer, Tensor):
            raise ValueError(f"site {site} sent a packed reply without a packed assignment")
        return as_packed(buffer, a.state, params)

    def aggregate_round(self) -> RoundReport:
        """Aggregate the round's accepted replies, in site-name order; failures go in the report."""
        with self._lock:
            replies, failed = dict(self._replies), list(self._failed)
            self._round = -1  # replies from now on belong to no open round
        arrivals = [(site, replies[site][1], replies[site][2]) for site in sorted(replies)]
        streaming = self.streaming and self.server.reduce == "mean"
        report = self.server.aggregate(arrivals, streaming=streaming)
        for site, reason in failed:
            record = report.clients.get(site)
            if record is None or record.status == "absent":
                report.reject(site, reason)
            else:  # the site's counted reply is already recorded
                report.duplicates.append(ClientRecord(site, "rejected", reason))
        self.reports.append(report)
        accepted = [replies[s] for s in report.accepted]
        self._metrics = _weighted_metrics([r[0] for r in accepted], [r[2] for r in accepted])
        return report

    def publish(self, round_: int, report: RoundReport) -> None:
        """Publish, save, evaluate and log the round's global model."""
        state = self.server.state
        model = FLModel(params_type=ParamsType.FULL, params=state, current_round=round_, total_rounds=self.num_rounds)
        self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(state, {}), private=True, sticky=True)
        self.fire_event_with_data(AppEventType.AFTER_AGGREGATION, self.fl_ctx, AppConstants.AGGREGATION_RESULT, model)
        entry: dict[str, Any] = {
            "round": round_,
            "accepted": [str(s) for s in report.accepted],
            "rejected": {str(s): why for s, why in report.rejected.items()},
            "absent": [str(s) for s in report.absent],
            "duplicates": [r.reason for r in report.duplicates],
            "train": self._metrics,
        }
        if self.evaluator:
            module = self._build_model()
            module.load_state_dict(state)
            entry["eval"] = {k: float(v) for k, v in resolve(self.evaluator)(module.eval()).items()}
        self.history.append(entry)
        for site, why in entry["rejected"].items():
            self.warning(f"round {round_}: rejected {site}: {why}")
        self.info(
            f"round {round_}: accepted {len(entry['accepted'])}, rejected {len(entry['rejected'])}, "
            f"absent {len(entry['absent'])}; eval {entry.get('eval', {})}"
        )
        run_dir = self.get_run_dir()
        if self.save_filename:
            torch.save(state, os.path.join(run_dir, self.save_filename))
        with open(os.path.join(run_dir, ROUNDS_FILE), "w") as f:
            json.dump(self.history, f, indent=1)
        self.event(AppEventType.ROUND_DONE)


def _weighted_metrics(replies: list[FLModel], weights: list[float]) -> dict[str, float]:
    """The example-weighted mean of the numeric metrics every accepted reply reports."""
    if not replies:
        return {}
    keys = set.intersection(*(set((r.metrics or {}).keys()) for r in replies))
    total = float(sum(weights)) or 1.0
    out = {}
    for k in sorted(keys):
        values = [r.metrics[k] for r in replies]
        if all(isinstance(v, (int, float)) for v in values):
            out[k] = sum(float(v) * float(w) for v, w in zip(values, weights)) / total
    return out


# ---------------------------------------------------------------------- job helper
def make_job(
    name: str,
    train_script: str,
    *,
    train_args: str = "",
    min_clients: int = 1,
    files: list[str] | None = None,
    **controller,
):
    """An NVFlare ``FedJob`` running CA-HFP: a :class:`CAHFPController` on the server, built
    from ``**controller`` (its arguments: ``model``, ``model_args``, ``input_shape``,
    ``server_args``, ``ratio``, ``num_rounds``, ...), and ``train_script`` (with
    ``train_args``) on every client through NVFlare's Client API, tensors exchanged in
    PyTorch format. ``min_clients``: the job waits for that many sites.

    ``train_script``: as NVFlare's ``ScriptRunner`` takes it. A file name in the current
    folder makes a job that runs anywhere: the job ships the script and refers to it inside its
    ``custom`` folder; an absolute path is referred to as such (the job then needs the script
    at that path on every site). ``files``: more scripts or folders to ship with the job to the
    server and the clients (a module the training script or the evaluator imports). ``cahfp_ops``
    is an installed package on every site, never copied into the job. Run it with
    ``job.simulator_run(workspace, n_clients=4)`` or write it with ``job.export_job(folder)``
    for ``nvflare simulator`` / a deployment.
    """
    from nvflare.client.config import ExchangeFormat
    from nvflare.fuel.utils.constants import FrameworkType
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import ScriptRunner

    job = FedJob(name=name, min_clients=min_clients)
    job.set_app_packages(["cahfp_ops"])
    job.to_server(CAHFPController(**controller), id="cahfp_controller")
    for path in files or []:
        job.to_server(path)
        job.to_clients(path)
    job.to_clients(
        ScriptRunner(
            script=train_script,
            script_args=train_args,
            framework=FrameworkType.PYTORCH,
            server_expected_format=ExchangeFormat.PYTORCH,
        )
    )
    return job


# ---------------------------------------------------------------------- client side
def compact_state(received: FLModel) -> dict[str, Tensor]:
    """The compact state_dict a received ``FLModel`` carries, packed or as named arrays
    (packed tensors come back as views of the received buffer)."""
    params = dict(received.params or {})
    if PACKED_KEY not in params:
        return params
    meta = received.meta or {}
    packed = unpack(params.pop(PACKED_KEY), list(meta[NAMES_KEY]), list(meta[SHAPES_KEY]))
    return {**packed, **params}


def compact_model(model: nn.Module, received: FLModel) -> nn.Module:
    """The compact module a site trains: ``model``'s architecture resized to the received arrays."""
    return build_compact(model, compact_state(received))


def reply(
    model: nn.Module,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    *,
    received: FLModel | None = None,
) -> FLModel:
    """A site's training reply: its trained compact arrays, the example count and metrics.

    ``received``: the ``FLModel`` the site was sent; when it came packed, the reply is packed
    the same way (one array, in the sent order), else the arrays are named.
    """
    state = model.state_dict()
    meta = (received.meta or {}) if received is not None else {}
    if NAMES_KEY in meta:
        buffer, rest = pack(state, list(meta[NAMES_KEY]))
        params = {PACKED_KEY: buffer, **{k: v.detach() for k, v in rest.items()}}
    else:
        params = {k: v.detach() for k, v in state.items()}
    return FLModel(
        params_type=ParamsType.FULL,
        params=params,
        metrics=dict(metrics or {}),
        meta={EXAMPLES_KEY: int(num_examples), FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(num_examples)},
    )
