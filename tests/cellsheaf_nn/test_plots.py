"""Plots render headless (no pyplot, Agg through savefig), return a Figure and write PNG/SVG files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

import cellsheaf as cs
from cellsheaf_nn import diagnostics as dg
from cellsheaf_nn import plots


def _network_like_sheaf() -> tuple[cs.Sheaf, cs.Boundary]:
    """x -> z1 -> a1 -> z2 -> y named like a compiled [2, 3, 1] network, with a pin anchor."""
    S = cs.Sheaf()
    for v, d in (("x", 5), ("z1", 3), ("a1", 4), ("z2", 1), ("y", 1), ("pin", 1)):
        S.add_vertex(v, d)
    g = torch.Generator().manual_seed(0)
    W1, W2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g, dtype=torch.float64)
    S.add_edge("x", "z1", W1, torch.eye(3, dtype=torch.float64), name="weight:z1")
    S.add_edge("z1", "a1", cs.maps.ReLU(3), cs.maps.Select([0, 1, 2], 4), name="act:a1")
    S.add_edge("a1", "z2", W2, torch.eye(1, dtype=torch.float64), name="weight:z2")
    S.add_edge("z2", "y", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), name="out:y")
    S.add_edge("pin", "a1", torch.eye(1, dtype=torch.float64), cs.maps.Select([0], 4), name="penalty:a1")
    b = cs.Boundary().fix("x", torch.ones(5)).fix("a1", torch.ones(1), coords=[3]).fix("pin", torch.zeros(1))
    return S, b


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_sheaf_graph_colours_and_file(tmp_path, suffix):
    S, b = _network_like_sheaf()
    path = tmp_path / f"graph{suffix}"
    fig = plots.sheaf_graph(S, b, path=path)
    assert isinstance(fig, Figure) and path.stat().st_size > 1000
    states = plots.vertex_states(S, b)
    assert states == {"x": "stubborn", "z1": "free", "a1": "partly stubborn", "z2": "free", "y": "free",
                      "pin": "stubborn"}
    ax = fig.axes[0]
    colours = [to_hex(c.get_facecolor()[0]) for c in ax.collections]
    assert colours == [plots.VERTEX_COLORS[states[v]] for v in S.vertices]
    arrows = [to_hex(p.get_edgecolor()) for p in ax.patches]
    assert arrows == [plots.EDGE_COLORS[dg.edge_type(e)] for e in S.edges]


def test_sheaf_graph_of_a_compiled_network_uses_its_boundary_and_pins():
    import cellsheaf_nn as csnn

    ns = csnn.compile(csnn.mlp([2, 3, 1], output="sigmoid", seed=0))
    ns.pin("a1", [0], torch.tensor([1.0], dtype=torch.float64), strength=2.0)
    ns.pin("z1", [1], torch.tensor([0.5], dtype=torch.float64))
    fig = plots.sheaf_graph(ns)
    S = ns.pinned_sheaf
    states = plots.vertex_states(S, ns.boundary(torch.zeros(2, dtype=torch.float64)))
    assert states == {"x": "stubborn", "z1": "partly stubborn", "a1": "partly stubborn", "z2": "free", "y": "free",
                      "penalty:a1": "stubborn"}
    colours = [to_hex(c.get_facecolor()[0]) for c in fig.axes[0].collections]
    assert colours == [plots.VERTEX_COLORS[states[v]] for v in S.vertices]
    assert [to_hex(p.get_edgecolor()) for p in fig.axes[0].patches][-1] == plots.EDGE_COLORS["penalty"]


def test_sheaf_graph_cycle_and_parallel_edges():
    S = cs.Sheaf()
    for v in range(3):
        S.add_vertex(v, 1)
    one = torch.eye(1)
    for u, v in ((0, 1), (1, 2), (2, 0), (0, 1)):
        S.add_edge(u, v, one, one)
    fig = plots.sheaf_graph(S)
    assert len(fig.axes[0].patches) == 4
    assert set(plots.vertex_states(S).values()) == {"free"}


def test_discord_convergence_panels(tmp_path):
    t = np.arange(50) * 0.01
    trace = {"weight:z1": np.exp(-t), "act:a1": np.exp(-2 * t), "weight:z2": np.exp(-3 * t),
             "out:y": np.zeros_like(t)}
    out = np.stack([1 - np.exp(-t), np.exp(-t)], 1)
    fig = plots.discord_convergence(trace, t, output=out, forward=[1.0, 0.0], path=tmp_path / "c.png")
    assert len(fig.axes) == 4 and (tmp_path / "c.png").exists()
    total = fig.axes[0].lines[0].get_ydata()
    assert np.allclose(total[:-1], sum(trace.values())[:-1])  # zeros are floored for the log scale only
    assert [ln.get_label() for ln in fig.axes[1].lines] == ["weight", "act", "out"]
    assert [ln.get_label() for ln in fig.axes[2].lines] == ["1", "2", "y"]
    dashed = [ln for ln in fig.axes[3].lines if ln.get_linestyle() == "--"]
    assert [ln.get_ydata()[0] for ln in dashed] == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown discord group"):
        plots.discord_convergence(trace, groups=("edges",))


def test_phase_plane_marks_crossings(tmp_path):
    s = np.linspace(0, 1, 30)
    traj = np.stack([np.cos(6 * s), 0.5 - s], 1)  # crosses x=0 twice and y=0 once
    fig = plots.phase_plane(traj, fixed_point=traj[-1], path=tmp_path / "p.svg")
    crosses = [c for c in fig.axes[0].collections if c.get_label() == "crossing"]
    assert len(crosses) == 1 and len(crosses[0].get_offsets()) == 3
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        plots.phase_plane(np.zeros((5, 3)))


def test_residual_scatter_splits_active(tmp_path):
    z = np.array([-1.0, -0.5, 0.0, 2.0])
    fig = plots.residual_scatter(z, np.array([0.0, 0.0, 0.1, -0.1]), path=tmp_path / "r.png")
    inactive, active = fig.axes[0].collections[:2]
    assert len(inactive.get_offsets()) == 2 and len(active.get_offsets()) == 2
    with pytest.raises(ValueError, match="residual has"):
        plots.residual_scatter(z, np.zeros(3))


def test_residuals_and_spectral_figures_from_diagnostics(tmp_path):
    S, b = _network_like_sheaf()
    x = torch.randn(6, S.C0, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = dg.residuals(S, x)
    assert list(res) == ["weight:z1", "act:a1", "weight:z2"]
    fig = plots.discord_residuals(res, path=tmp_path / "res.png")
    assert len(fig.axes) == 3
    fixed = b.resolve(S).fixed
    lam, V = torch.linalg.eigh(dg.restricted_laplacians(S, fixed, x))
    summary = dg.SpectralSummary(lam, {"fiedler": dg.block_energy(S, fixed, V[..., 0]),
                                       "top": dg.block_energy(S, fixed, V[..., -1])},
                                 {"fiedler": 1.0, "top": 1.0})
    fig = plots.spectral_summary(summary, path=tmp_path / "spec.png")
    assert len(fig.axes) == 4 and (tmp_path / "spec.png").stat().st_size > 1000
    steps = np.arange(4)
    q = np.array([[1.0, 2.0, 3.0]] * 4)
    fig = plots.spectral_tracking(steps, {"lambda_1": q, "condition": q}, loss=[1.0, 0.5, 0.3, 0.2],
                                  path=tmp_path / "track.svg")
    assert (tmp_path / "track.svg").exists() and len(fig.axes) == 3
    fig = plots.gap_distributions({"1k": lam[:, 0], "20k": lam[:, 0] / 2}, path=tmp_path / "gaps.png")
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].patches) == 40
    with pytest.raises(ValueError, match="positive"):
        plots.gap_distributions({"bad": np.array([0.0, 1.0])})


def test_training_curves_and_decision_surfaces(tmp_path):
    fig = plots.training_curves({"step": [0, 10, 20], "train_loss": [1.0, 0.3, 0.1], "test_loss": [1.2, 0.4, 0.2]},
                                x="step", path=tmp_path / "loss.png")
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 2
    X = torch.rand(30, 2, dtype=torch.float64) * 2 - 1
    fig = plots.decision_surface(lambda x: (x ** 2).sum(1, keepdim=True), X, (X ** 2).sum(1), path=tmp_path / "reg.png")
    assert len(fig.axes) == 2  # surface + colour bar
    labels = (X[:, 0] > 0).long()
    fig = plots.decision_surface(lambda x: torch.stack([-x[:, 0], x[:, 0]], 1), X, labels,
                                 path=tmp_path / "cls.png")
    assert fig.axes[0].get_xlabel() == "$x_1$" and (tmp_path / "cls.png").exists()
    with pytest.raises(ValueError, match=r"\(M, 2\)"):
        plots.decision_surface(lambda x: x, torch.zeros(3, 3))


def test_save_rejects_unknown_format(tmp_path):
    fig = plots.training_curves({"loss": [1.0, 0.5]})
    with pytest.raises(ValueError, match=".png, .svg or .pdf"):
        plots.save(fig, tmp_path / "f.jpeg")
