"""Equilibria of a determined sheaf nudged by soft edges, by sweeps along its propagation order.

Split the edges into a *determined part* ``D`` (a propagation schedule: ``δ_Ω``
square and triangular, [`cellsheaf.propagation.determined_part`][cellsheaf.propagation.determined_part]) and the *rest*
``R``: soft edges such as a loss edge of small weight ``γ`` or penalty edges.
The equilibrium of ``D`` alone is its propagation ``x*`` (zero discord on ``D``).
The rest moves it by ``Δ`` solving

    ``M Δ + ∇E_R(x* + Δ) = 0``,   ``M = J_Ωᵀ W J_Ω``,

where ``M`` is the Hessian of ``E_D`` at ``x*`` (exact there: the discord is zero,
so the second derivatives of the maps drop out; for ReLU-type maps it is exact in
the whole activation region). ``M⁻¹`` is two triangular sweeps along the schedule
(a transposed one, the adjoint, and a forward one), so the fixed point

    ``Δ_{k+1} = −M⁻¹ ∇E_R(x* + Δ_k)``,   ``Δ_0 = 0``

costs two sweeps per iteration (for a rest that is not soft the contraction is slow:
use Newton, [`cellsheaf.minimize`][cellsheaf.minimize.minimize], warm-started from the result). ``Δ_1`` is the linear response (exact as ``γ → 0``);
each further iteration corrects the error by a factor ``O(γ ‖M⁻¹‖ ‖∇²E_R‖)``.
In the model, the gradient of the energy on the free coordinates at ``x_k = x* + Δ_k``
is ``∇E_R(x_k) − ∇E_R(x_{k−1})`` (the determined part contributes ``M Δ_k``), so the
iteration stops when that norm is below ``tol`` for every item, without a line search
or energy evaluations. A coordinate that crosses a ReLU kink between ``x*`` and
``x_k`` (possible only within ``O(|Δ|)`` of the kink) makes the model wrong there, so
the result's gradient is then measured by one pass over the edges (``verify``), and
an item that fails is reported as not converged (continue with Newton).

A rest that is *not* soft (a hard-clamped output: the edges into it weigh as much
as the network's) has low rank all the same: ``k`` rows, the dimension of the rest's
edges (the output's). `low_rank_newton` takes exact Gauss–Newton steps for it: in the
edge coordinates ``q = J_Ω Δ`` of the determined part the model is
``½ qᵀWq + uᵀq + ½ (Yᵀq)ᵀ C (Yᵀq)`` with ``u = J_Ω⁻ᵀ ∇E``, ``Y = J_Ω⁻ᵀ J_Rᵀ`` (one transposed
sweep with ``1 + k`` right-hand sides per item) and ``C`` the rest's curvature, so by
Woodbury ``q = W⁻¹(−u + Y C (I + YᵀW⁻¹Y C)⁻¹ YᵀW⁻¹u)`` (a ``k × k`` solve per item) and
``Δ = J_Ω⁻¹ q`` (one forward sweep). For ReLU maps and a quadratic rest one step lands on
the minimum of the current activation region.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("y", 1); S.add_vertex("t", 1)
>>> _ = S.add_edge("x", "y", 2 * torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))
>>> _ = S.add_edge("y", "t", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), weight=0.01)
>>> p = cs.propagation.plan(S, torch.tensor([0, 2]), determined=True)
>>> x = torch.tensor([[1.0, 0.0, 5.0]], dtype=torch.float64)
>>> out, report = cs.nudge.nudged_equilibrium(S, p, p.run(x))
>>> round(out[0, 1].item(), 9), round((2 + 0.01 * 5) / 1.01, 9), report["iterations"]
(2.02970297, 2.02970297, 5)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .energy import edge_forces
from .gauss_newton import _tiled, _where, forward_sweep, transposed_sweep
from .maps import MaxPool
from .propagation import PropagationPlan, _as_index, _runs

__all__ = ["rest_gradient", "nudged_equilibrium", "free_gradient", "low_rank_newton", "clamped_equilibrium"]


def rest_gradient(S, x: Tensor, edges) -> Tensor:
    """``∇E_R(x)`` (``(B, C0)``): the energy gradient of the edges ``edges`` only, on every coordinate.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1), name="e", weight=2.0)
    >>> cs.nudge.rest_gradient(S, torch.tensor([[1.0, 3.0]]), ["e"])
    tensor([[-4.,  4.]])
    """
    g = torch.zeros_like(x)
    for name in edges:
        e = S.edge(name)
        su, sv = S.vertex_slice(e.u), S.vertex_slice(e.v)
        pv, pu = edge_forces(S, name, x)
        g[:, sv] += e.Fv.vjp(x[:, sv], pv)
        g[:, su] += e.Fu.vjp(x[:, su], pu)
    return g


def nudged_equilibrium(S, plan: PropagationPlan, x: Tensor, tol: float = 1e-10, max_iter: int = 10,
                       verify: bool = True, maps=None, at: Tensor | None = None,
                       params: list[Tensor] | None = None, out: Tensor | None = None) -> tuple[Tensor, dict]:
    """The equilibrium of ``S`` near the propagation ``x`` of its determined part (see the module notes).

    Parameters
    ----------
    S : Sheaf
    plan : PropagationPlan
        The plan of the determined part ([`cellsheaf.propagation.plan`][cellsheaf.propagation.plan] with ``determined=True``);
        its steps' edges are ``D``, every other edge of ``S`` is the rest ``R``.
    x : tensor ``(B, C0)``
        ``x*``: the boundary values set and the plan run (zero discord on ``D``).
    tol : float
        Stop when the free gradient norm of every item is ``<= tol``.
    max_iter : int
        Fixed-point iterations (two sweeps each) at most.
    verify : bool
        Measure the free gradient at the result (the iteration's own estimate misses a coordinate
        that crossed a ReLU kink). The edges of ``D`` whose maps are linear contribute exactly what
        the sweeps solved for (up to rounding), so only the others (ReLU, softmax, ...) and the
        rest are evaluated at the result: no pass over the linear edges. With ``False`` the report
        holds the estimate, and the caller must verify.
    maps : iterable of ``(edge, side)``, optional
        Also return those maps' local gradients (Eq. 24, ``forceᵀ x`` over the batch) at the result,
        in ``report["grads"]``. An edge of ``D`` with linear maps takes its force from the transposed
        sweep (no evaluation of the edge), any other from its maps at the result.
    at : tensor ``(B, C0)``, optional
        The stalks the local gradients multiply (default: the result; ``x`` for the free state's).
    params : list of tensors, optional
        Also return the local rule of these tensors held by the maps
        ([`cellsheaf.learning.local_gradients`][cellsheaf.learning.local_gradients]) at the result, in
        ``report["param_grads"]`` (aligned with ``params``), its forces taken as for ``maps``.
    out : tensor ``(B, C0)``, optional
        Where to write the result (default: a new tensor), e.g. a buffer a trainer reuses from update to
        update (a fresh cochain-sized tensor costs its page faults on every call). It must not be ``x``.

    Returns
    -------
    x : tensor ``(B, C0)``, the nudged equilibrium (a new tensor, or ``out``).
    report : dict with ``iterations``, ``grad_norm`` (``(B,)``), ``converged`` (``(B,)`` bool), and
        ``grads`` (``{(edge, side): tensor}``) for ``maps``, ``param_grads`` for ``params``.
        When the iteration stops contracting (a rest too stiff for the fixed point) the best
        iterate is returned, not converged: continue with Newton from it.
    """
    used = {s.edge for s in plan.steps}
    lay = _rest_layout(S, plan, [name for name in S.edges if name not in used])
    cols = lay.cols if isinstance(lay.cols, slice) else lay.cols.to(x.device)  # the free coordinates R reaches
    g0 = gk = _rest_gradient(S, x, lay)
    xk, ys, k = x, None, 0
    grad_norm = gk.norm(dim=-1)
    worst = float("inf")
    B, C0 = x.shape
    # the iterates and the sweeps' work space alternate between two buffers each, so that the best iterate and
    # its sweep values survive a rejected one; the first iterate goes straight into ``out``
    result = x.new_empty(x.shape) if out is None else out
    for k in range(1, max_iter + 1):
        side = (k - 1) % 2
        r = _workspace(plan, f"nudge:r{side}", B * C0, x).view(B, C0).zero_()
        r[:, cols] = gk
        y = transposed_sweep(x, plan.steps, r, lay.live, overwrite=True)
        x_new = result if side == 0 else _workspace(plan, "nudge:x1", B * C0, x).view(B, C0)
        z = forward_sweep(x, plan.steps, [v if w == 1.0 else v / w for v, w in zip(y, lay.weights)], lay.live,
                          out=x_new)
        torch.sub(x, z, out=x_new)
        for s, end in zip(plan.steps, lay.ends):  # nothing reads a terminal step's targets: propagate them exactly
            if end:
                t = s.F.apply(x_new[:, s.source])
                x_new[:, _where(s, x)] = t / s.scale.to(dtype=x.dtype, device=x.device) if s.scale is not None else t
        g_new = _rest_gradient(S, x_new, lay)
        norm = (g_new - gk).norm(dim=-1)
        peak = float(norm.max()) if norm.numel() else 0.0
        if not peak < worst:  # not contracting (the rest is too stiff): keep the best iterate
            k -= 1
            break
        xk, g0, ys, gk, grad_norm, worst = x_new, gk, y, g_new, norm, peak
        if peak <= tol:
            break
    exact = {}  # the forces at the result of the steps' edges whose maps are not linear
    if ys is None:
        if verify:
            free = x.new_zeros(S.C0)
            free[plan.free.to(x.device)] = 1.0
            grad_norm = free_gradient(S, xk, free).norm(dim=-1)
    elif verify or maps:
        res = _workspace(plan, "nudge:res", B * C0, x).view(B, C0).zero_() if verify else None
        if verify:
            res[:, cols] = gk - g0  # the rest's gradient moved since the last sweep
        exact = _nonlinear_steps(S, plan, lay.ends, x, xk, ys, res)
        if verify:
            grad_norm = _norm_over(res, lay.free_runs)
    report = {"iterations": k, "grad_norm": grad_norm, "converged": grad_norm <= tol}
    if maps is not None or params is not None:
        forces = _forces_at(S, plan, xk, ys, exact)
        src = xk if at is None else at
        if maps is not None:
            report["grads"] = _local_gradients(S, forces, maps, src)
        if params is not None:
            report["param_grads"] = _parameter_gradients(S, forces, params, src)
    if xk is not result:  # the input (no iterate taken) or the second buffer: the result is a tensor of its own
        xk = result.copy_(xk)
    return xk, report


@dataclass(frozen=True)
class _RestLayout:
    """How the rest ``R`` meets the free coordinates (see `_rest_layout`)."""

    cols: slice | Tensor          # the free coordinates on the vertices of R's edges, sorted
    ends: list[bool]              # per step: a terminal step (propagated exactly, skipped by the sweeps)
    live: list[bool]              # per step: the sweeps take its Jacobian product
    pieces: list[tuple]           # (edge, side, vertex slice, its free columns, their positions in cols)
    free_runs: list[slice]        # the plan's free coordinates as runs of consecutive columns
    weights: list[float]          # per step: its edge's weight


def _rest_layout(S, plan: PropagationPlan, rest) -> _RestLayout:
    """The layout of the rest ``rest`` (edge names): ``cols`` the free coordinates (sorted) on its edges'
    vertices, and for each end of each edge of ``rest`` with free coordinates its columns and their positions
    in ``cols`` (so that ``∇E_R`` is computed on ``cols`` alone, `_rest_gradient`); ``ends`` one bool per step:
    whether no step reads its targets and no edge of ``rest`` touches them (e.g. a softmax output beside a
    loss that reads the logits). A terminal step's adjoint vanishes, and propagating it exactly leaves it no
    discord: the sweeps skip it. Cached on the plan per ``rest``."""
    cache = plan.__dict__.setdefault("_rest_layout", {})
    key = tuple(rest)
    if key not in cache:
        touched = torch.zeros(S.C0, dtype=torch.bool)
        for name in rest:
            e = S.edge(name)
            touched[S.vertex_slice(e.u)] = True
            touched[S.vertex_slice(e.v)] = True
        free = torch.zeros(S.C0, dtype=torch.bool)
        free[plan.free.cpu()] = True
        read = touched.clone()
        for s in plan.steps:
            read[s.source] = True
        ends = [not bool(read[s.span if s.span is not None else s.targets.cpu()].any()) for s in plan.steps]
        cols = torch.nonzero(touched & free).flatten()
        pieces = []
        for name in rest:
            e = S.edge(name)
            for side, w in (("v", e.v), ("u", e.u)):
                sl = S.vertex_slice(w)
                local = torch.nonzero(free[sl]).flatten()
                if len(local):
                    pos = torch.searchsorted(cols, local + sl.start)
                    pieces.append((name, side, sl, _as_index(local), _as_index(pos)))
        cache[key] = _RestLayout(_as_index(cols), ends, [r and not end for r, end in zip(plan.reads_free, ends)],
                                 pieces, _runs(plan.free.cpu()), [float(S.edge(s.edge).weight) for s in plan.steps])
    return cache[key]


def _norm_over(x: Tensor, runs: list[slice]) -> Tensor:
    """The norm of each row of the work tensor ``x`` over the columns ``runs`` (no gather of the columns): the
    gaps between the runs are zeroed (``x`` is overwritten there) and the span from the first to the last
    run is measured at once."""
    if not runs:
        return x.new_zeros(x.shape[0])
    for a, b in zip(runs[:-1], runs[1:]):
        x[:, a.stop:b.start] = 0.0
    return torch.linalg.vector_norm(x[:, runs[0].start:runs[-1].stop], dim=-1)


def _rest_gradient(S, x: Tensor, lay: _RestLayout) -> Tensor:
    """``∇E_R(x)`` on the free columns ``lay.cols`` alone (``(B, len(cols))``): `rest_gradient` without a pass
    over the whole cochain."""
    n = lay.cols.stop - lay.cols.start if isinstance(lay.cols, slice) else len(lay.cols)
    if len(lay.pieces) == 1 and lay.pieces[0][3] == slice(0, n) == lay.pieces[0][4]:  # one end holds every column
        name, side, sl, _, _ = lay.pieces[0]
        e, (pv, pu) = S.edge(name), edge_forces(S, name, x)
        t = e.Fv.vjp(x[:, sl], pv) if side == "v" else e.Fu.vjp(x[:, sl], pu)
        return t if t.shape[-1] == n else t[:, :n]
    g = x.new_zeros(x.shape[0], n)
    forces = {}
    for name, side, sl, local, pos in lay.pieces:
        if name not in forces:
            forces[name] = edge_forces(S, name, x)
        e = S.edge(name)
        F, p = (e.Fv, forces[name][0]) if side == "v" else (e.Fu, forces[name][1])
        t = F.vjp(x[:, sl], p)
        g[:, pos if isinstance(pos, slice) else pos.to(x.device)] += t[:, local if isinstance(local, slice)
                                                                        else local.to(x.device)]
    return g


def _linear(e) -> bool:
    return e.Fu.linear and e.Fv.linear


def _nonlinear_steps(S, plan: PropagationPlan, ends: list[bool], x: Tensor, xk: Tensor, ys: list[Tensor],
                     res: Tensor | None) -> dict:
    """``{edge: (g_v, g_u)}``: the forces at ``xk`` of every step of ``D`` whose edge has a nonlinear map (a
    terminal one, ``ends``, has none: it was propagated exactly). With ``res`` (``(B, C0)``), add to it each
    such edge's pullback at ``xk`` minus the sweeps' model of it (the force ``(−y, y)`` pulled back at ``x``):
    the share of the free gradient at ``xk`` the sweeps did not solve for."""
    out = {}
    for s, y, end in zip(plan.steps, ys, ends):
        e = S.edge(s.edge)
        if _linear(e) or end:
            continue
        Fv, Fu = _as_swept(e.Fv, x[:, S.vertex_slice(e.v)]), _as_swept(e.Fu, x[:, S.vertex_slice(e.u)])
        gv, gu = out[s.edge] = edge_forces(S, s.edge, xk, maps=(Fv, Fu))
        if res is None:
            continue
        for F, w, g, sign in ((Fv, e.v, gv, -1), (Fu, e.u, gu, 1)):  # the model's force is sign · y
            if w in plan.fixed_vertices:
                continue
            sl = S.vertex_slice(w)
            res[:, sl] += F.vjp(xk[:, sl], torch.sub(g, y, alpha=sign)) if F.linear else \
                torch.sub(F.vjp(xk[:, sl], g), F.vjp(x[:, sl], y), alpha=sign)
    return out


def _as_swept(F, ref: Tensor):
    """``F`` as the sweeps linearised it at the free state ``ref``: a max pooling with the ties of ``ref`` broken as
    torch breaks them (`cellsheaf.maps.MaxPool.tie_broken`; backprop's subgradient), any other map itself."""
    return F.tie_broken(ref) if isinstance(F, MaxPool) else F


def _forces_at(S, plan: PropagationPlan, xk: Tensor, ys, exact: dict):
    """``forces(edge) -> (g_v, g_u)`` at the nudged state ``xk``: an edge of ``D`` with linear maps has the force
    ``(−y, y)`` of its step (``y`` from the transposed sweep; ``g_v`` is then None, meaning ``−g_u``, as
    `cellsheaf.learning._Gradients.over_edges` reads it), the others their forces at ``xk``."""
    swept = {s.edge: y for s, y in zip(plan.steps, ys)} if ys is not None else {}

    def forces(name) -> tuple[Tensor | None, Tensor]:
        if name in exact:
            return exact[name]
        if name in swept and _linear(S.edge(name)):
            return None, swept[name]
        return edge_forces(S, name, xk)
    return forces


def _local_gradients(S, forces, maps, src: Tensor) -> dict:
    """Eq. (24) ``forceᵀ x`` for each ``(edge, side)`` of ``maps``, the forces from `_forces_at`."""
    from .learning import _eq24

    grads = {}
    for name, side in maps:
        e = S.edge(name)
        gv, gu = forces(name)
        F, sl = (e.Fu, S.vertex_slice(e.u)) if side == "u" else (e.Fv, S.vertex_slice(e.v))
        G = _eq24(F, gu if side == "u" or gv is None else gv, src[:, sl])
        grads[(name, side)] = G.neg() if side == "v" and gv is None else G
    return grads


def _parameter_gradients(S, forces, params: list[Tensor], src: Tensor) -> list[Tensor]:
    """The local rule of ``params`` (`cellsheaf.learning.local_gradients`), the forces from `_forces_at`."""
    from .learning import _Gradients

    return _Gradients(params).over_edges(S, forces, src)


def free_gradient(S, x: Tensor, free: Tensor) -> Tensor:
    """``∇E(x)`` times the 0/1 mask ``free`` (``(C0,)``), edge by edge (one pass over the edges)."""
    from .learning import _edgewise

    return _edgewise(S, x, {})[0] * free


def _rest_rows(S, x: Tensor, rest, free: Tensor) -> tuple[list, int, Tensor, Callable]:
    """The rest's Jacobian and potential at ``x``: ``(pieces, k, s0, derivatives)``.

    The ``k`` rows of ``J_R`` (the derivative of each rest edge's argument — its discrepancy, or
    both expressed values for a two-argument potential — on the free coordinates, ``free`` a 0/1
    mask) as ``pieces``: ``(j, sl, values)`` adds ``values`` (``(d, B, len(sl))``) to rows ``j .. j + d``
    on the columns ``sl`` (a vertex's). ``s0`` (``(B, k)``) holds those arguments at ``x``, and
    ``derivatives(s)`` returns the weighted gradient ``(B, k)`` and curvature ``(B, k, k)`` (block diagonal
    over the edges) of the rest's potentials at arguments ``s`` (the other ends held at ``x``).
    """
    B, pieces, parts, k = x.shape[0], [], [], 0
    for name in rest:
        e = S.edge(name)
        su, sv = S.vertex_slice(e.u), S.vertex_slice(e.v)
        live = {side: bool(free[sl].any()) for side, sl in (("u", su), ("v", sv))}
        if not (live["u"] or live["v"]):
            continue
        d = e.dim
        basis = torch.eye(d, dtype=x.dtype, device=x.device).repeat_interleave(B, 0)  # (d·B, d): e_j per item

        def pulled(F, sl, sign=1.0):
            return (sign * F.vjp(_tiled(F, x[:, sl], d), basis) * free[sl]).reshape(d, B, -1)
        av, au = e.Fv.apply(x[:, sv]), e.Fu.apply(x[:, su])
        if e.potential is None or e.potential.quadratic or e.potential.difference:
            for side, F, sl, sign in (("v", e.Fv, sv, 1.0), ("u", e.Fu, su, -1.0)):
                if live[side]:
                    pieces.append((k, sl, pulled(F, sl, sign)))
            parts.append((e, None, av - au, basis))
            k += d
            continue
        halves = [side for side in ("v", "u") if live[side]]
        for side in halves:
            pieces.append((k, sv, pulled(e.Fv, sv)) if side == "v" else (k, su, pulled(e.Fu, su)))
            k += d
        parts.append((e, (halves, av, au), torch.cat([av if side == "v" else au for side in halves], -1), basis))
    if not parts:
        return [], 0, x.new_zeros(B, 0), lambda s: (x.new_zeros(B, 0), x.new_zeros(B, 0, 0))
    s0 = parts[0][2] if len(parts) == 1 else torch.cat([part[2] for part in parts], -1)

    def derivatives(s: Tensor) -> tuple[Tensor, Tensor]:
        grads, blocks, at = [], [], 0
        for e, pair, s_e, basis in parts:
            n = s_e.shape[-1]
            r, at = s[:, at:at + n], at + n
            d = e.dim
            if pair is None:
                if e.potential is None or e.potential.quadratic:
                    grads.append(e.weight * r)
                    blocks.append(e.weight * torch.eye(d, dtype=x.dtype, device=x.device).expand(B, d, d))
                    continue
                grads.append(e.weight * e.potential.grad(r))
                h = e.potential.curvature(r.repeat(d, 1), basis)  # column j: ∇²U e_j
                blocks.append(e.weight * h.reshape(d, B, d).permute(1, 2, 0))
                continue
            halves, av, au = pair
            ends = dict(zip(halves, r.split(d, -1)))
            av, au = ends.get("v", av), ends.get("u", au)
            gv, gu = e.potential.pair_grad(av, au)
            grads.append(e.weight * torch.cat([gv if side == "v" else gu for side in halves], -1))
            h = _prediction_hessian(e.potential, av, au, halves)
            if h is None:
                zero = torch.zeros_like(basis)
                cols = []
                for side in halves:
                    hv, hu = e.potential.pair_curvature(av.repeat(d, 1), au.repeat(d, 1),
                                                        *((basis, zero) if side == "v" else (zero, basis)))
                    cols.append(torch.cat([h.reshape(d, B, d) for side2, h in (("v", hv), ("u", hu))
                                           if side2 in halves], -1))
                h = torch.cat(cols, 0).permute(1, 2, 0)
            blocks.append(e.weight * h)
        return (grads[0] if len(grads) == 1 else torch.cat(grads, -1)), _block_diagonal(blocks)
    return pieces, k, s0, derivatives


def _prediction_hessian(potential, av: Tensor, au: Tensor, halves: list[str]) -> Tensor | None:
    """The Hessian (``(B, d, d)``) of a cross-entropy on logits in its prediction alone (the target end held),
    in closed form: ``Σy (diag p − p pᵀ)`` for softmax, ``diag σ(1 − σ)`` for sigmoid; ``None`` otherwise."""
    from .potentials import CrossEntropy

    if not isinstance(potential, CrossEntropy) or potential.activation is None or halves != [potential.prediction]:
        return None
    z, y = potential._split(av, au)
    if potential.activation == "sigmoid":
        s = torch.sigmoid(z)
        return torch.diag_embed(s * (1 - s))
    p = torch.softmax(z, -1)
    return y.sum(-1)[:, None, None] * (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))


def _workspace(plan: PropagationPlan, name: str, numel: int, like: Tensor) -> Tensor:
    """A flat buffer of at least ``numel`` entries kept on the plan across calls (large fresh allocations
    fault their pages in on every call), one per thread; its contents are undefined."""
    work = plan.__dict__.setdefault("_workspace", {})
    key = (name, like.dtype, like.device, threading.get_ident())
    buf = work.get(key)
    if buf is None or buf.numel() < numel:
        buf = work[key] = like.new_empty(numel)
    return buf[:numel]


def _block_diagonal(blocks: list[Tensor]) -> Tensor:
    """``(B, k, k)`` from per-item square blocks ``(B, k_i, k_i)``."""
    if len(blocks) == 1:
        return blocks[0]
    B, k = blocks[0].shape[0], sum(b.shape[-1] for b in blocks)
    out = blocks[0].new_zeros(B, k, k)
    at = 0
    for b in blocks:
        n = b.shape[-1]
        out[:, at:at + n, at:at + n] = b
        at += n
    return out


def low_rank_newton(S, plan: PropagationPlan, x: Tensor, tol: float = 1e-10, max_iter: int = 10,
                    maps: dict | None = None) -> tuple[Tensor, dict, dict]:
    """Gauss–Newton steps for the equilibrium of a determined part plus a rest of low rank (module notes).

    Each step costs one pass over the edges (the gradient, which also measures stationarity),
    one transposed sweep of the determined part with ``1 + k + m`` right-hand sides per item
    (``k``: the dimension of the rest's edges; ``m``: coordinates held on kinks), small solves
    per item and one forward sweep. The step is exact for the Gauss–Newton model at the current
    point: for ReLU-type maps and quadratic rest edges it reaches the minimum of the current
    activation region, and from a warm start (the previous equilibrium, weights changed a little)
    a few steps converge (quadratically once the activation pattern settles).

    Kinks as in [`cellsheaf.gauss_newton.newton`][cellsheaf.gauss_newton.newton]: coordinates that sit
    on the kink of the piecewise-smooth map they feed at the start (a warm start from an equilibrium on a switching
    surface, Note 5.1), or that cross it on two steps running, are held there (a constraint of
    the step); stationarity is certified with both one-sided derivatives, and a held coordinate
    that one of them pushes off is let go. An item whose measure a step does not lower goes back
    and halves its step; after six halvings it stops, not converged (continue with Newton,
    [`cellsheaf.minimize`][cellsheaf.minimize.minimize], from the result).

    Parameters
    ----------
    S : Sheaf
    plan : PropagationPlan
        Of the determined part (e.g. [`cellsheaf.propagation.plan`][cellsheaf.propagation.plan] with
        ``edges=``); every other edge of ``S`` is the rest.
    x : tensor ``(B, C0)``
        The start, its fixed coordinates set (not changed).
    tol : float
        Stop when every item's stationarity measure is ``<= tol``.
    max_iter : int
        Newton steps at most.
    maps : dict, optional
        ``{(edge, side): map}``: also return those maps' local gradients (Eq. 24) at the result,
        from the same pass over the edges that measures its gradient.

    Returns
    -------
    x : the result (a new tensor) ; report : ``iterations``, ``grad_norm`` (``(B,)``, the
    stationarity measure), ``converged`` (``(B,)`` bool), ``on_kinks`` (held coordinates per item) ;
    grads : ``{(edge, side): tensor}`` for ``maps``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> I = torch.eye(1, dtype=torch.float64)
    >>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("h", 1); S.add_vertex("y", 1)
    >>> _ = S.add_edge("x", "h", 2 * I, I, name="in")
    >>> _ = S.add_edge("h", "y", 3 * I, I, name="out")           # y clamped: a stiff rest of rank 1
    >>> p = cs.propagation.plan(S, torch.tensor([0, 2]), edges=["in"])
    >>> x = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    >>> out, report, _ = cs.nudge.low_rank_newton(S, p, x)
    >>> round(out[0, 1].item(), 12), round((2 + 3) / (1 + 9), 12), report["iterations"]
    (0.5, 0.5, 1)
    """
    from .gauss_newton import _below, _kink_band, _kink_points, _nearest_kink, _stationarity
    from .learning import _edgewise

    used = {s.edge for s in plan.steps}
    rest = [name for name in S.edges if name not in used]
    fidx = plan.free.to(x.device)
    free = torch.zeros(S.C0, dtype=x.dtype, device=x.device)
    free[fidx] = 1.0
    winv = _inverse_weights(S, plan, x)
    B, n = x.shape[0], fidx.numel()
    points = _kink_points(S, plan.free)
    kinks = ~torch.isnan(points.to(x.dtype)).all(-1).to(x.device)
    x = x.clone()
    c = _nearest_kink(x[:, fidx], points)
    held = kinks & (x[:, fidx] == c)
    flips = torch.zeros(B, n, dtype=torch.long, device=x.device)
    t = torch.ones(B, dtype=x.dtype, device=x.device)  # per-item step length: halved when a step does not help
    prev, it, measure = None, 0, None
    while True:
        g, grads = _edgewise(S, x, maps or {}, skip=plan.fixed_vertices)
        gf = g[:, fidx]
        norm = gf.masked_fill(held, 0.0).norm(dim=-1)
        reverted = False
        if prev is not None:
            x0, g0, n0, moved = prev
            worse = moved & ~(norm < n0)  # also NaN: that item goes back and halves its step
            reverted = bool(worse.any())
            if reverted:
                x, gf, norm = torch.where(worse[:, None], x0, x), torch.where(worse[:, None], g0, gf), \
                    torch.where(worse, n0, norm)
            t = torch.where(worse, t / 2, torch.ones_like(t))
        measure, leave, left = (norm, None, None) if not bool((norm <= tol).any()) else \
            _stationarity(S, x, fidx, gf, held, points, tol, lambda y: _edgewise(S, y, {}, skip=plan.fixed_vertices)[0])
        if leave is not None and bool(leave.any()):  # a one-sided derivative pushes a held coordinate off
            go = leave & (norm <= tol).unsqueeze(-1)
            held = held & ~go
            # leaving to the left: just below the kink; to the right: on it (the selection rule sees the right there)
            xf = x[:, fidx]
            ck = _nearest_kink(xf, points)
            x[:, fidx] = torch.where(go & left, _below(ck), torch.where(go, ck, xf))
            t = torch.where(go.any(-1), torch.ones_like(t), t)
            # the gradient at the moved coordinates is the one-sided derivative of their side
            gf = _edgewise(S, x, {}, skip=plan.fixed_vertices)[0][:, fidx]
            norm = gf.masked_fill(held, 0.0).norm(dim=-1)  # the merit of the next step counts the released ones
            prev, reverted = None, True
            measure = torch.where(go.any(-1), torch.full_like(measure, math.inf), measure)
        active = (measure > tol) & (t >= 2.0 ** -6)
        if it == max_iter or not bool(active.any()):
            break
        it += 1
        prev = (x, gf, norm, active)
        before = x[:, fidx] >= c
        if bool(active.all()):
            x = x + t[:, None] * _step(S, plan, x, gf, held, fidx, free, winv, rest)
        else:  # only the items still moving take the step (the sweeps' cost is per item)
            idx = torch.nonzero(active).flatten()
            x = x.index_add(0, idx, t[idx, None] * _step(S, plan, x[idx], gf[idx], held[idx], fidx, free, winv, rest))
        # a kink coordinate that crossed its kink on two steps running zigzags across a switching surface: hold it
        xf = x[:, fidx]
        c = _nearest_kink(xf, points)
        crossed = kinks & ((xf >= c) != before) & active[:, None]
        flips = torch.where(crossed, flips + 1, torch.zeros_like(flips))
        newly = (flips >= 2) & ~held
        if bool(newly.any()):
            held = held | newly
            x[:, fidx] = torch.where(newly, c, xf)
            flips = flips.masked_fill(newly, 0)
            prev = None
    if reverted and maps:  # some items went back: their share of the local gradients is recomputed
        grads = _edgewise(S, x, maps)[1]
    return x, {"iterations": it, "grad_norm": measure, "converged": measure <= tol, "on_kinks": held.sum(-1)}, grads


def clamped_equilibrium(S, plan: PropagationPlan, x: Tensor, tol: float = 1e-10,
                        max_iter: int = 10) -> tuple[Tensor, dict]:
    """The equilibrium of a determined part plus a rest of low rank by exact steps to the minimum of the
    current activation region (module notes).

    Inside one activation region (piecewise-linear maps with their pattern fixed) the energy is
    ``½ pᵀWp + U(s_lin + Yᵀp)`` in the determined part's discrepancies ``p``, with ``U`` the rest's
    potential and ``s`` its ``k`` arguments, so its minimum is ``p = −W⁻¹Yλ``, ``λ = ∇U(s)``, where
    ``s + M∇U(s) = s_lin`` with ``M = YᵀW⁻¹Y`` (``k × k`` per item). A step is one pass over the
    edges (the gradient, which also measures stationarity), one transposed sweep with ``1 + k``
    right-hand sides per item (the Gram matrix of `low_rank_newton` without its held columns), Newton
    iterations on that ``k``-dimensional equation per item (one for a quadratic rest) and one forward
    sweep. A step whose activation pattern holds lands on the equilibrium (to rounding): from a warm
    start (the last equilibrium, weights changed a little) one step, and one more per change of the
    pattern. An item whose gradient norm a step does not lower goes back and stops, not converged
    (a zigzag across a switching surface, Note 5.1: continue with `low_rank_newton`, which holds
    coordinates on kinks).

    Parameters
    ----------
    S : Sheaf
    plan : PropagationPlan
        Of the determined part (as for `low_rank_newton`); every other edge of ``S`` is the rest.
    x : tensor ``(B, C0)``
        The start, its fixed coordinates set (not changed).
    tol : float
        Stop when every item's free gradient norm is ``<= tol``.
    max_iter : int
        Steps at most.

    Returns
    -------
    x : the result (a new tensor) ; report : ``iterations``, ``grad_norm`` (``(B,)``, the free gradient
    norm at the result), ``converged`` (``(B,)`` bool).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> I = torch.eye(1, dtype=torch.float64)
    >>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("h", 1); S.add_vertex("y", 1)
    >>> _ = S.add_edge("x", "h", 2 * I, I, name="in")
    >>> _ = S.add_edge("h", "y", 3 * I, I, name="out")           # y clamped: a stiff rest of rank 1
    >>> p = cs.propagation.plan(S, torch.tensor([0, 2]), edges=["in"])
    >>> x = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    >>> out, report = cs.nudge.clamped_equilibrium(S, p, x)
    >>> round(out[0, 1].item(), 12), report["iterations"], bool(report["converged"])
    (0.5, 1, True)
    """
    from .gauss_newton import _below, _kink_points, _nearest_kink
    from .learning import _edgewise

    used = {s.edge for s in plan.steps}
    rest = [name for name in S.edges if name not in used]
    fidx = plan.free.to(x.device)
    free = torch.zeros(S.C0, dtype=x.dtype, device=x.device)
    free[fidx] = 1.0
    winv = _inverse_weights(S, plan, x)
    points = _kink_points(S, plan.free)
    kinks = ~torch.isnan(points.to(x.dtype)).all(-1).to(x.device)
    x = x.clone()
    held = kinks & (x[:, fidx] == _nearest_kink(x[:, fidx], points))  # the last equilibrium's active set
    stalled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    grad = lambda y: _edgewise(S, y, {}, skip=plan.fixed_vertices)[0]  # noqa: E731
    prev, it = None, 0
    while True:
        gf = grad(x)[:, fidx]
        norm = gf.masked_fill(held, 0.0).norm(dim=-1)
        if prev is not None:  # an item whose step kept its active set must have lowered its gradient
            x0, g0, n0, moved = prev
            worse = moved & ~(norm < n0)  # also NaN: that item goes back and stops
            if bool(worse.any()):
                x, gf, norm = torch.where(worse[:, None], x0, x), torch.where(worse[:, None], g0, gf), \
                    torch.where(worse, n0, norm)
                stalled |= worse
        measure = norm
        if bool(held.any()) and bool((norm <= tol).any()):  # at the kinks: both one-sided derivatives
            measure, leave, left = _held_stationarity(S, x, fidx, gf, held, points, tol)
            go = leave & ((norm <= tol) & ~stalled).unsqueeze(-1)
            if bool(go.any()):  # a one-sided derivative pushes a held coordinate off: let it go to that side
                held = held & ~go
                xf = x[:, fidx]
                ck = _nearest_kink(xf, points)
                x[:, fidx] = torch.where(go & left, _below(ck), torch.where(go, ck, xf))
                gf = grad(x)[:, fidx]
                norm = gf.masked_fill(held, 0.0).norm(dim=-1)
                measure = torch.where(go.any(-1), torch.full_like(measure, math.inf), measure)
        active = (measure > tol) & ~stalled
        if it == max_iter or not bool(active.any()):
            break
        it += 1
        before, start = x[:, fidx] >= _nearest_kink(x[:, fidx], points), (x, gf, norm)
        if bool(active.all()):
            x = x + _region_step(S, plan, x, gf, held, fidx, free, winv, rest, tol)
        else:  # only the items still moving take the step (the sweeps' cost is per item)
            idx = torch.nonzero(active).flatten()
            x = x.index_add(0, idx, _region_step(S, plan, x[idx], gf[idx], held[idx], fidx, free, winv, rest, tol))
        # a coordinate that crossed its kink left the region: it stops on the kink, held (the active set grows)
        xf = x[:, fidx]
        c = _nearest_kink(xf, points)
        crossed = kinks & ((xf >= c) != before) & active[:, None] & ~held
        if bool(crossed.any()):
            held = held | crossed
            x[:, fidx] = torch.where(crossed, c, xf)
        prev = (*start, active & ~crossed.any(-1))
    norm = measure
    return x, {"iterations": it, "grad_norm": norm, "converged": norm <= tol}


def _held_stationarity(S, x: Tensor, fidx: Tensor, gf: Tensor, held: Tensor, points: Tensor,
                       tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(measure, leave, left)`` as `cellsheaf.gauss_newton._stationarity`, for coordinates ``held`` exactly on
    their kinks: ``gf`` holds the right derivatives there (the selection rule), and the left ones differ only by
    the maps with kinks, whose edges' forces are the same on both sides (the maps are continuous), so they
    come from those maps' pullbacks at the point just left of the kinks, without a pass over the edges."""
    from .gauss_newton import _below, _nearest_kink

    xf = x[:, fidx]
    x_left = x.clone()
    x_left[:, fidx] = torch.where(held, _below(_nearest_kink(xf, points)), xf)
    jump = torch.zeros_like(x)
    for name, side in _kinked_maps(S):
        e = S.edge(name)
        gv, gu = edge_forces(S, name, x)
        F, sl, f = (e.Fu, S.vertex_slice(e.u), gu) if side == "u" else (e.Fv, S.vertex_slice(e.v), gv)
        jump[:, sl] += F.vjp(x_left[:, sl], f) - F.vjp(x[:, sl], f)
    g_left = gf + jump[:, fidx]
    d = torch.where(g_left > 0, g_left, torch.where(gf < 0, gf, torch.zeros_like(gf))).masked_fill(~held, 0.0)
    leave = held & (d.abs() > 0.1 * tol)
    return (gf.masked_fill(held, 0.0).square().sum(-1) + d.square().sum(-1)).sqrt(), leave, leave & (g_left > 0)


def _kinked_maps(S) -> list[tuple[str, str]]:
    """``(edge, side)`` of the maps with kinks (those `cellsheaf.gauss_newton._kink_points` reads)."""
    from .maps import Compose, Elementwise

    out = []
    for e in S.edge_items():
        for F, side in ((e.Fu, "u"), (e.Fv, "v")):
            inner = F.outer if isinstance(F, Compose) else F
            if isinstance(inner, Elementwise) and inner.kinks:
                out.append((e.name, side))
    return out


def _inverse_weights(S, plan: PropagationPlan, x: Tensor) -> Tensor:
    """``W⁻¹`` of the determined part on its edge space (``(n_e,)``, in step order)."""
    return torch.cat([torch.full((s.span.stop - s.span.start if s.span is not None else len(s.targets),),
                                 1.0 / S.edge(s.edge).weight, dtype=x.dtype, device=x.device) for s in plan.steps])


def _region_step(S, plan, x: Tensor, gf: Tensor, held: Tensor, fidx: Tensor, free: Tensor, winv: Tensor, rest,
                 tol: float) -> Tensor:
    """The step (``(B, C0)``) of `clamped_equilibrium` at ``x``: to the minimum of its activation region with
    the ``held`` coordinates kept (on their kinks).

    With ``u = W r_D + Y g₀`` (``r_D`` the determined part's discrepancies, ``g₀ = ∇U(s₀)``) the first
    column of `_sweep`, the region's rest arguments at zero discrepancy are ``s_lin = s₀ − Γ[Y, u] + M g₀``.
    The held coordinates (columns ``H``) enter by multipliers ``ν``: eliminating them leaves the same
    ``k``-dimensional equation ``s + M̃λ = s̃_lin``, ``λ = ∇U(s)``, with the Schur complement
    ``M̃ = M − Γ[Y, H] Γ[H, H]⁻¹ Γ[H, Y]`` and ``s̃_lin = s_lin + Γ[Y, H] Γ[H, H]⁻¹ (Γ[H, u] − Γ[H, Y] g₀)``;
    then ``ν = Γ[H, H]⁻¹ (Γ[H, Y](g₀ − λ) − Γ[H, u])`` and the step is
    ``J_Ω⁻¹ W⁻¹ (−u + Y (g₀ − λ) − H ν)``."""
    B = x.shape[0]
    pieces, k, s0, derivatives = _rest_rows(S, x, rest, free)
    m = int(held.sum(-1).max()) if held.numel() else 0
    r = 1 + k + m
    Zs, Gam = _sweep(S, plan, x, gf, held, fidx, winv, pieces, k, m)
    iy, ih = slice(1, 1 + k), slice(1 + k, r)
    c = x.new_empty(B, r)
    c[:, 0] = -1.0
    g0, H = derivatives(s0)
    M = Gam[:, iy, iy]
    s_lin = s0 - Gam[:, iy, 0] + (M @ g0.unsqueeze(-1)).squeeze(-1)
    if m:
        pad = (torch.arange(m, device=x.device)[None, :] >= held.sum(-1, keepdim=True)).to(x.dtype)
        K = Gam[:, ih, ih] + torch.diag_embed(pad)  # padding rows: ν = 0
        KH = torch.linalg.solve(K, Gam[:, ih, :])  # Γ[H, H]⁻¹ Γ[H, :]
        M = M - Gam[:, iy, ih] @ KH[:, :, iy]
        s_lin = s_lin + (Gam[:, iy, ih] @ (KH[:, :, 0] - (KH[:, :, iy] @ g0.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)
                         ).squeeze(-1)
    dg = g0 - _rest_multipliers(M, s_lin, s0, g0, H, derivatives, 1e-2 * tol) if k else g0
    c[:, iy] = dg
    if m:
        c[:, ih] = KH[:, :, 0] - (KH[:, :, iy] @ dg.unsqueeze(-1)).squeeze(-1)  # −ν
    step = _combine(plan, x, Zs, c, winv)
    if m:
        sf = step[:, fidx]
        step[:, fidx] = sf.masked_fill(held, 0.0)  # exactly on the kink (the constraint holds to rounding)
    return step


def _rest_multipliers(M: Tensor, s_lin: Tensor, s: Tensor, g: Tensor, H: Tensor, derivatives,
                      tol: float, max_iter: int = 50) -> Tensor:
    """``λ = ∇U(s)`` (``(B, k)``) at the solution of ``F(s) = s + M ∇U(s) − s_lin = 0``, per item: Newton steps
    ``(I + M ∇²U) ds = −F``, an item's step halved until ``‖F‖`` falls; stops when every ``‖F‖ <= tol``
    or no item's residual falls any more (the rest's curvature model is not its Hessian: a kink)."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    F = s + (M @ g.unsqueeze(-1)).squeeze(-1) - s_lin
    f = F.norm(dim=-1)
    t = torch.ones_like(f)
    ds = None
    for _ in range(max_iter):
        moving = (f > tol) & (t >= 2.0 ** -20)
        if not bool(moving.any()):
            break
        if ds is None:
            ds = torch.linalg.solve(eye + M @ H, -F.unsqueeze(-1)).squeeze(-1)
        s_new = s + t[:, None] * ds
        g_new, H_new = derivatives(s_new)
        F_new = s_new + (M @ g_new.unsqueeze(-1)).squeeze(-1) - s_lin
        f_new = F_new.norm(dim=-1)
        better = moving & (f_new < f)
        s, g, H, F, f = (torch.where(better[:, None], s_new, s), torch.where(better[:, None], g_new, g),
                         torch.where(better[:, None, None], H_new, H), torch.where(better[:, None], F_new, F),
                         torch.where(better, f_new, f))
        t = torch.where(better, torch.ones_like(t), t / 2)
        if bool(better.any()):
            ds = None  # a new Newton direction where an item moved (recomputed for all: one batched solve)
    return g


def _step(S, plan, x: Tensor, gf: Tensor, held: Tensor, fidx: Tensor, free: Tensor, winv: Tensor, rest) -> Tensor:
    """The Gauss–Newton step (``(B, C0)``) of `low_rank_newton` at ``x``, the ``held`` coordinates kept.

    In the edge coordinates ``q`` of the determined part: ``A = W + Y C Yᵀ`` is inverted by
    Woodbury in the rest's ``k`` dimensions, the held coordinates (rows ``H = J_Ω⁻ᵀ e_i``) enter by
    their Lagrange multipliers, ``q = −A⁻¹(u + Hλ)`` with ``HᵀA⁻¹H λ = −HᵀA⁻¹u``. Every vector
    involved lies in the span of ``Z = [u | Y | H]`` (`_sweep`), so the algebra runs on the per-item
    Gram matrix ``Γ = Zᵀ W⁻¹ Z`` and ``q = W⁻¹ Z c`` for coefficients ``c``.
    """
    B = x.shape[0]
    pieces, k, s0, derivatives = _rest_rows(S, x, rest, free)
    C = derivatives(s0)[1]
    m = int(held.sum(-1).max()) if held.numel() else 0
    r = 1 + k + m
    Zs, Gam = _sweep(S, plan, x, gf, held, fidx, winv, pieces, k, m)
    iu, iy, ih = slice(0, 1), slice(1, 1 + k), slice(1 + k, r)
    if k:
        eye = torch.eye(k, dtype=x.dtype, device=x.device)
        # A⁻¹ Z_j = W⁻¹ (Z_j − Y β_j) with β = C (I + G C)⁻¹ Γ[Y, j]: beta for every column j of Z at once
        beta = C @ torch.linalg.solve(eye + Gam[:, iy, iy] @ C, Gam[:, iy, :])  # (B, k, r)
        AZ = Gam - Gam[:, :, iy] @ beta  # Zᵀ A⁻¹ Z (B, r, r)
    else:
        beta = None
        AZ = Gam
    # the coefficients c of q = W⁻¹ Z c: q = −A⁻¹(u + H λ)
    c = x.new_zeros(B, r, 1)
    c[:, 0] = -1.0
    if m:
        pad = (torch.arange(m, device=x.device)[None, :] >= held.sum(-1, keepdim=True)).to(x.dtype)
        K = AZ[:, ih, ih] + torch.diag_embed(pad)  # padding rows: λ = 0
        lam = -torch.linalg.solve(K, AZ[:, ih, iu])
        c[:, ih] = -lam
    if k:
        c[:, iy] = -(beta @ c)  # A⁻¹ (Z c) = W⁻¹ (Z c − Y β c)
    step = _combine(plan, x, Zs, c.squeeze(-1), winv)
    if m:
        sf = step[:, fidx]
        step[:, fidx] = sf.masked_fill(held, 0.0)  # exactly on the kink (the constraint holds to rounding)
    return step


def _sweep(S, plan, x: Tensor, gf: Tensor, held: Tensor | None, fidx: Tensor, winv: Tensor, pieces, k: int,
           m: int) -> tuple[Tensor, Tensor]:
    """``(Z, Γ)``: ``Z = J_Ω⁻ᵀ [u | Y | H]`` (``(1 + k + m, B, n_e)``, edge space, one transposed sweep with
    ``1 + k + m`` right-hand sides per item: the free gradient ``gf``, the rest's ``k`` rows ``pieces``
    and the ``m`` held coordinates of ``held``) and its per-item Gram matrix ``Γ = Zᵀ W⁻¹ Z``
    (``(B, r, r)``, one batched product), in work buffers kept on the plan."""
    B = x.shape[0]
    r = 1 + k + m
    rhs = _workspace(plan, "rhs", r * B * S.C0, x).view(r, B, S.C0).zero_()
    rhs[0, :, fidx] = gf.masked_fill(held, 0.0) if m else gf
    for j, sl, values in pieces:
        rhs[1 + j:1 + j + values.shape[0], :, sl] += values
    if m:
        rank = held.cumsum(-1) - 1  # the j-th held coordinate of an item is its row j
        b_idx, i_idx = torch.nonzero(held, as_tuple=True)
        rhs[1 + k + rank[b_idx, i_idx], b_idx, fidx[i_idx]] = 1.0
    ys = transposed_sweep(x, plan.steps, rhs.view(r * B, S.C0), plan.reads_free, overwrite=True)
    n_e = sum(y.shape[-1] for y in ys)
    Zs = torch.cat(ys, -1, out=_workspace(plan, "Z", r * B * n_e, x).view(r * B, n_e)).view(r, B, n_e)
    Z = _workspace(plan, "Zt", r * B * n_e, x).view(B, r, n_e)
    torch.mul(Zs.transpose(0, 1), winv.sqrt(), out=Z)  # (B, r, n_e): W^{-1/2} [u | Y | H] per item
    return Zs, Z @ Z.transpose(1, 2)


def _combine(plan, x: Tensor, Zs: Tensor, c: Tensor, winv: Tensor) -> Tensor:
    """The state step ``J_Ω⁻¹ W⁻¹ Z c`` (``(B, C0)``) for per-item coefficients ``c`` (``(B, r)``): one forward sweep."""
    r, B, n_e = Zs.shape
    q = torch.mul(Zs, c.T.unsqueeze(-1), out=_workspace(plan, "Zt", r * B * n_e, x).view(r, B, n_e)).sum(0)
    sizes = [s.span.stop - s.span.start if s.span is not None else len(s.targets) for s in plan.steps]
    return forward_sweep(x, plan.steps, list(q.mul_(winv).split(sizes, -1)), plan.reads_free)
