"""The rank engine: equilibration, certificates (dense SVD, Lanczos bound, LDLᵀ inertia) and honesty."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings, strategies as st

import cellsheaf as cs
import cellsheaf.rank as rank
from cellsheaf.rank import decide

EPS = float(np.finfo(np.float64).eps)


def random_problem(seed: int, n_vertices: int = 8, n_edges: int = 12, d: int = 2):
    """A random coboundary-shaped matrix: every edge has a d×d block at each of two vertices."""
    rng = np.random.default_rng(seed)
    D = np.zeros((n_edges * d, n_vertices * d))
    for e in range(n_edges):  # a cycle through every vertex, then random chords
        u, v = (e, (e + 1) % n_vertices) if e < n_vertices else rng.choice(n_vertices, 2, replace=False)
        D[e * d:(e + 1) * d, u * d:(u + 1) * d] = -rng.standard_normal((d, d))
        D[e * d:(e + 1) * d, v * d:(v + 1) * d] = rng.standard_normal((d, d))
    return D, np.repeat(np.arange(n_edges), d), np.repeat(np.arange(n_vertices), d)


def equilibrated(D, rows, cols):
    """Independent dense construction of δ' = diag(1/‖edge‖) δ · blockdiag(D_v^{-1/2})."""
    Dt = D.copy()
    for e in np.unique(rows):
        Dt[rows == e] /= np.linalg.norm(Dt[rows == e])
    R = np.zeros((D.shape[1], D.shape[1]))
    for v in np.unique(cols):
        idx = np.flatnonzero(cols == v)
        lam, W = np.linalg.eigh(Dt[:, idx].T @ Dt[:, idx])
        R[np.ix_(idx, idx)] = W @ np.diag(lam ** -0.5) @ W.T
    return Dt @ R


@pytest.mark.parametrize("seed", range(4))
def test_equilibrated_singular_values_match_a_dense_construction(seed):
    D, rows, cols = random_problem(seed)
    out = decide(sp.csr_matrix(D), rows, cols, EPS)
    s_ref = np.linalg.svd(equilibrated(D, rows, cols), compute_uv=False)
    assert out.decision.rank == np.linalg.matrix_rank(D)
    assert s_ref.max() <= math.sqrt(2) + 1e-12  # δ'ᵀδ' <= 2I
    # the decision saw the global singular values (and the local ones of each vertex block)
    seen = out.decision.singular_values.numpy()
    for s in s_ref:
        assert np.isclose(seen, s, rtol=1e-10).any()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(-9, 9))
def test_edge_scalings_do_not_move_the_equilibrated_spectrum(seed, exponent):
    D, rows, cols = random_problem(seed)
    D2 = D.copy()
    D2[rows == 3] *= 10.0 ** exponent
    s1 = np.linalg.svd(equilibrated(D, rows, cols), compute_uv=False)
    s2 = np.linalg.svd(equilibrated(D2, rows, cols), compute_uv=False)
    np.testing.assert_allclose(s1, s2, atol=1e-8)
    assert decide(sp.csr_matrix(D2), rows, cols, EPS).decision.rank == decide(sp.csr_matrix(D), rows, cols,
                                                                              EPS).decision.rank


def path(n: int, d: int = 1, twist: float = 0.0):
    """A path (or, with ``twist``, a cycle closed by a rotation) with identity maps: δ as sparse."""
    edges = [(i, i + 1) for i in range(n - 1)] + ([(n - 1, 0)] if twist else [])
    rows, cols, vals = [], [], []
    for k, (u, v) in enumerate(edges):
        Fu = np.eye(d)
        if twist and k == len(edges) - 1:
            c, s = math.cos(twist), math.sin(twist)
            Fu = np.array([[c, -s], [s, c]])
        for M, w, sign in ((Fu, u, -1.0), (np.eye(d), v, 1.0)):
            for a in range(d):
                for b in range(d):
                    if M[a, b]:
                        rows.append(k * d + a); cols.append(w * d + b); vals.append(sign * M[a, b])
    D = sp.csr_matrix((vals, (rows, cols)), shape=(len(edges) * d, n * d))
    return D, np.repeat(np.arange(len(edges)), d), np.repeat(np.arange(n), d)


def test_lanczos_bound_certifies_a_full_rank_component():
    D, rows, cols = random_problem(0, n_vertices=300, n_edges=900)  # random maps on an expander
    out = decide(sp.csr_matrix(D), rows, cols, EPS, method="sparse")
    dec = out.decision
    assert dec.rank == 600 and dec.method == "sparse" and dec.certified and "Lanczos" in dec.certificate
    # the certified lower bound lies below the true smallest singular value of δ'
    s_min = np.linalg.svd(equilibrated(D, rows, cols), compute_uv=False).min()
    assert dec.smallest_kept <= s_min * (1 + 1e-9) and dec.smallest_kept > 0.3 * s_min


def test_inertia_count_certifies_a_badly_conditioned_component():
    D, rows, cols = path(400, 2, twist=0.5)  # holonomy ≠ I: no sections, but λ_min ~ (0.5 / 400)²
    dec = decide(D, rows, cols, EPS, method="sparse").decision
    assert dec.rank == 800 and dec.certified and "LDLᵀ" in dec.certificate


def test_inertia_count_finds_the_kernel():
    D, rows, cols = path(300, 2)  # constant sheaf on a path: h0 = 2
    out = decide(D, rows, cols, EPS, method="sparse")
    dec = out.decision
    assert dec.rank == 598 and dec.certified and "LDLᵀ" in dec.certificate and dec.gap > 1e3
    V = out.right()
    np.testing.assert_allclose(V.T @ V, np.eye(2), atol=1e-10)
    np.testing.assert_allclose(D @ V, 0, atol=1e-10)


def test_an_uncertifiable_count_says_so(monkeypatch):
    monkeypatch.setattr(rank, "_inertia", lambda N, sigma: None)  # no LDLᵀ available
    D, rows, cols = path(300, 2)
    dec = decide(D, rows, cols, EPS, method="sparse").decision
    assert not dec.certified and dec.gap is None and "not certified" in dec.certificate


def grid(n: int, d: int):
    """The constant sheaf R^d on an n × n grid, with each vertex gauged by a random orthogonal matrix (h0 = d)."""
    rng = np.random.default_rng(n * d)
    gauge = [np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(n * n)]
    ids = np.arange(n * n).reshape(n, n)
    edges = list(zip(ids[:, :-1].ravel(), ids[:, 1:].ravel())) + list(zip(ids[:-1].ravel(), ids[1:].ravel()))
    D = sp.lil_matrix((len(edges) * d, n * n * d))
    for k, (u, v) in enumerate(edges):
        D[k * d:(k + 1) * d, u * d:(u + 1) * d] = -gauge[u]
        D[k * d:(k + 1) * d, v * d:(v + 1) * d] = gauge[v]
    return D.tocsr(), np.repeat(np.arange(len(edges)), d), np.repeat(np.arange(n * n), d)


def no_factorisation(N, sigma):
    raise AssertionError("the deflated route must not factorise")


@pytest.mark.parametrize("n, d", [(14, 2), (8, 10)])  # a kernel of 10 doubles the block of random vectors
def test_deflated_route_certifies_a_kernel_without_a_factorisation(monkeypatch, n, d):
    monkeypatch.setattr(rank, "_FILL_MAX", 0)
    monkeypatch.setattr(rank, "_inertia", no_factorisation)
    D, rows, cols = grid(n, d)
    out = decide(D, rows, cols, EPS, method="sparse")
    dec = out.decision
    assert dec.rank == D.shape[1] - d and dec.certified and "deflated Lanczos" in dec.certificate
    assert dec.largest_dropped <= dec.tol < dec.smallest_kept and dec.gap > 1e3
    # the certified bounds bracket the true singular values of δ' around the cut
    s = np.linalg.svd(equilibrated(D.toarray(), rows, cols), compute_uv=False)
    assert dec.smallest_kept <= s[-d - 1] * (1 + 1e-9) and s[-d] <= dec.largest_dropped
    V = out.right()
    np.testing.assert_allclose(V.T @ V, np.eye(d), atol=1e-10)
    np.testing.assert_allclose(D @ V, 0, atol=1e-7)


def test_deflated_route_without_a_certificate_says_so(monkeypatch):
    monkeypatch.setattr(rank, "_FILL_MAX", 0)
    monkeypatch.setattr(rank, "_DEFLATED_MAX", 5)  # far too few CG and Lanczos steps
    D, rows, cols = grid(14, 2)
    dec = decide(D, rows, cols, EPS, method="sparse").decision
    assert not dec.certified and dec.gap is None and "not certified" in dec.certificate


def test_empty_and_zero_matrices():
    assert decide(sp.csr_matrix((0, 3)), np.zeros(0, int), np.array([0, 0, 1]), EPS).right().shape == (3, 3)
    out = decide(sp.csr_matrix((2, 3)), np.array([0, 0]), np.array([0, 0, 1]), EPS)
    assert out.decision.rank == 0 and out.decision.gap == math.inf
    assert out.right().shape == (3, 3) and out.left().shape == (2, 2)


def noise_next_to_a_map(size: float):
    """Vertex 0 (dim 2) sees coordinate 0 through an identity map; coordinate 1 only through a map of ``size``.

    The second map's edge goes to vertex 1, a stalk of dim 0, so that map is all its edge holds.
    """
    D = np.array([[1.0, 0.0, -1.0],    # edge 0: vertex 0 (coordinate 0) -- vertex 2
                  [0.0, size, 0.0]])   # edge 1: vertex 0 (coordinate 1) -- vertex 1 (dim 0)
    return D, np.array([0, 1]), np.array([0, 0, 2])


def test_a_map_is_a_map_at_any_scale():
    # rescaling an edge never changes a rank, even when its map ends up 15 orders below its neighbour's:
    # the data cannot tell such a map from rounding noise, so code that makes noise (cs.pushforward) cleans it
    for size in (1.3e-15, 1e-13, 1e-9):
        assert decide(*noise_next_to_a_map(size), eps=EPS).decision.rank == 2
    D, rows, cols = noise_next_to_a_map(1e-9)
    assert decide(1e-12 * D, rows, cols, eps=EPS).decision.rank == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scales", [(1e-9, 1e6), (1e6, 1e-9), (1e9, 1e-9)])
def test_neighbouring_edges_rescaled_apart_keep_the_cycle_cohomology(dtype, scales):
    # a constant R² sheaf on a 5-cycle with two adjacent edges rescaled: maps 15-18 orders apart at a vertex
    S = cs.Sheaf()
    for i in range(5):
        S.add_vertex(i, 2)
    for i in range(5):
        s = scales[i] if i < 2 else 1.0
        S.add_edge(i, (i + 1) % 5, s * torch.eye(2, dtype=dtype), s * torch.eye(2, dtype=dtype))
    c = S.cohomology()
    assert (c.h0, c.h1) == (2, 2)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([-9, 9]))
def test_rescaling_an_edge_never_moves_a_rank(seed, exponent):
    D, rows, cols = random_problem(seed % 1000, n_vertices=6, n_edges=9)
    e = int(np.random.default_rng(seed).integers(9))
    scaled = D.copy()
    scaled[rows == e] *= 10.0 ** exponent
    assert decide(scaled, rows, cols, eps=EPS).decision.rank == decide(D, rows, cols, eps=EPS).decision.rank
