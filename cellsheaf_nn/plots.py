"""Figures for looking at a network through its sheaf (matplotlib, optional extra ``plot``).

Every function builds a `matplotlib.figure.Figure` without pyplot (so it
works headless and keeps no global state), returns it, and writes it to
``path`` when one is given (the suffix picks the format: ``.png``, ``.svg``,
``.pdf``). Functions take plain tensors / arrays and the records produced by
[`cellsheaf_nn.diagnostics`][cellsheaf_nn.diagnostics], so they can be used on any sheaf.

Examples
--------
>>> import torch, cellsheaf as cs
>>> from cellsheaf_nn import plots
>>> S = cs.Sheaf(); S.add_vertex("x", 2); S.add_vertex("z", 2)
>>> _ = S.add_edge("x", "z", torch.eye(2), torch.eye(2), name="weight:z")
>>> fig = plots.sheaf_graph(S, cs.Boundary().fix("x", torch.zeros(2)))
>>> len(fig.axes)
1
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from .diagnostics import edge_type, group_trace

__all__ = [
    "sheaf_graph", "discord_convergence", "stalk_trajectories", "phase_plane", "residual_scatter",
    "discord_residuals", "spectral_summary", "spectral_tracking", "gap_distributions", "training_curves",
    "decision_surface", "save", "vertex_states",
]

#: vertex colours of Figs. 1-2: stubborn (boundary), partly stubborn, free
VERTEX_COLORS = {"stubborn": "#d62728", "partly stubborn": "#f2c12e", "free": "#2ca02c"}
#: edge colours by edge type (the prefix of a compiled network's edge names)
EDGE_COLORS = {"weight": "#1f77b4", "act": "#ff7f0e", "out": "#9467bd", "penalty": "#d62728", "merge": "#8c564b"}
ACTIVE, INACTIVE = "#ff7f0e", "#7b3294"   # active (z >= 0) / inactive (z < 0) coordinates, Figs. 9, 19-21
_OTHER = ["#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#2ca02c"]


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None, **kw):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("cellsheaf_nn.plots needs matplotlib: pip install 'cellsheaf[plot]'") from err
    size = size or (4.2 * ncols, 3.4 * nrows)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save(fig, path: str | Path | None) -> Any:
    """Write ``fig`` to ``path`` (format from the suffix) and return it; ``path=None`` only returns it.

    Raises ``OSError`` naming the folder when it cannot be written.
    """
    if path is None:
        return fig
    path = Path(path)
    if path.suffix.lower() not in {".png", ".svg", ".pdf"}:
        raise ValueError(f"figure path {str(path)!r} must end in .png, .svg or .pdf")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return fig


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def _color(kind: str, seen: dict[str, str]) -> str:
    if kind in EDGE_COLORS:
        return EDGE_COLORS[kind]
    if kind not in seen:
        seen[kind] = _OTHER[len(seen) % len(_OTHER)]
    return seen[kind]


# ---------------------------------------------------------------------------- the sheaf graph


def _fixed_counts(S, boundary) -> dict[Hashable, int]:
    """Number of fixed coordinates per vertex."""
    if boundary is None:
        return {}
    fixed = boundary.resolve(S).fixed if hasattr(boundary, "resolve") else torch.as_tensor(
        boundary.fixed if hasattr(boundary, "fixed") else boundary, dtype=torch.long)
    counts = {}
    for v in S.vertices:
        sl = S.vertex_slice(v)
        counts[v] = int(((fixed >= sl.start) & (fixed < sl.stop)).sum())
    return counts


def vertex_states(S, boundary=None) -> dict[Hashable, str]:
    """``{vertex: "stubborn" | "partly stubborn" | "free"}`` for a boundary (or fixed index list)."""
    counts = _fixed_counts(S, boundary)
    out = {}
    for v in S.vertices:
        k, d = counts.get(v, 0), S.dim(v)
        out[v] = "stubborn" if k and k == d else ("partly stubborn" if k else "free")
    return out


def _layout(G: nx.MultiDiGraph) -> dict:
    """Columns by longest path for acyclic graphs (anchors sit under the vertex they pull); else spring."""
    if G.number_of_nodes() == 0:
        return {}
    if not nx.is_directed_acyclic_graph(G):
        return nx.spring_layout(nx.Graph(G), seed=0)
    col: dict = {}
    for v in nx.topological_sort(G):
        preds = list(G.predecessors(v))
        col[v] = max((col[p] + 1 for p in preds), default=0)
    for v in G.nodes:  # a source feeding a later column only (a pin anchor) moves to that column
        succ = list(G.successors(v))
        if not list(G.predecessors(v)) and succ and min(col[s] for s in succ) > 1:
            col[v] = min(col[s] for s in succ)
    rows: dict[int, list] = defaultdict(list)
    for v in G.nodes:
        rows[col[v]].append(v)
    pos = {}
    for c, vs in rows.items():
        for i, v in enumerate(vs):
            pos[v] = np.array([float(c), -float(i)])
    return pos


def sheaf_graph(sheaf, boundary=None, *, ax=None, path=None, title: str | None = None,
                show_dims: bool = True):
    """Draw a sheaf's graph: vertices coloured stubborn / partly stubborn / free, edges by type.

    Parameters
    ----------
    sheaf : cellsheaf.Sheaf or NeuralSheaf
        A compiled network is drawn with its soft-pin penalty edges and anchors,
        and with its own boundary (input, ones blocks, pins) when ``boundary`` is omitted.
    boundary : cellsheaf.Boundary, ResolvedBoundary or fixed flat indices, optional
        Which coordinates are stubborn (red: all, yellow: some, green: none; Figs. 1-2).
    ax : matplotlib Axes, optional
        Draw into it instead of a new figure.
    path : str or Path, optional
        Where to save the figure.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> from cellsheaf_nn.plots import sheaf_graph
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1), torch.eye(1))
    >>> sheaf_graph(S).axes[0].get_title()
    'sheaf graph (2 vertices, 1 edges)'
    """
    S = getattr(sheaf, "pinned_sheaf", getattr(sheaf, "sheaf", sheaf))
    if boundary is None and S is not sheaf:  # a compiled network: its input, ones blocks and pins
        boundary = sheaf.boundary(torch.zeros(sheaf.input_shape, dtype=sheaf.dtype))
    states = vertex_states(S, boundary)
    G = S.graph
    pos = _layout(G)
    if ax is None:
        span = [max((p[k] for p in pos.values()), default=0) - min((p[k] for p in pos.values()), default=0)
                for k in (0, 1)]
        fig, axes = _figure(size=(min(max(5.0, 1.3 * span[0] + 3.0), 16.0), min(2.2 + 1.1 * span[1], 10.0)))
        ax = axes[0, 0]
    fig = ax.figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    seen: dict[str, str] = {}
    parallel: dict[tuple, int] = defaultdict(int)
    kinds: dict[str, str] = {}
    for e in S.edge_items():
        kind = edge_type(e.name)
        c = kinds[kind] = _color(kind, seen)
        k = parallel[(e.u, e.v)]
        parallel[(e.u, e.v)] += 1
        ax.add_patch(FancyArrowPatch(pos[e.u], pos[e.v], arrowstyle="-|>", mutation_scale=12, color=c, lw=1.8,
                                     shrinkA=14, shrinkB=14, connectionstyle=f"arc3,rad={0.25 * k}"))
    for v in S.vertices:
        x, y = pos[v]
        ax.scatter([x], [y], s=620, color=VERTEX_COLORS[states[v]], edgecolors="black", zorder=3)
        label = f"{v}\n[{S.dim(v)}]" if show_dims else str(v)
        ax.annotate(label, (x, y), ha="center", va="center", fontsize=7, zorder=4)
    handles = [Line2D([], [], marker="o", ls="", color=VERTEX_COLORS[s], mec="black", label=s)
               for s in VERTEX_COLORS if s in states.values()]
    handles += [Line2D([], [], color=c, lw=2, label=k) for k, c in kinds.items()]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.set_axis_off()
    ax.set_title(title or f"sheaf graph ({len(S.vertices)} vertices, {len(S.edges)} edges)")
    return save(fig, path)


# ---------------------------------------------------------------------------- dynamics


def discord_convergence(trace: Mapping[Hashable, Any], t=None, *, output=None, forward=None,
                        groups: Sequence[str] = ("total", "type", "layer"), ns=None, path=None,
                        title: str | None = None):
    """Discord against time on a log scale: total, by edge type, by layer (Figs. 6, 12).

    Parameters
    ----------
    trace : {edge: (T,)}
        Per-edge discord along a trajectory ([`cellsheaf_nn.diagnostics.discord_trace`][cellsheaf_nn.diagnostics.discord_trace]).
    t : (T,), optional
        Times (default: the step index).
    output : (T, d), optional
        The output stalk along the trajectory; adds a panel with ``forward`` dashed.
    forward : (d,), optional
        The forward-pass value of the output, drawn as black dashed lines.
    groups : which discord panels to draw, from ``"total"``, ``"type"``, ``"layer"``.
    ns : NeuralSheaf, optional
        Groups edges by its layout ([`cellsheaf_nn.diagnostics.edge_group`][cellsheaf_nn.diagnostics.edge_group]) instead of by name.

    Examples
    --------
    >>> import numpy as np
    >>> from cellsheaf_nn.plots import discord_convergence
    >>> tr = {"weight:z1": np.exp(-np.arange(5.0)), "act:a1": np.exp(-2 * np.arange(5.0))}
    >>> len(discord_convergence(tr, groups=("total", "type")).axes)
    2
    """
    bad = [g for g in groups if g not in ("total", "type", "layer")]
    if bad:
        raise ValueError(f"unknown discord group {bad[0]!r}; use 'total', 'type' or 'layer'")
    series = {k: _np(v) for k, v in trace.items()}
    if not series:
        raise ValueError("discord_convergence needs a non-empty trace {edge: values}")
    T = len(next(iter(series.values())))
    tt = np.arange(T) if t is None else _np(t)
    n = len(groups) + (output is not None)
    fig, axes = _figure(1, n, size=(4.0 * n, 3.3))
    tiny = np.finfo(float).tiny
    for ax, g in zip(axes[0], groups):
        parts = {"total": sum(series.values())} if g == "total" else group_trace(series, g, ns)
        seen: dict[str, str] = {}
        for name, vals in parts.items():
            color = "black" if g == "total" else (_color(name, seen) if g == "type" else None)
            ax.semilogy(tt, np.maximum(vals, tiny), label=str(name), color=color, lw=1.5)
        ax.set_xlabel("t" if t is not None else "step")
        ax.set_ylabel("discord")
        ax.set_title({"total": "total discord", "type": "by edge type", "layer": "by layer"}[g])
        if g != "total":
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    if output is not None:
        stalk_trajectories(output, tt, forward=forward, ax=axes[0, -1], ylabel="output stalk")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def stalk_trajectories(values, t=None, *, forward=None, labels: Sequence[str] | None = None, ax=None,
                       ylabel: str = "stalk value", path=None):
    """Coordinates of a stalk along a trajectory, with their forward-pass values dashed.

    ``values`` is ``(T, d)`` (or ``(T,)``); ``forward`` is ``(d,)``.

    Examples
    --------
    >>> import numpy as np
    >>> from cellsheaf_nn.plots import stalk_trajectories
    >>> fig = stalk_trajectories(np.linspace(1, 0, 10)[:, None], forward=np.zeros(1))
    >>> len(fig.axes[0].lines)
    2
    """
    v = _np(values)
    v = v[:, None] if v.ndim == 1 else v
    tt = np.arange(len(v)) if t is None else _np(t)
    if ax is None:
        fig, axes = _figure()
        ax = axes[0, 0]
    fig = ax.figure
    for j in range(v.shape[1]):
        ax.plot(tt, v[:, j], lw=1.5, label=labels[j] if labels else (f"coord {j}" if v.shape[1] > 1 else None))
    if forward is not None:
        for j, f in enumerate(np.atleast_1d(_np(forward))):
            ax.axhline(f, color="black", ls="--", lw=1.0, label="forward pass" if j == 0 else None)
    ax.set_xlabel("t" if t is not None else "step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, path)


def _unit_norm():
    from matplotlib.colors import Normalize

    return Normalize(0.0, 1.0)


def _crossings(traj: np.ndarray) -> np.ndarray:
    """Points of a ``(T, 2)`` path just after a coordinate changes sign."""
    s = traj >= 0
    hit = np.nonzero((s[1:] != s[:-1]).any(axis=1))[0] + 1
    return traj[hit]


def phase_plane(traj, *, fixed_point=None, ax=None, labels: tuple[str, str] = ("$z_1$", "$z_2$"), path=None,
                title: str | None = None):
    """A phase plane of two pre-activation coordinates (Fig. 13).

    Trajectories go from light (early, start circled) to dark (late); dashed grey lines are
    the ReLU switching lines ``z_j = 0``; red crosses mark where a trajectory
    crosses one; the gold star is the forward-pass fixed point.

    Parameters
    ----------
    traj : (T, 2) or (T, B, 2)
        One or several trajectories of the pair of coordinates.
    fixed_point : (2,) or (B, 2), optional

    Examples
    --------
    >>> import numpy as np
    >>> from cellsheaf_nn.plots import phase_plane
    >>> path = np.stack([np.linspace(-1, 1, 20), np.linspace(1, 0.5, 20)], 1)
    >>> fig = phase_plane(path, fixed_point=[1.0, 0.5])
    """
    from matplotlib.collections import LineCollection

    P = _np(traj)
    if P.ndim == 2:
        P = P[:, None, :]
    if P.ndim != 3 or P.shape[-1] != 2:
        raise ValueError(f"phase_plane needs trajectories of shape (T, 2) or (T, B, 2), got {P.shape}")
    if ax is None:
        fig, axes = _figure(size=(4.2, 4.0))
        ax = axes[0, 0]
    fig = ax.figure
    T = P.shape[0]
    for b in range(P.shape[1]):
        seg = np.stack([P[:-1, b], P[1:, b]], axis=1)
        lc = LineCollection(seg, cmap="Blues", norm=_unit_norm(), array=np.linspace(0.35, 1.0, max(T - 1, 1)),
                            lw=1.8)
        ax.add_collection(lc)
        ax.scatter(P[:1, b, 0], P[:1, b, 1], s=18, facecolors="none", edgecolors="#6baed6", zorder=3,
                   label="start" if b == 0 else None)
        cr = _crossings(P[:, b])
        if len(cr):
            ax.scatter(cr[:, 0], cr[:, 1], marker="x", color="red", s=30, zorder=3,
                       label="crossing" if b == 0 else None)
    ax.axhline(0, color="grey", ls="--", lw=1)
    ax.axvline(0, color="grey", ls="--", lw=1)
    if fixed_point is not None:
        F = np.atleast_2d(_np(fixed_point))
        ax.scatter(F[:, 0], F[:, 1], marker="*", s=220, color="gold", edgecolors="black", zorder=4,
                   label="forward pass")
    ax.autoscale()
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return save(fig, path)


# ---------------------------------------------------------------------------- residuals


def residual_scatter(z, residual, *, ax=None, xlabel: str = "$z_j$", ylabel: str = "residual",
                     title: str | None = None, ylim=None, path=None):
    """Per-coordinate residuals against the pre-activation, coloured active / inactive (Figs. 9, 19-21).

    ``z`` and ``residual`` have equal shapes (any; they are flattened).

    Examples
    --------
    >>> import numpy as np
    >>> from cellsheaf_nn.plots import residual_scatter
    >>> fig = residual_scatter(np.array([-1.0, 0.5]), np.array([0.0, 0.1]))
    """
    zz, rr = _np(z).ravel(), _np(residual).ravel()
    if zz.shape != rr.shape:
        raise ValueError(f"residual_scatter: z has {zz.size} values but residual has {rr.size}")
    if ax is None:
        fig, axes = _figure()
        ax = axes[0, 0]
    fig = ax.figure
    act = zz >= 0
    ax.scatter(zz[~act], rr[~act], s=8, alpha=0.6, color=INACTIVE, label="inactive ($z_j<0$)")
    ax.scatter(zz[act], rr[act], s=8, alpha=0.6, color=ACTIVE, label="active ($z_j\\geq 0$)")
    ax.axhline(0, color="black", lw=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, path)


def discord_residuals(residuals: Mapping[Hashable, Any], *, path=None, title: str | None = None,
                      share_y: bool = False):
    """One residual scatter per edge, from [`cellsheaf_nn.diagnostics.residuals`][cellsheaf_nn.diagnostics.residuals].

    ``residuals`` maps an edge to a record with ``z`` (the pre-activation the
    coordinates are coloured by) and ``residual`` (same shape).
    """
    items = list(residuals.items())
    if not items:
        raise ValueError("discord_residuals needs at least one edge")
    n = len(items)
    fig, axes = _figure(1, n, size=(3.6 * n, 3.2), sharey=share_y)
    for ax, (name, rec) in zip(axes[0], items):
        residual_scatter(rec.z, rec.residual, ax=ax, title=str(name), ylabel=rec.label)
    if title:
        fig.suptitle(title)
    return save(fig, path)


# ---------------------------------------------------------------------------- spectra


def spectral_summary(summary, *, path=None, title: str | None = None):
    """The spectrum of ``L[Ω,Ω]`` over inputs and where its extreme eigenvectors live (Fig. 15).

    Panels: every input's eigenvalues (log scale); the histogram of ``λ₁``;
    per-vertex energy of the Fiedler vector and of the ``λ_max`` eigenvector
    (mean ± std over inputs). ``summary`` is a
    [`cellsheaf_nn.diagnostics.SpectralSummary`][cellsheaf_nn.diagnostics.SpectralSummary].
    """
    ev = _np(summary.eigenvalues)
    fig, axes = _figure(1, 4, size=(15.0, 3.3))
    ax = axes[0, 0]
    for row in ev:
        ax.semilogy(np.arange(1, len(row) + 1), row, color="#1f77b4", alpha=0.25, lw=1)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"spectra of {len(ev)} inputs")
    ax = axes[0, 1]
    lam1 = ev[:, 0]
    bins = np.geomspace(lam1.min(), lam1.max() * 1.0001, 20) if lam1.min() > 0 and lam1.max() > lam1.min() else 20
    ax.hist(lam1, bins=bins, color="#1f77b4")
    if isinstance(bins, np.ndarray):
        ax.set_xscale("log")
    ax.axvline(np.median(lam1), color="black", ls="--", lw=1, label=f"median {np.median(lam1):.3g}")
    ax.set_xlabel(r"$\lambda_1$")
    ax.legend(fontsize=7)
    ax.set_title("spectral gap")
    for ax, (key, name) in zip(axes[0, 2:], (("fiedler", r"Fiedler ($\lambda_1$)"),
                                            ("top", r"$\lambda_{max}$ eigenvector"))):
        energy = summary.block_energy[key]
        blocks = list(energy)
        mean = [float(energy[b].mean()) for b in blocks]
        std = [float(energy[b].std()) if len(energy[b]) > 1 else 0.0 for b in blocks]
        ax.bar(range(len(blocks)), mean, yerr=std, color="#2ca02c", capsize=3)
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], rotation=45, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("energy fraction")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def spectral_tracking(steps, stats: Mapping[str, Any], *, loss=None, path=None, title: str | None = None):
    """Spectral statistics during training, median with the IQR band (Figs. 16-17).

    ``stats`` maps a quantity (``"lambda_1"``, ``"lambda_max"``, ``"condition"``)
    to a ``(S, 3)`` array of (q25, median, q75) per recorded step, as kept by
    [`cellsheaf_nn.diagnostics.SpectralTracker`][cellsheaf_nn.diagnostics.SpectralTracker]. ``loss`` (``(S,)``)
    adds the training loss on a second axis of the first panel.
    """
    x = _np(steps)
    keys = list(stats)
    if not keys:
        raise ValueError("spectral_tracking needs at least one statistic")
    fig, axes = _figure(1, len(keys), size=(4.2 * len(keys), 3.3))
    for ax, k in zip(axes[0], keys):
        q = _np(stats[k])
        ax.fill_between(x, q[:, 0], q[:, 2], alpha=0.3, color="#1f77b4", label="IQR")
        ax.plot(x, q[:, 1], color="#1f77b4", lw=1.6, label="median")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(k.replace("lambda_", "λ_"))
        ax.grid(alpha=0.3, which="both")
    if loss is not None:
        tw = axes[0, 0].twinx()
        tw.semilogy(x, _np(loss), color="#d62728", lw=1.2, label="loss")
        tw.set_ylabel("loss", color="#d62728")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def gap_distributions(samples: Mapping[str, Any], *, bins: int = 20, ax=None, path=None,
                      title: str | None = None):
    """Histograms of the spectral gap ``λ₁`` over inputs at several training stages (Fig. 18).

    ``samples`` maps a label (``"1k steps"``) to the ``λ₁`` of every probe input;
    bins are log-spaced and shared. `cellsheaf_nn.diagnostics.SpectralTracker.lambda_1_values`
    holds one such sample per record.

    Examples
    --------
    >>> import numpy as np
    >>> from cellsheaf_nn.plots import gap_distributions
    >>> fig = gap_distributions({"early": np.array([0.2, 0.3]), "late": np.array([0.05, 0.07])})
    >>> len(fig.axes[0].patches) > 0
    True
    """
    data = {k: _np(v).ravel() for k, v in samples.items()}
    values = np.concatenate(list(data.values())) if data else np.zeros(0)
    if values.size == 0 or not (values > 0).all():
        raise ValueError("gap_distributions needs positive spectral gaps")
    edges = np.geomspace(values.min(), values.max() * 1.0001, bins + 1) if values.max() > values.min() else \
        np.array([values.min() * 0.9, values.min() * 1.1])
    if ax is None:
        fig, axes = _figure(size=(4.6, 3.4))
        ax = axes[0, 0]
    fig = ax.figure
    for k, v in data.items():
        ax.hist(v, bins=edges, alpha=0.55, label=str(k))
    ax.set_xscale("log")
    ax.set_xlabel(r"$\lambda_1$")
    ax.set_ylabel("inputs")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return save(fig, path)


# ---------------------------------------------------------------------------- training


def training_curves(history: Mapping[str, Sequence[float]] | Any, *, x: str | None = None, path=None,
                    title: str | None = None):
    """Loss curves on a log scale (Fig. 7 a-b).

    ``history`` is ``{name: values}`` (or an object with a ``.history`` /
    ``as_dict()`` giving one); ``x`` names the entry used as the horizontal axis
    (e.g. ``"step"``). Curves with non-positive values are drawn on a linear axis.

    Examples
    --------
    >>> from cellsheaf_nn.plots import training_curves
    >>> fig = training_curves({"train_loss": [1.0, 0.5, 0.2], "test_loss": [1.1, 0.6, 0.3]})
    """
    if hasattr(history, "as_dict"):
        history = history.as_dict()
    elif not isinstance(history, Mapping) and hasattr(history, "history"):
        history = history.history
    curves = {k: _np(v) for k, v in history.items() if k != x and np.ndim(v) == 1 and len(v)}
    if not curves:
        raise ValueError("training_curves found no 1-d series in the history")
    xs = _np(history[x]) if x else None
    fig, axes = _figure()
    ax = axes[0, 0]
    positive = all((v > 0).all() for v in curves.values())
    for k, v in curves.items():
        ax.plot(np.arange(len(v)) if xs is None else xs[: len(v)], v, lw=1.5, label=k)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(x or "record")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    return save(fig, path)


def decision_surface(predict: Callable[[torch.Tensor], torch.Tensor], X, Y=None, *, kind: str = "auto",
                     resolution: int = 120, margin: float = 0.1, ax=None, path=None, title: str | None = None,
                     vmin=None, vmax=None):
    """A model's regression surface or decision regions on a 2-d input domain (Figs. 7, 14).

    Parameters
    ----------
    predict : callable
        ``(N, 2) -> (N, n_out)`` (e.g. ``model`` or ``ns.infer``); evaluated on a grid.
    X : (M, 2)
        Data points (they set the domain and are drawn on top).
    Y : (M,) or (M, 1), optional
        Targets (regression) or class labels (classification) used to colour the points.
    kind : {"auto", "regression", "classification"}
        ``"auto"``: classification when the model has several outputs or
        ``Y`` is integer-valued.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf_nn.plots import decision_surface
    >>> X = torch.rand(20, 2, dtype=torch.float64)
    >>> fig = decision_surface(lambda x: x.sum(1, keepdim=True), X, kind="regression")
    """
    Xn = _np(X)
    if Xn.ndim != 2 or Xn.shape[1] != 2:
        raise ValueError(f"decision_surface needs 2-d inputs X of shape (M, 2), got {Xn.shape}")
    lo, hi = Xn.min(0), Xn.max(0)
    pad = margin * np.maximum(hi - lo, 1e-9)
    g0, g1 = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], resolution),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], resolution))
    dtype = X.dtype if isinstance(X, torch.Tensor) else torch.float64
    grid = torch.as_tensor(np.stack([g0.ravel(), g1.ravel()], 1), dtype=dtype)
    with torch.no_grad():
        out = _np(predict(grid))
    out = out[:, None] if out.ndim == 1 else out
    Yn = None if Y is None else _np(Y).reshape(len(Xn), -1)
    if kind == "auto":
        integral = Yn is not None and np.allclose(Yn, np.round(Yn)) and len(np.unique(Yn)) <= 10
        kind = "classification" if out.shape[1] > 1 or integral else "regression"
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'auto', 'regression' or 'classification', got {kind!r}")
    if ax is None:
        fig, axes = _figure(size=(4.4, 3.8))
        ax = axes[0, 0]
    fig = ax.figure
    if kind == "regression":
        cs_ = ax.contourf(g0, g1, out[:, 0].reshape(g0.shape), levels=20, cmap="viridis", vmin=vmin, vmax=vmax)
        fig.colorbar(cs_, ax=ax)
        if Yn is not None:
            ax.scatter(Xn[:, 0], Xn[:, 1], c=Yn[:, 0], cmap="viridis", s=10, edgecolors="white", lw=0.3,
                       vmin=cs_.get_clim()[0], vmax=cs_.get_clim()[1])
    else:
        cls = out.argmax(1) if out.shape[1] > 1 else (out[:, 0] >= 0.5).astype(int)
        n_cls = int(max(cls.max(), 0 if Yn is None else Yn.max())) + 1
        ax.contourf(g0, g1, cls.reshape(g0.shape), levels=np.arange(n_cls + 1) - 0.5, cmap="tab10", alpha=0.3,
                    vmin=0, vmax=9)
        c = "black" if Yn is None else Yn[:, 0].astype(int)
        ax.scatter(Xn[:, 0], Xn[:, 1], c=c, cmap="tab10", vmin=0, vmax=9, s=10, edgecolors="black", lw=0.3)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)
    return save(fig, path)
