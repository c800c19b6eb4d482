"""Model zoo: CIFAR VGG-11/16 and ResNet-20/32/56 with the standard widths, a small CNN and an
MLP for 8x8 and 28x28 inputs. Plain ``nn.Module`` code that ``torch.fx`` traces, so
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
    subsample by 2 and zero-pad the new channels."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - cin if (stride != 1 or cin != planes) else 0
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad:
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers): widths 16/32/64, n BasicBlocks per stage."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for b in range(n):
                blocks.append(BasicBlock(cin, planes, 2 if stage > 0 and b == 0 else 1))
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


def small_cnn(image_size: int = 8, in_channels: int = 1, num_classes: int = 10, **kw) -> SmallCNN:
    """For 8x8 (digits) or 28x28 (FashionMNIST) single-channel images."""
    return SmallCNN(in_channels, num_classes, image_size, **kw)


def mlp(image_size: int = 8, in_channels: int = 1, num_classes: int = 10, **kw) -> MLP:
    return MLP(in_channels * image_size * image_size, num_classes=num_classes, **kw)


ZOO = {
    "vgg11": vgg11,
    "vgg16": vgg16,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "small_cnn": small_cnn,
    "mlp": mlp,
}
