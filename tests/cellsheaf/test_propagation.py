"""Compiled propagation plans: the same cochain as forward substitution and as the closed form."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellsheaf as cs
from cellsheaf.boundary import ResolvedBoundary
from cellsheaf.propagation import plan, propagate, schedule

F64 = torch.float64


def mlp_sheaf(widths, seed=0, trainable=False, ones=1.0):
    """A compiled-network-shaped sheaf of a ReLU MLP with ones blocks at value ``ones``."""
    g = torch.Generator().manual_seed(seed)
    S, layers = cs.Sheaf(), []
    S.add_vertex("x", widths[0] + widths[1])
    for k, (n, m) in enumerate(zip(widths[:-1], widths[1:])):
        src = "x" if k == 0 else f"a{k}"
        A, b = torch.randn(m, n, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64)
        mask = torch.cat([torch.ones(m, n, dtype=F64), torch.eye(m, dtype=F64)], 1) if trainable else None
        S.add_vertex(f"z{k + 1}", m)
        S.add_edge(src, f"z{k + 1}", cs.maps.Linear(torch.cat([A, torch.diag(b)], 1), trainable=trainable, mask=mask),
                   cs.maps.Identity(m), name=f"weight:z{k + 1}")
        layers.append((A, b))
        if k < len(widths) - 2:
            nxt = widths[k + 2]
            S.add_vertex(f"a{k + 1}", m + nxt)
            S.add_edge(f"z{k + 1}", f"a{k + 1}", cs.maps.ReLU(m), cs.maps.Select(range(m), m + nxt),
                       name=f"act:a{k + 1}")
    fixed, const = [], []
    for v in S.vertices:
        sl, n = S.vertex_slice(v), None
        if v == "x":
            fixed += list(range(sl.start, sl.stop))
            const += list(range(sl.start + widths[0], sl.stop))
        elif v.startswith("a"):
            n = widths[int(v[1:])]
            fixed += list(range(sl.start + n, sl.stop))
            const += list(range(sl.start + n, sl.stop))
    return S, layers, torch.tensor(fixed), torch.tensor(const), ones


def closed_form(layers, x, ones=1.0):
    h = x
    for k, (A, b) in enumerate(layers):
        h = h @ A.T + ones * b
        if k < len(layers) - 1:
            h = torch.relu(h)
    return h


def start(S, widths, x, fixed, ones=1.0):
    X = torch.full((x.shape[0], S.C0), float("nan"), dtype=F64)
    X[:, : widths[0]] = x
    X[:, fixed[widths[0]:]] = ones
    return X


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=2, max_size=5), st.integers(1, 7), st.integers(0, 10_000),
       st.sampled_from([1.0, -0.5]))
def test_plan_equals_closed_form_and_forward_substitution(widths, B, seed, ones):
    S, layers, fixed, const, _ = mlp_sheaf(widths, seed)
    x = torch.randn(B, widths[0], dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    X = start(S, widths, x, fixed, ones)
    p = plan(S, fixed, const, torch.full((len(const),), ones, dtype=F64))
    out = p.run(X.clone())
    want = closed_form(layers, x, ones)
    torch.testing.assert_close(out[:, S.vertex_slice(f"z{len(layers)}")], want, rtol=1e-12, atol=1e-12)
    free = torch.tensor([i for i in range(S.C0) if i not in set(fixed.tolist())])
    ref = propagate(S, X, schedule(S, ResolvedBoundary(fixed, free, X[:, fixed])))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # the same plan without constants (ones read through the matrix) gives the same cochain
    torch.testing.assert_close(plan(S, fixed).run(X.clone()), ref, rtol=1e-12, atol=1e-12)


def test_plan_is_cached_and_rebuilt_after_invalidate():
    S, _, fixed, const, _ = mlp_sheaf([3, 4, 2])
    ones = torch.ones(len(const), dtype=F64)
    p = plan(S, fixed, const, ones)
    assert plan(S, fixed, const, ones) is p
    S.invalidate()
    assert plan(S, fixed, const, ones) is not p


def test_plan_reads_weights_changed_in_place_within_the_mask():
    """A trainable map's bias diagonal may start at zero: its mask says the entry can change."""
    S, layers, fixed, const, _ = mlp_sheaf([3, 4, 2], trainable=True)
    W = S.edge("weight:z1").Fu.weight
    W[:, 3:].zero_()                                  # b = 0 now ...
    p = plan(S, fixed, const, torch.ones(len(const), dtype=F64))
    x = torch.randn(5, 3, dtype=F64)
    W[torch.arange(4), 3 + torch.arange(4)] = 2.0     # ... and 2 after the plan was built
    W[:, :3] *= -1
    out = p.run(start(S, [3, 4, 2], x, fixed))
    A1 = -layers[0][0]
    want = torch.relu(x @ A1.T + 2.0) @ layers[1][0].T + layers[1][1]
    torch.testing.assert_close(out[:, S.vertex_slice("z2")], want)


def test_plan_with_a_general_constant_block():
    """Constant columns read by a full (not diagonal) block: the bias is a matrix-vector product."""
    S = cs.Sheaf()
    S.add_vertex("x", 4); S.add_vertex("y", 3)
    M = torch.randn(3, 4, dtype=F64)
    S.add_edge("x", "y", M, torch.eye(3, dtype=F64))
    x = torch.randn(6, 4, dtype=F64)
    x[:, 2:] = torch.tensor([0.5, -2.0], dtype=F64)
    p = plan(S, torch.arange(4), torch.tensor([2, 3]), torch.tensor([0.5, -2.0]))
    X = torch.zeros(6, 7, dtype=F64); X[:, :2] = x[:, :2]
    torch.testing.assert_close(p.run(X)[:, 4:], x @ M.T)


def test_plan_scaled_selection_and_scattered_targets():
    """A scaled selection divides; targets that are not consecutive are written by index."""
    S = cs.Sheaf()
    S.add_vertex("x", 2); S.add_vertex("y", 3)
    S.add_edge("x", "y", torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64),
               cs.maps.Linear(torch.tensor([[2.0, 0, 0], [0, 0, 1.0]], dtype=F64)), name="e")
    b = cs.Boundary().fix("x", torch.tensor([[1.0, 1.0]], dtype=F64)).fix("y", torch.tensor([[7.0]], dtype=F64),
                                                                          coords=[1])
    res = cs.minimize(S, b)
    assert res.method == "propagate" and res.converged
    torch.testing.assert_close(res.x["y"], torch.tensor([[1.5, 7.0, 7.0]], dtype=F64))


def test_plan_check_names_the_boundary_and_the_map():
    S, _, fixed, const, _ = mlp_sheaf([2, 3, 1])
    p = plan(S, fixed, const, torch.ones(len(const), dtype=F64))
    X = start(S, [2, 3, 1], torch.tensor([[1.0, float("nan")]], dtype=F64), fixed)
    with pytest.raises(ValueError, match="boundary value at vertex 'x'"):
        p.run(X.clone())
    assert bool(p.run(X.clone(), check=False)[:, -1].isnan().all())   # check=False: no verification
    S.edge("weight:z1").Fu.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="edge 'weight:z1'.*its output"):
        p.run(start(S, [2, 3, 1], torch.ones(1, 2, dtype=F64), fixed))


def test_plan_refuses_bad_constants():
    S, _, fixed, _, _ = mlp_sheaf([2, 3, 1])
    with pytest.raises(ValueError, match="constant coordinate must be fixed"):
        plan(S, fixed[:2], torch.tensor([3]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="2 constant coordinates but 1 values"):
        plan(S, fixed, fixed[:2], torch.tensor([1.0]))
    with pytest.raises(cs.NotDeterminedError):
        plan(S, fixed[:1])


def test_minimize_propagate_with_weights_that_require_grad():
    """Weights that require grad (under grad mode) take the out-of-place route, with the same answer."""
    S, layers, fixed, _, _ = mlp_sheaf([2, 3, 1])
    S.edge("weight:z1").Fu.weight.requires_grad_(True)
    x = torch.randn(4, 2, dtype=F64)
    b = cs.Boundary().fix("x", torch.cat([x, torch.ones(4, 3, dtype=F64)], 1)).fix("a1", [1.0], coords=[3])
    res = cs.minimize(S, b)
    assert res.converged
    torch.testing.assert_close(res.x["z2"].detach(), closed_form(layers, x))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("ones", [1.0, 3.0])
def test_plan_runs_structured_affine_maps(sparse, ones):
    """``Affine(A, b)`` reading a constant ones block: ``A·x + b ⊙ ones``, A dense (addmm) or any operator."""
    g = torch.Generator().manual_seed(3)
    A, b = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    S = cs.Sheaf()
    S.add_vertex("x", 7); S.add_vertex("z", 4); S.add_vertex("a", 4)
    S.add_edge("x", "z", cs.maps.Affine(A.to_sparse() if sparse else A, b), cs.maps.Identity(4))
    S.add_edge("z", "a", cs.maps.ReLU(4), cs.maps.Identity(4))
    p = plan(S, torch.arange(7), torch.arange(3, 7), torch.full((4,), ones, dtype=F64))
    x = torch.randn(5, 3, generator=g, dtype=F64)
    X = torch.zeros(5, S.C0, dtype=F64); X[:, :3] = x
    out = p.run(X)
    torch.testing.assert_close(out[:, 7:11], x @ A.T + ones * b)
    torch.testing.assert_close(out[:, 11:], torch.relu(x @ A.T + ones * b))
    bound = p.bound(5, F64)
    bound.columns(slice(0, 3)).copy_(x)
    torch.testing.assert_close(bound.run()[:, 7:], out[:, 7:])
    want = x @ A.T + 2 * ones * b
    S.edge("x->z").Fu.b.mul_(2)                      # in place: the bound views see it
    torch.testing.assert_close(bound.run()[:, 7:11], want)


def test_plan_sees_a_bias_written_in_place_after_it_was_built():
    """A non-trainable affine map whose ones block is zero when the plan is built, edited through ``.data``."""
    W = torch.zeros(2, 4, dtype=F64)
    W[:, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    S = cs.Sheaf()
    S.add_vertex("x", 4)
    S.add_vertex("y", 2)
    F = cs.maps.Linear(W)
    S.add_edge("x", "y", F, torch.eye(2, dtype=F64), name="w")
    p = cs.propagation.plan(S, torch.arange(4), torch.tensor([2, 3]), torch.ones(2, dtype=F64))
    x = torch.zeros(3, S.C0, dtype=F64)
    x[:, :2] = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    F.weight.data[:, 2:] = torch.diag(torch.tensor([5.0, -7.0], dtype=F64))
    out = p.run(x.clone())[:, 4:]
    torch.testing.assert_close(out, x[:, :2] @ W[:, :2].T + torch.tensor([5.0, -7.0], dtype=F64))
    b = p.bound(3, F64)
    b.x[:, :2] = x[:, :2]
    torch.testing.assert_close(b.run()[:, 4:], out)
