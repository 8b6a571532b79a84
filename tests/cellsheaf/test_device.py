"""The core on every device the suite has: each result equals the CPU result (the `device` fixture)."""

from __future__ import annotations

import torch

import cellsheaf as cs
from tests.conftest import build_random_sheaf


def _pair(device):
    cpu = build_random_sheaf(3, n_vertices=8, n_edges=14, maps="mixed", connected=True, weights=True)
    moved = build_random_sheaf(3, n_vertices=8, n_edges=14, maps="mixed", connected=True, weights=True).to(device)
    return cpu, moved


def test_operators_follow_the_sheaf(device):
    cpu, S = _pair(device)
    assert S.device.type == device.type
    x = torch.randn(4, cpu.C0, dtype=torch.float64)
    for op in (cs.operators.apply_laplacian, cs.operators.apply_coboundary):
        y = op(S, x.to(device))
        assert y.device.type == device.type
        torch.testing.assert_close(y.cpu(), op(cpu, x), rtol=1e-12, atol=1e-12)


def test_stacked_sheaf_on_a_device(device):
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    Fu, Fv = torch.randn(4, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    cpu = cs.Sheaf.from_arrays([2] * 4, index, Fu, Fv)
    S = cs.Sheaf.from_arrays([2] * 4, index.to(device), Fu.to(device), Fv.to(device))
    x = torch.randn(3, cpu.C0, generator=g, dtype=torch.float64)
    for norm in (False, True, "augmented"):
        y = cs.operators.apply_laplacian(S, x.to(device), normalized=norm)
        torch.testing.assert_close(y.cpu(), cs.operators.apply_laplacian(cpu, x, normalized=norm))


def test_harmonic_extension_and_diffusion_on_a_device(device):
    cpu, S = _pair(device)
    v = cpu.vertices[0]
    values = torch.randn(2, cpu.dim(v), dtype=torch.float64)
    ref = cs.harmonic_extension(cpu, cs.Boundary().fix(v, values)).flat
    sol = cs.harmonic_extension(S, cs.Boundary().fix(v, values.to(device)), method="cg")
    assert sol.flat.device.type == device.type
    torch.testing.assert_close(sol.flat.cpu(), ref, rtol=1e-8, atol=1e-8)
    x0 = torch.randn(2, cpu.C0, dtype=torch.float64)
    res = cs.diffuse(S, x0.to(device), boundary=cs.Boundary().fix(v, values.to(device)), method="euler", tol=1e-9,
                     max_steps=200_000)
    assert res.converged and res.x.flat.device.type == device.type
    torch.testing.assert_close(res.x.flat.cpu(), ref, rtol=1e-6, atol=1e-6)
