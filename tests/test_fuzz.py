"""Bad-input fuzz over the public entry points: every bad call is a clear error or an honest report.

Hypothesis draws calls to `cellsheaf.harmonic_extension`, `cellsheaf.diffuse`, `cellsheaf.minimize`,
`NeuralSheaf.infer`, `NeuralSheaf.pin` (then `infer`) and `SheafTrainer` (construction and `fit`) with
arguments taken from pools of good and bad values: wrong dtypes (integers, booleans, complex, strings),
NaN/Inf, wrong shapes, empty batches (B = 0), negative/NaN/Inf/huge/tiny ``t``, ``dt``, ``lr``, ``tol``,
``max_steps``, unknown vertices, wrong pin coordinates, unknown methods and options.

Each call ends in exactly one of these outcomes (the rule the test enforces):

* **clear error** — an exception of a documented kind (``ValueError``, ``TypeError``, ``KeyError``,
  ``IndexError``, ``FloatingPointError`` or a subclass, or `ConvergenceError`) raised by a ``raise``
  statement in cellsheaf/cellsheaf_nn itself (the innermost traceback frame is in the package: an error
  that torch, numpy or Python raises from inside a package call does not count), with a non-empty message;
* **flagged** — a result that says ``converged=False`` (or a `ConvergenceError`);
* **success** — a result that says converged and agrees with an independent computation: dense linear
  algebra for harmonic extension, linear minimisation and diffusion limits, ``model(x)`` for unpinned
  inference, the pinned values and a recomputed stationarity for pinned inference, finite weights after
  training;
* a call given a complex value must raise (it is never cut to its real part);
* **raw error** (anything else), **hang** (a call still running after ``_CPU_LIMIT`` CPU seconds or
  ``_WALL_LIMIT`` wall seconds, stopped by a timer signal) or **silent wrong** (success whose answer disagrees): each fails the test.

The test asserts at least 500 calls, and zero raw errors, hangs and silent wrong answers.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import traceback
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellsheaf as cs
import cellsheaf_nn as csnn
from cellsheaf.energy import gradient

F64 = torch.float64
_CPU_LIMIT = 5.0  # CPU seconds per call (robust to a loaded machine); the cheap calls take milliseconds
_WALL_LIMIT = 120.0  # wall seconds per call: catches a call that blocks without computing
_PACKAGE = tuple(os.path.dirname(m.__file__) + os.sep for m in (cs, csnn))
_CLEAR = (ValueError, TypeError, KeyError, IndexError, FloatingPointError, csnn.ConvergenceError)


class Hang(BaseException):
    """Raised by the alarm inside a call that runs too long."""


# ---------------------------------------------------------------------------- fixtures built once


def _path_sheaf() -> cs.Sheaf:
    """a - b - c with 2-dim stalks and generic invertible maps."""
    g = torch.Generator().manual_seed(0)
    S = cs.Sheaf()
    for v in "abc":
        S.add_vertex(v, 2)
    for u, v in ("ab", "bc"):
        S.add_edge(u, v, torch.eye(2, dtype=F64) + 0.3 * torch.randn(2, 2, generator=g, dtype=F64),
                   torch.eye(2, dtype=F64) + 0.3 * torch.randn(2, 2, generator=g, dtype=F64), name=u + v)
    return S


SHEAF = _path_sheaf()
L_DENSE = SHEAF.laplacian().to_dense().numpy()
torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
NS = csnn.compile(MODEL)
SOFTMAX_MODEL = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3),
                                    torch.nn.Softmax(dim=1)).double()
SOFTMAX_NS = csnn.compile(SOFTMAX_MODEL)


# ---------------------------------------------------------------------------- pools of arguments
#
# Each argument is drawn from its good values three times in four, else from its bad values, so that many
# calls get past the first check and exercise the solvers with the remaining bad arguments.


def pick(draw, good: list, bad: list):
    """A good value (probability 3/4) or a bad one."""
    if draw(st.booleans()) or draw(st.booleans()):
        return draw(st.sampled_from(good))
    return draw(st.sampled_from(bad))


def good_values(d: int) -> list:
    return [torch.ones(d, dtype=F64), torch.randn(3, d, dtype=F64), torch.ones(d, dtype=torch.float32),
            torch.arange(d), [1.0] * d, np.linspace(-1.0, 1.0, d), torch.zeros(0, d, dtype=F64),
            torch.full((d,), 1e-300, dtype=F64), torch.full((d,), 1e6, dtype=F64)]


def bad_values(d: int) -> list:
    return [torch.ones(d, dtype=torch.bool), torch.ones(d, dtype=torch.complex128) * (1 + 1j),
            torch.full((d,), float("nan"), dtype=F64), torch.full((d,), float("inf"), dtype=F64),
            torch.ones(d + 1, dtype=F64), torch.ones(2, 3, d, dtype=F64), torch.full((d,), 1e300, dtype=F64),
            np.ones(d, dtype=np.complex128), "abc", None, 7, [[1.0], [2.0, 3.0]], torch.ones(3, d, dtype=torch.int8),
            1j]


BAD_NUMBERS = [-1.0, 0.0, float("nan"), float("inf"), -float("inf"), 1e300, "x", 1.5, True, 10 ** 20, 1j, -5,
               torch.tensor(float("nan"))]
GOOD = {"t": [None, 0.0, 0.1, 1.0, 5.0], "dt": [None, 0.01, 0.1, 1e-300], "tol": [None, 1e-10, 1e-6, 1e-300, 0.1],
        "alpha": [1.0, 0.5, 2.0, 1e-3], "max_steps": [5000, 1, 0, 10], "max_iter": [None, 100, 1, 0],
        "lr": [None, 1e-3, 0.1], "strength": [None, None, 1.0, 1e-6, 1e6]}
METHODS = {"harmonic_extension": ["auto", "direct", "cg"], "diffuse": ["euler", "rk4", "exact"],
           "minimize": ["auto", "euler", "propagate", "newton"],
           "infer": ["auto", "propagate", "newton", "euler", "diffusion"]}
BAD_METHODS = ["bogus", None, 3, "AUTO"]
VERTICES, BAD_VERTICES = ["a", "b", "c"], ["zz", None, 3, ("a",)]
COORDS, BAD_COORDS = [None, [0], [1], [0, 1]], [[5], [-1], [0, 0], "a", [0.5], [], 0]


def options(draw, names) -> dict:
    """Keyword arguments: each of ``names`` left out, good or bad."""
    kw = {}
    for name in names:
        if draw(st.booleans()):
            kw[name] = pick(draw, GOOD[name], BAD_NUMBERS)
    return kw


# ---------------------------------------------------------------------------- the checks


def _close(a, b, scale: float = 1.0) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= 1e-6 * (scale + np.abs(b))))


def _check_linear_solution(x: cs.Cochain, b: cs.Boundary, tol: float | None = None) -> bool:
    """Dense check of a linear solve: the boundary values hold and ``L[Ω,:] x = 0`` (the first-order condition,
    which on a unique problem is the harmonic extension itself)."""
    rb = b.resolve(SHEAF)
    X = x.flat.detach().double().numpy().reshape(-1, L_DENSE.shape[0])
    V = rb.values.double().numpy().reshape(-1, rb.fixed.numel())
    if not np.allclose(X[:, rb.fixed.numpy()], V, rtol=1e-6, atol=1e-300):
        return False
    free = rb.free.numpy()
    R = X @ L_DENSE[:, free]
    scale = np.abs(L_DENSE).max() * np.maximum(np.abs(X).max(axis=1), 1e-300)
    bound = np.maximum(1e-6 * scale, 10 * (tol or 0.0))  # a caller's loose tol is honoured, not a defect
    return bool(np.all(np.abs(R).max(axis=1) <= bound)) if R.size else True


class Outcome(Exception):
    """Carries a verdict out of a call: ``"flagged"``, ``"ok"`` or ``"wrong: why"``."""


def _verdict(converged: bool, right) -> str:
    if not converged:
        return "flagged"
    return "ok" if right() else "wrong"


# ---------------------------------------------------------------------------- the calls


def _boundary(draw, d: int = 2) -> cs.Boundary:
    """One or two fixed vertices with good or bad names, coordinates and values."""
    coords = pick(draw, COORDS, BAD_COORDS)
    k = len(coords) if isinstance(coords, list) and coords else d
    b = cs.Boundary().fix(pick(draw, VERTICES, BAD_VERTICES), pick(draw, good_values(k), bad_values(k)),
                          coords=coords)
    if draw(st.booleans()):
        b.fix("c", pick(draw, good_values(d), bad_values(d)))
    return b


def call_harmonic(draw) -> str:
    b = _boundary(draw)
    kw = options(draw, ["tol"])
    x = cs.harmonic_extension(SHEAF, b, method=pick(draw, METHODS["harmonic_extension"], BAD_METHODS), **kw)
    if x.info.converged and not math.isfinite(x.info.residual):
        return "wrong: converged with a non-finite residual"
    return _verdict(x.info.converged, lambda: _check_linear_solution(x, b))


def call_diffuse(draw) -> str:
    x0 = pick(draw, good_values(6), bad_values(6))
    b = _boundary(draw) if draw(st.booleans()) else None
    kw = options(draw, ["t", "dt", "tol", "alpha", "max_steps"])
    kw.setdefault("max_steps", 5000)  # a cap on the work of one call (bad max_steps are drawn too)
    res = cs.diffuse(SHEAF, x0, boundary=b, method=pick(draw, METHODS["diffuse"], BAD_METHODS), **kw)
    if not res.converged:
        return "flagged"
    if not bool(torch.isfinite(res.x.flat).all()):
        return "wrong: converged with a non-finite state"
    if kw.get("t") is None and b is not None and res.x.flat.numel():
        # the limit of the heat flow with a boundary is the harmonic extension (unique here: H⁰(G,U) = 0)
        ok = _check_linear_solution(res.x, b, kw.get("tol"))
        return "ok" if ok else "wrong: the limit is not the harmonic extension"
    return "ok"


def call_minimize(draw) -> str:
    b = _boundary(draw)
    kw = options(draw, ["tol", "max_iter", "dt", "alpha"])
    if draw(st.booleans()):
        kw["x0"] = pick(draw, good_values(6), bad_values(6))
    if kw.get("max_iter") is None:
        kw["max_iter"] = 5000
    res = cs.minimize(SHEAF, b, method=pick(draw, METHODS["minimize"], BAD_METHODS), **kw)
    if not res.converged:
        return "flagged"
    if not bool(torch.isfinite(res.x.flat).all()):
        return "wrong: converged with a non-finite state"
    return "ok" if _check_linear_solution(res.x, b, kw.get("tol")) else "wrong: not the harmonic extension"


def good_inputs() -> list:
    return [torch.randn(4, 2, dtype=F64), torch.randn(2, dtype=F64), torch.randn(4, 2, dtype=torch.float32),
            torch.randint(0, 3, (4, 2)), torch.zeros(0, 2, dtype=F64), [[0.5, -1.0]], np.ones((3, 2))]


def bad_inputs() -> list:
    return bad_values(2) + [torch.randn(4, 1, 2, dtype=F64), torch.randn(4, 3, dtype=F64)]


def _model_output(model, x) -> np.ndarray:
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(F64)
    with torch.no_grad():
        return (model(xt) if xt.dim() == 2 else model(xt[None])[0]).numpy()


def call_infer(draw) -> str:
    ns, model = draw(st.sampled_from([(NS, MODEL), (SOFTMAX_NS, SOFTMAX_MODEL)]))
    x = pick(draw, good_inputs(), bad_inputs())
    kw = options(draw, ["tol", "max_steps", "dt", "alpha"])
    if draw(st.booleans()):
        kw["init"] = pick(draw, ["random", "zeros", "forward_pass"], ["bogus", None, 3])
    kw.setdefault("max_steps", 5000)
    y = ns.infer(x, method=pick(draw, METHODS["infer"], BAD_METHODS), **kw)  # check=True: raises if not converged
    ref = _model_output(model, x)
    tol = 1e-6 * max(1.0, float(np.abs(ref).max())) if ref.size else 0.0
    if kw.get("tol") is not None and kw["tol"] > 1e-6:
        tol = 10 * kw["tol"] * max(1.0, float(np.abs(ref).max()))  # the caller asked for a loose answer
    ok = tuple(y.shape) == ref.shape and bool(np.all(np.abs(y.numpy() - ref) <= tol))
    return "ok" if ok else "wrong: infer differs from model(x)"


def call_pin(draw) -> str:
    ns = draw(st.sampled_from([NS, SOFTMAX_NS]))
    vertex = pick(draw, [v for v in ns.layout if v != ns.input], [ns.input, "zz", None, 0])
    coords = pick(draw, [None, [0], [1], [0, 1]], BAD_COORDS)
    k = len(coords) if isinstance(coords, list) and coords else (ns.layout[vertex].n if vertex in ns.layout else 2)
    values = pick(draw, good_values(k) + [0.9, [0.5] * k], bad_values(k))
    strength = pick(draw, GOOD["strength"], BAD_NUMBERS)
    x = pick(draw, good_inputs(), bad_inputs())
    method = pick(draw, ["auto", "newton", "euler", "diffusion"], ["propagate", "bogus", None])
    pin = ns.pin(vertex, coords, values, strength=strength)
    try:
        y, state = ns.infer(x, method=method, return_state=True, check=False, max_steps=300)
        if not state.info.converged:
            return "flagged"
        flat = state.cochain.flat
        if not bool(torch.isfinite(flat).all()):
            return "wrong: converged with a non-finite state"
        if flat.shape[0] == 0:
            return "ok"
        if pin.kind == "hard":
            got = flat[:, ns.coords(pin.vertex)[list(pin.coords)]]
            if not torch.allclose(got, pin.values.to(got).expand_as(got)):
                return "wrong: the pinned values moved"
        # independent checks: the energy gradient on the free coordinates vanishes, or (on ReLU kinks, where
        # the solver certifies Clarke stationarity) a local minimisation by torch's L-BFGS from the returned
        # point finds no lower energy
        S = ns.pinned_sheaf
        free = ns.boundary(x).resolve(S).free
        g = gradient(S, flat)[..., free]
        scale = max(1.0, float(flat.abs().max()))
        if float(g.norm(dim=-1).max()) <= 1e-6 * scale:
            return "ok"
        found, lower = _lbfgs(S, flat, free)
        if lower < found - 1e-8 * max(1.0, found):
            return f"wrong: energy {found:.10g}, L-BFGS from there reaches {lower:.10g}"
        return "ok"
    finally:
        ns.unpin(pin)


def _lbfgs(S, flat, free) -> tuple[float, float]:
    """The energy at ``flat`` and after L-BFGS over the ``free`` coordinates from there."""
    def energy(z):
        return cs.energy(S, flat.index_copy(-1, free, z)).sum()

    z = flat[..., free].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        e = energy(z)
        e.backward()
        return e

    with torch.no_grad():
        found = float(energy(z))
    opt.step(closure)
    with torch.no_grad():
        return found, float(energy(z))


def call_trainer(draw) -> str:
    ns = csnn.compile(MODEL)
    kw = options(draw, ["lr", "dt", "alpha", "tol"])
    mode = pick(draw, ["nudged", "equilibrium", "joint"], ["bogus", None])
    loss = pick(draw, ["mse", "cross_entropy"], ["bogus", None, 3])
    tr = csnn.SheafTrainer(ns, mode=mode, loss=loss, **kw)
    X = pick(draw, [torch.randn(4, 2, dtype=F64), torch.randint(0, 3, (4, 2))], bad_inputs() +
             [torch.zeros(0, 2, dtype=F64), torch.randn(4, 2, dtype=torch.float32)])
    Y = pick(draw, [torch.randn(4, 2, dtype=F64), torch.randint(0, 2, (4,))],
             [torch.zeros(0, 2, dtype=F64), torch.ones(4, 2, dtype=torch.complex128), torch.full((4, 2), float("nan")),
              torch.randn(3, 2, dtype=F64), "y", torch.tensor(1.0), torch.randint(5, 9, (4,))])
    steps = pick(draw, [1, 2], [0, -1, 1.5, None, "3", float("nan")])
    tr.fit(X, Y, steps=steps, progress=False)
    finite = all(bool(torch.isfinite(p).all()) for p in ns.to_module().parameters())
    return "ok" if finite else "wrong: non-finite weights after fit"


CALLS = {"harmonic_extension": call_harmonic, "diffuse": call_diffuse, "minimize": call_minimize,
         "infer": call_infer, "pin": call_pin, "trainer": call_trainer}


# ---------------------------------------------------------------------------- the runner


def _raised_by_package(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and last.startswith(_PACKAGE)


def _is_complex(value) -> bool:
    if isinstance(value, complex):
        return True
    if isinstance(value, np.ndarray):
        return np.iscomplexobj(value)
    return isinstance(value, torch.Tensor) and value.is_complex()


def _alarm(signum, frame):
    raise Hang()


def _where(err: BaseException) -> str:
    """The exception and the innermost frame of the package it passed through."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(_PACKAGE)]
    at = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}: {str(err)[:300]}{at}"


def classify(fn, draw) -> tuple[str, str]:
    """Run one call under the alarm; ``(outcome, detail)``."""
    use_alarm = threading.current_thread() is threading.main_thread()
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm), signal.signal(signal.SIGVTALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, _WALL_LIMIT)
        signal.setitimer(signal.ITIMER_VIRTUAL, _CPU_LIMIT)
    try:
        verdict = fn(draw)
    except Hang as err:
        return "hang", _where(err)
    except csnn.ConvergenceError:
        return "flagged", ""
    except _CLEAR as err:
        if _raised_by_package(err) and str(err).strip():
            return "clear", ""
        return "raw", _where(err)
    except Exception as err:  # noqa: BLE001 - the point of the test
        return "raw", _where(err)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            signal.signal(signal.SIGALRM, old[0])
            signal.signal(signal.SIGVTALRM, old[1])
    if verdict.startswith("wrong"):
        return "wrong", verdict
    return verdict, ""


@pytest.mark.filterwarnings("ignore")
def test_bad_calls_are_clear_errors_or_honest_reports():
    counts, problems = Counter(), []

    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        name = data.draw(st.sampled_from(sorted(CALLS)))
        draws = []

        def draw(strategy):
            value = data.draw(strategy)
            draws.append(value)
            return value

        outcome, detail = classify(CALLS[name], draw)
        if outcome in ("ok", "flagged") and any(_is_complex(d) for d in draws):
            outcome, detail = "wrong", "wrong: a complex value was accepted (cut to its real part?)"
        counts["calls"] += 1
        counts[outcome] += 1
        counts[f"{name}:{outcome}"] += 1
        if outcome in ("raw", "hang", "wrong"):
            shown = [d if not isinstance(d, torch.Tensor) else f"tensor{tuple(d.shape)} {d.dtype}" for d in draws]
            problems.append(f"{name} -> {outcome}: {detail}\n    args {str(shown)[:400]}")

    run()
    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    print(summary)
    assert counts["calls"] >= 500, summary
    assert not problems, f"{len(problems)} problems ({summary}):\n" + "\n".join(problems[:40])
