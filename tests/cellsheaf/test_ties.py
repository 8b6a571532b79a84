"""Max-pool ties in Newton's active set: held ties, their stationarity test, closed-form equilibria on a tie."""

import pytest
import torch

import cellsheaf as cs
from cellsheaf import maps as M
from cellsheaf.energy import gradient
from cellsheaf.gauss_newton import NewtonOptions

F64 = torch.float64
I1 = torch.eye(1, dtype=F64)


def _window(pinned: float) -> tuple[cs.Sheaf, cs.Boundary]:
    """Two inputs ``a = (a_1, a_2)`` anchored at 0 and a max pool of them pinned at ``pinned``:
    ``E = ½ a_1² + ½ a_2² + ½ (pinned − max(a_1, a_2))²``."""
    S = cs.Sheaf()
    S.add_vertex("a", 2); S.add_vertex("zero", 2); S.add_vertex("m", 1)
    S.add_edge("zero", "a", torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))
    S.add_edge("a", "m", M.MaxPool1d(2, in_shape=(1, 2)), I1)
    b = cs.Boundary().fix("zero", torch.zeros(2, dtype=F64)).fix("m", torch.tensor([pinned], dtype=F64))
    return S, b


def _start(a, pinned: float) -> dict:
    return {"a": torch.tensor(a, dtype=F64), "zero": torch.zeros(2, dtype=F64), "m": torch.tensor([pinned], dtype=F64)}


@pytest.mark.parametrize("start", [[0.3, -0.2], [-0.2, 0.3], [0.0, 0.0], [-2.0, 1.0]])
def test_an_equilibrium_on_a_tie_is_found_and_certified(start):
    # pulling the maximum down to -1 lowers both inputs together: a_1 = a_2 = t minimises t² + ½(1 + t)², t = −1/3,
    # on the switching surface a_1 = a_2 (either input alone would carry the whole pull)
    S, b = _window(-1.0)
    res = cs.minimize(S, b, method="newton", x0=_start(start, -1.0), tol=1e-12)
    assert res.converged and res.residual <= 1e-12
    assert torch.allclose(res.x["a"], torch.full((2,), -1 / 3, dtype=F64), atol=1e-12, rtol=0)
    assert abs(float(res.energy) - 1 / 3) <= 1e-12
    assert int(res.extra["on_ties"]) == 1


def test_a_concave_tie_is_left_not_certified():
    # pushing the maximum up: on the tie a_1 = a_2 = 0 both inputs could rise (c < 0), so the tie is no
    # equilibrium; Newton starting there, tie held, leaves it: one input rises to ½, the other stays at 0
    S, b = _window(1.0)
    res = cs.minimize(S, b, method="newton", x0=_start([0.0, 0.0], 1.0), tol=1e-12,
                      options=NewtonOptions(hold_kinks_at_start=True))
    assert res.converged
    assert sorted(res.x["a"].tolist()) == pytest.approx([0.0, 0.5], abs=1e-12)
    assert abs(float(res.energy) - 0.25) <= 1e-12 and int(res.extra["on_ties"]) == 0


def test_the_stationarity_measure_on_a_tie_is_the_clarke_test():
    # at a_1 = a_2 = t the measure is the derivative along the tie, |Σ g0 + c| = |2t + (1 + t)| for the pin at -1,
    # plus members that descend alone: none when t <= 0 (g0 = t <= 0 and g0 + c = 1 + 2t >= 0 for t >= −½)
    from cellsheaf.gauss_newton import _kink_points, _stationarity
    from cellsheaf.ties import Ties

    S, b = _window(-1.0)
    free = torch.tensor([0, 1])  # a
    ties = Ties.of(S, free)
    for t in (-1 / 3, -0.25, -0.4):
        x = torch.tensor([[t, t, 0.0, 0.0, -1.0]], dtype=F64)
        g = gradient(S, x)[:, free]
        held = torch.zeros(1, 2, dtype=torch.bool)
        m, leave, _ = _stationarity(S, x, free, g, held, _kink_points(S, free), 1e-12, ties=ties,
                                    tied=ties.near(x[:, free], torch.zeros(1, 1, dtype=F64)))
        assert float(m) == pytest.approx(abs(3 * t + 1), abs=1e-15) and not bool(leave.any())
    x = torch.tensor([[0.2, 0.2, 0.0, 0.0, -1.0]], dtype=F64)  # g0 = 0.2 > 0: each input alone goes down
    g = gradient(S, x)[:, free]
    m, leave, left = _stationarity(S, x, free, g, torch.zeros(1, 2, dtype=torch.bool), _kink_points(S, free), 1e-12,
                                   ties=ties, tied=ties.near(x[:, free], torch.zeros(1, 1, dtype=F64)))
    assert bool(leave.all()) and bool(left.all()) and float(m) > 0.2


def test_only_windows_of_free_inputs_read_once_hold_ties():
    S = cs.Sheaf()
    S.add_vertex("a", 4); S.add_vertex("m", 3); S.add_vertex("p", 2)
    S.add_edge("a", "m", M.MaxPool1d(2, in_shape=(1, 4), stride=1), torch.eye(3, dtype=F64))  # overlapping windows
    S.add_edge("a", "p", M.MaxPool1d(2, in_shape=(1, 4)), torch.eye(2, dtype=F64))
    assert cs.ties.Ties.of(S, torch.arange(9)).empty  # every input is read by two windows
    S2, _ = _window(0.0)
    assert cs.ties.Ties.of(S2, torch.tensor([0])).empty  # a_2 is not free
    assert cs.ties.Ties.of(S2, torch.tensor([0, 1])).windows.tolist() == [[0, 1]]
