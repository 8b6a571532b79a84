"""Checks shared by the map tests: every map against an independent dense computation."""

import numpy as np
import torch

F64 = torch.float64


def dense_jacobian(F, x: torch.Tensor) -> torch.Tensor:
    """``(d_out, d_in)`` Jacobian of ``F.apply`` at one point by torch.autograd.functional."""
    return torch.autograd.functional.jacobian(F.apply, x)


@torch.no_grad()
def check_linear(F, batch: int = 3, dtype=F64, tol: float = 1e-12):
    """apply/adjoint/coo/matrix of a linear map agree with each other and with autograd, batched."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, F.d_in, generator=g, dtype=F64).to(dtype)
    y = torch.randn(batch, F.d_out, generator=g, dtype=F64).to(dtype)
    M = F.matrix().detach().to(F64)
    assert M.shape == (F.d_out, F.d_in)
    fx, aty = F.apply(x), F.adjoint(y)
    assert fx.shape == (batch, F.d_out) and aty.shape == (batch, F.d_in)
    assert fx.dtype == dtype and aty.dtype == dtype
    scale = 1 + float(M.abs().max())
    assert torch.allclose(fx.to(F64), x.to(F64) @ M.T, atol=tol * scale, rtol=0)
    assert torch.allclose(aty.to(F64), y.to(F64) @ M, atol=tol * scale, rtol=0)
    assert torch.allclose(F.apply(x[0]).to(F64), fx[0].to(F64), atol=tol * scale, rtol=0)  # unbatched
    r, c, v = F.coo()
    C = np.zeros((F.d_out, F.d_in))
    np.add.at(C, (r, c), v)
    np.testing.assert_allclose(C, M.numpy(), atol=tol * scale, rtol=0)
    J = dense_jacobian(F, x[0].to(F64).detach()) if dtype == F64 else M
    assert torch.allclose(J, M, atol=tol * scale, rtol=0)


def check_nonlinear(F, x: torch.Tensor, tol: float = 1e-10):
    """jvp/vjp/jacobian of a nonlinear map at each row of ``x`` (B, d_in) against autograd."""
    g = torch.Generator().manual_seed(2)
    v = torch.randn(x.shape, generator=g, dtype=F64).to(x.dtype)
    w = torch.randn(x.shape[0], F.d_out, generator=g, dtype=F64).to(x.dtype)
    Jv, Jtw, Jb = F.jvp(x, v), F.vjp(x, w), F.jacobian(x)
    for k in range(x.shape[0]):
        J = dense_jacobian(F, x[k].detach())
        scale = 1 + float(J.abs().max())
        assert torch.allclose(Jv[k], J @ v[k], atol=tol * scale, rtol=0)
        assert torch.allclose(Jtw[k], J.T @ w[k], atol=tol * scale, rtol=0)
        assert torch.allclose(Jb[k], J, atol=tol * scale, rtol=0)
