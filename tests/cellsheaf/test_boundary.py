"""Boundary (stubborn coordinates): layout on the cochain, batching, and bad input."""

import pytest
import torch

import cellsheaf as cs

F64 = torch.float64


@pytest.fixture
def S() -> cs.Sheaf:
    S = cs.Sheaf()
    S.add_vertex("a", 2)
    S.add_vertex("b", 3)
    S.add_vertex("c", 1)
    return S


def test_resolve_whole_stalks_and_coordinates(S):
    b = cs.Boundary().fix("b", torch.tensor([5.0, 6.0], dtype=F64), coords=[2, 0]).fix("a", [1.0, 2.0])
    r = b.resolve(S)
    assert r.fixed.tolist() == [0, 1, 2, 4] and r.free.tolist() == [3, 5]
    assert r.values.tolist() == [1.0, 2.0, 6.0, 5.0]  # aligned with the sorted fixed indices
    assert r.batch is None and b.vertices == ["b", "a"] and len(b) == 2
    x = r.fill(torch.zeros(S.C0, dtype=F64))
    assert x.tolist() == [1.0, 2.0, 6.0, 0.0, 5.0, 0.0]
    assert "'b': [2, 0]" in repr(b) and "'a': all" in repr(b)


def test_fix_in_steps_and_unfix(S):
    b = cs.Boundary().fix("b", [1.0], coords=[0]).fix("b", [3.0], coords=[2])
    r = b.resolve(S)
    assert r.fixed.tolist() == [2, 4] and r.values.tolist() == [1.0, 3.0]
    c = b.copy().unfix("b")
    assert len(c) == 0 and len(b) == 1
    assert c.resolve(S).fixed.numel() == 0 and c.resolve(S).free.tolist() == list(range(S.C0))


def test_batched_values_mix_with_shared_ones(S):
    vb = torch.arange(6.0, dtype=F64).reshape(3, 2)
    b = cs.Boundary().fix("a", vb).fix("c", [9.0]).fix("b", torch.ones(3, 1, dtype=F64), coords=[1])
    r = b.resolve(S)
    assert r.batch == 3 and r.values.shape == (3, 4)
    assert r.values[:, :2].tolist() == vb.tolist() and r.values[:, 3].tolist() == [9.0] * 3
    x = r.fill(torch.zeros(S.C0, dtype=F64))
    assert x.shape == (3, S.C0) and x[:, 5].tolist() == [9.0] * 3
    mixed = cs.Boundary().fix("b", torch.zeros(3, 1), coords=[0]).fix("b", torch.ones(1), coords=[1])
    assert mixed.resolve(S).values.shape == (3, 2)


@pytest.mark.parametrize("make, error, match", [
    (lambda: cs.Boundary().fix("a", [float("nan"), 0.0]), ValueError, "vertex 'a' contains NaN or Inf"),
    (lambda: cs.Boundary().fix("a", [float("inf"), 0.0]), ValueError, "vertex 'a' contains NaN or Inf"),
    (lambda: cs.Boundary().fix("a", torch.zeros(2, 2, 2)), ValueError, "vertex 'a' must be"),
    (lambda: cs.Boundary().fix("a", [1.0, 2.0], coords=[0]), ValueError, "vertex 'a': 1 coords"),
    (lambda: cs.Boundary().fix("a", [1.0, 2.0], coords=[0, 0]), ValueError, "vertex 'a': repeated"),
    (lambda: cs.Boundary().fix("a", [1.0, 2.0]).fix("a", [1.0], coords=[0]), ValueError,
     "vertex 'a' already has"),
    (lambda: cs.Boundary().fix("b", [1.0], coords=[0]).fix("b", [2.0], coords=[0]), ValueError,
     "vertex 'b' already has"),
    (lambda: cs.Boundary().fix("b", torch.zeros(2, 1), coords=[0]).fix("b", torch.zeros(3, 1), coords=[1]),
     ValueError, "vertex 'b': batch sizes 2 and 3"),
])
def test_bad_values(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("make, error, match", [
    (lambda: cs.Boundary().fix("zz", [1.0]), KeyError, "unknown vertex 'zz'"),
    (lambda: cs.Boundary().fix("a", [1.0, 2.0, 3.0]), ValueError, "vertex 'a': value of shape \\(3,\\).*dim 2"),
    (lambda: cs.Boundary().fix("b", [1.0], coords=[3]), IndexError, "vertex 'b': coordinates \\[3\\] outside"),
    (lambda: cs.Boundary().fix("b", [1.0], coords=[-1]), IndexError, "vertex 'b'"),
    (lambda: cs.Boundary().fix("a", torch.zeros(2, 2)).fix("c", torch.zeros(3, 1)), ValueError,
     "different batch sizes"),
])
def test_bad_boundary_on_a_sheaf(S, make, error, match):
    with pytest.raises(error, match=match):
        make().resolve(S)


def test_integer_values_become_floating(S):
    r = cs.Boundary().fix("c", [3]).resolve(S)
    assert r.values.is_floating_point() and r.values.tolist() == [3.0]
    r = cs.Boundary().fix("c", [3.0]).resolve(S, dtype=F64)
    assert r.values.dtype == F64
