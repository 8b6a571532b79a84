"""0-cochains: flat layout, named views, dict conversion, and bad input."""

import numpy as np
import pytest
import torch

import cellsheaf as cs
from cellsheaf.cochain import as_flat, check_finite

F64 = torch.float64


@pytest.fixture
def S() -> cs.Sheaf:
    S = cs.Sheaf()
    S.add_vertex("u", 2)
    S.add_vertex(3, 1)
    S.add_vertex("empty", 0)
    return S


def test_views_and_dict_round_trip(S):
    x = cs.Cochain.from_dict(S, {"u": torch.tensor([1.0, 2.0], dtype=F64), 3: torch.tensor([3.0], dtype=F64)})
    assert x.flat.tolist() == [1.0, 2.0, 3.0] and x.flat.dtype == F64 and not x.batched
    assert x["u"].tolist() == [1.0, 2.0] and x[3].tolist() == [3.0] and x["empty"].shape == (0,)
    d = x.to_dict()
    assert list(d) == ["u", 3, "empty"]
    d["u"][0] = 10.0  # views into the flat tensor
    assert x.flat[0] == 10.0
    y = cs.Cochain.from_dict(S, x.to_dict())
    assert torch.equal(y.flat, x.flat)
    assert "Cochain(shape=(3,)" in repr(x)


def test_batched(S):
    xu = torch.arange(8.0).reshape(4, 2)
    x = cs.Cochain.from_dict(S, {"u": xu, 3: torch.tensor([7.0])})  # the unbatched value is shared
    assert x.batched and x.flat.shape == (4, 3)
    assert torch.equal(x["u"], xu) and x[3].flatten().tolist() == [7.0] * 4
    z = cs.Cochain(S, torch.zeros(5, 3))
    assert z["u"].shape == (5, 2)


def test_fill(S):
    x = cs.Cochain.from_dict(S, {3: torch.tensor([1.0])}, fill=0.5)
    assert x.flat.tolist() == [0.5, 0.5, 1.0]


@pytest.mark.parametrize("values, error, match", [
    ({"zz": torch.zeros(1)}, KeyError, "unknown vertex 'zz'"),
    ({"u": torch.zeros(2)}, KeyError, "no value for vertex 3"),
    ({"u": torch.zeros(3), 3: torch.zeros(1)}, ValueError, r"vertex 'u' has shape \(3,\); expected \(2,\)"),
    ({"u": torch.zeros(2, 2), 3: torch.zeros(3, 1)}, ValueError, "different batch sizes"),
    ({"u": torch.zeros(1, 1, 2), 3: torch.zeros(1)}, ValueError, "vertex 'u' has shape"),
])
def test_bad_dicts(S, values, error, match):
    with pytest.raises(error, match=match):
        cs.Cochain.from_dict(S, values)


def test_as_flat(S):
    x = torch.ones(3)
    assert as_flat(S, x) is x
    assert as_flat(S, cs.Cochain(S, x)) is x
    assert as_flat(S, {"u": torch.ones(2), 3: torch.ones(1)}).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"\(3,\) or \(B, 3\), got \(4,\)"):
        as_flat(S, torch.ones(4))
    with pytest.raises(ValueError, match="C0=3"):
        cs.Cochain(S, torch.ones(2, 2, 3))
    other = cs.Sheaf()
    other.add_vertex("a", 5)
    with pytest.raises(ValueError, match="different layout"):
        as_flat(S, cs.Cochain(other, torch.ones(5)))


def test_check_finite():
    check_finite(torch.ones(3), "x")
    check_finite(torch.tensor([1, 2]), "integers are always finite")
    with pytest.raises(ValueError, match="the input at vertex 'v' contains NaN or Inf"):
        check_finite(torch.tensor([1.0, float("nan")]), "the input at vertex 'v'")


def test_as_real_is_the_boundary_rule():
    """Complex refused naming the argument, integers and booleans cast to the given dtype, floats kept."""
    from cellsheaf.cochain import as_real

    with pytest.raises(TypeError, match="the thing must be real, got torch.complex128"):
        as_real(torch.ones(2, dtype=torch.complex128), "the thing")
    with pytest.raises(TypeError, match="the thing must be real"):
        as_real(np.array([1 + 1j]), "the thing")
    with pytest.raises(TypeError, match="the thing must be a real tensor"):
        as_real("abc", "the thing")
    with pytest.raises(ValueError, match="the thing contains NaN"):
        as_real([1.0, float("nan")], "the thing")
    assert as_real(torch.tensor([1, 2]), "x", torch.float64).dtype == torch.float64
    assert as_real(torch.tensor([True]), "x", torch.float32).dtype == torch.float32
    assert as_real(torch.tensor([1, 2]), "x").dtype == torch.int64  # the caller casts later
    assert as_real(torch.ones(2, dtype=torch.float32), "x", torch.float64).dtype == torch.float32


@pytest.mark.parametrize("bad", [torch.tensor([1 + 2j, 0, 0]), np.ones(3, dtype=np.complex64)])
def test_complex_cochains_are_refused(S, bad):
    with pytest.raises(TypeError, match="must be real"):
        as_flat(S, bad)
    with pytest.raises(TypeError, match="real"):
        cs.Cochain(S, torch.as_tensor(bad))
    with pytest.raises(TypeError, match="vertex 'u'.*must be real"):
        cs.Cochain.from_dict(S, {"u": torch.tensor([1j, 0]), 3: torch.zeros(1)})


def test_integer_cochains_take_the_sheaf_dtype(S):
    assert as_flat(S, torch.arange(S.C0)).dtype == S.dtype


def test_cochain_arithmetic():
    S = cs.Sheaf(); S.add_vertex("u", 2); S.add_vertex("v", 1)
    x = cs.Cochain(S, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    y = cs.Cochain(S, torch.tensor([[0.5, 0.0, -1.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close((x + y).flat, x.flat + y.flat)                 # broadcasts over the batch
    torch.testing.assert_close((x - y).flat, x.flat - y.flat)
    torch.testing.assert_close((y - x.flat).flat, y.flat - x.flat)           # a flat tensor on either side
    torch.testing.assert_close((x.flat - y).flat, x.flat - y.flat)
    torch.testing.assert_close((2.5 * x).flat, 2.5 * x.flat)
    torch.testing.assert_close((x * 2 / 4)["u"], torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close((-x)["v"], torch.tensor([-3.0], dtype=torch.float64))
    assert (x + {"u": torch.ones(2, dtype=torch.float64), "v": torch.ones(1, dtype=torch.float64)}).numpy().tolist() \
        == [2.0, 3.0, 4.0]
    assert isinstance(x.numpy(), np.ndarray) and (x + y).info is None
    with pytest.raises(TypeError):
        x * y
    T = cs.Sheaf(); T.add_vertex("w", 1)
    with pytest.raises(ValueError, match="different layouts"):
        x + cs.Cochain(T, torch.zeros(1))
