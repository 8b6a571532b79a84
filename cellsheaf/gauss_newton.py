"""Gauss–Newton / active-set Newton minimisation of the sheaf energy.

The energy ``E(x) = Σ_e w_e U_e(F_v(x_v), F_u(x_u))`` is a sum of potentials of
stacked edge discrepancies. Its Gauss–Newton model at ``x`` keeps the curvature
of the potentials and drops the second derivatives of the maps:
``H = J_δ(x)ᵀ W ∇²U J_δ(x)``. For ReLU-type maps (piecewise linear) this is the
exact Hessian of the region of ``x``: one Newton step with the activation
pattern frozen solves the quadratic problem of that pattern (the restricted
Laplacian ``L[Ω,Ω]`` of the frozen sheaf, Eq. 33/36 of the paper).

Each step solves ``(H + μ D) p = −∇_Ω E`` on the free coordinates by batched,
matrix-free, preconditioned CG (every item of a batch has its own pattern, no
Python loop over items): when the sheaf minus its softest edges is determined
(a network with a soft-pinned output, a weak penalty or loss edge), the
preconditioner solves the determined part exactly by two triangular sweeps along
its propagation order, and CG converges in about rank(rest) + 1 iterations;
otherwise it is the Jacobi diagonal. Each step then backtracks on the energy (Armijo),
keeping a plain or Jacobi-scaled gradient step instead when it lowers the energy
more (kinks, poor models). The damping ``μ`` (Levenberg–Marquardt, relative to
the Jacobi diagonal ``D``) shrinks after full steps and grows after short ones,
which keeps singular models (Huber beyond its threshold, kinks of L1) well posed.
Every step decreases the energy, so activation patterns cannot cycle.

Coordinates that feed a piecewise-smooth elementwise map directly (ReLU, leaky
ReLU, ReLU6, hardtanh, hardswish, ...: every map declaring
`cellsheaf.maps.Elementwise.kinks`) are handled by an active set: one that
zigzags across its kink, or sits on it when progress stops, is held at the kink
while Newton works on the others, and let go when a one-sided derivative says
leaving lowers the energy (at most ``max_releases`` times per item). Stationarity
on a kink is checked with both one-sided derivatives, within a band relative to
the scale of the state (never an exact-zero test): "converged" certifies that no
kink coordinate can lower the energy by leaving its kink to either side (stronger
than Clarke stationarity, which a concave kink passes), so an equilibrium on a
switching surface (Note 5.1) is found and recognised; a run that stops making progress anyway (e.g. at a kink of an L1
potential) is reported as not converged, with the reason.

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

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .energy import _layout, edge_energies, forces
from .linalg import cg
from .maps import Compose, Elementwise
from .operators import _plan, apply_coboundary_jvp, edge_weights, expressed, pullback
from .propagation import PropagationStep, _determined_part
from .syncs import check_every
from .ties import Ties

__all__ = ["GaussNewton", "newton", "determined_solve", "transposed_sweep", "forward_sweep"]


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

    def determined_solve(self, steps: list[PropagationStep], r: Tensor) -> Tensor:
        """``(J_Ωᵀ W J_Ω)⁻¹ r`` for the square, triangular part ``J_Ω`` of ``J_δ(x)`` on the edges of ``steps``.

        ``steps`` is a propagation schedule of quadratic edges that defines every free
        coordinate once ([`cellsheaf.propagation.determined_part`][cellsheaf.propagation.determined_part]); ``r`` (``(B, C0)``)
        must vanish on the fixed coordinates, and so does the result. A transposed
        substitution in reverse order solves ``J_Ωᵀ y = r``, then a forward one solves
        ``J_Ω z = W⁻¹ y``: two sweeps of Jacobian products along the schedule, batched.

        Examples
        --------
        >>> import torch, cellsheaf as cs
        >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
        >>> _ = S.add_edge("a", "b", 2 * torch.eye(1), torch.eye(1), weight=4.0)
        >>> b = cs.Boundary().fix("a", [1.0])
        >>> steps = cs.propagation.determined_part(S, b)
        >>> H = cs.gauss_newton.GaussNewton(S, torch.tensor([[1.0, 2.0]]))
        >>> H.determined_solve(steps, torch.tensor([[0.0, 8.0]]))  # H = 4 on b
        tensor([[0., 2.]])
        """
        return determined_solve(self.S, self.x, steps, r)

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
            idx = g.index(x.device)  # index tensors cached on the device: no copies, no host reads
            De = (D[:, g.ecoords] if isinstance(g.ecoords, slice) else D[:, idx["e"]]).reshape(B, len(g), g.de)
            out.index_add_(1, idx["uflat"], torch.einsum("bgk,gki->bgi", De, Mu * Mu).reshape(B, -1))
            out.index_add_(1, idx["vflat"], torch.einsum("bgk,gki->bgi", De, Mv * Mv).reshape(B, -1))
            if g.loops.numel():  # self-loops: J = M_v − M_u on one stalk
                lp = idx["loops"]
                cross = torch.einsum("bgk,gki->bgi", De[:, lp], (Mu * Mv)[lp])
                out.index_add_(1, idx["uflat"].view(len(g), g.du)[lp].flatten(), -2 * cross.reshape(B, -1))
        for e, su, sv, se in plan.singles:
            if e.u == e.v:
                J = e.Fv.jacobian(x[:, sv]) - e.Fu.jacobian(x[:, su])
                out[:, su] += torch.einsum("bk,bki->bi", D[:, se], J * J)
                continue
            for F, sl in ((e.Fu, su), (e.Fv, sv)):
                out[:, sl] += _squared_jacobian_pullback(F, x[:, sl], D[:, se])
        return out


def determined_solve(S, x: Tensor, steps: list[PropagationStep], r: Tensor, live=None) -> Tensor:
    """``(J_Ωᵀ W J_Ω)⁻¹ r`` at ``x`` for the determined part ``steps`` (see
    [`GaussNewton.determined_solve`][cellsheaf.gauss_newton.GaussNewton.determined_solve]; ``live`` as in
    [`transposed_sweep`][cellsheaf.gauss_newton.transposed_sweep])."""
    ys = transposed_sweep(x, steps, r, live)
    return forward_sweep(x, steps, [y / S.edge(s.edge).weight for s, y in zip(steps, ys)], live)


def transposed_sweep(x: Tensor, steps: list[PropagationStep], r: Tensor, live=None,
                     overwrite: bool = False) -> list[Tensor]:
    """Solve ``J_Ωᵀ y = r`` for the determined part ``steps`` at ``x``: ``y`` per step (edge space), in step order.

    ``r`` is ``(B, C0)``, or ``(k·B, C0)`` for ``k`` right-hand sides per item (item-major blocks
    of ``B`` rows; the maps' Jacobians are those at ``x``); it must vanish on the fixed
    coordinates, and with ``overwrite=True`` it is used as the work space. ``live`` (one bool per
    step, e.g. [`PropagationPlan.reads_free`][cellsheaf.propagation.PropagationPlan]) says which steps' sources hold
    free coordinates; the others skip their adjoint (it would only reach fixed coordinates) and,
    in `forward_sweep`, their Jacobian product (zero there). A step whose map reads fixed columns through a
    part of its own (`PropagationStep.reduced`: an affine map's ones block) takes the product of its free part
    alone.
    """
    k = r.shape[0] // max(x.shape[0], 1)
    acc, ys = (r if overwrite else r.clone()), []
    for i in range(len(steps) - 1, -1, -1):  # each edge's row meets its targets last
        s = steps[i]
        y = acc[:, _where(s, x)]
        y = y / s.scale.to(dtype=x.dtype, device=x.device) if s.scale is not None else y
        y = -y if s.side == "u" else y
        if live is None or live[i]:
            F, src = (s.F, s.source) if s.reduced is None else s.reduced
            acc[:, src].add_(F.vjp(_tiled(F, x[:, src], k), y), alpha=1 if s.side == "v" else -1)
        ys.append(y)
    return ys[::-1]


def _tiled(F, xs: Tensor, k: int) -> Tensor:
    """The linearisation point ``xs`` for ``k`` right-hand sides per item (a linear map's Jacobian ignores it)."""
    return xs if k == 1 or F.linear else xs.repeat(k, 1)


def forward_sweep(x: Tensor, steps: list[PropagationStep], q: list[Tensor], live=None,
                  out: Tensor | None = None) -> Tensor:
    """Solve ``J_Ω z = q`` (``q`` per step, edge space) by forward substitution along ``steps`` at ``x``;
    ``z`` vanishes on the fixed coordinates. ``live`` as in `transposed_sweep`; ``out``: a tensor of ``z``'s
    shape to write ``z`` into (a reused buffer), default a new one."""
    rows = q[0].shape[0] if q else x.shape[0]
    k = rows // max(x.shape[0], 1)
    z = x.new_zeros(rows, x.shape[1]) if out is None else out.zero_()
    for i, (s, y) in enumerate(zip(steps, q)):
        jvp = None
        if live is None or live[i]:
            F, src = (s.F, s.source) if s.reduced is None else s.reduced
            jvp = F.jvp(_tiled(F, x[:, src], k), z[:, src])
        if s.scale is None and s.span is not None:  # written into z's columns directly
            target = z[:, s.span]
            if jvp is None:
                target.copy_(y) if s.side == "v" else torch.neg(y, out=target)
            else:
                torch.add(jvp, y, alpha=1 if s.side == "v" else -1, out=target)
            continue
        t = y if s.side == "v" else -y
        t = t if jvp is None else t + jvp
        z[:, _where(s, x)] = t / s.scale.to(dtype=x.dtype, device=x.device) if s.scale is not None else t
    return z


def _where(s, x: Tensor):
    """The target columns of propagation step ``s`` (a slice when consecutive) on ``x``'s device."""
    return s.span if s.span is not None else s.targets.to(x.device)


def _squared_jacobian_pullback(F, x: Tensor, d: Tensor) -> Tensor:
    """``Σ_k d_k J_F(x)[k, i]²`` for each input coordinate ``i``, batched over rows of ``x``."""
    return F.squared_vjp(x, d)


@dataclass
class NewtonOptions:
    """Tuning of [`newton`][cellsheaf.gauss_newton.newton] (defaults suit most sheaves)."""

    armijo: float = 1e-4        # sufficient-decrease constant c₁
    max_backtracks: int = 40    # halvings of the step before a line search fails
    damping: float = 1e-10      # initial μ relative to the Jacobi diagonal
    max_damping: float = 1e8
    stall_iterations: int = 8   # iterations without progress before giving up
    max_releases: int = 10      # times an item may free coordinates held on kinks (guards against cycling)
    cg_maxiter: int | None = None
    # "auto": precondition CG with the inverse of the determined part of the model when the sheaf has one and
    # the rest is softer (cellsheaf.propagation.determined_part: e.g. a network with a soft-pinned output);
    # otherwise, or with "jacobi", the Jacobi diagonal
    preconditioner: str = "auto"
    # start with the ReLU-kink coordinates that sit exactly at 0 held there: for a warm start from an earlier
    # equilibrium on switching surfaces (Note 5.1), which would otherwise have to find its kinks again
    hold_kinks_at_start: bool = False

    def __post_init__(self):
        if self.preconditioner not in ("auto", "jacobi"):
            raise ValueError(f"NewtonOptions.preconditioner must be 'auto' or 'jacobi', got {self.preconditioner!r}")


def _free_gradient(S, x: Tensor, free: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
    """``(energy (B,), ∇_Ω E (B, n_free))`` sharing one evaluation of the discrepancies.

    ``check=False`` leaves non-finite values in place (no host read): `newton` folds the test
    into its one read per iteration and calls this again with the checks to raise the error."""
    gv, gu = forces(S, x, check)
    return edge_energies(S, x, check).sum(-1), pullback(S, gv, gu, at=x)[:, free]


def _finite(E: Tensor, g: Tensor) -> Tensor:
    """Per item: energy and gradient finite (``(B,)``, on the device)."""
    return torch.isfinite(E) & torch.isfinite(g).all(-1)


def _kink_points(S, free: Tensor) -> Tensor:
    """Where the free coordinates that feed a piecewise-smooth elementwise map directly have kinks.

    ``(n_free, K)`` float64, NaN-padded (a row of NaN: no kink). Maps declare their kinks in
    `cellsheaf.maps.Elementwise.kinks` (ReLU: 0; ReLU6: 0 and 6; hardtanh: its bounds); through
    ``φ ∘ P`` with a scaled selection ``P`` a kink ``c`` of ``φ`` sits at ``c / s`` on the selected coordinate.
    """
    from .propagation import _scaled_selection

    key = ("kinks", free.cpu().numpy().tobytes())
    if key not in S._cache:
        idx, pts = [np.zeros(0, dtype=np.int64)], [np.zeros(0)]
        for e in S.edge_items():
            for F, w in ((e.Fu, e.u), (e.Fv, e.v)):
                if isinstance(F, Elementwise) and F.kinks:
                    cols, scales, ks = np.arange(F.d_in), np.ones(F.d_in), F.kinks
                elif isinstance(F, Compose) and isinstance(F.outer, Elementwise) and F.outer.kinks:
                    sel = _scaled_selection(F.inner)
                    if sel is None:
                        continue
                    (cols, scales), ks = sel, F.outer.kinks
                else:
                    continue
                idx.append(np.repeat(S.vertex_slice(w).start + np.asarray(cols), len(ks)))
                pts.append((np.asarray(ks)[None, :] / np.asarray(scales)[:, None]).reshape(-1))
        pairs = np.unique(np.stack([np.concatenate(idx), np.concatenate(pts)], 1), axis=0)  # by coordinate, point
        rows = pairs[:, 0].astype(np.int64)
        col = np.arange(len(rows)) - np.searchsorted(rows, rows)  # rank of each point among its coordinate's
        table = torch.full((S.C0, int(col.max(initial=-1)) + 1), float("nan"), dtype=torch.float64)
        table[torch.as_tensor(rows), torch.as_tensor(col)] = torch.as_tensor(pairs[:, 1])
        S._cache[key] = table[free.cpu()]
    return S._cache[key].to(free.device)


def _nearest_kink(xf: Tensor, points: Tensor) -> Tensor:
    """The kink nearest each free coordinate value ``xf`` (``(B, n)``); 0 where a coordinate has none."""
    k = points.to(xf.dtype)
    if k.shape[1] <= 1:
        return (k[:, 0] if k.shape[1] else k.new_zeros(k.shape[0])).nan_to_num(0.0).expand_as(xf)
    dist = (xf.unsqueeze(-1) - k).abs().nan_to_num(float("inf"))
    return k.nan_to_num(0.0).expand(*xf.shape, k.shape[1]).gather(-1, dist.argmin(-1, keepdim=True)).squeeze(-1)


def _hold_switching(ties: Ties, before: Tensor, after: Tensor, tied: Tensor, flips: Tensor, allowed: Tensor):
    """Hold the ties of the windows whose selection switched on two steps running (a zigzag across ``x_i = x_j``).

    ``before``/``after``: the free coordinates around the step (``(B, n)``); ``tied``/``flips``: the tie state
    and the windows' switch counts (``(B, W)``); ``allowed`` (``(B,)``): items that may still hold. Returns
    ``(tied, flips, newly)``, ``newly`` the windows that began to hold a tie (``(B, W)``).
    """
    if ties.empty:
        return tied, flips, flips.bool()
    s0, s1 = ties.selection(before), ties.selection(after)
    flips = torch.where(s0 != s1, flips + 1, torch.zeros_like(flips))
    newly = (flips >= 2) & allowed.unsqueeze(-1)
    K = tied.shape[-1]
    pair = torch.nn.functional.one_hot(s0, K).bool() | torch.nn.functional.one_hot(s1, K).bool()
    return tied | (newly.unsqueeze(-1) & pair), flips, newly


def _below(c: Tensor) -> Tensor:
    """The number just left of each kink ``c`` (``-tiny`` for a kink at 0, as the selection rule sees it)."""
    tiny = torch.finfo(c.dtype).tiny
    return torch.where(c == 0, torch.full_like(c, -tiny), torch.nextafter(c, torch.full_like(c, -math.inf)))


def _above(c: Tensor) -> Tensor:
    """The number just right of each ``c`` (``tiny`` for 0), where a max-pool window selects that input alone."""
    return -_below(-c)


def _stationarity(S, x: Tensor, free: Tensor, g: Tensor, held: Tensor, points: Tensor,
                  tol: float, grad=None, ties: Ties | None = None,
                  tied: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Stationarity at the kinks and max-pool ties per item, which coordinates should leave them, and to which side.

    ``g`` is the gradient with the fast selection rule (the right derivative at a
    kink). Every kink coordinate on its kink (the nearest of its map's ``points``) — held
    there, or within `_kink_band` of it (no exact test: a coordinate at −3e-23 is on
    ReLU's kink) — is checked with both
    one-sided derivatives ``g_R`` (at the kink) and ``g_L`` (just left of it): it
    contributes ``g_L`` when ``g_L > 0`` (moving left lowers the energy), ``g_R`` when
    ``g_R < 0`` (moving right does), else 0. The measure is the norm of these and of
    the smooth components, so it vanishes only where no coordinate direction at a kink
    descends (a local minimum along each kink coordinate, not merely a Clarke point:
    at a concave kink both sides descend). With ``ties`` (`cellsheaf.ties.Ties`), every tie of a
    max-pool window — held in ``tied`` (``(B, W, K)``), or exact (a near tie that is not exact is a smooth
    point: its gradient is ``g``) — is checked likewise from the gradients at the tie and with its selected input
    just below it: each member moving alone up or down, and the tie moving together
    (`cellsheaf.ties.Ties.violations`). Returns ``(measure, leave, left)``, ``leave``
    marking on-kink and tied coordinates whose contribution exceeds ``tol / 10`` and ``left``
    those that should leave to the left (below). ``grad`` (``x -> ∇E(x)``, ``(B, C0)``) evaluates the one-sided
    gradients (default: the stacked operators, unchecked: `newton` tests finiteness itself).

    No host reads: when the sheaf has kink coordinates or ties both one-sided gradients are evaluated,
    in one batched call (at a point with no coordinate on a kink or tie they are ``g`` itself and change
    nothing).
    """
    grad = grad or (lambda y: pullback(S, *forces(S, y, check=False), at=y))
    ties = None if ties is None or ties.empty else ties
    if not points.shape[1] and ties is None:  # no kink coordinate and no tie at all
        return g.norm(dim=-1), held, held
    xf = x[:, free]
    c = _nearest_kink(xf, points)
    on = held | (~torch.isnan(points).all(-1) & ((xf - c).abs() <= _kink_band(xf)))
    right, below = _set_free(x.clone(), free, on, c), _set_free(x.clone(), free, on, _below(c))
    if ties is not None:  # the held ties and the exact ones (a tie not held that is not exact is smooth there)
        tie = ties.active(tied) | ties.near(xf, xf.new_zeros(xf.shape[0], 1))
        lead = ties.coordinates(ties.leaders(tie))
        below[:, free] = torch.where(lead, _below(xf), below[:, free])
    g_right, g_left = grad(torch.cat([right, below]))[:, free].split(x.shape[0])  # one evaluation for both
    d = torch.where(g_left > 0, g_left, torch.where(g_right < 0, g_right, torch.zeros_like(g))).masked_fill(~on, 0.0)
    leave, left = on & (d.abs() > 0.1 * tol), g_left > 0
    parts = [g.masked_fill(on, 0.0), d]  # the smooth components and the kinks'
    if ties is not None:
        d_tie, down, along = ties.violations(g_right, g_left, tie)
        members = ties.coordinates(tie)
        parts = [parts[0].masked_fill(members, 0.0), d, d_tie, along]
        leave = leave | (members & (d_tie.abs() > 0.1 * tol))
        left = torch.where(members, down, left)
    return sum(p.square().sum(-1) for p in parts).sqrt(), leave, leave & left


def _direction(S, xa: Tensor, free: Tensor, ga: Tensor, held: Tensor, mu: Tensor, steps, opt: NewtonOptions,
               ties: Ties, tied: Tensor):
    """Damped Gauss–Newton direction on the coordinates not held at kinks, by preconditioned CG.

    The held max-pool ties ``tied`` move together: the model, its damping and the preconditioner are
    projected onto ``x_i = x_j`` (`cellsheaf.ties.Ties.project`; the damping and the Jacobi diagonal
    take the tie's mean), so CG stays on that subspace and the direction keeps every tie exact.

    The preconditioner is the exact inverse ``(J_Ωᵀ W J_Ω)⁻¹`` of the model's determined part ``steps``
    when the sheaf has one and the rest is softer (two triangular sweeps, `GaussNewton.determined_solve`;
    `_preconditioner_steps`): the rest (soft pins, loss and penalty edges) is a low-rank update, so CG needs
    about its rank + 1 iterations. Otherwise (``steps=None``) the damped Jacobi diagonal. The only host
    reads are CG's convergence tests.
    """
    model = GaussNewton(S, xa)

    def onto(v: Tensor) -> Tensor:
        return ties.project(v, tied)
    diag = onto(model.diagonal()[:, free])
    scale = diag.mean(-1, keepdim=True).clamp_min(torch.finfo(xa.dtype).tiny)
    damp = mu.unsqueeze(-1) * (diag + scale)
    precond_diag = (diag + damp).masked_fill(held, 1.0)

    def apply(p: Tensor) -> Tensor:
        full = xa.new_zeros(xa.shape)
        full[:, free] = p.masked_fill(held, 0.0)
        return torch.where(held, p, onto(model.matvec(full)[:, free]) + damp * p)

    def precond(r: Tensor) -> Tensor:
        if steps is None:
            return r / precond_diag
        full = xa.new_zeros(xa.shape)
        full[:, free] = r.masked_fill(held, 0.0)
        return torch.where(held, r, onto(model.determined_solve(steps, full)[:, free]))

    eta = torch.clamp(ga.norm(dim=-1), max=0.1).min().clamp_min(1e-14)  # stays on the device
    p, info = cg(apply, -ga, precond=precond, tol=eta,
                 maxiter=opt.cg_maxiter or max(2 * free.numel(), 50))
    p = onto(p)
    bad = ~((ga * p).sum(-1) < 0) | ~torch.isfinite(p).all(-1)
    p = torch.where(bad.unsqueeze(-1), -ga / precond_diag, p)  # not a descent direction: the scaled gradient
    return p, precond_diag, info.iterations


def _preconditioner_steps(S, free: Tensor, opt: NewtonOptions):
    """The determined part that preconditions Newton's CG (`_direction`), or None for Jacobi."""
    if opt.preconditioner != "auto":
        return None
    mask = torch.ones(S.C0, dtype=torch.bool)
    mask[free.cpu()] = False
    return _determined_part(S, torch.nonzero(mask).flatten())


def _kink_band(xf: Tensor) -> Tensor:
    """How close to a kink (relative to the largest free coordinate) counts as on it."""
    top = xf.abs().amax(-1, keepdim=True) if xf.shape[-1] else xf.new_zeros(*xf.shape[:-1], 1)
    return torch.finfo(xf.dtype).eps ** 0.5 * (1 + top)


def _set_free(x: Tensor, free: Tensor, mask: Tensor, value: Tensor) -> Tensor:
    """``x`` with the free coordinates under ``mask`` set to ``value`` (in place; no host read)."""
    x[:, free] = torch.where(mask, value, x[:, free])
    return x


def _descent_step(S, xa: Tensor, free: Tensor, Ea: Tensor, ga: Tensor, held: Tensor, mu: Tensor, steps,
                  opt: NewtonOptions, ties: Ties, tied: Tensor):
    """One damped Newton step with line search, and its safeguards.

    The plain gradient step (it leaves the kinks of non-smooth potentials, where
    the curvature model is huge) and, where a kink or a poor model cut the Newton
    step short (accepted below ``t = ¼``, or not at all), the Jacobi-scaled gradient
    step are kept instead when they lower the energy visibly more. The three line searches
    run together (`_line_searches`); the choice is made on the device. Returns
    ``(x_new, E_new, t, accepted, cg_iterations)``. Every direction moves the held ties together
    (``ga`` is projected onto them).
    """
    p, precond_diag, its = _direction(S, xa, free, ga, held, mu, steps, opt, ties, tied)
    (t, acc, x_new, E_new), (_, acc_g, x_g, E_g), (_, acc_s, x_s, E_s) = \
        _line_searches(S, xa, free, Ea, ga, [p, -ga, -ga / precond_diag], opt)
    x_new, E_new = torch.where(acc.unsqueeze(-1), x_new, xa), torch.where(acc, E_new, Ea)
    short = ~acc | (t < 0.25)
    accepted = acc
    for use, ok, x_q, E_q in ((torch.ones_like(acc), acc_g, x_g, E_g), (short, acc_s, x_s, E_s)):
        better = use & ok & (E_q < E_new - _noise(E_new, xa))
        x_new, E_new = torch.where(better.unsqueeze(-1), x_q, x_new), torch.where(better, E_q, E_new)
        accepted = accepted | better
    return x_new, E_new, t, accepted, its


def newton(S, x: Tensor, free: Tensor, tol: float, max_iter: int = 100,
           options: NewtonOptions | None = None, record: bool | int = False) -> tuple[Tensor, dict]:
    """Minimise the energy over the coordinates ``free`` of ``x`` (``(B, C0)``; the others stay fixed).

    Active set for ReLU kinks: a coordinate that feeds a ReLU and zigzags across
    its kink is held at the kink, Newton continues on the others, and the
    coordinate is let go when a one-sided derivative says that leaving the kink
    lowers the energy. Stationarity is measured with both one-sided derivatives at
    every kink coordinate on (or within rounding of) its kink, so an equilibrium on a
    switching surface (Note 5.1) is recognised as one and a concave kink is not.

    Host reads: one per iteration for the loop's decisions (which items still work,
    whether every energy and gradient is finite, which items wait for a recomputation
    after a kink event: then one more), the line searches' (usually one,
    `_line_searches`) and those of the inner CG solves (`cellsheaf.syncs.check_every`).
    A non-finite energy or gradient is detected from the batched flag and raised, naming
    the edge, by evaluating the point again with the checks on.

    Returns the final point and a report: ``converged`` (bool per item),
    ``iterations``, ``energy`` and ``grad_norm`` (the Clarke stationarity) per item,
    ``on_kinks`` (coordinates held at kinks per item), ``cg_iterations`` (total),
    ``stalled`` (bool per item) and, with ``record``, the ``trajectory``
    ``{"step": (K,), "edge_energy": (K, B, E)}`` every ``record`` iterations. Use
    [`cellsheaf.minimize`][cellsheaf.minimize.minimize] for the public interface.
    """
    every = int(record)
    trace_steps, trace = [], []
    opt = options or NewtonOptions()
    B, n = x.shape[0], free.numel()
    dev = x.device
    x = x.clone()
    points = _kink_points(S, free)
    kinks = ~torch.isnan(points).all(-1)
    at = _nearest_kink(x[:, free], points).clone()  # the kink each held coordinate is held at
    held = kinks & (x[:, free] == at) if opt.hold_kinks_at_start else torch.zeros(B, n, dtype=torch.bool, device=dev)
    ties = Ties.of(S, free, kinks)
    # the max-pool ties held (B, W, K): at the start the exact ones of a warm start
    tied = ties.near(x[:, free], x.new_zeros(B, 1)) if opt.hold_kinks_at_start else ties.none(B)
    flips = torch.zeros(B, n, dtype=torch.long, device=dev)
    tie_flips = torch.zeros(B, ties.windows.shape[0], dtype=torch.long, device=dev)
    releases = torch.zeros(B, dtype=torch.long, device=dev)
    E, g = _free_gradient(S, x, free, check=False)
    measure = _stationarity(S, x, free, g, held, points, tol, ties=ties, tied=tied)[0]
    finite = _finite(E, g) & ~torch.isnan(measure)
    dirty = torch.zeros(B, dtype=torch.bool, device=dev)  # values to recompute after a kink event
    mu = torch.full((B,), opt.damping, dtype=x.dtype, device=dev)
    stalled = torch.zeros(B, dtype=torch.bool, device=dev)
    best, best_g = E.clone(), measure.clone()
    since_best = torch.zeros(B, dtype=torch.long, device=dev)
    it, cg_its, rows, act = 0, 0, None, None
    while True:
        if every and it % every == 0:
            trace_steps.append(it)
            trace.append(edge_energies(S, x).detach())
        while True:  # the iteration's host read (a second one only after a kink event)
            flags = torch.cat([(measure > tol) & ~stalled, dirty, ~finite]).tolist()
            if any(flags[2 * B:]):  # raise the error of the first non-finite value, naming its edge
                _, g_chk = _free_gradient(S, x, free)
                _stationarity(S, x, free, g_chk, held, points, tol, lambda y: pullback(S, *forces(S, y), at=y),
                              ties, tied)
                finite = torch.ones_like(finite)  # nothing raised: the values stay as they are (not converged)
            waiting = [i for i in range(B) if flags[B + i]]
            if not waiting:
                break
            idx = torch.tensor(waiting, device=dev)
            E[idx], g[idx] = _free_gradient(S, x[idx], free, check=False)
            measure[idx] = _stationarity(S, x[idx], free, g[idx], held[idx], points, tol, ties=ties, tied=tied[idx])[0]
            best[idx], best_g[idx] = E[idx], measure[idx]
            finite[idx] = _finite(E[idx], g[idx]) & ~torch.isnan(measure[idx])
            dirty.zero_()
        working = [i for i in range(B) if flags[i]]
        if it >= max_iter or not working:
            break
        if working != rows:  # a new index tensor only when the active set changes
            rows = working
            act = torch.arange(B, device=dev) if len(rows) == B else torch.tensor(rows, device=dev)
        if it == 0:
            steps = _preconditioner_steps(S, free, opt)
        it += 1
        xa, Ea, mua, ha, ta = x[act], E[act], mu[act], held[act], tied[act]
        ga = ties.project(g[act], ta).masked_fill(ha, 0.0)
        x_new, E_new, t, accepted, its = _descent_step(S, xa, free, Ea, ga, ha, mua, steps, opt, ties, ta)
        cg_its += its
        mua = torch.where(accepted & (t == 1.0), mua / 10, mua * 10).clamp(opt.damping * 1e-4, opt.max_damping)
        # a kink coordinate that crossed its kink on two steps running is zigzagging across a switching surface:
        # hold it there
        c = _nearest_kink(xa[:, free], points)
        crossed = kinks & ((xa[:, free] >= c) != (x_new[:, free] >= c))
        fa = torch.where(crossed, flips[act] + 1, torch.zeros_like(flips[act]))
        newly = (fa >= 2) & ~ha & (releases[act] < opt.max_releases).unsqueeze(-1)
        ha, ata = ha | newly, torch.where(newly, c, at[act])
        x_new = _set_free(x_new, free, ha, ata)
        # likewise a max-pool window whose selection switched on two steps running: hold the tie of the two
        ta, tfa, tie_newly = _hold_switching(ties, xa[:, free], x_new[:, free], ta, tie_flips[act],
                                             releases[act] < opt.max_releases)
        if not ties.empty:
            x_new[:, free] = ties.snap(x_new[:, free], ta)
        E_act, g_act = _free_gradient(S, x_new, free, check=False)
        m_act, leave, left = _stationarity(S, x_new, free, g_act, ha, points, tol, ties=ties, tied=ta)
        # let go of held coordinates (and ties) that a one-sided derivative pushes off, once the rest has settled
        smooth = ties.project(g_act, ta).masked_fill(ha, 0.0).norm(dim=-1)
        go = leave & (smooth <= torch.clamp(0.1 * m_act, min=tol)).unsqueeze(-1)
        releases[act] += go.any(-1).long()
        ha = ha & ~go
        if not ties.empty:
            ta = ta & ~ties.windows_of(go).unsqueeze(-1)
        # leaving a kink to the left: just past it, where the selection rule sees that side; leaving a tie: just
        # below or above it, so that the window selects accordingly (that item's energy, gradient and
        # stationarity are recomputed at the next read)
        push = go & (left | ties.members)
        xf = x_new[:, free]
        x_new = _set_free(x_new, free, push, torch.where(
            ties.members, torch.where(left, _below(xf), _above(xf)), _below(_nearest_kink(xf, points))))
        x[act], E[act], g[act], mu[act], held[act], flips[act] = x_new, E_act, g_act, mua, ha, fa.masked_fill(newly, 0)
        tie_flips[act] = tfa.masked_fill(tie_newly, 0)
        measure[act] = m_act
        changed = newly.any(-1) | go.any(-1) | tie_newly.any(-1)
        improved = (E_act < best[act] - _noise(best[act], x_new)) | (m_act < 0.5 * best_g[act]) | changed
        best[act] = torch.where(changed, E_act, torch.minimum(best[act], E_act))
        best_g[act] = torch.where(changed, m_act, torch.minimum(best_g[act], m_act))
        since_best[act] = torch.where(improved, 0, since_best[act] + 1)
        # no progress: hold the kink coordinates that sit (nearly) on their kink before giving up
        stuck = ~accepted | (since_best[act] >= opt.stall_iterations // 2)
        c = _nearest_kink(x_new[:, free], points)
        near = kinks & ~ha & ((x_new[:, free] - c).abs() <= _kink_band(x_new[:, free])) & \
            (stuck & (releases[act] < opt.max_releases)).unsqueeze(-1)
        at[act] = torch.where(near, c, ata)
        x_new = _set_free(x_new, free, near, c)
        held[act] = ha | near
        # and the max-pool windows whose maximum is (nearly) shared
        tie_near = ties.near(x_new[:, free], _kink_band(x_new[:, free])) & \
            (stuck & (releases[act] < opt.max_releases))[:, None, None] & ~ties.active(ta)
        if not ties.empty:
            ta = ta | tie_near
            x_new[:, free] = ties.snap(x_new[:, free], ta)
        x[act], tied[act] = x_new, ta
        new_ties = tie_near.flatten(1).any(-1)
        since_best[act] = torch.where(near.any(-1) | new_ties, 0, since_best[act])
        dirty[act] = push.any(-1) | near.any(-1) | new_ties
        finite[act] = _finite(E_act, g_act) & ~torch.isnan(m_act)
        stalled[act] = (since_best[act] >= opt.stall_iterations) | (~accepted & (mua >= opt.max_damping))
    converged = measure <= tol
    report = {"converged": converged, "iterations": it, "energy": E, "grad_norm": measure,
              "cg_iterations": cg_its, "stalled": stalled & ~converged, "on_kinks": held.sum(-1),
              "on_ties": ties.active(tied).any(-1).sum(-1)}
    if every:
        report["trajectory"] = {"step": torch.tensor(trace_steps), "edge_energy": torch.stack(trace)}
    return x, report


def _noise(E: Tensor, x: Tensor) -> Tensor:
    """The rounding level of energy values ``E`` at points ``x``: decreases below it are invisible.

    A discrepancy ``r`` computed from values of size ``|x|`` carries an error of about
    ``ε|x|``, so ``½‖r‖²`` is uncertain by about ``ε ‖r‖ |x| ≈ ε √(2E) ‖x‖``.
    """
    return 16 * torch.finfo(E.dtype).eps * (E.abs() + (2 * E.abs()).sqrt() * x.norm(dim=-1))


_FIRST_ROUND = (1, 4, 0)  # candidate steps per search in the first round: Newton, gradient, scaled gradient


def _line_searches(S, x: Tensor, free: Tensor, E0: Tensor, g: Tensor, dirs: list[Tensor], opt: NewtonOptions):
    """Armijo backtracking along the Newton, gradient and scaled gradient directions ``dirs`` at once.

    Per direction and item, the first ``t ∈ {1, ½, ¼, ...}`` (at most ``opt.max_backtracks``
    of them) with ``E(x + t p) <= E0 + c₁ t ∇E·p`` (up to the rounding level of ``E``, so that
    steps near the minimum whose decrease is invisible in floating point are still taken);
    a non-finite trial energy fails the test. The candidates are evaluated in rounds, all
    directions in one batched energy evaluation, with one host read per round (which items
    of which search still need a step): the first round tries ``t = 1`` for Newton and four
    steps of the gradient on every item, which usually settles them all; a later round tries
    the next `cellsheaf.syncs.check_every` steps on the items left (one on the CPU), and the
    scaled gradient (only wanted where Newton's step stops below ``¼``) joins it. Returns
    ``(t, accepted, x_out, E_out)`` per direction (``t`` is ``2⁻ᵐᵃˣ`` where none was accepted).
    """
    B, dev, dt = x.shape[0], x.device, x.dtype
    floor = E0 + _noise(E0, x)
    slopes = [opt.armijo * (g * p).sum(-1) for p in dirs]
    state = [{"next": 0, "found": torch.zeros(B, dtype=torch.bool, device=dev),
              "j": torch.full((B,), opt.max_backtracks, dtype=torch.long, device=dev),
              "x": x.clone(), "E": E0.clone()} for _ in dirs]
    jobs = [(k, None, m) for k, m in enumerate(_FIRST_ROUND) if m]  # (search, its items (None: all), candidates)
    later = check_every(dev)
    while jobs:
        trials, ts = [], []
        for k, rows, m in jobs:
            j0 = state[k]["next"]
            m = min(m, opt.max_backtracks - j0)
            t = torch.ldexp(torch.ones(m, dtype=dt, device=dev), -torch.arange(j0, j0 + m, device=dev))
            trial = (x if rows is None else x[rows]).unsqueeze(0).repeat(m, 1, 1)
            trial[..., free] += t[:, None, None] * (dirs[k] if rows is None else dirs[k][rows])
            trials.append(trial)
            ts.append(t)
        for (k, rows, _), trial, t, e in zip(jobs, trials, ts, _trial_energies(S, trials)):
            s, sel = state[k], (slice(None) if rows is None else rows)
            e = e.view(trial.shape[:2])
            ok = (e <= floor[sel] + t[:, None] * slopes[k][sel]) & torch.isfinite(e)  # (m, items)
            first = ok.to(torch.uint8).argmax(0)  # the first candidate that passes
            new = ok.any(0) & ~s["found"][sel]
            s["j"][sel] = torch.where(new, s["next"] + first, s["j"][sel])
            picked = trial.gather(0, first.view(1, -1, 1).expand(1, -1, x.shape[1]))[0]
            s["x"][sel] = torch.where(new.unsqueeze(-1), picked, s["x"][sel])
            s["E"][sel] = torch.where(new, e.gather(0, first.view(1, -1))[0], s["E"][sel])
            s["found"][sel] = s["found"][sel] | new
            s["next"] += t.shape[0]
        # the round's host read: the items of each search still without a step (the scaled gradient's
        # only where Newton's step is not settled at t >= 1/4)
        need = torch.stack([~state[0]["found"], ~state[1]["found"],
                            ~state[2]["found"] & ~(state[0]["found"] & (state[0]["j"] <= 2))]).tolist()
        jobs = []
        for k, flags in enumerate(need):
            left = [i for i in range(B) if flags[i]]
            if left and state[k]["next"] < opt.max_backtracks:
                jobs.append((k, None if len(left) == B else torch.tensor(left, device=dev), later))
    return [(torch.ldexp(torch.ones(B, dtype=dt, device=dev), -s["j"]), s["found"], s["x"], s["E"])
            for s in state]


def _trial_energies(S, trials: list[Tensor]) -> list[Tensor]:
    """Total energies of the trial points (each ``(m, B, C0)``) in one batched evaluation, unchecked.

    A potential or map that raises outside its domain (``ValueError``, ``FloatingPointError``) fails
    the trial points it was evaluated on: then each candidate step is evaluated on its own, and one
    that raises gets ``inf``.
    """
    flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in trials])
    try:
        return list(edge_energies(S, flat, check=False).sum(-1).split([t.shape[0] * t.shape[1] for t in trials]))
    except (ValueError, FloatingPointError):
        pass
    out = []
    for t in trials:
        rows = []
        for trial in t:
            try:
                rows.append(edge_energies(S, trial, check=False).sum(-1))
            except (ValueError, FloatingPointError):
                rows.append(torch.full(trial.shape[:1], math.inf, dtype=trial.dtype, device=trial.device))
        out.append(torch.stack(rows).reshape(-1))
    return out
