"""Operators against dense numpy references built edge by edge (tests/conftest.py)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf import operators as ops
from tests.conftest import build_random_sheaf, dense_coboundary, dense_laplacian, random_point, random_sheaf

F64 = torch.float64
KINDS = ["dense", "integer", "mixed"]


def dense_normalized(L: np.ndarray, S: cs.Sheaf) -> np.ndarray:
    R = np.zeros_like(L)
    for v in S.vertices:
        sl = S.vertex_slice(v)
        w, Q = np.linalg.eigh(L[sl, sl])
        inv = np.where(w > 1e-12, 1 / np.sqrt(np.where(w > 1e-12, w, 1.0)), 0.0)
        R[sl, sl] = (Q * inv) @ Q.T
    return R @ L @ R


@pytest.mark.parametrize("maps", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_assembled_match_dense(seed, maps):
    S = build_random_sheaf(seed, n_vertices=6, n_edges=9, maps=maps, weights=True)
    D, L = dense_coboundary(S), dense_laplacian(S)
    np.testing.assert_allclose(S.coboundary(format="dense").numpy(), D, atol=1e-12)
    np.testing.assert_allclose(S.coboundary().to_dense().numpy(), D, atol=1e-12)
    np.testing.assert_allclose(S.coboundary(format="scipy").toarray(), D, atol=1e-12)
    assert sp.issparse(S.laplacian(format="scipy")) and S.laplacian().is_sparse
    np.testing.assert_allclose(S.laplacian(format="dense").numpy(), L, atol=1e-10)
    np.testing.assert_allclose(S.laplacian().to_dense().numpy(), L, atol=1e-10)
    np.testing.assert_allclose(S.laplacian(normalized=True, format="dense").numpy(), dense_normalized(L, S),
                               atol=1e-9)
    assert S.laplacian(dtype=torch.float32).dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(random_sheaf(maps="mixed", weights=True))
def test_laplacian_is_symmetric_psd_and_hodge(S):
    L = S.laplacian(format="dense", dtype=F64).numpy()  # maps without tensors give a float32 sheaf
    np.testing.assert_allclose(L, L.T, atol=1e-12)
    assert np.linalg.eigvalsh(L).min(initial=0) > -1e-9
    x = random_point(S, 1)
    # xᵀLx = ‖W^{1/2} δ x‖² ≥ 0, and L x = 0 exactly on ker δ
    r = dense_coboundary(S) @ x.numpy()
    w = ops.edge_weights(S, F64).numpy()
    assert float(x @ ops.apply_laplacian(S, x)) == pytest.approx(float((w * r * r).sum()), rel=1e-9, abs=1e-12)
    H = S.global_sections()
    np.testing.assert_allclose(L @ H.double().numpy(), 0, atol=1e-9 if H.dtype == F64 else 1e-6)


@settings(max_examples=25, deadline=None)
@given(random_sheaf(maps="mixed", weights=True))
def test_matrix_free_matches_assembled(S):
    D, L = dense_coboundary(S), dense_laplacian(S)
    for batch in (None, 3):
        x = random_point(S, 2, batch)
        y = torch.as_tensor(np.random.default_rng(3).standard_normal((*x.shape[:-1], S.C1)))
        np.testing.assert_allclose(ops.apply_coboundary(S, x).numpy(), x.numpy() @ D.T, atol=1e-10)
        np.testing.assert_allclose(ops.apply_coboundary_adjoint(S, y).numpy(), y.numpy() @ D, atol=1e-10)
        np.testing.assert_allclose(ops.apply_laplacian(S, x).numpy(), x.numpy() @ L, atol=1e-9)
        av, au = ops.expressed(S, x)
        torch.testing.assert_close(av - au, ops.apply_coboundary(S, x))


@pytest.mark.parametrize("maps", ["dense", "mixed", "nonlinear"])
def test_float32_actions(maps):
    S = build_random_sheaf(11, n_vertices=7, n_edges=12, maps=maps, weights=True)
    x64 = random_point(S, 4, batch=5)
    at = x64[0] if maps == "nonlinear" else None
    L = dense_laplacian(S, at)
    x = x64.float()
    out = ops.apply_laplacian(S, x, at=at)
    assert out.dtype == torch.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.double().numpy(), x64.numpy() @ L, rtol=1e-4, atol=1e-4)
    y = ops.apply_coboundary_adjoint(S, torch.ones(S.C1), at=at)
    assert y.dtype == torch.float32


def test_fused_laplacian_in_chunks(monkeypatch):
    S = build_random_sheaf(8, n_vertices=20, n_edges=50, maps="dense", weights=True)
    monkeypatch.setattr(ops, "_CHUNK", 16)  # many chunks per group
    for batch in (None, 1, 4):
        x = random_point(S, 5, batch)
        np.testing.assert_allclose(ops.apply_laplacian(S, x).numpy(), x.numpy() @ dense_laplacian(S), atol=1e-10)


@pytest.mark.parametrize("maps", ["dense", "mixed"])
@pytest.mark.parametrize("normalized", [False, True])
def test_laplacian_through_the_transposition_workspace(monkeypatch, maps, normalized):
    """A batch transposed into the sheaf's kept workspace (every size here: `_WORKSPACE_MIN` = 0; slabs of a
    few columns) gives the dense result; results of two calls do not share memory with it or each other, and
    a batch that requires grad is not copied into it (autograd reaches ``x``)."""
    monkeypatch.setattr(ops, "_WORKSPACE_MIN", 0)
    monkeypatch.setattr(ops, "_TRANSPOSE_CHUNK", 24)
    S = build_random_sheaf(5, n_vertices=9, n_edges=20, maps=maps, weights=True)
    L = ops.laplacian(S, normalized=normalized, format="dense").numpy()
    x1, x2 = random_point(S, 1, 4), random_point(S, 2, 4)
    y1 = ops.apply_laplacian(S, x1, normalized=normalized)
    y2 = ops.apply_laplacian(S, x2, normalized=normalized)
    np.testing.assert_allclose(y1.numpy(), x1.numpy() @ L, atol=1e-10)
    np.testing.assert_allclose(y2.numpy(), x2.numpy() @ L, atol=1e-10)
    held = [v for k, v in S._cache.items() if isinstance(k, tuple) and k[0] == "columns"]
    assert held and all(not np.shares_memory(y.numpy(), h.numpy()) for y in (y1, y2) for h in held)
    x = x1.clone().requires_grad_()
    g, = torch.autograd.grad(ops.apply_laplacian(S, x, normalized=normalized).sum(), x)
    np.testing.assert_allclose(g.numpy(), np.ones_like(x1.numpy()) @ L.T, atol=1e-10)


def test_weighted_laplacian_is_the_weighted_product():
    """``L = δᵀ W δ`` assembled with ``W`` folded into the columns of ``δᵀ`` (random weights) equals the
    dense product, and a unit-weight sheaf's ``L`` is ``δᵀδ`` bit for bit."""
    S = build_random_sheaf(3, n_vertices=8, n_edges=16, maps="dense", weights=True)
    D = dense_coboundary(S)
    W = np.diag(ops.edge_weights(S, torch.float64).numpy())
    np.testing.assert_allclose(S.laplacian(format="scipy").toarray(), D.T @ W @ D, atol=1e-12)
    T = build_random_sheaf(3, n_vertices=8, n_edges=16, maps="dense", weights=False)
    delta = T.coboundary(format="scipy")
    assert (T.laplacian(format="scipy") != (delta.T @ delta).tocsr()).nnz == 0


def test_grouped_and_single_edges_agree():
    # large maps (d_e·(d_u+d_v) > 1024) are applied edge by edge, small ones in groups
    rng = np.random.default_rng(0)
    S = cs.Sheaf()
    for v, d in (("a", 40), ("b", 40), ("c", 3), ("d", 3)):
        S.add_vertex(v, d)
    S.add_edge("a", "b", torch.as_tensor(rng.standard_normal((20, 40))), torch.as_tensor(rng.standard_normal((20, 40))))
    S.add_edge("c", "d", torch.as_tensor(rng.standard_normal((3, 3))), torch.as_tensor(rng.standard_normal((3, 3))))
    S.add_edge("a", "c", M.Select([0, 1, 2], 40), M.Identity(3), weight=2.0)
    plan = ops._plan(S)
    assert plan.singles and plan.groups
    x = random_point(S, 1, batch=2)
    np.testing.assert_allclose(ops.apply_laplacian(S, x).numpy(), x.numpy() @ dense_laplacian(S), atol=1e-9)
    only_small = build_random_sheaf(1, maps="dense", weights=True)
    assert not ops._plan(only_small).singles  # the fused path
    x = random_point(only_small, 2)
    np.testing.assert_allclose(ops.apply_laplacian(only_small, x).numpy(), dense_laplacian(only_small) @ x.numpy(),
                               atol=1e-10)


def test_nonlinear_discrepancy_and_linearisation():
    S = build_random_sheaf(6, n_vertices=6, n_edges=8, maps="nonlinear")
    assert not S.linear
    x, v = random_point(S, 1), random_point(S, 2, batch=3)
    r = ops.apply_coboundary(S, x)
    for e in S.edge_items():
        ref = e.Fv.apply(x[S.vertex_slice(e.v)]) - e.Fu.apply(x[S.vertex_slice(e.u)])
        torch.testing.assert_close(r[S.edge_slice(e.name)], ref)
    J = dense_coboundary(S, x)
    np.testing.assert_allclose(ops.apply_coboundary_jvp(S, x, v).numpy(), v.numpy() @ J.T, atol=1e-10)
    y = torch.as_tensor(np.random.default_rng(0).standard_normal((3, S.C1)))
    np.testing.assert_allclose(ops.apply_coboundary_adjoint(S, y, at=x).numpy(), y.numpy() @ J, atol=1e-10)
    np.testing.assert_allclose(ops.apply_laplacian(S, v, at=x).numpy(), v.numpy() @ dense_laplacian(S, x), atol=1e-9)
    np.testing.assert_allclose(S.laplacian(at=x, format="dense").numpy(), dense_laplacian(S, x), atol=1e-10)
    np.testing.assert_allclose(S.linearize(x).laplacian(format="dense").numpy(), dense_laplacian(S, x), atol=1e-10)
    # the Jacobian of the discrepancy is the linearised coboundary (autograd check)
    Jt = torch.autograd.functional.jacobian(lambda z: ops.apply_coboundary(S, z), x)
    np.testing.assert_allclose(Jt.numpy(), J, atol=1e-10)
    with pytest.raises(ValueError, match="nonlinear map: pass at="):
        S.coboundary()
    with pytest.raises(ValueError, match="pass at="):
        ops.apply_coboundary_adjoint(S, y)


def test_restricted_blocks():
    S = build_random_sheaf(3, n_vertices=6, n_edges=9, maps="mixed", weights=True)
    L = dense_laplacian(S)
    b = cs.Boundary().fix("v0", torch.zeros(S.dim("v0"))).fix("v2", [1.0], coords=[0])
    rb = b.resolve(S)
    free, fixed = rb.free.numpy(), rb.fixed.numpy()
    for bd in (b, rb, fixed.tolist(), torch.as_tensor(fixed)):
        LOO, LOU = ops.restricted_laplacian(S, bd, format="dense")
        np.testing.assert_allclose(LOO.numpy(), L[np.ix_(free, free)], atol=1e-10)
        np.testing.assert_allclose(LOU.numpy(), L[np.ix_(free, fixed)], atol=1e-10)
    LOO, LOU = ops.restricted_laplacian(S, b, format="scipy")
    assert LOO.shape == (free.size, free.size) and LOU.shape == (free.size, fixed.size)
    with pytest.raises(IndexError, match=r"\[0, "):
        ops.restricted_laplacian(S, [S.C0])


def test_gradients_through_matrix_free_actions():
    S = cs.Sheaf()
    for v in range(4):
        S.add_vertex(v, 2)
    W = [torch.randn(2, 2, dtype=F64, requires_grad=True) for _ in range(3)]
    for k, (a, b) in enumerate([(0, 1), (1, 2), (2, 3)]):
        S.add_edge(a, b, M.Linear(W[k], trainable=True), torch.eye(2, dtype=F64), weight=1.0 + k)
    x = torch.randn(3, S.C0, dtype=F64)

    def energy(*Ws):
        for k, Wk in enumerate(Ws):
            S.set_maps(S.edges[k], Fu=M.Linear(Wk, trainable=True))
        return (x * ops.apply_laplacian(S, x)).sum()

    assert torch.autograd.gradcheck(energy, tuple(W))
    xg = x.clone().requires_grad_(True)
    (0.5 * (xg * ops.apply_laplacian(S, xg)).sum()).backward()
    torch.testing.assert_close(xg.grad, ops.apply_laplacian(S, x))


def test_cache_follows_mutations():
    S = build_random_sheaf(2, maps="dense")
    L0 = S.laplacian(format="dense").clone()
    x = random_point(S, 0)
    Lx0 = ops.apply_laplacian(S, x)
    e = S.edges[0]
    S.set_maps(e, Fu=2 * S.edge(e).Fu.matrix())
    assert not torch.allclose(S.laplacian(format="dense"), L0)
    torch.testing.assert_close(ops.apply_laplacian(S, x), torch.as_tensor(dense_laplacian(S) @ x.numpy()))
    assert not torch.allclose(ops.apply_laplacian(S, x), Lx0)


def test_helpers_and_errors():
    S = build_random_sheaf(0, n_vertices=3, n_edges=2, weights=True)
    w = ops.edge_weights(S)
    assert w.shape == (S.C1,)
    for e in S.edge_items():
        assert torch.all(w[S.edge_slice(e.name)] == e.weight)
    idx = ops.vertex_coordinates(S, ["v2", "v0"])
    assert idx.tolist() == list(range(*S.vertex_slice("v2").indices(S.C0))) + \
        list(range(*S.vertex_slice("v0").indices(S.C0)))
    assert ops.vertex_coordinates(S, []).numel() == 0
    T = ops.to_torch_sparse(sp.csr_matrix(np.array([[0.0, 2.0], [3.0, 0.0]])))
    assert T.is_sparse and T.to_dense().tolist() == [[0.0, 2.0], [3.0, 0.0]]
    with pytest.raises(ValueError, match="format"):
        S.laplacian(format="csr")
    with pytest.raises(ValueError, match=r"shape \(\d+,\) or \(B, \d+\)"):
        ops.apply_laplacian(S, torch.zeros(S.C0 + 1))
    E = cs.Sheaf()
    E.add_vertex("a", 2)
    assert ops.apply_laplacian(E, torch.ones(2)).tolist() == [0.0, 0.0]
    assert E.laplacian(format="dense").shape == (2, 2) and E.coboundary(format="dense").shape == (0, 2)


# ---------------------------------------------------------------------------- plans shared by equal structures


def _stacked(seed: int, dims, index, diagonal: bool = False, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    E, d = index.shape[1], dims[0]
    shape = (E, d) if diagonal else (E, 2, d)
    Fu = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(grad)
    Fv = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.rand(E, generator=g, dtype=torch.float64) + 0.5
    return cs.Sheaf.from_arrays(dims, index, Fu, Fv, weights=w), Fu


@pytest.mark.parametrize("diagonal", [False, True])
def test_from_arrays_on_an_unchanged_structure_reuses_the_plan(monkeypatch, diagonal):
    from cellsheaf import operators

    index = torch.tensor([[0, 1, 2, 3, 4, 0, 2, 5], [1, 2, 3, 4, 5, 3, 2, 0]])  # a self-loop and a chord
    first, _ = _stacked(0, [3] * 6, index, diagonal)
    x = torch.randn(2, first.C0, dtype=torch.float64)
    cs.operators.apply_laplacian(first, x, normalized=True)
    built = []
    monkeypatch.setattr(operators._Plan, "__init__", lambda self, S, f=operators._Plan.__init__: (built.append(1),
                                                                                                 f(self, S))[1])
    S, Fu = _stacked(1, [3] * 6, index.clone(), diagonal, grad=True)  # same structure, new tensors
    plan = operators._plan(S)
    assert not built and plan.groups[0].index(torch.device("cpu")) is \
        operators._plan(first).groups[0].index(torch.device("cpu"))  # the index tensors themselves are shared
    assert plan.groups[0].source is S.stacks[0] and operators._plan(first).groups[0].source is first.stacks[0]
    monkeypatch.undo()
    operators._TEMPLATES.clear()
    fresh, Gu = _stacked(1, [3] * 6, index.clone(), diagonal, grad=True)  # built from scratch
    assert operators._plan(fresh) is not plan
    y = torch.randn(2, S.C0, dtype=torch.float64)
    for normalized in (False, True, "augmented"):
        a = cs.operators.apply_laplacian(S, y, normalized=normalized)
        b = cs.operators.apply_laplacian(fresh, y, normalized=normalized)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
        ga, = torch.autograd.grad(a.square().sum(), Fu)
        gb, = torch.autograd.grad(b.square().sum(), Gu)
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    for f in (lambda T: cs.operators.coboundary(T, format="dense"), lambda T: cs.operators.degree_blocks(T),
              lambda T: cs.operators.laplacian(T, normalized=True, format="dense")):
        torch.testing.assert_close(f(S), f(fresh), rtol=0, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(cs.operators.apply_laplacian(S, y, normalized=True),
                                   cs.operators.apply_laplacian(fresh, y, normalized=True), rtol=0, atol=1e-13)


def test_plans_are_shared_only_by_equal_structures_and_templates_hold_no_values():
    import gc
    import weakref

    from cellsheaf import operators

    index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    S, Fu = _stacked(0, [2] * 4, index)
    plan = operators._plan(S)
    other = [_stacked(1, [2] * 4, torch.tensor([[0, 1, 2, 3], [1, 2, 3, 1]]))[0],  # other endpoints
             _stacked(1, [2, 2, 2, 2, 2], index)[0]]                                # one more vertex
    T = cs.Sheaf.from_arrays([2, 2, 2, 2], index, torch.randn(4, 2, 2), torch.randn(4, 2, 2))  # other dims
    T.add_vertex(9, 1)
    for R in other + [T]:
        assert operators._plan(R).groups[0].index(torch.device("cpu")) is not plan.groups[0].index(torch.device("cpu"))
        x = torch.randn(R.C0, dtype=R.dtype)
        torch.testing.assert_close(cs.operators.apply_laplacian(R, x), cs.operators.laplacian(R, format="dense") @ x)
    S.update_maps(2 * Fu)  # update_maps keeps the plan
    assert operators._plan(S) is plan
    ref = weakref.ref(S.stacks[0].Fu)
    del S, plan, Fu
    gc.collect()
    assert ref() is None  # the shared template does not keep the maps (or their autograd graph) alive
