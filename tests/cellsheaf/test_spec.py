"""SheafSpec: lossless JSON round trips and clear errors for malformed specs."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf import potentials as P
from cellsheaf.spec import SheafSpec, SpecError, from_spec, map_to_spec, register_potential, to_spec
from tests.conftest import build_random_sheaf, random_sheaf

F64 = torch.float64


def same_maps(F, G) -> None:
    """Structural equality, stricter than ``==``: class, dtype and flags as well as values."""
    assert type(F) is type(G) and (F.d_in, F.d_out) == (G.d_in, G.d_out)
    for a, b in zip(F.tensors(), G.tensors()):
        assert a.dtype == b.dtype and a.is_sparse == b.is_sparse
        assert torch.equal(a.to_dense(), b.to_dense())
    if isinstance(F, M.Linear):
        assert F.trainable == G.trainable
        assert (F.mask is None) == (G.mask is None)
        if F.mask is not None:
            assert torch.equal(F.mask, G.mask)


def round_trips(S: cs.Sheaf) -> None:
    spec = S.to_spec()
    text = spec.model_dump_json()
    for T in (cs.Sheaf.from_spec(spec), cs.Sheaf.from_spec(text), SheafSpec.model_validate_json(text).to_sheaf(),
              cs.Sheaf.from_spec(json.loads(text))):
        assert T == S
        assert T.vertices == S.vertices and T.edges == S.edges
        for a, b in zip(S.edge_items(), T.edge_items()):
            same_maps(a.Fu, b.Fu)
            same_maps(a.Fv, b.Fv)
            assert (a.u, a.v, a.weight) == (b.u, b.v, b.weight)


@settings(max_examples=15, deadline=None)
@given(random_sheaf(maps="mixed", weights=True))
def test_random_mixed_round_trip(S):
    round_trips(S)


def test_every_map_type_and_dtype():
    S = cs.Sheaf()
    S.add_vertex("a", 3); S.add_vertex(7, 2)
    W = torch.randn(2, 3, dtype=F64)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=F64)
    pairs = [
        (M.Linear(W, trainable=True, mask=mask), M.Identity(2)),
        (M.Linear(W.float()), M.Linear(torch.randn(2, 2).to_sparse())),
        (M.Select([2, 0], 3), M.Scaled(-1.5, 2)),
        (M.HStack([M.Identity(2), torch.randn(2, 1, dtype=F64)]), M.Diagonal(torch.tensor([1e-300, 3.0]))),
        (M.VStack([M.Select([1], 3), M.Linear(torch.randn(1, 3, dtype=F64))]),
         M.Compose(M.ReLU(2), M.Linear(torch.randn(2, 2, dtype=F64)))),
        (M.Compose(M.LeakyReLU(2, 0.25), torch.randn(2, 3, dtype=F64)), M.Sigmoid(2)),
        (M.Compose(M.Tanh(2), M.Select([0, 1], 3)), M.Softmax(2)),
    ]
    for k, (Fu, Fv) in enumerate(pairs):
        S.add_edge("a", 7, Fu, Fv, name=k, weight=0.5 + k)
    round_trips(S)
    T = cs.Sheaf.from_spec(S.to_spec().model_dump_json())
    assert T.edge(1).Fu.weight.dtype == torch.float32 and T.edge(1).Fv.sparse
    assert T.edge(5).Fu.outer.slope == 0.25
    assert isinstance(T.vertices[1], int) and isinstance(T.edges[0], int)


def test_floats_survive_json_exactly():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.standard_normal(50), [5e-324, 1.7976931348623157e308, 0.1, -0.0]])
    S = cs.Sheaf()
    S.add_vertex("a", vals.size); S.add_vertex("b", 1)
    S.add_edge("a", "b", torch.as_tensor(vals).reshape(1, -1), torch.ones(1, 1, dtype=F64))
    T = cs.Sheaf.from_spec(S.to_spec().model_dump_json())
    assert np.array_equal(T.edge("a->b").Fu.weight.numpy().ravel(), vals)


def test_potentials_round_trip():
    S = cs.Sheaf()
    S.add_vertex("a", 2); S.add_vertex("b", 2)
    I2 = torch.eye(2, dtype=F64)
    pots = [None, P.Quadratic(), P.L1(), P.Huber(0.5), P.PNorm(3.0), P.ElasticNet(0.5, 2.0),
            P.CrossEntropy(), P.Weighted(P.Huber(0.3), torch.tensor([1.0, 2.0]))]
    for k, pot in enumerate(pots):
        S.add_edge("a", "b", I2, I2, name=f"e{k}", potential=pot)
    spec = S.to_spec()
    assert spec.edges[3].potential.model_dump() == {"name": "Huber", "params": {"tau": 0.5}}
    T = cs.Sheaf.from_spec(spec.model_dump_json())
    for a, b in zip(S.edge_items(), T.edge_items()):
        assert type(a.potential) is type(b.potential)
        if a.potential is not None:
            for key, value in vars(a.potential).items():
                other = vars(b.potential)[key]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other) and value.dtype == other.dtype
                elif isinstance(value, P.Potential):
                    assert vars(value) == vars(other)
                else:
                    assert value == other
    x = torch.randn(4, 4, dtype=F64)
    torch.testing.assert_close(cs.energy(T, x), cs.energy(S, x))


def test_custom_potential_registry():
    class Cubic(P.Potential):
        def __init__(self, c):
            self.c = c

        def value(self, r):
            return self.c * (r.abs() ** 3).sum(-1)

    S = cs.Sheaf()
    S.add_vertex("a", 1); S.add_vertex("b", 1)
    S.add_edge("a", "b", torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=F64), potential=Cubic(2.0))
    T = cs.Sheaf.from_spec(S.to_spec().model_dump_json())  # found as a subclass of Potential
    assert type(T.edge("a->b").potential) is Cubic and T.edge("a->b").potential.c == 2.0
    assert register_potential(Cubic) is Cubic
    with pytest.raises(TypeError):
        register_potential(int)


def test_what_cannot_be_serialised_names_the_edge():
    S = cs.Sheaf()
    S.add_vertex("a", 1); S.add_vertex("b", 1)
    S.add_edge("a", "b", M.Function(torch.sin, 1, 1, name="sin"), torch.ones(1, 1), name="bad")
    with pytest.raises(SpecError, match="edge 'bad', map Fu: .*'sin'.*cannot be serialised"):
        S.to_spec()
    S = cs.Sheaf()
    S.add_vertex("a", 1); S.add_vertex("b", 1)
    S.add_edge("a", "b", torch.ones(1, 1), torch.ones(1, 1), name="cvx", potential=P.Convex(lambda r: (r ** 4).sum(-1)))
    with pytest.raises(SpecError, match="edge 'cvx'.*'fn'"):
        S.to_spec()
    S = cs.Sheaf()
    S.add_vertex(("a", 1), 1)
    with pytest.raises(SpecError, match=r"vertex name \('a', 1\)"):
        to_spec(S)
    S = cs.Sheaf()
    S.add_vertex("a", 1); S.add_vertex("b", 1)
    Fu = torch.ones(1, 1)
    S.add_edge("a", "b", Fu, torch.ones(1, 1), name="inf")
    Fu[0, 0] = float("inf")  # add_edge refuses it; an in-place change after the fact is caught here
    with pytest.raises(SpecError, match="edge 'inf'.*NaN or Inf"):
        S.to_spec()


def base_spec() -> dict:
    return {
        "vertices": [{"name": "a", "dim": 2}, {"name": "b", "dim": 1}],
        "edges": [{"name": "e", "u": "a", "v": "b", "Fu": {"type": "select", "indices": [0], "d_in": 2},
                   "Fv": {"type": "identity", "dim": 1}}],
    }


def broken(path, value):
    spec = base_spec()
    obj = spec
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return spec


@pytest.mark.parametrize("spec, match", [
    (broken(["edges", 0, "u"], "zz"), "edge 'e' names unknown vertex 'zz'"),
    (broken(["vertices", 1, "name"], "a"), "vertex 'a' is listed twice"),
    ({**base_spec(), "edges": base_spec()["edges"] * 2}, "edge 'e' is listed twice"),
    (broken(["edges", 0, "Fv"], {"type": "identity", "dim": 2}), "edge 'e': Fv takes inputs of dim 2 but vertex 'b'"),
    (broken(["edges", 0, "Fu"], {"type": "select", "indices": [0, 1], "d_in": 2}), "edge 'e': Fu maps to dim 2"),
    (broken(["edges", 0, "Fu"], {"type": "select", "indices": [5], "d_in": 2}), r"edge 'e': Fu.*outside \[0, 2\)"),
    (broken(["edges", 0, "Fu"], {"type": "linear", "shape": [1, 2], "data": [[1.0]]}), "edge 'e'.*not a 1x2 matrix"),
    (broken(["edges", 0, "Fu"], {"type": "rotation"}), "edge 'e': Fu.*rotation"),
    (broken(["edges", 0, "Fu"], {"type": "linear", "shape": [1, 2], "data": [[1.0, float("nan")]]}),
     "edge 'e'.*finite"),
    (broken(["edges", 0, "weight"], -1.0), "edge 'e': weight"),
    (broken(["vertices", 0, "dim"], -2), "vertex 'a': dim"),
    (broken(["vertices", 0, "name"], [1, 2]), "vertex #0: name"),
    (broken(["edges", 0, "potential"], {"name": "NoSuchPotential"}), "edge 'e'.*unknown potential 'NoSuchPotential'"),
    (broken(["edges", 0, "Fu"], {"type": "compose", "outer": {"type": "identity", "dim": 3},
                                 "inner": {"type": "select", "indices": [0], "d_in": 2}}), "compose: inner maps"),
    ({**base_spec(), "colour": "red"}, "colour"),
])
def test_malformed_specs_name_the_culprit(spec, match):
    with pytest.raises(SpecError, match=match):
        from_spec(spec)
    with pytest.raises(SpecError, match=match):
        from_spec(json.dumps(spec))


def test_malformed_files(tmp_path):
    path = tmp_path / "sheaf.json"
    path.write_text('{"vertices": [{"name": "a", "dim": 1}')
    with pytest.raises(SpecError, match="malformed JSON in file .*sheaf.json"):
        from_spec(path)
    with pytest.raises(SpecError, match="cannot read"):
        from_spec(tmp_path / "missing.json")
    with pytest.raises(SpecError, match="got list"):
        from_spec([1, 2])
    path.write_text(json.dumps(base_spec()))
    S = from_spec(path)
    assert S.vertices == ["a", "b"] and S.edges == ["e"]


def test_map_to_spec_and_sheaf_methods(small_sheaf):
    round_trips(small_sheaf)
    assert map_to_spec(M.Scaled(2.0, 3)).model_dump() == {"type": "scaled", "c": 2.0, "dim": 3}
    S = build_random_sheaf(4, maps="mixed")
    assert cs.Sheaf.from_spec(S.to_spec()) == S
    assert S.to_spec() == to_spec(S)


def test_docstring_examples_run():
    import doctest
    import sys

    result = doctest.testmod(sys.modules["cellsheaf.spec"], optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def with_potential(potential: dict, dim=2) -> dict:
    spec = broken(["edges", 0, "potential"], potential)
    spec["vertices"][0]["dim"] = dim
    return spec


@pytest.mark.parametrize("spec, match", [
    (with_potential({"name": "Huber", "params": {"tau": -1.0}}), "edge 'e'.*Huber: tau.*greater than 0"),
    (with_potential({"name": "Huber", "params": {"tau": 0.5, "grad": 3}}), "edge 'e'.*'grad' names a method"),
    (with_potential({"name": "L1", "params": {"quadratic": True}}), "edge 'e'.*'quadratic'"),
    (with_potential({"name": "PNorm", "params": {"p": 1.0}}), "edge 'e'.*PNorm: p"),
    (with_potential({"name": "ElasticNet", "params": {"l1": 0.0, "l2": 0.0}}), "edge 'e'.*ElasticNet.*not both zero"),
    (with_potential({"name": "CrossEntropy", "params": {"activation": "relu"}}), "edge 'e'.*activation"),
    (with_potential({"name": "Weighted", "params": {"potential": {"__potential__": {"name": "L1", "params": {}}},
                                                    "weights": {"__tensor__": [1.0], "dtype": "complex64"}}}),
     "edge 'e'.*dtype.*'float16', 'bfloat16', 'float32' or 'float64'"),
    (with_potential({"name": "Weighted", "params": {"potential": {"__potential__": {"name": "L1", "params": {}}},
                                                    "weights": {"__tensor__": [-1.0]}}}), "edge 'e'.*non-negative"),
    (broken(["edges", 0, "Fu"], {"type": "linear", "shape": [1, 2], "data": [[1.0, 2.0]], "dtype": "int8"}),
     "edge 'e'.*'float16', 'bfloat16', 'float32' or 'float64'"),
    (with_potential(None, dim=1e9), "vertex 'a': dim.*integer"),
    (with_potential(None, dim=2.5), "vertex 'a': dim.*integer"),
    (with_potential(None, dim=-3), "vertex 'a': dim"),
    (with_potential(None, dim=10 ** 9), "vertex 'a': dim.*exceeds the limit"),
    (broken(["edges", 0, "Fu"], {"type": "identity", "dim": 10 ** 9}), "edge 'e': Fu.*exceeds the limit"),
    (broken(["edges", 0, "Fu"], {"type": "structured", "kind": "Reduce",
                                 "params": {"shape": [2], "dims": [0], "mean": False, "grad": 1}}),
     "edge 'e'.*unknown params key 'grad'"),
    (broken(["edges", 0, "Fu"], {"type": "structured", "kind": "Reduce", "params": {"shape": [2]}}),
     "edge 'e'.*Reduce"),
])
def test_specs_pass_the_constructors_checks(spec, match):
    """Potentials and maps loaded from a spec are built by their constructors, with every check they make."""
    with pytest.raises(SpecError, match=match):
        from_spec(spec)
    with pytest.raises(SpecError, match=match):
        from_spec(json.dumps(spec))


def test_a_loaded_potential_is_constructed_not_patched():
    spec = with_potential({"name": "L1", "params": {}})
    U = from_spec(spec).edge("e").potential
    assert type(U) is P.L1 and vars(U) == {} and not U.quadratic
    spec = with_potential({"name": "Huber", "params": {"tau": 0.25}})
    U = from_spec(json.dumps(spec)).edge("e").potential
    assert U == P.Huber(0.25) and U.value(torch.tensor([3.0])) == 0.25 * (3.0 - 0.125)


def test_custom_potentials_round_trip_through_their_constructor():
    class Scaled(P.Potential):
        def __init__(self, c: float):
            if not c > 0:
                raise ValueError(f"c must be positive, got {c}")
            self.c = float(c)

        def value(self, r):
            return self.c * (r * r).sum(-1)

    class Hidden(P.Potential):
        def __init__(self):
            self.secret = 1.0

        def value(self, r):
            return (r * r).sum(-1)

    S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    S.add_edge("a", "b", torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=F64), name="e", potential=Scaled(2.0))
    raw = S.to_spec().model_dump()
    assert cs.Sheaf.from_spec(raw).edge("e").potential.c == 2.0
    raw["edges"][0]["potential"]["params"]["c"] = -1.0
    with pytest.raises(SpecError, match="edge 'e'.*c must be positive"):
        cs.Sheaf.from_spec(raw)
    raw["edges"][0]["potential"]["params"] = {"c": 1.0, "value": 3}
    with pytest.raises(SpecError, match="edge 'e'.*'value' names a method"):
        cs.Sheaf.from_spec(raw)
    S.add_edge("a", "b", torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=F64), name="h", potential=Hidden())
    with pytest.raises(SpecError, match="edge 'h'.*'secret'.*constructor"):
        S.to_spec()
