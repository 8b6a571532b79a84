"""Restriction maps: operators, not matrices.

Every map acts on the last axis of a batch ``(..., d_in) -> (..., d_out)``.
Linear maps expose [`apply`][cellsheaf.maps.Map.apply], [`adjoint`][cellsheaf.maps.Map.adjoint], [`coo`][cellsheaf.maps.Map.coo] (sparse assembly) and, on
request only, [`matrix`][cellsheaf.maps.Map.matrix]; nonlinear maps expose [`apply`][cellsheaf.maps.Map.apply], [`jvp`][cellsheaf.maps.Map.jvp] and [`vjp`][cellsheaf.maps.Map.vjp] (the
local adjoint, Sec. 4.2 of the paper). Structured maps (convolutions, pooling,
the extended affine map ``(A | diag b)``) never build a dense matrix on the way.

The modules are named after the mathematics: `core` (the interface, dense,
sparse and selection maps, block maps, elementwise ReLU-type maps),
`affine` (extended affine maps), `convolution` (convolution, average pooling,
per-token linear maps), `elementwise` (every torch activation), `piecewise`
(max pooling), `normalization` (LayerNorm, RMSNorm, GroupNorm, softmax along an
axis), `products` (maps of several inputs on a concatenated stalk: products,
matrix products, quotients, masked choice), `reduction` (sums and means over axes).

Examples
--------
>>> import torch, cellsheaf as cs
>>> conv = cs.maps.Conv1d(torch.ones(1, 1, 2), in_shape=(1, 3)).affine(torch.tensor([0.5]))
>>> conv.d_in, conv.d_out                 # stalk [x (3); ones (2)] -> R^2
(5, 2)
>>> conv.apply(torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0]))
tensor([3.5000, 5.5000])
"""

from .core import (Compose, Diagonal, Elementwise, Function, HStack, Identity, LeakyReLU, Linear, Map, ReLU, Structured,
                   Scaled, Select, Sigmoid, Softmax, Tanh, VStack, as_map)
from .affine import Affine
from .convolution import (AdaptiveAvgPool, AdaptiveAvgPool1d, AdaptiveAvgPool2d, AvgPool, AvgPool1d, AvgPool2d, Conv,
                          Conv1d, Conv2d, TokenLinear, permutation)
from .elementwise import ACTIVATIONS, Activation, activation
from .normalization import GroupNorm, LayerNorm, RMSNorm, ShapedMap, SoftmaxAlong
from .piecewise import MaxPool, MaxPool1d, MaxPool2d
from .products import MatMul, Product, Quotient, Where
from .reduction import Reduce

__all__ = [
    "Map", "Linear", "Identity", "Scaled", "Select", "Diagonal", "HStack", "VStack",
    "Compose", "Elementwise", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax",
    "Function", "as_map", "Structured", "Affine",
    "Conv", "Conv1d", "Conv2d", "AvgPool", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "TokenLinear", "permutation",
    "Activation", "ACTIVATIONS", "activation", "ShapedMap", "LayerNorm", "RMSNorm", "GroupNorm", "SoftmaxAlong",
    "MaxPool", "MaxPool1d", "MaxPool2d", "Product", "Quotient", "MatMul", "Where", "Reduce",
]
