"""Compact client models: physically smaller copies of a model, and their cost.

:func:`extract` slices every client's compact state_dict from the global model in one
``slice_channels_many`` call; :func:`build_compact` turns any such state_dict (server or
client side) into a real, smaller ``nn.Module`` whose forward runs; :func:`count_params` and
:func:`count_flops` report what the client downloads and computes.
"""

from __future__ import annotations

import copy
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

    Conv2d / Linear / BatchNorm layers take their channel counts from the tensors; the
    architecture is otherwise unchanged. Raises ValueError naming the module when a tensor
    cannot be placed (a grouped conv, a missing key).
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
    for name, mod in compact.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise ValueError(f"build_compact: grouped conv {name!r} cannot be resized")
            mod.out_channels, mod.in_channels = mod.weight.shape[0], mod.weight.shape[1]
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            mod.num_features = ref.shape[0]
    return compact


def count_params(model_or_state: nn.Module | Mapping[str, Tensor]) -> int:
    """Trainable parameter count of a module, or element count of a state_dict's floating entries."""
    if isinstance(model_or_state, nn.Module):
        return sum(p.numel() for p in model_or_state.parameters())
    return sum(v.numel() for v in model_or_state.values() if v.is_floating_point())


def count_flops(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Per-sample cost of ``model`` on inputs shaped like ``example_input``.

    ``macs``: multiply-accumulates of Conv2d and Linear layers (the dominant cost; norms,
    activations and pooling are not counted). ``forward_flops`` = 2 * macs;
    ``training_flops`` = 3 * forward_flops (forward, plus a backward of about twice the forward).
    """
    macs = 0

    def hook(mod, inputs, output):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            per_out = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            macs += (output.numel() // output.shape[0]) * per_out
        elif isinstance(mod, nn.Linear):
            macs += (output.numel() // output.shape[0]) * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
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
