"""Multi-input maps on concatenated stalks: products, quotients, matrix products, masked choice."""

import pytest
import torch

import cellsheaf as cs
from cellsheaf import maps as M

from .checks import F64, check_linear, check_nonlinear
from .specs import check_round_trip

g = torch.Generator().manual_seed(7)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=F64)


@pytest.mark.parametrize("F,ref", [
    (M.Product(3), lambda a, b: a * b),
    (M.Quotient(3), lambda a, b: a / b),
    (M.MatMul((2, 3), (3, 4)), lambda a, b: a @ b),
    (M.MatMul((2, 3, 2), (2, 2, 3)), torch.bmm),                      # per head: att @ v
    (M.MatMul((2, 3, 2), (2, 3)), torch.matmul),                      # broadcast second operand
    (M.MatMul((1, 2, 3), (2, 3, 1)), torch.matmul),                   # broadcast first operand
], ids=["product", "quotient", "matmul", "bmm", "broadcast-b", "broadcast-a"])
def test_matches_torch_and_autograd(F, ref):
    B = 3
    a, b = rand(B, *F.shape_a), rand(B, *F.shape_b)
    if isinstance(F, M.Quotient):
        b = b.sign() * (b.abs() + 0.5)
    x = torch.cat([a.reshape(B, -1), b.reshape(B, -1)], 1)
    want = torch.stack([ref(a[i], b[i]) for i in range(B)])  # the per-sample operation
    assert torch.allclose(F.apply(x), want.reshape(B, -1), atol=1e-13)
    check_nonlinear(F, x, tol=1e-12)
    check_nonlinear(F.to(torch.float32), x.float(), tol=1e-5)
    check_round_trip(F)


def test_attention_scores_are_matmul_with_a_transposed_key():
    T, D = 4, 3
    q, k = rand(2, T, D), rand(2, T, D)
    kT = M.permutation((T, D), (1, 0))                     # the copy edge reads k transposed
    F = M.MatMul((T, D), (D, T))
    x = torch.cat([q.reshape(2, -1), kT.apply(k.reshape(2, -1))], 1)
    assert torch.allclose(F.apply(x), (q @ k.transpose(1, 2)).reshape(2, -1), atol=1e-13)


def test_where_is_a_selection():
    mask = torch.tensor([True, False, False, True])
    F = M.Where(mask)
    a, b = rand(2, 4), rand(2, 4)
    assert torch.equal(F.apply(torch.cat([a, b], 1)), torch.where(mask, a, b))
    check_linear(F)
    check_round_trip(F)
    assert F.to(torch.float32) is F and F.tensors() == []


def test_gate_merge_vertex_propagates_and_minimises():
    """y = silu(a) * b through a merge vertex m = [silu(a); b] and one edge m -> y with the product map."""
    S = cs.Sheaf()
    for v in ("a", "b", "s", "m", "y"):
        S.add_vertex(v, 6 if v == "m" else 3)
    S.add_edge("a", "s", M.Activation("silu", 3), M.Identity(3), name="act")
    S.add_edge("s", "m", M.Identity(3), M.Select(range(3), 6), name="copy s")
    S.add_edge("b", "m", M.Identity(3), M.Select(range(3, 6), 6), name="copy b")
    S.add_edge("m", "y", M.Product(3), M.Identity(3), name="gate")
    a, b = rand(5, 3), rand(5, 3)
    bnd = cs.Boundary().fix("a", a).fix("b", b)
    want = torch.nn.functional.silu(a) * b
    for method in ("propagate", "newton"):
        assert torch.allclose(cs.minimize(S, bnd, method=method).x["y"], want, atol=1e-10)
