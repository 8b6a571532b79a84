"""Looking at a network through its sheaf: spectra of ``L[Ω,Ω]`` and where the discord sits (Sec. 6.3, App. C.3).

Spectral diagnostics linearise the sheaf at the state each input reaches (its
activation pattern, Eq. 12) and study the restricted Laplacian ``L[Ω,Ω]`` there:
its eigenvalues, the spectral gap ``λ₁`` that sets the diffusion rate (Thm 4.1),
which quantity (``z_ℓ``, ``a_ℓ``, ...) carries the Fiedler vector and the
``λ_max`` eigenvector, and how stable those vectors are across inputs.

Discord diagnostics split the energy ``Σ_e ½‖(δx)_e‖²`` of a state by edge, by
edge type (weight / act / out / penalty / ...) and by layer, give per-coordinate
residuals split into active and inactive coordinates, and measure the discord
left when the output is hard-pinned to the labels (Table 3).

Functions take a compiled network (a :class:`~cellsheaf_nn.NeuralSheaf`) and a
batch of inputs ``(B, n_in)``; nothing loops over the batch.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
>>> ns = csnn.compile(net)
>>> X = torch.randn(5, 2, dtype=torch.float64)
>>> csnn.diagnostics.spectrum(ns, X).shape[0]
5
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from torch import Tensor

from cellsheaf.energy import edge_energies
from cellsheaf.operators import apply_coboundary_jvp, edge_weights, expressed
from cellsheaf.spectral import block_energy as _block_energy

__all__ = [
    "edge_type", "edge_layer", "group_trace", "restricted_laplacians", "spectrum", "eigenpairs",
    "SpectralSummary", "spectral_summary", "block_energy", "eigenvector_stability", "SpectralTracker",
    "discord", "discord_by", "discord_trace", "Residual", "residuals", "pinned_discord", "report",
]


# ---------------------------------------------------------------------------- naming of edges


def edge_type(name: Hashable) -> str:
    """The type of an edge from its name: the prefix before ``":"`` (``"weight:z1" -> "weight"``).

    Names without a type prefix (edges of a hand-built sheaf) have type ``"edge"``.

    Examples
    --------
    >>> edge_type("act:a2"), edge_type("u->v")
    ('act', 'edge')
    """
    s = str(name)
    return s.split(":", 1)[0] if ":" in s else "edge"


def edge_layer(name: Hashable) -> str:
    """The layer an edge belongs to: the index of the quantity it defines (``"weight:z2" -> "2"``).

    Edges whose target has no index (``"out:y"``) are their own group, named
    after the target; penalty edges form the group ``"penalty"``; untyped names
    are returned unchanged.

    Examples
    --------
    >>> edge_layer("weight:z2"), edge_layer("act:a2"), edge_layer("out:y"), edge_layer("penalty:a1")
    ('2', '2', 'y', 'penalty')
    """
    s = str(name)
    if ":" not in s:
        return s
    kind, target = s.split(":", 1)
    if kind == "penalty":
        return "penalty"
    m = re.search(r"(\d+)$", target)
    return m.group(1) if m else target


def group_trace(series: Mapping[Hashable, Any], by: str) -> dict[str, Any]:
    """Sum per-edge values (scalars, arrays or tensors of equal shape) into groups.

    ``by`` is ``"type"`` (:func:`edge_type`), ``"layer"`` (:func:`edge_layer`) or
    ``"edge"`` (no grouping). Groups keep the order of first appearance.

    Examples
    --------
    >>> group_trace({"weight:z1": 1.0, "act:a1": 2.0, "weight:z2": 3.0}, "type")
    {'weight': 4.0, 'act': 2.0}
    """
    key = {"type": edge_type, "layer": edge_layer, "edge": str}.get(by)
    if key is None:
        raise ValueError(f"group by 'type', 'layer' or 'edge', got {by!r}")
    out: dict[str, Any] = {}
    for name, v in series.items():
        k = key(name)
        out[k] = v if k not in out else out[k] + v
    return out


# ---------------------------------------------------------------------------- states of a network


def _sheaf(ns):
    return getattr(ns, "sheaf", ns)


def _fixed(ns) -> Tensor:
    """Sorted flat indices of the coordinates the network holds fixed (inputs, ones blocks, pins)."""
    return ns.fixed_indices()


def _states(ns, X: Tensor) -> Tensor:
    """The full cochains ``(B, C0)`` the network reaches on inputs ``X`` (its forward pass, pins respected)."""
    X = _check_inputs(ns, X)
    _, state = ns.infer(X, return_state=True)
    return state.flat if hasattr(state, "flat") else state


def _check_inputs(ns, X) -> Tensor:
    X = torch.as_tensor(X)
    if not X.is_floating_point():
        X = X.to(_sheaf(ns).dtype)
    n_in = getattr(ns, "n_in", None)
    if X.dim() == 1:
        X = X.unsqueeze(0)
    if X.dim() != 2 or (n_in is not None and X.shape[1] != n_in):
        raise ValueError(f"inputs must have shape (B, {n_in}); got {tuple(X.shape)}")
    return X


# ---------------------------------------------------------------------------- spectra


def restricted_laplacians(S, fixed: Tensor, at: Tensor) -> Tensor:
    """Dense ``L[Ω,Ω]`` of the sheaf linearised at each state, ``(B, n_free, n_free)``.

    ``fixed`` are the flat indices of the fixed coordinates ``U``; ``at`` is
    ``(B, C0)`` (or ``(C0,)``). Nonlinear maps enter through their Jacobians at
    ``at`` (the frozen activation pattern for ReLU); potentials are treated as
    quadratic with the edge weights, i.e. this is ``J_Ωᵀ W J_Ω`` with ``J`` the
    Jacobian of the coboundary (the Gauss-Newton matrix of the energy).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> from cellsheaf_nn.diagnostics import restricted_laplacians
    >>> S = cs.Sheaf(); S.add_vertex("a", 1); S.add_vertex("b", 1)
    >>> _ = S.add_edge("a", "b", torch.eye(1, dtype=torch.float64), cs.maps.ReLU(1))
    >>> restricted_laplacians(S, torch.tensor([0]), torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64))
    tensor([[[1.]],
    <BLANKLINE>
            [[0.]]], dtype=torch.float64)
    """
    at = at.unsqueeze(0) if at.dim() == 1 else at
    B, C0 = at.shape
    mask = torch.ones(C0, dtype=torch.bool, device=at.device)
    mask[torch.as_tensor(fixed, dtype=torch.long, device=at.device)] = False
    free = torch.nonzero(mask).flatten()
    n = free.numel()
    basis = at.new_zeros(n, C0)
    basis[torch.arange(n, device=at.device), free] = 1.0
    cols = apply_coboundary_jvp(S, at.repeat_interleave(n, 0), basis.repeat(B, 1)).reshape(B, n, -1)
    w = edge_weights(S, at.dtype, at.device)
    return torch.einsum("bic,c,bjc->bij", cols, w, cols)


def eigenpairs(ns, X) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(B, n)`` ascending and orthonormal eigenvectors ``(B, n, n)`` (columns) of
    ``L[Ω,Ω]`` at the activation pattern of each input.

    The free coordinates ``Ω`` are in flat-cochain order (see :func:`block_energy`).
    """
    S = _sheaf(ns)
    with torch.no_grad():
        states = _states(ns, X).detach()
        L = restricted_laplacians(S, _fixed(ns), states)
        return torch.linalg.eigh(L)


def spectrum(ns, X) -> Tensor:
    """Eigenvalues, ascending, of the restricted Laplacian ``L[Ω,Ω]`` at each input's activation pattern.

    Parameters
    ----------
    ns : NeuralSheaf
    X : (B, n_in) inputs

    Returns
    -------
    Tensor of shape ``(B, n_free)``; ``[:, 0]`` is the spectral gap ``λ₁``
    (positive by Lemma 3.2), ``[:, -1]`` is ``λ_max``.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).double()
    >>> lam = csnn.diagnostics.spectrum(csnn.compile(net), torch.randn(4, 2, dtype=torch.float64))
    >>> bool((lam[:, 0] > 0).all())
    True
    """
    S = _sheaf(ns)
    with torch.no_grad():
        states = _states(ns, X).detach()
        return torch.linalg.eigvalsh(restricted_laplacians(S, _fixed(ns), states))


def block_energy(S, fixed: Tensor, vectors: Tensor) -> dict[Hashable, Tensor]:
    """Fraction of each vector's squared norm on each vertex that has free coordinates, ``{vertex: (...)}``.

    ``vectors`` is ``(n_free,)`` or ``(B, n_free)`` over the free coordinates in
    flat order (as :func:`eigenpairs` returns them); a thin wrapper of
    :func:`cellsheaf.spectral.block_energy` keyed by vertex.

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> from cellsheaf_nn.diagnostics import block_energy
    >>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("z", 2)
    >>> block_energy(S, torch.tensor([0]), torch.tensor([0.6, 0.8], dtype=torch.float64))
    {'z': tensor(1., dtype=torch.float64)}
    """
    fixed = torch.as_tensor(fixed, dtype=torch.long).cpu()
    E = _block_energy(S, vectors, boundary=fixed)
    out = {}
    for k, v in enumerate(S.vertices):
        sl = S.vertex_slice(v)
        if int(((fixed >= sl.start) & (fixed < sl.stop)).sum()) < S.dim(v):
            out[v] = E[..., k]
    return out


def eigenvector_stability(vectors: Tensor) -> float:
    """Mean ``|cos|`` between the unit vectors ``(B, n)`` of different inputs (1: identical up to sign).

    Examples
    --------
    >>> import torch
    >>> from cellsheaf_nn.diagnostics import eigenvector_stability
    >>> eigenvector_stability(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    1.0
    """
    B = vectors.shape[0]
    if B < 2:
        return 1.0
    V = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    G = (V @ V.T).abs()
    return float((G.sum() - G.diagonal().sum()) / (B * (B - 1)))


def _quartiles(t: Tensor) -> Tensor:
    return torch.quantile(t.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))


@dataclass
class SpectralSummary:
    """Spectral statistics of ``L[Ω,Ω]`` over a batch of inputs.

    Attributes
    ----------
    eigenvalues : (B, n) ascending, per input.
    lambda_1, lambda_max, condition : (B,) spectral gap, largest eigenvalue, their ratio.
    block_energy : ``{"fiedler": {vertex: (B,)}, "top": {vertex: (B,)}}`` energy fractions of the
        Fiedler vector and of the ``λ_max`` eigenvector on each vertex (Fig. 15).
    stability : ``{"fiedler": float, "top": float}`` mean ``|cos|`` of those vectors across inputs.
    """

    eigenvalues: Tensor
    block_energy: dict[str, dict[Hashable, Tensor]]
    stability: dict[str, float]
    lambda_1: Tensor = field(init=False)
    lambda_max: Tensor = field(init=False)
    condition: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.lambda_1 = self.eigenvalues[:, 0]
        self.lambda_max = self.eigenvalues[:, -1]
        self.condition = self.lambda_max / self.lambda_1

    def quartiles(self, name: str) -> Tensor:
        """(q25, median, q75) of ``"lambda_1"``, ``"lambda_max"`` or ``"condition"``."""
        return _quartiles(getattr(self, name))

    def dominant_block(self, which: str = "fiedler") -> Hashable:
        """The vertex carrying most of the mean energy of the ``"fiedler"`` or ``"top"`` eigenvector."""
        energy = self.block_energy[which]
        return max(energy, key=lambda v: float(energy[v].mean()))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (medians, IQRs, dominant blocks, stabilities)."""
        out: dict[str, Any] = {"inputs": int(self.eigenvalues.shape[0]), "n_free": int(self.eigenvalues.shape[1])}
        for k in ("lambda_1", "lambda_max", "condition"):
            q = self.quartiles(k)
            out[k] = {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]),
                      "std": float(getattr(self, k).double().std()) if self.eigenvalues.shape[0] > 1 else 0.0}
        for which in ("fiedler", "top"):
            out[f"{which}_energy"] = {str(v): float(e.mean()) for v, e in self.block_energy[which].items()}
            out[f"{which}_block"] = str(self.dominant_block(which))
            out[f"{which}_stability"] = self.stability[which]
        return out


def spectral_summary(ns, X) -> SpectralSummary:
    """Spectrum, gap, ``λ_max``, condition number, eigenvector block energies and stability over inputs.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    >>> s = csnn.diagnostics.spectral_summary(csnn.compile(net), torch.randn(20, 2, dtype=torch.float64))
    >>> s.dominant_block("fiedler")
    'z2'
    """
    S = _sheaf(ns)
    fixed = _fixed(ns)
    lam, V = eigenpairs(ns, X)
    fied, top = V[..., 0], V[..., -1]
    return SpectralSummary(
        eigenvalues=lam,
        block_energy={"fiedler": block_energy(S, fixed, fied), "top": block_energy(S, fixed, top)},
        stability={"fiedler": eigenvector_stability(fied), "top": eigenvector_stability(top)},
    )


class SpectralTracker:
    """Records spectral statistics of a network on fixed probe inputs as it trains (Figs. 16-18).

    Call :meth:`record` (or the tracker itself) with the step and the network;
    :attr:`stats` then holds ``(S, 3)`` arrays of (q25, median, q75) per
    statistic, ready for :func:`cellsheaf_nn.plots.spectral_tracking`.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
    >>> ns = csnn.compile(net)
    >>> tr = csnn.diagnostics.SpectralTracker(torch.randn(10, 2, dtype=torch.float64))
    >>> tr.record(0, ns); tr.record(1, ns)
    >>> tr.stats["lambda_1"].shape
    (2, 3)
    """

    names = ("lambda_1", "lambda_max", "condition")

    def __init__(self, X: Tensor) -> None:
        self.X = X
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.lambda_1_values: list[Tensor] = []
        self._q: dict[str, list[np.ndarray]] = {k: [] for k in self.names}

    def record(self, step: int, ns, loss: float | None = None) -> None:
        """Compute the spectrum on the probe inputs and append its quartiles."""
        lam = spectrum(ns, self.X)
        values = {"lambda_1": lam[:, 0], "lambda_max": lam[:, -1], "condition": lam[:, -1] / lam[:, 0]}
        for k in self.names:
            self._q[k].append(_quartiles(values[k]).numpy())
        self.lambda_1_values.append(lam[:, 0].detach().cpu())
        self.steps.append(int(step))
        if loss is not None:
            self.loss.append(float(loss))

    __call__ = record

    @property
    def stats(self) -> dict[str, np.ndarray]:
        return {k: np.array(v).reshape(-1, 3) for k, v in self._q.items()}


# ---------------------------------------------------------------------------- discord


def discord(ns, state) -> dict[Hashable, Tensor]:
    """Per-edge discord ``{edge: (B,)}`` of a state (a cochain or ``(B, C0)`` tensor) of the network's sheaf.

    With quadratic potentials the value of edge ``e`` is ``½ w_e ‖(δx)_e‖²``.
    """
    E = edge_energies(_sheaf(ns), state)
    return {name: E[..., k] for k, name in enumerate(_sheaf(ns).edges)}


def discord_by(ns, state, by: str = "type") -> dict[str, Tensor]:
    """Discord of a state summed by ``"edge"``, ``"type"`` or ``"layer"`` (``{group: (B,)}``).

    Examples
    --------
    >>> import torch, cellsheaf as cs
    >>> from cellsheaf_nn.diagnostics import discord_by
    >>> S = cs.Sheaf(); S.add_vertex("x", 1); S.add_vertex("z1", 1)
    >>> _ = S.add_edge("x", "z1", torch.eye(1), torch.eye(1), name="weight:z1")
    >>> discord_by(S, torch.tensor([[0.0, 2.0]]))
    {'weight': tensor([2.])}
    """
    return group_trace(discord(ns, state), by)


def discord_trace(ns, trajectory) -> dict[Hashable, Tensor]:
    """Per-edge discord along a trajectory ``(T, C0)`` or ``(T, B, C0)``, summed over the batch: ``{edge: (T,)}``.

    The trajectory is what ``cs.diffuse(..., record=...)`` or
    ``ns.infer(..., method="diffusion", return_state=True)`` keeps.
    """
    S = _sheaf(ns)
    traj = torch.as_tensor(trajectory)
    if traj.dim() not in (2, 3) or traj.shape[-1] != S.C0:
        raise ValueError(f"a trajectory has shape (T, C0) or (T, B, C0) with C0={S.C0}; got {tuple(traj.shape)}")
    T = traj.shape[0]
    E = edge_energies(S, traj.reshape(-1, S.C0)).reshape(T, -1, len(S.edges)).sum(1)
    return {name: E[:, k] for k, name in enumerate(S.edges)}


@dataclass
class Residual:
    """Per-coordinate residuals of one edge, ``(B, d_e)`` each.

    ``residual`` is ``F_u(x_u) − F_v(x_v)``: for a weight edge the forward-pass
    prediction minus the stalk, ``(W̄ a)_j − z_j``; for an activation edge
    ``ReLU(z_j) − a_j`` (Figs. 9, 19). ``z`` is the pre-activation each coordinate
    is coloured by, and ``active = z >= 0``.
    """

    edge: Hashable
    z: Tensor
    residual: Tensor
    label: str

    @property
    def active(self) -> Tensor:
        return self.z >= 0

    def split(self) -> tuple[Tensor, Tensor]:
        """The residuals of the active and of the inactive coordinates (flattened)."""
        return self.residual[self.active], self.residual[~self.active]


def residuals(ns, state, types: tuple[str, ...] = ("weight", "act")) -> dict[Hashable, Residual]:
    """Per-coordinate residuals of the weight and activation edges of a network state.

    The pre-activation of a weight edge is the stalk it defines (its head);
    that of an activation edge is the stalk it reads (its tail).
    """
    S = _sheaf(ns)
    x = torch.as_tensor(state.flat if hasattr(state, "flat") else state)
    x = x.unsqueeze(0) if x.dim() == 1 else x
    av, au = expressed(S, x)
    out = {}
    for e in S.edge_items():
        kind = edge_type(e.name)
        if kind not in types:
            continue
        sl = S.edge_slice(e.name)
        end = e.v if kind == "weight" else e.u
        z = x[:, S.vertex_slice(end)][:, : e.dim]
        label = r"$(\bar W a)_j - z_j$" if kind == "weight" else r"$\phi(z_j) - a_j$"
        out[e.name] = Residual(e.name, z, au[:, sl] - av[:, sl], label)
    return out


def pinned_discord(ns, X, Y, **infer_kw) -> dict[str, tuple[float, float]]:
    """Per-edge discord with the output hard-pinned to the labels (Table 3): ``{edge: (mean, std)}``.

    Clamps the output of ``ns`` to ``Y``, lets the rest of the network settle
    (``ns.infer`` with ``infer_kw``), and reports the mean and standard deviation
    over the inputs of each edge's discord, plus ``"total"``. The network is
    left as it was (the clamp is removed).
    """
    X = _check_inputs(ns, X)
    Y = torch.as_tensor(Y, dtype=X.dtype)
    with ns.clamped(Y):
        _, state = ns.infer(X, return_state=True, **infer_kw)
    d = discord(ns, state.flat if hasattr(state, "flat") else state)
    out = {str(k): (float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0) for k, v in d.items()}
    total = sum(d.values())
    out["total"] = (float(total.mean()), float(total.std()) if total.numel() > 1 else 0.0)
    return out


def report(ns, X, Y=None) -> str:
    """A short text report: sheaf size, spectral statistics and discord by type (and pinned, given labels)."""
    S = _sheaf(ns)
    s = spectral_summary(ns, X).as_dict()
    lines = [
        f"sheaf: {len(S.vertices)} vertices, {len(S.edges)} edges, C0={S.C0}, C1={S.C1}, free={s['n_free']}",
        f"spectrum of L[Ω,Ω] over {s['inputs']} inputs:",
    ]
    for k in ("lambda_1", "lambda_max", "condition"):
        q = s[k]
        lines.append(f"  {k:<10} median {q['median']:.4g}  IQR [{q['q25']:.4g}, {q['q75']:.4g}]")
    lines.append(f"  Fiedler vector lives on {s['fiedler_block']} ({s['fiedler_energy'][s['fiedler_block']]:.0%}), "
                 f"stability {s['fiedler_stability']:.3f}")
    lines.append(f"  λ_max vector lives on {s['top_block']} ({s['top_energy'][s['top_block']]:.0%}), "
                 f"stability {s['top_stability']:.3f}")
    if Y is not None:
        pinned = pinned_discord(ns, X, Y)
        lines.append("discord with the output pinned to the labels (mean ± std over inputs):")
        for k, (m, sd) in pinned.items():
            lines.append(f"  {k:<14} {m:.4g} ± {sd:.2g}")
    return "\n".join(lines)
