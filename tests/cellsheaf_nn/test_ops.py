"""The op registry and the builder: registering new modules, functions and methods; merge structure."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import cellsheaf as cs
import cellsheaf_nn as csnn
from cellsheaf import maps as M
from cellsheaf_nn import ops

F64 = torch.float64


class ScaledResidual(nn.Module):
    """``x + s · W x`` with a learnable scalar ``s``: not something torch.fx should look inside."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.s = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return x + self.s * self.lin(x)


def _writeback_scaled_residual(module, W, b):
    module.lin.weight.copy_(W / module.s)
    module.lin.bias.copy_(b / module.s)


@csnn.register(ScaledResidual)
def compile_scaled_residual(b, module, x):
    inner = b.affine(x, module.s * module.lin.weight, module.s * module.lin.bias,
                     writeback=_writeback_scaled_residual)
    return b.combine([x, inner])


class Gate(nn.Module):
    """``x ⊙ σ(g)`` with a constant gate vector ``g``."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("g", torch.linspace(-1, 1, d))

    def forward(self, x):
        return x * torch.sigmoid(self.g)


def test_registered_module_compiles_and_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), ScaledResidual(4), nn.Linear(4, 2)).double()
    ns = csnn.compile(model)
    assert ns.sheaf.vertices == ["x", "z1", "a1", "scaledresidual.linear", "scaledresidual.in", "scaledresidual", "z2"]
    assert ns.layout["scaledresidual"].module == "2"
    x = torch.randn(5, 3, dtype=F64)
    assert torch.allclose(ns.infer(x), model(x), atol=1e-12, rtol=0)
    back = ns.to_module()
    assert torch.allclose(back(x), model(x), atol=1e-12, rtol=0)
    assert "ScaledResidual" in csnn.supported_ops()


def test_registered_module_is_a_leaf_inside_traced_models():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.res = nn.Linear(2, 3), ScaledResidual(3)

        def forward(self, x):
            return torch.tanh(self.res(self.fc(x)))

    model = Net().double()
    ns = csnn.compile(model)
    assert "res" in ns.sheaf.vertices and ns.layout["res"].module == "res"
    x = torch.randn(4, 2, dtype=F64)
    assert torch.allclose(ns.infer(x), model(x), atol=1e-12, rtol=0)


def test_register_function_and_method_and_subclass_lookup():
    def compile_gate(b, module, x):
        return b.affine(x, torch.diag(torch.sigmoid(module.g)), kind="scale", trainable=False)

    csnn.register(Gate)(compile_gate)

    class SubGate(Gate):
        pass

    assert ops.lookup(SubGate(3)).fn is compile_gate  # inherited through the MRO
    model = nn.Sequential(nn.Linear(3, 3), SubGate(3)).double()
    x = torch.randn(2, 3, dtype=F64)
    assert torch.allclose(csnn.compile(model).infer(x), model(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="already has an op compiler"):
        csnn.register(Gate)(compile_gate)
    csnn.register(Gate, override=True)(compile_gate)

    assert ops.lookup("relu") is ops.lookup(torch.Tensor.relu) is not None
    assert ops.lookup(operator.add).fn is ops.add
    assert ops.lookup(print) is None
    with pytest.raises(TypeError, match="nn.Module subclass"):
        csnn.register(int)


def softsign(x):
    return x / (1 + x.abs())


torch.fx.wrap("softsign")  # a leaf function for torch.fx: it appears as one call_function node


def test_register_a_function_compiler():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return softsign(self.fc(x))

    with pytest.raises(csnn.UnsupportedOpError):
        csnn.compile(Net().double())

    @csnn.register(softsign, prefix="a")
    def compile_softsign(b, x):
        return b.activation(x, M.Function(softsign, x.dim, x.dim, name="softsign"))

    model = Net().double()
    ns = csnn.compile(model)
    assert ns.output == "y" and ns.edge_types["out:y"] == "out"
    x = torch.randn(3, 2, dtype=F64)
    assert torch.allclose(ns.infer(x), model(x), atol=1e-12, rtol=0)


def test_compiler_with_wrong_output_size_is_caught():
    class Bad(nn.Module):
        def forward(self, x):
            return x[:, :1]

    @csnn.register(Bad)
    def compile_bad(b, module, x):
        return b.alias(x)

    with pytest.raises(csnn.CompileError, match="compile_bad.*size 3.*shape \\(1,\\)"):
        csnn.compile(nn.Sequential(nn.Linear(2, 3), Bad()))


def test_builder_primitives_give_unitriangular_coboundary():
    b = csnn.Builder(F64)
    x = b.input(2)
    z = b.affine(x, torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64))
    a = b.activation(z, M.ReLU(3))
    c = b.concat([x, a])
    y = b.combine([a, b.affine(c, torch.randn(3, 5, dtype=F64))], [None, 2 * torch.eye(3)], torch.ones(3))
    for k, v in enumerate([z, a, c]):
        b.name(v, f"v{k + 1}")
    mark = b.n_vertices
    b.name(y, "y", since=mark)
    built = b.finish()
    S = built.sheaf
    bnd = cs.Boundary().fix("x", torch.randn(2, dtype=F64), coords=[0, 1])
    for info in built.vertices.values():
        if info.ones:
            idx = [i for sl in info.ones for i in range(sl.start, sl.stop)]
            bnd.fix(info.name, torch.ones(len(idx), dtype=F64), coords=idx)
    rb = bnd.resolve(S)
    at = cs.minimize(S, bnd).x.flat
    D = cs.operators.coboundary(S, at=at, format="dense")[:, rb.free]
    assert D.shape[0] == D.shape[1]
    assert torch.equal(torch.tril(D), D) and torch.equal(torch.diagonal(D), torch.ones(D.shape[0], dtype=F64))


def test_builder_rejects_mismatched_maps():
    b = csnn.Builder(F64)
    x = b.input(2)
    with pytest.raises(ValueError, match="different sizes"):
        b.combine([x, b.affine(x, torch.ones(3, 2))])
    with pytest.raises(ValueError, match="Fu takes inputs of size 3"):
        b.edge(x, b.vertex(3, kind="linear"), torch.ones(3, 3), kind="weight")
    with pytest.raises(ValueError, match="bias needs a linear Fu"):
        b.edge(x, b.vertex(2, kind="act"), M.ReLU(2), kind="act", bias=torch.ones(2))
