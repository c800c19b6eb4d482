"""The benchmark workloads: one source of truth for shapes, implementations and peers.

Each builder returns a :class:`Workload`: the inputs of one benchmark case (CIFAR VGG-16
layers, whole VGG-16 / ResNet-56 state_dicts, a server round), the bytes that must move,
and the implementations measured side by side, by name:

* ``cahfp[cpp]``, ``cahfp[triton]``: the public op on that backend (validation on);
  ``cahfp[cpp,novalidate]``: the same with validation off,
* ``reference``: the pure-PyTorch reference backend (``cahfp_ops.reference``),
* ``naive``, ``plain``, ``index_add``: the plain-PyTorch peers (``peers.py``): the loop
  most FL code runs, and the best plain variant.

:meth:`Workload.check` compares every implementation against the first one before anything
is timed. The roofline scripts (``bench_*.py``) and the pytest-benchmark suite
(``test_bench.py``) both build their cases here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import peers
import torch
from models import channel_plan, make_client_models, make_model

import cahfp_ops
from cahfp_ops import reference
from common import VGG16_WIDTHS, check_close, half_and_half, kept_count, make_clients, random_keep, vgg16_conv_shapes


@dataclass
class Workload:
    """One benchmark case: implementations (name -> zero-argument callable) and bytes moved."""

    op: str
    shape: str
    nbytes: int
    impls: dict[str, Callable[[], object]]
    tolerance: tuple[float, float] = (1e-5, 1e-5)
    compare: Callable[[object], object] = field(default=lambda out: out)

    @property
    def group(self) -> str:
        return f"{self.op} {self.shape}"

    def ours(self, novalidate: bool = False) -> Callable[[], object]:
        """The cahfp implementation backend ``auto`` picks on this case's device, with validation
        off when asked and the case has that variant; the reference where no backend is compiled."""
        names = [n for n in self.impls if n.startswith("cahfp[")]
        if novalidate and any(n.endswith(",novalidate]") for n in names):
            names = [n for n in names if n.endswith(",novalidate]")]
        else:
            names = [n for n in names if not n.endswith(",novalidate]")]
        return self.impls[names[0]] if names else self.impls["reference"]

    def check(self) -> None:
        """Every implementation agrees with the first (correctness before timing)."""
        names = list(self.impls)
        first = self.compare(self.impls[names[0]]())
        for name in names[1:]:
            try:
                check_close(self.compare(self.impls[name]()), first, *self.tolerance)
            except AssertionError as exc:
                raise AssertionError(f"{self.group}: {name} disagrees with {names[0]}: {exc}") from exc


def cahfp_backends(device: torch.device) -> list[str]:
    """The compiled backends that run on ``device`` here (the reference is listed apart);
    ``CAHFP_BENCH_BACKENDS`` (comma-separated) names them instead (``triton`` on CPU tensors
    under ``TRITON_INTERPRET=1``: the dry run of ``gpu_suite.py``)."""
    if os.environ.get("CAHFP_BENCH_BACKENDS"):
        return [b for b in os.environ["CAHFP_BENCH_BACKENDS"].split(",") if b]
    out = []
    if device.type == "cpu" and cahfp_ops.load_cpp():
        out.append("cpp")
    if importlib.util.find_spec("triton") is not None and device.type == "cuda":
        out.append("triton")
    return out


def _on(backend: str, fn: Callable[[], object], validate: bool = True) -> Callable[[], object]:
    def run():
        with cahfp_ops.use_backend(backend), cahfp_ops.validation(validate):
            return fn()

    return run


#: The plain-PyTorch peers of each case, in table order.
PEERS = {
    "curvature_scores": ("plain", "naive"),
    "topk_channel_masks": ("plain", "naive"),
    "slice_channels": ("plain", "naive"),
    "reconstruct_aggregate": ("index_add", "naive"),
    "reconstruct_aggregate_many": ("index_add", "naive"),
    "slice_channels_many": ("plain",),
    "server_round": ("plain",),
    "streaming": ("plain",),
}
#: Cases also timed with validation off (where validation costs measurable time).
NOVALIDATE = {"slice_channels", "reconstruct_aggregate", "reconstruct_aggregate_many", "slice_channels_many"}


def impl_names(op: str, device: torch.device) -> list[str]:
    """The implementations a case of ``op`` holds on ``device``, in order (known without building it)."""
    names = []
    for b in cahfp_backends(device):
        names.append(f"cahfp[{b}]")
        if op in NOVALIDATE:
            names.append(f"cahfp[{b},novalidate]")
    return [*names, "reference", *PEERS[op]]


def _ours(op: str, device: torch.device, fn: Callable[[], object]) -> dict[str, Callable]:
    impls = {}
    for b in cahfp_backends(device):
        impls[f"cahfp[{b}]"] = _on(b, fn)
        if op in NOVALIDATE:
            impls[f"cahfp[{b},novalidate]"] = _on(b, fn, validate=False)
    impls["reference"] = _on("torch", fn)
    return impls


# --------------------------------------------------------------------------- single ops (VGG-16 layers)
def curvature_scores(K: int, device: torch.device) -> Workload:
    gen = torch.Generator().manual_seed(K)
    shapes = vgg16_conv_shapes()
    ws = [torch.randn(s, generator=gen).to(device) for s in shapes]
    gs = [torch.randn((K, *s), generator=gen).to(device) for s in shapes]
    hs = [torch.randn((K, *s), generator=gen).to(device) for s in shapes]

    def ours():
        return [cahfp_ops.curvature_scores(w, g, h) for w, g, h in zip(ws, gs, hs)]

    def plain():
        return [((g * w).abs() + 0.5 * h.clamp(min=0) * w * w).sum(dim=(2, 3, 4)) for w, g, h in zip(ws, gs, hs)]

    def naive():
        return [
            torch.stack([((g[k] * w).abs() + 0.5 * h[k].clamp(min=0) * w * w).sum(dim=(1, 2, 3)) for k in range(K)])
            for w, g, h in zip(ws, gs, hs)
        ]

    nbytes = 4 * sum(w.numel() + g.numel() + h.numel() for w, g, h in zip(ws, gs, hs))
    impls = {**_ours("curvature_scores", device, ours), "plain": plain, "naive": naive}
    return Workload("curvature_scores", f"vgg16-conv K={K}", nbytes, impls, tolerance=(1e-4, 1e-3))


def topk_channel_masks(K: int, device: torch.device) -> Workload:
    gen = torch.Generator().manual_seed(K)
    ratios = half_and_half(K)
    scores = [torch.randn(K, C, generator=gen).to(device) for C in VGG16_WIDTHS]
    keeps = [torch.tensor([kept_count(r, C) for r in ratios], device=device) for C in VGG16_WIDTHS]
    maxk = [int(k.max()) for k in keeps]

    def ours():
        return [cahfp_ops.topk_channel_masks(s, k)[0] for s, k in zip(scores, keeps)]

    def naive():
        out = []
        for s, k in zip(scores, keeps):
            mask = torch.zeros(s.shape, dtype=torch.bool, device=device)
            for i in range(K):
                order = torch.sort(s[i], descending=True, stable=True).indices[: int(k[i])]
                mask[i, order] = True
            out.append(mask)
        return out

    def plain():
        return [reference.topk_channel_masks(s, k, m)[0] for s, k, m in zip(scores, keeps, maxk)]

    nbytes = sum(s.numel() * (s.element_size() + 1) for s in scores)  # scores read, mask written
    impls = {**_ours("topk_channel_masks", device, ours), "plain": plain, "naive": naive}
    return Workload("topk_channel_masks", f"vgg16-widths K={K}", nbytes, impls, tolerance=(0, 0))


def slice_channels(K: int, device: torch.device) -> Workload:
    gen = torch.Generator().manual_seed(K)
    shapes = vgg16_conv_shapes()
    weights = [torch.randn(s, generator=gen).to(device) for s in shapes]
    ratios = half_and_half(K)
    rows = [[random_keep(s[0], ratios[k], gen).to(device) for k in range(K)] for s in shapes]
    cols = [[None] * K] + rows[:-1]

    def ours():
        return [cahfp_ops.slice_channels(w, r, c) for w, r, c in zip(weights, rows, cols)]

    def naive():
        return [
            [w[r][:, c].contiguous() if c is not None else w[r].contiguous() for r, c in zip(rs, cs)]
            for w, rs, cs in zip(weights, rows, cols)
        ]

    def plain():
        return [
            [w.index_select(0, r) if c is None else w.index_select(0, r).index_select(1, c) for r, c in zip(rs, cs)]
            for w, rs, cs in zip(weights, rows, cols)
        ]

    elems = sum(
        r.numel() * (s[1] if c is None else c.numel()) * 9
        for s, rs, cs in zip(shapes, rows, cols)
        for r, c in zip(rs, cs)
    )
    impls = {**_ours("slice_channels", device, ours), "plain": plain, "naive": naive}
    return Workload("slice_channels", f"vgg16-conv K={K}", 4 * 2 * elems, impls, tolerance=(0, 0))


def reconstruct_aggregate(K: int, device: torch.device) -> Workload:
    gen = torch.Generator().manual_seed(K)
    shapes = vgg16_conv_shapes()
    weights = [torch.randn(s, generator=gen).to(device) for s in shapes]
    layers = make_clients(shapes, K, half_and_half(K), gen, device=device)
    coef = (torch.rand(K, generator=gen) + 0.5).tolist()

    def ours():
        return [cahfp_ops.reconstruct_aggregate(w, c, r, cc, coef) for w, (r, cc, c) in zip(weights, layers)]

    def naive():
        return [peers.naive_reconstruct_aggregate(w, c, r, cc, coef) for w, (r, cc, c) in zip(weights, layers)]

    def index_add():
        return [peers.indexadd_reconstruct_aggregate(w, c, r, cc, coef) for w, (r, cc, c) in zip(weights, layers)]

    params = sum(w.numel() for w in weights)
    client_elems = sum(c.numel() for _, _, cl in layers for c in cl)
    nbytes = 4 * (2 * params + client_elems)
    impls = {**_ours("reconstruct_aggregate", device, ours), "index_add": index_add, "naive": naive}
    return Workload("reconstruct_aggregate", f"vgg16-conv K={K}", nbytes, impls)


# --------------------------------------------------------------------------- whole models
def _plain_slice(state: dict, rows: dict, cols: dict, k: int) -> dict:
    """Client k's compact state_dict by per-tensor ``index_select`` (the plain peer of slicing);
    tensors no keep set touches are copied, so every client gets its own tensors."""
    out = {}
    for key, w in state.items():
        t = w
        if rows.get(key) is not None and rows[key][k] is not None:
            t = t.index_select(0, rows[key][k])
        if cols.get(key) is not None and cols[key][k] is not None and t.dim() > 1:
            t = t.index_select(1, cols[key][k])
        out[key] = t.clone() if t is w else t
    return out


def _model_case(name: str, K: int, device: torch.device):
    gen = torch.Generator().manual_seed(K)
    shapes, rows, cols = channel_plan(name, K, half_and_half(K), gen, device=device)
    model = make_model(shapes, gen, device=device)
    clients = make_client_models(shapes, rows, cols, K, gen, device=device)
    coef = (torch.rand(K, generator=gen) + 0.5).tolist()
    return model, clients, rows, cols, coef


def model_aggregate(name: str, K: int, device: torch.device) -> Workload:
    model, clients, rows, cols, coef = _model_case(name, K, device)

    def per_tensor(peer):
        return {k: peer(model[k], [c[k] for c in clients], rows.get(k, [None] * K), cols.get(k), coef) for k in model}

    def ours():
        return cahfp_ops.reconstruct_aggregate_many(model, clients, rows, cols, coef)

    params = sum(w.numel() for w in model.values())
    client_elems = sum(t.numel() for c in clients for t in c.values())
    impls = {
        **_ours("reconstruct_aggregate_many", device, ours),
        "index_add": lambda: per_tensor(peers.indexadd_reconstruct_aggregate),
        "naive": lambda: per_tensor(peers.naive_reconstruct_aggregate),
    }
    return Workload("reconstruct_aggregate_many", f"{name} K={K}", 4 * (2 * params + client_elems), impls)


def model_slice(name: str, K: int, device: torch.device) -> Workload:
    model, clients, rows, cols, _ = _model_case(name, K, device)

    def ours():
        return cahfp_ops.slice_channels_many(model, rows, cols)

    def plain():
        return [_plain_slice(model, rows, cols, k) for k in range(K)]

    client_elems = sum(t.numel() for c in clients for t in c.values())
    impls = {**_ours("slice_channels_many", device, ours), "plain": plain}
    return Workload("slice_channels_many", f"{name} K={K}", 4 * 2 * client_elems, impls, tolerance=(0, 0))


def server_round(name: str, K: int, device: torch.device) -> Workload:
    """``Server.assign`` + ``Server.aggregate`` (training excluded), L1 filter-norm masks;
    peer: the same keep sets sliced with per-client, per-tensor ``index_select`` and
    aggregated with the per-tensor ``index_add`` peer."""
    from cahfp_ops.fl import Server, assign_keep_sets, resnet56, vgg16

    ctor = {"vgg16": vgg16, "resnet56": resnet56}[name]
    torch.manual_seed(K)
    net = ctor()
    x = torch.randn(1, 3, 32, 32)
    ratios = dict(enumerate(half_and_half(K)))

    def new_server():
        server = Server(net, x, criterion="l1", warmup_rounds=0)
        state0 = {k: v.clone() for k, v in server.state.items()}

        def reset():  # every repetition starts from the same global model and round
            server.state = {k: v.clone() for k, v in state0.items()}
            server.round = 1
            return server

        return reset

    def cahfp_round(backend: str):
        reset = new_server()

        def run():
            server = reset()
            with cahfp_ops.use_backend(backend):
                assigned = server.assign(ratios)
                server.aggregate({c: a.state for c, a in assigned.items()})
            return server.state

        return run

    plain_reset = new_server()

    def plain():
        server = plain_reset()
        ids = list(ratios)
        keeps = assign_keep_sets(server.plan, [ratios[c] for c in ids], server.scores(ids))  # masks only
        rows, cols = server.plan.tensor_keep_sets(keeps)
        replies = [_plain_slice(server.state, rows, cols, k) for k in range(K)]
        out = {}
        for key, w in server.state.items():
            if not w.is_floating_point():
                out[key] = w
                continue
            r = rows.get(key, [None] * K)
            c = cols.get(key) if w.dim() > 1 else None
            out[key] = peers.indexadd_reconstruct_aggregate(w, [rep[key] for rep in replies], r, c, [1.0] * K)
        return out

    impls = {f"cahfp[{b}]": cahfp_round(b) for b in cahfp_backends(device)}
    impls["reference"] = cahfp_round("torch")
    impls["plain"] = plain
    # Bytes that must move: slicing reads and writes every compact entry; aggregation reads the
    # global model and every compact entry and writes the model.
    server = plain_reset()
    params = sum(v.numel() for v in server.state.values() if v.is_floating_point())
    compact = sum(v.numel() for a in server.assign(ratios).values() for v in a.state.values() if v.is_floating_point())

    def floating(state):
        return {k: v for k, v in state.items() if v.is_floating_point()}

    return Workload("server_round", f"{name} K={K}", 4 * (2 * params + 3 * compact), impls, compare=floating)


def streaming(name: str, K: int, device: torch.device) -> Workload:
    """A streaming round: K packed clients folded into a ``StreamingAggregator`` in windows of
    the server's ``STREAM_WINDOW`` (partial sums in a reused ``Workspace``, as the server keeps
    them), then its result; peer: plain per-client, per-tensor streaming
    (``peers.plain_streaming_aggregate``)."""
    from cahfp_ops.fl import StreamingAggregator
    from cahfp_ops.fl.server import STREAM_WINDOW

    model, clients, rows, cols, coef = _model_case(name, K, device)
    packed = cahfp_ops.slice_channels_many(model, rows, cols)
    layout = packed[0].layout
    pclients = [cahfp_ops.PackedModel(torch.cat([c[n].reshape(-1) for n in model]), p.layout, p.client)
                for c, p in zip(clients, packed)]  # fmt: skip

    workspace = cahfp_ops.Workspace()  # as the server keeps one across rounds

    def ours():
        agg = StreamingAggregator(model, workspace=workspace)
        for i in range(0, K, STREAM_WINDOW):
            idx = list(range(i, min(K, i + STREAM_WINDOW)))
            agg.add_many([pclients[k] for k in idx], [coef[k] for k in idx], layout=layout, clients=idx)
        return agg.result()

    params = sum(w.numel() for w in model.values())
    client_elems = sum(t.numel() for c in clients for t in c.values())
    impls = {**_ours("streaming", device, ours), "plain": lambda: peers.plain_streaming_aggregate(
        model, clients, rows, cols, coef)}  # fmt: skip
    return Workload("streaming", f"{name} K={K}", 4 * (2 * params + client_elems), impls, tolerance=(1e-4, 1e-5))

SINGLE_OPS: dict[str, Callable[[int, torch.device], Workload]] = {
    "curvature_scores": curvature_scores,
    "topk_channel_masks": topk_channel_masks,
    "slice_channels": slice_channels,
    "reconstruct_aggregate": reconstruct_aggregate,
}
MODEL_OPS: dict[str, Callable[[str, int, torch.device], Workload]] = {
    "reconstruct_aggregate_many": model_aggregate,
    "slice_channels_many": model_slice,
    "server_round": server_round,
    "streaming": streaming,
}
