"""NeuralSheaf: inference equals the forward pass (Prop. 3.4), diffusion converges to it (Thms 4.1, 4.2),
Lemma 3.2 on compiled networks, pins and clamping (Sec. 5.1, Note 5.1)."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import cellsheaf as cs
import cellsheaf_nn as csnn

from .nets import mlp, mlps, residual_mlp, residual_mlps

F64 = torch.float64


# ---------------------------------------------------------------------------- inference = forward pass


@settings(max_examples=25, deadline=None)
@given(mlps())
def test_infer_equals_model_float64(case):
    model, x = case
    ns = csnn.compile(model)
    y, state = ns.infer(x, return_state=True)
    torch.testing.assert_close(y, model(x).detach(), atol=1e-10, rtol=1e-10)
    assert state.info.converged and state.info.method == "propagate"


@settings(max_examples=10, deadline=None)
@given(mlps(max_depth=4, max_width=32, dtype=torch.float32))
def test_infer_equals_model_float32(case):
    model, x = case
    y = csnn.compile(model).infer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, model(x).detach(), atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(residual_mlps())
def test_infer_equals_residual_model(case):
    model, x = case
    torch.testing.assert_close(csnn.compile(model).infer(x), model(x).detach(), atol=1e-10, rtol=1e-10)


def test_state_holds_every_quantity():
    model = mlp([3, 4, 2], output="softmax")
    ns = csnn.compile(model)
    x = torch.randn(5, 3, dtype=F64)
    y, state = ns.infer(x, return_state=True)
    assert set(state) == set(ns.layout)
    z1 = model[0](x)
    torch.testing.assert_close(state["z1"], z1, atol=1e-12, rtol=0)
    torch.testing.assert_close(state["a1"], torch.relu(z1), atol=1e-12, rtol=0)
    assert state["x"].shape == (5, 3) and state["y"].shape == (5, 2)
    assert float(state.info.energy.max()) < 1e-20 and state.cochain.flat.shape == (5, ns.sheaf.C0)
    y1, s1 = ns.infer(x[0], return_state=True)  # one unbatched input
    assert y1.shape == (2,) and s1["a1"].shape == (4,)
    torch.testing.assert_close(y1, y[0])


@pytest.mark.parametrize("method", ["newton", "euler"])
def test_iterative_minimisers_reach_the_forward_pass(method):
    model = mlp([2, 5, 3], output="sigmoid", seed=3)
    ns = csnn.compile(model)
    x = torch.randn(4, 2, dtype=F64)
    y, state = ns.infer(x, method=method, init="random", generator=torch.Generator().manual_seed(0),
                        return_state=True)
    assert state.info.method == method and state.info.converged
    torch.testing.assert_close(y, model(x).detach(), atol=1e-8, rtol=0)


# ---------------------------------------------------------------------------- diffusion (Thms 4.1, 4.2)


@pytest.mark.parametrize("widths, output", [([2, 6, 1], "identity"), ([2, 5, 4, 1], "identity"),
                                            ([3, 4, 2], "sigmoid"), ([2, 4, 3], "softmax")])
def test_diffusion_converges_to_forward_pass_from_random_starts(widths, output):
    model = mlp(widths, output=output, seed=1)
    ns = csnn.compile(model)
    x = torch.randn(3, widths[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    for seed in range(2):
        y, state = ns.infer(x, method="diffusion", tol=1e-9, generator=torch.Generator().manual_seed(seed),
                            return_state=True)
        assert state.info.converged and state.info.method == "euler"
        torch.testing.assert_close(y, model(x).detach(), atol=1e-7, rtol=0)


def test_diffusion_inits_and_residual_net():
    model = residual_mlp(2, 3, 1, 1, seed=4)
    ns = csnn.compile(model)
    x = torch.randn(2, 2, dtype=F64)
    for init in ("zeros", "forward_pass"):  # "random" is covered above
        y, state = ns.infer(x, method="diffusion", init=init, tol=1e-9, return_state=True)
        torch.testing.assert_close(y, model(x).detach(), atol=1e-7, rtol=0)
    assert state.info.iterations == 0  # started at the answer


def test_non_convergence_is_reported():
    ns = csnn.compile(mlp([2, 4, 1]))
    x = torch.randn(2, 2, dtype=F64)
    with pytest.raises(csnn.ConvergenceError, match="did not converge") as err:
        ns.infer(x, method="diffusion", max_steps=3)
    assert err.value.result.iterations == 3 and not err.value.result.converged
    y, state = ns.infer(x, method="diffusion", max_steps=3, check=False, return_state=True)
    assert not state.info.converged and y.shape == (2, 1)


# ---------------------------------------------------------------------------- Lemma 3.2


def _check_lemma_32(ns, x):
    D = ns.restricted_coboundary(x)
    assert D.shape[0] == D.shape[1]
    assert torch.equal(torch.tril(D), D) and bool((torch.diagonal(D) == 1).all())  # unitriangular
    assert ns.coboundary_determinant(x) == 1.0
    sign, logdet = torch.linalg.slogdet(D)
    assert float(sign) == 1.0 and abs(float(logdet)) < 1e-9
    L = ns.restricted_laplacian(x)
    torch.testing.assert_close(L, D.T @ D, atol=1e-10, rtol=1e-10)
    assert float(torch.linalg.eigvalsh(L).min()) > 0


@settings(max_examples=12, deadline=None)
@given(mlps(max_depth=4, max_width=10))
def test_lemma_32_on_mlps(case):
    model, x = case
    ns = csnn.compile(model)
    for xi in x[:2]:
        _check_lemma_32(ns, xi)


@settings(max_examples=8, deadline=None)
@given(residual_mlps(max_blocks=2, max_width=8))
def test_lemma_32_on_residual_nets(case):
    model, x = case
    _check_lemma_32(csnn.compile(model), x[0])


def test_unitriangular_at_arbitrary_activation_patterns():
    ns = csnn.compile(residual_mlp(3, 4, 2, 2, output="sigmoid"))
    S = ns.sheaf
    free = ns.boundary(torch.zeros(3, dtype=F64)).resolve(S).free
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # random cochains: random ReLU patterns, not only the forward pass's
        D = cs.operators.coboundary(S, at=torch.randn(S.C0, dtype=F64, generator=g), format="dense")[:, free]
        assert torch.equal(torch.tril(D), D) and torch.equal(torch.diagonal(D), torch.ones(len(free), dtype=F64))


# ---------------------------------------------------------------------------- pins (Sec. 5.1)


def _pinned_net():
    return mlp([3, 6, 6, 2], seed=11)


def _energy(model, state, pinned=None):
    """The discord of an MLP state written out from the model's weights (an independent formula)."""
    lin = [m for m in model if isinstance(m, nn.Linear)]
    E, a = 0.0, state["x"]
    for ell, layer in enumerate(lin, 1):
        z = state[f"z{ell}"]
        E = E + 0.5 * ((z - layer(a)) ** 2).sum()
        if ell < len(lin):
            a = state[f"a{ell}"]
            E = E + 0.5 * ((a - torch.relu(z)) ** 2).sum()
    return E


def test_hard_pin_moves_upstream_vertices():
    model = _pinned_net()
    ns = csnn.compile(model)
    x = torch.randn(1, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    _, free = ns.infer(x, return_state=True)
    target = free["a1"][0, 2] + 1.5
    pin = ns.pin("a1", [2], target.reshape(1))
    _, pinned = ns.infer(x, return_state=True)
    assert pinned.info.converged and pinned.info.method == "newton"
    assert pinned["a1"][0, 2] == target
    assert (pinned["z1"] - free["z1"]).abs().max() > 1e-3  # bidirectional: the pin reaches upstream
    assert (pinned["z3"] - free["z3"]).abs().max() > 1e-3  # ... and downstream
    assert torch.equal(pinned["x"], x)  # the input stays fixed
    # first-order conditions: the gradient of the independently written energy vanishes on the free coordinates
    leaves = {k: v.detach().clone().requires_grad_(k != "x") for k, v in pinned.items()}
    grads = torch.autograd.grad(_energy(model, leaves), [leaves[k] for k in ("z1", "a1", "z2", "a2", "z3")])
    grads[1][0, 2] = 0.0  # the pinned coordinate is not free
    assert max(float(g.abs().max()) for g in grads) < 1e-8
    ns.unpin(pin)
    torch.testing.assert_close(ns.infer(x), model(x).detach(), atol=1e-12, rtol=0)


def test_soft_pins_interpolate_between_free_and_hard():
    model = _pinned_net()
    ns = csnn.compile(model)
    x = torch.randn(1, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    free = ns.infer(x, return_state=True)[1]["a2"][0, 1]
    target = free - 1.0
    hard = ns.pin("a2", [1], target.reshape(1))
    hard_state = ns.infer(x, return_state=True)[1]
    ns.unpin(hard)
    values, gaps = [], []
    for gamma in (1e-3, 1e-1, 1.0, 10.0, 1e3, 1e6):
        soft = ns.pin("a2", [1], target.reshape(1), strength=gamma)
        assert "penalty:a2" in ns.pinned_sheaf.edges and ns.edge_types["penalty:a2"] == "penalty"
        state = ns.infer(x, return_state=True)
        values.append(float(state[1]["a2"][0, 1]))
        gaps.append(float(max((state[1][v] - hard_state[v]).abs().max() for v in ("z1", "a1", "z2", "z3"))))
        ns.unpin(soft)
    assert ns.pinned_sheaf is ns.sheaf
    assert abs(values[0] - float(free)) < 1e-2 and abs(values[-1] - float(target)) < 1e-5
    assert all(a >= b for a, b in zip(values, values[1:]))  # moves monotonically from free to target
    assert all(a >= b - 1e-12 for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-4  # ... to the hard equilibrium


def test_soft_pin_makes_coboundary_tall_and_laplacian_stays_pd():
    ns = csnn.compile(mlp([3, 6, 6, 2], hidden="tanh", seed=11))
    x = torch.randn(3, dtype=F64)
    ns.pin("z3", values=torch.tensor([1.0, -1.0], dtype=F64), strength=2.0)
    D = ns.restricted_coboundary(x)
    assert D.shape[0] == D.shape[1] + 2
    with pytest.raises(ValueError, match="not square"):
        ns.coboundary_determinant(x)
    assert float(torch.linalg.eigvalsh(ns.restricted_laplacian(x)).min()) > 0


def test_batched_pin_sets_match_single_solves():
    ns = csnn.compile(mlp([3, 6, 6, 2], hidden="tanh", seed=11))  # smooth: no equilibria on kinks (Note 5.1)
    x = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    values = torch.tensor([[0.0], [0.5], [-0.7]], dtype=F64)  # inside the range of tanh
    ns.pin("a1", [0], values)
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]], dtype=F64)
    ns.pin("z3", None, soft, strength=5.0)
    y = ns.infer(x, tol=1e-8)  # an energy line search cannot resolve gradients far below √eps·E
    ns.clear_pins()
    for i in range(3):
        ns.pin("a1", [0], values[i])
        ns.pin("z3", None, soft[i], strength=5.0)
        torch.testing.assert_close(ns.infer(x[i : i + 1], tol=1e-8), y[i : i + 1], atol=1e-7, rtol=0)
        ns.clear_pins()


def test_clamp_output_and_free_inputs_imputes():
    model = mlp([3, 8, 1], hidden="leaky", seed=2)
    ns = csnn.compile(model)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    hidden = x.clone()
    hidden[:, 0] += 0.5
    target = model(hidden).detach()  # reachable by changing input 0
    free = ns.free_input([0])
    ns.clamp(ns.output, target)
    y, state = ns.infer(x, return_state=True, tol=1e-9)
    assert state.info.converged and torch.equal(y, target)
    assert torch.equal(state["x"][:, 1:], x[:, 1:])  # the observed input coordinates are kept
    torch.testing.assert_close(model(state["x"]).detach(), target, atol=1e-8, rtol=0)  # a consistent completion
    ns.unpin(free)
    with pytest.raises(ValueError, match="free_input"):
        ns.clamp("x", torch.zeros(1, dtype=F64), coords=[0])


def test_pin_errors():
    ns = csnn.compile(_pinned_net())
    with pytest.raises(KeyError, match="unknown vertex 'a9'"):
        ns.pin("a9", [0], 1.0)
    with pytest.raises(IndexError, match="outside the 6 neurons"):
        ns.pin("a1", [6], 1.0)
    with pytest.raises(ValueError, match="values of shape"):
        ns.pin("a1", [0, 1], torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        ns.pin("a1", [0], float("nan"))
    with pytest.raises(ValueError, match="strength"):
        ns.pin("a1", [0], 1.0, strength=-1.0)
    p = ns.pin("a1", [0, 1], 1.0)
    with pytest.raises(ValueError, match="already fixed"):
        ns.pin("a1", [1], 0.0)
    ns.unpin(p)
    with pytest.raises(KeyError, match="not active"):
        ns.unpin(p)
    with pytest.raises(ValueError, match="network takes"):
        ns.infer(torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="method must be"):
        ns.infer(torch.zeros(2, 3, dtype=F64), method="magic")
    ns.pin("a1", [0], 1.0)
    with pytest.raises(cs.NotDeterminedError):
        ns.infer(torch.zeros(2, 3, dtype=F64), method="propagate")


def test_propagation_with_inputs_shared_across_the_batch():
    """Input columns equal for every item take propagation's shared-boundary path (a matrix-vector product)."""
    model = residual_mlp(5, 4, 1, 2, seed=6)
    ns = csnn.compile(model)
    x = torch.randn(6, 5, dtype=F64)
    x[:, 1] = 0.7  # shared: the remaining input columns 0, 2, 3, 4 are not consecutive
    x[:, 4] = -1.2
    torch.testing.assert_close(ns.infer(x), model(x).detach(), atol=1e-12, rtol=0)
    x[:] = x[0]  # every column shared
    torch.testing.assert_close(ns.infer(x), model(x).detach(), atol=1e-12, rtol=0)


def test_infer_batches_streams_a_dataloader_and_equals_one_big_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).double()
    ns = csnn.compile(model)
    X = torch.randn(23, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, torch.zeros(23)), batch_size=5)
    stream = ns.infer_batches(loader)
    assert not isinstance(stream, (list, tuple))                 # a generator: nothing computed up front
    torch.testing.assert_close(torch.cat(list(stream)), model(X), rtol=1e-12, atol=1e-12)
    plain = [y for y in ns.infer_batches(X.split(10))]           # plain tensors work too
    assert [len(y) for y in plain] == [10, 10, 3]
    with pytest.raises(TypeError, match="batch 0"):
        list(ns.infer_batches([{"x": X}]))


def test_coords_and_pins_take_index_tuples_into_the_per_sample_shape():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2)).double()
    ns = csnn.compile(model, input_shape=(2, 3))
    assert ns.layout["x"].shape == (2, 3)
    assert ns.coords("x", [(1, 2), (0, 1)]).tolist() == ns.coords("x", [5, 1]).tolist()
    assert ns.coords("x", (1, 2)).tolist() == ns.coords("x", [5]).tolist()
    ns.free_input([(1, 2)])
    pin = ns.pin("z1", [(0,)], torch.tensor([0.5], dtype=torch.float64))
    x = torch.randn(2, 3, dtype=torch.float64)
    _, state = ns.infer(x, return_state=True)
    assert abs(float(state["z1"][0]) - 0.5) < 1e-9
    ns.unpin(pin)
    with pytest.raises(IndexError, match=r"\(2, 0\) does not fit the per-sample shape \(2, 3\)"):
        ns.coords("x", [(2, 0)])


def test_infer_dispatches_an_iterable_of_batches_to_streaming():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    ns = csnn.compile(model)
    X = torch.randn(11, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, torch.zeros(11)), batch_size=4)
    stream = ns.infer(loader)
    assert inspect.isgenerator(stream)                                # lazy: one batch at a time
    torch.testing.assert_close(torch.cat(list(stream)), model(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(list(ns.infer(X.split(5)))), model(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(list(ns.infer(b for b in X.split(3)))), model(X), rtol=1e-12, atol=1e-12)
    # inputs as before: a tensor, one sample, a nested list of numbers
    torch.testing.assert_close(ns.infer(X), model(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ns.infer(X[0]), model(X[0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ns.infer(X[:2].tolist()), model(X[:2]), rtol=1e-6, atol=1e-6)  # via float32
    ys = list(ns.infer(loader, return_state=True))                    # infer's options pass through
    assert len(ys) == 3 and all(state.info.converged for _, state in ys)


def test_infer_streams_tuple_batches_of_a_multi_input_model():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 3), torch.nn.Linear(4, 3)

        def forward(self, x, z):
            return torch.relu(self.a(x) + self.b(z))

    torch.manual_seed(1)
    model = Two().double()
    ns = csnn.compile(model, input_shape=[(2,), (4,)])
    X, Z = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(ns.infer((X, Z)), model(X, Z), rtol=1e-12, atol=1e-12)   # the inputs, as before
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Z, torch.zeros(7)), batch_size=3)
    torch.testing.assert_close(torch.cat(list(ns.infer(loader))), model(X, Z), rtol=1e-12, atol=1e-12)
    pairs = list(zip(X.split(4), Z.split(4)))
    torch.testing.assert_close(torch.cat(list(ns.infer(pairs))), model(X, Z), rtol=1e-12, atol=1e-12)


def test_infer_batches_under_a_process_group_takes_this_ranks_shard(monkeypatch):
    from cellsheaf_nn import distributed

    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).double()
    ns = csnn.compile(model)
    X = torch.arange(20, dtype=torch.float64).reshape(10, 2)
    batches = X.split(2)                                              # five batches
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    got = list(ns.infer(batches))                                     # rank 1 of 2: batches 1 and 3
    torch.testing.assert_close(torch.cat(got), model(torch.cat([batches[1], batches[3]])), rtol=1e-12, atol=1e-12)
    assert len(list(ns.infer_batches(batches, shard=False))) == 5
    sampler = torch.utils.data.distributed.DistributedSampler(torch.utils.data.TensorDataset(X), num_replicas=2,
                                                              rank=1, shuffle=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=2, sampler=sampler)
    assert distributed.is_sharded(loader)                             # already this rank's shard: taken as it is
    torch.testing.assert_close(torch.cat(list(ns.infer(loader))), model(X[1::2]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- the public boundary


@pytest.mark.parametrize("method", ["auto", "newton", "euler", "diffusion"])
@pytest.mark.parametrize("pin", [None, "hard", "soft"])
def test_an_empty_batch_gives_an_empty_result(method, pin):
    ns = csnn.compile(_pinned_net())
    if pin is not None:
        ns.pin("a1", [0], 1.0, strength=None if pin == "hard" else 2.0)
    y, state = ns.infer(torch.zeros(0, 3, dtype=F64), method=method, return_state=True)
    assert y.shape == (0, 2) and state["a1"].shape == (0, 6) and state.info.converged


def test_complex_inputs_and_pins_are_refused_and_integers_cast():
    model = _pinned_net()
    ns = csnn.compile(model)
    with pytest.raises(TypeError, match="input 'x' must be real"):
        ns.infer(torch.ones(2, 3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="pin values at vertex 'a1' must be real"):
        ns.pin("a1", [0], torch.tensor([1 + 1j]))
    with pytest.raises(TypeError, match="pin values at vertex 'a1' must be real"):
        ns.pin("a1", [0], 1j)
    xi = torch.tensor([[1, 0, 2]])
    torch.testing.assert_close(ns.infer(xi), model(xi.to(F64)).detach())  # integers: the network's dtype
    p = ns.pin("a1", [0], torch.tensor([2]))
    assert p.values.dtype == F64 and p.values.tolist() == [2.0]


@pytest.mark.parametrize("kw", [{"tol": 1j}, {"tol": float("nan")}, {"max_steps": -1}, {"max_steps": 1.5},
                                {"dt": 0.0}, {"alpha": float("inf")}])
def test_infer_checks_its_numbers(kw):
    ns = csnn.compile(_pinned_net())
    with pytest.raises(ValueError, match=f"^{next(iter(kw))} must be"):
        ns.infer(torch.zeros(2, 3, dtype=F64), **kw)


# ---------------------------------------------------------------------------- pins on a softmax output


def _softmax_classifier(dtype) -> tuple[nn.Module, torch.Tensor]:
    """A small MLP ending in ``nn.Softmax(dim=1)``, trained until its outputs are confident (saturated)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5), nn.Softmax(dim=1)).to(dtype)
    X = torch.randn(64, 4, generator=g, dtype=dtype)
    labels = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.nll_loss(torch.log(model(X)), labels).backward()
        opt.step()
    return model, X


def _lbfgs_minimum(S, start: torch.Tensor, free: torch.Tensor) -> float:
    """The energy reached by torch's L-BFGS over the free coordinates from ``start`` (float64)."""
    z = start[..., free].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], max_iter=1000, tolerance_grad=1e-13, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def energy():
        return cs.energy(S, start.index_copy(-1, free, z)).sum()

    def closure():
        opt.zero_grad()
        e = energy()
        e.backward()
        return e

    opt.step(closure)
    with torch.no_grad():
        return float(energy())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pin_on_a_saturated_softmax_output_is_minimised(dtype):
    """``ns.pin("y", [3], 0.9)`` on a confident classifier: the solver's answer is the minimum of the pinned
    energy, as an independent L-BFGS minimisation from the solver's point and from random starts confirms.

    On a saturated softmax ``s``, ``½(0.9 − s_3(z))²`` has the gradient ``(0.9 − s_3) s_3 (1 − s_3) ≈ 0`` in
    ``z``, while moving the logits far enough to raise ``s_3`` costs ``½‖Δz‖²`` on the weight edge: the logits
    stay (nearly) where they are and the energy stays near ``½ (0.9 − s_3)²``. That is the minimum, honestly
    certified, not a solver that did not move."""
    model, X = _softmax_classifier(dtype)
    ns = csnn.compile(model)
    x = X[:1]
    with torch.no_grad():
        s3 = float(model(x)[0, 3])
    ns.pin("y", [3], 0.9)
    y, state = ns.infer(x, return_state=True)
    assert state.info.converged and y[0, 3].item() == pytest.approx(0.9)
    S64 = ns.pinned_sheaf.copy()
    S64.to(dtype=torch.float64)
    free = ns.boundary(x).resolve(S64).free
    found = float(cs.energy(S64, state.cochain.flat.double()).sum())
    g = torch.Generator().manual_seed(1)
    starts = [state.cochain.flat.double()] + [
        ns.boundary(x).resolve(S64, dtype=torch.float64).fill(3 * torch.randn(1, S64.C0, generator=g,
                                                                             dtype=torch.float64))
        for _ in range(3)]
    best = min(_lbfgs_minimum(S64, s, free) for s in starts)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert found <= best + tol * max(1.0, best)
    assert found == pytest.approx(0.5 * (0.9 - s3) ** 2, rel=0.05)  # nothing cheaper than leaving the logits
