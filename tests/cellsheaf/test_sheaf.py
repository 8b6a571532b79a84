"""The Sheaf data model: building, layout, mutation, networkx, linearisation, bad input."""

import networkx as nx
import pytest
import torch

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf import potentials as P
from tests.conftest import build_random_sheaf, dense_coboundary, random_point

F64 = torch.float64
I2 = torch.eye(2, dtype=F64)


def two_vertex_sheaf() -> cs.Sheaf:
    S = cs.Sheaf()
    S.add_vertex("u", 3)
    S.add_vertex("v", 2)
    return S


def test_layout_follows_insertion_order():
    S = two_vertex_sheaf()
    S.add_vertex(7, 1)
    assert S.vertices == ["u", "v", 7] and len(S) == 3
    assert (S.vertex_slice("u"), S.vertex_slice("v"), S.vertex_slice(7)) == (slice(0, 3), slice(3, 5), slice(5, 6))
    assert S.C0 == 6 and S.C1 == 0 and S.dim("v") == 2
    e1 = S.add_edge("u", "v", torch.ones(4, 3), torch.ones(4, 2), name="first")
    e2 = S.add_edge("v", 7, torch.ones(1, 2), torch.ones(1, 1))
    e3 = S.add_edge("v", 7, torch.ones(1, 2), torch.ones(1, 1))
    assert (e1, e2, e3) == ("first", "v->7", "v->7#1")
    assert S.edges == ["first", "v->7", "v->7#1"]
    assert (S.edge_slice("first"), S.edge_slice("v->7"), S.edge_slice("v->7#1")) == (slice(0, 4), slice(4, 5),
                                                                                     slice(5, 6))
    assert S.C1 == 6 and S.edge("first").dim == 4
    assert S.graph.number_of_edges("v", 7) == 2  # a multigraph with parallel edges
    assert "Sheaf(3 vertices, 3 edges, C0=6, C1=6)" == repr(S)


def test_coboundary_sign_convention():
    S = two_vertex_sheaf()
    Fu, Fv = torch.arange(6.0, dtype=F64).reshape(2, 3), torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    S.add_edge("u", "v", Fu, Fv, name="e")
    x = torch.arange(5.0, dtype=F64)
    # (δx)_e = F_v x_v − F_u x_u for e = u -> v
    torch.testing.assert_close(S.coboundary(format="dense") @ x, Fv @ x[3:] - Fu @ x[:3])


@pytest.mark.parametrize("build, error, match", [
    (lambda S: S.add_vertex("u", 1), ValueError, "vertex 'u' already exists"),
    (lambda S: S.add_vertex("w", -1), ValueError, "vertex 'w' must be a non-negative integer"),
    (lambda S: S.add_vertex("w", 1.5), ValueError, "'w'"),
    (lambda S: S.add_vertex("w", True), ValueError, "'w'"),
    (lambda S: S.add_edge("u", "nope", torch.ones(1, 3), torch.ones(1, 1)), KeyError, "unknown vertex 'nope'"),
    (lambda S: S.add_edge("u", "v", torch.ones(1, 2), torch.ones(1, 2), name="e"), ValueError,
     "edge 'e': Fu takes inputs of dim 2 but vertex 'u' has stalk dim 3"),
    (lambda S: S.add_edge("u", "v", torch.ones(1, 3), torch.ones(1, 3), name="e"), ValueError,
     "edge 'e': Fv takes inputs of dim 3 but vertex 'v' has stalk dim 2"),
    (lambda S: S.add_edge("u", "v", torch.ones(2, 3), torch.ones(1, 2), name="e"), ValueError,
     "edge 'e': Fu maps to dim 2 but Fv to dim 1"),
    (lambda S: S.add_edge("u", "v", torch.ones(1, 3), torch.ones(1, 2), name="e", weight=0.0), ValueError,
     "edge 'e': weight must be positive"),
    (lambda S: S.add_edge("u", "v", torch.ones(1, 3), torch.ones(1, 2), name="e", weight=float("inf")), ValueError,
     "edge 'e': weight"),
    (lambda S: S.add_edge("u", "v", torch.ones(1, 3), torch.ones(1, 2), name="e", potential="huber"), TypeError,
     "edge 'e': potential"),
    (lambda S: S.edge("missing"), KeyError, "unknown edge 'missing'"),
    (lambda S: S.dim("missing"), KeyError, "unknown vertex 'missing'"),
    (lambda S: S.vertex_slice("missing"), KeyError, "unknown vertex 'missing'"),
    (lambda S: S.remove_vertex("missing"), KeyError, "unknown vertex 'missing'"),
    (lambda S: S.set_maps("e0", Fu=torch.ones(2, 3)), ValueError, "edge 'e0': new Fu has shape 2x3, expected 1x3"),
])
def test_bad_input_names_the_culprit(build, error, match):
    S = two_vertex_sheaf()
    S.add_edge("u", "v", torch.ones(1, 3), torch.ones(1, 2), name="e0")
    with pytest.raises(error, match=match):
        build(S)


def test_duplicate_edge_name():
    S = two_vertex_sheaf()
    S.add_edge("u", "v", torch.ones(1, 3), torch.ones(1, 2), name="e")
    with pytest.raises(ValueError, match="edge 'e' already exists"):
        S.add_edge("u", "v", torch.ones(1, 3), torch.ones(1, 2), name="e")
    assert S.edges == ["e"]  # nothing half-added


def test_mutations_update_layout_and_operators():
    S = build_random_sheaf(3, n_vertices=5, n_edges=7, maps="mixed")
    e = S.edges[2]
    C1, de = S.C1, S.edge(e).dim
    S.coboundary()  # fill the caches
    S.remove_edge(e)
    assert e not in S.edges and S.C1 == C1 - de and S.coboundary(format="dense").shape == (S.C1, S.C0)
    torch.testing.assert_close(S.coboundary(format="dense"), torch.as_tensor(dense_coboundary(S)).to(S.dtype))
    S.remove_vertex("v1")
    assert "v1" not in S.vertices and all("v1" not in (S.edge(n).u, S.edge(n).v) for n in S.edges)
    assert S.C0 == sum(S.dim(v) for v in S.vertices)
    torch.testing.assert_close(S.coboundary(format="dense"), torch.as_tensor(dense_coboundary(S)).to(S.dtype))
    first = S.edges[0]
    old = S.edge(first)
    S.set_maps(first, Fv=3 * old.Fv.matrix())
    assert S.edge(first).Fu is old.Fu
    torch.testing.assert_close(S.coboundary(format="dense"), torch.as_tensor(dense_coboundary(S)).to(S.dtype))


def test_copy_equality_and_dtype():
    S = build_random_sheaf(1, maps="mixed", weights=True)
    T = S.copy()
    assert T == S and T is not S and T.edges == S.edges
    T.set_maps(T.edges[0], Fu=2 * T.edge(T.edges[0]).Fu.matrix())
    assert T != S
    U = S.copy()
    U.add_vertex("extra", 1)
    assert U != S
    assert S.dtype == F64
    assert build_random_sheaf(1, dtype=torch.float32).dtype == torch.float32
    assert S.linear and not build_random_sheaf(6, maps="nonlinear").linear
    H = cs.Sheaf()
    H.add_vertex("a", 1); H.add_vertex("b", 1)
    H.add_edge("a", "b", torch.ones(1, 1), torch.ones(1, 1), potential=P.L1())
    assert not H.linear and not H.edge("a->b").linear  # linear maps, but not a quadratic potential


def test_networkx_round_trip():
    S = build_random_sheaf(5, maps="mixed", weights=True)
    G = S.to_networkx()
    assert isinstance(G, nx.MultiDiGraph) and G.number_of_nodes() == len(S.vertices)
    assert G.nodes["v0"]["dim"] == S.dim("v0")
    T = cs.Sheaf.from_networkx(G)
    assert T == S
    U = nx.Graph()
    U.add_node(0, dim=2); U.add_node(1, dim=2)
    U.add_edge(0, 1, Fu=I2, Fv=-I2, weight=2.0)
    T = cs.Sheaf.from_networkx(U)
    assert T.edges == ["0->1"] and T.edge("0->1").weight == 2.0
    U.add_node(2)
    with pytest.raises(KeyError, match="node 2 has no 'dim'"):
        cs.Sheaf.from_networkx(U)
    V = nx.DiGraph()
    V.add_node("a", dim=1); V.add_node("b", dim=1)
    V.add_edge("a", "b", Fu=torch.ones(1, 1))
    with pytest.raises(KeyError, match="edge 'a'->'b' needs 'Fu' and 'Fv'"):
        cs.Sheaf.from_networkx(V)


def test_linearize_uses_jacobians_at_the_point():
    S = build_random_sheaf(6, maps="nonlinear")
    x = random_point(S, 3)
    T = S.linearize(x)
    assert T.linear and T.vertices == S.vertices and T.edges == S.edges
    torch.testing.assert_close(T.coboundary(format="dense"), torch.as_tensor(dense_coboundary(S, x)))
    with pytest.raises(ValueError, match="single cochain"):
        S.linearize(random_point(S, 3, batch=2))
    R = cs.Sheaf()
    R.add_vertex("a", 2); R.add_vertex("b", 2)
    R.add_edge("a", "b", M.ReLU(2), I2)
    L = R.linearize(torch.tensor([-1.0, 1.0, 0.0, 0.0], dtype=F64))
    assert L.edge("a->b").Fu.matrix().diagonal().tolist() == [0.0, 1.0]
