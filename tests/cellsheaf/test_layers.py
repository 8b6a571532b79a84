"""Sheaf neural network layers: map parametrisations, the map learner, the diffusion layer."""

import pytest
import torch

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
