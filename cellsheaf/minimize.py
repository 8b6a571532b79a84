"""Nonlinear minimisation of the sheaf energy with boundary data: ``cs.minimize``.

Minimise ``E(x) = Σ_e w_e U_e(F_v(x_v), F_u(x_u))`` over the free coordinates,
with the stubborn coordinates held at their boundary values. Three methods:

``"euler"``
    The paper's gradient flow ``dω/dt = −α ∇_Ω E`` by forward Euler
    ([`cellsheaf.diffuse`][cellsheaf.diffusion.diffuse]), with the step checked against the stability
    bound of the current linearisation and an optional per-edge energy record.
``"propagate"``
    Forward substitution along a triangular order, for *determined* sheaves
    ([`cellsheaf.propagation`][cellsheaf.propagation]): every compiled feedforward network. Exact in
    one pass; the zero discord of the result is verified.
``"newton"``
    Gauss–Newton / active-set Newton with a line search ([`cellsheaf.gauss_newton`][cellsheaf.gauss_newton]):
    pins, penalty edges, tall ``δ_Ω``, non-quadratic potentials.

``"auto"`` propagates when the sheaf is determined and otherwise runs Newton.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("z", 1); S.add_vertex("a", 1)
>>> I = cs.maps.Identity(1)
>>> _ = S.add_edge("x", "z", 2 * torch.eye(1, dtype=torch.float64), I)
>>> _ = S.add_edge("z", "a", cs.maps.ReLU(1), I)
>>> b = cs.Boundary().fix("x", torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
>>> res = cs.minimize(S, b)
>>> res.method, res.converged, res.x["a"].flatten().tolist()
('propagate', True, [2.0, 0.0])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .boundary import Boundary, ResolvedBoundary
from .cochain import Cochain, as_flat, check_finite
from .validation import check_number, tolerance_scale
from .diffusion import diffuse
from .energy import edge_energies, gradient
from .gauss_newton import NewtonOptions, newton
from .propagation import NotDeterminedError, plan, propagate
from .results import Result

__all__ = ["minimize", "check_maps", "default_tol"]

_METHODS = ("auto", "euler", "propagate", "newton")


def default_tol(dtype: torch.dtype) -> float:
    """Default gradient-norm tolerance: ``1e-10`` in float64, ``1e-4`` in lower precision."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def check_maps(S, x: Tensor) -> None:
    """Apply every restriction map at ``x`` and raise ``ValueError`` naming the edge whose map fails,
    returns the wrong shape or a non-finite value.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", cs.maps.Function(torch.log, 1, 1), torch.eye(1), name="e")
    >>> from cellsheaf.minimize import check_maps
    >>> check_maps(S, torch.tensor([-1.0, 0.0]))
    Traceback (most recent call last):
    ...
    ValueError: edge 'e': map Fu = Function('log', 1 -> 1) gives a non-finite value at this point
    """
    finite, where = [], []
    for e in S.edge_items():
        for side, F, w in (("Fu", e.Fu, e.u), ("Fv", e.Fv, e.v)):
            xs = x[..., S.vertex_slice(w)]
            try:
                y = F.apply(xs)
            except Exception as err:
                raise ValueError(f"edge {e.name!r}: map {side} = {F!r} failed on the value at vertex {w!r}: "
                                 f"{err}") from err
            want = (*xs.shape[:-1], e.dim)
            if not isinstance(y, Tensor) or tuple(y.shape) != want:
                got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"edge {e.name!r}: map {side} = {F!r} returned shape {got}, expected {want}")
            finite.append(torch.isfinite(y).all())
            where.append((e, side, F))
    for ok, (e, side, F) in zip(torch.stack(finite).tolist() if finite else [], where):  # one host read
        if not ok:
            raise ValueError(f"edge {e.name!r}: map {side} = {F!r} gives a non-finite value at this point")


def _initial_point(S, rb, x0, dtype) -> Tensor:
    if x0 is None:
        x = torch.zeros(S.C0, dtype=dtype, device=rb.values.device)
    else:
        x = as_flat(S, x0)
        x = x.to(dtype) if not x.is_floating_point() else x.to(torch.promote_types(x.dtype, dtype))
        check_finite(x, "the initial point x0")
    return rb.fill(x)


def minimize(
    S,
    boundary: Boundary | None = None,
    method: str = "auto",
    x0=None,
    tol: float | None = None,
    max_iter: int | None = None,
    dt: float | None = None,
    alpha: float = 1.0,
    record: bool | int = False,
    options: NewtonOptions | None = None,
) -> Result:
    """Minimise the energy over the free coordinates, the boundary coordinates held fixed.

    Parameters
    ----------
    S : Sheaf
        Any sheaf: nonlinear maps and any edge potentials.
    boundary : Boundary, optional
        Stubborn coordinates and their values (``(k,)`` or batched ``(B, k)``).
    method : {"auto", "euler", "propagate", "newton"}
        See the module documentation. ``"propagate"`` on a sheaf that is not
        determined raises [`NotDeterminedError`][cellsheaf.propagation.NotDeterminedError] saying why.
    x0 : Cochain or tensor, optional
        Starting point of ``"euler"``/``"newton"`` (default zeros); its fixed
        coordinates are overwritten by the boundary values.
    tol : float, optional
        Stop when every item's gradient norm on the free coordinates is ``<= tol``
        (default [`default_tol`][cellsheaf.minimize.default_tol]: ``1e-10`` in float64), times the largest diagonal entry of the
        Laplacian when that is below 1 (a linear sheaf with tiny maps has tiny gradients everywhere:
        `cellsheaf.validation.tolerance_scale`). For ``"propagate"`` convergence is zero discord up
        to rounding.
    max_iter : int, optional
        Iteration cap: Euler steps (default 100 000) or Newton steps (default 100).
    dt, alpha : float
        Euler step and rate ``α``; ``dt`` defaults to ``1/(α λ_max)`` and a step above
        the stability bound ``2/(α λ_max)`` raises ``ValueError``.
    record : bool or int
        Record the energy of every edge every ``record`` steps (``True``: each step)
        into ``result.extra["trajectory"]`` (``"euler"`` and ``"newton"``).
    options : NewtonOptions, optional
        Tuning of ``"newton"``.

    Returns
    -------
    Result
        ``x`` (a Cochain, batched when the boundary or ``x0`` is), ``method`` (the one
        that ran), ``converged``, ``iterations``, ``energy``, ``residual``/``grad_norm``
        (largest free-gradient norm over the batch; for ``"newton"`` the Clarke
        stationarity, which also certifies equilibria on ReLU switching surfaces and max-pool
        ties) and ``message``; ``extra`` holds per-item ``converged`` and ``grad_norm``, why
        ``"auto"`` chose its method and, for ``"newton"``, ``on_kinks`` (coordinates
        resting on ReLU kinks per item), ``on_ties`` (max-pool windows resting on a tie of
        their inputs per item, [`cellsheaf.ties`][cellsheaf.ties]), ``stalled`` and ``cg_iterations``.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64),
    ...                potential=cs.potentials.Huber(0.5))
    >>> pin = cs.soft_pin(S, "b", torch.tensor([2.0], dtype=torch.float64))
    >>> b = pin.boundary(cs.Boundary().fix("a", torch.tensor([0.0], dtype=torch.float64)))
    >>> res = cs.minimize(S, b)
    >>> res.method, res.converged, round(float(res.x["b"]), 6)
    ('newton', True, 1.5)
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    check_number(alpha, "alpha", positive=True, none=False)
    check_number(tol, "tol")
    check_number(max_iter, "max_iter", integer=True)
    check_number(dt, "dt", positive=True)
    boundary = boundary or Boundary()
    rb = boundary.resolve(S)
    dtype = torch.promote_types(rb.values.dtype, S.dtype) if rb.values.numel() else S.dtype
    x = _initial_point(S, rb, x0, dtype)
    if (rb.values.dtype, rb.values.device) != (x.dtype, x.device):
        rb = ResolvedBoundary(rb.fixed.to(x.device), rb.free.to(x.device), rb.values.to(x.dtype).to(x.device))
        x = rb.fill(x)
    given = default_tol(x.dtype) if tol is None else float(tol)
    tol = given * tolerance_scale(S, x.dtype)  # diffuse scales the given tol itself
    if x.dim() == 2 and x.shape[0] == 0:  # an empty batch: nothing to minimise
        none = x.new_zeros(0)
        return _finish(S, x, rb.free, "propagate" if method == "propagate" else method, tol, 0, "", {},
                       "empty batch", grad_norm=none, energy=none)
    why = ""
    if method in ("auto", "propagate"):
        try:
            compiled = plan(S, rb.fixed)
        except NotDeterminedError as err:
            if method == "propagate":
                raise NotDeterminedError(f"method='propagate' does not apply: {err}; use method='newton' or "
                                         "'euler'") from None
            why, method = f"not determined ({err})", "newton"
        else:
            why, method = "the sheaf is determined", "propagate"
    if method != "propagate":  # propagation checks every map it applies
        check_maps(S, x)
    if method == "euler":
        res = diffuse(S, x, boundary=boundary, method="euler", dt=dt, tol=given, alpha=alpha,
                      max_steps=100_000 if max_iter is None else max_iter, record=record)
        return _finish(S, res.x.flat, rb.free, "euler", tol, res.steps, res.message, dict(res.extra, t=res.t))
    xb = x if x.dim() == 2 else x.unsqueeze(0)
    if method == "propagate":
        if compiled.needs_autograd(xb):
            out, residuals = propagate(S, xb, compiled.steps, residuals=True, inplace=True)  # x is a fresh tensor
        else:
            out = compiled.run(xb)
            residuals = compiled.residuals(out)
        return _verify_propagation(S, out if x.dim() == 2 else out[0], rb.free, tol, why, residuals)
    out, report = newton(S, xb, rb.free, tol, 100 if max_iter is None else max_iter, options, record=record)
    extra = {"cg_iterations": report["cg_iterations"], "stalled": report["stalled"], "on_kinks": report["on_kinks"],
             "on_ties": report["on_ties"]}
    if record:
        extra["trajectory"] = report["trajectory"]
    one = (lambda t: t) if x.dim() == 2 else (lambda t: t[0])
    res = _finish(S, one(out), rb.free, "newton", tol, report["iterations"], _newton_message(report, tol), extra,
                  why, grad_norm=one(report["grad_norm"]), energy=one(report["energy"]))
    kinks = report["on_kinks"][report["converged"]]
    if res.converged and bool((kinks > 0).any()):
        res.message = (f"converged; {int((kinks > 0).sum())} item(s) rest on ReLU switching surfaces (Note 5.1): "
                       "coordinates held at z = 0 where a ≠ relu(z) is possible, so the point is stationary in the "
                       "Clarke sense (grad_norm measures the distance of 0 to the Clarke subdifferential), not a "
                       "global section")
    ties = report["on_ties"][report["converged"]]
    if res.converged and bool((ties > 0).any()):
        res.message = ((res.message + "; " if res.message else "converged; ") +
                       f"{int((ties > 0).sum())} item(s) rest on max-pool ties (inputs of a window held equal to "
                       "its maximum: stationary in the Clarke sense on the tie)")
    return res


def _newton_message(report: dict, tol: float) -> str:
    bad = ~report["converged"]
    if not bool(bad.any()):
        return ""
    n, worst = int(bad.sum()), float(report["grad_norm"][bad].max())
    if bool(report["stalled"].any()):
        return (f"{n} item(s) not converged: Newton stopped decreasing the energy with a stationarity measure up "
                f"to {worst:.3g} > tol {tol:.3g}. The point is likely near a kink of a non-smooth potential (L1) "
                "or a switching surface of a piecewise-linear map other than a coordinate kink or a max-pool tie "
                "of free inputs (Note 5.1), not a smooth stationary point")
    return f"{n} item(s) not converged after {report['iterations']} Newton steps: gradient norm {worst:.3g} > tol"


def _finish(S, x: Tensor, free: Tensor, method: str, tol: float, iterations: int, message: str,
            extra: dict, why: str = "", grad_norm: Tensor | None = None, energy: Tensor | None = None) -> Result:
    gn = gradient(S, x)[..., free].norm(dim=-1) if grad_norm is None else grad_norm
    converged = gn <= tol
    energy = edge_energies(S, x).sum(-1) if energy is None else energy
    if why:
        extra["auto"] = why
    extra.update(converged=converged, grad_norm=gn)
    ok = bool(converged.all())
    if not ok and not message:
        message = f"gradient norm {float(gn.max()):.3g} > tol {tol:.3g}"
    return Result(method, ok, iterations, float(gn.max()) if gn.numel() else 0.0, energy=energy,
                  message="" if ok else message, extra=extra, x=Cochain(S, x))


def _verify_propagation(S, x: Tensor, free: Tensor, tol: float, why: str, residuals: dict) -> Result:
    """Check the zero discord of a propagated cochain (up to rounding in the maps' scale).

    The discrepancies come from the sweep (each map applied once; edges left out of
    ``residuals`` hold exactly). Where they are exactly zero so is the energy gradient
    (every potential of a determined sheaf is minimised at zero discrepancy), so no
    extra pass over the maps is needed.
    """
    xb = x if x.dim() == 2 else x.unsqueeze(0)
    rs = [r if r.dim() == 2 else r.unsqueeze(0) for r in residuals.values()]
    zero = xb.new_zeros(xb.shape[0])
    if all(not bool(r.any()) for r in rs):  # zero discord, zero energy, zero gradient
        out = zero[0] if x.dim() == 1 else zero
        res = _finish(S, x, free, "propagate", tol, 1, "", {}, why, grad_norm=out, energy=out)
        res.extra["discord"] = out
        return res
    inf = float("inf")
    discord = torch.stack([torch.linalg.vector_norm(r, inf, -1) if r.shape[-1] else zero for r in rs]).amax(0) \
        if rs else zero
    ok = discord <= 1e3 * torch.finfo(x.dtype).eps * (1.0 + torch.linalg.vector_norm(xb, inf, -1))
    energy = zero.clone()
    for name, r in zip(residuals, rs):
        e = S.edge(name)
        energy += e.weight * (0.5 * (r * r).sum(-1) if e.potential is None else e.potential.value(r))
    if x.dim() == 1:
        discord, ok, energy = discord[0], ok[0], energy[0]
    res = _finish(S, x, free, "propagate", tol, 1, "", {}, why, energy=energy)
    res.extra["discord"] = discord
    res.converged = bool(ok.all())
    res.extra["converged"] = ok
    res.message = "" if res.converged else (
        f"propagation left a discord of {float(discord.max()):.3g} on some edge: a map is not evaluated "
        "consistently (e.g. a callable that is not deterministic)")
    return res
