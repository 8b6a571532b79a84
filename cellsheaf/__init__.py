"""cellsheaf: cellular sheaves on graphs — build them, compute with them, solve on them.

Examples
--------
>>> import torch, cellsheaf as cs
>>> S = cs.Sheaf()
>>> S.add_vertex("u", 1); S.add_vertex("v", 1)
>>> _ = S.add_edge("u", "v", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))
>>> S.laplacian().to_dense()
tensor([[ 1., -1.],
        [-1.,  1.]], dtype=torch.float64)
"""

from . import maps, operators, potentials
from ._version import __version__
from .boundary import Boundary, ResolvedBoundary
from .cochain import Cochain
from .connection import connection_sheaf
from .cohomology import Cohomology, RelativeCohomology, cohomology, global_sections, relative_cohomology
from .diffusion import diffuse, stable_step
from .energy import discord, energy
from .harmonic import NonUniqueError, harmonic_extension
from . import edgewise, gauss_newton, learning, nudge, propagation, ties
from .minimize import minimize
from .penalty import Penalties, Penalty, reluctance, soft_pin
from .propagation import NotDeterminedError
from .results import Result, SolveInfo
from .sheaf import Edge, Sheaf, constant_sheaf
from .stacked import EdgeStack
from .spec import SheafSpec, SpecError
from .union import disjoint_union, pool
from .topology import (HodgeDecomposition, PairCohomology, SheafMorphism, edge_laplacian, hodge_decomposition,
                       pair_cohomology, pushforward)
from .spectral import Eigenpairs, block_energy, eigenpairs, fiedler_vector, lambda_max, spectral_gap

__all__ = [
    "__version__", "maps", "operators", "potentials", "Boundary", "ResolvedBoundary", "Cochain", "Edge", "Sheaf", "EdgeStack",
    "constant_sheaf",
    "diffuse", "stable_step",
    "minimize", "soft_pin", "reluctance", "Penalty", "Penalties", "NotDeterminedError",
    "edgewise", "gauss_newton", "learning", "nudge", "propagation", "ties",
    "Cohomology", "RelativeCohomology", "cohomology", "global_sections", "relative_cohomology",
    "edge_laplacian", "HodgeDecomposition", "hodge_decomposition", "PairCohomology", "pair_cohomology", "SheafMorphism",
    "pushforward",
    "Eigenpairs", "eigenpairs", "spectral_gap", "fiedler_vector", "lambda_max", "block_energy",
    "SheafSpec", "SpecError", "connection_sheaf", "disjoint_union", "pool",
    "discord", "energy", "harmonic_extension", "NonUniqueError", "Result", "SolveInfo",
]


def __getattr__(name: str):
    # cellsheaf.layers (torch.nn modules for sheaf neural networks) is imported on first use
    if name == "layers":
        import importlib

        return importlib.import_module(".layers", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

