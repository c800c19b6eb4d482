"""Models users bring, small enough for CI: each entry builds a model and its example input.

They cover the channel-plan rules of SPEC.md: residual streams with 1x1 downsampling
(ResNet-18/50-like), depthwise convs and squeeze-excite (MobileNetV2/V3-like, EfficientNet's
MBConv), concatenation (DenseNet-, Inception- and U-Net-like), depthwise 7x7 with channels-last
LayerNorm and layer scale (ConvNeXt-like), GroupNorm, grouped convs (ResNeXt-like), attention
(hand-written q/k/v and ``nn.TransformerEncoder``), Conv1d over embeddings, an LSTM, and a bag of
layers older tracers refused (InstanceNorm, Upsample, PReLU, Mish, Softplus, ``x.mean((2, 3))``,
``x.view(x.size(0), -1)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, norm: Callable[[int], nn.Module] | None = None):
        super().__init__()
        norm = norm or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int = 1, groups: int = 1):
        super().__init__()
        cout = mid * 4
        self.conv1, self.conv2 = conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups)
        self.conv3 = conv_bn(mid, cout, 1)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, block: str = "basic", widths=(16, 32, 64), norm=None, groups: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), (norm or nn.BatchNorm2d)(widths[0]))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                stride = 2 if i and not j else 1
                if block == "basic":
                    layers.append(Basic(cin, w, stride, norm))
                    cin = w
                else:
                    layers.append(Bottleneck(cin, w // 2, stride, groups))
                    cin = w * 2
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4, gate: Callable = F.hardsigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(c, max(1, c // r), 1)
        self.expand = nn.Conv2d(max(1, c // r), c, 1)
        self.gate = gate

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block; with ``se`` and ``act`` the MobileNetV3 / EfficientNet MBConv one."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4, se: bool = False, act=nn.ReLU6):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), act())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), act())
        self.se = SqueezeExcite(mid, gate=torch.sigmoid if act is nn.SiLU else F.hardsigmoid) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.residual else out


class MobileNet(nn.Module):
    def __init__(self, se: bool = False, act=nn.ReLU6, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), act())
        cfg = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1)]
        self.blocks = nn.Sequential(*[InvertedResidual(a, b, s, se=se, act=act) for a, b, s in cfg])
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), act())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        c = 16
        self.layers = nn.ModuleList()
        for _ in range(3):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, 1, 1, bias=False)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1), 1))


class Inception(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.b1 = conv_bn(16, 8, 1)
        self.b3 = nn.Sequential(conv_bn(16, 8, 1), nn.ReLU(), conv_bn(8, 12, 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(16, 4, 1))
        self.mix = conv_bn(24, 32, 3, 2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.bp(x))], dim=1)
        return self.fc(F.relu(self.mix(x)).mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(1e-1 * torch.ones(c))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(F.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 4, 4)
        self.stem_norm = nn.GroupNorm(1, 24)  # LayerNorm over (C, H, W), as some ports write it
        self.blocks = nn.Sequential(ConvNeXtBlock(24), ConvNeXtBlock(24))
        self.down = nn.Conv2d(24, 48, 2, 2)
        self.block2 = ConvNeXtBlock(48)
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, classes)

    def forward(self, x):
        x = self.blocks(self.stem_norm(self.stem(x)))
        x = self.block2(self.down(x))
        return self.head(self.norm(x.mean((-2, -1))))


class Attention(nn.Module):
    """Hand-written multi-head self-attention with separate q, k, v and output Linears."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, _ = x.shape

        def split(t):  # -1 heads of head_dim: pruning whole heads keeps the view valid
            return t.view(B, T, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, -1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, a learned position embedding per token, pre-norm blocks, mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, patch: int = 8, image: int = 32, classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(0.02 * torch.randn((image // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class TorchTransformer(nn.Module):
    """``nn.TransformerEncoder`` over token embeddings, mean-pooled."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.fc(self.encoder(self.embed(tokens)).mean(1))


class MHAClassifier(nn.Module):
    """``nn.MultiheadAttention`` with a LayerNorm'd residual and a feed-forward block."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 5):
        super().__init__()
        self.inp = nn.Linear(12, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.inp(x)
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + a)
        x = x + self.ff(x)
        return self.fc(x[:, 0])


class TextCNN(nn.Module):
    def __init__(self, vocab: int = 60, dim: int = 24, channels: int = 16, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.convs = nn.ModuleList([nn.Conv1d(dim, channels, k) for k in (3, 4, 5)])
        self.fc = nn.Linear(3 * channels, classes)

    def forward(self, tokens):
        x = self.embed(tokens).transpose(1, 2)
        feats = [F.relu(conv(x)).max(dim=2).values for conv in self.convs]
        return self.fc(F.dropout(torch.cat(feats, 1), 0.1, self.training))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 60, dim: int = 16, hidden: int = 24, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.fc(out[:, -1])


class UNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.d1 = nn.Sequential(conv_bn(3, 8), nn.ReLU(), conv_bn(8, 8), nn.ReLU())
        self.d2 = nn.Sequential(conv_bn(8, 16), nn.ReLU(), conv_bn(16, 16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.u1 = nn.Sequential(conv_bn(16, 8), nn.ReLU())
        self.out = nn.Conv2d(8, classes, 1)  # per-pixel logits: never pruned

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        return self.out(self.u1(torch.cat([self.up(b), a], 1)))


class Oddities(nn.Module):
    """Layers and idioms older tracers refused: InstanceNorm, Upsample, PReLU, Mish, Softplus,
    ``x.mean((2, 3))`` and ``x.view(x.size(0), -1)``."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.n1 = nn.InstanceNorm2d(16, affine=True)
        self.a1 = nn.PReLU(16)
        self.up = nn.Upsample(scale_factor=2)
        self.c2 = nn.Conv2d(16, 24, 3, 2, 1)
        self.a2 = nn.Mish()
        self.c3 = nn.Conv2d(24, 24, 3, 2, 1)
        self.a3 = nn.Softplus()
        self.fc1 = nn.Linear(24 * 8 * 8, 32)
        self.fc2 = nn.Linear(24 + 32, classes)

    def forward(self, x):
        x = self.a2(self.c2(self.up(self.a1(self.n1(self.c1(x))))))
        pooled = x.mean((2, 3))
        y = self.a3(self.c3(x))
        y = self.fc1(y.view(y.size(0), -1))
        return self.fc2(torch.cat([pooled, y], 1))


def image(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def tokens(n: int = 2, length: int = 12, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(4, c)


#: name -> (model factory, example input factory, final layers Torch-Pruning must leave alone)
SUITE: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], Callable[[nn.Module], list]]] = {
    "resnet18": (lambda: ResNet("basic"), image, lambda m: [m.fc]),
    "resnet50": (lambda: ResNet("bottleneck"), image, lambda m: [m.fc]),
    "resnext": (lambda: ResNet("bottleneck", groups=4), image, lambda m: [m.fc]),
    "gn_resnet": (lambda: ResNet("basic", norm=gn), image, lambda m: [m.fc]),
    "mobilenet_v2": (lambda: MobileNet(), image, lambda m: [m.classifier[1]]),
    "mobilenet_v3": (lambda: MobileNet(se=True, act=nn.Hardswish), image, lambda m: [m.classifier[1]]),
    "efficientnet": (lambda: MobileNet(se=True, act=nn.SiLU), image, lambda m: [m.classifier[1]]),
    "densenet": (lambda: DenseNet(), image, lambda m: [m.fc]),
    "inception": (lambda: Inception(), image, lambda m: [m.fc]),
    "convnext": (lambda: ConvNeXt(), image, lambda m: [m.head]),
    "vit": (lambda: ViT(), image, lambda m: [m.head]),
    "transformer": (lambda: TorchTransformer(), lambda: tokens(), lambda m: [m.fc]),
    "mha": (lambda: MHAClassifier(), lambda: torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(0)),
            lambda m: [m.fc]),
    "text_cnn": (lambda: TextCNN(), lambda: tokens(vocab=60), lambda m: [m.fc]),
    "lstm": (lambda: LSTMClassifier(), lambda: tokens(vocab=60), lambda m: [m.fc]),
    "unet": (lambda: UNet(), image, lambda m: [m.out]),
    "oddities": (lambda: Oddities(), image, lambda m: [m.fc2]),
}  # fmt: skip
