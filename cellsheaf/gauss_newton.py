"""Gauss–Newton / active-set Newton minimisation of the sheaf energy.

The energy ``E(x) = Σ_e w_e U_e(F_v(x_v), F_u(x_u))`` is a sum of potentials of
stacked edge discrepancies. Its Gauss–Newton model at ``x`` keeps the curvature
of the potentials and drops the second derivatives of the maps:
``H = J_δ(x)ᵀ W ∇²U J_δ(x)``. For ReLU-type maps (piecewise linear) this is the
exact Hessian of the region of ``x``: one Newton step with the activation
pattern frozen solves the quadratic problem of that pattern (the restricted
Laplacian ``L[Ω,Ω]`` of the frozen sheaf, Eq. 33/36 of the paper).

Each step solves ``(H + μ D) p = −∇_Ω E`` on the free coordinates by batched,
matrix-free, Jacobi-preconditioned CG (every item of a batch has its own
pattern, no Python loop over items), then backtracks on the energy (Armijo).
The damping ``μ`` (Levenberg–Marquardt, relative to the Jacobi diagonal ``D``)
shrinks after full steps and grows after short ones, which keeps singular
models (Huber beyond its threshold, kinks of L1) well posed. Every step
decreases the energy, so activation patterns cannot cycle; a run that stops
making progress while the gradient is not small (an equilibrium on a switching
surface, Note 5.1, or the kink of a non-smooth potential) is reported as not
converged, with the reason.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("y", 1)
>>> _ = S.add_edge("x", "y", cs.maps.Tanh(1), torch.eye(1, dtype=torch.float64))
>>> b = cs.Boundary().fix("x", torch.tensor([0.5], dtype=torch.float64))
>>> res = cs.minimize(S, b, method="newton")
>>> res.converged, torch.allclose(res.x["y"], torch.tanh(torch.tensor([0.5], dtype=torch.float64)))
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .energy import _layout, edge_energies, forces
from .linalg import cg
from .maps import Elementwise
from .operators import _plan, apply_coboundary_jvp, edge_weights, expressed, pullback

__all__ = ["GaussNewton", "newton"]


class GaussNewton:
    """The Gauss–Newton model of the energy at a batch of points ``x`` (``(B, C0)``).

    ``matvec(v)`` applies ``H(x) = J_δ(x)ᵀ W ∇²U J_δ(x)`` to ``v`` (``(B, C0)``, one
    direction per item) and ``diagonal()`` returns its diagonal (``(B, C0)``),
    both batched: each item uses the Jacobians (activation pattern) at its own point.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), cs.maps.ReLU(1))
    >>> H = cs.gauss_newton.GaussNewton(S, torch.tensor([[0.0, 2.0], [0.0, -2.0]]))
    >>> H.diagonal()
    tensor([[1., 1.],
            [1., 0.]])
    """

    def __init__(self, S, x: Tensor):
        self.S, self.x = S, x
        self.av, self.au = expressed(S, x)
        _, self.quad, self.special = _layout(S)
        self.w = edge_weights(S, x.dtype, x.device)

    def _curvature(self, dr: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Forces ``(h_v, h_u)`` of the curvature model along ``v`` (``dr = J_δ v``)."""
        h = self.w * dr
        if not self.special:
            return h, -h
        hv, hu = h.clone(), -h
        S, x = self.S, self.x
        for _, e, sl in self.special:
            av, au = self.av[..., sl], self.au[..., sl]
            if e.potential.difference:
                ev = e.potential.curvature(av - au, dr[..., sl])
                eu = -ev
            else:
                su, sv = S.vertex_slice(e.u), S.vertex_slice(e.v)
                ev, eu = e.potential.pair_curvature(av, au, e.Fv.jvp(x[..., sv], v[..., sv]),
                                                    e.Fu.jvp(x[..., su], v[..., su]))
            hv[..., sl], hu[..., sl] = e.weight * ev, e.weight * eu
        return hv, hu

    def matvec(self, v: Tensor) -> Tensor:
        """``H(x) v`` for ``v`` of shape ``(B, C0)``."""
        hv, hu = self._curvature(apply_coboundary_jvp(self.S, self.x, v), v)
        return pullback(self.S, hv, hu, at=self.x)

    def _edge_curvature_diagonal(self) -> Tensor:
        """Diagonal of ``W ∇²U`` on the 1-cochain, ``(B, C1)`` (1 per unit weight for non-separable potentials)."""
        D = self.w.expand_as(self.av).clone()
        for _, e, sl in self.special:
            if e.potential.difference and e.potential.separable:
                r = self.av[..., sl] - self.au[..., sl]
                D[..., sl] = e.weight * e.potential.curvature(r, torch.ones_like(r))
        return D

    def diagonal(self) -> Tensor:
        """The diagonal of ``H(x)``, ``(B, C0)``: the Jacobi preconditioner of Newton steps."""
        S, x = self.S, self.x
        D = self._edge_curvature_diagonal()
        plan, B = _plan(S), x.shape[0]
        out = x.new_zeros(B, S.C0)
        for g in plan.groups:
            Mu, Mv = g.matrices(x.dtype, x.device)
            De = D[:, g.eidx]  # (B, G, d_e)
            out.index_add_(1, g.uidx.flatten(), torch.einsum("bgk,gki->bgi", De, Mu * Mu).reshape(B, -1))
            out.index_add_(1, g.vidx.flatten(), torch.einsum("bgk,gki->bgi", De, Mv * Mv).reshape(B, -1))
        for e, su, sv, se in plan.singles:
            for F, sl in ((e.Fu, su), (e.Fv, sv)):
                out[:, sl] += _squared_jacobian_pullback(F, x[:, sl], D[:, se])
        return out


def _squared_jacobian_pullback(F, x: Tensor, d: Tensor) -> Tensor:
    """``Σ_k d_k J_F(x)[k, i]²`` for each input coordinate ``i``, batched over rows of ``x``."""
    if F.linear:
        M = F.matrix().to(dtype=x.dtype, device=x.device)
        return d @ (M * M)
    if isinstance(F, Elementwise):
        return d * F.derivative(x) ** 2
    J = F.jacobian(x)
    return torch.einsum("bk,bki->bi", d, J * J)


@dataclass
class NewtonOptions:
    """Tuning of :func:`newton` (defaults suit most sheaves)."""

    armijo: float = 1e-4        # sufficient-decrease constant c₁
    max_backtracks: int = 40    # halvings of the step before a line search fails
    damping: float = 1e-10      # initial μ relative to the Jacobi diagonal
    max_damping: float = 1e8
    stall_iterations: int = 8   # iterations without energy decrease before giving up
    cg_maxiter: int | None = None


def _free_gradient(S, x: Tensor, free: Tensor) -> tuple[Tensor, Tensor]:
    """``(energy (B,), ∇_Ω E (B, n_free))`` sharing one evaluation of the discrepancies."""
    gv, gu = forces(S, x)
    return edge_energies(S, x).sum(-1), pullback(S, gv, gu, at=x)[:, free]


def newton(S, x: Tensor, free: Tensor, tol: float, max_iter: int = 100,
           options: NewtonOptions | None = None, record: bool | int = False) -> tuple[Tensor, dict]:
    """Minimise the energy over the coordinates ``free`` of ``x`` (``(B, C0)``; the others stay fixed).

    Returns the final point and a report: ``converged`` (bool per item),
    ``iterations``, ``energy`` and ``grad_norm`` per item, ``cg_iterations``
    (total), ``stalled`` (bool per item) and, with ``record``, the ``trajectory``
    ``{"step": (K,), "edge_energy": (K, B, E)}`` every ``record`` iterations. Use
    :func:`cellsheaf.minimize` for the public interface.
    """
    every = int(record)
    trace_steps, trace = [], []
    opt = options or NewtonOptions()
    B, n = x.shape[0], free.numel()
    x = x.clone()
    E, g = _free_gradient(S, x, free)
    gnorm = g.norm(dim=-1)
    mu = torch.full((B,), opt.damping, dtype=x.dtype, device=x.device)
    stalled = torch.zeros(B, dtype=torch.bool, device=x.device)
    best, best_g = E.clone(), gnorm.clone()
    since_best = torch.zeros(B, dtype=torch.long, device=x.device)
    it, cg_its = 0, 0
    while True:
        if every and it % every == 0:
            trace_steps.append(it)
            trace.append(edge_energies(S, x).detach())
        act = torch.nonzero((gnorm > tol) & ~stalled).flatten()
        if it >= max_iter or act.numel() == 0:
            break
        it += 1
        xa, ga, Ea, mua = x[act], g[act], E[act], mu[act]
        model = GaussNewton(S, xa)
        diag = model.diagonal()[:, free]
        scale = diag.mean(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        damp = mua.unsqueeze(-1) * (diag + scale)
        precond_diag = diag + damp

        def apply(p: Tensor) -> Tensor:
            full = xa.new_zeros(xa.shape)
            full[:, free] = p
            return model.matvec(full)[:, free] + damp * p

        eta = float(torch.clamp(ga.norm(dim=-1), max=0.1).min().clamp_min(1e-14))
        p, info = cg(apply, -ga, precond=lambda r: r / precond_diag, tol=eta,
                     maxiter=opt.cg_maxiter or max(2 * n, 50))
        cg_its += info.iterations
        bad = ~((ga * p).sum(-1) < 0) | ~torch.isfinite(p).all(-1)
        p[bad] = -ga[bad] / precond_diag[bad]  # not a descent direction: use the scaled gradient
        t, accepted, x_new, E_new = _armijo(S, xa, p, free, Ea, ga, opt)
        short = torch.nonzero(~accepted | (t < 0.25)).flatten()
        if short.numel():  # a kink or a poor model cut the Newton step: try steepest descent as well
            q = -ga[short] / precond_diag[short]
            _, acc_q, x_q, E_q = _armijo(S, xa[short], q, free, Ea[short], ga[short], opt)
            better = acc_q & (E_q < E_new[short])
            pick = short[better]
            x_new[pick], E_new[pick], accepted[pick] = x_q[better], E_q[better], True
        mua = torch.where(accepted & (t == 1.0), mua / 10, mua * 10).clamp(opt.damping * 1e-4, opt.max_damping)
        x[act] = x_new
        E_act, g_act = _free_gradient(S, x_new, free)
        gn_act = g_act.norm(dim=-1)
        E[act], g[act], mu[act] = E_act, g_act, mua
        improved = (E_act < best[act] - _noise(best[act])) | (gn_act < 0.5 * best_g[act])
        best[act], best_g[act] = torch.minimum(best[act], E_act), torch.minimum(best_g[act], gn_act)
        since_best[act] = torch.where(improved, 0, since_best[act] + 1)
        stalled[act] = (since_best[act] >= opt.stall_iterations) | (~accepted & (mua >= opt.max_damping))
        gnorm = g.norm(dim=-1)
    converged = gnorm <= tol
    report = {"converged": converged, "iterations": it, "energy": E, "grad_norm": gnorm,
              "cg_iterations": cg_its, "stalled": stalled & ~converged}
    if every:
        report["trajectory"] = {"step": torch.tensor(trace_steps), "edge_energy": torch.stack(trace)}
    return x, report


def _noise(E: Tensor) -> Tensor:
    """The rounding level of energy values ``E``: decreases below it are invisible."""
    return 16 * torch.finfo(E.dtype).eps * E.abs()


def _armijo(S, x: Tensor, p: Tensor, free: Tensor, E0: Tensor, g: Tensor, opt: NewtonOptions):
    """Batched backtracking ``t ∈ {1, ½, ¼, ...}`` until ``E(x + t p) <= E0 + c₁ t ∇E·p`` per item
    (up to the rounding level of ``E``, so that steps near the minimum whose decrease is invisible
    in floating point are still taken)."""
    B = x.shape[0]
    slope = (g * p).sum(-1)
    t = torch.ones(B, dtype=x.dtype, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    x_out, E_out = x.clone(), E0.clone()
    for _ in range(opt.max_backtracks):
        todo = torch.nonzero(~done).flatten()
        if todo.numel() == 0:
            break
        trial = x[todo].clone()
        trial[:, free] += t[todo].unsqueeze(-1) * p[todo]
        try:
            Et = edge_energies(S, trial).sum(-1)
        except (ValueError, FloatingPointError):  # a trial point outside a potential's domain: shorten
            Et = torch.full_like(E0[todo], float("inf"))
        ok = Et <= E0[todo] + opt.armijo * t[todo] * slope[todo] + _noise(E0[todo])
        idx = todo[ok]
        x_out[idx], E_out[idx], done[idx] = trial[ok], Et[ok], True
        t[todo[~ok]] /= 2
    return t, done, x_out, E_out
