"""Disjoint unions of sheaves (batches of graphs) and per-graph pooling."""

import numpy as np
import pytest
import scipy.linalg as sla
import torch

import cellsheaf as cs
from tests.conftest import build_random_sheaf, dense_coboundary, dense_laplacian

F64 = torch.float64


def stacked(seed, N, E, d=2, diagonal=False, weights=False):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(N, (2, E), generator=g)
    shape = (E, d) if diagonal else (E, d, d)
    Fu, Fv = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    w = torch.rand(E, generator=g, dtype=F64) + 0.5 if weights else None
    return cs.Sheaf.from_arrays([d] * N, ei, Fu, Fv, weights=w)


def assert_block_diagonal(U, sheaves):
    np.testing.assert_allclose(dense_coboundary(U), sla.block_diag(*[dense_coboundary(S) for S in sheaves]),
                               atol=1e-14)
    L = sla.block_diag(*[dense_laplacian(S) for S in sheaves])
    np.testing.assert_allclose(U.laplacian(format="dense", dtype=F64).numpy(), L, atol=1e-12)
    x = torch.randn(U.C0, dtype=F64)
    np.testing.assert_allclose(cs.operators.apply_laplacian(U, x).numpy(), L @ x.numpy(), atol=1e-12)


def test_union_of_stacked_sheaves_is_block_diagonal_and_one_stack():
    sheaves = [stacked(0, 4, 6), stacked(1, 3, 2), stacked(2, 5, 7)]
    U, batch = cs.disjoint_union(sheaves)
    assert U.vertices == list(range(12)) and U.edges == list(range(15))
    assert batch.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert len(U.stacks) == 1  # one batched product per operator call
    assert_block_diagonal(U, sheaves)
    assert U.cohomology().h0 == sum(S.cohomology().h0 for S in sheaves)


def test_union_keeps_different_stacks_apart_and_weights():
    sheaves = [stacked(0, 4, 6, weights=True), stacked(1, 3, 3, diagonal=True), stacked(2, 3, 2, d=2),
               stacked(3, 2, 2, weights=True)]
    U, batch = cs.disjoint_union(sheaves)
    assert len(U.stacks) == 4
    assert_block_diagonal(U, sheaves)


def test_union_of_named_sheaves_names_pairs():
    A = build_random_sheaf(3, n_vertices=4, n_edges=5, maps="mixed", weights=True)
    B = stacked(4, 3, 4)
    U, batch = cs.disjoint_union([A, B, A])
    assert U.vertices[:4] == [(0, v) for v in A.vertices] and U.vertices[4] == (1, 0)
    assert U.edges[-1] == (2, A.edges[-1]) and U.edge((1, 0)).u == (1, int(B.stacks[0].index[0, 0]))
    assert batch.tolist() == [0] * 4 + [1] * 3 + [2] * 4
    assert_block_diagonal(U, [A, B, A])


def test_union_keeps_autograd_to_the_maps():
    S = stacked(5, 4, 5)
    Fu = S.stacks[0].Fu.clone().requires_grad_()
    S.update_maps(Fu=Fu)
    U, _ = cs.disjoint_union([S, stacked(6, 3, 3)])
    x = torch.randn(U.C0, dtype=F64)
    (x @ cs.operators.apply_laplacian(U, x)).backward()
    Fu.grad, g = None, Fu.grad
    (x[:8] @ cs.operators.apply_laplacian(S, x[:8])).backward()
    torch.testing.assert_close(g, Fu.grad)


def test_pool_sum_mean_max():
    sheaves = [stacked(0, 4, 3), stacked(1, 1, 0), stacked(2, 3, 2)]
    U, batch = cs.disjoint_union(sheaves)
    x = torch.randn(5, U.C0, dtype=F64, requires_grad=True)
    per_vertex = x.view(5, 8, 2)
    parts = [per_vertex[:, :4], per_vertex[:, 4:5], per_vertex[:, 5:]]
    torch.testing.assert_close(cs.pool(U, x, batch, "sum"), torch.stack([p.sum(1) for p in parts], 1))
    torch.testing.assert_close(cs.pool(U, x, batch, "mean"), torch.stack([p.mean(1) for p in parts], 1))
    torch.testing.assert_close(cs.pool(U, x, batch, "max"), torch.stack([p.amax(1) for p in parts], 1))
    cs.pool(U, x, batch, "mean").sum().backward()
    assert x.grad is not None
    assert cs.pool(U, x[0], batch, num_graphs=5).shape == (5, 2)  # graphs 3 and 4 are empty: zeros


def test_pool_refuses_bad_input():
    U, batch = cs.disjoint_union([stacked(0, 3, 2), stacked(1, 2, 1)])
    x = torch.zeros(U.C0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        cs.pool(U, x, batch, "median")
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        cs.pool(U, x, batch[:4])
    with pytest.raises(ValueError, match="num_graphs"):
        cs.pool(U, x, batch, num_graphs=1)
    H = build_random_sheaf(0, n_vertices=4, n_edges=3, dims=(1, 3))
    with pytest.raises(ValueError, match="equal stalk dims"):
        cs.pool(H, torch.zeros(H.C0), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="item 1"):
        cs.disjoint_union([U, "graph"])
