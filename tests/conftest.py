"""Shared test helpers: random sheaves (seeded and hypothesis), classic sheaves, dense references.

Import them from any test module (``tests`` is a package; pytest puts the repository root on ``sys.path``)::

    from tests.conftest import random_sheaf, build_random_sheaf, dense_coboundary

What is here
------------
``build_random_sheaf(seed, ...)``
    A deterministic random sheaf (numpy ``Generator``), for plain tests and benchmarks.
``random_sheaf(...)``
    The same as a hypothesis strategy: ``@given(random_sheaf(maps="mixed"))``.
    Inside another ``@st.composite`` use ``draw(random_sheaf(...))``.
``MAP_KINDS``
    The map families the builders draw from: ``"dense"`` (dense `Linear`),
    ``"integer"`` (dense Linear with small integer entries, for exact-rank checks),
    ``"mixed"`` (every linear map type: dense and sparse Linear, Identity, Scaled, Select,
    Diagonal, HStack, VStack, Compose) and ``"nonlinear"`` (mixed plus ReLU, LeakyReLU,
    Sigmoid, Tanh, Softmax, compositions with them and Function).
``constant_sheaf(G, d)``, ``holonomy_cycle(n, theta)``, ``path_sheaf(n, d)``
    Sheaves with known cohomology.
``dense_coboundary(S, at=None)``, ``dense_laplacian(S, at=None)``
    Independent dense references built edge by edge from ``Map.matrix()`` / ``Map.jacobian``
    (they never call `cellsheaf.operators`).
``random_point(S, seed, batch=None)``
    A random 0-cochain.

Fixtures: ``small_sheaf`` (a fixed connected sheaf with weights and every linear map type) and
``device`` (``cpu`` always, ``cuda`` when torch sees a GPU; skipped, not failed, without one).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf import maps as M

MAP_KINDS = ("dense", "integer", "mixed", "nonlinear")

__all__ = [
    "MAP_KINDS", "build_random_sheaf", "random_sheaf", "random_map", "constant_sheaf", "holonomy_cycle",
    "path_sheaf", "dense_coboundary", "dense_laplacian", "random_point", "rotation",
]


def _dense(rng: np.random.Generator, d_out: int, d_in: int, dtype: torch.dtype, integer: bool = False):
    if integer:
        return torch.as_tensor(rng.integers(-2, 3, size=(d_out, d_in)).astype(np.float64), dtype=dtype)
    return torch.as_tensor(rng.standard_normal((d_out, d_in)), dtype=dtype)


def random_map(rng: np.random.Generator, d_out: int, d_in: int, kind: str = "dense",
               dtype: torch.dtype = torch.float64) -> M.Map:
    """A random restriction map ``R^{d_in} -> R^{d_out}`` of the family ``kind`` (see `MAP_KINDS`)."""
    if kind not in MAP_KINDS:
        raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    if kind in ("dense", "integer"):
        return M.Linear(_dense(rng, d_out, d_in, dtype, integer=kind == "integer"))
    options = ["dense", "sparse", "compose"]
    if d_in == d_out:
        options += ["identity", "scaled", "diagonal"]
    if 0 < d_out <= d_in:
        options.append("select")
    if d_in >= 2:
        options.append("hstack")
    if d_out >= 2:
        options.append("vstack")
    if kind == "nonlinear" and d_out > 0:
        options += ["relu", "leaky", "sigmoid", "tanh", "softmax", "function"]
    pick = options[rng.integers(len(options))]
    if pick == "dense":
        return M.Linear(_dense(rng, d_out, d_in, dtype))
    if pick == "sparse":
        W = _dense(rng, d_out, d_in, dtype) * torch.as_tensor(rng.random((d_out, d_in)) < 0.6, dtype=dtype)
        return M.Linear(W.to_sparse())
    if pick == "compose":
        k = int(rng.integers(1, 4))
        return M.Compose(random_map(rng, d_out, k, kind, dtype), random_map(rng, k, d_in, "mixed", dtype))
    if pick == "identity":
        return M.Identity(d_in)
    if pick == "scaled":
        return M.Scaled(float(rng.uniform(0.5, 2.0)) * (1 if rng.random() < 0.5 else -1), d_in)
    if pick == "diagonal":
        return M.Diagonal(torch.as_tensor(rng.standard_normal(d_in), dtype=dtype))
    if pick == "select":
        return M.Select(sorted(rng.choice(d_in, size=d_out, replace=False).tolist()), d_in)
    if pick == "hstack":
        k = int(rng.integers(1, d_in))
        return M.HStack([random_map(rng, d_out, k, kind, dtype), random_map(rng, d_out, d_in - k, kind, dtype)])
    if pick == "vstack":
        k = int(rng.integers(1, d_out))
        return M.VStack([random_map(rng, k, d_in, kind, dtype), random_map(rng, d_out - k, d_in, kind, dtype)])
    inner = M.Linear(_dense(rng, d_out, d_in, dtype))
    outer = {
        "relu": lambda: M.ReLU(d_out), "leaky": lambda: M.LeakyReLU(d_out, 0.1), "sigmoid": lambda: M.Sigmoid(d_out),
        "tanh": lambda: M.Tanh(d_out), "softmax": lambda: M.Softmax(d_out),
        "function": lambda: M.Function(lambda z: torch.sin(z) + z, d_out, d_out, name="sin_plus_id"),
    }[pick]()
    return M.Compose(outer, inner)


def build_random_sheaf(
    seed: int = 0,
    n_vertices: int = 6,
    n_edges: int = 9,
    dims: tuple[int, int] = (1, 3),
    edge_dims: tuple[int, int] = (1, 3),
    maps: str = "dense",
    dtype: torch.dtype = torch.float64,
    weights: bool = False,
    connected: bool = False,
    names: str = "str",
) -> cs.Sheaf:
    """A random sheaf with ``n_vertices`` vertices and ``n_edges`` random oriented edges.

    Parameters
    ----------
    seed : seed of the numpy generator (same seed, same sheaf).
    dims, edge_dims : inclusive ranges of vertex and edge stalk dimensions.
    maps : map family, one of `MAP_KINDS`.
    weights : draw edge weights in ``[0.5, 2]`` instead of 1.
    connected : start with a random spanning tree so the graph is connected
        (``n_edges`` must then be at least ``n_vertices - 1``).
    names : ``"str"`` (``"v0", "v1", ...``) or ``"int"`` (``0, 1, ...``) vertex names.

    Self-loops and parallel edges are allowed (it is a multigraph).

    Examples
    --------
    >>> S = build_random_sheaf(1, n_vertices=4, n_edges=5)
    >>> len(S.vertices), len(S.edges)
    (4, 5)
    """
    rng = np.random.default_rng(seed)
    S = cs.Sheaf()
    vname = (lambda i: f"v{i}") if names == "str" else (lambda i: i)
    for i in range(n_vertices):
        S.add_vertex(vname(i), int(rng.integers(dims[0], dims[1] + 1)))
    pairs = []
    if connected:
        if n_edges < n_vertices - 1:
            raise ValueError("a connected sheaf needs n_edges >= n_vertices - 1")
        order = rng.permutation(n_vertices)
        pairs = [(int(order[int(rng.integers(i))]), int(order[i])) for i in range(1, n_vertices)]
    while len(pairs) < n_edges:
        pairs.append((int(rng.integers(n_vertices)), int(rng.integers(n_vertices))))
    for k, (a, b) in enumerate(pairs):
        if rng.random() < 0.5:
            a, b = b, a
        u, v = vname(a), vname(b)
        de = int(rng.integers(edge_dims[0], edge_dims[1] + 1))
        w = float(rng.uniform(0.5, 2.0)) if weights else 1.0
        S.add_edge(u, v, random_map(rng, de, S.dim(u), maps, dtype), random_map(rng, de, S.dim(v), maps, dtype),
                   name=f"e{k}", weight=w)
    return S


@st.composite
def random_sheaf(
    draw,
    max_vertices: int = 6,
    max_edges: int = 9,
    max_dim: int = 3,
    maps: str = "dense",
    dtype: torch.dtype = torch.float64,
    weights: bool = False,
    connected: bool = False,
) -> cs.Sheaf:
    """Hypothesis strategy for random sheaves (arguments as in `build_random_sheaf`).

    Hypothesis draws the sizes and a seed; the seed fixes the maps, so failures shrink
    to small graphs and reproduce exactly.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None)
    ... @given(random_sheaf(maps="mixed"))
    ... def test_square(S):
    ...     assert S.laplacian().shape == (S.C0, S.C0)
    """
    n = draw(st.integers(1, max_vertices))
    lo = n - 1 if connected else 0
    m = draw(st.integers(lo, max(lo, max_edges)))
    seed = draw(st.integers(0, 2**32 - 1))
    return build_random_sheaf(seed, n, m, dims=(1, max_dim), edge_dims=(1, max_dim), maps=maps, dtype=dtype,
                              weights=weights, connected=connected)


def constant_sheaf(G: nx.Graph, d: int, dtype: torch.dtype = torch.float64) -> cs.Sheaf:
    """The constant sheaf ``R^d`` on ``G`` (identity maps), edges oriented as ``G`` lists them."""
    S = cs.Sheaf()
    for v in G.nodes:
        S.add_vertex(v, d)
    eye = M.Linear(torch.eye(d, dtype=dtype))
    for k, (u, v) in enumerate(G.edges()):
        S.add_edge(u, v, eye, eye, name=f"e{k}")
    return S


def rotation(theta: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 2×2 rotation by ``theta``."""
    c, s = np.cos(theta), np.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=dtype)


def holonomy_cycle(n: int, theta: float, dtype: torch.dtype = torch.float64) -> cs.Sheaf:
    """A cycle of ``n`` vertices with stalks ``R^2``, identity maps except one rotation by ``theta``.

    The holonomy around the cycle is the rotation by ``theta``: ``H⁰ = 0`` unless
    ``theta`` is a multiple of ``2π`` (then ``H⁰ = R^2``).
    """
    S = cs.Sheaf()
    for i in range(n):
        S.add_vertex(i, 2)
    eye = torch.eye(2, dtype=dtype)
    for i in range(n):
        S.add_edge(i, (i + 1) % n, rotation(theta, dtype) if i == n - 1 else eye, eye, name=f"e{i}")
    return S


def path_sheaf(n: int, d: int = 1, dtype: torch.dtype = torch.float64) -> cs.Sheaf:
    """The constant sheaf ``R^d`` on the path ``0 -> 1 -> ... -> n-1``."""
    return constant_sheaf(nx.path_graph(n, create_using=nx.DiGraph), d, dtype)


def _map_matrix(F: M.Map, x: torch.Tensor | None) -> torch.Tensor:
    if F.linear:
        return F.matrix().double()
    if x is None:
        raise ValueError("a nonlinear map needs a point")
    return F.jacobian(x).double()


def dense_coboundary(S: cs.Sheaf, at: torch.Tensor | None = None) -> np.ndarray:
    """``δ`` as a dense float64 numpy array, built edge by edge (Jacobians at ``at`` for nonlinear maps)."""
    D = np.zeros((S.C1, S.C0))
    for e in S.edge_items():
        su, sv, se = S.vertex_slice(e.u), S.vertex_slice(e.v), S.edge_slice(e.name)
        xu = None if at is None else at[su]
        xv = None if at is None else at[sv]
        D[se, su] -= _map_matrix(e.Fu, xu).numpy()
        D[se, sv] += _map_matrix(e.Fv, xv).numpy()
    return D


def dense_laplacian(S: cs.Sheaf, at: torch.Tensor | None = None) -> np.ndarray:
    """The weighted Laplacian ``δᵀWδ`` as a dense float64 numpy array (independent reference)."""
    D = dense_coboundary(S, at)
    w = np.concatenate([np.full(e.dim, e.weight) for e in S.edge_items()]) if S.C1 else np.zeros(0)
    return D.T @ (w[:, None] * D)


def random_point(S: cs.Sheaf, seed: int = 0, batch: int | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random 0-cochain of shape ``(C0,)`` or ``(batch, C0)``."""
    rng = np.random.default_rng(seed)
    shape = (S.C0,) if batch is None else (batch, S.C0)
    return torch.as_tensor(rng.standard_normal(shape), dtype=dtype)


@pytest.fixture
def small_sheaf() -> cs.Sheaf:
    """A fixed connected sheaf with 6 vertices, 9 edges and every linear map type."""
    return build_random_sheaf(7, n_vertices=6, n_edges=9, maps="mixed", connected=True, weights=True)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Each device the suite runs on: ``cpu`` always, ``cuda`` when a GPU is present (skipped without one)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


def stacked_random(n: int, seed: int, planted: bool = False, d: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``edge_index`` and maps of a connected random sheaf: a Hamiltonian cycle plus ``2n`` chords.

    ``planted``: ``Fv`` corrected by a rank-one term per edge so that a random cochain is a global section.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    u = np.concatenate([perm, rng.integers(0, n, 2 * n)])
    v = np.concatenate([np.roll(perm, -1), (u[n:] + rng.integers(1, n, 2 * n)) % n])
    Fu, Fv = rng.standard_normal((3 * n, d, d)), rng.standard_normal((3 * n, d, d))
    if planted:
        x = rng.standard_normal((n, d))
        miss = np.einsum("eij,ej->ei", Fu, x[u]) - np.einsum("eij,ej->ei", Fv, x[v])
        Fv = Fv + miss[:, :, None] * x[v][:, None, :] / (x[v] ** 2).sum(1)[:, None, None]
    return np.stack([u, v]), Fu, Fv


def anchored_and_floating(n_anchored: int, n_floating: int, seed: int = 0):
    """A random sheaf with a tenth of its vertices fixed, beside a floating one with a planted section (h0 = 1)."""
    iA, FuA, FvA = stacked_random(n_anchored, seed)
    iB, FuB, FvB = stacked_random(n_floating, seed + 1, planted=True) if n_floating \
        else (np.zeros((2, 0), int), np.zeros((0, 3, 3)), np.zeros((0, 3, 3)))
    S = cs.Sheaf.from_arrays([3] * (n_anchored + n_floating), torch.as_tensor(np.hstack([iA, iB + n_anchored])),
                             torch.as_tensor(np.concatenate([FuA, FuB])), torch.as_tensor(np.concatenate([FvA, FvB])))
    rng = np.random.default_rng(seed)
    b = cs.Boundary()
    for v in rng.choice(n_anchored, n_anchored // 10, replace=False).tolist():
        b.fix(v, torch.as_tensor(rng.standard_normal(3)))
    return S, b
