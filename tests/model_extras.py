"""Models beyond the suite's rules: what the tracer must leave whole (with a reason) or refuse
with a clear error, never crash on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TimmViT(nn.Module):
    """timm's layout: a class token ``(1, 1, E)``, a position embedding ``(1, N, E)`` and a fused
    q/k/v Linear reshaped to ``(B, N, 3, heads, head_dim)``."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = self.gate(y)
        return self.fc(y.mean((2, 3)))


class LinearIntoEncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(self.layer(self.inp(x)).mean(1))


class Unusual(nn.Module):
    """Norms without affine parameters, a bidirectional GRU, Conv3d, interpolation, einsum and a
    functional linear with its own parameter."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8, affine=False)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.ln = nn.LayerNorm(12, elementwise_affine=False)
        self.gru = nn.GRU(12, 10, batch_first=True, bidirectional=True)
        self.w = nn.Parameter(torch.randn(6, 20))
        self.q = nn.Linear(20, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):  # x: (B, 2, 4, 8, 8)
        y = self.gn(self.c3(x)).mean(2)
        y = F.interpolate(self.c2(y), scale_factor=0.5)
        y = self.ln(y.flatten(2).transpose(1, 2))
        h, _ = self.gru(y)
        att = torch.einsum("btd,bsd->bts", self.q(h), self.q(h)).softmax(-1)
        z = torch.einsum("bts,bsd->btd", att, self.q(h))
        return self.fc(z.mean(1)) + F.linear(h, self.w).sum()


EXTRAS = {
    "timm_vit": (TimmViT, lambda: torch.randn(2, 3, 32, 32)),
    "linear_into_encoder_layer": (LinearIntoEncoderLayer, lambda: torch.randn(2, 5, 10)),
    "unusual": (Unusual, lambda: torch.randn(2, 2, 4, 8, 8)),
}
