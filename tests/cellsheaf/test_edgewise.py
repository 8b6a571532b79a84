"""The compiled edge-by-edge gradient (`cellsheaf.edgewise`) against autograd of the energy and Eq. (24)."""

import pytest
import torch

import cellsheaf as cs
import cellsheaf_nn as csnn
from cellsheaf.energy import edge_energies

F64 = torch.float64


def _mixed_sheaf(g: torch.Generator) -> cs.Sheaf:
    """Every kind of map the plan reads its own way, and a few it hands to the map itself."""
    S = cs.Sheaf()
    for v, d in (("a", 4), ("b", 3), ("c", 3), ("d", 2), ("e", 5)):
        S.add_vertex(v, d)
    W = cs.maps.Linear(torch.randn(3, 4, generator=g, dtype=F64), trainable=True,
                       mask=torch.tensor([[1.0, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=F64))
    S.add_edge("a", "b", W, torch.eye(3, dtype=F64), name="w")
    S.add_edge("b", "c", cs.maps.ReLU(3), cs.maps.Identity(3), name="relu", weight=0.7)
    S.add_edge("c", "d", cs.maps.Select([2, 0], 3), cs.maps.Select([0, 1], 2), name="sel")
    S.add_edge("c", "e", cs.maps.Tanh(3), cs.maps.Select([1, 2, 3], 5), name="tanh")
    S.add_edge("e", "b", torch.randn(3, 5, generator=g, dtype=F64).to_sparse(),
               cs.maps.Linear(torch.randn(3, 3, generator=g, dtype=F64), trainable=True), name="sparse")
    S.add_edge("d", "a", cs.maps.Diagonal(torch.tensor([2.0, -1.0], dtype=F64)), cs.maps.Select([1, 3], 4),
               name="huber", potential=cs.potentials.Huber(0.3))
    S.add_edge("b", "d", cs.maps.Sigmoid(3), torch.randn(3, 2, generator=g, dtype=F64), name="sig", weight=1.5)
    return S


def _autograd(S, x):
    """``∇_x E`` and ``∂E/∂W`` of every trainable map by autograd of the total energy."""
    maps = cs.learning.trainable_maps(S)
    xr = x.clone().requires_grad_(True)
    for F in maps.values():
        F.weight.requires_grad_(True)
    try:
        E = edge_energies(S, xr).sum()
        grads = torch.autograd.grad(E, [xr, *[F.weight for F in maps.values()]])
    finally:
        for F in maps.values():
            F.weight.requires_grad_(False)
    return grads[0], {k: G * (1 if F.mask is None else F.mask) for (k, F), G in zip(maps.items(), grads[1:])}


def test_plan_equals_autograd_of_the_energy_on_every_map_kind():
    g = torch.Generator().manual_seed(0)
    S = _mixed_sheaf(g)
    x = torch.randn(6, S.C0, generator=g, dtype=F64)
    maps = cs.learning.trainable_maps(S)
    grad, G = cs.edgewise.plan(S).run(x, maps)
    want, want_G = _autograd(S, x)
    torch.testing.assert_close(grad, want)
    assert set(G) == set(maps)
    for k in maps:
        torch.testing.assert_close(G[k], want_G[k])


def test_skipped_vertices_get_nothing_and_the_rest_is_unchanged():
    g = torch.Generator().manual_seed(1)
    S = _mixed_sheaf(g)
    x = torch.randn(3, S.C0, generator=g, dtype=F64)
    full, _ = cs.edgewise.plan(S).run(x)
    part, _ = cs.edgewise.plan(S, skip={"a", "d"}).run(x)
    for v in S.vertices:
        sl = S.vertex_slice(v)
        torch.testing.assert_close(part[:, sl], torch.zeros_like(part[:, sl]) if v in ("a", "d") else full[:, sl],
                                   rtol=0, atol=0)


def test_unbatched_state_and_stalks_from_another_state():
    g = torch.Generator().manual_seed(2)
    S = _mixed_sheaf(g)
    x, at = torch.randn(S.C0, generator=g, dtype=F64), torch.randn(S.C0, generator=g, dtype=F64)
    grad, G = cs.edgewise.plan(S).run(x, [("w", "u")], at=at)
    assert grad.shape == (S.C0,)
    torch.testing.assert_close(grad, _autograd(S, x)[0])
    want = cs.learning.edge_gradients(S, x.unsqueeze(0), [("w", "u")], at=at.unsqueeze(0))[("w", "u")]
    torch.testing.assert_close(G[("w", "u")], want)


def test_plan_follows_the_maps():
    """In-place changes and a new tensor on the same map are read at the next call; a replaced map
    (a new edge record) rebuilds the plan."""
    g = torch.Generator().manual_seed(3)
    S = _mixed_sheaf(g)
    x = torch.randn(4, S.C0, generator=g, dtype=F64)
    p = cs.edgewise.plan(S)
    W = S.edge("w").Fu
    W.weight.mul_(3.0)
    torch.testing.assert_close(p.run(x)[0], _autograd(S, x)[0])
    W.weight = torch.randn(3, 4, generator=g, dtype=F64)
    torch.testing.assert_close(p.run(x)[0], _autograd(S, x)[0])
    assert cs.edgewise.plan(S) is p
    S.set_maps("relu", Fu=cs.maps.Tanh(3))
    q = cs.edgewise.plan(S)
    assert q is not p
    torch.testing.assert_close(q.run(x)[0], _autograd(S, x)[0])


@pytest.mark.parametrize("model, shape", [
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                                 torch.nn.Flatten(), torch.nn.Linear(8, 3)), (1, 4, 4)),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.GELU(), torch.nn.Linear(4, 2)),
     (3,)),
])
def test_structured_and_nonlinear_maps_of_compiled_networks(model, shape):
    """Convolutions, pooling, norms and smooth activations take the maps' own apply/vjp: still ∇E."""
    torch.manual_seed(0)
    ns = csnn.compile(model().double().eval(), input_shape=shape)
    S = ns.sheaf
    x = torch.randn(3, S.C0, dtype=F64, generator=torch.Generator().manual_seed(4))
    grad, _ = cs.edgewise.plan(S).run(x)
    xr = x.clone().requires_grad_(True)
    want, = torch.autograd.grad(edge_energies(S, xr).sum(), xr)
    torch.testing.assert_close(grad, want)


def _autograd_params(S, x, params: dict):
    """``∇_x E`` and ``∂E/∂θ`` of the tensors ``params`` held by the maps, by autograd of the total energy."""
    xr = x.clone().requires_grad_(True)
    for t in params.values():
        t.requires_grad_(True)
    try:
        grads = torch.autograd.grad(edge_energies(S, xr).sum(), [xr, *params.values()])
    finally:
        for t in params.values():
            t.requires_grad_(False)
    return grads[0], dict(zip(params, grads[1:]))


def test_plan_gives_the_local_rule_of_held_tensors():
    """The tensors a compiled network's maps hold (affine weight edges, the force on their u end being
    minus the discrepancy) and a map without a closed form (autograd fallback) get ∂E/∂θ from the plan's
    own forces."""
    from cellsheaf.learning import _Gradients
    ns = csnn.compile(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.LayerNorm(4), torch.nn.ReLU(),
                                          torch.nn.Linear(4, 1)).double())
    S, params = ns.sheaf, ns.parameters
    x = torch.randn(5, S.C0, dtype=F64, generator=torch.Generator().manual_seed(6))
    acc = _Gradients(list(params.values()))
    grad, _ = cs.edgewise.plan(S).run(x, tensors=acc)
    want_g, want = _autograd_params(S, x, params)
    torch.testing.assert_close(grad, want_g)
    for k, G in zip(params, acc.result()):
        torch.testing.assert_close(G, want[k])


def test_joint_step_and_diffusion_step_use_the_plan():
    """The trainer's joint step (the network's own weights and biases, held by its affine maps) equals
    Eq. (26) with the gradients by autograd, and a diffusion step of a compiled network equals the Euler
    step of the stacked gradient."""
    from cellsheaf.energy import gradient
    ns = csnn.compile(csnn.mlp([2, 5, 3, 1], seed=0))
    S, params = ns.sheaf, ns.parameters
    assert params
    g = torch.Generator().manual_seed(5)
    bnd = ns.boundary(torch.randn(4, 2, dtype=F64, generator=g))
    rb = bnd.resolve(S, dtype=F64)
    free = rb.free
    x = rb.fill(torch.randn(4, S.C0, dtype=F64, generator=g))
    want_g, want_G = _autograd_params(S, x, params)
    before = {k: t.clone() for k, t in params.items()}
    x_new = cs.learning.joint_step(S, x, free, alpha=1.0, beta=0.5, dt=0.1, params=params)
    moves = torch.zeros(S.C0, dtype=torch.bool)
    moves[free] = True
    torch.testing.assert_close(x_new, torch.where(moves, x - 0.1 * want_g, x))
    for k, t in params.items():
        torch.testing.assert_close(t, before[k] - 0.05 * want_G[k])
    res = cs.diffuse(S, x_new, boundary=bnd, method="euler", dt=0.01, max_steps=1, tol=0.0)
    torch.testing.assert_close(res.x.flat, x_new - 0.01 * gradient(S, x_new) * moves)
