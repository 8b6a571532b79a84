"""`cellsheaf.maps.Affine`: the extended affine map (A | diag b) on [x; 1]."""

import pytest
import torch

import cellsheaf as cs
from cellsheaf import maps as M

from .checks import F64, check_linear

g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def test_apply_is_Ax_plus_b_on_the_ones_block():
    W, b = rand(3, 4), rand(3)
    F = M.Affine(W, b)
    x = rand(5, 4)
    stalk = torch.cat([x, torch.ones(5, 3, dtype=F64)], 1)
    assert (F.d_in, F.d_out) == (7, 3)
    assert torch.allclose(F.apply(stalk), x @ W.T + b, atol=1e-14)
    assert torch.allclose(F.apply_affine(x), x @ W.T + b, atol=1e-14)
    assert torch.allclose(F.apply_affine(x[0]), x[0] @ W.T + b, atol=1e-14)


@pytest.mark.parametrize("case", ["dense", "no bias", "offset", "structured", "sparse"])
def test_linear_operator_contract(case):
    A = {"dense": rand(3, 4), "no bias": rand(3, 4), "offset": rand(3, 4), "sparse": rand(3, 4).to_sparse(),
         "structured": M.Select([2, 0, 1], 4)}[case]
    kw = {"no bias": {"d_in": 6}, "offset": {"d_in": 12, "ones": 6}}.get(case, {})
    b = None if case == "no bias" else rand(3)
    F = M.Affine(A, b, **kw)
    check_linear(F)
    check_linear(F, dtype=torch.float32, tol=1e-5)
    dense = torch.zeros(3, F.d_in, dtype=F64)
    dense[:, :4] = A.to_dense() if isinstance(A, torch.Tensor) else A.matrix()
    if b is not None:
        dense[:, F.block] = torch.diag(b)
    assert torch.equal(F.matrix(), dense)


def test_structured_A_is_never_densified(monkeypatch):
    A = M.Select([1, 0], 2)
    monkeypatch.setattr(M.Select, "matrix", lambda self: pytest.fail("densified"))
    F = M.Affine(A, torch.ones(2, dtype=F64))
    F.apply(torch.ones(4, dtype=F64)), F.adjoint(torch.ones(2, dtype=F64)), F.coo()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="bias has shape"):
        M.Affine(rand(3, 4), rand(2))
    with pytest.raises(ValueError, match="linear A"):
        M.Affine(M.ReLU(3), rand(3))
    with pytest.raises(ValueError, match="ones block"):
        M.Affine(rand(3, 4), rand(3), ones=2)


def test_to_equality_and_parameters():
    b = torch.nn.Parameter(rand(3))
    F = M.Affine(rand(3, 4), b)
    assert F.parameters() == [b] or F.parameters()[0] is b
    G = F.to(torch.float32)
    assert G.b.dtype == torch.float32 and G.A.weight.dtype == torch.float32
    assert F == M.Affine(F.A.weight.clone(), b.detach().clone()) and F != M.Affine(F.A.weight, b.detach() + 1)


def test_affine_edge_propagates_as_the_forward_pass():
    W, b = rand(2, 3), rand(2)
    S = cs.Sheaf(); S.add_vertex("x", 5); S.add_vertex("z", 2)
    S.add_edge("x", "z", M.Affine(W, b), M.Identity(2), name="w")
    x = rand(4, 3)
    bnd = cs.Boundary().fix("x", torch.cat([x, torch.ones(4, 2, dtype=F64)], 1))
    for method in ("propagate", "auto"):
        z = cs.minimize(S, bnd, method=method).x["z"]
        assert torch.allclose(z, x @ W.T + b, atol=1e-12)
    assert torch.allclose(cs.harmonic_extension(S, bnd)["z"], x @ W.T + b, atol=1e-12)
