"""Whole-model state_dicts and per-client channel plans for the benchmarks, built from the
model zoo and :func:`cahfp_ops.fl.trace_plan` (its defaults): CIFAR VGG-16 with BatchNorm (every
conv's filters pruned, with its bias, BatchNorm and the next layer's inputs), CIFAR ResNet-56
(block-internal channels: its zero-padded shortcuts keep the residual streams whole), and on
request the ImageNet-sized ResNet-50 (residual streams tied across each stage) and ViT-Small/16
(whole heads, feed-forward widths, the residual width)."""

from __future__ import annotations

import torch

from cahfp_ops.fl import resnet56, trace_plan, vgg16
from cahfp_ops.fl.zoo import ResNet, ViT, resnet50, vit_small
from common import TINY, random_keep

MODELS = {"vgg16": vgg16, "resnet56": resnet56, "resnet50": resnet50, "vit_small": vit_small}
#: each model's input size (height = width)
IMAGE = {"vgg16": 32, "resnet56": 32, "resnet50": 224, "vit_small": 224}
if TINY:  # CAHFP_BENCH_TINY=1 (dry runs): the same structure, a fraction of the size
    MODELS = {"vgg16": lambda: vgg16(width=1 / 16), "resnet56": lambda: ResNet(depth=8),
              "resnet50": lambda: resnet50(num_classes=10), "vit_small": lambda: ViT(32, 8, 32, 2, 4, 64, 10)}
    IMAGE = {**IMAGE, "resnet50": 32, "vit_small": 32}


def example_input(name: str, device="cpu") -> torch.Tensor:
    """One input batch for model ``name``."""
    return torch.randn(1, 3, IMAGE[name], IMAGE[name], device=device)


def channel_plan(name: str, K: int, ratios: list[float], gen: torch.Generator, device="cpu"):
    """(shapes, rows, cols): floating state_dict entry -> shape, and tensor name -> K keep sets
    (entries no group touches are absent: all channels), from random per-client group keep sets."""
    model = MODELS[name]()
    plan = trace_plan(model, example_input(name))
    group_keeps = [{g.name: random_keep(g.size, ratios[k], gen).to(device) for g in plan.groups} for k in range(K)]
    rows, cols = plan.tensor_keep_sets(group_keeps)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    return shapes, rows, cols


def make_model(shapes: dict, gen: torch.Generator, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=gen).to(device=device, dtype=dtype) for k, s in shapes.items()}


def make_client_models(shapes, rows, cols, K: int, gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """K compact client state_dicts with random values, shaped by the plan."""
    out = []
    for k in range(K):
        m = {}
        for key, shape in shapes.items():
            nr = shape[0] if key not in rows or rows[key][k] is None else rows[key][k].numel()
            if len(shape) == 1:
                s = (nr,)
            else:
                nc = shape[1] if key not in cols or cols[key][k] is None else cols[key][k].numel()
                s = (nr, nc, *shape[2:])
            m[key] = torch.randn(s, generator=gen).to(device=device, dtype=dtype)
        out.append(m)
    return out
