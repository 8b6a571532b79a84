"""cellsheaf_nn: compile neural networks into cellular sheaves and run them as sheaves.

``csnn.compile(model)`` turns a torch model into a [`NeuralSheaf`][cellsheaf_nn.neural.NeuralSheaf] (Sec. 3 of
Bosca & Ghrist): one vertex per quantity of the forward pass, one edge per
computational step, the input and the bias "ones" blocks as boundary data. Every
solve (inference, diffusion, pinned inference) goes through `cellsheaf`.

Examples
--------
>>> import torch, cellsheaf_nn as csnn
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
>>> ns = csnn.compile(model)
>>> ns.sheaf.vertices
['x', 'z1', 'a1', 'z2']
>>> x = torch.randn(3, 2, dtype=torch.float64)
>>> torch.allclose(ns.infer(x), model(x))
True
"""

from .builder import Builder, EdgeInfo, Value, VertexInfo
from .compile import CompileError, compile
from .neural import ConvergenceError, NeuralSheaf, NeuralState, Pin
from .ops import UnsupportedOpError, register, supported_ops
from . import datasets, distributed, losses
from . import diagnostics
from .train import DivergenceError, History, SheafTrainer, he_init, make_optimizer, mlp, output_activation, train_sgd

__all__ = [
    "compile", "CompileError", "NeuralSheaf", "NeuralState", "Pin", "ConvergenceError",
    "register", "supported_ops", "UnsupportedOpError", "Builder", "Value", "VertexInfo", "EdgeInfo",
    "datasets", "distributed", "losses", "DivergenceError", "History", "SheafTrainer", "he_init", "make_optimizer", "mlp",
    "output_activation", "train_sgd", "diagnostics",
]
