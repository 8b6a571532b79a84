"""Energy and its gradient for nonlinear maps and any potential; the paper's Eqs. (22), (27), (33), (34), (36)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf import potentials as P
from cellsheaf.energy import edge_energies, gradient
from cellsheaf.gauss_newton import GaussNewton
from tests.conftest import build_random_sheaf, random_point
from tests.neural_shapes import NeuralShape

F64 = torch.float64
POTENTIALS = [None, P.Huber(0.6), P.PNorm(3.0), P.PNorm(1.5), P.L1(), P.ElasticNet(0.2, 1.0),
              P.Convex(lambda r: torch.logsumexp(r, -1), name="lse"), P.Weighted(P.Quadratic(), 3.0)]


def with_potentials(S: cs.Sheaf, seed: int, choices=POTENTIALS) -> cs.Sheaf:
    """A copy of ``S`` whose edges carry random potentials (and random weights)."""
    rng = np.random.default_rng(seed)
    T = cs.Sheaf()
    for v in S.vertices:
        T.add_vertex(v, S.dim(v))
    for e in S.edge_items():
        T.add_edge(e.u, e.v, e.Fu, e.Fv, name=e.name, weight=float(rng.uniform(0.5, 2.0)),
                   potential=choices[rng.integers(len(choices))])
    return T


def autograd_gradient(S, x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(cs.energy(S, x).sum(), x)[0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), batch=st.sampled_from([None, 3]))
def test_gradient_equals_autograd_for_nonlinear_maps_and_potentials(seed, batch):
    S = with_potentials(build_random_sheaf(seed, n_vertices=5, n_edges=7, maps="nonlinear"), seed)
    x = random_point(S, seed, batch=batch)
    torch.testing.assert_close(gradient(S, x), autograd_gradient(S, x), rtol=1e-9, atol=1e-9)


def test_gradcheck_smooth_sheaf():
    S = cs.Sheaf()
    for v, d in (("a", 2), ("b", 3), ("c", 2)):
        S.add_vertex(v, d)
    g = torch.Generator().manual_seed(0)
    S.add_edge("a", "b", M.Compose(M.Tanh(2), M.Linear(torch.randn(2, 2, generator=g, dtype=F64))),
               M.Linear(torch.randn(2, 3, generator=g, dtype=F64)), potential=P.PNorm(3.0))
    S.add_edge("b", "c", M.Compose(M.Softmax(2), M.Linear(torch.randn(2, 3, generator=g, dtype=F64))),
               M.Sigmoid(2), potential=P.Convex(lambda r: torch.logsumexp(r, -1)))
    S.add_edge("c", "a", M.Identity(2), M.Identity(2), potential=P.CrossEntropy("softmax"))
    x = random_point(S, 1, batch=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cs.energy(S, t), (x,))
    torch.testing.assert_close(gradient(S, x.detach()), autograd_gradient(S, x.detach()))


def test_per_edge_energies_are_weighted_potentials():
    S = with_potentials(build_random_sheaf(3, n_vertices=4, n_edges=6, maps="nonlinear"), 3)
    x = random_point(S, 2, batch=4)
    av, au = cs.operators.expressed(S, x)
    E = edge_energies(S, x)
    for k, e in enumerate(S.edge_items()):
        sl = S.edge_slice(e.name)
        U = e.potential or P.Quadratic()
        torch.testing.assert_close(E[:, k], e.weight * U.pair_value(av[:, sl], au[:, sl]))
    torch.testing.assert_close(sum(cs.discord(S, x).values()), cs.energy(S, x))


# ---------------------------------------------------------------------------------------------- the paper's formulas


@pytest.fixture
def one_hidden_layer():
    """Sec. 3.1 with k = 1 and the identity output eliminated: free coordinates ω = (z1, a1, z2)."""
    net = NeuralShape([3, 5, 2], seed=4, output_edge=False)
    X = net.random_input(1)[0]
    b = net.boundary(X)
    g = torch.Generator().manual_seed(1)
    x = b.resolve(net.S).fill(torch.randn(net.S.C0, generator=g, dtype=F64))
    x[net.S.vertex_slice("z1")][:2] = torch.tensor([-0.3, 0.8], dtype=F64)  # both ReLU regions occur
    return net, X, b, x


def test_energy_gradient_is_equation_34(one_hidden_layer):
    net, X, b, x = one_hidden_layer
    S, n1 = net.S, net.widths[1]
    xbar = torch.cat([X, torch.ones(n1, dtype=F64)])
    z1, abar1, z2 = x[S.vertex_slice("z1")], x[S.vertex_slice("a1")], x[S.vertex_slice("z2")]
    a1 = abar1[:n1]
    R = torch.diag((z1 >= 0).to(F64))
    W2 = net.W[1]
    rhs = torch.cat([
        z1 - net.extended(1) @ xbar + R @ (z1 - a1),
        a1 - R @ z1 + W2.T @ (net.extended(2) @ abar1 - z2),
        z2 - net.extended(2) @ abar1,
    ])
    free = b.resolve(S).free
    torch.testing.assert_close(gradient(S, x)[free], rhs)


def test_restricted_laplacian_is_equation_33(one_hidden_layer):
    net, X, b, x = one_hidden_layer
    S, n1, n2 = net.S, net.widths[1], net.widths[2]
    R = torch.diag((x[S.vertex_slice("z1")] >= 0).to(F64))
    W2, I1, I2 = net.W[1], torch.eye(n1, dtype=F64), torch.eye(n2, dtype=F64)
    Z = torch.zeros
    L33 = torch.cat([
        torch.cat([I1 + R, -R, Z(n1, n2, dtype=F64)], 1),
        torch.cat([-R, I1 + W2.T @ W2, -W2.T], 1),
        torch.cat([Z(n2, n1, dtype=F64), -W2, I2], 1),
    ])
    LOO, _ = cs.operators.restricted_laplacian(S, b, at=x, format="dense")
    torch.testing.assert_close(LOO.to(F64), L33)
    free = b.resolve(S).free
    H = GaussNewton(S, x.unsqueeze(0))  # the Newton model is this Laplacian at the frozen pattern
    V = torch.zeros(len(free), S.C0, dtype=F64)
    V[torch.arange(len(free)), free] = 1.0
    cols = torch.stack([H.matvec(V[i:i + 1])[0, free] for i in range(len(free))], 1)
    torch.testing.assert_close(cols, L33)
    torch.testing.assert_close(H.diagonal()[0, free], torch.diagonal(L33))


def test_restricted_laplacian_is_block_tridiagonal_equation_36():
    net = NeuralShape([2, 3, 4, 2], seed=5, output_edge=False)
    S, k, n = net.S, net.k, net.widths
    X = net.random_input(1)[0]
    b = net.boundary(X)
    x = b.resolve(S).fill(random_point(S, 8))
    blocks = []  # A_ℓ from Eq. (35), and the couplings
    for ell in range(1, k + 1):
        R = torch.diag((x[S.vertex_slice(f"z{ell}")] >= 0).to(F64))
        W = net.W[ell]
        I = torch.eye(n[ell], dtype=F64)
        blocks.append(torch.cat([torch.cat([I + R, -R], 1), torch.cat([-R, I + W.T @ W], 1)]))
    sizes = [2 * n[ell] for ell in range(1, k + 1)] + [n[k + 1]]
    L = torch.zeros(sum(sizes), sum(sizes), dtype=F64)
    off = np.cumsum([0] + sizes)
    for i, A in enumerate(blocks):
        L[off[i]:off[i + 1], off[i]:off[i + 1]] = A
    L[off[k]:, off[k]:] = torch.eye(n[k + 1], dtype=F64)
    for ell in range(2, k + 2):  # C_ℓ / D_ℓ: −W^(ℓ) couples a^(ℓ−1) to z^(ℓ)
        rows = slice(off[ell - 1], off[ell - 1] + n[ell])
        cols = slice(off[ell - 2] + n[ell - 1], off[ell - 1])
        L[rows, cols] = -net.W[ell - 1]
        L[cols, rows] = -net.W[ell - 1].T
    LOO, _ = cs.operators.restricted_laplacian(S, b, at=x, format="dense")
    torch.testing.assert_close(LOO.to(F64), L)


def test_final_activation_dynamics_equation_22():
    net = NeuralShape([3, 4, 2], seed=6, output=M.Sigmoid(2))
    S = net.S
    x = net.boundary(net.random_input(1)[0]).resolve(S).fill(random_point(S, 3))
    z2, y = x[S.vertex_slice("z2")], x[S.vertex_slice("y")]
    abar1 = x[S.vertex_slice("a1")]
    s = torch.sigmoid(z2)
    g = gradient(S, x)
    torch.testing.assert_close(g[S.vertex_slice("z2")], (z2 - net.extended(2) @ abar1) + s * (1 - s) * (s - y))
    torch.testing.assert_close(g[S.vertex_slice("y")], y - s)


def test_cross_entropy_output_edge_force_equation_27():
    net = NeuralShape([3, 4, 3], seed=7, output_edge=False)
    S = net.S
    S.add_vertex("y", 3)
    S.add_edge("z2", "y", M.Identity(3), M.Identity(3), name="out", potential=P.CrossEntropy("softmax"))
    x = net.boundary(net.random_input(1)[0]).resolve(S).fill(random_point(S, 5))
    x[S.vertex_slice("y")] = torch.tensor([0.1, 0.7, 0.2], dtype=F64)
    z2, abar1 = x[S.vertex_slice("z2")], x[S.vertex_slice("a1")]
    expected = (z2 - net.extended(2) @ abar1) + (torch.softmax(z2, -1) - x[S.vertex_slice("y")])
    torch.testing.assert_close(gradient(S, x)[S.vertex_slice("z2")], expected)


def test_non_finite_map_output_names_the_edge():
    S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    S.add_edge("a", "b", M.Function(lambda t: 1.0 / t, 1, 1, name="inv"), M.Identity(1), name="bad")
    with pytest.raises(FloatingPointError, match="'bad'"):
        cs.energy(S, torch.tensor([0.0, 1.0], dtype=F64))


_MAPS = {
    "relu": lambda: M.ReLU(3), "leaky": lambda: M.LeakyReLU(3, 0.2), "sigmoid": lambda: M.Sigmoid(3),
    "tanh": lambda: M.Tanh(3), "softmax": lambda: M.Softmax(3),
    "function": lambda: M.Function(lambda t: torch.sin(t) * t.sum(-1, keepdim=True), 3, 3, name="f"),
    "compose": lambda: M.Compose(M.Tanh(2), M.Linear(torch.arange(6.0, dtype=F64).reshape(2, 3) / 6)),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
@pytest.mark.parametrize("name", sorted(_MAPS))
def test_map_local_adjoints_pass_gradcheck(name):
    """``vjp``/``jvp`` are the transposed Jacobian and the Jacobian (the local adjoint, Sec. 4.2)."""
    F = _MAPS[name]()
    x = torch.tensor([[0.7, -1.3, 0.4], [1.1, 0.2, -0.5]], dtype=F64, requires_grad=True)  # off the ReLU kink
    assert torch.autograd.gradcheck(F.apply, (x,))
    w = torch.ones(2, F.d_out, dtype=F64)
    auto = torch.autograd.grad(F.apply(x), x, grad_outputs=w)[0]
    torch.testing.assert_close(F.vjp(x.detach(), w), auto)
    v = torch.linspace(-1, 1, 6, dtype=F64).reshape(2, 3)
    J = torch.autograd.functional.jacobian(F.apply, x.detach())  # (2, d_out, 2, 3)
    torch.testing.assert_close(F.jvp(x.detach(), v), torch.einsum("bkcj,cj->bk", J, v))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), maps=st.sampled_from(["nonlinear", "dense"]))
def test_gauss_newton_diagonal_matches_the_dense_model(seed, maps):
    """The Jacobi diagonal of the Newton model (self-loops included) against the columns of J_δᵀ W ∇²U J_δ."""
    S = with_potentials(build_random_sheaf(seed, n_vertices=4, n_edges=6, maps=maps), seed,
                        choices=[None, P.Huber(0.6), P.PNorm(3.0), P.Weighted(P.Quadratic(), 3.0)])
    x = random_point(S, seed % 1000, batch=2)
    H = GaussNewton(S, x)
    eye = torch.eye(S.C0, dtype=F64)
    for i in range(2):
        cols = torch.stack([H.matvec(torch.stack([eye[j], eye[j]]))[i] for j in range(S.C0)], 1)
        torch.testing.assert_close(H.diagonal()[i], torch.diagonal(cols))
        torch.testing.assert_close(cols, cols.T)  # symmetric positive semidefinite model
        assert float(torch.linalg.eigvalsh(cols).min()) > -1e-10
