"""Sheaf neural networks: map parametrisations, a map learner and a sheaf diffusion layer (`torch.nn`).

Optional for users who only want the mathematics: nothing in `cellsheaf` imports
this module, and it uses the same operators as everything else
([`cellsheaf.operators`][cellsheaf.operators]), so a layer's Laplacian is the sheaf's Laplacian.

Map parametrisations turn a stack of unconstrained parameter vectors
``(..., num_parameters)`` into a stack of restriction maps:

- [`GeneralMaps`][cellsheaf.layers.GeneralMaps]: any ``d_e × d`` matrix;
- [`DiagonalMaps`][cellsheaf.layers.DiagonalMaps]: a diagonal ``d × d`` map, stored as its diagonal ``(..., d)``
  (a diagonal stack, applied elementwise);
- [`OrthogonalMaps`][cellsheaf.layers.OrthogonalMaps]: a ``d × d`` orthogonal matrix ([`cellsheaf.orthogonal`][cellsheaf.orthogonal]);
- [`ScaledOrthogonalMaps`][cellsheaf.layers.ScaledOrthogonalMaps]: ``c Q`` with ``Q`` orthogonal and ``c`` a real scalar.

[`MapLearner`][cellsheaf.layers.MapLearner] predicts the two maps of every edge from the features of its
endpoints (a small network on ``[x_u, x_v]`` and ``[x_v, x_u]``), and
[`SheafDiffusion`][cellsheaf.layers.SheafDiffusion] is one step of neural sheaf diffusion,
``X ← X − σ(Δ (I ⊗ W1) X W2)`` with ``Δ`` the augmented-normalised sheaf
Laplacian of the learned maps ([`cellsheaf.operators.apply_laplacian`][cellsheaf.operators.apply_laplacian]).

Examples
--------
>>> import torch
>>> from cellsheaf.layers import OrthogonalMaps
>>> P = OrthogonalMaps(3)
>>> Q = P(torch.randn(10, P.num_parameters, dtype=torch.float64))
>>> Q.shape, bool(torch.allclose(Q @ Q.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(10, 3, 3)))
(torch.Size([10, 3, 3]), True)
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import operators as _ops
from . import orthogonal as _orth
from .sheaf import Sheaf

__all__ = ["MapParametrisation", "GeneralMaps", "DiagonalMaps", "OrthogonalMaps", "ScaledOrthogonalMaps",
           "MAPS", "MapLearner", "SheafDiffusion"]


def _dim(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class MapParametrisation(nn.Module):
    """Base class: ``forward(params (..., num_parameters))`` returns maps ``(..., d_e, d)``,
    or their diagonals ``(..., d)`` when `diagonal` is true.

    Subclasses set `d`, `d_e` and `num_parameters` and implement `forward`.
    """

    d: int
    d_e: int
    num_parameters: int
    diagonal: bool = False
    orthogonal: bool = False

    def _check(self, params: Tensor) -> None:
        if not isinstance(params, Tensor) or params.dim() == 0 or params.shape[-1] != self.num_parameters:
            shape = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
            raise ValueError(f"{type(self).__name__} takes {self.num_parameters} parameters per map in the last "
                             f"axis, got {shape}")

    def extra_repr(self) -> str:
        return f"d={self.d}, d_e={self.d_e}, num_parameters={self.num_parameters}"


class GeneralMaps(MapParametrisation):
    """Any ``d_e × d`` matrix: the parameters are its entries in row order.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import GeneralMaps
    >>> GeneralMaps(2, d_e=1)(torch.tensor([[1.0, 2.0]]))
    tensor([[[1., 2.]]])
    """

    def __init__(self, d: int, d_e: int | None = None) -> None:
        super().__init__()
        self.d = _dim(d, "d")
        self.d_e = self.d if d_e is None else _dim(d_e, "d_e")
        self.num_parameters = self.d_e * self.d

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return params.unflatten(-1, (self.d_e, self.d))


class DiagonalMaps(MapParametrisation):
    """A diagonal ``d × d`` map, returned as its diagonal ``(..., d)`` (a diagonal stack).

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import DiagonalMaps
    >>> DiagonalMaps(3)(torch.ones(4, 3)).shape
    torch.Size([4, 3])
    """

    diagonal = True

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = self.d_e = _dim(d, "d")
        self.num_parameters = self.d

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return params


class OrthogonalMaps(MapParametrisation):
    """A ``d × d`` orthogonal matrix from ``d(d-1)/2`` parameters.

    ``method`` is ``"exp"`` (matrix exponential of a skew-symmetric matrix: all of
    ``SO(d)``), ``"cayley"`` (Cayley transform) or ``"householder"`` (``d``
    reflections, determinant ``(−1)^d``); ``d = 2, 3`` use closed forms
    ([`cellsheaf.orthogonal`][cellsheaf.orthogonal]). Zero parameters give the identity for ``"exp"`` and
    ``"cayley"``.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import OrthogonalMaps
    >>> OrthogonalMaps(2)(torch.zeros(1, 1))
    tensor([[[1., 0.],
             [0., 1.]]])
    """

    orthogonal = True

    def __init__(self, d: int, method: str = "exp") -> None:
        super().__init__()
        if method not in _orth.METHODS:
            raise ValueError(f"method must be one of {_orth.METHODS}, got {method!r}")
        self.d = self.d_e = _dim(d, "d")
        self.method = method
        self.num_parameters = _orth.n_skew(self.d)

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return _orth.orthogonal(params, self.d, self.method)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method!r}"


class ScaledOrthogonalMaps(OrthogonalMaps):
    """``c Q``: a real scale ``c`` (the first parameter) times an orthogonal ``Q`` (the other
    ``d(d-1)/2``, as in [`OrthogonalMaps`][cellsheaf.layers.OrthogonalMaps]).

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import ScaledOrthogonalMaps
    >>> ScaledOrthogonalMaps(2)(torch.tensor([[2.0, 0.0]]))
    tensor([[[2., 0.],
             [0., 2.]]])
    """

    orthogonal = False

    def __init__(self, d: int, method: str = "exp") -> None:
        super().__init__(d, method)
        self.num_parameters += 1

    def forward(self, params: Tensor) -> Tensor:
        self._check(params)
        return params[..., :1, None] * _orth.orthogonal(params[..., 1:], self.d, self.method)


MAPS = {"general": GeneralMaps, "diagonal": DiagonalMaps, "orthogonal": OrthogonalMaps,
        "scaled_orthogonal": ScaledOrthogonalMaps}
"""Names accepted wherever a layer takes ``maps=``: each builds its parametrisation from the stalk dim ``d``."""


def _parametrisation(maps, d: int) -> MapParametrisation:
    if isinstance(maps, MapParametrisation):
        if (maps.d, maps.d_e) != (d, d):
            raise ValueError(f"the map parametrisation makes {maps.d_e}x{maps.d} maps; this layer needs {d}x{d}")
        return maps
    if maps not in MAPS:
        raise ValueError(f"maps must be a MapParametrisation or one of {sorted(MAPS)}, got {maps!r}")
    return MAPS[maps](d)


def _check_edge_index(edge_index: Tensor) -> Tensor:
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2 \
            or edge_index.is_floating_point():
        shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"edge_index must be an integer tensor of shape (2, E), got {shape}")
    return edge_index


class MapLearner(nn.Module):
    """Predicts the restriction maps of every edge from the features of its two endpoints.

    For an edge ``e = u -> v``, ``F_{u◁e} = P(φ([x_u, x_v]))`` and
    ``F_{v◁e} = P(φ([x_v, x_u]))``: one network ``φ`` (a linear layer, or with
    ``hidden`` a two-layer perceptron with an ELU) followed by ``out_activation``
    (``tanh`` by default, as in neural sheaf diffusion; ``None`` for none) and the
    map parametrisation ``P``.

    Parameters
    ----------
    in_features : int
        Features per vertex (``d * channels`` for a sheaf diffusion layer).
    maps : MapParametrisation
        How parameters become maps ([`GeneralMaps`][cellsheaf.layers.GeneralMaps], [`DiagonalMaps`][cellsheaf.layers.DiagonalMaps], [`OrthogonalMaps`][cellsheaf.layers.OrthogonalMaps], ...).
    hidden : int, optional
        Width of a hidden layer; by default ``φ`` is one linear layer.
    out_activation : callable, optional
        Applied to the predicted parameters.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import MapLearner, OrthogonalMaps
    >>> learner = MapLearner(4, OrthogonalMaps(2))
    >>> Fu, Fv = learner(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]))
    >>> Fu.shape, Fv.shape
    (torch.Size([2, 2, 2]), torch.Size([2, 2, 2]))
    """

    def __init__(self, in_features: int, maps: MapParametrisation, hidden: int | None = None,
                 out_activation: Callable[[Tensor], Tensor] | None = torch.tanh) -> None:
        super().__init__()
        if not isinstance(maps, MapParametrisation):
            raise TypeError(f"maps must be a MapParametrisation (e.g. GeneralMaps(d)), got {type(maps).__name__}")
        self.in_features = _dim(in_features, "in_features")
        self.maps = maps
        width = maps.num_parameters if hidden is None else _dim(hidden, "hidden")
        # φ's first layer acts on [x_a, x_b] as x_a A + x_b B: applied per vertex, then gathered per edge
        self.first = nn.Linear(2 * self.in_features, width)
        self.rest = None if hidden is None else nn.Sequential(nn.ELU(), nn.Linear(width, maps.num_parameters))
        self.out_activation = out_activation

    def forward(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """Maps ``(Fu, Fv)`` of the edges ``edge_index (2, E)`` from vertex features ``x (N, in_features)``."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"MapLearner expects vertex features of shape (N, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        _check_edge_index(edge_index)
        W = self.first.weight
        own = x @ W[:, :self.in_features].T + self.first.bias  # (N, width): the term of the edge's own end
        other = x @ W[:, self.in_features:].T  # (N, width): the term of the far end
        u, v = edge_index[0], edge_index[1]
        h = torch.cat([own.index_select(0, u) + other.index_select(0, v),
                       own.index_select(0, v) + other.index_select(0, u)])
        if self.rest is not None:
            h = self.rest(h)
        if self.out_activation is not None:
            h = self.out_activation(h)
        M = self.maps(h)
        return M[:edge_index.shape[1]], M[edge_index.shape[1]:]


class SheafDiffusion(nn.Module):
    """One step of neural sheaf diffusion: ``X ← X − σ(Δ (I ⊗ W1) X W2)``.

    ``X`` holds ``channels`` 0-cochains of a sheaf with ``d``-dimensional stalks,
    as a tensor ``(N, d, channels)``; the maps of every edge are predicted from
    ``X`` by a [`MapLearner`][cellsheaf.layers.MapLearner], ``Δ`` is the augmented-normalised sheaf Laplacian
    ``(D + I)^{-1/2} L (D + I)^{-1/2}`` of those maps (or ``normalized=True`` /
    ``False``: ``D^{-1/2} L D^{-1/2}`` / ``L``), ``W1`` (``d × d``, acting on every
    stalk) and ``W2`` (``channels × channels``) are learned and start at the identity,
    and ``σ`` is ``activation`` (ELU by default). With orthogonal maps (and no
    self-loops) the degree blocks are ``deg(v)·I``, and the layer normalises by the
    scalar degrees.

    The graph is an ``edge_index (2, E)`` (the sheaf is built on the first call and
    its index plan reused while the same ``edge_index`` tensor comes back) or a
    [`cellsheaf.Sheaf`][cellsheaf.sheaf.Sheaf] with one stack of edges ([`cellsheaf.Sheaf.from_arrays`][cellsheaf.sheaf.Sheaf.from_arrays])
    whose maps the layer overwrites ([`cellsheaf.Sheaf.update_maps`][cellsheaf.sheaf.Sheaf.update_maps]). The sheaf of
    the last call is `sheaf`.

    Parameters
    ----------
    d : int
        Stalk dimension.
    channels : int
        Channels per stalk dimension.
    maps : str or MapParametrisation
        ``"general"``, ``"diagonal"``, ``"orthogonal"``, ``"scaled_orthogonal"`` ([`MAPS`][cellsheaf.layers.MAPS]) or a
        parametrisation making ``d × d`` maps.
    hidden : int, optional
        Hidden width of the map learner (one linear layer by default).
    normalized : False, True or "augmented"
        Which Laplacian diffuses.
    activation : callable
        ``σ``.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf.layers import SheafDiffusion
    >>> layer = SheafDiffusion(d=2, channels=4, maps="orthogonal")
    >>> x = torch.randn(5, 2, 4)
    >>> edge_index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    >>> layer(x, edge_index).shape
    torch.Size([5, 2, 4])
    >>> layer.sheaf
    Sheaf(5 vertices, 4 edges, C0=10, C1=8)
    """

    def __init__(self, d: int, channels: int, maps: str | MapParametrisation = "general", hidden: int | None = None,
                 normalized: bool | str = "augmented", activation: Callable[[Tensor], Tensor] = F.elu) -> None:
        super().__init__()
        self.d, self.channels = _dim(d, "d"), _dim(channels, "channels")
        _ops._check_normalized(normalized)
        self.normalized = normalized
        self.learner = MapLearner(self.d * self.channels, _parametrisation(maps, self.d), hidden)
        self.W1 = nn.Parameter(torch.eye(self.d))
        self.W2 = nn.Parameter(torch.eye(self.channels))
        self.activation = activation
        self.sheaf: Sheaf | None = None
        self._graph: tuple | None = None

    def forward(self, x: Tensor, graph: Tensor | Sheaf) -> Tensor:
        """The diffused features ``(N, d, channels)`` of ``x (N, d, channels)`` on ``graph``."""
        if x.dim() != 3 or x.shape[1:] != (self.d, self.channels):
            raise ValueError(f"SheafDiffusion expects features of shape (N, {self.d}, {self.channels}) "
                             f"(N vertices, d, channels), got {tuple(x.shape)}")
        N = x.shape[0]
        edge_index = self._edge_index(graph, N)
        Fu, Fv = self.learner(x.reshape(N, -1), edge_index)
        S = self._sheaf(graph, edge_index, N, Fu, Fv)
        y = torch.einsum("ij,njc->nic", self.W1, x) @ self.W2  # (I ⊗ W1) X W2
        root = self._scalar_degree_root(S, edge_index, N, y)
        if root is None:
            z = _ops.apply_laplacian(S, y.reshape(N * self.d, self.channels).T, normalized=self.normalized)
        else:
            z = _ops.apply_laplacian(S, (root * y).reshape(N * self.d, self.channels).T)
        z = z.T.reshape(N, self.d, self.channels)
        return x - self.activation(z if root is None else root * z)

    def _scalar_degree_root(self, S: Sheaf, edge_index: Tensor, N: int, like: Tensor) -> Tensor | None:
        """``(deg + 1)^{-1/2}`` (augmented) or ``deg^{+1/2}`` per vertex, ``(N, 1, 1)``, when the degree blocks
        are ``deg(v)·I``: orthogonal maps and no self-loops. None otherwise (the operators normalise)."""
        if not (self.learner.maps.orthogonal and self.normalized):
            return None
        u, v = edge_index[0], edge_index[1]
        if bool((u == v).any()):
            return None
        w = S.stacks[0].weights
        w = like.new_ones(u.shape[0]) if w is None else w.to(like.dtype)
        deg = like.new_zeros(N).index_add(0, u, w).index_add(0, v, w)
        if self.normalized == "augmented":
            return (deg + 1).rsqrt().view(N, 1, 1)
        return torch.where(deg > 0, deg.clamp(min=torch.finfo(like.dtype).tiny).rsqrt(), 0).view(N, 1, 1)

    @staticmethod
    def _edge_index(graph, N: int) -> Tensor:
        if isinstance(graph, Sheaf):
            stacks = graph.stacks
            if len(stacks) != 1 or len(graph) != N or len(graph.edges) != len(stacks[0]):
                raise ValueError(f"SheafDiffusion needs a sheaf on the {N} vertices of x with one stack of edges "
                                 "(cellsheaf.Sheaf.from_arrays), or an edge_index")
            return stacks[0].index
        return _check_edge_index(graph)

    def _sheaf(self, graph, edge_index: Tensor, N: int, Fu: Tensor, Fv: Tensor) -> Sheaf:
        if isinstance(graph, Sheaf):
            graph.update_maps(Fu, Fv)
            S = graph
        else:
            key = (weakref.ref(graph), graph._version, N, Fu.shape, Fu.dtype, Fu.device)
            if self.sheaf is not None and self._graph is not None and self._graph[0]() is graph \
                    and self._graph[1:] == key[1:]:
                S = self.sheaf
                S.update_maps(Fu, Fv)
            else:
                S = Sheaf.from_arrays([self.d] * N, edge_index, Fu, Fv)
                self._graph = key
        self.sheaf = S
        return S
