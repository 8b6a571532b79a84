"""Harmonic extension against dense least squares, closed forms and its defining properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import cellsheaf as cs
import cellsheaf.harmonic as harmonic
from tests.conftest import anchored_and_floating

F64 = torch.float64


def random_sheaf(seed: int, n: int = 6, d: int = 2, extra: int = 3, de: int = 2) -> cs.Sheaf:
    """A connected random sheaf: a cycle on ``n`` vertices plus ``extra`` random chords."""
    g = torch.Generator().manual_seed(seed)
    S = cs.Sheaf()
    for v in range(n):
        S.add_vertex(v, d)
    pairs = [(v, (v + 1) % n) for v in range(n)]
    pairs += [tuple(torch.randperm(n, generator=g)[:2].tolist()) for _ in range(extra)]
    for u, v in pairs:
        S.add_edge(u, v, torch.randn(de, d, generator=g, dtype=F64), torch.randn(de, d, generator=g, dtype=F64))
    return S


def dense_lstsq(S, rb):
    """Minimise ‖δ_Ω ω + δ_U u‖ by numpy least squares, per batch item."""
    D = S.coboundary(format="dense").numpy()
    free, fixed = rb.free.numpy(), rb.fixed.numpy()
    U = rb.values.numpy().reshape(-1, len(fixed))
    W = np.linalg.lstsq(D[:, free], -(D[:, fixed] @ U.T), rcond=None)[0]
    X = np.zeros((U.shape[0], S.C0))
    X[:, free], X[:, fixed] = W.T, U
    return X


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_matches_dense_least_squares(method):
    S = random_sheaf(0)
    b = cs.Boundary().fix(0, torch.randn(5, 2, dtype=F64)).fix(3, torch.tensor([0.7], dtype=F64), coords=[1])
    x = cs.harmonic_extension(S, b, method=method)
    assert x.flat.shape == (5, S.C0)
    np.testing.assert_allclose(x.flat.numpy(), dense_lstsq(S, b.resolve(S)), atol=1e-11)
    assert x.info.converged and x.info.residual < 1e-10


def test_sparse_lu_route_agrees(monkeypatch):
    S = random_sheaf(1, n=8)
    b = cs.Boundary().fix(2, torch.randn(3, 2, dtype=F64))
    dense = cs.harmonic_extension(S, b).flat
    monkeypatch.setattr(harmonic, "_DENSE_MAX", 0)
    torch.testing.assert_close(cs.harmonic_extension(S, b, method="direct").flat, dense, rtol=0, atol=1e-12)


def test_path_interpolates_linearly():
    S = cs.Sheaf()
    for v in range(5):
        S.add_vertex(v, 3)
    I = torch.eye(3, dtype=F64)
    for v in range(4):
        S.add_edge(v, v + 1, I, I)
    a, z = torch.tensor([0.0, 1.0, -2.0], dtype=F64), torch.tensor([4.0, 1.0, 2.0], dtype=F64)
    x = cs.harmonic_extension(S, cs.Boundary().fix(0, a).fix(4, z))
    for k in range(5):
        torch.testing.assert_close(x[k], a + (z - a) * k / 4)


def test_all_boundary_returns_the_boundary():
    S = random_sheaf(2, n=3)
    vals = {v: torch.randn(2, dtype=F64) for v in S.vertices}
    b = cs.Boundary()
    for v, t in vals.items():
        b.fix(v, t)
    x = cs.harmonic_extension(S, b)
    for v, t in vals.items():
        torch.testing.assert_close(x[v], t)


def test_nonunique_raises_and_reports_nullspace():
    S = cs.Sheaf()
    for v in "abc":
        S.add_vertex(v, 2)
    S.add_edge("a", "b", torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))
    S.add_edge("b", "c", torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64))
    b = cs.Boundary().fix("a", torch.tensor([1.0, 2.0], dtype=F64))
    with pytest.raises(cs.NonUniqueError, match="'c'"):
        cs.harmonic_extension(S, b)
    x = cs.harmonic_extension(S, b, allow_nonunique=True)
    N = x.info.extra["nullspace"]
    assert N.shape == (S.C0, 1)
    torch.testing.assert_close(S.coboundary(format="dense") @ N, torch.zeros(S.C1, 1, dtype=F64))
    assert N[:2].abs().max() == 0
    torch.testing.assert_close(x["b"], torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(x["c"], torch.tensor([1.0, 0.0], dtype=F64))  # minimum norm


def test_isolated_free_vertex_is_not_unique_for_every_method():
    S = random_sheaf(3, n=4)
    S.add_vertex("lonely", 1)
    b = cs.Boundary().fix(0, torch.ones(2, dtype=F64))
    for method in ("direct", "cg"):
        with pytest.raises(cs.NonUniqueError, match="lonely"):
            cs.harmonic_extension(S, b, method=method)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1.0))
def test_minimises_discord_against_perturbations(seed, scale):
    S = random_sheaf(seed, n=5, extra=2)
    b = cs.Boundary().fix(0, torch.randn(2, dtype=F64)).fix(2, torch.randn(1, dtype=F64), coords=[0])
    x = cs.harmonic_extension(S, b).flat
    free = b.resolve(S).free
    g = torch.Generator().manual_seed(seed)
    y = x.clone()
    y[free] += scale * torch.randn(len(free), generator=g, dtype=F64)
    assert cs.energy(S, y) > cs.energy(S, x)


def test_float32():
    S = cs.Sheaf()
    S.add_vertex("a", 2)
    S.add_vertex("b", 2)
    S.add_edge("a", "b", torch.eye(2), 2 * torch.eye(2))
    x = cs.harmonic_extension(S, cs.Boundary().fix("a", torch.tensor([2.0, 4.0])))
    assert x.flat.dtype == torch.float32
    torch.testing.assert_close(x["b"], torch.tensor([1.0, 2.0]))


def test_gradcheck_boundary_and_maps():
    M0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(4))

    def solve(u, M):
        S = cs.Sheaf()
        for v in range(3):
            S.add_vertex(v, 2)
        S.add_edge(0, 1, M, torch.eye(3, 2, dtype=F64))
        S.add_edge(1, 2, 2 * torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))
        S.add_edge(0, 2, torch.ones(1, 2, dtype=F64), torch.tensor([[1.0, -1.0]], dtype=F64))
        return cs.harmonic_extension(S, cs.Boundary().fix(0, u)).flat

    u = torch.randn(4, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (u, M0.clone().requires_grad_(True)))


def test_bad_input():
    S = random_sheaf(5, n=3)
    with pytest.raises(ValueError, match="method"):
        cs.harmonic_extension(S, cs.Boundary().fix(0, torch.ones(2)), method="magic")
    with pytest.raises(KeyError, match="'nowhere'"):
        cs.harmonic_extension(S, cs.Boundary().fix("nowhere", torch.ones(2)))
    with pytest.raises(ValueError, match="NaN"):
        cs.Boundary().fix(0, torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="stalk has dim 2"):
        cs.harmonic_extension(S, cs.Boundary().fix(0, torch.ones(3)))
    T = cs.Sheaf()
    T.add_vertex("a", 1)
    T.add_vertex("b", 1)
    T.add_edge("a", "b", cs.maps.ReLU(1), torch.eye(1))
    with pytest.raises(ValueError, match="minimize"):
        cs.harmonic_extension(T, cs.Boundary().fix("a", torch.ones(1)))


# ---------------------------------------------------------------------------- uniqueness on every route


def anchored_plus_floating(n_float: int, dtype=F64) -> tuple[cs.Sheaf, cs.Boundary]:
    """A path anchored at vertex 0, and a separate cycle of ``n_float`` vertices (constant R¹) that touches no data."""
    S = cs.Sheaf()
    for v in range(3):
        S.add_vertex(v, 2)
    S.add_edge(0, 1, torch.eye(2, dtype=dtype), 2 * torch.eye(2, dtype=dtype))
    S.add_edge(1, 2, torch.ones(2, 2, dtype=dtype) + torch.eye(2, dtype=dtype), torch.eye(2, dtype=dtype))
    one = torch.ones(1, 1, dtype=dtype)
    for k in range(n_float):
        S.add_vertex(f"f{k}", 1)
    for k in range(n_float):
        S.add_edge(f"f{k}", f"f{(k + 1) % n_float}", one, one)
    return S, cs.Boundary().fix(0, torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=dtype))


ROUTES = {"dense": ("direct", {}), "lu": ("direct", {"_DENSE_MAX": 0}), "cg": ("cg", {})}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n_float", [10, 3000])
def test_nonunique_is_detected_on_every_route_and_size(route, n_float, monkeypatch):
    method, patches = ROUTES[route]
    for name, value in patches.items():
        monkeypatch.setattr(harmonic, name, value)
    S, b = anchored_plus_floating(n_float)
    with pytest.raises(cs.NonUniqueError, match="'f0'"):
        cs.harmonic_extension(S, b, method=method)
    x = cs.harmonic_extension(S, b, method=method, allow_nonunique=True)
    N = x.info.extra["nullspace"]
    assert x.info.extra["nullity"] == 1 and N.shape == (S.C0, 1)
    D = S.coboundary(format="scipy")
    np.testing.assert_allclose(D @ N.numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(abs(N[6:].numpy()), 1 / np.sqrt(n_float), rtol=1e-8)  # the floating cycle
    # minimum norm: zero on the floating part, and the anchored part as by dense least squares
    assert x.flat[:, 6:].abs().max() < 1e-10
    small, bs = anchored_plus_floating(1)
    ref = dense_lstsq(small, bs.resolve(small))
    np.testing.assert_allclose(x.flat[:, :6].numpy(), ref[:, :6], atol=1e-9)
    assert x.info.converged


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_a_hundred_thousand_free_coordinates_are_certified_cheaply(method):
    S, b = anchored_plus_floating(0)
    S.add_vertex("wide", 100_000)  # no edge sees it: a local kernel, found vertex by vertex
    with pytest.raises(cs.NonUniqueError, match="'wide'"):
        cs.harmonic_extension(S, b, method=method)
    x = cs.harmonic_extension(S, b, method=method, allow_nonunique=True)
    N = x.info.extra["nullspace"]
    assert N.is_sparse and N.shape == (S.C0, 100_000) and x.info.extra["nullity"] == 100_000
    assert x["wide"].abs().max() == 0


def test_a_large_free_component_without_boundary_on_the_cg_route():
    # 2400 free coordinates in one floating component with a planted section, beside an anchored part that the
    # boundary determines by propagation (benchmarks/bench_core.py --rows nonunique: 10⁵ free coordinates)
    S, b = anchored_and_floating(300, 800)
    with pytest.raises(cs.NonUniqueError, match=r"dimension 1 .* vertices \[300, 301"):
        cs.harmonic_extension(S, b, method="cg")
    x = cs.harmonic_extension(S, b, method="cg", allow_nonunique=True)
    N = x.info.extra["nullspace"].numpy()
    D = S.coboundary(format="scipy")
    assert x.info.converged and x.info.extra["nullity"] == 1 and N.shape == (S.C0, 1)
    assert np.abs(D @ N).max() < 1e-8 and np.abs(N[:900]).max() == 0  # a section of the floating part
    assert abs(float(x.flat @ torch.as_tensor(N[:, 0]))) < 1e-10  # the minimum-norm solution
    rb = b.resolve(S)  # stationary on the free coordinates, the data on the fixed ones
    L = S.laplacian(format="scipy")
    assert np.abs(L @ x.flat.numpy())[rb.free.numpy()].max() < 1e-8 * np.abs(L).max()
    assert torch.equal(x.flat[rb.fixed], rb.values)


def test_no_boundary_gives_the_zero_section():
    S = random_sheaf(6, n=4)
    S.add_vertex("free", 2)
    x = cs.harmonic_extension(S)
    assert x.flat.shape == (S.C0,) and x.flat.abs().max() == 0 and x.info.converged
    x = cs.harmonic_extension(S, allow_nonunique=True)
    H0 = S.cohomology().H0
    N = x.info.extra["nullspace"]
    assert N.shape == H0.shape
    torch.testing.assert_close(N @ N.T, H0 @ H0.T)


def test_cg_two_components_one_without_boundary():
    S, b = anchored_plus_floating(4)
    with pytest.raises(cs.NonUniqueError):
        cs.harmonic_extension(S, b, method="cg")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_near_singular_cg_is_honest(dtype):
    # an edge scaled by 1e-6 and a self-loop whose maps differ by 1e-6: L[Ω,Ω] ~ 2e-12
    S = cs.Sheaf()
    S.add_vertex("a", 1)
    S.add_vertex("c", 1)
    S.add_edge("a", "c", 1e-6 * torch.ones(1, 1, dtype=dtype), 1e-6 * torch.ones(1, 1, dtype=dtype))
    S.add_edge("c", "c", torch.ones(1, 1, dtype=dtype), (1 + 1e-6) * torch.ones(1, 1, dtype=dtype), weight=1 + 1e-6)
    b = cs.Boundary().fix("a", torch.tensor([1.0], dtype=dtype))
    direct, cg = (cs.harmonic_extension(S, b, method=m) for m in ("direct", "cg"))
    a = float(S.edge(S.edges[1]).Fv.matrix() - S.edge(S.edges[1]).Fu.matrix())  # the loop's map, as stored
    exact = 1e-12 / (1e-12 + (1 + 1e-6) * a * a) if dtype == torch.float64 else None
    for x in (direct, cg):
        if exact is not None:
            assert float(x["c"]) == pytest.approx(exact, rel=1e-6)
        assert x.info.residual < 1e-6  # measured in float64 on the assembled system, not by cancellation
        assert not x.info.converged or abs(float(x["c"]) - float(direct["c"])) < 1e-5


def _path(scale: float = 1.0) -> cs.Sheaf:
    S = cs.Sheaf()
    for v in "abc":
        S.add_vertex(v, 1)
    S.add_edge("a", "b", torch.tensor([[scale]], dtype=F64), torch.eye(1, dtype=F64), name="big")
    S.add_edge("b", "c", torch.eye(1, dtype=F64), torch.eye(1, dtype=F64), name="ok")
    return S


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_huge_maps_are_solved_or_refused_naming_the_edge(method):
    """A map entry of 1e200: never converged=True with residual NaN. Its square overflows L[a, a]: with "a" free
    the solve is refused naming the edge; with "a" fixed only 1e200 itself enters and the answer is exact."""
    one = torch.tensor([1.0], dtype=F64)
    with pytest.raises(FloatingPointError, match="edge 'big' has a map entry of size 1e\\+200"):
        cs.harmonic_extension(_path(1e200), cs.Boundary().fix("c", one), method=method)
    x = cs.harmonic_extension(_path(1e200), cs.Boundary().fix("a", one).fix("c", one), method=method)
    if method == "cg" and not x.info.converged:  # CG's own norms overflow: reported, naming the edge
        assert "edge 'big'" in x.info.message
        return
    assert x.info.converged and np.isfinite(x.info.residual) and x.info.residual < 1e-12
    assert x["b"].item() == pytest.approx(0.5e200, rel=1e-14)


def test_complex_and_integer_boundary_values():
    S = _path()
    with pytest.raises(TypeError, match="boundary value at vertex 'a' must be real"):
        cs.harmonic_extension(S, cs.Boundary().fix("a", torch.tensor([1 + 2j])))
    x = cs.harmonic_extension(S, cs.Boundary().fix("a", torch.tensor([1])).fix("c", torch.tensor([3])))
    assert x.flat.dtype == F64 and abs(x["b"].item() - 2.0) < 1e-14  # integers take the sheaf's dtype


def test_empty_batch_gives_an_empty_result():
    S = _path()
    b = cs.Boundary().fix("a", torch.zeros(0, 1, dtype=F64)).fix("c", torch.tensor([1.0], dtype=F64))
    for method in ("direct", "cg"):
        x = cs.harmonic_extension(S, b, method=method)
        assert x.flat.shape == (0, 3) and x.info.converged
    res = cs.minimize(S, b, method="newton")
    assert res.x.flat.shape == (0, 3) and res.converged
    res = cs.diffuse(S, torch.zeros(0, 3, dtype=F64), boundary=b)
    assert res.x.flat.shape == (0, 3) and res.converged


@pytest.mark.parametrize("kw, match", [({"tol": float("inf")}, "tol must be"), ({"tol": -1.0}, "tol must be"),
                                       ({"tol": "x"}, "tol must be"), ({"maxiter": 0}, "maxiter must be"),
                                       ({"maxiter": 2.5}, "maxiter must be")])
def test_solver_arguments_are_checked(kw, match):
    """``tol=inf`` certified CG after 0 iterations; now every bad number names its argument."""
    b = cs.Boundary().fix("a", torch.tensor([1.0], dtype=F64))
    with pytest.raises(ValueError, match=match):
        cs.harmonic_extension(_path(), b, method="cg", **kw)


def test_a_direct_solve_in_subnormal_arithmetic_is_not_certified():
    """Maps of 1e-160 put the Laplacian's entries near 1e-320 (subnormal): the direct solve's residual is 1e-3,
    so it is reported not converged (it said converged, 3e-3 off)."""
    S = cs.Sheaf()
    for v in "abc":
        S.add_vertex(v, 1)
    S.add_edge("a", "b", torch.tensor([[1.3e-160]], dtype=F64), torch.tensor([[0.7e-160]], dtype=F64))
    S.add_edge("b", "c", torch.tensor([[0.9e-160]], dtype=F64), torch.tensor([[1.1e-160]], dtype=F64))
    x = cs.harmonic_extension(S, cs.Boundary().fix("a", torch.tensor([1.0], dtype=F64)))
    exact = 1.3 / 0.7
    assert x.info.converged == (abs(x["b"].item() - exact) < 1e-10 and x.info.residual < 1e-10)
