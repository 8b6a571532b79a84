"""Stacked storage (`Sheaf.from_arrays`, `add_edges`, `update_maps`) against the per-edge build and dense references."""

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf import operators as ops
from tests.conftest import dense_coboundary, dense_laplacian

F64 = torch.float64


def random_arrays(seed: int, n: int, m: int, d: int = 3, de: int = 2, diagonal: bool = False, weights: bool = True,
                  loops: bool = True):
    """Endpoints (with parallel edges and, if asked, self-loops), maps and weights of ``m`` random edges."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (2, m), generator=g)
    if not loops:
        index[1] = (index[0] + torch.randint(1, n, (m,), generator=g)) % n
    shape = (m, d) if diagonal else (m, de, d)
    Fu, Fv = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    w = torch.rand(m, generator=g, dtype=F64) + 0.5 if weights else None
    return index, Fu, Fv, w


def per_edge(dims, index, Fu, Fv, w=None) -> cs.Sheaf:
    """The same sheaf built one `add_edge` at a time."""
    S = cs.Sheaf()
    for k, d in enumerate(dims):
        S.add_vertex(k, d)
    for k in range(index.shape[1]):
        fu, fv = (M.Diagonal(Fu[k]), M.Diagonal(Fv[k])) if Fu.dim() == 2 else (Fu[k], Fv[k])
        S.add_edge(int(index[0, k]), int(index[1, k]), fu, fv, name=k, weight=1.0 if w is None else float(w[k]))
    return S


# ---------------------------------------------------------------------------- equal to the per-edge build


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), m=st.integers(0, 30), d=st.integers(1, 3),
       de=st.integers(1, 4), diagonal=st.booleans(), weights=st.booleans())
def test_from_arrays_equals_the_per_edge_build(seed, n, m, d, de, diagonal, weights):
    index, Fu, Fv, w = random_arrays(seed, n, m, d, de, diagonal, weights)
    A = cs.Sheaf.from_arrays([d] * n, index, Fu, Fv, weights=w)
    B = per_edge([d] * n, index, Fu, Fv, w)
    assert A.edges == B.edges and (A.C0, A.C1) == (B.C0, B.C1)
    for fmt in ("dense", "scipy"):
        a, b = A.coboundary(format=fmt), B.coboundary(format=fmt)
        assert (a != b).nnz == 0 if fmt == "scipy" else torch.equal(a, b)
        a, b = A.laplacian(format=fmt), B.laplacian(format=fmt)
        assert (a != b).nnz == 0 if fmt == "scipy" else torch.equal(a, b)
    x = torch.randn(3, A.C0, dtype=F64)
    assert torch.equal(ops.apply_coboundary(A, x), ops.apply_coboundary(B, x))
    torch.testing.assert_close(ops.apply_laplacian(A, x), ops.apply_laplacian(B, x), rtol=1e-13, atol=1e-12)
    ha, hb = A.cohomology(), B.cohomology()
    assert (ha.h0, ha.h1) == (hb.h0, hb.h1)
    bnd = cs.Boundary().fix(0, torch.ones(d, dtype=F64))
    if A.num_edges:
        xa = cs.harmonic_extension(A, bnd, allow_nonunique=True).flat
        xb = cs.harmonic_extension(B, bnd, allow_nonunique=True).flat
        assert torch.equal(xa, xb)
    assert A == B


def test_dense_references_with_heterogeneous_stalks():
    """Two stacks of different shapes (tails R^2, heads R^3) beside per-edge edges; every operator
    against the dense δ and L built edge by edge."""
    dims = [2, 2, 2, 3, 3, 1]
    S = cs.Sheaf.from_arrays(dims, [[0, 1, 2, 0], [3, 4, 3, 4]], torch.randn(4, 2, 2, dtype=F64),
                             torch.randn(4, 2, 3, dtype=F64), weights=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64))
    S.add_edge(5, 3, torch.randn(2, 1, dtype=F64), torch.randn(2, 3, dtype=F64), name="single")
    S.add_edges([[3, 4], [3, 4]], torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64), names=["l3", "l4"])
    S.add_edge(0, 5, M.Select([1], 2), torch.ones(1, 1, dtype=F64), name="select")
    D, L = dense_coboundary(S), dense_laplacian(S)
    np.testing.assert_allclose(S.coboundary(format="dense").numpy(), D, atol=1e-13)
    np.testing.assert_allclose(S.laplacian(format="dense").numpy(), L, atol=1e-12)
    x = torch.randn(2, S.C0, dtype=F64)
    np.testing.assert_allclose(ops.apply_coboundary(S, x).numpy(), x.numpy() @ D.T, atol=1e-12)
    np.testing.assert_allclose(ops.apply_laplacian(S, x).numpy(), x.numpy() @ L, atol=1e-12)
    y = torch.randn(S.C1, dtype=F64)
    np.testing.assert_allclose(ops.apply_coboundary_adjoint(S, y).numpy(), D.T @ y.numpy(), atol=1e-12)
    blocks = ops.degree_blocks(S)
    assert isinstance(blocks, list) and len(blocks) == len(S.vertices)
    for v, blk in zip(S.vertices, blocks):
        sl = S.vertex_slice(v)
        np.testing.assert_allclose(blk.numpy(), L[sl, sl], atol=1e-12)
    assert S.edge("l4").u == S.edge("l4").v == 4 and S.edge(2).v == 3


def normalized_reference(L: np.ndarray, S: cs.Sheaf, augmented: bool) -> np.ndarray:
    R = np.zeros_like(L)
    for v in S.vertices:
        sl = S.vertex_slice(v)
        lam, Q = np.linalg.eigh(L[sl, sl] + (np.eye(sl.stop - sl.start) if augmented else 0))
        inv = np.where(lam > 1e-12, 1 / np.sqrt(np.where(lam > 1e-12, lam, 1.0)), 0.0)
        R[sl, sl] = (Q * inv) @ Q.T
    return R @ L @ R


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("normalized", [True, "augmented"])
def test_normalized_laplacians_match_dense(normalized, diagonal):
    index, Fu, Fv, w = random_arrays(3, 7, 15, d=2, de=2, diagonal=diagonal)
    S = cs.Sheaf.from_arrays([2] * 7, index, Fu, Fv, weights=w)
    S.add_vertex("isolated", 2)  # a zero degree block: pseudo-inverse root 0
    ref = normalized_reference(dense_laplacian(S), S, normalized == "augmented")
    x = torch.randn(3, S.C0, dtype=F64)
    np.testing.assert_allclose(ops.apply_laplacian(S, x, normalized=normalized).numpy(), x.numpy() @ ref, atol=1e-12)
    for fmt in ("dense", "scipy"):
        L = S.laplacian(normalized=normalized, format=fmt)
        np.testing.assert_allclose(L.toarray() if fmt == "scipy" else L.numpy(), ref, atol=1e-12)
    e = ops.dirichlet_energy(S, x, normalized=normalized)
    np.testing.assert_allclose(e.numpy(), 0.5 * np.einsum("bi,ij,bj->b", x.numpy(), ref, x.numpy()), rtol=1e-10)


def test_update_maps_equals_rebuilding_and_keeps_the_plan():
    index, Fu, Fv, w = random_arrays(1, 9, 20)
    S = cs.Sheaf.from_arrays([3] * 9, index, Fu, Fv, weights=w)
    x = torch.randn(2, S.C0, dtype=F64)
    ops.apply_laplacian(S, x)
    plan = S._cache["plan"]
    _, Gu, Gv, v = random_arrays(2, 9, 20)
    S.update_maps(Gu, Gv, weights=v)
    T = cs.Sheaf.from_arrays([3] * 9, index, Gu, Gv, weights=v)
    assert torch.equal(ops.apply_laplacian(S, x), ops.apply_laplacian(T, x))
    assert S._cache["plan"] is plan
    assert torch.equal(S.laplacian(format="dense"), T.laplacian(format="dense"))
    assert torch.equal(ops.degree_blocks(S), ops.degree_blocks(T))
    S.update_maps(Fv=Fv)  # one side only
    assert torch.equal(S.stacks[0].Fu, Gu) and torch.equal(S.stacks[0].Fv, Fv)
    Gu.mul_(2)  # in-place changes of a held tensor are seen (tensor versions), no stale cached blocks
    T.update_maps(Gu, Fv, weights=v)
    assert torch.equal(ops.apply_laplacian(S, x), ops.apply_laplacian(T, x))
    with pytest.raises(ValueError, match="structure must stay the same"):
        S.update_maps(Gu[:3], Gv[:3])


def test_update_maps_with_several_stacks_takes_a_list():
    S = cs.Sheaf.from_arrays([2] * 4, [[0], [1]], torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    S.add_edges([[2, 3], [3, 0]], torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="2 stacks"):
        S.update_maps(torch.ones(1, 2, 2))
    S.update_maps([None, 2 * torch.ones(2, 2)])
    assert torch.equal(S.edge(2).Fu.matrix(), 2 * torch.eye(2))


# ---------------------------------------------------------------------------- gradients


def _grad_sheaf(hetero: bool, diagonal: bool = False):
    if hetero:  # tails R^2, heads R^3, edge stalks R^3: every degree block is full rank
        dims = [2, 2, 3, 3]
        index = torch.tensor([[0, 1, 0, 1, 0], [2, 3, 3, 2, 2]])
        shapes = ((5, 3, 2), (5, 3, 3))
    else:
        dims = [2] * 4
        index = torch.tensor([[0, 1, 2, 3, 0, 1], [1, 2, 3, 0, 2, 1]])  # with a self-loop
        shapes = ((6, 2), (6, 2)) if diagonal else ((6, 2, 2), (6, 2, 2))
    g = torch.Generator().manual_seed(0)
    Fu = torch.randn(shapes[0], generator=g, dtype=F64, requires_grad=True)
    Fv = torch.randn(shapes[1], generator=g, dtype=F64, requires_grad=True)
    w = (torch.rand(index.shape[1], generator=g, dtype=F64) + 0.5).requires_grad_()
    S = cs.Sheaf.from_arrays(dims, index, Fu.detach(), Fv.detach(), weights=w.detach())
    x = torch.randn(2, S.C0, generator=g, dtype=F64, requires_grad=True)
    return S, Fu, Fv, w, x


CASES = [(False, False), (False, True), (True, False)]


@pytest.mark.parametrize("hetero,diagonal", CASES)
@pytest.mark.parametrize("normalized", [False, True, "augmented"])
def test_gradcheck_laplacian_energy_and_degree(hetero, diagonal, normalized):
    S, Fu, Fv, w, x = _grad_sheaf(hetero, diagonal)

    def lap(Fu, Fv, w, x):
        S.update_maps(Fu, Fv, weights=w)
        return ops.apply_laplacian(S, x, normalized=normalized)

    def energy(Fu, Fv, w, x):
        S.update_maps(Fu, Fv, weights=w)
        return ops.dirichlet_energy(S, x, normalized=normalized)

    def assembled(Fu, Fv, w):
        S.update_maps(Fu, Fv, weights=w)
        return S.laplacian(format="dense", normalized=normalized)

    assert torch.autograd.gradcheck(lap, (Fu, Fv, w, x))
    assert torch.autograd.gradcheck(energy, (Fu, Fv, w, x))
    assert torch.autograd.gradcheck(assembled, (Fu, Fv, w))


@pytest.mark.parametrize("hetero,diagonal", CASES)
def test_gradcheck_coboundary_and_degree_blocks(hetero, diagonal):
    S, Fu, Fv, w, x = _grad_sheaf(hetero, diagonal)
    y = torch.randn(2, S.C1, dtype=F64, requires_grad=True)

    def delta(Fu, Fv, x):
        S.update_maps(Fu, Fv)
        return ops.apply_coboundary(S, x)

    def delta_t(Fu, Fv, y):
        S.update_maps(Fu, Fv)
        return ops.apply_coboundary_adjoint(S, y)

    def degree(Fu, Fv, w):
        S.update_maps(Fu, Fv, weights=w)
        D = ops.degree_blocks(S)
        return torch.cat([b.reshape(-1) for b in D]) if isinstance(D, list) else D

    def sparse(Fu, Fv):
        S.update_maps(Fu, Fv)
        return S.coboundary(format="torch").to_dense()

    assert torch.autograd.gradcheck(delta, (Fu, Fv, x))
    assert torch.autograd.gradcheck(delta_t, (Fu, Fv, y))
    assert torch.autograd.gradcheck(degree, (Fu, Fv, w))
    assert torch.autograd.gradcheck(sparse, (Fu, Fv))


def test_normalized_gradient_is_finite_with_repeated_degree_eigenvalues():
    """Orthogonal maps give degree blocks deg(v)·I (a connection Laplacian): the root's backward
    must not divide by the zero eigenvalue gaps."""
    F = torch.eye(2, dtype=F64).repeat(4, 1, 1).requires_grad_()
    S = cs.Sheaf.from_arrays([2] * 4, [[0, 1, 2, 3], [1, 2, 3, 0]], F.detach(), F.detach())
    x = torch.randn(S.C0, dtype=F64)

    def f(F):
        S.update_maps(F, F)
        return ops.dirichlet_energy(S, x, normalized=True)

    f(F).backward()
    assert torch.isfinite(F.grad).all()
    assert torch.autograd.gradcheck(f, (F,))


def test_sparse_laplacian_keeps_autograd_and_scipy_says_it_detaches():
    S, Fu, Fv, w, _ = _grad_sheaf(False)
    S.update_maps(Fu, Fv, weights=w)
    L = S.laplacian()
    assert L.layout == torch.sparse_coo and L.requires_grad
    L.to_dense().sum().backward()
    assert Fu.grad is not None and w.grad is not None
    with pytest.warns(UserWarning, match="detached"):
        S.laplacian(format="scipy")
    with torch.no_grad():
        assert not S.laplacian().requires_grad


# ---------------------------------------------------------------------------- safety (issue 12, defects 4 and 6)


def test_returned_matrices_are_copies():
    S = cs.Sheaf(); S.add_vertex(0, 1); S.add_vertex(1, 1)
    S.add_edge(0, 1, torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=F64))
    L = S.laplacian(format="scipy")
    L.data *= 2
    assert S.laplacian(format="scipy")[0, 0] == 1.0
    D = S.coboundary(format="scipy")
    D.data[:] = 7
    T = S.laplacian(format="torch")
    T.values().mul_(3)
    sol = cs.harmonic_extension(S, cs.Boundary().fix(0, torch.tensor([2.0], dtype=F64)))
    assert sol.flat.tolist() == [2.0, 2.0] and S.laplacian(format="dense")[0, 0] == 1.0


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_maps_are_refused_naming_the_edge(bad):
    S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    F = torch.eye(2)
    F[1, 0] = float(bad)
    with pytest.raises(ValueError, match="edge 'e': Fv has NaN or Inf"):
        S.add_edge("a", "b", torch.eye(2), F, name="e")
    Fs = torch.eye(2).repeat(3, 1, 1)
    Fs[2, 0, 0] = float(bad)
    with pytest.raises(ValueError, match="edge 'c': Fu has NaN or Inf"):
        cs.Sheaf.from_arrays([2] * 3, [[0, 1, 2], [1, 2, 0]], Fs, torch.eye(2).repeat(3, 1, 1), names="abc")
    S = cs.Sheaf.from_arrays([2] * 3, [[0, 1, 2], [1, 2, 0]], torch.eye(2).repeat(3, 1, 1),
                             torch.eye(2).repeat(3, 1, 1))
    with pytest.raises(ValueError, match="edge 2: Fv has NaN or Inf"):
        S.update_maps(Fv=Fs)
    with pytest.raises(ValueError, match="edge 1: weight must be positive"):
        S.update_maps(weights=torch.tensor([1.0, float(bad), 1.0]))


def test_complex_maps_are_refused_and_integer_maps_cast():
    S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    for F in (torch.ones(1, 1, dtype=torch.complex64), np.ones((1, 1), dtype=complex)):
        with pytest.raises(TypeError, match="edge 'e': Fu .*complex"):
            S.add_edge("a", "b", F, torch.ones(1, 1), name="e")
    with pytest.raises(TypeError, match="complex"):
        cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1, dtype=torch.complex128), torch.ones(1, 1, 1))
    S.add_edge("a", "b", torch.tensor([[2]]), np.array([[3]]), name="int")
    assert S.edge("int").Fu.matrix().dtype == F64 and S.edge("int").Fv.matrix().dtype == F64
    T = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1))
    assert T.stacks[0].Fu.dtype == F64


def test_bad_structure_is_named():
    with pytest.raises(IndexError, match="edge 1 joins positions \\[1, 5\\]"):
        cs.Sheaf.from_arrays([1] * 3, [[0, 1], [1, 5]], torch.ones(2, 1, 1), torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match="edge 'y': Fv takes inputs of dim 1 but vertex 2 has stalk dim 2"):
        cs.Sheaf.from_arrays([1, 1, 2], [[0, 1], [1, 2]], torch.ones(2, 1, 1), torch.ones(2, 1, 1), names="xy")
    with pytest.raises(ValueError, match="edge 'x' is named twice"):
        cs.Sheaf.from_arrays([1, 1], [[0, 1], [1, 0]], torch.ones(2, 1, 1), torch.ones(2, 1, 1), names="xx")
    S = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1), torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="edge 0 already exists"):
        S.add_edge(0, 1, torch.ones(1, 1), torch.ones(1, 1), name=0)


# ---------------------------------------------------------------------------- structure, constructors, devices


def test_edges_views_and_mutations_of_stacks():
    index, Fu, Fv, w = random_arrays(4, 6, 10, loops=False)
    S = cs.Sheaf.from_arrays([3] * 6, index, Fu, Fv, weights=w)
    e = S.edge(4)
    assert (e.u, e.v, e.weight) == (int(index[0, 4]), int(index[1, 4]), float(w[4]))
    assert torch.equal(e.Fu.matrix(), Fu[4]) and S.edge_slice(4) == slice(8, 10)
    assert [e.name for e in S.edge_items()] == list(range(10)) and S.graph.number_of_edges() == 10
    S.set_maps(4, Fv=torch.zeros(2, 3, dtype=F64))
    S.remove_edge(7)
    S.remove_vertex(2)
    np.testing.assert_allclose(S.laplacian(format="dense").numpy(), dense_laplacian(S), atol=1e-12)
    assert all(2 not in (S.edge(n).u, S.edge(n).v) for n in S.edges) and 7 not in S.edges


def test_constant_sheaf_and_plain_networkx():
    G = nx.cycle_graph(6)
    S = cs.constant_sheaf(G, 3)
    assert S.vertices == list(G.nodes) and (S.cohomology().h0, S.cohomology().h1) == (3, 3)
    T = cs.Sheaf.from_networkx(G, stalk=3)
    assert torch.equal(T.laplacian(format="dense"), S.laplacian(format="dense"))
    H = nx.path_graph(3)
    H.nodes[0]["dim"] = 2
    U = cs.Sheaf.from_networkx(H, stalk=2)  # some attributes: per-edge records, identities where missing
    assert U.cohomology().h0 == 2
    with pytest.raises(KeyError, match="stalk="):
        cs.Sheaf.from_networkx(nx.path_graph(2))


def test_to_moves_maps_and_keeps_the_plan():
    index, Fu, Fv, w = random_arrays(5, 5, 8)
    S = cs.Sheaf.from_arrays([3] * 5, index, Fu, Fv, weights=w)
    x = torch.randn(S.C0, dtype=F64)
    y64 = ops.apply_laplacian(S, x)
    plan = S._cache["plan"]
    assert S.to("cpu", torch.float32) is S and S.dtype == torch.float32 and S.device.type == "cpu"
    assert S._cache["plan"] is plan and S.stacks[0].weights.dtype == torch.float32
    y32 = ops.apply_laplacian(S, x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-4)
    assert S.laplacian().dtype == torch.float32
    S.to(torch.float64)
    assert S.dtype == F64


def test_build_memory_is_stacked_not_per_edge():
    index, Fu, Fv, w = random_arrays(6, 1000, 3000, d=3, de=3)
    S = cs.Sheaf.from_arrays([3] * 1000, index, Fu, Fv)
    assert "plan" not in S._cache and S._graph is None  # nothing per edge until asked
    held = sum(t.numel() * t.element_size() for st_ in S.stacks for t in (st_.index, st_.Fu, st_.Fv))
    assert held / S.num_edges == 16 + 2 * 9 * 8
    assert sp.issparse(S.laplacian(format="scipy"))


# ---------------------------------------------------------------------------- specs


def test_spec_stores_stacks_as_arrays_and_round_trips():
    index, Fu, Fv, w = random_arrays(7, 6, 12)
    S = cs.Sheaf.from_arrays([3] * 6, index, Fu, Fv, weights=w)
    S.add_edge(0, 1, torch.randn(2, 3, dtype=F64), M.Select([0, 2], 3), name="single")
    S.add_edges([[1, 2], [2, 3]], torch.rand(2, 3).float() + 0.5, torch.rand(2, 3).float() + 0.5, names=["p", "q"])
    spec = S.to_spec()
    assert len(spec.edges) == 1 and [st.at for st in spec.stacks] == [0, 13]
    text = spec.model_dump_json()
    assert '"base64"' in text and len(text) < 4000
    T = cs.Sheaf.from_spec(text)
    assert T == S and T.edges == S.edges and T.stacks[1].Fu.dtype == torch.float32
    assert torch.equal(T.laplacian(format="dense"), S.laplacian(format="dense"))
    S.remove_edge(0)  # default names no longer start at the stack's position: stored explicitly
    assert cs.Sheaf.from_spec(S.to_spec().model_dump_json()).edges == S.edges


def test_old_specs_load_and_bad_stacks_are_named():
    old = {"vertices": [{"name": 0, "dim": 1}, {"name": 1, "dim": 1}],
           "edges": [{"name": "e", "u": 0, "v": 1, "Fu": {"type": "identity", "dim": 1},
                      "Fv": {"type": "identity", "dim": 1}}]}
    assert cs.Sheaf.from_spec(old).cohomology().h0 == 1
    S = cs.Sheaf.from_arrays([1, 1], [[0], [1]], torch.ones(1, 1, 1, dtype=F64), torch.ones(1, 1, 1, dtype=F64))
    raw = S.to_spec().model_dump()
    raw["stacks"][0]["index"] = cs.spec.ArraySpec.of(torch.tensor([[0], [5]])).model_dump()
    with pytest.raises(cs.SpecError, match="stack at 0: add_edges: edge 0 joins positions \\[0, 5\\]"):
        cs.Sheaf.from_spec(raw)
    raw["stacks"][0]["at"] = 3
    with pytest.raises(cs.SpecError, match="stack at 3: only 0 edges precede it"):
        cs.Sheaf.from_spec(raw)
    raw = S.to_spec().model_dump()
    raw["stacks"][0]["Fu"]["base64"] = "AAAA"
    with pytest.raises(cs.SpecError, match="base64 characters"):
        cs.Sheaf.from_spec(raw)


def _mixed_sheaf(scale: float = 1.0, stack_scale: float = 1.0):
    """Stacked edges and one single dense edge (its matrices are grouped by the operator plan)."""
    g = torch.Generator().manual_seed(5)
    Fu, Fv = torch.randn(2, 2, 2, generator=g, dtype=F64), torch.randn(2, 2, 2, generator=g, dtype=F64)
    S = cs.Sheaf.from_arrays([2, 2, 2], [[0, 1], [1, 2]], stack_scale * Fu, Fv)
    S.add_vertex("d", 2)
    S.add_edge(2, "d", M.Linear(scale * torch.randn(2, 2, generator=g, dtype=F64)), torch.eye(2, dtype=F64), name="x")
    return S


@pytest.mark.parametrize("route", ["in place, then update_maps", "in place, then invalidate", "set_maps"])
def test_operators_follow_map_values_after_every_value_change(route):
    """The cached operator plan keeps index tensors only: after a map's values change through the
    public API, every operator equals the one of a freshly built sheaf."""
    S, x = _mixed_sheaf(), torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(6))
    b = cs.Boundary().fix(0, torch.ones(2, dtype=F64)).fix("d", torch.full((2,), 2.0, dtype=F64))
    ops.apply_laplacian(S, x), ops.laplacian(S), cs.minimize(S, b)  # build and fill the caches
    fresh = _mixed_sheaf(scale=2.0, stack_scale=3.0)
    if route == "set_maps":
        S.set_maps("x", Fu=M.Linear(fresh.edge("x").Fu.matrix()))
        S.update_maps(Fu=fresh.stacks[0].Fu)
    else:
        S.edge("x").Fu.tensors()[0].mul_(2.0)
        if route.endswith("update_maps"):
            S.update_maps(Fu=fresh.stacks[0].Fu)
        else:
            S.stacks[0].Fu.mul_(3.0)
            S.invalidate()
    torch.testing.assert_close(ops.apply_laplacian(S, x), ops.apply_laplacian(fresh, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ops.laplacian(S).to_dense(), ops.laplacian(fresh).to_dense(), rtol=0, atol=1e-12)
    torch.testing.assert_close(cs.minimize(S, b).x.flat, cs.minimize(fresh, b).x.flat, rtol=0, atol=1e-10)
