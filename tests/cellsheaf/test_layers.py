"""Sheaf neural network layers: map parametrisations, the map learner, the diffusion layer."""

import numpy as np
import pytest
import torch

import cellsheaf as cs
from cellsheaf import layers
from cellsheaf import orthogonal as O

F64 = torch.float64


@pytest.mark.parametrize("method", O.METHODS)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_orthogonal_parametrisations_are_orthogonal_to_1e_12(d, method):
    torch.manual_seed(0)
    eye = torch.eye(d, dtype=F64)
    P = layers.OrthogonalMaps(d, method)
    Q = P(torch.randn(50, P.num_parameters, dtype=F64) * 3)
    assert Q.shape == (50, d, d) and (Q.transpose(1, 2) @ Q - eye).abs().max() < 1e-12
    S = layers.ScaledOrthogonalMaps(d, method)
    p = torch.randn(50, S.num_parameters, dtype=F64)
    M = S(p)
    assert S.num_parameters == P.num_parameters + 1
    gram = M.transpose(1, 2) @ M
    assert (gram - p[:, 0, None, None] ** 2 * eye).abs().max() < 1e-12
    torch.testing.assert_close(M, p[:, :1, None] * O.orthogonal(p[:, 1:], d, method))


def test_general_and_diagonal_parametrisations():
    G = layers.GeneralMaps(3, d_e=2)
    p = torch.arange(12.0).view(2, 6)
    assert G.num_parameters == 6 and torch.equal(G(p), p.view(2, 2, 3))
    D = layers.DiagonalMaps(3)
    assert D.diagonal and not G.diagonal and D.num_parameters == 3
    assert torch.equal(D(p[:, :3]), p[:, :3])


def test_parametrisations_refuse_wrong_shapes():
    with pytest.raises(ValueError, match="takes 9 parameters per map"):
        layers.GeneralMaps(3)(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="method must be one of"):
        layers.OrthogonalMaps(3, "qr")
    with pytest.raises(ValueError, match="d must be a positive integer"):
        layers.DiagonalMaps(0)


# ---------------------------------------------------------------------------- the map learner and the layer

MAPS = ["general", "diagonal", "orthogonal", "scaled_orthogonal"]


def small_graph():
    """6 vertices, 9 edges, a self-loop-free multigraph with a parallel edge and an isolated vertex."""
    return torch.tensor([[0, 1, 2, 3, 0, 2, 4, 1, 1], [1, 2, 3, 0, 2, 4, 0, 2, 3]])


def dense_maps(F: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(F) if F.dim() == 2 else F


def reference_layer(layer, x, edge_index):
    """The layer from dense matrices: δ edge by edge, L = δᵀδ, (D + I)^{-1/2} (or the pseudo-inverse root
    D^{+1/2}, or I) by eigh of each vertex block."""
    N, d, c = x.shape
    Fu, Fv = (dense_maps(F).detach().numpy() for F in layer.learner(x.reshape(N, -1), edge_index))
    E = edge_index.shape[1]
    delta = np.zeros((E * d, N * d))
    for k, (u, v) in enumerate(edge_index.T.tolist()):
        delta[k * d:(k + 1) * d, u * d:(u + 1) * d] -= Fu[k]
        delta[k * d:(k + 1) * d, v * d:(v + 1) * d] += Fv[k]
    L = delta.T @ delta
    R = np.eye(N * d)
    for v in range(N if layer.normalized else 0):
        sl = slice(v * d, (v + 1) * d)
        w, Q = np.linalg.eigh(L[sl, sl] + (np.eye(d) if layer.normalized == "augmented" else 0))
        root = np.where(w > 1e-12, 1 / np.sqrt(np.where(w > 1e-12, w, 1.0)), 0.0)
        R[sl, sl] = (Q * root) @ Q.T
    W1, W2 = layer.W1.detach().numpy(), layer.W2.detach().numpy()
    y = np.einsum("ij,njc->nic", W1, x.detach().numpy()) @ W2
    z = (R @ L @ R @ y.reshape(N * d, c)).reshape(N, d, c)
    return x.detach().numpy() - np.where(z > 0, z, np.expm1(np.minimum(z, 0)))


def make_layer(maps, d=2, c=3, hidden=None, seed=0, normalized="augmented"):
    torch.manual_seed(seed)
    layer = layers.SheafDiffusion(d, c, maps=maps, hidden=hidden, normalized=normalized).double()
    with torch.no_grad():
        layer.W1.add_(0.3 * torch.randn(d, d, dtype=F64))
        layer.W2.add_(0.3 * torch.randn(c, c, dtype=F64))
        for p in layer.learner.parameters():
            p.mul_(3.0)  # maps away from zero
    return layer


@pytest.mark.parametrize("maps", MAPS)
def test_layer_matches_the_dense_reference(maps):
    layer = make_layer(maps)
    x = torch.randn(6, 2, 3, dtype=F64)
    ei = small_graph()
    out = layer(x, ei)
    np.testing.assert_allclose(out.detach().numpy(), reference_layer(layer, x, ei), atol=1e-12)
    # the second call reuses the sheaf (update_maps) and still matches
    S = layer.sheaf
    x2 = torch.randn(6, 2, 3, dtype=F64)
    np.testing.assert_allclose(layer(x2, ei).detach().numpy(), reference_layer(layer, x2, ei), atol=1e-12)
    assert layer.sheaf is S
    # and a sheaf passed in gives the same
    T = cs.Sheaf.from_arrays([2] * 6, ei, *layer.learner(x2.reshape(6, -1), ei))
    torch.testing.assert_close(layer(x2, T), layer(x2, ei))


@pytest.mark.parametrize("maps", MAPS)
def test_layer_gradients_match_finite_differences(maps):
    layer = make_layer(maps, hidden=4 if maps == "general" else None)
    ei = small_graph()
    x = torch.randn(6, 2, 3, dtype=F64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, ei))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_map_learner_predicts_from_both_endpoints_in_order():
    torch.manual_seed(1)
    learner = layers.MapLearner(4, layers.GeneralMaps(2), hidden=5).double()
    x = torch.randn(3, 4, dtype=F64)
    ei = torch.tensor([[0, 2], [1, 0]])
    Fu, Fv = learner(x, ei)
    phi = lambda a, b: torch.tanh(learner.rest(learner.first(torch.cat([a, b])))).view(2, 2)  # noqa: E731
    for k, (u, v) in enumerate(ei.T.tolist()):
        torch.testing.assert_close(Fu[k], phi(x[u], x[v]))
        torch.testing.assert_close(Fv[k], phi(x[v], x[u]))


@pytest.mark.parametrize("maps", ["general", "orthogonal"])
@pytest.mark.parametrize("normalized", [False, True])
def test_layer_with_the_plain_and_the_normalised_laplacian(normalized, maps):
    layer = make_layer(maps, normalized=normalized)
    x = torch.randn(6, 2, 3, dtype=F64)
    np.testing.assert_allclose(layer(x, small_graph()).detach().numpy(), reference_layer(layer, x, small_graph()),
                               atol=1e-12)


@pytest.mark.parametrize("normalized", ["augmented", True])
def test_orthogonal_layer_with_self_loops_and_weights(normalized):
    # orthogonal maps normalise by scalar degrees, except with a self-loop (then the degree block is not deg·I)
    layer = make_layer("orthogonal", normalized=normalized)
    x = torch.randn(6, 2, 3, dtype=F64)
    loops = torch.cat([small_graph(), torch.tensor([[4], [4]])], 1)
    np.testing.assert_allclose(layer(x, loops).detach().numpy(), reference_layer(layer, x, loops), atol=1e-12)
    # weights of a sheaf passed in scale the degrees
    ei = small_graph()
    w = torch.linspace(0.5, 2.0, ei.shape[1], dtype=F64)
    S = cs.Sheaf.from_arrays([2] * 6, ei, *layer.learner(x.reshape(6, -1), ei), weights=w)
    R = cs.operators.apply_laplacian(S, (layer.W1 @ x @ layer.W2).reshape(12, 3).T, normalized=normalized)
    expected = x - torch.nn.functional.elu(R.T.reshape(6, 2, 3))
    torch.testing.assert_close(layer(x, S), expected)


def test_layer_rebuilds_the_sheaf_for_another_graph():
    layer = make_layer("orthogonal")
    x = torch.randn(6, 2, 3, dtype=F64)
    layer(x, small_graph())
    S = layer.sheaf
    other = torch.tensor([[0, 1], [5, 4]])
    np.testing.assert_allclose(layer(x, other).detach().numpy(), reference_layer(layer, x, other), atol=1e-12)
    assert layer.sheaf is not S and layer.sheaf.num_edges == 2


def test_layer_refuses_bad_inputs():
    layer = layers.SheafDiffusion(2, 3)
    with pytest.raises(ValueError, match=r"\(N, 2, 3\)"):
        layer(torch.randn(6, 3, 2), small_graph())
    with pytest.raises(ValueError, match=r"shape \(2, E\)"):
        layer(torch.randn(6, 2, 3), small_graph().T)
    with pytest.raises(ValueError, match="maps must be"):
        layers.SheafDiffusion(2, 3, maps="rotation")
    with pytest.raises(ValueError, match="normalized must be"):
        layers.SheafDiffusion(2, 3, normalized="sym")
    with pytest.raises(ValueError, match="this layer needs 3x3"):
        layers.SheafDiffusion(3, 3, maps=layers.GeneralMaps(2))
