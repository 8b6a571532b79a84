"""Spectral tools against dense numpy eigendecompositions and closed forms."""

import math

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
import cellsheaf.spectral as spectral
from tests.conftest import build_random_sheaf, constant_sheaf, dense_laplacian, path_sheaf, random_point, random_sheaf


def dense_normalized(L: np.ndarray, S: cs.Sheaf) -> np.ndarray:
    """``D^{-1/2} L D^{-1/2}`` with the pseudo-inverse square root of each diagonal block."""
    R = np.zeros_like(L)
    for v in S.vertices:
        sl = S.vertex_slice(v)
        w, Q = np.linalg.eigh(L[sl, sl])
        inv = np.array([1 / math.sqrt(x) if x > 1e-12 else 0.0 for x in w])
        R[sl, sl] = (Q * inv) @ Q.T
    return R @ L @ R


def check_pairs(vals, vecs, A, expected):
    vals, vecs = vals.double().numpy(), vecs.double().numpy()
    np.testing.assert_allclose(vals, expected, atol=1e-9)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(len(vals)), atol=1e-8)
    np.testing.assert_allclose(A @ vecs, vecs * vals, atol=1e-7)


@pytest.mark.parametrize("method", ["dense", "sparse", "lanczos", "lobpcg"])
@pytest.mark.parametrize("seed", range(4))
def test_eigenpairs_match_numpy(seed, method):
    S = build_random_sheaf(seed, n_vertices=30, n_edges=45, maps="mixed", weights=True, connected=True)
    L = dense_laplacian(S)
    w = np.linalg.eigvalsh(L)
    k = 4
    check_pairs(*cs.eigenpairs(S, k, method=method), L, w[:k])
    check_pairs(*cs.eigenpairs(S, k, which="largest", method=method), L, w[::-1][:k])


@pytest.mark.parametrize("method", ["dense", "sparse", "lanczos", "lobpcg"])
def test_restricted_normalized_and_linearised(method):
    S = build_random_sheaf(5, n_vertices=25, n_edges=40, maps="dense", connected=True)
    L = dense_laplacian(S)
    b = cs.Boundary().fix("v0", torch.zeros(S.dim("v0"))).fix("v3", [1.0], coords=[0])
    free = b.resolve(S).free.numpy()
    A = L[np.ix_(free, free)]
    check_pairs(*cs.eigenpairs(S, 3, boundary=b, method=method), A, np.linalg.eigvalsh(A)[:3])
    N = dense_normalized(L, S)
    check_pairs(*cs.eigenpairs(S, 3, which="largest", normalized=True, method=method), N,
                np.linalg.eigvalsh(N)[::-1][:3])
    T = build_random_sheaf(6, n_vertices=20, n_edges=30, maps="nonlinear", connected=True)
    x = random_point(T, 2)
    LT = dense_laplacian(T, x)
    check_pairs(*cs.eigenpairs(T, 2, at=x, method=method), LT, np.linalg.eigvalsh(LT)[:2])
    with pytest.raises(ValueError, match="at="):
        cs.eigenpairs(T, 2)


def test_repeated_kernel_found_by_sparse_route():
    # 40 isolated R^2 stalks plus a path: a kernel of dimension 82 (Lanczos alone misses multiplicities)
    S = constant_sheaf(nx.disjoint_union(nx.empty_graph(40), nx.path_graph(60)), 2)
    vals, vecs = cs.eigenpairs(S, 84, method="sparse")
    w = np.linalg.eigvalsh(dense_laplacian(S))
    np.testing.assert_allclose(vals.numpy(), w[:84], atol=1e-9)
    assert int((vals.abs() < 1e-9).sum()) == 82


@settings(max_examples=20, deadline=None)
@given(random_sheaf(maps="mixed", weights=True))
def test_laplacian_spectrum_is_nonnegative(S):
    vals, vecs = cs.eigenpairs(S, S.C0)
    rel = 1e-9 if vals.dtype == torch.float64 else 1e-6  # maps without tensors give a float32 sheaf
    assert float(vals.min()) > -1e-9
    assert cs.lambda_max(S) == pytest.approx(float(vals.max()), rel=rel, abs=1e-12)
    assert cs.lambda_max(S, method="bound") >= float(vals.max()) * (1 - rel) - 1e-9  # vals rounded to the dtype


@pytest.mark.parametrize("n", [2, 5, 12])
def test_path_graph_closed_forms(n):
    S = path_sheaf(n)
    gap = 2 - 2 * math.cos(math.pi / n)
    assert cs.spectral_gap(S) == pytest.approx(gap, rel=1e-10)
    assert cs.lambda_max(S) == pytest.approx(2 - 2 * math.cos(math.pi * (n - 1) / n), rel=1e-10)
    f = cs.fiedler_vector(S).numpy()
    ref = np.cos(math.pi * (np.arange(n) + 0.5) / n)
    ref /= np.linalg.norm(ref)
    assert abs(abs(f @ ref) - 1) < 1e-8
    # one end fixed: L[Ω,Ω] is positive definite, its smallest eigenvalue 2 - 2cos(π/(2n-1))
    b = cs.Boundary().fix(0, [0.0])
    assert cs.spectral_gap(S, boundary=b) == pytest.approx(2 - 2 * math.cos(math.pi / (2 * n - 1)), rel=1e-9)


def test_sparse_routes_on_a_long_path():
    n = 400
    S = path_sheaf(n, 2)
    assert cs.spectral_gap(S, method="sparse") == pytest.approx(2 - 2 * math.cos(math.pi / n), rel=1e-8)
    exact = 2 - 2 * math.cos(math.pi * (n - 1) / n)
    assert cs.lambda_max(S, method="sparse") == pytest.approx(exact, rel=1e-9)
    est = cs.lambda_max(S, method="lanczos")
    assert est <= exact * (1 + 1e-12) and est == pytest.approx(exact, rel=1e-2)
    assert cs.lambda_max(S, method="bound") >= exact


def test_lambda_max_of_trivial_operators():
    S = path_sheaf(3)
    assert cs.lambda_max(S, boundary=[0, 1, 2]) == 0.0
    E = cs.Sheaf()
    E.add_vertex("a", 2)
    assert cs.lambda_max(E) == 0.0
    with pytest.raises(ValueError, match="no spectral gap"):
        cs.spectral_gap(E)
    with pytest.raises(ValueError, match="every coordinate is fixed"):
        cs.spectral_gap(S, boundary=[0, 1, 2])


@settings(max_examples=15, deadline=None)
@given(random_sheaf(maps="dense"), st.integers(0, 3))
def test_block_energy(S, batch):
    x = random_point(S, 3, batch=batch or None)
    e = cs.block_energy(S, x)
    assert e.shape == (*x.shape[:-1], len(S.vertices))
    ref = torch.stack([(x[..., S.vertex_slice(v)] ** 2).sum(-1) for v in S.vertices], -1)
    ref = ref / (x ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(e, ref)


def test_block_energy_with_boundary_and_zero():
    S = path_sheaf(4, 2)
    b = cs.Boundary().fix(1, torch.zeros(2))
    vals, vecs = cs.eigenpairs(S, 2, boundary=b)
    e = cs.block_energy(S, vecs.T, boundary=b)
    assert e.shape == (2, 4)
    torch.testing.assert_close(e.sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.all(e[:, 1] == 0)
    torch.testing.assert_close(cs.block_energy(S, torch.zeros(8, dtype=torch.float64)),
                               torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="free coordinates"):
        cs.block_energy(S, torch.zeros(8), boundary=b)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must"), ({"k": 99}, "k must"), ({"k": 1.5}, "k must"), ({"k": 1, "which": "middle"}, "which"),
    ({"k": 1, "method": "arnoldi"}, "method"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cs.eigenpairs(path_sheaf(3), **kwargs)


def test_float32_sheaf():
    S = build_random_sheaf(1, maps="dense", dtype=torch.float32, connected=True)
    vals, vecs = cs.eigenpairs(S, 2)
    assert vals.dtype == vecs.dtype == torch.float32
    assert cs.fiedler_vector(S).dtype == torch.float32


def test_docstring_examples_run():
    import doctest
    import sys

    result = doctest.testmod(sys.modules["cellsheaf.spectral"], optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------------------- Lanczos route and gradients


def test_lanczos_route_matches_dense(monkeypatch):
    monkeypatch.setattr(spectral, "_KRYLOV_MIN", 0)
    S = build_random_sheaf(7, n_vertices=150, n_edges=450, dims=(2, 3), edge_dims=(2, 3), maps="dense",
                           connected=True)
    for normalized in (False, True):
        N = cs.operators.laplacian(S, normalized=normalized, format="dense").numpy()
        pairs = cs.eigenpairs(S, 8, normalized=normalized, method="sparse")
        assert pairs.info.method == "arpack" and pairs.info.iterations > 0 and pairs.info.residual < 1e-8
        check_pairs(*pairs, N, np.linalg.eigvalsh(N)[:8])


def test_lanczos_route_finds_repeated_eigenvalues(monkeypatch):
    monkeypatch.setattr(spectral, "_KRYLOV_MIN", 0)
    S = constant_sheaf(nx.cycle_graph(120), 3)  # every eigenvalue of L has multiplicity >= 3
    vals, vecs = cs.eigenpairs(S, 9, method="sparse")
    w = np.linalg.eigvalsh(dense_laplacian(S))
    np.testing.assert_allclose(vals.numpy(), w[:9], atol=1e-9)


def stacked_sheaf(M: torch.Tensor) -> cs.Sheaf:
    """A small sheaf whose first edge map is ``M`` (possibly requiring grad)."""
    g = torch.Generator().manual_seed(3)
    S = cs.Sheaf()
    for v in range(6):
        S.add_vertex(v, 2)
    pairs = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (0, 3), (1, 4)]
    for k, (u, v) in enumerate(pairs):
        Fu = M if k == 0 else torch.randn(2, 2, generator=g, dtype=torch.float64)
        S.add_edge(u, v, Fu, torch.randn(2, 2, generator=g, dtype=torch.float64))
    return S


@pytest.mark.parametrize("normalized", [False, True])
def test_eigenpairs_are_differentiable_where_simple(normalized):
    M0 = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(M):
        vals, vecs = cs.eigenpairs(stacked_sheaf(M), 3, normalized=normalized, method="dense")
        return vals.sum() + ((vecs * w[:, None]) ** 2).sum()  # invariant to the eigenvectors' signs

    M = M0.clone().requires_grad_(True)
    f(M).backward()
    eps, fd = 1e-6, torch.zeros(2, 2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                E = torch.zeros(2, 2, dtype=torch.float64)
                E[i, j] = eps
                fd[i, j] = (f(M0 + E) - f(M0 - E)) / (2 * eps)
    torch.testing.assert_close(M.grad, fd, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the torch route (LOBPCG)


def test_lobpcg_route_matches_dense_and_reports():
    S = build_random_sheaf(7, n_vertices=150, n_edges=450, dims=(2, 3), edge_dims=(2, 3), maps="dense",
                           connected=True)
    for normalized in (False, True, "augmented"):
        N = cs.operators.laplacian(S, normalized=normalized, format="dense").numpy()
        pairs = cs.eigenpairs(S, 6, normalized=normalized, method="lobpcg")
        assert pairs.info.method == "lobpcg" and pairs.info.converged and pairs.info.residual < 1e-9
        assert pairs.info.iterations > 0 and pairs.info.extra["applications"] > 0
        check_pairs(*pairs, N, np.linalg.eigvalsh(N)[:6])
        assert pairs.values.device == S.device and pairs.values.dtype == S.dtype


def test_lobpcg_route_finds_repeated_eigenvalues():
    S = constant_sheaf(nx.cycle_graph(120), 3)  # every eigenvalue of L has multiplicity >= 3
    vals, vecs = cs.eigenpairs(S, 9, method="lobpcg")
    L = dense_laplacian(S)
    check_pairs(vals, vecs, L, np.linalg.eigvalsh(L)[:9])


def test_auto_route_stays_on_the_device():
    assert spectral._route(10_000, "auto", torch.device("cpu")) == "sparse"
    assert spectral._route(100, "auto", torch.device("cpu")) == "dense"
    assert spectral._route(100, "auto", torch.device("meta")) == "lanczos"  # any non-CPU device: torch only


def learnable_sheaf(Fu: torch.Tensor, Fv: torch.Tensor) -> cs.Sheaf:
    """A 7-vertex stacked sheaf with 2-dimensional stalks and the given maps ``(10, 2, 2)``."""
    index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2], [1, 2, 3, 4, 5, 6, 0, 3, 4, 5]])
    return cs.Sheaf.from_arrays([2] * 7, index, Fu, Fv)


@pytest.mark.parametrize("method", ["dense", "lanczos", "lobpcg"])
@pytest.mark.parametrize("normalized", [False, True])
def test_eigenpairs_gradcheck(method, normalized):
    g = torch.Generator().manual_seed(5)
    Fu = torch.randn(10, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    Fv = torch.randn(10, 2, 2, generator=g, dtype=torch.float64)
    w = torch.randn(14, generator=g, dtype=torch.float64)

    def f(Fu):
        vals, vecs = cs.eigenpairs(learnable_sheaf(Fu, Fv), 3, normalized=normalized, method=method)
        return vals, (vecs * w[:, None]) ** 2  # invariant to the eigenvectors' signs

    spectral_values = np.linalg.eigvalsh(cs.operators.laplacian(learnable_sheaf(Fu.detach(), Fv),
                                                                normalized=normalized, format="dense").numpy())
    assert np.diff(spectral_values[:4]).min() > 1e-3  # simple eigenvalues: the gradient exists
    assert torch.autograd.gradcheck(f, (Fu,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_eigenpairs_gradient_of_largest_and_with_boundary():
    g = torch.Generator().manual_seed(6)
    Fu = torch.randn(10, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    Fv = torch.randn(10, 2, 2, generator=g, dtype=torch.float64)
    b = cs.Boundary().fix(0, torch.zeros(2, dtype=torch.float64))
    w = torch.randn(12, generator=g, dtype=torch.float64)

    def f(Fu):
        S = learnable_sheaf(Fu, Fv)
        top = cs.eigenpairs(S, 2, which="largest", method="lobpcg")
        low = cs.eigenpairs(S, 2, boundary=b, method="dense")
        return top.values, top.vectors ** 2, low.values, (low.vectors * w[:, None]) ** 2

    assert torch.autograd.gradcheck(f, (Fu,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_repeated_eigenvalues_have_value_gradients_and_vector_gradients_raise():
    F = torch.eye(2, dtype=torch.float64).expand(6, 2, 2).clone().requires_grad_(True)
    index = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])
    S = cs.Sheaf.from_arrays([2] * 6, index, F, torch.eye(2, dtype=torch.float64).expand(6, 2, 2))
    vals, vecs = cs.eigenpairs(S, 6)  # the constant sheaf R^2 on C6: 0 twice, then 1 four times
    vals.sum().backward()  # the sum over whole eigenspaces is differentiable
    assert torch.isfinite(F.grad).all()
    vals, vecs = cs.eigenpairs(S, 3)
    with pytest.raises(ValueError, match=r"eigenvalue 2 and the next eigenvalue .* repeated \(gap"):
        vecs[:, 2].pow(3).sum().backward()


def test_eigenpairs_with_grad_do_not_warn_and_at_warns_that_it_detaches(recwarn):
    import warnings

    F = torch.randn(10, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    S = learnable_sheaf(F, F.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("dense", "sparse", "lanczos", "lobpcg"):
            assert cs.eigenpairs(S, 2, normalized=True, method=method).values.requires_grad
        cs.spectral_gap(S), cs.lambda_max(S)
    with pytest.warns(UserWarning, match="detached"):
        vals = cs.eigenpairs(S, 2, at=torch.zeros(S.C0, dtype=torch.float64)).values
    assert not vals.requires_grad


@pytest.mark.parametrize("method", ["lanczos", "lobpcg"])
def test_gap_fiedler_and_lambda_max_on_the_torch_routes(method):
    S = build_random_sheaf(8, n_vertices=120, n_edges=300, dims=(2, 3), edge_dims=(2, 3), maps="dense",
                           connected=True)
    T = constant_sheaf(nx.disjoint_union(nx.cycle_graph(60), nx.path_graph(50)), 2)  # a kernel of dim 4
    b = cs.Boundary().fix("v0", torch.zeros(S.dim("v0"), dtype=torch.float64))
    for sheaf, kwargs in ((S, {}), (S, {"normalized": True}), (S, {"boundary": b}), (T, {})):
        A = (cs.operators.laplacian(sheaf, normalized=kwargs.get("normalized", False), format="dense").numpy()
             if "boundary" not in kwargs else dense_laplacian(sheaf)[np.ix_(*[b.resolve(sheaf).free.numpy()] * 2)])
        w, V = np.linalg.eigh(A)
        gap = w[w > 1e-9][0]
        assert cs.spectral_gap(sheaf, method=method, **kwargs) == pytest.approx(gap, rel=1e-9, abs=1e-12)
        assert cs.lambda_max(sheaf, method=method, **kwargs) == pytest.approx(w[-1], rel=1e-9)
        v = cs.fiedler_vector(sheaf, method=method, **kwargs).numpy()
        np.testing.assert_allclose(A @ v, gap * v, atol=1e-8)
        assert v @ v == pytest.approx(1.0)
    assert cs.lambda_max(cs.Sheaf.from_arrays([1] * 2, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 1, 1),
                                              torch.zeros(0, 1, 1)), method=method) == 0.0


def test_lanczos_route_gradients_equal_the_dense_route():
    g = torch.Generator().manual_seed(9)
    index = torch.stack([torch.arange(80), (torch.arange(80) + 1) % 80])
    index = torch.cat([index, torch.randint(80, (2, 60), generator=g)], 1)
    index = index[:, index[0] != index[1]]
    Fu0 = torch.randn(index.shape[1], 2, 2, generator=g, dtype=torch.float64)
    Fv = torch.randn(index.shape[1], 2, 2, generator=g, dtype=torch.float64)
    w = torch.randn(160, generator=g, dtype=torch.float64)
    grads = []
    for method in ("dense", "lanczos"):
        Fu = Fu0.clone().requires_grad_(True)
        pairs = cs.eigenpairs(cs.Sheaf.from_arrays([2] * 80, index, Fu, Fv), 3, normalized=True, method=method)
        assert pairs.info.method == method
        (pairs.values.sum() + ((pairs.vectors * w[:, None]) ** 2).sum()).backward()
        grads.append(Fu.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)


def test_lanczos_route_reports_non_convergence(monkeypatch):
    S = build_random_sheaf(3, n_vertices=100, n_edges=250, maps="dense", connected=True)
    L = dense_laplacian(S)
    pairs = cs.eigenpairs(S, 4, method="lanczos")
    assert pairs.info.method == "lanczos" and pairs.info.extra["restarts"] > 0
    check_pairs(*pairs, L, np.linalg.eigvalsh(L)[:4])

    def stuck(*args, **kwargs):
        out = spectral.lanczos(*args, **kwargs)
        return out._replace(converged=False)

    monkeypatch.setitem(spectral._SOLVERS, "lanczos", stuck)
    with pytest.raises(RuntimeError, match="Lanczos: the 4 smallest eigenpairs .* did not converge"):
        cs.eigenpairs(S, 4, method="lanczos")
