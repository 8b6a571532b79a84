"""Neural-network-shaped sheaves written by hand (paper Sec. 3.1), for the nonlinear-solver tests.

Import from any test module (tests is a package)::

    from tests.neural_shapes import NeuralShape

``NeuralShape(widths, seed)`` builds the extended-stalk sheaf of a ReLU network
with layer widths ``widths = (n0, n1, ..., n_{k+1})``: vertices ``x``, ``z1``,
``a1``, ..., ``z{k+1}``, ``y``; weight edges ``W̄ / I``, activation edges
``R / P`` and the output edge ``φ / I``. ``boundary(X)`` pins the input and the
ones blocks; ``forward(X)`` is the plain forward pass for comparison.
"""

from __future__ import annotations

import numpy as np
import torch

import cellsheaf as cs
from cellsheaf import maps as M


class NeuralShape:
    """A hand-built neural sheaf with random weights (float64 by default)."""

    def __init__(self, widths, seed: int = 0, output=None, dtype=torch.float64, output_edge: bool = True):
        rng = np.random.default_rng(seed)
        self.widths, self.k = list(widths), len(widths) - 2
        self.W, self.b = [], []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            self.W.append(torch.as_tensor(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), dtype=dtype))
            self.b.append(torch.as_tensor(0.5 * rng.standard_normal(n_out), dtype=dtype))
        S = cs.Sheaf()
        n = self.widths
        S.add_vertex("x", n[0] + n[1])
        for ell in range(1, self.k + 1):
            S.add_vertex(f"z{ell}", n[ell])
            S.add_vertex(f"a{ell}", n[ell] + n[ell + 1])
        S.add_vertex(f"z{self.k + 1}", n[-1])
        for ell in range(1, self.k + 2):
            prev = "x" if ell == 1 else f"a{ell - 1}"
            S.add_edge(prev, f"z{ell}", M.Linear(self.extended(ell)), M.Identity(n[ell]), name=f"w{ell}")
            if ell <= self.k:
                S.add_edge(f"z{ell}", f"a{ell}", M.ReLU(n[ell]), M.Select(range(n[ell]), n[ell] + n[ell + 1]),
                           name=f"r{ell}")
        self.phi = output if output is not None else M.Identity(n[-1])
        if output_edge:
            S.add_vertex("y", n[-1])
            S.add_edge(f"z{self.k + 1}", "y", self.phi, M.Identity(n[-1]), name="out")
        self.S, self.dtype = S, dtype

    def extended(self, ell: int) -> torch.Tensor:
        """``W̄^(ℓ) = [W^(ℓ) | diag(b^(ℓ))]`` (Eq. 10)."""
        return torch.cat([self.W[ell - 1], torch.diag(self.b[ell - 1])], 1)

    def boundary(self, X: torch.Tensor) -> cs.Boundary:
        """Input ``X`` (``(B, n0)`` or ``(n0,)``) and the ones blocks fixed."""
        n = self.widths
        ones = torch.ones(*X.shape[:-1], n[1], dtype=X.dtype)
        b = cs.Boundary().fix("x", torch.cat([X, ones], -1))
        for ell in range(1, self.k + 1):
            b.fix(f"a{ell}", torch.ones(n[ell + 1], dtype=X.dtype), coords=range(n[ell], n[ell] + n[ell + 1]))
        return b

    def forward(self, X: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forward pass: ``{"z1": ..., "a1": ..., ..., "y": ...}`` (neural blocks only)."""
        out, a = {}, X
        for ell in range(1, self.k + 2):
            z = a @ self.W[ell - 1].T + self.b[ell - 1]
            out[f"z{ell}"] = z
            if ell <= self.k:
                a = torch.relu(z)
                out[f"a{ell}"] = a
        out["y"] = self.phi.apply(z)
        return out

    def random_input(self, batch: int, seed: int = 1) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        return torch.as_tensor(rng.standard_normal((batch, self.widths[0])), dtype=self.dtype)
