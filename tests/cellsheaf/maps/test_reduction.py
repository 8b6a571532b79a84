"""`cellsheaf.maps.Reduce`: sums and means over axes against torch."""

import pytest
import torch

from cellsheaf import maps as M

from .checks import F64, check_linear
from .specs import check_round_trip


@pytest.mark.parametrize("shape,dims,mean", [((2, 3), 1, True), ((2, 3, 4), (0, 2), False),
                                             ((3, 2, 2), (-1, -2), True), ((4,), 0, True)])
def test_reduce_matches_torch(shape, dims, mean):
    R = M.Reduce(shape, dims, mean)
    x = torch.randn(3, *shape, dtype=F64)
    dd = tuple(d % len(shape) + 1 for d in ((dims,) if isinstance(dims, int) else dims))
    want = x.mean(dd) if mean else x.sum(dd)
    assert torch.allclose(R.apply(x.reshape(3, -1)), want.reshape(3, -1), atol=1e-14)
    check_linear(R)
    check_linear(R, dtype=torch.float32, tol=1e-5)
    d = torch.rand(2, R.d_out, dtype=F64)
    assert torch.allclose(R.squared_vjp(None, d), d @ R.matrix() ** 2, atol=1e-14)
    check_round_trip(R)


def test_reduce_errors():
    with pytest.raises(ValueError, match="axes of the shape"):
        M.Reduce((2, 3), 2)
