"""Orthogonal matrices from parameters: orthogonality to 1e-12, closed forms against the general formulas."""

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsheaf import orthogonal as O

F64 = torch.float64
DIMS = [1, 2, 3, 4, 5]


def params(seed: int, n: int, d: int, scale: float = 3.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(scale * rng.standard_normal((n, O.n_skew(d))), dtype=F64)


@pytest.mark.parametrize("method", O.METHODS)
@pytest.mark.parametrize("d", DIMS)
def test_orthogonal_to_1e_12_in_float64(d, method):
    for scale in (1e-9, 1.0, 30.0):
        Q = O.orthogonal(params(d, 200, d, scale), d, method)
        assert Q.shape == (200, d, d) and Q.dtype == F64
        eye = torch.eye(d, dtype=F64)
        assert (Q.transpose(1, 2) @ Q - eye).abs().max() < 1e-12
        assert (Q @ Q.transpose(1, 2) - eye).abs().max() < 1e-12
        det = np.linalg.det(Q.numpy())
        expected = (-1.0) ** d if method == "householder" else 1.0
        np.testing.assert_allclose(det, expected, atol=1e-12)


@pytest.mark.parametrize("d", DIMS)
def test_exp_and_cayley_match_scipy(d):
    a = params(7, 20, d)
    A = O.skew(a, d).numpy()
    np.testing.assert_allclose(A, -A.transpose(0, 2, 1))
    np.testing.assert_allclose(O.exp_skew(a, d).numpy(), np.stack([sla.expm(M) for M in A]), atol=1e-12)
    eye = np.eye(d)
    cay = np.stack([np.linalg.solve(eye - M, eye + M) for M in A])
    np.testing.assert_allclose(O.cayley(a, d).numpy(), cay, atol=1e-12)


@pytest.mark.parametrize("d", DIMS)
def test_householder_is_the_product_of_reflections(d):
    a = params(3, 10, d)
    i, j = np.tril_indices(d, -1)
    for k in range(10):
        V = np.eye(d)
        V[i, j] = a[k].numpy()
        Q = np.eye(d)
        for c in range(d):
            v = V[:, c:c + 1]
            Q = Q @ (np.eye(d) - 2 * v @ v.T / (v.T @ v))
        np.testing.assert_allclose(O.householder(a[k], d).numpy(), Q, atol=1e-12)


def test_closed_forms_two_and_three():
    theta = torch.tensor([0.3], dtype=F64)
    c, s = np.cos(0.3), np.sin(0.3)
    np.testing.assert_allclose(O.exp_skew(theta, 2).numpy(), [[c, -s], [s, c]], atol=1e-15)
    # Rodrigues: rotation by |w| about w/|w|
    w = torch.tensor([0.2, -0.5, 0.4], dtype=F64)
    R = O.exp_skew(w, 3)
    axis = torch.tensor([0.4, 0.5, 0.2], dtype=F64)  # skew(w) is the cross product with (w2, -w1, w0)
    np.testing.assert_allclose((R @ axis).numpy(), axis.numpy(), atol=1e-15)
    np.testing.assert_allclose(float(torch.diagonal(R).sum()), 1 + 2 * np.cos(float(w.norm())), atol=1e-15)


@pytest.mark.parametrize("method", O.METHODS)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_gradients_are_finite_and_match_finite_differences(d, method):
    fn = lambda a: O.orthogonal(a, d, method)  # noqa: E731
    torch.autograd.gradcheck(fn, (params(1, 3, d).requires_grad_(),))
    zero = torch.zeros(2, O.n_skew(d), dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(fn, (zero,))  # the identity (exp, cayley): the small-angle branch


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 3), st.floats(1e-12, 1e3), st.integers(0, 2**31))
def test_small_and_large_angles_stay_orthogonal(d, scale, seed):
    a = params(seed, 4, d, scale)
    for method in ("exp", "cayley"):
        Q = O.orthogonal(a, d, method)
        assert (Q.transpose(1, 2) @ Q - torch.eye(d, dtype=F64)).abs().max() < 1e-12


def test_float32_follows_the_parameters():
    Q = O.orthogonal(torch.randn(5, 3), 3)
    assert Q.dtype == torch.float32 and (Q.transpose(1, 2) @ Q - torch.eye(3)).abs().max() < 1e-5


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="3 parameters"):
        O.exp_skew(torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match="method must be one of"):
        O.orthogonal(torch.zeros(3), 3, method="qr")
    with pytest.raises(TypeError, match="floating-point"):
        O.cayley(torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="positive integer"):
        O.skew(torch.zeros(0), 0)
