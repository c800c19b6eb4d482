"""Whole-model state_dicts for the benchmarks (CIFAR VGG-16 with BatchNorm, CIFAR ResNet-56)
and random channel plans: per tensor, per client keep sets for rows and cols."""

from __future__ import annotations

import torch

from common import VGG16_WIDTHS, random_keep


def vgg16_bn(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    shapes, cin = {}, 3
    for i, w in enumerate(VGG16_WIDTHS):
        shapes[f"features.{i}.conv.weight"] = (w, cin, 3, 3)
        shapes[f"features.{i}.conv.bias"] = (w,)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"features.{i}.bn.{p}"] = (w,)
        cin = w
    shapes["classifier.weight"] = (num_classes, cin)
    shapes["classifier.bias"] = (num_classes,)
    return shapes


def resnet56(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """He et al.'s CIFAR ResNet-56: 3 stages x 9 BasicBlocks, widths 16/32/64, parameter-free
    (option A) shortcuts."""
    shapes = {"conv1.weight": (16, 3, 3, 3)}
    for p in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"bn1.{p}"] = (16,)
    cin = 16
    for s, w in enumerate((16, 32, 64)):
        for b in range(9):
            pre = f"layer{s + 1}.{b}"
            shapes[f"{pre}.conv1.weight"] = (w, cin, 3, 3)
            for p in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{pre}.bn1.{p}"] = (w,)
            shapes[f"{pre}.conv2.weight"] = (w, w, 3, 3)
            for p in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{pre}.bn2.{p}"] = (w,)
            cin = w
    shapes["fc.weight"] = (num_classes, 64)
    shapes["fc.bias"] = (num_classes,)
    return shapes


MODELS = {"vgg16": vgg16_bn, "resnet56": resnet56}


def channel_plan(name: str, K: int, ratios: list[float], gen: torch.Generator, device="cpu"):
    """(rows, cols): dicts tensor name -> list of K keep sets (absent: all channels).

    VGG-16: every conv's filters are pruned, with its bias, BatchNorm and the next layer's
    inputs (the classifier's inputs for the last conv). ResNet-56: block-internal channels
    only (conv1 filters of each block, its bn1, and conv2's inputs); the residual stream stays whole.
    """
    rows: dict = {}
    cols: dict = {}
    shapes = MODELS[name]()
    if name == "vgg16":
        prev = None
        for i, w in enumerate(VGG16_WIDTHS):
            keep = [random_keep(w, ratios[k], gen).to(device) for k in range(K)]
            for p in ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
                rows[f"features.{i}.{p}"] = keep
            if prev is not None:
                cols[f"features.{i}.conv.weight"] = prev
            prev = keep
        cols["classifier.weight"] = prev
    else:
        for key, shape in shapes.items():
            if key.endswith(".conv1.weight") and key.startswith("layer"):
                pre = key[: -len(".conv1.weight")]
                keep = [random_keep(shape[0], ratios[k], gen).to(device) for k in range(K)]
                rows[key] = keep
                for p in ("weight", "bias", "running_mean", "running_var"):
                    rows[f"{pre}.bn1.{p}"] = keep
                cols[f"{pre}.conv2.weight"] = keep
    return shapes, rows, cols


def make_model(shapes: dict, gen: torch.Generator, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=gen).to(device=device, dtype=dtype) for k, s in shapes.items()}


def make_client_models(shapes, rows, cols, K: int, gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """K compact client state_dicts with random values, shaped by the plan."""
    out = []
    for k in range(K):
        m = {}
        for key, shape in shapes.items():
            nr = shape[0] if key not in rows else rows[key][k].numel()
            if len(shape) == 1:
                s = (nr,)
            else:
                nc = shape[1] if key not in cols else cols[key][k].numel()
                s = (nr, nc, *shape[2:])
            m[key] = torch.randn(s, generator=gen).to(device=device, dtype=dtype)
        out.append(m)
    return out
