"""Small torch models for the cellsheaf_nn tests: random MLPs, residual MLPs, and hypothesis strategies.

Import with ``from tests.cellsheaf_nn.nets import ...`` or ``from .nets import ...``.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

HIDDEN = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
OUTPUT = {"identity": None, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softmax": lambda: nn.Softmax(dim=-1),
          "relu": nn.ReLU}


def mlp(widths, hidden: str = "relu", output: str = "identity", bias: bool = True, seed: int = 0,
        dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """``Linear, act, Linear, act, ..., Linear[, output act]`` with widths ``(n0, ..., n_{k+1})``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(HIDDEN[hidden]())
    if OUTPUT[output] is not None:
        layers.append(OUTPUT[output]())
    return nn.Sequential(*layers).to(dtype).eval()


class Block(nn.Module):
    """``relu(x + fc2(relu(fc1(x))))``: a residual block, traced by torch.fx."""

    def __init__(self, d: int, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)

    def forward(self, x):
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


class ResidualMLP(nn.Module):
    """Input layer, ``blocks`` residual blocks of width ``d``, linear head (optionally an output activation)."""

    def __init__(self, n_in: int, d: int, blocks: int, n_out: int, bias: bool = True, output: str = "identity"):
        super().__init__()
        self.inp = nn.Linear(n_in, d, bias=bias)
        self.blocks = nn.Sequential(*[Block(d, bias) for _ in range(blocks)])
        self.head = nn.Linear(d, n_out, bias=bias)
        self.out = OUTPUT[output]() if OUTPUT[output] is not None else nn.Identity()

    def forward(self, x):
        return self.out(self.head(self.blocks(torch.relu(self.inp(x)))))


def residual_mlp(n_in, d, blocks, n_out, bias=True, output="identity", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return ResidualMLP(n_in, d, blocks, n_out, bias, output).to(dtype).eval()


@st.composite
def mlps(draw, max_depth: int = 5, max_width: int = 64, outputs=tuple(OUTPUT), dtype=torch.float64):
    """A random MLP (depth = number of Linear layers, 1..max_depth) and a random input batch."""
    depth = draw(st.integers(1, max_depth))
    widths = [draw(st.integers(1, max_width)) for _ in range(depth + 1)]
    hidden = draw(st.sampled_from(sorted(HIDDEN)))
    output = draw(st.sampled_from(outputs))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    model = mlp(widths, hidden, output, bias, seed, dtype)
    x = torch.randn(draw(st.integers(1, 6)), widths[0], dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return model, x


@st.composite
def residual_mlps(draw, max_blocks: int = 3, max_width: int = 24, dtype=torch.float64):
    """A random residual MLP and an input batch."""
    n_in, d, n_out = (draw(st.integers(1, max_width)) for _ in range(3))
    seed = draw(st.integers(0, 2**16))
    model = residual_mlp(n_in, d, draw(st.integers(1, max_blocks)), n_out, draw(st.booleans()),
                         draw(st.sampled_from(["identity", "sigmoid"])), seed, dtype)
    x = torch.randn(draw(st.integers(1, 5)), n_in, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    return model, x
