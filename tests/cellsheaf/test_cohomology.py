"""Cohomology: H⁰, H¹, bases, rank decisions, relative H⁰, exact ranks."""

import math
import sys

import networkx as nx
import numpy as np
import pytest
import sympy
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf.cohomology import DENSE_LIMIT
from cellsheaf.rank import default_tol
from tests.conftest import (anchored_and_floating, build_random_sheaf, constant_sheaf, dense_coboundary, dense_laplacian, holonomy_cycle, rotation,
                            path_sheaf, random_point, random_sheaf)

SETTINGS = settings(max_examples=25, deadline=None)


def projector(B: np.ndarray) -> np.ndarray:
    return B @ B.T


def atol(t: torch.Tensor, tight: float) -> float:
    """``tight`` for float64 results; float32 ones (a sheaf whose maps hold no tensor) are rounded."""
    return tight if t.dtype == torch.float64 else 1e-5


def check_basis(B: torch.Tensor, A: np.ndarray, n: int, h: int) -> None:
    """``B`` is an orthonormal ``(n, h)`` basis of ``ker A``."""
    tol = atol(B, 1e-10)
    B = B.double().numpy()
    assert B.shape == (n, h)
    np.testing.assert_allclose(B.T @ B, np.eye(h), atol=tol)
    if A.size:
        np.testing.assert_allclose(A @ B, 0, atol=10 * tol)


@pytest.mark.parametrize("maps", ["dense", "integer", "mixed"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_numpy(seed, maps):
    S = build_random_sheaf(seed, n_vertices=5, n_edges=6, maps=maps, weights=True)
    D = dense_coboundary(S)
    H = cs.cohomology(S)
    r = np.linalg.matrix_rank(D) if D.size else 0
    assert (H.rank, H.h0, H.h1) == (r, S.C0 - r, S.C1 - r)
    check_basis(H.H0, D, S.C0, H.h0)
    check_basis(H.H1, D.T, S.C1, H.h1)
    assert H.tol == pytest.approx(default_tol(D.shape, np.finfo(float).eps))
    assert H.decision.method == "dense" and H.certified
    assert H.decision.largest_dropped is None or H.decision.largest_dropped <= H.tol
    assert H.decision.smallest_kept is None or H.decision.smallest_kept > H.tol
    torch.testing.assert_close(cs.global_sections(S), H.H0)
    torch.testing.assert_close(S.global_sections(), H.H0)


def numpy_kernel(D: np.ndarray, eps: float) -> np.ndarray:
    """Right singular vectors of a dense ``D`` below numpy's rank tolerance ``σ_max · max(m, n) · eps``."""
    if D.size == 0:
        return np.eye(D.shape[1])
    _, s, Vt = np.linalg.svd(D)
    r = int((s > s.max(initial=0) * max(D.shape) * eps).sum())
    return Vt[r:].T


# Small singular values resolved in float64 are ranks, not kernels: an eigenvalue threshold on the dense L
# (n · 1e-10 · ‖L‖, i.e. σ below ~3e-5 σ_max) once counted them as kernel vectors in these examples.
@SETTINGS
@example(build_random_sheaf(1680593888, 5, 7, maps="mixed", weights=True))  # σ_min/σ_max = 2.0e-5: h0 = 0
@example(build_random_sheaf(3748469602, 6, 5, maps="mixed", weights=True))  # σ_min/σ_max = 6.2e-6
@example(build_random_sheaf(2344215276, 5, 6, maps="mixed", weights=True))  # σ_min/σ_max = 4.5e-6
@given(random_sheaf(maps="mixed", weights=True))
def test_euler_characteristic_and_hodge(S):
    H = S.cohomology()
    assert H.h0 - H.h1 == S.C0 - S.C1 == H.euler_characteristic
    # H¹ is counted from its basis: an independent check of the dimension formula
    assert H.H0.shape[1] - H.H1.shape[1] == S.C0 - S.C1
    # ker δ from an independent dense SVD (numpy's rank tolerance in the precision of the maps)
    K = numpy_kernel(dense_coboundary(S), float(torch.finfo(H.H0.dtype).eps))
    assert H.h0 == K.shape[1]
    np.testing.assert_allclose(projector(H.H0.double().numpy()), projector(K), atol=atol(H.H0, 1e-7))
    # Hodge: ker δ = ker L
    L = dense_laplacian(S)
    np.testing.assert_allclose(L @ H.H0.double().numpy(), 0, atol=atol(H.H0, 1e-10) * max(abs(L).max(initial=0), 1))


def connected_graph(draw_n: int, extra: int, seed: int) -> nx.Graph:
    G = nx.gnm_random_graph(draw_n, extra, seed=seed)
    nx.add_path(G, range(draw_n))  # connected
    return G


@SETTINGS
@given(st.integers(1, 7), st.integers(0, 10), st.integers(1, 3), st.integers(0, 10_000))
def test_constant_sheaf(n, extra, d, seed):
    G = connected_graph(n, extra, seed)
    S = constant_sheaf(G, d)
    assert S.cohomology().h0 == d
    Lg = nx.laplacian_matrix(G, nodelist=S.vertices).toarray()
    np.testing.assert_allclose(S.laplacian(format="dense").numpy(), np.kron(Lg, np.eye(d)), atol=1e-12)
    # H⁰ is spanned by the constant sections
    const = np.kron(np.ones((n, 1)), np.eye(d)) / math.sqrt(n)
    np.testing.assert_allclose(projector(S.global_sections().numpy()), projector(const), atol=1e-10)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_holonomy(n):
    assert cs.cohomology(holonomy_cycle(n, 0.7)).h0 == 0
    assert cs.cohomology(holonomy_cycle(n, 0.7)).h1 == 0
    assert cs.cohomology(holonomy_cycle(n, 2 * math.pi)).h0 == 2
    # a reflection as holonomy keeps exactly the fixed line
    S = holonomy_cycle(n, 0.0)
    S.set_maps(f"e{n - 1}", Fu=torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)))
    assert S.cohomology().h0 == 1


def test_disconnected_and_empty():
    S = constant_sheaf(nx.Graph([(0, 1), (2, 3)]), 2)
    H = S.cohomology()
    assert (H.h0, H.h1) == (4, 0)
    E = cs.Sheaf()
    H = E.cohomology()
    assert (H.h0, H.h1, tuple(H.H0.shape)) == (0, 0, (0, 0))
    S = cs.Sheaf()
    S.add_vertex("a", 3)
    H = S.cohomology()
    assert H.h0 == 3 and H.gap == math.inf
    torch.testing.assert_close(H.H0 @ H.H0.T, torch.eye(3, dtype=H.H0.dtype))  # no tensors: default dtype


def test_zero_maps():
    S = cs.Sheaf()
    S.add_vertex("a", 2); S.add_vertex("b", 1)
    S.add_edge("a", "b", torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    for kw in ({}, {"exact": True}, {"method": "sparse"}):
        H = S.cohomology(**kw)
        assert (H.h0, H.h1) == (3, 2)
        assert H.H1.shape == (2, 2)


def test_gap_reports_how_clear_the_cut_is():
    eps = 2.0 ** -30
    S = cs.Sheaf()
    S.add_vertex("a", 2); S.add_vertex("b", 2)
    M = np.array([[1.0, 1.0], [1.0, 1.0 + eps]])
    S.add_edge("a", "b", torch.as_tensor(M), torch.zeros(2, 2, dtype=torch.float64))
    # the edge is scaled to unit Frobenius norm; vertex a's block is M / ‖M‖_F, b's block is zero
    s = np.linalg.svd(M / np.linalg.norm(M), compute_uv=False)
    H = S.cohomology()
    assert H.rank == 2 and H.gap == pytest.approx(s[1] / H.tol)  # nothing dropped at a: kept vs tolerance
    assert H.gap < 1e7  # a weak decision, visible to the user
    H = S.cohomology(tol=1e-6)
    assert H.rank == 1 and H.h0 == 3
    assert H.decision.largest_dropped == pytest.approx(s[1], rel=1e-6)
    assert H.gap == pytest.approx(H.decision.smallest_kept / s[1], rel=1e-6)
    clear = path_sheaf(4).cohomology()
    assert clear.gap > 1e12


def test_exact_rank_beats_floating_point():
    # [[1, 1], [1, 1 + 2^-52]] has exact rank 2 but a singular value below the default tolerance
    S = cs.Sheaf()
    S.add_vertex("a", 2); S.add_vertex("b", 1)
    M = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 2.0 ** -52]], dtype=torch.float64)
    S.add_edge("a", "b", M, torch.zeros(2, 1, dtype=torch.float64))
    assert S.cohomology().rank == 1
    H = S.cohomology(exact=True)
    assert (H.rank, H.h0, H.h1) == (2, 1, 0)
    assert H.decision.method == "exact" and H.gap is None and H.tol is None
    check_basis(H.H0, dense_coboundary(S), 3, 1)


@pytest.mark.parametrize("seed", range(5))
def test_exact_matches_sympy(seed):
    S = build_random_sheaf(seed, n_vertices=5, n_edges=7, maps="integer")
    D = dense_coboundary(S)
    r = sympy.Matrix(D.astype(int)).rank()
    H = S.cohomology(exact=True)
    assert (H.rank, H.h0, H.h1) == (r, S.C0 - r, S.C1 - r)
    check_basis(H.H0, D, S.C0, H.h0)
    check_basis(H.H1, D.T, S.C1, H.h1)
    assert H.rank == S.cohomology().rank


def test_exact_needs_sympy(monkeypatch):
    monkeypatch.setitem(sys.modules, "sympy", None)
    with pytest.raises(ImportError, match="pip install"):
        path_sheaf(3).cohomology(exact=True)


@pytest.mark.parametrize("seed", range(3))
def test_sparse_route_matches_dense(seed):
    S = build_random_sheaf(seed, n_vertices=80, n_edges=90, maps="dense", dims=(1, 3), edge_dims=(1, 2),
                           connected=True)
    dense, sparse = S.cohomology(), S.cohomology(method="sparse", k=60)
    assert (sparse.h0, sparse.h1) == (dense.h0, dense.h1)
    assert sparse.decision.method == "sparse"
    np.testing.assert_allclose(projector(sparse.H0.numpy()), projector(dense.H0.numpy()), atol=1e-6)
    if sparse.H1 is not None:
        np.testing.assert_allclose(projector(sparse.H1.numpy()), projector(dense.H1.numpy()), atol=1e-6)
    assert sparse.singular_values[0] == pytest.approx(float(dense.singular_values[0]), rel=1e-8)


def test_sparse_route_counts_any_kernel_whatever_k():
    # 28 isolated vertices are local kernels: no eigensolver has to find them, so k does not bound h0
    S = constant_sheaf(nx.empty_graph(30), 1)
    S.add_edge(0, 1, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    for k in (1, 4, 30):
        assert S.cohomology(method="sparse", k=k).h0 == 29


def test_auto_route_threshold():
    S = path_sheaf(DENSE_LIMIT + 1)
    H = S.cohomology()
    assert H.decision.method == "sparse" and H.h0 == 1
    assert H.H1 is not None and H.H1.shape == (DENSE_LIMIT, 0)


def test_nonlinear_needs_a_point():
    S = build_random_sheaf(3, maps="nonlinear")
    x = random_point(S, 1)
    assert not S.linear
    with pytest.raises(ValueError, match="at="):
        S.cohomology()
    H = S.cohomology(at=x)
    L = S.linearize(x).cohomology()
    assert (H.h0, H.h1) == (L.h0, L.h1)
    check_basis(H.H0, dense_coboundary(S, x), S.C0, H.h0)


def test_float32_sheaf_gives_float32_bases():
    S = build_random_sheaf(2, maps="dense", dtype=torch.float32)
    H = S.cohomology()
    assert H.H0.dtype == torch.float32 and H.H1.dtype == torch.float32
    assert H.h0 == build_random_sheaf(2, maps="dense").cohomology().h0


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": -1.0}, "tol"), ({"tol": float("nan")}, "tol"), ({"method": "qr"}, "method"),
    ({"exact": True, "tol": 1e-3}, "exact"), ({"method": "sparse", "k": 0}, "k must"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        path_sheaf(3).cohomology(**kwargs)


def test_non_finite_maps_are_reported():
    S = path_sheaf(3)
    with pytest.raises(ValueError, match="edge 'e0': Fu has NaN or Inf"):  # refused where it enters
        S.set_maps("e0", Fu=torch.tensor([[float("nan")]], dtype=torch.float64))


# ---------------------------------------------------------------------------- relative cohomology


@pytest.mark.parametrize("d", [1, 2])
def test_relative_path_with_an_end_fixed_is_zero(d):
    S = path_sheaf(5, d)
    R = cs.relative_cohomology(S, cs.Boundary().fix(0, torch.zeros(d)))
    assert R.dim == R.h0 == 0 and R.basis.shape == (5 * d, 0)
    assert cs.relative_cohomology(S, []).dim == d
    # fixing one coordinate of a stalk of dim 2 leaves the other free
    if d == 2:
        R = cs.relative_cohomology(S, cs.Boundary().fix(4, [1.0], coords=[1]))
        assert R.dim == 1
        B = R.basis.numpy()
        assert np.allclose(B[S.vertex_slice(4).start + 1], 0)
        np.testing.assert_allclose(dense_coboundary(S) @ B, 0, atol=1e-12)


@SETTINGS
@given(random_sheaf(maps="mixed"), st.data())
def test_relative_matches_restricted_coboundary(S, data):
    fixed = data.draw(st.lists(st.integers(0, S.C0 - 1), unique=True, max_size=S.C0))
    R = cs.relative_cohomology(S, fixed)
    free = np.setdiff1d(np.arange(S.C0), fixed)
    D = dense_coboundary(S)[:, free]
    r = np.linalg.matrix_rank(D) if D.size else 0
    assert R.dim == free.size - r
    np.testing.assert_array_equal(R.free.numpy(), free)
    B = R.basis.numpy()
    assert np.allclose(B[fixed], 0)
    check_basis(torch.as_tensor(B[free]), D, free.size, R.dim)


def test_propagation_from_the_boundary_decides_only_the_rest():
    # above DENSE_LIMIT free coordinates, vertices the boundary determines through injective maps leave the rank
    # decision; what remains (the floating part) is decided as before, and the answer is that of the full decision
    S, b = anchored_and_floating(500, 300)
    R = cs.relative_cohomology(S, b)
    full = cs.relative_cohomology(S, b, method="sparse")  # no propagation: every free coordinate decided
    assert R.dim == full.dim == 1 and R.certified
    assert R.decision.certificate.startswith("1350 of 2250 free coordinates determined by propagation")
    np.testing.assert_allclose(np.abs(R.basis.numpy()), np.abs(full.basis.numpy()), atol=1e-8)
    # fixing one coordinate of the floating part determines nothing there (its maps still see two free ones) ...
    b.fix(600, torch.zeros(1, dtype=torch.float64), coords=[0])
    assert cs.relative_cohomology(S, b).dim == cs.relative_cohomology(S, b, method="sparse").dim == 0
    # ... and a whole fixed vertex determines all of it: the extension is unique, exactly
    b.unfix(600).fix(600, torch.zeros(3, dtype=torch.float64))
    R = cs.relative_cohomology(S, b)
    assert R.dim == 0 and R.decision.method == "exact" and R.basis.shape == (S.C0, 0)


def test_a_map_that_is_not_injective_stops_propagation():
    S, b = anchored_and_floating(900, 0)
    rank_one = torch.as_tensor(np.outer([1.0, 2.0, 3.0], [1.0, -1.0, 0.5]))
    for e in S.edges[:40]:  # some vertices are then determined through other edges, some by the rank decision
        S.set_maps(e, Fv=rank_one)
    assert cs.relative_cohomology(S, b).dim == cs.relative_cohomology(S, b, method="sparse").dim


def test_relative_boundary_errors_name_the_vertex():
    S = path_sheaf(3)
    with pytest.raises(KeyError, match="'nope'"):
        cs.relative_cohomology(S, cs.Boundary().fix("nope", [0.0]))
    with pytest.raises(IndexError, match="vertex 0"):
        cs.relative_cohomology(S, cs.Boundary().fix(0, [0.0], coords=[3]))
    with pytest.raises(IndexError):
        cs.relative_cohomology(S, [7])


def test_docstring_examples_run():
    import doctest
    import sys

    result = doctest.testmod(sys.modules["cellsheaf.cohomology"], optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_structured_maps_only():
    # no map holds a tensor: the sheaf has the default dtype, and results are rounded to it
    S = cs.Sheaf()
    S.add_vertex(0, 2); S.add_vertex(1, 2)
    S.add_edge(0, 1, cs.maps.Identity(2), cs.maps.Select([1, 0], 2))
    H = S.cohomology()
    assert H.H0.dtype == torch.get_default_dtype() and (H.h0, H.h1) == (2, 0)  # x_u = swap(x_v)
    check_basis(H.H0, dense_coboundary(S), 4, 2)
    check_basis(H.H1, dense_coboundary(S).T, 2, 0)


# ---------------------------------------------------------------------------- rank decisions at scale


def integer_sheaf(seed: int, n: int, m: int, dtype=torch.float64) -> cs.Sheaf:
    """Random integer maps of every rank: full, rank one, zero, identities (cycles with trivial holonomy)."""
    rng = np.random.default_rng(seed)
    S = cs.Sheaf()
    for v in range(n):
        S.add_vertex(v, int(rng.integers(1, 3)))
    for k in range(m):
        u, v = (k % n, (k + 1) % n) if k < n else (int(rng.integers(n)), int(rng.integers(n)))
        de = int(rng.integers(1, 3))
        maps = []
        for w in (u, v):
            kind, d = rng.integers(4), S.dim(w)
            if kind == 0:
                M = rng.integers(-2, 3, size=(de, d))
            elif kind == 1:
                M = np.outer(rng.integers(-2, 3, size=de), rng.integers(-2, 3, size=d))
            elif kind == 2:
                M = np.zeros((de, d))
            else:
                M = np.eye(de, d)
            maps.append(torch.as_tensor(M.astype(np.float64), dtype=dtype))
        S.add_edge(u, v, *maps, name=k)
    return S


def exact_rank(D: np.ndarray) -> int:
    """Rank over the rationals by sympy, from the dense integer matrix."""
    from sympy import QQ
    from sympy.polys.matrices import DomainMatrix

    rows = {i: {int(j): QQ(int(D[i, j])) for j in np.flatnonzero(D[i])} for i in range(D.shape[0]) if D[i].any()}
    return int(DomainMatrix(rows, D.shape, QQ).rank()) if rows else 0


@settings(max_examples=10, deadline=None)
@given(st.integers(10, 200), st.floats(0.8, 1.6), st.integers(0, 2**32 - 1))
def test_default_route_equals_exact_rank_on_integer_maps(n, density, seed):
    S = integer_sheaf(seed, n, int(n * density))
    D = dense_coboundary(S)
    r = exact_rank(D)
    H = S.cohomology()
    assert (H.h0, H.h1) == (S.C0 - r, S.C1 - r)
    assert H.certified and H.gap > 1e3


@settings(max_examples=15, deadline=None)
@given(st.integers(10, 120), st.integers(0, 2**32 - 1), st.sampled_from([-9, 9]), st.data())
def test_rescaling_an_edge_never_changes_a_rank(n, seed, exponent, data):
    S = integer_sheaf(seed, n, int(1.3 * n))
    H, fixed = S.cohomology(), list(range(S.dim(0)))
    R = cs.relative_cohomology(S, fixed)
    name = data.draw(st.sampled_from(S.edges))
    e = S.edge(name)
    S.set_maps(name, Fu=10.0 ** exponent * e.Fu.matrix(), Fv=10.0 ** exponent * e.Fv.matrix())
    assert (S.cohomology().h0, S.cohomology().h1) == (H.h0, H.h1)
    assert cs.relative_cohomology(S, fixed).dim == R.dim


@settings(max_examples=15, deadline=None)
@given(st.integers(10, 200), st.integers(0, 2**32 - 1), st.sampled_from(["dense", "integer"]))
def test_float32_and_float64_give_the_same_cohomology(n, seed, maps):
    S64 = build_random_sheaf(seed, n, int(1.2 * n), dims=(1, 2), edge_dims=(1, 2), maps=maps)
    S32 = build_random_sheaf(seed, n, int(1.2 * n), dims=(1, 2), edge_dims=(1, 2), maps=maps, dtype=torch.float32)
    H64, H32 = S64.cohomology(), S32.cohomology()
    assert (H32.h0, H32.h1) == (H64.h0, H64.h1)
    assert H32.tol > H64.tol  # float32 maps are decided with float32's epsilon


def test_float32_holonomy_free_cycle_keeps_its_sections():
    # rotations by 2π/n in float32 compose to I only up to float32 rounding: h0 = 2, not 0
    for n in (5, 50, 500):
        S = cs.Sheaf()
        for i in range(n):
            S.add_vertex(i, 2)
        for i in range(n):
            S.add_edge(i, (i + 1) % n, rotation(2 * math.pi / n, torch.float32), torch.eye(2))
        H = S.cohomology()
        assert (H.h0, H.h1) == (2, 2) and H.certified
        assert holonomy_cycle(n, 0.7, dtype=torch.float32).cohomology().h0 == 0


def test_badly_scaled_edges_do_not_change_ranks():
    S = constant_sheaf(nx.path_graph(6), 2)
    S.set_maps(S.edges[1], Fu=1e-9 * torch.eye(2, dtype=torch.float64), Fv=1e-9 * torch.eye(2, dtype=torch.float64))
    S.set_maps(S.edges[2], Fu=1e6 * torch.eye(2, dtype=torch.float64), Fv=1e6 * torch.eye(2, dtype=torch.float64))
    H = S.cohomology()
    assert (H.h0, H.h1) == (2, 0) and H.gap > 1e10


def o2_grid(n: int, flat: bool, seed: int = 0, dtype=torch.float64) -> cs.Sheaf:
    """An n×n grid with O(2) maps: flat (a gauge of the constant sheaf, h0 = 2) or random rotations (h0 = 0)."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0, 2 * math.pi, n * n)
    S = cs.Sheaf()
    for v in range(n * n):
        S.add_vertex(v, 2)
    I = torch.eye(2, dtype=dtype)
    for v in range(n * n):
        for w in ([v + 1] if (v + 1) % n else []) + ([v + n] if v + n < n * n else []):
            if flat:
                S.add_edge(v, w, rotation(theta[v], dtype), rotation(theta[w], dtype))
            else:
                S.add_edge(v, w, rotation(rng.uniform(0, 2 * math.pi), dtype), I)
    return S


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_o2_grid_on_the_sparse_route(dtype):
    flat, generic = o2_grid(36, True, dtype=dtype), o2_grid(36, False, dtype=dtype)
    assert flat.C0 > DENSE_LIMIT
    Hf, Hg = flat.cohomology(), generic.cohomology()
    assert (Hf.h0, Hg.h0) == (2, 0) and Hf.h1 == flat.C1 - flat.C0 + 2
    for H in (Hf, Hg):
        assert H.decision.method == "sparse" and H.certified and H.gap > 100
    np.testing.assert_allclose(flat.coboundary(format="scipy") @ Hf.H0.double().numpy(), 0, atol=1e-5)
