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

Functions take a compiled network (a [`NeuralSheaf`][cellsheaf_nn.neural.NeuralSheaf]) and a
batch of inputs ``(B, n_in)``; nothing loops over the batch.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> _ = torch.manual_seed(0)
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

import cellsheaf as cs
from cellsheaf.energy import edge_energies
from cellsheaf.operators import apply_coboundary_jvp, edge_weights, expressed
from cellsheaf.spectral import block_energy as _block_energy

__all__ = [
    "edge_type", "edge_layer", "edge_group", "group_trace", "restricted_laplacians", "spectrum", "eigenpairs",
    "SpectralSummary", "spectral_summary", "block_energy", "eigenvector_stability", "SpectralTracker",
    "discord", "discord_by", "discord_trace", "diffusion_path", "Residual", "residuals", "PinnedDiscord",
    "pinned_discord", "report",
]


_CHUNK = 1 << 24  # entries of the Jacobian workspace of one batched pass of restricted_laplacians

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


def edge_group(name: Hashable, by: str, ns=None) -> str:
    """The group of edge ``name`` when discord is split ``by`` ``"type"``, ``"layer"`` or ``"edge"``.

    A compiled network (``ns`` with ``edge_info``) answers from its layout (the
    edge kind; the layer index ``ℓ`` of the Linear layer the edge belongs to);
    edges it does not know (penalty edges of soft pins) and plain sheaves fall
    back to the name ([`edge_type`][cellsheaf_nn.diagnostics.edge_type], [`edge_layer`][cellsheaf_nn.diagnostics.edge_layer]).

    Examples
    --------
    >>> edge_group("act:a2", "layer")
    '2'
    """
    if by not in ("type", "layer", "edge"):
        raise ValueError(f"group by 'type', 'layer' or 'edge', got {by!r}")
    if by == "edge":
        return str(name)
    info = getattr(ns, "edge_info", {}).get(name)
    if info is None:
        return edge_type(name) if by == "type" else edge_layer(name)
    if by == "type":
        return info.kind
    return str(info.layer) if info.layer is not None else info.kind


def group_trace(series: Mapping[Hashable, Any], by: str, ns=None) -> dict[str, Any]:
    """Sum per-edge values (scalars, arrays or tensors of equal shape) into groups ([`edge_group`][cellsheaf_nn.diagnostics.edge_group]).

    Groups keep the order of first appearance.

    Examples
    --------
    >>> group_trace({"weight:z1": 1.0, "act:a1": 2.0, "weight:z2": 3.0}, "type")
    {'weight': 4.0, 'act': 2.0}
    """
    out: dict[str, Any] = {}
    for name, v in series.items():
        k = edge_group(name, by, ns)
        out[k] = v if k not in out else out[k] + v
    return out


# ---------------------------------------------------------------------------- states of a network


def _sheaf(ns):
    """The sheaf a network solves on (with its soft-pin penalty edges), or a plain sheaf itself."""
    return getattr(ns, "pinned_sheaf", getattr(ns, "sheaf", ns))


def _check_inputs(ns, X) -> Tensor:
    X = torch.as_tensor(X)
    if not X.is_floating_point():
        X = X.to(_sheaf(ns).dtype)
    if X.dim() == 1:
        X = X.unsqueeze(0)
    n_in = getattr(ns, "n_in", None)
    if X.dim() != 2 or (n_in is not None and X.shape[1] != n_in):
        raise ValueError(f"inputs must have shape (B, {n_in}); got {tuple(X.shape)}")
    return X


def _fixed(ns, X: Tensor) -> Tensor:
    """Sorted flat indices of the coordinates the network holds fixed (inputs, ones blocks, pins)."""
    return ns.boundary(X).resolve(_sheaf(ns)).fixed


def _states(ns, X: Tensor) -> Tensor:
    """The full cochains ``(B, C0)`` the network settles in on inputs ``X`` (the forward pass, pins respected)."""
    _, state = ns.infer(X, return_state=True)
    return state.cochain.flat.detach()


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
    w = edge_weights(S, at.dtype, at.device)
    chunk = max(1, _CHUNK // max(n * max(C0, S.C1), 1))  # inputs per pass: bounds the (chunk·n, C0) workspace
    out = []
    for start in range(0, B, chunk):
        a = at[start:start + chunk]
        cols = apply_coboundary_jvp(S, a.repeat_interleave(n, 0), basis.repeat(len(a), 1)).reshape(len(a), n, -1)
        out.append(torch.einsum("bic,c,bjc->bij", cols, w, cols))
    return torch.cat(out)


def eigenpairs(ns, X) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(B, n)`` ascending and orthonormal eigenvectors ``(B, n, n)`` (columns) of
    ``L[Ω,Ω]`` at the activation pattern of each input.

    The free coordinates ``Ω`` are in flat-cochain order (see [`block_energy`][cellsheaf_nn.diagnostics.block_energy]).
    """
    return torch.linalg.eigh(_laplacians(ns, X))


def _laplacians(ns, X) -> Tensor:
    """``L[Ω,Ω]`` at the state each input settles in, ``(B, n, n)``."""
    X = _check_inputs(ns, X)
    with torch.no_grad():
        return restricted_laplacians(_sheaf(ns), _fixed(ns, X), _states(ns, X))


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
    return torch.linalg.eigvalsh(_laplacians(ns, X))


def block_energy(S, fixed: Tensor, vectors: Tensor) -> dict[Hashable, Tensor]:
    """Fraction of each vector's squared norm on each vertex that has free coordinates, ``{vertex: (...)}``.

    ``vectors`` is ``(n_free,)`` or ``(B, n_free)`` over the free coordinates in
    flat order (as [`eigenpairs`][cellsheaf_nn.diagnostics.eigenpairs] returns them); a thin wrapper of
    [`cellsheaf.spectral.block_energy`][cellsheaf.spectral.block_energy] keyed by vertex.

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
    >>> from cellsheaf_nn.train import mlp
    >>> ns = csnn.compile(mlp([2, 30, 1], seed=0))        # He initialisation, zero biases
    >>> s = csnn.diagnostics.spectral_summary(ns, torch.randn(50, 2, dtype=torch.float64))
    >>> s.dominant_block("fiedler")                        # the output pre-activation z_{k+1} (Fig. 15)
    'z2'
    """
    X = _check_inputs(ns, X)
    S, fixed = _sheaf(ns), _fixed(ns, X)
    lam, V = eigenpairs(ns, X)
    fied, top = V[..., 0], V[..., -1]
    return SpectralSummary(
        eigenvalues=lam,
        block_energy={"fiedler": block_energy(S, fixed, fied), "top": block_energy(S, fixed, top)},
        stability={"fiedler": eigenvector_stability(fied), "top": eigenvector_stability(top)},
    )


class SpectralTracker:
    """Records spectral statistics of a network on fixed probe inputs as it trains (Figs. 16-18).

    Use it as a training callback — ``train_sgd(..., callbacks=[tracker])`` or
    ``SheafTrainer.fit(..., callbacks=[tracker])``: it is called with
    ``(step, history, owner)`` at every evaluation, where ``owner`` is the trainer
    (its ``ns`` is used) or the torch model (compiled on the fly) — or call
    [`record`][cellsheaf_nn.diagnostics.SpectralTracker.record] yourself. [`stats`][cellsheaf_nn.diagnostics.SpectralTracker.stats] then holds ``(S, 3)`` arrays of
    (q25, median, q75) per statistic, ready for
    [`cellsheaf_nn.plots.spectral_tracking`][cellsheaf_nn.plots.spectral_tracking]; `lambda_1_values` keeps
    every probe's gap per record (the distributions of Fig. 18).

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> task = csnn.datasets.paraboloid(seed=0)
    >>> model = csnn.mlp([2, 8, 1], seed=0)
    >>> tracker = csnn.diagnostics.SpectralTracker(task.X_test[:20])
    >>> _ = csnn.train_sgd(model, task.X_train, task.Y_train, steps=20, eval_every=10, progress=False,
    ...                    callbacks=[tracker])
    >>> tracker.steps, tracker.stats["lambda_1"].shape
    ([10, 20], (2, 3))
    """

    names = ("lambda_1", "lambda_max", "condition")

    def __init__(self, X: Tensor) -> None:
        self.X = X
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.lambda_1_values: list[Tensor] = []
        self._q: dict[str, list[np.ndarray]] = {k: [] for k in self.names}

    def record(self, step: int, ns, loss: float | None = None) -> None:
        """Compute the spectrum of ``ns`` on the probe inputs and append its quartiles (and ``loss``)."""
        lam = spectrum(ns, self.X)
        values = {"lambda_1": lam[:, 0], "lambda_max": lam[:, -1], "condition": lam[:, -1] / lam[:, 0]}
        for k in self.names:
            self._q[k].append(_quartiles(values[k]).numpy())
        self.lambda_1_values.append(lam[:, 0].detach().cpu())
        self.steps.append(int(step))
        if loss is not None:
            self.loss.append(float(loss))

    def __call__(self, step: int, history, owner) -> None:
        """The training-callback form: records at ``step`` with the latest training loss."""
        ns = getattr(owner, "ns", owner)
        if isinstance(ns, torch.nn.Module):
            from .compile import compile as compile_model

            ns = compile_model(ns)
        losses = getattr(history, "train_loss", None)
        self.record(step, ns, losses[-1] if losses else None)

    @property
    def stats(self) -> dict[str, np.ndarray]:
        """``{statistic: (S, 3)}`` quartiles per recorded step."""
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
    return group_trace(discord(ns, state), by, ns)


def discord_trace(ns, trajectory) -> dict[Hashable, Tensor]:
    """Per-edge discord along a trajectory of states, summed over the batch: ``{edge: (T,)}``.

    ``trajectory`` is ``(T, C0)`` or ``(T, B, C0)`` (e.g. from [`diffusion_path`][cellsheaf_nn.diagnostics.diffusion_path]),
    or a solver result whose ``extra["trajectory"]`` holds the per-edge energies it
    recorded (``ns.infer(..., record=k, return_state=True)[1].info``, ``cs.diffuse(..., record=k)``).
    """
    S = _sheaf(ns)
    recorded = getattr(trajectory, "extra", {}).get("trajectory")
    if recorded is not None:
        E = recorded["edge_energy"]
        E = E.reshape(E.shape[0], -1, E.shape[-1]).sum(1)
    else:
        traj = torch.as_tensor(trajectory)
        if traj.dim() not in (2, 3) or traj.shape[-1] != S.C0:
            raise ValueError(f"a trajectory has shape (T, C0) or (T, B, C0) with C0={S.C0}; got {tuple(traj.shape)}")
        T = traj.shape[0]
        E = edge_energies(S, traj.reshape(-1, S.C0)).reshape(T, -1, len(S.edges)).sum(1)
    if E.shape[-1] != len(S.edges):
        raise ValueError(f"the recorded energies have {E.shape[-1]} edges but the sheaf has {len(S.edges)}")
    return {name: E[:, k] for k, name in enumerate(S.edges)}


def diffusion_path(ns, X, *, steps: int = 2000, every: int = 10, dt: float | None = None, alpha: float = 1.0,
                   generator: torch.Generator | None = None, x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """States along the paper's Euler heat equation (18) from a random start: ``(t (K,), states (K, B, C0))``.

    Runs [`cellsheaf.diffuse`][cellsheaf.diffusion.diffuse] on the network's sheaf with its boundary data
    for ``steps`` Euler steps of size ``dt`` (default ``1/(α λ_max)`` at the
    start), keeping the state every ``every`` steps (and the first and last).
    The start is standard normal (``generator``) on the free coordinates unless
    ``x0`` (``(B, C0)``) is given. For stalk trajectories and phase planes
    (Figs. 6, 12, 13); [`discord_trace`][cellsheaf_nn.diagnostics.discord_trace] turns the states into discord.
    """
    X = _check_inputs(ns, X)
    if steps < 1 or every < 1:
        raise ValueError(f"steps and every must be positive, got steps={steps}, every={every}")
    S = _sheaf(ns)
    bnd = ns.boundary(X)
    rb = bnd.resolve(S, dtype=X.dtype)
    x = rb.fill(torch.randn(X.shape[0], S.C0, dtype=X.dtype, generator=generator) if x0 is None else x0)
    if dt is None:
        dt = 1.0 / (alpha * cs.lambda_max(S, boundary=rb, at=x[0]))
    times, states, done = [0.0], [x], 0
    while done < steps:
        k = min(every, steps - done)
        x = cs.diffuse(S, x, boundary=bnd, method="euler", t=k * dt, dt=dt, alpha=alpha,
                       estimate_error=False).x.flat
        done += k
        times.append(done * dt)
        states.append(x)
    return torch.tensor(times, dtype=X.dtype), torch.stack(states)


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
    """Per-coordinate residuals of the weight and activation edges of a network state (Figs. 9, 19-21).

    The pre-activation of a weight edge is the block it defines (``F_v x_v``);
    that of an activation edge is the stalk it reads (the neural block of its tail).

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
    ...                                       torch.nn.Linear(3, 1)).double())
    >>> _, st = ns.infer(torch.randn(4, 2, dtype=torch.float64), return_state=True)
    >>> r = csnn.diagnostics.residuals(ns, st.cochain)
    >>> list(r), float(r["act:a1"].residual.abs().max())   # the forward pass is locally consistent
    (['weight:z1', 'act:a1', 'weight:z2'], 0.0)
    """
    S = _sheaf(ns)
    x = torch.as_tensor(state.flat if hasattr(state, "flat") else state)
    x = x.unsqueeze(0) if x.dim() == 1 else x
    av, au = expressed(S, x)
    out = {}
    for e in S.edge_items():
        kind = edge_group(e.name, "type", ns)
        if kind not in types:
            continue
        sl = S.edge_slice(e.name)
        z = av[:, sl] if kind == "weight" else x[:, S.vertex_slice(e.u)][:, : e.dim]
        label = r"$(\bar W a)_j - z_j$" if kind == "weight" else r"$\phi(z_j) - a_j$"
        out[e.name] = Residual(e.name, z, au[:, sl] - av[:, sl], label)
    return out


def _mean_std(v: Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


@dataclass
class PinnedDiscord:
    """Discord of a network with its output hard-pinned to labels (Table 3).

    Attributes
    ----------
    edges : ``{edge: (B,)}`` discord of every edge for every input.
    state
        ``(B, C0)`` the clamped states (for [`residuals`][cellsheaf_nn.diagnostics.residuals]).
    info : the solver's report. Pinning can leave some inputs on a switching
        surface of a ReLU (Note 5.1): a generalised (Clarke) critical point, not
        a global section. [`on_kinks`][cellsheaf_nn.diagnostics.PinnedDiscord.on_kinks] counts them; ``info.message`` says
        more, and ``info.converged`` is ``False`` if the solver stalled.
    """

    edges: dict[str, Tensor]
    state: Tensor
    info: Any

    @property
    def total(self) -> Tensor:
        """Total discord per input, ``(B,)``."""
        return sum(self.edges.values())

    @property
    def converged(self) -> bool:
        return bool(self.info.converged)

    @property
    def on_kinks(self) -> int:
        """Number of inputs whose clamped state rests on a ReLU switching surface (0 if not reported)."""
        kinks = self.info.extra.get("on_kinks") if isinstance(self.info.extra, dict) else None
        return int((torch.as_tensor(kinks) > 0).sum()) if kinks is not None else 0

    def table(self) -> dict[str, tuple[float, float]]:
        """``{edge: (mean, std)}`` over the inputs, plus ``"total"``."""
        out = {k: _mean_std(v) for k, v in self.edges.items()}
        out["total"] = _mean_std(self.total)
        return out


def pinned_discord(ns, X, Y, **infer_kw) -> PinnedDiscord:
    """Per-edge discord with the output hard-pinned to the labels (Table 3).

    Clamps the output of ``ns`` to ``Y`` (``(B, n_out)``, or integer class
    indices ``(B,)`` as one-hot rows), lets the rest of the network settle
    (``ns.infer`` with ``infer_kw``; by default Newton from the forward pass,
    which also finds the critical points on switching surfaces that gradient
    flow only creeps towards), and returns every edge's discord per input. The clamp is removed afterwards. Works for any network, trained
    by SGD or as a sheaf.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
    ...                                       torch.nn.Linear(3, 1)).double())
    >>> X = torch.randn(8, 2, dtype=torch.float64)
    >>> pd = csnn.diagnostics.pinned_discord(ns, X, ns.infer(X))   # labels = predictions
    >>> pd.converged, pd.table()["total"][0] < 1e-12
    (True, True)
    """
    X = _check_inputs(ns, X)
    Y = torch.as_tensor(Y)
    if Y.dim() == 1 and not Y.is_floating_point() and ns.n_out > 1:  # class indices, as the losses take them
        if bool(((Y < 0) | (Y >= ns.n_out)).any()):
            raise ValueError(f"class labels must lie in 0..{ns.n_out - 1} for the output {ns.output!r}; got "
                             f"{int(Y[(Y < 0) | (Y >= ns.n_out)][0])}")
        Y = torch.nn.functional.one_hot(Y.long(), ns.n_out)
    Y = Y.to(X.dtype).reshape(X.shape[0], -1)
    if Y.shape[1] != ns.n_out:
        raise ValueError(f"labels must have shape (B, {ns.n_out}) for the output {ns.output!r}; got {tuple(Y.shape)}")
    pin = ns.clamp(ns.output, Y)
    try:
        _, state = ns.infer(X, return_state=True, check=False, **infer_kw)
    finally:
        ns.unpin(pin)
    flat = state.cochain.flat
    return PinnedDiscord({str(k): v for k, v in discord(ns, flat).items()}, flat, state.info)


def report(ns, X, Y=None, *, summary: SpectralSummary | None = None, pinned: PinnedDiscord | None = None) -> str:
    """A short text report: sheaf size, spectral statistics, and (given labels) the pinned discord.

    ``summary`` and ``pinned`` reuse results of [`spectral_summary`][cellsheaf_nn.diagnostics.spectral_summary] and
    [`pinned_discord`][cellsheaf_nn.diagnostics.pinned_discord] instead of computing them again.

    Examples
    --------
    >>> import torch, cellsheaf_nn as csnn
    >>> ns = csnn.compile(csnn.mlp([2, 6, 1], seed=0))
    >>> print(csnn.diagnostics.report(ns, torch.randn(20, 2, dtype=torch.float64)).splitlines()[0])
    sheaf: 4 vertices, 3 edges, C0=22, C1=13, free=13
    """
    S = _sheaf(ns)
    s = (summary or spectral_summary(ns, X)).as_dict()
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
    if pinned is None and Y is not None:
        pinned = pinned_discord(ns, X, Y)
    if pinned is not None:
        lines.append("discord with the output pinned to the labels (mean ± std over inputs):")
        for k, (m, sd) in pinned.table().items():
            lines.append(f"  {k:<14} {m:.4g} ± {sd:.2g}")
        if not pinned.converged:
            lines.append(f"  (the clamped solve did not converge: {pinned.info.message})")
        elif pinned.on_kinks:
            lines.append(f"  ({pinned.on_kinks} of {len(pinned.state)} inputs rest on a ReLU switching surface: "
                         "Clarke-stationary, not a global section, Note 5.1)")
    return "\n".join(lines)
