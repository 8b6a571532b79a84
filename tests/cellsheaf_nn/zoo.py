"""The model zoo of the compiler tests: CNNs, a residual CNN, Conv1d, smooth-activation and norm MLPs, SwiGLU,
pre-norm transformer blocks (hand-written attention and ``nn.MultiheadAttention``), shared modules, learned
tensors used in ``forward``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SMOOTH = (nn.GELU, lambda: nn.GELU("tanh"), nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh,
          nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.LogSigmoid)


class LeNet(nn.Module):
    """Conv2d, ReLU, MaxPool2d, AvgPool2d, flatten, Linear."""

    def __init__(self, size: int = 28, c1: int = 4, c2: int = 8):
        super().__init__()
        self.c1, self.p1 = nn.Conv2d(1, c1, 5, padding=2), nn.MaxPool2d(2)
        self.c2, self.p2 = nn.Conv2d(c1, c2, 5), nn.AvgPool2d(2)
        side = ((size // 2) - 4) // 2
        self.f1, self.f2 = nn.Linear(c2 * side * side, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.p1(torch.relu(self.c1(x)))
        x = self.p2(torch.relu(self.c2(x)))
        return self.f2(torch.relu(self.f1(torch.flatten(x, 1))))


class ResBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN with an identity skip or a strided 1×1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResCNN(nn.Module):
    """Stem, residual blocks (the second one strided), AdaptiveAvgPool2d, Linear."""

    def __init__(self, ch: int = 16, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(ch, ch, 2 if i == 1 else 1) for i in range(blocks)])
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(ch, 10)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(torch.relu(self.stem(x)))).flatten(1))


class Conv1dNet(nn.Module):
    """Conv1d with stride, padding, dilation and groups; GroupNorm; mean over the length."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.g, self.fc = nn.GroupNorm(2, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.silu(self.g(self.c(x))).mean(-1))


class Attention(nn.Module):
    """Hand-written multi-head self-attention on ``(B, T, D)``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.o = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + att(LN(x))``, then ``x + MLP(LN(x))`` with GELU."""

    def __init__(self, d: int = 16, heads: int = 2, mha: bool = False):
        super().__init__()
        self.n1, self.n2, self.mha = nn.LayerNorm(d), nn.LayerNorm(d), mha
        self.att = nn.MultiheadAttention(d, heads, batch_first=True) if mha else Attention(d, heads)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.n1(x)
        x = x + (self.att(h, h, h, need_weights=False)[0] if self.mha else self.att(h))
        return x + self.ff(self.n2(x))


class SwiGLU(nn.Module):
    """``x + W3 (silu(W1 h) ⊙ W2 h)`` with ``h = RMSNorm(x)``."""

    def __init__(self, d: int = 8, hidden: int = 16):
        super().__init__()
        self.w1, self.w2, self.w3, self.n = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d), \
            nn.RMSNorm(d)

    def forward(self, x):
        h = self.n(x)
        return x + self.w3(F.silu(self.w1(h)) * self.w2(h))


class NormMLP(nn.Module):
    """Linear, LayerNorm (or RMSNorm), tanh, Linear, softmax."""

    def __init__(self, norm=nn.LayerNorm):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(5, 12), norm(12), nn.Linear(12, 4)

    def forward(self, x):
        return torch.log_softmax(self.b(torch.tanh(self.n(self.a(x)))), dim=-1)


class Tied(nn.Module):
    """One Linear used twice and one activation module used twice (torch.fx sees each use)."""

    def __init__(self):
        super().__init__()
        self.lin, self.act, self.head = nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.act(self.lin(self.act(self.lin(x)))))


class Gated(nn.Module):
    """Two inputs, a gate ``sigmoid(g) ⊙ tanh(v)``, a quotient, a where with a constant mask; two outputs."""

    def __init__(self):
        super().__init__()
        self.g, self.v = nn.Linear(3, 4), nn.Linear(2, 4)
        self.register_buffer("mask", torch.tensor([True, False, True, False]))

    def forward(self, a, b):
        gate = torch.sigmoid(self.g(a)) * torch.tanh(self.v(b))
        ratio = torch.tanh(self.v(b)) / (1.5 + torch.sigmoid(self.g(a)))
        return gate, torch.where(self.mask, gate, ratio)


class Learned(nn.Module):
    """Learned tensors used directly in ``forward``: a per-channel scale ``(C, 1, 1)`` on a feature map, a gate
    vector, a scalar and a shift vector."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 4 * 4, 4)
        self.channel = nn.Parameter(torch.linspace(0.5, 1.5, 3).reshape(3, 1, 1))
        self.gate, self.shift = nn.Parameter(torch.linspace(-1.0, 1.0, 4)), nn.Parameter(torch.full((4,), 0.25))
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        h = torch.tanh(self.conv(x) * self.channel)
        return self.scale * torch.sigmoid(self.fc(h.flatten(1)) * self.gate + self.shift)


def smooth_mlp(act) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 7), act(), nn.Linear(7, 2))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model
