"""Model zoo: CIFAR VGG-11/16 and ResNet-20/32/56 with the standard widths, a small CNN and an
MLP for 8x8 and 28x28 inputs, and two ImageNet-sized models for benchmarks (ResNet-50 and a
ViT-Small/16). Plain ``nn.Module`` code that ``torch.fx`` traces, so
:func:`cahfp_ops.fl.trace_plan` finds their prunable channel groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: 3x3 convs, 2x2 max-pools, one linear classifier (32x32 inputs)."""

    def __init__(self, config: str = "vgg16", num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in VGG_CONFIGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, int(v * width))
            layers += [nn.Conv2d(cin, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            cin = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """CIFAR ResNet block; stage transitions use the parameter-free (option A) shortcut:
    subsample by 2 and zero-pad the new channels, or with ``shortcut="conv"`` (option B) a 1x1
    strided conv and BatchNorm."""

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "pad"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        change = stride != 1 or cin != planes
        self.pad = planes - cin if change and shortcut == "pad" else 0
        self.stride = stride
        self.down = None
        if change and shortcut == "conv":
            self.down = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.down is None else self.down(x)
        if self.pad:
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers): widths 16/32/64, n BasicBlocks per stage."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: str = "pad"):
        super().__init__()
        if shortcut not in ("pad", "conv"):
            raise ValueError(f"ResNet: shortcut must be 'pad' or 'conv', got {shortcut!r}")
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for b in range(n):
                blocks.append(BasicBlock(cin, planes, 2 if stage > 0 and b == 0 else 1, shortcut))
                cin = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; the first linear consumes channel x spatial blocks."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        spatial = (image_size // 4) ** 2
        self.fc1 = nn.Linear(2 * width * spatial, 4 * width)
        self.dropout = nn.Dropout(0.1)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = self.dropout(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


class MLP(nn.Module):
    """Flatten, then hidden linear layers with ReLU, then the classifier."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3 (stride here), 1x1 expand (x4), projection shortcut
    (1x1 conv + BatchNorm) where the shape changes."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ImageNet ResNet-50 (3, 4, 6, 3 bottlenecks; 25.6 M parameters at 1000 classes), 224x224 inputs."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for stage, (planes, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            for b in range(n):
                blocks.append(Bottleneck(cin, planes, 2 if stage and not b else 1))
                cin = planes * 4
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1))


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections ``(B, T, E)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # -1 heads of head_dim: pruning whole heads keeps it valid
            return t.view(B, T, -1, self.head_dim).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(B, T, -1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Vision transformer: patch embedding, a learned position embedding ``(tokens, dim)``,
    pre-norm blocks, mean-pooled tokens. (The embedding is 2-D so the residual width can be
    pruned: a ``(1, tokens, dim)`` parameter holds it on dim 2, which plans cannot prune.)"""

    def __init__(self, image_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp: int = 1536, num_classes: int = 1000, in_channels: int = 3):  # fmt: skip
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(0.02 * torch.randn((image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def vgg11(num_classes: int = 10, **kw) -> VGG:
    return VGG("vgg11", num_classes, **kw)


def vgg16(num_classes: int = 10, **kw) -> VGG:
    return VGG("vgg16", num_classes, **kw)


def resnet20(num_classes: int = 10, **kw) -> ResNet:
    return ResNet(20, num_classes, **kw)


def resnet32(num_classes: int = 10, **kw) -> ResNet:
    return ResNet(32, num_classes, **kw)


def resnet56(num_classes: int = 10, **kw) -> ResNet:
    return ResNet(56, num_classes, **kw)


def resnet20b(num_classes: int = 10, **kw) -> ResNet:
    """ResNet-20 with projection (option B) shortcuts: its residual streams can be pruned."""
    return ResNet(20, num_classes, shortcut="conv", **kw)


def small_cnn(image_size: int = 8, in_channels: int = 1, num_classes: int = 10, **kw) -> SmallCNN:
    """For 8x8 (digits) or 28x28 (FashionMNIST) single-channel images."""
    return SmallCNN(in_channels, num_classes, image_size, **kw)


def mlp(image_size: int = 8, in_channels: int = 1, num_classes: int = 10, **kw) -> MLP:
    return MLP(in_channels * image_size * image_size, num_classes=num_classes, **kw)


def resnet50(num_classes: int = 1000, **kw) -> ResNet50:
    """ImageNet ResNet-50 for 224x224 inputs."""
    return ResNet50(num_classes, **kw)


def vit_small(num_classes: int = 1000, **kw) -> ViT:
    """ViT-Small/16 (dim 384, 12 blocks, 6 heads, 22 M parameters) for 224x224 inputs."""
    return ViT(num_classes=num_classes, **kw)


ZOO = {
    "vgg11": vgg11,
    "vgg16": vgg16,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet20b": resnet20b,
    "small_cnn": small_cnn,
    "mlp": mlp,
    "resnet50": resnet50,
    "vit_small": vit_small,
}
