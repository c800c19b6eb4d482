"""Tracing a model's channel plan: which channels are kept or pruned together (SPEC, "Channel plans").

:func:`trace_plan` traces the model with ``torch.fx``, records every node's tensor shapes with
one forward of a copy, then follows channel *spaces* through the graph:

* a producer (Conv of any dimension, ConvTranspose, Linear, Embedding, an LSTM/GRU's hidden
  size, a transformer layer's feed-forward width) opens a space for the channels it makes;
* every node's output knows which of its dims carry which space (``_Track``: the space, the
  dim's length, and how many copies of the space it holds), so a flatten gives a Linear's
  columns a block of H*W, a split into heads coarsens the space to whole heads;
* element-wise meetings (residual additions, gates, per-channel parameters, attention's batched
  matmuls) unite spaces (union-find), concatenation and splitting place spaces at offsets in one
  another, grouped convolutions and GroupNorm coarsen a space to whole groups;
* what the tracer cannot place leaves the spaces it touches whole, with the reason
  (``plan.frozen``), unless ``strict=True``.

At the end every space that is not frozen becomes one :class:`~cahfp_ops.fl.plan.ChannelGroup`
whose members are the state_dict entries that hold it.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

from .plan import RESIDUAL_MODES, ChannelGroup, ChannelPlan, Member

#: How a plan that prunes little is flagged: the share of conv / linear parameters that ratio 0.5
#: must remove, else :func:`trace_plan` warns.
LOW_PRUNING_SHARE = 0.10


# ---------------------------------------------------------------------- channel spaces
class _Spaces:
    """Union-find over channel spaces with offsets: space s's channel i is channel
    ``off + i`` of its parent. A root holds the granularity (channels per unit, the lcm of
    every coarsening asked of it) and, when it must stay whole, why."""

    def __init__(self) -> None:
        self.parent: list[tuple[int, int]] = []
        self.size: list[int] = []
        self.gran: list[int] = []
        self.why: list[str | None] = []
        self.label: list[str | None] = []
        self.aligned: list[tuple[int, int]] = []  # (space, granularity) pairs to check at the end

    def new(self, size: int, label: str | None = None) -> int:
        self.parent.append((len(self.size), 0))
        self.size.append(int(size))
        self.gran.append(1)
        self.why.append(None)
        self.label.append(label)
        return len(self.size) - 1

    def find(self, s: int) -> tuple[int, int]:
        off = 0
        path = []
        while self.parent[s][0] != s:
            path.append(s)
            p, o = self.parent[s]
            off += o
            s = p
        root = s
        acc = off
        for node in path:  # path compression keeps offsets relative to the root
            o = self.parent[node][1]
            self.parent[node] = (root, acc)
            acc -= o
        return root, off

    def freeze(self, s: int, why: str) -> None:
        r, _ = self.find(s)
        if self.why[r] is None:
            self.why[r] = why

    def coarsen(self, s: int, channels: int) -> None:
        """Space s moves in units of ``channels`` of its channels (whole heads, whole groups)."""
        if channels <= 1:
            return
        r, _ = self.find(s)
        self.gran[r] = math.lcm(self.gran[r], channels)
        self.aligned.append((s, channels))

    def union(self, a: int, b: int, delta: int = 0) -> str | None:
        """Space a's channel j is space b's channel ``j + delta``; a reason when impossible."""
        ra, oa = self.find(a)
        rb, ob = self.find(b)
        shift = ob + delta - oa  # ra's channel i is rb's channel i + shift
        if ra == rb:
            return None if shift == 0 else "couples channels of one space at two different offsets"
        if 0 <= shift and shift + self.size[ra] <= self.size[rb]:
            child, parent, at = ra, rb, shift
        elif shift <= 0 and -shift + self.size[rb] <= self.size[ra]:
            child, parent, at = rb, ra, -shift
        else:  # partial overlap: a new root spanning both
            lo, hi = min(0, shift), max(self.size[ra], shift + self.size[rb])
            top = self.new(hi - lo, self.label[ra] or self.label[rb])
            self.parent[ra] = (top, -lo)
            self.parent[rb] = (top, shift - lo)
            self.gran[top] = math.lcm(self.gran[ra], self.gran[rb])
            self.why[top] = self.why[ra] or self.why[rb]
            return None
        self.parent[child] = (parent, at)
        self.gran[parent] = math.lcm(self.gran[parent], self.gran[child])
        self.why[parent] = self.why[parent] or self.why[child]
        self.label[parent] = self.label[parent] or self.label[child]
        return None


@dataclass(frozen=True)
class _Track:
    """A tensor dim that carries channel space ``space``: ``length`` entries holding ``copies``
    equal stretches of the space (each channel a block of ``length / (copies * size)``)."""

    space: int
    length: int
    copies: int = 1


Tracks = dict  # dim -> _Track; a tuple-valued node holds a tuple of Tracks


@dataclass
class _MemberRecord:
    name: str
    dim: int
    space: int
    length: int
    copies: int = 1


class _Frozen(Exception):
    """Raised by a rule that cannot place an op; the tracer freezes what reaches it."""


# ---------------------------------------------------------------------- tracing
class _PathTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that remembers which module it is inside (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(f"{name or 'the model'} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()


def _traced_with_shapes(model: nn.Module, example_input: Tensor | tuple) -> torch.fx.GraphModule:
    """``model``'s fx graph with tensor shapes recorded on every node.

    Shapes come from one forward of a deep copy in eval mode without autograd, so the
    caller's model stays bit for bit as given (no BatchNorm running stats or
    ``num_batches_tracked`` change, no train/eval flag flips) and a batch of one works.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    probe = copy.deepcopy(model).eval()
    tracer = _PathTracer()
    try:
        graph = tracer.trace(probe)
    except Exception as e:  # torch.fx's TraceError and the errors of data-dependent code
        where = tracer.stack[-1] if tracer.stack else "the model"
        raise ValueError(
            f"trace_plan: torch.fx cannot trace {where}: {type(e).__name__}: {e}. Such code (data-dependent "
            "control flow, calls fx cannot see through) needs its channel groups declared by hand: build a "
            "ChannelPlan([ChannelGroup(name, size, [Member(tensor, dim), ...]), ...]) and pass it as "
            "Server(..., plan=...) (README, 'Models tracing cannot handle')"
        ) from e
    gm = torch.fx.GraphModule(probe, graph)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return gm


def _shape(n: object) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta") if isinstance(n, Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


_ADDS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MULS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_ELEMENTWISE_BINARY = _ADDS | _MULS | {torch.maximum, torch.minimum, torch.where}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_METHODS = {"mul", "mul_", "div", "div_"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "max", "min", "logsumexp", "norm", "prod"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "t"}
_VIEWS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
# Shape-preserving ops that move entries along a dim: they leave the channels they reach whole.
_MIXING = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "flip", "fliplr", "flipud", "roll", "sort",
           "argsort", "rot90", "gather", "scatter", "index_select"}  # fmt: skip
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_PERMUTE_FUNCTIONS = {torch.permute, torch.transpose, torch.movedim, torch.t}
_NON_TENSOR = {"size", "dim", "numel", "ndimension", "type", "get_device"}


def _name(target: object) -> str:
    return getattr(target, "__name__", None) or str(target)


def _norm_dims(dims: object, ndim: int) -> list[int] | None:
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


class _Planner:
    """One pass over the traced graph, building spaces and members (see the module docs)."""

    def __init__(self, gm: torch.fx.GraphModule, state: dict[str, Tensor], residual: str, strict: bool):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.state = state
        self.residual = residual
        self.strict = strict
        self.spaces = _Spaces()
        self.members: list[_MemberRecord] = []
        self.tracks: dict[Node, object] = {}
        self.producers: list[tuple[str, int]] = []  # (producer name, space) in graph order
        self.labels: dict[str, list[str]] = {}  # group name -> its producers

    # ------------------------------------------------------------------ helpers
    def freeze_tracks(self, tracks: object, why: str, unsupported: bool = True) -> None:
        if unsupported and self.strict and _has_tracks(tracks):
            raise ValueError(f"trace_plan: {why} (strict=True); declare the channel groups with ChannelPlan")
        for t in _iter_tracks(tracks):
            self.spaces.freeze(t.space, why)

    def produce(self, size: int, label: str) -> int:
        s = self.spaces.new(size, label)
        self.producers.append((label, s))
        return s

    def member(self, name: str, dim: int, track: _Track) -> None:
        if name in self.state:
            self.members.append(_MemberRecord(name, dim, track.space, track.length, track.copies))

    def param_member(self, name: str, dim: int, space: int, length: int, copies: int = 1) -> None:
        if name in self.state:
            self.members.append(_MemberRecord(name, dim, space, length, copies))

    def unite(self, a: _Track, b: _Track, where: str) -> None:
        sa, sb = self.spaces.size[a.space], self.spaces.size[b.space]
        if a.copies != b.copies or a.length * sb != b.length * sa or sa != sb:
            why = f"{where} meets channels of different layouts"
            self.freeze_tracks({0: a, 1: b}, why)
            return
        why = self.spaces.union(a.space, b.space)
        if why:
            self.freeze_tracks({0: a, 1: b}, f"{where} {why}")

    # ------------------------------------------------------------------ the pass
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.tracks[node] = self.visit(node)
            except _Frozen as e:
                self.freeze_tracks(self.inputs_of(node), str(e))
                self.tracks[node] = {}

    def inputs_of(self, node: Node) -> list:
        return [self.tracks.get(a, {}) for a in _flat((node.args, node.kwargs)) if isinstance(a, Node)]

    def visit(self, node: Node) -> object:
        if node.op == "placeholder":
            return {}
        if node.op == "get_attr":
            return {}
        if node.op == "output":
            self.freeze_tracks(self.inputs_of(node), "feeds the model output", unsupported=False)
            return {}
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        return self.visit_call(node)

    def arg_tracks(self, a: object) -> Tracks:
        t = self.tracks.get(a, {}) if isinstance(a, Node) else {}
        return t if isinstance(t, dict) else {}

    # ------------------------------------------------------------------ modules
    def visit_module(self, node: Node, mod: nn.Module) -> object:
        name = node.target
        x = node.args[0] if node.args else None
        tin = self.arg_tracks(x)
        out_shape = _shape(node)
        in_shape = _shape(x)
        what = f"{name!r} ({type(mod).__name__})"
        if isinstance(mod, nn.modules.conv._ConvNd):
            return self.conv(name, mod, tin, what)
        if isinstance(mod, nn.Linear):
            return self.linear(name, mod, tin, in_shape)
        if isinstance(mod, nn.Embedding):
            s = self.produce(mod.embedding_dim, name)
            self.param_member(f"{name}.weight", 1, s, mod.embedding_dim)
            return {len(out_shape) - 1: _Track(s, mod.embedding_dim)} if out_shape else {}
        if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and not self.norm_fits(mod):
            raise _Frozen(f"reaches {what}, whose shape its state cannot give back (no affine parameters)")
        if isinstance(mod, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*, SyncBatchNorm
            for d, t in tin.items():
                if d == 1:
                    for p in ("weight", "bias", "running_mean", "running_var"):
                        self.member(f"{name}.{p}", 0, t)
            return dict(tin)
        if isinstance(mod, nn.GroupNorm):
            t = tin.get(1)
            if t is not None:
                if mod.num_groups > 1:
                    if t.length != self.spaces.size[t.space] or t.copies != 1:
                        raise _Frozen(f"reaches {what} with its channels in blocks")
                    self.spaces.coarsen(t.space, mod.num_channels // mod.num_groups)
                for p in ("weight", "bias"):
                    self.member(f"{name}.{p}", 0, t)
            return dict(tin)
        if isinstance(mod, nn.LayerNorm):
            nd = len(in_shape)
            first = nd - len(mod.normalized_shape)
            for d, t in tin.items():
                if d >= first:
                    if d - first > 1:
                        raise _Frozen(f"reaches {what} on a normalised dim it cannot prune")
                    for p in ("weight", "bias"):
                        self.member(f"{name}.{p}", d - first, t)
            return dict(tin)
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1 and 1 in tin:
                self.member(f"{name}.weight", 0, tin[1])
            return dict(tin)
        if isinstance(mod, nn.Flatten):
            return self.reshape(tin, in_shape, out_shape, what)
        if isinstance(mod, (nn.LSTM, nn.GRU, nn.RNN)):
            return self.rnn(name, mod, tin, in_shape, what)
        if isinstance(mod, nn.MultiheadAttention):
            return self.mha(node, name, mod, what)
        if isinstance(mod, nn.TransformerEncoderLayer):
            return self.encoder_layer(name, mod, tin, in_shape, what)
        if isinstance(mod, nn.TransformerEncoder):
            for i, layer in enumerate(mod.layers):
                if not isinstance(layer, nn.TransformerEncoderLayer):
                    raise _Frozen(f"reaches {what}, whose layer {i} is not a TransformerEncoderLayer")
                tin = self.encoder_layer(f"{name}.layers.{i}", layer, tin, in_shape, what)
            if mod.norm is not None:
                if not isinstance(mod.norm, nn.LayerNorm) or not self.norm_fits(mod.norm):
                    raise _Frozen(f"reaches {what}, whose final norm it cannot resize")
                for d, t in tin.items():
                    if d == len(in_shape) - 1:
                        for p in ("weight", "bias"):
                            self.member(f"{name}.norm.{p}", 0, t)
            return tin
        if next(mod.parameters(recurse=True), None) is not None or any(True for _ in mod.buffers()):
            raise _Frozen(f"reaches {what}, a module with parameters the tracer does not know")
        # A parameter-free module (activation, dropout, pooling, upsampling, softmax, ...).
        return self.same_dims(tin, in_shape, out_shape, what)

    def norm_fits(self, mod: nn.Module) -> bool:
        """Whether a norm's compact size can be read from its own state (affine or tracked)."""
        if isinstance(mod, nn.LayerNorm):
            return mod.weight is not None
        if isinstance(mod, nn.GroupNorm):
            return mod.weight is not None or mod.num_groups == 1
        return mod.weight is not None or mod.running_mean is not None or not mod.track_running_stats

    def conv(self, name: str, mod: nn.Module, tin: Tracks, what: str) -> Tracks:
        transposed = getattr(mod, "transposed", False)
        for d in tin:
            if d != 1:
                raise _Frozen(f"reaches {what} on dim {d}")
        t = tin.get(1)
        if t is not None and t.copies != 1:
            raise _Frozen(f"reaches {what} with copies of its channels")
        if mod.groups == 1:
            s = self.produce(mod.out_channels, name)
            out_dim = 1 if transposed else 0
            self.param_member(f"{name}.weight", out_dim, s, mod.out_channels)
            self.param_member(f"{name}.bias", 0, s, mod.out_channels)
            if t is not None:
                self.member(f"{name}.weight", 0 if transposed else 1, t)
            return {1: _Track(s, mod.out_channels)}
        if transposed:
            raise _Frozen(f"reaches grouped transposed conv {what}")
        # Grouped or depthwise: pruned in whole groups, in step with the input's space.
        if t is None:
            raise _Frozen(f"{what} is a grouped conv on channels no producer makes")
        size = self.spaces.size[t.space]
        if t.length != size:
            raise _Frozen(f"reaches grouped conv {what} with its channels in blocks")
        self.spaces.coarsen(t.space, mod.in_channels // mod.groups)
        out = _Track(t.space, mod.out_channels)
        self.member(f"{name}.weight", 0, out)
        self.member(f"{name}.bias", 0, out)
        return {1: out}

    def linear(self, name: str, mod: nn.Linear, tin: Tracks, in_shape: tuple) -> Tracks:
        last = len(in_shape) - 1
        s = self.produce(mod.out_features, name)
        self.param_member(f"{name}.weight", 0, s, mod.out_features)
        self.param_member(f"{name}.bias", 0, s, mod.out_features)
        out = {d: t for d, t in tin.items() if d != last}  # batch dims pass through (token mixing)
        if last in tin:
            self.member(f"{name}.weight", 1, tin[last])
        out[last] = _Track(s, mod.out_features)
        return out

    def rnn(self, name: str, mod: nn.Module, tin: Tracks, in_shape: tuple, what: str) -> object:
        if getattr(mod, "proj_size", 0):
            raise _Frozen(f"reaches {what} with proj_size")
        gates = {nn.LSTM: 4, nn.GRU: 3}.get(type(mod), 1)
        dirs = 2 if mod.bidirectional else 1
        last = len(in_shape) - 1
        for d in tin:
            if d != last:
                raise _Frozen(f"reaches {what} on dim {d}")
        prev = tin.get(last)
        H = mod.hidden_size
        hidden = None
        for layer in range(mod.num_layers):
            hidden = self.produce(H, f"{name}.l{layer}")
            for sfx in ("", "_reverse")[:dirs]:
                for p, dim in (("weight_ih", 0), ("weight_hh", 0), ("bias_ih", 0), ("bias_hh", 0)):
                    self.param_member(f"{name}.{p}_l{layer}{sfx}", dim, hidden, gates * H, gates)
                self.param_member(f"{name}.weight_hh_l{layer}{sfx}", 1, hidden, H)
                if prev is not None:
                    self.member(f"{name}.weight_ih_l{layer}{sfx}", 1, prev)
            prev = _Track(hidden, dirs * H, dirs)
        seq = {last: prev}
        state = {2: _Track(hidden, H)}
        return (seq, (state, state)) if isinstance(mod, nn.LSTM) else (seq, state)

    def mha(self, node: Node, name: str, mod: nn.MultiheadAttention, what: str) -> object:
        if not mod._qkv_same_embed_dim or mod.bias_k is not None:
            raise _Frozen(f"reaches {what} with separate key/value widths")
        args = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")][len(node.args[:3]) :]
        shapes = [_shape(a) for a in args]
        E = mod.embed_dim
        tracks = [self.arg_tracks(a).get(len(s) - 1) if s else None for a, s in zip(args, shapes)]
        # Batch and token dims pass through from the query.
        for a, s in zip(args, shapes):
            if any(d != len(s) - 1 for d in self.arg_tracks(a)):
                raise _Frozen(f"reaches {what} on a token dim")
        s = self.produce(E, name) if tracks[0] is None else tracks[0].space
        for t in tracks:
            if t is None:
                raise _Frozen(f"{what}: a query, key or value comes from no producer")
            self.unite(t, _Track(s, E), f"{what}")
        t = _Track(s, E)
        self.spaces.coarsen(s, mod.head_dim)  # whole heads: the residual width in head-sized units
        self.attention_members(name, s, E)
        out = {len(shapes[0]) - 1: t}
        return (out, {})

    def attention_members(self, name: str, s: int, E: int) -> None:
        """An ``nn.MultiheadAttention``'s entries, all in the residual space ``s`` of width E."""
        self.param_member(f"{name}.in_proj_weight", 0, s, 3 * E, 3)  # q, k, v rows: three copies
        self.param_member(f"{name}.in_proj_bias", 0, s, 3 * E, 3)
        self.param_member(f"{name}.in_proj_weight", 1, s, E)
        for p, dim in (("out_proj.weight", 0), ("out_proj.weight", 1), ("out_proj.bias", 0)):
            self.param_member(f"{name}.{p}", dim, s, E)

    def encoder_layer(self, name: str, mod: nn.TransformerEncoderLayer, tin: Tracks, in_shape: tuple,
                      what: str) -> Tracks:  # fmt: skip
        last = len(in_shape) - 1
        t = tin.get(last)
        if t is None or any(d != last for d in tin):
            raise _Frozen(f"reaches {what} on a token dim" if t is not None else f"{what} reads no producer's channels")
        attn = mod.self_attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None:
            raise _Frozen(f"reaches {what} with separate key/value widths")
        E = attn.embed_dim
        self.unite(t, _Track(t.space, E), what)
        s = t.space
        self.spaces.coarsen(s, attn.head_dim)
        self.attention_members(f"{name}.self_attn", s, E)
        hidden = self.produce(mod.linear1.out_features, f"{name}.linear1")
        F_ = mod.linear1.out_features
        self.param_member(f"{name}.linear1.weight", 0, hidden, F_)
        self.param_member(f"{name}.linear1.bias", 0, hidden, F_)
        self.param_member(f"{name}.linear1.weight", 1, s, E)
        self.param_member(f"{name}.linear2.weight", 1, hidden, F_)
        self.param_member(f"{name}.linear2.weight", 0, s, E)
        self.param_member(f"{name}.linear2.bias", 0, s, E)
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                self.param_member(f"{name}.{norm}.{p}", 0, s, E)
        return {last: _Track(s, E)}

    # ------------------------------------------------------------------ functions and methods
    def visit_call(self, node: Node) -> object:
        target = node.target
        is_method = node.op == "call_method"
        label = f"{'.' if is_method else ''}{_name(target)} ({node.name})"
        args = node.args
        out_shape = _shape(node)
        if is_method and target in _NON_TENSOR:
            return {}
        if target is getattr:
            src, attr = args[0], args[1]
            t = self.tracks.get(src, {}) if isinstance(src, Node) else {}
            if isinstance(t, tuple) and attr in ("values", "indices"):  # max(dim) / min(dim) / sort results
                return t[0] if attr == "values" else {}
            if attr in _META_ATTRS or not _has_tracks(t):
                return {}
            if attr in ("T", "mT") and isinstance(t, dict):
                nd = len(_shape(src))
                order = list(range(nd))[::-1] if attr == "T" else [*range(nd - 2), nd - 1, nd - 2]
                return {order.index(d): tt for d, tt in t.items()}
            raise _Frozen(f"reaches attribute .{attr} ({node.name})")
        if target is operator.getitem:
            return self.getitem(node, label)
        tensor_args = [a for a in _flat(args) + _flat(list(node.kwargs.values())) if isinstance(a, Node)]
        tracked = [a for a in tensor_args if _has_tracks(self.tracks.get(a, {}))]
        if not tracked and not any(self.is_param(a) for a in tensor_args):
            return {}
        is_add = (not is_method and target in _ADDS) or (is_method and target in _ADD_METHODS)
        is_mul = (not is_method and target in _MULS) or (is_method and target in _MUL_METHODS)
        if is_add or is_mul or (not is_method and target in _ELEMENTWISE_BINARY):
            if is_add and self.residual == "internal" and sum(1 for a in tensor_args if a in tracked) > 1:
                self.freeze_tracks([self.tracks[a] for a in tracked], f"reaches a residual addition ({node.name})",
                                   unsupported=False)  # fmt: skip
                return {}
            return self.broadcast(node, tensor_args, label)
        if not is_method and target in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(node, label)
        if (is_method and target in ("split", "chunk", "tensor_split", "unbind")) or (
            not is_method and target in (torch.split, torch.chunk, torch.tensor_split, torch.unbind)
        ):
            return self.split(node, label)
        x = args[0] if args else None
        tin = self.arg_tracks(x)
        in_shape = _shape(x)
        if (is_method and target in _VIEWS) or (not is_method and target in _VIEW_FUNCTIONS):
            sizes = None
            if is_method and target in ("view", "reshape"):
                rest = list(args[1:])
                sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            return self.reshape(tin, in_shape, out_shape, label, sizes)
        if (is_method and target in _PERMUTES) or (not is_method and target in _PERMUTE_FUNCTIONS):
            return self.permute(node, tin, in_shape, label)
        torch_function = getattr(target, "__module__", "") in ("torch", None)
        if (is_method and target in _REDUCTIONS) or (not is_method and _name(target) in _REDUCTIONS and torch_function):
            return self.reduce(node, tin, in_shape, out_shape, label)
        if target is F.scaled_dot_product_attention:
            return self.attention(node, label)
        if (is_method and target in ("matmul", "bmm")) or (not is_method and target in (operator.matmul, torch.matmul,
                                                                                          torch.bmm)):  # fmt: skip
            return self.matmul(node, label)
        if (is_method and target == "expand") or (is_method and target == "expand_as"):
            return self.same_dims(tin, in_shape, out_shape, label, expand=True)
        if target is F.pad and tin:
            pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
            nd = len(in_shape)
            padded = {nd - 1 - i // 2 for i, p in enumerate(pad) if p}
            if padded & set(tin):
                raise _Frozen(f"reaches channel padding {label}")
            return dict(tin)
        if _name(target) in _MIXING and tin:
            raise _Frozen(f"reaches {label}, which reorders or mixes entries along a dim")
        if len(tracked) > 1:
            raise _Frozen(f"reaches {label}, which combines several tensors' channels")
        if len(tracked) == 1 and tracked[0] is not x:
            raise _Frozen(f"reaches {label} as a secondary argument")
        # Anything else with one tensor: channels pass when the shape is kept dim for dim.
        return self.same_dims(tin, in_shape, out_shape, label)

    def is_param(self, a: Node) -> bool:
        return self.param_of(a) is not None

    def param_of(self, a: object) -> str | None:
        """The state_dict entry ``a`` is, directly or broadcast by ``expand`` (same rank), or None."""
        while isinstance(a, Node) and a.op == "call_method" and a.target in ("expand", "expand_as", "contiguous"):
            src = a.args[0]
            if _shape(src) is None or _shape(a) is None or len(_shape(src)) != len(_shape(a)):
                return None
            a = src
        if isinstance(a, Node) and a.op == "get_attr" and a.target in self.state:
            return a.target
        return None

    def param_in(self, param: str, d: int, track: _Track, label: str) -> None:
        """Parameter ``param`` holds ``track``'s channels on its dim ``d``."""
        if d > 1:
            shape = tuple(self.state[param].shape)
            why = f"parameter {param!r} {shape} holds the channels on dim {d} in {label}"
            why += " (only dims 0 and 1 can be pruned)"
            self.freeze_tracks({0: track}, why, unsupported=False)
        else:
            self.param_member(param, d, track.space, track.length, track.copies)

    def same_dims(self, tin: Tracks, in_shape, out_shape, label: str, expand: bool = False) -> Tracks:
        if not tin:
            return {}
        if in_shape is None or out_shape is None or len(in_shape) != len(out_shape):
            raise _Frozen(f"reaches {label}, which changes the tensor's rank")
        for d in tin:
            if in_shape[d] != out_shape[d]:
                raise _Frozen(f"reaches {label}, which resizes a channel dim")
        return dict(tin)

    def broadcast(self, node: Node, tensor_args: list, label: str) -> Tracks:
        """Element-wise ops: dims meeting in the output unite; a parameter joins as a member."""
        out_shape = _shape(node)
        if out_shape is None:
            raise _Frozen(f"reaches {label} without a tensor result")
        nd = len(out_shape)
        at: dict[int, list[tuple[Node, int]]] = {}
        for a in tensor_args:
            s = _shape(a)
            if s is None:
                continue
            for d, size in enumerate(s):
                od = d + nd - len(s)
                if size == out_shape[od] and size != 1:
                    at.setdefault(od, []).append((a, d))
        out: Tracks = {}
        for od, entries in at.items():
            ts = [(a, d, self.arg_tracks(a).get(d)) for a, d in entries]
            known = [t for _, _, t in ts if t is not None]
            if not known:
                continue
            first = known[0]
            for t in known[1:]:
                self.unite(first, t, label)
            for a, d, t in ts:
                if t is not None:
                    continue
                param = self.param_of(a)
                if param is not None:
                    self.param_in(param, d, first, label)
                else:
                    self.freeze_tracks({0: first}, f"meets a tensor from no producer in {label}", unsupported=False)
            out[od] = first
        return out

    def getitem(self, node: Node, label: str) -> object:
        src, idx = node.args
        t = self.tracks.get(src, {}) if isinstance(src, Node) else {}
        if isinstance(t, tuple):
            return t[idx] if isinstance(idx, int) and -len(t) <= idx < len(t) else {}
        if not t:
            return {}
        in_shape = _shape(src)
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, (Node, list)) or (hasattr(i, "dim") and not isinstance(i, int)) for i in items):
            raise _Frozen(f"reaches tensor indexing {label}")
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        out: Tracks = {}
        d_in = d_out = 0
        for i in items:
            if i is Ellipsis:
                skip = len(in_shape) - n_real
                for _ in range(skip):
                    if d_in in t:
                        out[d_out] = t[d_in]
                    d_in += 1
                    d_out += 1
            elif i is None:
                d_out += 1
            elif isinstance(i, int):
                if d_in in t:
                    raise _Frozen(f"reaches {label}, which picks one channel")
                d_in += 1
            elif isinstance(i, slice):
                if d_in in t and i != slice(None):
                    if range(*i.indices(in_shape[d_in])) != range(in_shape[d_in]):
                        raise _Frozen(f"reaches {label}, which slices a channel dim")
                if d_in in t:
                    out[d_out] = t[d_in]
                d_in += 1
                d_out += 1
            else:
                raise _Frozen(f"reaches tensor indexing {label}")
        while d_in < len(in_shape):
            if d_in in t:
                out[d_out] = t[d_in]
            d_in += 1
            d_out += 1
        return out

    def reshape(self, tin: Tracks, in_shape, out_shape, label: str, sizes: list | None = None) -> Tracks:
        """Merging dims into a channel dim (its block grows), splitting one (the space moves
        in units of the split-off part), or keeping it; merging it into an earlier dim freezes."""
        if not tin:
            return {}
        if in_shape is None or out_shape is None:
            raise _Frozen(f"reaches {label} without shapes")
        # Row-major suffix products: input dim d spans strides [prod(in[d+1:]), prod(in[d:])).
        sin = [math.prod(in_shape[d:]) for d in range(len(in_shape) + 1)]
        sout = [math.prod(out_shape[o:]) for o in range(len(out_shape) + 1)]
        out: Tracks = {}
        for d, t in tin.items():
            if in_shape[d] == 1:
                continue
            o = next((o for o in range(len(out_shape)) if sout[o] == sin[d] and out_shape[o] != 1), None)
            if o is None:
                raise _Frozen(f"reaches {label}, which merges a channel dim into an earlier dim")
            if sizes is not None and len(sizes) == len(out_shape):
                # A size computed from another tensor (``E`` of ``x.shape``) would not follow
                # the pruning: the compact model would reshape to the wrong width.
                later = [o2 for o2 in range(o, len(out_shape)) if sout[o2] > sin[d + 1]] or [o]
                if any(isinstance(sizes[o2], Node) for o2 in later if o2 != o or sout[o + 1] <= sin[d + 1]):
                    raise _Frozen(f"reaches {label}, which sizes a channel dim with a computed value "
                                  "(write -1 or the unit size, e.g. view(B, T, -1, head_dim))")  # fmt: skip
            if sout[o + 1] <= sin[d + 1]:  # kept, or merged with the dims after it: the block grows
                out[o] = _Track(t.space, t.length * out_shape[o] // in_shape[d], t.copies)
            else:  # split: out_shape[o] leading units of the channel dim
                units = out_shape[o]
                size = self.spaces.size[t.space]
                if t.copies != 1 or in_shape[d] % units or t.length % units or size % units:
                    raise _Frozen(f"reaches {label}, which splits a channel dim unevenly")
                self.spaces.coarsen(t.space, size // units)
                out[o] = _Track(t.space, units, 1)
        return out

    def permute(self, node: Node, tin: Tracks, in_shape, label: str) -> Tracks:
        if not tin:
            return {}
        nd = len(in_shape)
        target = node.target
        args = node.args[1:]
        if target in ("permute", torch.permute):
            order = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
            order = [d % nd for d in order]
        elif target in ("t", torch.t):
            order = [1, 0] if nd == 2 else list(range(nd))
        elif target in ("movedim", torch.movedim):
            src, dst = _norm_dims(args[0], nd), _norm_dims(args[1], nd)
            rest = [d for d in range(nd) if d not in src]
            order = [None] * nd
            for s_, d_ in zip(src, dst):
                order[d_] = s_
            it = iter(rest)
            order = [o if o is not None else next(it) for o in order]
        else:  # transpose / swapaxes / swapdims
            a, b = (d % nd for d in args[:2])
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        return {order.index(d): t for d, t in tin.items()}

    def reduce(self, node: Node, tin: Tracks, in_shape, out_shape, label: str) -> Tracks:
        if not tin:
            return {}
        nd = len(in_shape)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if isinstance(dims, Node):
            raise _Frozen(f"reaches {label} over a computed dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool)
                               else False)  # fmt: skip
        red = _norm_dims(dims, nd) if dims is not None else list(range(nd))
        out: Tracks = {}
        for d, t in tin.items():
            if d in red:
                continue  # the channels are reduced away: nothing downstream sees them
            out[d if keep else d - sum(1 for r in red if r < d)] = t
        if node.target in ("max", "min") and dims is not None:
            return (out, {})
        return out

    def matmul(self, node: Node, label: str) -> Tracks:
        a, b = node.args[:2]
        sa, sb = _shape(a), _shape(b)
        so = _shape(node)
        ta, tb = self.arg_tracks(a), self.arg_tracks(b)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
            raise _Frozen(f"reaches {label}")
        na, nb, no = len(sa), len(sb), len(so)
        out: Tracks = {}
        # contracted dims: a's last and b's second-to-last hold the same channels
        ca, cb = ta.get(na - 1), tb.get(nb - 2)
        if ca is not None and cb is not None:
            self.unite(ca, cb, label)
        elif ca is not None or cb is not None:
            other = b if ca is not None else a
            if self.is_param(other):
                raise _Frozen(f"reaches {label} against a parameter")
        if na - 2 in ta:
            out[no - 2] = ta[na - 2]
        if nb - 1 in tb:
            out[no - 1] = tb[nb - 1]
        # batch dims broadcast like an element-wise op
        for d in range(no - 2):
            da, db = d - (no - na), d - (no - nb)
            xa = ta.get(da) if da >= 0 and sa[da] == so[d] else None
            xb = tb.get(db) if db >= 0 and sb[db] == so[d] else None
            if xa is not None and xb is not None:
                self.unite(xa, xb, label)
            if xa is not None or xb is not None:
                out[d] = xa or xb
        return out

    def attention(self, node: Node, label: str) -> Tracks:
        """``scaled_dot_product_attention(q, k, v)``: batch (head) dims meet element-wise, q's
        and k's feature dims are contracted together; the result has q's tokens, v's features."""
        q, k, v = (node.args + tuple(node.kwargs.get(n) for n in ("query", "key", "value")))[:3]
        sq, sk, sv = _shape(q), _shape(k), _shape(v)
        tq, tk, tv = self.arg_tracks(q), self.arg_tracks(k), self.arg_tracks(v)
        if node.kwargs.get("attn_mask") is not None or len(node.args) > 3 or None in (sq, sk, sv):
            raise _Frozen(f"reaches {label} with a mask")
        nd = len(sq)
        if len(sk) != nd or len(sv) != nd:
            raise _Frozen(f"reaches {label}")
        if tq.get(nd - 1) is not None and tk.get(nd - 1) is not None:
            self.unite(tq[nd - 1], tk[nd - 1], label)
        elif (nd - 1) in tq or (nd - 1) in tk:
            raise _Frozen(f"reaches {label} with features of one side only")
        if (nd - 2) in tk or (nd - 2) in tv:
            raise _Frozen(f"reaches {label} with key tokens as channels")
        out: Tracks = {}
        for d in range(nd - 2):
            ts = [t.get(d) for t in (tq, tk, tv) if t.get(d) is not None]
            for t in ts[1:]:
                self.unite(ts[0], t, label)
            if ts:
                out[d] = ts[0]
        if (nd - 2) in tq:
            out[nd - 2] = tq[nd - 2]
        if (nd - 1) in tv:
            out[nd - 1] = tv[nd - 1]
        return out

    def cat(self, node: Node, label: str) -> Tracks:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        shapes = [_shape(p) for p in parts]
        if not parts or any(s is None for s in shapes) or not isinstance(dim, int):
            raise _Frozen(f"reaches {label}")
        nd = len(shapes[0])
        dim %= nd
        out: Tracks = {}
        # dims other than the concatenated one meet element-wise
        for d in range(nd):
            if d == dim:
                continue
            ts = [self.arg_tracks(p).get(d) for p in parts]
            known = [t for t in ts if t is not None]
            if known:
                for t in known[1:]:
                    self.unite(known[0], t, label)
                for p, t in zip(parts, ts):
                    if t is None:
                        param = self.param_of(p)
                        if param is not None:
                            self.param_in(param, d, known[0], label)
                        else:
                            self.freeze_tracks({0: known[0]}, f"meets a tensor from no producer in {label}",
                                               unsupported=False)  # fmt: skip
                out[d] = known[0]
        ts = [self.arg_tracks(p).get(dim) for p in parts]
        if any(t is not None for t in ts):
            total = sum(s[dim] for s in shapes)
            whole = self.spaces.new(total, None)
            off = 0
            for t, s in zip(ts, shapes):
                if t is None:
                    piece = self.spaces.new(s[dim], None)
                    self.spaces.union(piece, whole, off)
                    self.spaces.freeze(piece, f"concatenated with channels from no producer in {label}")
                elif t.copies != 1 or t.length != self.spaces.size[t.space]:
                    self.freeze_tracks({0: t}, f"concatenated in blocks in {label}")
                    self.spaces.freeze(whole, f"concatenated in blocks in {label}")
                else:
                    why = self.spaces.union(t.space, whole, off)
                    if why:
                        self.freeze_tracks({0: t}, f"{label} {why}")
                off += s[dim]
            out[dim] = _Track(whole, total)
        return out

    def split(self, node: Node, label: str) -> object:
        x = node.args[0]
        t_in = self.arg_tracks(x)
        in_shape = _shape(x)
        target = node.target if isinstance(node.target, str) else node.target.__name__
        nd = len(in_shape)
        if target == "unbind":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % nd
            if dim in t_in:
                raise _Frozen(f"reaches {label}, which unbinds a channel dim")
            n = in_shape[dim]
            return tuple({(d if d < dim else d - 1): t for d, t in t_in.items()} for _ in range(n))
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % nd
        kw = node.kwargs
        arg = node.args[1] if len(node.args) > 1 else kw.get("split_size_or_sections", kw.get("chunks"))
        L = in_shape[dim]
        if target == "chunk":
            step = -(-L // arg)
            sizes = [min(step, L - i) for i in range(0, L, step)]
        elif target == "tensor_split" or isinstance(arg, (list, tuple)) and target != "split":
            raise _Frozen(f"reaches {label}")
        elif isinstance(arg, int):
            sizes = [min(arg, L - i) for i in range(0, L, arg)]
        else:
            sizes = list(arg)
        if dim not in t_in:
            return tuple(dict(t_in) for _ in sizes)
        t = t_in[dim]
        if t.copies != 1 or t.length != self.spaces.size[t.space]:
            raise _Frozen(f"reaches {label}, which splits channels held in blocks")
        outs, off = [], 0
        for n in sizes:
            piece = self.spaces.new(n, None)
            self.spaces.union(piece, t.space, off)
            o = {d: tt for d, tt in t_in.items() if d != dim}
            o[dim] = _Track(piece, n)
            outs.append(o)
            off += n
        return tuple(outs)

    # ------------------------------------------------------------------ the plan
    def plan(self) -> ChannelPlan:
        sp = self.spaces
        for s, _ in sp.aligned:
            r, off = sp.find(s)
            if off % sp.gran[r] or sp.size[s] % sp.gran[r]:
                sp.freeze(r, f"its channels must move in units of {sp.gran[r]}, which a part of it does not fill")
        by_root: dict[int, list[_MemberRecord]] = {}
        for m in self.members:
            by_root.setdefault(sp.find(m.space)[0], []).append(m)
        claimed: dict[tuple[str, int], int] = {}
        for r, ms in by_root.items():
            for m in ms:
                key = (m.name, m.dim)
                if key in claimed and claimed[key] != r:
                    why = f"{m.name!r} dim {m.dim} holds channels of two groups"
                    sp.freeze(r, why)
                    sp.freeze(claimed[key], why)
                claimed.setdefault(key, r)
        groups: list[ChannelGroup] = []
        frozen: dict[str, str] = {}
        roots_of_producers: dict[int, list[str]] = {}
        for label, s in self.producers:
            roots_of_producers.setdefault(sp.find(s)[0], []).append(label)
        for r, labels in roots_of_producers.items():
            gran = sp.gran[r]
            units = sp.size[r] // gran
            why = sp.why[r]
            members: list[Member] = []
            if why is None and units <= 1:
                why = "a single channel (or unit of channels)"
            if why is None:
                seen = set()
                for m in by_root.get(r, []):
                    _, off = sp.find(m.space)
                    n = sp.size[m.space] // gran
                    if m.length % (m.copies * n):
                        why = f"{m.name!r} holds its channels in uneven blocks"
                        break
                    key = (m.name, m.dim)
                    if key in seen:
                        continue
                    seen.add(key)
                    members.append(Member(m.name, m.dim, m.length // (m.copies * n), off // gran, m.copies,
                                          None if (off == 0 and n == units) else n))  # fmt: skip
            if why is not None:
                for label in labels:
                    frozen[label] = why
                continue
            groups.append(ChannelGroup(labels[0], units, members))
            self.labels[labels[0]] = labels
        return ChannelPlan(groups, frozen)


def _flat(x: object) -> list:
    out = []
    torch.fx.node.map_aggregate(x, lambda a: out.append(a))
    return out


def _iter_tracks(tracks: object):
    if isinstance(tracks, dict):
        yield from tracks.values()
    elif isinstance(tracks, (tuple, list)):
        for t in tracks:
            yield from _iter_tracks(t)


def _has_tracks(tracks: object) -> bool:
    return next(_iter_tracks(tracks), None) is not None


def trace_plan(
    model: nn.Module,
    example_input: Tensor | tuple,
    residual: str = "tie",
    *,
    strict: bool = False,
    warn: bool = True,
) -> ChannelPlan:
    """The prunable channel groups of ``model``, found by tracing it with ``torch.fx``.

    Args:
        model: any ``nn.Module`` ``torch.fx`` can trace; the layers and ops it knows are listed
            in SPEC.md ("Channel plans") and docs/DESIGN.md.
        example_input: one input batch (a tensor, or a tuple of the forward's arguments); its
            shapes size the blocks (a flatten into a Linear) and check the reshapes.
        residual: ``"tie"`` (default): channels that meet in an addition form one group, pruned
            together (residual streams, as Torch-Pruning does); ``"internal"``: channels that
            reach an addition stay whole, so only block-internal channels are pruned.
        strict: raise on the first op or module the tracer cannot place, instead of leaving
            its channels whole (``plan.frozen`` says why for each).
        warn: warn (``UserWarning``, once per call) when the plan prunes no group, or under a
            tenth of the parameters at ratio 0.5.

    Raises:
        ValueError: the model cannot be traced (data-dependent control flow: the message names
            the module and how to declare the plan by hand), a bad ``residual``, or with
            ``strict=True`` an op the tracer cannot place.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
        >>> plan = trace_plan(model, torch.randn(2, 3, 4, 4))
        >>> [(g.name, g.size) for g in plan.groups]  # the conv's 16 filters; the classifier's rows stay
        [('0', 16)]
        >>> [(m.name, m.dim, m.block) for m in plan.groups[0].members][-1]  # 2 x 2 columns per channel
        ('4.weight', 1, 4)
    """
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"trace_plan: residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    gm = _traced_with_shapes(model, example_input)
    state = dict(model.state_dict())
    planner = _Planner(gm, state, residual, strict)
    planner.run()
    plan = planner.plan()
    plan.check(state)
    plan = _verified(plan, planner.labels, model, example_input, gm, state, strict)
    if warn:
        _warn_if_little(plan, state, model)
    return plan


def _output_shapes(gm: torch.fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [_shape(a) for a in _flat(out.args)]


def _compact_failure(groups: list[ChannelGroup], model: nn.Module, inputs: tuple, want: list,
                     state: dict[str, Tensor]) -> str | None:  # fmt: skip
    """Why a compact copy of ``model`` pruned in ``groups`` (about half of each group's
    channels) does not run ``inputs`` to outputs shaped ``want``; None when it does."""
    from .compact import build_compact, extract

    keeps = {g.name: torch.arange(0, g.size, 2) for g in groups}
    try:
        compact = build_compact(model, extract(state, ChannelPlan(groups), [keeps])[0]).eval()
        with torch.no_grad():
            got = compact(*inputs)
    except Exception as e:  # any failure of the compact model is the plan's fault
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else None for t in _flat(got)]
    if shapes != want:
        return f"the compact model's outputs have shapes {shapes}, the model's {want}"
    return None


def _verified(plan: ChannelPlan, labels: dict[str, list[str]], model: nn.Module, example_input, gm,
              state: dict[str, Tensor], strict: bool) -> ChannelPlan:  # fmt: skip
    """``plan`` after a check that a compact copy of the model runs the example input to outputs
    of the full model's shapes; a group whose pruning breaks it is left whole (and says why)."""
    if not plan.groups:
        return plan
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    inputs = tuple(x[:1] if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] > 1 else x for x in inputs)
    want = _output_shapes(gm)
    want = [None if s is None else (1, *s[1:]) if s and s[0] == _batch_of(example_input) else s for s in want]
    why = _compact_failure(plan.groups, model, inputs, want, state)
    if why is None:
        return plan
    if strict:
        raise ValueError(f"trace_plan: the plan's compact model does not run ({why}) (strict=True)")
    frozen = dict(plan.frozen)
    groups = []
    for g in plan.groups:
        reason = _compact_failure([g], model, inputs, want, state)
        if reason is None:
            groups.append(g)
        else:
            for label in labels.get(g.name, [g.name]):
                frozen[label] = f"pruning it breaks the compact model ({reason})"
    if groups and _compact_failure(groups, model, inputs, want, state) is not None:
        for g in groups:
            for label in labels.get(g.name, [g.name]):
                frozen[label] = "pruned with the other groups it breaks the compact model"
        groups = []
    return ChannelPlan(groups, frozen)


def _batch_of(example_input) -> int | None:
    x = example_input[0] if isinstance(example_input, tuple) else example_input
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else None


def _warn_if_little(plan: ChannelPlan, state: dict[str, Tensor], model: nn.Module) -> None:
    total = sum(v.numel() for v in state.values() if v.is_floating_point())
    kept = plan.kept_share(0.5, state)
    if plan.groups and 1.0 - kept >= LOW_PRUNING_SHARE:
        return
    # the biggest layers left whole, and why
    whole = sorted(((state[f"{p}.weight"].numel(), p) for p in plan.frozen if f"{p}.weight" in state), reverse=True)
    names = ", ".join(f"{p!r} ({plan.frozen[p]})" for _, p in whole[:3]) or "none found"
    what = f"prunes {100 * (1 - kept):.1f} % of the parameters at ratio 0.5"
    if not plan.groups:
        what = "prunes no channel group"
    warnings.warn(
        f"trace_plan: the plan of {type(model).__name__} ({total} parameters) {what}; the biggest layers left "
        f"whole: {names}. See plan.frozen, or declare the groups with ChannelPlan.",
        UserWarning,
        stacklevel=3,
    )


__all__ = ["LOW_PRUNING_SHARE", "trace_plan"]
