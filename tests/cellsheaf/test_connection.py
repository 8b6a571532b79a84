"""Connection sheaves: orthogonal maps, degree blocks deg(v)·I, the connection Laplacian."""

import numpy as np
import pytest
import torch

import cellsheaf as cs
from cellsheaf import orthogonal as O
from cellsheaf.layers import OrthogonalMaps
from tests.conftest import dense_laplacian

F64 = torch.float64


@pytest.mark.parametrize("method", O.METHODS)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_degree_blocks_are_degree_times_identity(d, method):
    g = torch.Generator().manual_seed(d)
    N, E = 7, 15
    u = torch.randint(N, (E,), generator=g)
    ei = torch.stack([u, (u + torch.randint(1, N, (E,), generator=g)) % N])  # no self-loops; parallel edges
    P = OrthogonalMaps(d, method)
    Fu = P(torch.randn(E, P.num_parameters, generator=g, dtype=F64) * 2)
    Fv = P(torch.randn(E, P.num_parameters, generator=g, dtype=F64) * 2)
    w = torch.rand(E, generator=g, dtype=F64) + 0.5
    for S, weights in ((cs.connection_sheaf(ei, Fu, Fv, num_vertices=N, weights=w), w),
                       (cs.connection_sheaf(ei, Fu, num_vertices=N), torch.ones(E, dtype=F64))):
        deg = torch.zeros(N, dtype=F64).index_add(0, ei[0], weights).index_add(0, ei[1], weights)
        blocks = cs.operators.degree_blocks(S)
        assert (blocks - deg[:, None, None] * torch.eye(d, dtype=F64)).abs().max() < 1e-12
        # the connection Laplacian: L = δᵀWδ, with vertex blocks deg(v)·I
        L = S.laplacian(format="dense").numpy()
        np.testing.assert_allclose(L, dense_laplacian(S), atol=1e-12)
        for v in range(N):
            np.testing.assert_allclose(L[v * d:(v + 1) * d, v * d:(v + 1) * d], float(deg[v]) * np.eye(d),
                                       atol=1e-12)


def test_a_self_loop_adds_its_own_discord_to_the_vertex_block():
    Q = O.exp_skew(torch.tensor([[0.7]], dtype=F64), 2)
    S = cs.connection_sheaf([[0], [0]], Q)
    np.testing.assert_allclose(cs.operators.degree_blocks(S)[0].numpy(), ((torch.eye(2, dtype=F64) - Q[0]).T
                                                                          @ (torch.eye(2, dtype=F64) - Q[0])).numpy())


def test_holonomy_decides_global_sections():
    # a cycle transported by rotations: flat (total angle 2π) gives H⁰ = R², otherwise 0
    ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    for angles, h0 in (([1.0, 2.0, 3.0, 2 * np.pi - 6.0], 2), ([1.0, 2.0, 3.0, 0.5], 0)):
        Q = O.exp_skew(torch.tensor(angles, dtype=F64)[:, None], 2)
        assert cs.connection_sheaf(ei, Q).cohomology().h0 == h0


def test_refuses_maps_that_are_not_orthogonal():
    Q = O.cayley(torch.randn(3, 3, dtype=F64), 3)
    Q[1] *= 1.001
    with pytest.raises(ValueError, match="Fu of edge 1 is not orthogonal"):
        cs.connection_sheaf([[0, 1, 2], [1, 2, 0]], Q)
    assert cs.connection_sheaf([[0, 1, 2], [1, 2, 0]], Q, atol=1e-2).num_edges == 3
    with pytest.raises(ValueError, match=r"\(E, d, d\)"):
        cs.connection_sheaf([[0], [1]], torch.eye(3))
    with pytest.raises(ValueError, match="Fv must have the shape"):
        cs.connection_sheaf([[0], [1]], torch.eye(3)[None], torch.eye(2)[None])
