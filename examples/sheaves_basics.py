"""Cellular sheaves in five steps: the constant sheaf, holonomy, harmonic extension, diffusion, cohomology.

Run it with ``python examples/sheaves_basics.py``. The tutorial
``docs/tutorial-sheaves.md`` shows every line of it, section by section.
"""

# --8<-- [start:setup]
import math

import torch

import cellsheaf as cs

torch.set_default_dtype(torch.float64)
# --8<-- [end:setup]

# --8<-- [start:constant]
# The constant sheaf R^1 on a triangle: every stalk is R, every map the identity.
S = cs.Sheaf()
for v in ("a", "b", "c"):
    S.add_vertex(v, 1)
I = torch.eye(1)
S.add_edge("a", "b", I, I)
S.add_edge("b", "c", I, I)
S.add_edge("c", "a", I, I)
H = S.cohomology()
print(f"constant sheaf on a triangle: h0={H.h0} (constants), h1={H.h1} (the loop)")
print("global section:", S.global_sections().flatten())
# --8<-- [end:constant]

# --8<-- [start:holonomy]
# Stalks R^2 on a cycle; going once around rotates by theta. Unless the rotation
# is trivial, no nonzero assignment agrees on every edge: h0 = 0.
def twisted_cycle(n: int, theta: float) -> cs.Sheaf:
    T = cs.Sheaf()
    for i in range(n):
        T.add_vertex(i, 2)
    c, s = math.cos(theta), math.sin(theta)
    R = torch.tensor([[c, -s], [s, c]])
    for i in range(n):
        T.add_edge(i, (i + 1) % n, R if i == n - 1 else torch.eye(2), torch.eye(2))
    return T

for theta in (0.0, math.pi / 3):
    print(f"cycle with holonomy {theta:.3f}: h0={twisted_cycle(5, theta).cohomology().h0}")
# --8<-- [end:holonomy]

# --8<-- [start:harmonic]
# Harmonic extension on a path: fix both ends, the interior interpolates linearly.
n = 11
P = cs.Sheaf()
for i in range(n):
    P.add_vertex(i, 1)
for i in range(n - 1):
    P.add_edge(i, i + 1, I, I)
b = cs.Boundary().fix(0, torch.tensor([0.0])).fix(n - 1, torch.tensor([1.0]))
x = cs.harmonic_extension(P, b)
print("harmonic extension on a path:", x.flat)
# batched boundary values (B, k) solve B problems with one factorisation
xb = cs.harmonic_extension(P, cs.Boundary().fix(0, torch.tensor([[0.0], [2.0]])).fix(n - 1, torch.tensor([1.0])))
print("two boundary values at once:", xb[n // 2].flatten())
# --8<-- [end:harmonic]

# --8<-- [start:diffusion]
# The heat equation dx/dt = -L x converges to the projection onto H^0:
# on the constant triangle, to the average of the initial values.
x0 = torch.tensor([3.0, 0.0, 0.0])
res = cs.diffuse(S, x0, method="rk4", tol=1e-10)
print(f"diffusion: converged={res.converged} after {res.steps} steps -> {res.x.flat}")
# With boundary data it converges to the harmonic extension instead.
res = cs.diffuse(P, torch.zeros(n), boundary=b, method="euler", tol=1e-9)
print("diffusion with boundary reaches the harmonic extension:",
      bool(torch.allclose(res.x.flat, x.flat, atol=1e-7)))
# --8<-- [end:diffusion]

# --8<-- [start:cohomology]
# H^1 counts independent obstructions: a 1-cochain not of the form δx.
G = cs.Sheaf()
for v in range(4):
    G.add_vertex(v, 1)
for u, v in ((0, 1), (1, 2), (2, 0), (2, 3), (3, 0)):
    G.add_edge(u, v, I, I)
H = G.cohomology()
print(f"two loops: h0={H.h0}, h1={H.h1}; Euler characteristic {H.h0 - H.h1} = |V| - |E| = {4 - 5}")
# --8<-- [end:cohomology]
