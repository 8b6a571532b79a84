"""Restriction maps: apply/adjoint/matrix/coo, and jvp/vjp/jacobian/linearize against torch.autograd."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellsheaf import maps as M

F64 = torch.float64
g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(shape, generator=g, dtype=F64)


LINEAR = {
    "dense": lambda: M.Linear(rand(3, 4)),
    "sparse": lambda: M.Linear((rand(3, 4) * (rand(3, 4) > 0)).to_sparse()),
    "scipy": lambda: M.Linear(sp.random(3, 4, density=0.5, random_state=0, format="csr")),
    "numpy": lambda: M.Linear(np.arange(12.0).reshape(3, 4)),
    "identity": lambda: M.Identity(4),
    "scaled": lambda: M.Scaled(-2.5, 4),
    "select": lambda: M.Select([3, 0, 1], 4),
    "diagonal": lambda: M.Diagonal(rand(4)),
    "diagonal_per_channel": lambda: M.Diagonal(rand(2), shape=(2, 2), axis=0, factor=rand(2, 1)),
    "diagonal_broadcast": lambda: M.Diagonal(rand(1, 1, 2), shape=(2, 2)),
    "hstack": lambda: M.HStack([rand(3, 1), M.Select([0, 2, 1], 3)]),
    "vstack": lambda: M.VStack([M.Select([1], 4), rand(2, 4)]),
    "compose": lambda: M.Compose(rand(3, 2), M.Select([0, 2], 4)),
}

NONLINEAR = {
    "relu": lambda: M.ReLU(4),
    "leaky": lambda: M.LeakyReLU(4, 0.2),
    "sigmoid": lambda: M.Sigmoid(4),
    "tanh": lambda: M.Tanh(4),
    "softmax": lambda: M.Softmax(4),
    "function": lambda: M.Function(lambda x: torch.sin(x[..., :3]) * x[..., 1:], 4, 3, name="f"),
    "relu_after_linear": lambda: M.Compose(M.ReLU(3), rand(3, 4)),
    "hstack_nonlinear": lambda: M.HStack([M.Tanh(2), M.Compose(M.Sigmoid(2), rand(2, 2))]),
    "vstack_nonlinear": lambda: M.VStack([M.Softmax(4), M.Compose(M.ReLU(1), rand(1, 4))]),
}


def autograd_jacobian(F, x):
    return torch.autograd.functional.jacobian(F.apply, x)


@pytest.mark.parametrize("name", LINEAR)
def test_linear_maps(name):
    F = LINEAR[name]()
    A = F.matrix().double()
    assert A.shape == (F.d_out, F.d_in) and F.linear
    for shape in [(F.d_in,), (5, F.d_in), (2, 3, F.d_in)]:
        x = rand(*shape)
        torch.testing.assert_close(F.apply(x).double(), x @ A.T)
        y = rand(*shape[:-1], F.d_out)
        torch.testing.assert_close(F.adjoint(y).double(), y @ A)
        torch.testing.assert_close(F.jvp(x, x).double(), x @ A.T)
        torch.testing.assert_close(F.vjp(x, y).double(), y @ A)
    r, c, v = F.coo()
    dense = np.zeros((F.d_out, F.d_in))
    np.add.at(dense, (r, c), v)
    np.testing.assert_allclose(dense, A.numpy())
    x = rand(F.d_in)
    torch.testing.assert_close(F.jacobian(x).double(), A)
    torch.testing.assert_close(autograd_jacobian(F, x).double(), A)
    assert F.linearize(x) is F
    # float32 inputs stay float32 on float64 maps
    assert F.apply(x.float()).dtype == torch.float32
    assert F.adjoint(rand(F.d_out).float()).dtype == torch.float32
    G = F.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in G.tensors())
    assert type(G) is type(F) and (G.d_in, G.d_out) == (F.d_in, F.d_out)


@pytest.mark.parametrize("name", NONLINEAR)
def test_nonlinear_maps_match_autograd(name):
    F = NONLINEAR[name]()
    assert not F.linear
    for shape in [(F.d_in,), (3, F.d_in)]:
        x = rand(*shape)
        v, w = rand(*shape), rand(*shape[:-1], F.d_out)
        J = F.jacobian(x)
        assert J.shape == (*shape[:-1], F.d_out, F.d_in)
        flat_x = x.reshape(-1, F.d_in)
        Jref = torch.stack([autograd_jacobian(F, xi) for xi in flat_x]).reshape(J.shape)
        torch.testing.assert_close(J, Jref)
        torch.testing.assert_close(F.jvp(x, v), (J @ v.unsqueeze(-1)).squeeze(-1))
        torch.testing.assert_close(F.vjp(x, w), (w.unsqueeze(-2) @ J).squeeze(-2))
    x = rand(F.d_in)
    Lin = F.linearize(x)
    assert Lin.linear
    torch.testing.assert_close(Lin.matrix().double(), F.jacobian(x))
    with pytest.raises(NotImplementedError, match="nonlinear"):
        F.matrix()
    with pytest.raises(NotImplementedError, match="nonlinear"):
        F.adjoint(rand(F.d_out))


def test_relu_fast_selection_rule():
    F = M.ReLU(3)
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=F64)
    assert F.derivative(x).tolist() == [0.0, 1.0, 1.0]  # 1 at z = 0 (Eq. 12)
    assert F.linearize(x).matrix().diagonal().tolist() == [0.0, 1.0, 1.0]
    assert M.LeakyReLU(3, 0.1).derivative(x).tolist() == [0.1, 1.0, 1.0]


def test_structured_maps_never_densify():
    S = M.Select([2], 5)
    assert S.adjoint(torch.tensor([7.0])).tolist() == [0, 0, 7.0, 0, 0]
    assert isinstance(M.Diagonal([1.0, 2.0]).linearize(), M.Diagonal)
    assert M.Linear(rand(2, 2).to_sparse()).sparse


@pytest.mark.parametrize("v_shape, shape, axis", [((), (3, 2), None), ((3,), (3, 2), 0), ((2,), (3, 2), None),
                                                   ((3, 1), (3, 2), None), ((1, 1, 2), (3, 2), None)])
def test_diagonal_broadcasts_as_torch(v_shape, shape, axis):
    """``Diagonal(v, shape, axis, factor)`` is ``x * v * factor`` broadcast over one sample, keeping ``v`` itself."""
    v, f = torch.nn.Parameter(rand(*v_shape)), rand(*v_shape)
    D = M.Diagonal(v, shape=shape, axis=axis, factor=f)
    view = (-1, 1) if axis == 0 else v_shape
    x = rand(5, *shape)
    want = x * v.reshape(view) * f.reshape(view)
    torch.testing.assert_close(D.apply(x.reshape(5, -1)), want.reshape(5, -1))
    assert D.parameters() == [v] and D.tensors()[1] is f
    assert D.to(torch.float32).apply(x.reshape(5, -1).float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"Diagonal: v of shape \(4,\) does not broadcast to the stalk shape"):
        M.Diagonal(rand(4), shape=shape, axis=axis)


def test_equality():
    A = rand(2, 3)
    assert M.Linear(A) == M.Linear(A.clone())
    assert M.Linear(A) != M.Linear(A + 1)
    assert M.Identity(2) == M.Identity(2) and M.Identity(2) != M.Identity(3)
    assert M.ReLU(2) == M.ReLU(2) and M.LeakyReLU(2, 0.1) != M.LeakyReLU(2, 0.2)
    assert M.Compose(M.ReLU(2), A) == M.Compose(M.ReLU(2), A.clone())
    assert M.Linear(A) != M.Select([0, 1], 3)
    assert M.Diagonal(torch.tensor(2.0), shape=(2,)) == M.Diagonal([2.0, 2.0]) != M.Diagonal([2.0, 1.0])


def test_trainable_and_mask():
    W = rand(2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    F = M.Linear(W, trainable=True, mask=mask)
    assert F.trainable and torch.equal(F.mask, mask) and F.tensors()[0] is W
    G = F.to(torch.float32)
    assert G.trainable and G.mask.dtype == torch.float32


@pytest.mark.parametrize("make, error, match", [
    (lambda: M.Linear(torch.ones(3)), ValueError, "2-d matrix"),
    (lambda: M.Linear(torch.ones(2, 2), mask=torch.ones(3, 2)), ValueError, "mask shape"),
    (lambda: M.Linear(torch.ones(2, 2).to_sparse(), trainable=True), TypeError, "sparse"),
    (lambda: M.Linear("abc"), TypeError, "cannot use str"),
    (lambda: M.Select([0, 3], 3), IndexError, r"\[0, 3\)"),
    (lambda: M.Select([[0]], 3), ValueError, "1-d"),
    (lambda: M.HStack([torch.ones(2, 2), torch.ones(3, 2)]), ValueError, "share d_out"),
    (lambda: M.VStack([torch.ones(2, 2), torch.ones(2, 3)]), ValueError, "share d_in"),
    (lambda: M.HStack([]), ValueError, "at least one"),
    (lambda: M.Compose(torch.ones(2, 3), torch.ones(2, 2)), ValueError, "inner d_out=2 != outer d_in=3"),
    (lambda: M.ReLU(2).linearize(torch.ones(3, 2)), ValueError, "one point"),
    (lambda: M.Softmax(2).linearize(None), ValueError, "one point"),
    (lambda: M.Function(lambda x: x[..., :1], 2, 2, name="cut").apply(torch.ones(2)), ValueError, "'cut' returned"),
])
def test_bad_maps(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_as_map():
    F = M.as_map(np.eye(2))
    assert isinstance(F, M.Linear) and F.weight.dtype == F64
    assert M.as_map(F) is F
    Fs = M.as_map(sp.eye(3, format="csr"))
    assert Fs.sparse and torch.equal(Fs.matrix(), torch.eye(3, dtype=F64))
