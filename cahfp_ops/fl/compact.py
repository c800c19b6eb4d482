"""Compact client models: physically smaller copies of a model, and their cost.

:func:`extract` slices every client's compact state_dict from the global model in one
``slice_channels_many`` call; :func:`build_compact` turns any such state_dict (server or
client side) into a real, smaller ``nn.Module`` whose forward runs; :func:`count_params` and
:func:`count_flops` report what the client downloads and computes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from cahfp_ops import slice_channels_many

from .plan import ChannelPlan


def extract(
    state: Mapping[str, Tensor], plan: ChannelPlan, group_keeps: Sequence[Mapping[str, Tensor | None]]
) -> list[dict[str, Tensor]]:
    """Every client's compact state_dict (one slicing call for all clients and tensors).

    ``group_keeps[k][group]``: client k's kept channels (None or missing: all). Floating
    entries are sliced; other entries (e.g. ``num_batches_tracked``) are copied.
    """
    rows, cols = plan.tensor_keep_sets(group_keeps)
    K = len(group_keeps)
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    sliced = slice_channels_many(floats, rows, cols, num_clients=K)
    out = []
    for k in range(K):
        sd = {}
        for name, v in state.items():
            sd[name] = sliced[k][name] if name in floats else v.clone()
        out.append(sd)
    return out


def build_compact(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` resized to ``state``'s shapes and loaded with it.

    Every layer a plan may prune takes its sizes from its own tensors: convolutions of any
    dimension (grouped and depthwise ones keep their channels per group: ``groups`` follows
    the output count), ConvTranspose, Linear, BatchNorm / InstanceNorm / GroupNorm (its
    ``num_groups`` follows whole groups) / LayerNorm (``normalized_shape``), PReLU, Embedding,
    ``nn.MultiheadAttention`` (whole heads: ``num_heads`` follows the width), LSTM / GRU / RNN.
    The architecture is otherwise unchanged. Raises ValueError naming the entry the model
    lacks.
    """
    compact = copy.deepcopy(model)
    modules = dict(compact.named_modules())
    for name, tensor in state.items():
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None or not hasattr(mod, attr):
            raise ValueError(f"build_compact: the model has no entry {name!r}")
        current = getattr(mod, attr)
        if isinstance(current, nn.Parameter):
            setattr(mod, attr, nn.Parameter(tensor.detach().clone(), requires_grad=current.requires_grad))
        else:
            mod._buffers[attr] = tensor.detach().clone()
    for mod in compact.modules():
        _resize(mod)
    return compact


def _resize(mod: nn.Module) -> None:
    """Set ``mod``'s size attributes from its (already replaced) tensors."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        if mod.transposed:  # (in, out / groups, *k)
            groups = mod.groups * w.shape[0] // mod.in_channels if mod.groups > 1 else 1
            mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * groups
        else:  # (out, in / groups, *k)
            groups = mod.groups * w.shape[0] // mod.out_channels if mod.groups > 1 else 1
            mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * groups
        mod.groups = groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        if ref is not None:
            mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.GroupNorm):
        if mod.weight is not None:
            C = mod.weight.shape[0]
            mod.num_groups = 1 if mod.num_groups == 1 else mod.num_groups * C // mod.num_channels
            mod.num_channels = C
    elif isinstance(mod, nn.LayerNorm):
        if mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = mod.weight.numel()
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = mod.weight.shape
    elif isinstance(mod, nn.MultiheadAttention):
        E = mod.out_proj.weight.shape[0]
        mod.num_heads = max(1, E // mod.head_dim)
        mod.embed_dim = mod.kdim = mod.vdim = E
    elif isinstance(mod, nn.RNNBase):
        mod.input_size = mod.weight_ih_l0.shape[1]
        mod.hidden_size = mod.weight_hh_l0.shape[1]
        mod._init_flat_weights()


def count_params(model_or_state: nn.Module | Mapping[str, Tensor]) -> int:
    """Trainable parameter count of a module, or element count of a state_dict's floating entries."""
    if isinstance(model_or_state, nn.Module):
        return sum(p.numel() for p in model_or_state.parameters())
    return sum(v.numel() for v in model_or_state.values() if v.is_floating_point())


def count_flops(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Per-sample cost of ``model`` on inputs shaped like ``example_input``.

    ``macs``: multiply-accumulates of convolution (any dimension, transposed too) and Linear
    layers called as modules (the dominant cost; norms, activations, pooling, attention's
    score products and recurrent cells are not counted). ``forward_flops`` = 2 * macs;
    ``training_flops`` = 3 * forward_flops (forward, plus a backward of about twice the forward).
    """
    macs = 0

    def hook(mod, inputs, output):
        nonlocal macs
        if isinstance(mod, nn.modules.conv._ConvNd):
            kernel = math.prod(mod.kernel_size)
            if mod.transposed:
                x = inputs[0]
                macs += (x.numel() // x.shape[0]) * (mod.out_channels // mod.groups) * kernel
            else:
                macs += (output.numel() // output.shape[0]) * (mod.in_channels // mod.groups) * kernel
        elif isinstance(mod, nn.Linear):
            macs += (output.numel() // output.shape[0]) * mod.in_features

    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for m, training in flags:  # each module's own flag, as the caller had it
            m.training = training
        for h in handles:
            h.remove()
    return {"macs": macs, "forward_flops": 2 * macs, "training_flops": 6 * macs}
