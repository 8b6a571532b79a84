"""Teach the compiler a new module: a scaled residual block, registered with ``@csnn.register``.

The block computes ``y = x + s · (W x + b)`` with a learnable scalar ``s``. No
edit of cellsheaf_nn is needed: one registered function emits the block's
vertices and edges through the builder, and says how ``to_module`` writes
(possibly sheaf-trained) weights back.

Run: ``python examples/custom_op.py``
"""

from __future__ import annotations

import torch
from torch import nn

import cellsheaf_nn as csnn


class ScaledResidual(nn.Module):
    """``x + s · linear(x)``: a residual branch scaled by a learnable scalar."""

    def __init__(self, d: int, s: float = 0.5):
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x):
        return x + self.s * self.linear(x)


def write_back(module: ScaledResidual, W: torch.Tensor, b: torch.Tensor) -> None:
    """The branch edge holds ``(s·W | diag(s·b))``: divide by ``s`` to get the Linear's parameters."""
    module.linear.weight.copy_(W / module.s)
    module.linear.bias.copy_(b / module.s)


@csnn.register(ScaledResidual, layer=True)  # a new layer ℓ: the activation after it is named a{ℓ}
def compile_scaled_residual(b: csnn.Builder, module: ScaledResidual, x: csnn.Value) -> csnn.Value:
    """``branch = (s·W) x + s·b`` (one weight edge), then ``y = x + branch`` through a merge vertex.

    ``b.combine`` keeps ``δ_Ω`` square and unitriangular (docs: Architecture, "Skip connections"),
    so inference is still exact propagation and Lemma 3.2 still holds.
    """
    branch = b.affine(x, module.s * module.linear.weight, module.s * module.linear.bias, writeback=write_back)
    return b.combine([x, branch])


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(),
        ScaledResidual(16), nn.ReLU(),
        ScaledResidual(16, s=0.2), nn.ReLU(),
        nn.Linear(16, 3), nn.Softmax(dim=-1),
    ).double()
    ns = csnn.compile(model)
    print(ns)
    print("vertices:", ns.sheaf.vertices)
    print("edges:   ", ns.sheaf.edges)

    x = torch.randn(8, 4, dtype=torch.float64)
    ref = model(x).detach()
    y, state = ns.infer(x, return_state=True)
    print(f"propagation: |sheaf - torch| = {float((y - ref).abs().max()):.2e} ({state.info.method})")
    yd = ns.infer(x, method="diffusion", tol=1e-10, generator=torch.Generator().manual_seed(1))
    print(f"diffusion from a random start: |sheaf - torch| = {float((yd - ref).abs().max()):.2e}")
    print("det δ_Ω =", ns.coboundary_determinant(x[0]),
          " λ_min(L[Ω,Ω]) =", f"{float(torch.linalg.eigvalsh(ns.restricted_laplacian(x[0])).min()):.3g}")

    # pin neuron 5 of the first block's output to 2.0 and solve for the rest (both directions)
    pin = ns.pin("scaledresidual", [5], torch.tensor([2.0], dtype=torch.float64))
    y_pinned, pinned = ns.infer(x, return_state=True)
    print(f"pinned: method={pinned.info.method}, converged={pinned.info.converged}, "
          f"z1 moved by {float((pinned['z1'] - state['z1']).abs().max()):.3f} (upstream of the pin)")
    ns.unpin(pin)

    # change a weight in the sheaf and read the model back
    ns.sheaf.edge("weight:scaledresidual.linear").Fu.weight.data[0, 0] += 1.0
    back = ns.to_module()
    print("round trip:", csnn.compile(back).sheaf == ns.sheaf,
          f"|to_module(x) - sheaf| = {float((back(x).detach() - ns.infer(x)).abs().max()):.2e}")


if __name__ == "__main__":
    main()
