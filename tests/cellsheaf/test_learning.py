"""Learning restriction maps: local gradients (Eqs. 24-25), joint dynamics (Eqs. 26, 42), torch optimizers."""

from __future__ import annotations

import pytest
import torch

import cellsheaf as cs
from cellsheaf import learning as L
from cellsheaf import maps as M
from cellsheaf import potentials as P
from tests.conftest import random_point
from tests.neural_shapes import NeuralShape

F64 = torch.float64


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _trainable_sheaf(seed: int = 0) -> cs.Sheaf:
    """Trainable maps on both sides, several potentials (one two-argument), nonlinear neighbours."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    S = cs.Sheaf()
    for v, d in (("a", 3), ("b", 2), ("c", 2), ("d", 2)):
        S.add_vertex(v, d)
    S.add_edge("a", "b", M.Linear(rnd(2, 3), trainable=True), M.Linear(rnd(2, 2), trainable=True), name="ab",
               potential=P.Huber(0.5), weight=2.0)
    S.add_edge("b", "c", M.Tanh(2), M.Linear(rnd(2, 2), trainable=True, mask=_t([[1, 0], [1, 1]])), name="bc")
    S.add_edge("c", "d", M.Linear(rnd(2, 2), trainable=True), M.Identity(2), name="cd",
               potential=P.CrossEntropy("softmax"))
    S.add_edge("a", "d", M.Linear(rnd(2, 3)), M.Identity(2), name="fixed")
    return S


def test_map_gradients_equal_autograd_and_respect_masks():
    S = _trainable_sheaf()
    x = random_point(S, 3, batch=5)
    maps = L.trainable_maps(S)
    assert list(maps) == [("ab", "u"), ("ab", "v"), ("bc", "v"), ("cd", "u")]
    for F in maps.values():
        F.weight.requires_grad_(True)
    cs.energy(S, x).sum().backward()
    grads = L.map_gradients(S, x)
    for k, F in maps.items():
        expected = F.weight.grad if F.mask is None else F.weight.grad * F.mask
        torch.testing.assert_close(grads[k], expected)
        F.weight.requires_grad_(False)
    assert grads[("bc", "v")][0, 1] == 0  # Π_W


def test_equation_24_and_25_on_a_weight_edge():
    """dW̄ = −β (W̄ ā − z) āᵀ, and with the mask [1 | I] the bias block keeps its diagonal (Eq. 25)."""
    net = NeuralShape([3, 4, 2], seed=1)
    S = net.S
    W = L.set_trainable(S, "w1", "u", mask=torch.cat([torch.ones(4, 3, dtype=F64), torch.eye(4, dtype=F64)], 1))
    x = net.boundary(net.random_input(6)).resolve(S).fill(random_point(S, 2, batch=6))
    abar, z = x[:, S.vertex_slice("x")], x[:, S.vertex_slice("z1")]
    r = abar @ W.weight.T - z  # W̄ ā − z
    G = L.map_gradients(S, x)[("w1", "u")]
    torch.testing.assert_close(G[:, :3], r.T @ abar[:, :3])
    torch.testing.assert_close(torch.diagonal(G[:, 3:]), r.sum(0))
    assert bool((G[:, 3:] - torch.diag(torch.diagonal(G[:, 3:])) == 0).all())


def test_map_updates_are_local():
    """A map's gradient reads only its own edge's discrepancy and its own vertex (Eq. 24)."""
    S = _trainable_sheaf(1)
    x = random_point(S, 4, batch=3)
    y = x.clone()
    y[:, S.vertex_slice("d")] += 1.0  # d is not an end of ab or bc
    gx, gy = L.map_gradients(S, x), L.map_gradients(S, y)
    for k in (("ab", "u"), ("ab", "v"), ("bc", "v")):
        torch.testing.assert_close(gx[k], gy[k])
    assert not torch.allclose(gx[("cd", "u")], gy[("cd", "u")])


def test_joint_flow_decreases_the_energy_monotonically_for_small_beta():
    net = NeuralShape([2, 4, 1], seed=3)
    S = net.S
    for name in ("w1", "w2"):
        L.set_trainable(S, name, "u")
    X = net.random_input(8)
    Y = torch.sin(X.sum(-1, keepdim=True))
    b = net.boundary(X).fix("y", Y)
    x0 = b.resolve(S).fill(0.3 * random_point(S, 5, batch=8))
    res = L.joint_flow(S, x0, b, steps=300, alpha=1.0, beta=1.0 / 8, dt=0.05)
    E = res.extra["energy"]
    assert len(E) == 301 and bool((E[1:] <= E[:-1] + 1e-12).all())
    assert float(E[-1]) < 0.5 * float(E[0])
    assert res.converged and res.iterations == 300 and res.residual > 0
    torch.testing.assert_close(res.x.flat[:, b.resolve(S).fixed], b.resolve(S).values)  # P_Ω


def test_learning_to_lie_reaches_a_global_section():
    """Two stubborn opinions that disagree: the maps learn to express them consistently."""
    S = cs.Sheaf(); S.add_vertex("u", 2); S.add_vertex("v", 2)
    S.add_edge("u", "v", M.Linear(torch.eye(2, dtype=F64), trainable=True),
               M.Linear(torch.eye(2, dtype=F64), trainable=True), name="e")
    b = cs.Boundary().fix("u", _t([1.0, 2.0])).fix("v", _t([-3.0, 0.5]))
    x0 = b.resolve(S).fill(torch.zeros(4, dtype=F64))
    assert float(cs.energy(S, x0)) > 1
    res = L.joint_flow(S, x0, b, steps=2000, dt=0.05, tol=1e-20)
    assert float(res.energy) < 1e-16
    e = S.edge("e")
    torch.testing.assert_close(e.Fv.apply(_t([-3.0, 0.5])), e.Fu.apply(_t([1.0, 2.0])))  # a global section


def test_regularised_dynamics_equation_42():
    """λ(ω − ω₀) is the same as reluctance edges; μ(F − F₀) pulls the maps toward the anchors."""
    net = NeuralShape([2, 3, 1], seed=4)
    S = net.S
    L.set_trainable(S, "w2", "u")
    X = net.random_input(4)
    b = net.boundary(X).fix("y", _t([[0.5]]).expand(4, 1))
    x = b.resolve(S).fill(random_point(S, 1, batch=4))
    omega0 = random_point(S, 9, batch=4)
    F0 = L.snapshot(S)
    F0[("w2", "u")] = F0[("w2", "u")] + 0.25
    free_vertices = ["z1", "a1", "z2"]
    T = S.copy()
    reg = cs.reluctance(T, free_vertices, reference=cs.Cochain(S, omega0), strength=0.3)
    bT = reg.boundary(b.copy())
    xT = bT.resolve(T).fill(torch.cat([x, torch.zeros(4, T.C0 - S.C0, dtype=F64)], 1))
    before = S.edge("w2").Fu.weight.clone()
    grad = L.map_gradients(S, x)[("w2", "u")]
    free = b.resolve(S).free
    keep = torch.isin(free, cs.operators.vertex_coordinates(S, free_vertices))
    new_T = L.joint_step(T, xT, bT, dt=0.1, beta=0.0)  # first: the two sheaves share their map objects
    new_S = L.joint_step(S, x, free[keep], dt=0.1, beta=0.5, lam=0.3, x_anchor=omega0, mu=2.0, map_anchors=F0)
    torch.testing.assert_close(new_S, new_T[:, : S.C0])
    expected = before - 0.1 * 0.5 * (grad + 2.0 * (before - F0[("w2", "u")]))
    torch.testing.assert_close(S.edge("w2").Fu.weight, expected)


def test_map_anchors_by_edge_name_and_ambiguity():
    S = _trainable_sheaf()
    x = random_point(S, 0, batch=2)
    by_name = L.map_gradients(S, x, mu=1.0, anchors={"bc": torch.zeros(2, 2, dtype=F64)})
    by_key = L.map_gradients(S, x, mu=1.0, anchors={("bc", "v"): torch.zeros(2, 2, dtype=F64)})
    torch.testing.assert_close(by_name[("bc", "v")], by_key[("bc", "v")])
    with pytest.raises(KeyError, match="both sides"):
        L.map_gradients(S, x, mu=1.0, anchors={"ab": torch.zeros(2, 3, dtype=F64)})
    with pytest.raises(KeyError, match="no trainable map"):
        L.map_gradients(S, x, mu=1.0, anchors={"fixed": torch.zeros(2, 3, dtype=F64)})


def test_torch_optimizer_drives_the_maps():
    """Alternate relaxation (cs.minimize) and Adam steps on the local gradients; masks hold under weight decay."""
    net = NeuralShape([2, 5, 1], seed=6)
    S = net.S
    mask = torch.cat([torch.ones(5, 2, dtype=F64), torch.eye(5, dtype=F64)], 1)
    W1 = L.set_trainable(S, "w1", "u", mask=mask)
    L.set_trainable(S, "w2", "u")
    X = net.random_input(16)
    b = net.boundary(X).fix("y", torch.cos(X[:, :1]))
    off_diagonal = W1.weight[:, 2:][mask[:, 2:] == 0].clone()
    opt = torch.optim.AdamW(L.parameters(S), lr=0.05, weight_decay=0.1)
    energies = []
    x = None
    for _ in range(8):
        res = cs.minimize(S, b, x0=x)
        assert res.converged
        x = res.x.flat
        energies.append(float(res.energy.sum()))
        L.optimizer_step(S, x, opt)
    assert energies[-1] < 0.6 * energies[0]
    torch.testing.assert_close(W1.weight[:, 2:][mask[:, 2:] == 0], off_diagonal)


def test_assign_gradients_fills_dot_grad():
    S = _trainable_sheaf()
    x = random_point(S, 2, batch=3)
    grads = L.assign_gradients(S, x)
    for k, F in L.trainable_maps(S).items():
        torch.testing.assert_close(F.weight.grad, grads[k])


def test_set_trainable_errors_and_cache_invalidation():
    S = cs.Sheaf(); S.add_vertex("a", 2); S.add_vertex("b", 2)
    S.add_edge("a", "b", M.ReLU(2), M.Identity(2), name="act")
    S.add_edge("a", "b", torch.eye(2, dtype=F64).to_sparse(), torch.eye(2, dtype=F64), name="sparse")
    with pytest.raises(TypeError, match="edge 'act'.*ReLU.*not a dense tensor map"):
        L.set_trainable(S, "act", "u")
    with pytest.raises(TypeError, match="Identity"):
        L.set_trainable(S, "act", "v")
    with pytest.raises(TypeError, match="sparse"):
        L.set_trainable(S, "sparse", "u")
    with pytest.raises(ValueError, match="side"):
        L.set_trainable(S, "sparse", "w")
    with pytest.raises(TypeError):
        M.Linear(torch.eye(2).to_sparse(), trainable=True)
    T = cs.Sheaf(); T.add_vertex("a", 1); T.add_vertex("b", 1)
    T.add_edge("a", "b", M.Linear(_t([[1.0]]), trainable=True), _t([[1.0]]), name="e")
    x = _t([1.0, 3.0])
    assert float(cs.energy(T, x)) == 2.0  # operators cached with the old map
    L.joint_step(T, x, cs.Boundary().fix("a", [1.0]).fix("b", [3.0]), dt=0.5, beta=1.0)
    assert float(cs.energy(T, x)) == pytest.approx(0.5 * (3.0 - 2.0) ** 2)  # F_u: 1 − 0.5·(−2·1) = 2


def test_bad_joint_step_arguments():
    S = _trainable_sheaf()
    x = random_point(S, 0)
    with pytest.raises(ValueError, match="dt"):
        L.joint_step(S, x, dt=-1.0)
    with pytest.raises(ValueError, match="beta"):
        L.joint_step(S, x, beta=float("inf"))


def test_edgewise_joint_gradients_equal_the_stacked_ones():
    """The edge-by-edge joint gradients (few large edges) equal forces/pullback/Eq. 24 on the stacked operators."""
    from cellsheaf.energy import forces
    from cellsheaf.operators import pullback
    g = torch.Generator().manual_seed(0)
    S = cs.Sheaf()
    for v, d in (("a", 3), ("b", 2), ("c", 2)):
        S.add_vertex(v, d)
    W = cs.maps.Linear(torch.randn(2, 3, generator=g, dtype=torch.float64), trainable=True,
                       mask=torch.tensor([[1.0, 0, 1], [1, 1, 0]], dtype=torch.float64))
    S.add_edge("a", "b", W, torch.eye(2, dtype=torch.float64), name="w")
    S.add_edge("b", "c", cs.maps.Tanh(2), torch.eye(2, dtype=torch.float64), name="act", weight=0.7)
    S.add_edge("c", "c", torch.eye(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64), name="loop")
    S.add_edge("b", "c", torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), name="h",
               potential=cs.potentials.Huber(0.2))
    x = torch.randn(5, S.C0, generator=g, dtype=torch.float64)
    maps = cs.learning.trainable_maps(S)
    g1, G1 = cs.learning._edgewise(S, x, maps)
    gv, gu = forces(S, x)
    torch.testing.assert_close(g1, pullback(S, gv, gu, at=x))
    G2 = cs.learning._local_gradients(S, x, gv, gu, maps)
    for k in maps:
        torch.testing.assert_close(G1[k], G2[k])
