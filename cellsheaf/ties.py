"""Ties of max pooling: the switching surfaces ``x_i = x_j`` inside a window, as Newton's active set holds them.

A max-pool output copies the largest input of its window, so the map switches where
two inputs of a window are equal (a surface ``x_i = x_j``, not a coordinate kink
``x = c`` as for ReLU). An equilibrium can rest on such a surface: the energy wants
the window's maximum lower while every input of the tie is the maximum. Newton's
active set holds a *tie* (the inputs of a window that are equal to its maximum) by
moving them together: its directions are projected onto ``x_i = x_j`` (the mean over
the tie, [`Ties.project`][cellsheaf.ties.Ties.project]), so the tie stays exact.

Stationarity on a tie ``T`` (the window's selection ``ℓ``, the first maximum as torch
scans it) reads two gradients: ``g_R`` at the tie and ``g_L`` with ``x_ℓ`` just below it
(the selection moves to the next member). With ``c = g_R[ℓ] − g_L[ℓ]`` (the derivative
of the energy in the window's output) and ``g0`` the rest (``g_R``, and ``g_L[ℓ]`` at ``ℓ``),
the point is stationary on the tie when moving the tie together does not descend
(``Σ_T g_R = Σ_T g0 + c = 0``), nor moving one member alone up (``g0_j + c ≥ 0``) or
down (``g0_j ≤ 0``). For ``c ≥ 0`` this is the Clarke condition (``0`` is a convex
combination of the members' selection gradients, weights ``−g0_j / c``); for ``c < 0``
no tie is stationary (a member alone rises and lowers the energy), as with a concave kink.

Only windows whose inputs are free coordinates read by no other max-pool window and feeding no
elementwise kink are handled (non-overlapping pooling of an activation, as in CNNs); the
others switch as before.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("m", 1)
>>> _ = S.add_edge("a", "m", cs.maps.MaxPool1d(2, in_shape=(1, 2)), torch.eye(1, dtype=torch.float64))
>>> ties = cs.ties.Ties.of(S, torch.tensor([0, 1]))
>>> ties.windows
tensor([[0, 1]])
>>> ties.project(torch.tensor([[1.0, 3.0]], dtype=torch.float64), torch.tensor([[[True, True]]]))
tensor([[2., 2.]], dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Ties"]


class Ties:
    """The max-pool windows on the free coordinates, and the operations of Newton's active set on their ties.

    ``windows`` is ``(W, K)``: per window the positions of its inputs among the free coordinates in torch's
    scan order, ``-1`` for padding. A tie state is a ``(B, W, K)`` bool mask per item; a window holds a
    tie when at least two of its members are marked.
    """

    def __init__(self, windows: Tensor, n: int):
        self.windows, self.n = windows, int(n)
        self.valid = windows >= 0
        self.flat = torch.where(self.valid, windows, self.n).reshape(-1)  # padding reads/writes a spare column
        members = torch.zeros(self.n + 1, dtype=torch.bool, device=windows.device)
        members[self.flat] = True
        self.members = members[:self.n]  # the coordinates in a window

    @classmethod
    def of(cls, S, free: Tensor, kinked: Tensor | None = None) -> "Ties":
        """The windows of every [`cellsheaf.maps.MaxPool`][cellsheaf.maps.MaxPool] edge map of ``S`` whose
        inputs are all free (``free``: the free coordinates, sorted), each read by that window only and, with ``kinked``
        (``(n_free,)`` bool), none on an elementwise kink (cached on the sheaf)."""
        from .maps import MaxPool

        key = ("ties", free.cpu().numpy().tobytes(), None if kinked is None else kinked.cpu().numpy().tobytes())
        if key not in S._cache:
            pos = torch.full((S.C0 + 1,), -1, dtype=torch.long)  # global coordinate -> free position
            pos[free.cpu()] = torch.arange(free.numel())
            blocks = []
            for e in S.edge_items():
                for F, w in ((e.Fu, e.u), (e.Fv, e.v)):
                    if isinstance(F, MaxPool):
                        win = F.windows()
                        glob = torch.where(win >= 0, win + S.vertex_slice(w).start, S.C0)
                        blocks.append(torch.where(win >= 0, pos[glob], -2))  # -2: padding, -1: not free
            n = free.numel()
            windows = torch.zeros(0, 1, dtype=torch.long)
            if blocks:
                K = max(b.shape[1] for b in blocks)
                win = torch.cat([torch.nn.functional.pad(b, (0, K - b.shape[1]), value=-2) for b in blocks])
                uses = torch.zeros(n + 1, dtype=torch.long).index_add_(
                    0, torch.where(win >= 0, win, n).reshape(-1), torch.ones(win.numel(), dtype=torch.long))[:n]
                once = uses == 1
                if kinked is not None:
                    once &= ~kinked.cpu()
                ok = ((win == -2) | ((win >= 0) & once[win.clamp_min(0)])).all(-1) & ((win >= 0).sum(-1) >= 2)
                windows = win[ok].clamp_min(-1)
            S._cache[key] = cls(windows, n)
        return S._cache[key].to(free.device)

    def to(self, device) -> "Ties":
        if self.windows.device == torch.device(device):
            return self
        return Ties(self.windows.to(device), self.n)

    @property
    def empty(self) -> bool:
        """Whether there is no window to hold a tie in."""
        return self.windows.shape[0] == 0

    def none(self, B: int) -> Tensor:
        """The tie state holding nothing, ``(B, W, K)``."""
        return torch.zeros(B, *self.windows.shape, dtype=torch.bool, device=self.windows.device)

    def gather(self, v: Tensor) -> Tensor:
        """``(B, W, K)``: the values of ``v`` (``(B, n)``) on the windows (padding reads ``-inf``)."""
        return _spare(v, -math.inf)[:, self.flat].view(v.shape[0], *self.windows.shape)

    def scatter(self, v: Tensor, w: Tensor, mask: Tensor) -> Tensor:
        """``v`` (``(B, n)``, in place) with the window values ``w`` (``(B, W, K)``) written where ``mask``."""
        full = _spare(v, 0)
        cur = full[:, self.flat].view_as(w)
        full[:, self.flat] = torch.where(mask, w, cur).reshape(v.shape[0], -1)
        v.copy_(full[:, :self.n])
        return v

    def coordinates(self, mask: Tensor) -> Tensor:
        """``(B, n)`` bool: the free coordinates marked in the window mask ``mask`` (``(B, W, K)``)."""
        out = mask.new_zeros(mask.shape[0], self.n + 1)
        out[:, self.flat] = mask.reshape(mask.shape[0], -1)
        return out[:, :self.n]

    def windows_of(self, mask: Tensor) -> Tensor:
        """``(B, W)`` bool: the windows holding a coordinate marked in ``mask`` (``(B, n)``)."""
        return _spare(mask, False)[:, self.flat].view(mask.shape[0], *self.windows.shape).any(-1)

    @staticmethod
    def active(tied: Tensor) -> Tensor:
        """The members of ties of at least two inputs."""
        return tied & (tied.sum(-1, keepdim=True) >= 2)

    def selection(self, xf: Tensor) -> Tensor:
        """``(B, W)``: the position in its window of the input each window selects at ``xf`` (torch's rule)."""
        return self.gather(xf).argmax(-1)  # argmax returns the first maximum

    def near(self, xf: Tensor, band: Tensor) -> Tensor:
        """``(B, W, K)``: the inputs within ``band`` (``(B, 1)``) of their window's maximum, in windows with two
        or more of them."""
        w = self.gather(xf)
        close = self.valid & (w.amax(-1, keepdim=True) - w <= band.unsqueeze(-1))
        return self.active(close)

    def project(self, v: Tensor, tied: Tensor) -> Tensor:
        """``v`` (``(B, n)``) projected onto the held ties ``x_i = x_j``: the mean over each tie, on every member
        (one value, so that the members stay exactly equal)."""
        if self.empty:
            return v
        act = self.active(tied)
        w = self.gather(v).masked_fill(~act, 0.0)
        mean = w.sum(-1, keepdim=True) / act.sum(-1, keepdim=True).clamp_min(1)
        return self.scatter(v.clone(), mean.expand_as(w), act)

    def snap(self, xf: Tensor, tied: Tensor) -> Tensor:
        """``xf`` (in place) with the members of each held tie set to the tie's largest value."""
        if self.empty:
            return xf
        act = self.active(tied)
        top = self.gather(xf).masked_fill(~act, -math.inf).amax(-1, keepdim=True)
        return self.scatter(xf, top.expand(*act.shape), act)

    def leaders(self, tied: Tensor) -> Tensor:
        """``(B, W, K)``: the first member of each tie (the input torch selects on it)."""
        act = self.active(tied)
        first = act.to(torch.uint8).argmax(-1, keepdim=True)
        return act & (torch.arange(act.shape[-1], device=act.device) == first)

    def violations(self, g_right: Tensor, g_left: Tensor, tied: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stationarity on the ties ``tied`` from the gradients at the tie (``g_right``) and with each leader just
        below it (``g_left``), both ``(B, n)`` (see the module notes).

        Returns ``(d, down, along)``: ``d`` (``(B, n)``) per member the derivative of moving it alone where that
        descends (``g0_j > 0``: down; else ``g0_j + c < 0``: up), 0 elsewhere; ``down`` where it is down;
        ``along`` (``(B, W)``) the derivative of moving each tie together."""
        act, lead = self.active(tied), self.leaders(tied)
        gr, gl = self.gather(g_right).masked_fill(~act, 0.0), self.gather(g_left).masked_fill(~act, 0.0)
        c = ((gr - gl) * lead).sum(-1, keepdim=True)  # the derivative in the window's output
        g0 = torch.where(lead, gl, gr)
        up, down = (g0 + c).clamp_max(0.0), g0.clamp_min(0.0)
        d = torch.where(down > 0, down, up).masked_fill(~act, 0.0)
        return self.coordinate_values(d), self.coordinates(act & (down > 0)), gr.sum(-1)

    def coordinate_values(self, w: Tensor) -> Tensor:
        """``(B, n)``: the window values ``w`` (``(B, W, K)``) on their coordinates, 0 elsewhere."""
        out = w.new_zeros(w.shape[0], self.n + 1)
        out[:, self.flat] = w.reshape(w.shape[0], -1)
        return out[:, :self.n]


def _spare(v: Tensor, value) -> Tensor:
    """``v`` (``(B, n)``) with a spare column of ``value``: where padding entries of the windows read and write."""
    return torch.cat([v, v.new_full((v.shape[0], 1), value)], 1)
