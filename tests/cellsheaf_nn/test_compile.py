"""Compiling models into neural sheaves: the paper's construction (Eqs. 10-17), naming, ops, errors, to_module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cellsheaf as cs
import cellsheaf_nn as csnn
from cellsheaf import maps as M

from .nets import Block, mlp, residual_mlp

F64 = torch.float64


def test_mlp_layout_is_the_papers_path_graph():
    model = mlp([3, 4, 5, 2], output="sigmoid")
    ns = csnn.compile(model)
    S = ns.sheaf
    assert S.vertices == ["x", "z1", "a1", "z2", "a2", "z3", "y"]
    assert S.edges == ["weight:z1", "act:a1", "weight:z2", "act:a2", "weight:z3", "out:y"]
    # stalk dims, Eq. 14: x and a_l carry the ones block of the next layer
    assert [S.dim(v) for v in S.vertices] == [3 + 4, 4, 4 + 5, 5, 5 + 2, 2, 2]
    assert ns.layout["a1"].ones == (slice(4, 9),) and ns.layout["z1"].ones == ()
    assert ns.edge_types == {"weight:z1": "weight", "act:a1": "act", "weight:z2": "weight", "act:a2": "act",
                             "weight:z3": "weight", "out:y": "out"}
    assert ns.edges_of("weight") == ["weight:z1", "weight:z2", "weight:z3"]
    assert [ns.layout[v].layer for v in S.vertices] == [None, 1, 1, 2, 2, 3, 3]
    assert (ns.input, ns.output, ns.n_in, ns.n_out) == ("x", "y", 3, 2)


def test_maps_are_eqs_10_15_16_17():
    model = mlp([3, 4, 2], output="sigmoid")
    ns = csnn.compile(model)
    S, lin1, lin2 = ns.sheaf, model[0], model[2]
    W1 = torch.cat([lin1.weight, torch.diag(lin1.bias)], 1).detach()  # Eq. 10: (W | diag b)
    e = S.edge("weight:z1")
    assert torch.equal(e.Fu.matrix(), W1)
    # the map holds the module's own weight and bias (the Eq. 25 pattern by structure): trained by the local rule
    assert [id(t) for t in e.Fu.parameters()] == [id(ns.parameters["0.bias"]), id(ns.parameters["0.weight"])]
    assert isinstance(e.Fv, M.Identity)  # Eq. 15
    act = S.edge("act:a1")
    assert isinstance(act.Fu, M.ReLU)  # Eq. 16: R^z ...
    assert torch.equal(act.Fv.matrix(), torch.cat([torch.eye(4), torch.zeros(4, 2)], 1).to(F64))  # ... and P_n
    out = S.edge("out:y")
    assert isinstance(out.Fu, M.Sigmoid) and isinstance(out.Fv, M.Identity)  # Eq. 17
    assert torch.equal(S.edge("weight:z2").Fu.matrix(), torch.cat([lin2.weight, torch.diag(lin2.bias)], 1).detach())


def test_boundary_holds_input_and_ones():
    ns = csnn.compile(mlp([2, 3, 1]))
    x = torch.tensor([[1.0, -2.0]], dtype=F64)
    rb = ns.boundary(x).resolve(ns.sheaf)
    fixed_x = ns.coords("x")
    ones = torch.tensor([2, 3, 4]) + ns.sheaf.vertex_slice("x").start
    a1_ones = torch.tensor([3]) + ns.sheaf.vertex_slice("a1").start
    assert rb.fixed.tolist() == sorted(fixed_x.tolist() + ones.tolist() + a1_ones.tolist())
    full = rb.fill(torch.zeros(ns.sheaf.C0, dtype=F64))
    assert full[0, fixed_x].tolist() == [1.0, -2.0] and full[0, ones].tolist() == [1.0] * 3
    assert full[0, a1_ones].tolist() == [1.0]


def test_bias_free_layers_have_no_ones_blocks():
    ns = csnn.compile(mlp([3, 4, 2], bias=False))
    assert ns.sheaf.dim("x") == 3 and ns.sheaf.dim("a1") == 4
    assert ns.affine_parts("weight:z1")[1] is None


def test_identity_output_has_no_output_vertex_and_relu_output_is_y():
    assert csnn.compile(mlp([2, 3, 1])).output == "z2"
    ns = csnn.compile(mlp([2, 3, 1], output="relu"))
    assert ns.output == "y" and "out:y" in ns.sheaf.edges


def test_aliases_add_no_vertices():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Dropout(0.5), nn.ReLU(), nn.Identity(),
                          nn.Linear(4, 2)).double()
    ns = csnn.compile(model, input_shape=(2, 3))
    assert ns.sheaf.vertices == ["x", "z1", "a1", "z2"]
    x = torch.randn(5, 2, 3, dtype=F64)
    assert torch.allclose(ns.infer(x), model.eval()(x), atol=1e-12, rtol=0)


def test_batchnorm_is_an_affine_edge_in_eval_mode():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, dtype=F64))  # non-trivial running statistics
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1, 1)
    ns = csnn.compile(model)
    assert ns.sheaf.vertices == ["x", "z1", "bn1", "a1", "z2"]
    assert ns.edge_types["affine:bn1"] == "affine"
    assert model.training  # the user's model is untouched
    x = torch.randn(7, 3, dtype=F64)
    assert torch.allclose(ns.infer(x), model.eval()(x), atol=1e-12, rtol=0)
    back = ns.to_module()
    assert torch.allclose(back(x), model(x), atol=1e-12, rtol=0)


def test_residual_model_compiles_with_merge_vertices():
    ns = csnn.compile(residual_mlp(3, 5, 2, 2))
    S = ns.sheaf
    assert S.vertices == ["x", "z1", "a1", "z2", "a2", "z3", "add.in", "add", "a3", "z4", "a4", "z5", "add_1.in",
                          "add_1", "a5", "z6"]
    assert ns.edge_types["merge:add.in.0"] == "merge" and ns.edge_types["sum:add"] == "sum"
    assert S.dim("add.in") == 10  # copies of a1 and z3
    assert ns.layout["add.in"].kind == "merge"
    e0, e1 = S.edge("merge:add.in.0"), S.edge("merge:add.in.1")
    assert (e0.u, e1.u) == ("a1", "z3")
    assert e0.Fv.matrix()[:, :5].equal(torch.eye(5, dtype=F64)) and e1.Fv.matrix()[:, 5:].equal(torch.eye(5, dtype=F64))
    assert ns.layout["z2"].module == "blocks.0.fc1"


def test_cat_is_a_merge_vertex():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 2), nn.Linear(3, 4), nn.Linear(6, 1)

        def forward(self, x):
            return self.head(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1))

    model = Cat().double()
    ns = csnn.compile(model)
    assert ns.sheaf.vertices == ["x", "z1", "a1", "z2", "cat", "z3"]
    assert [ns.sheaf.edge(e).u for e in ("merge:cat.0", "merge:cat.1")] == ["a1", "z2"]
    x = torch.randn(4, 3, dtype=F64)
    assert torch.allclose(ns.infer(x), model(x), atol=1e-12, rtol=0)


def test_functional_ops_and_constants():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = nn.Linear(3, 3), nn.Linear(3, 2)
            self.register_buffer("shift", torch.tensor([0.5, -1.0, 2.0]))

        def forward(self, x):
            h = torch.nn.functional.leaky_relu(self.fc(x), 0.2) * 0.5 + self.shift
            h = (h - x).tanh() / 2 - x.sigmoid()
            return torch.softmax(self.fc2(h.flatten(1)), dim=-1)

    model = Fn().double()
    ns = csnn.compile(model)
    assert ns.output == "y" and ns.edge_types["out:y"] == "out"
    x = torch.randn(5, 3, dtype=F64)
    assert torch.allclose(ns.infer(x), model(x), atol=1e-12, rtol=0)


def test_nested_sequential_and_custom_container():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), Block(3))

        def forward(self, x):
            return self.body(x) * 2.0

    model = Wrap().double()
    ns = csnn.compile(model)
    x = torch.randn(3, 2, dtype=F64)
    assert torch.allclose(ns.infer(x), model(x), atol=1e-12, rtol=0)
    assert ns.edge_types["scale:mul"] == "scale"


def test_float32_compiles_in_float32():
    ns = csnn.compile(mlp([3, 4, 2], dtype=torch.float32))
    assert ns.dtype == torch.float32
    ns64 = csnn.compile(mlp([3, 4, 2], dtype=torch.float32), dtype=F64)
    assert ns64.dtype == F64


def test_to_module_round_trips_and_carries_changed_weights():
    model = residual_mlp(3, 4, 2, 2)
    ns = csnn.compile(model)
    assert csnn.compile(ns.to_module()).sheaf == ns.sheaf
    F = ns.sheaf.edge("weight:z2").Fu
    with torch.no_grad():
        F.A.weight[1, 2] += 3.0  # a weight entry ...
        F.b[0] -= 1.0  # ... and the bias of neuron 0 (the diagonal of the ones block)
    back = ns.to_module()
    assert back.blocks[0].fc1.weight[1, 2] == model.blocks[0].fc1.weight[1, 2] + 3.0
    assert back.blocks[0].fc1.bias[0] == model.blocks[0].fc1.bias[0] - 1.0
    x = torch.randn(6, 3, dtype=F64)
    assert torch.allclose(ns.infer(x), back(x), atol=1e-12, rtol=0)
    assert csnn.compile(back).sheaf == ns.sheaf


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


def test_untraceable_model_error_names_module_and_how_to_register():
    with pytest.raises(csnn.CompileError, match=r"(?s)Untraceable.*csnn.register"):
        csnn.compile(Untraceable())


def test_unsupported_op_error_lists_supported_and_how_to_register():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 1))
    with pytest.raises(csnn.UnsupportedOpError, match=r"(?s)module '1' \(PReLU\).*Supported: .*Linear.*"
                                                      r"@csnn.register\(MyModule\)"):
        csnn.compile(model)

    class Fn(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    with pytest.raises(csnn.UnsupportedOpError, match="function exp"):
        csnn.compile(Fn(), input_shape=(2,))


def test_bad_models_get_clear_errors():
    class Named(nn.Module):
        def forward(self, x):
            return {"y": x + 1}

    with pytest.raises(csnn.CompileError, match="a tensor or a tuple of tensors"):
        csnn.compile(Named(), input_shape=(2,))
    with pytest.raises(csnn.CompileError, match="input_shape"):
        csnn.compile(nn.Sequential(nn.ReLU()))
    with pytest.raises(csnn.CompileError, match="probe"):
        csnn.compile(nn.Sequential(nn.Linear(3, 2)), input_shape=(4,))
    with pytest.raises(csnn.CompileError, match="nothing to compile"):
        csnn.compile(nn.Sequential(nn.Identity()), input_shape=(2,))
    class Prod(nn.Module):  # a product of two quantities compiles through a merge vertex
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return x * self.fc(x)

    prod, x = Prod().double(), torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(csnn.compile(prod).infer(x), prod(x), atol=1e-12, rtol=0)
    with pytest.raises(TypeError, match="nn.Module"):
        csnn.compile(lambda x: x)


def test_compiled_sheaf_is_plain_cellsheaf():
    ns = csnn.compile(mlp([2, 3, 1]))
    assert isinstance(ns.sheaf, cs.Sheaf)
    spec_edges = [e.name for e in ns.sheaf.edge_items()]
    assert spec_edges == ns.sheaf.edges


def test_a_module_reused_in_a_sequential_compiles_once_per_use():
    torch.manual_seed(0)
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(6, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 3)).double()
    ns = csnn.compile(model)
    assert ns.edges_of("act") == ["act:a1", "act:a2"]
    x = torch.randn(7, 6, dtype=torch.float64)
    assert torch.allclose(ns.infer(x), model(x), atol=1e-12, rtol=0)
    lin = nn.Linear(4, 4)
    tied = nn.Sequential(lin, nn.Tanh(), lin).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(csnn.compile(tied).infer(x), tied(x), atol=1e-12, rtol=0)


class TwoInTwoOut(nn.Module):
    """Two inputs, two outputs: ``(relu(A a + B b), tanh(C a))``."""

    def __init__(self):
        super().__init__()
        self.A, self.B, self.C = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(3, 2)

    def forward(self, a, b):
        return torch.relu(self.A(a) + self.B(b)), torch.tanh(self.C(a))


def test_several_inputs_and_outputs_mirror_the_model():
    torch.manual_seed(0)
    model = TwoInTwoOut().double()
    ns = csnn.compile(model, input_shape=[(3,), (2,)])
    assert ns.inputs == ["a", "b"] and ns.outputs == ["y0", "y1"]
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    got, want = ns.infer(a, b), model(a, b)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12, rtol=0)
    one = ns.infer(a[0], b[0])
    assert torch.allclose(one[1], want[1][0], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="takes 2 inputs"):
        ns.infer(a)
    with pytest.raises(csnn.CompileError, match="input_shape"):
        csnn.compile(model)


def test_every_unsupported_op_is_named_in_one_message():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.emb = nn.Linear(3, 3), nn.Bilinear(3, 3, 3)

        def forward(self, x):
            return torch.cumsum(self.fc(x), -1).exp()

    with pytest.raises(csnn.UnsupportedOpError) as err:
        csnn.compile(Odd().double())
    first = str(err.value).splitlines()[0]
    assert "2 operations" in first and "cumsum" in first and "Tensor.exp" in first
    assert "b.activation" in str(err.value) and "cs.maps.Function" in str(err.value)


def test_untraceable_model_names_the_line():
    with pytest.raises(csnn.CompileError, match=r"test_compile.py:\d+: if x.sum\(\) > 0:"):
        csnn.compile(Untraceable())


def test_integer_inputs_get_a_clear_message():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(csnn.CompileError, match=r"'0' \(Embedding\) reads integer token ids.*outside the model"):
        csnn.compile(model, input_shape=(2,))
