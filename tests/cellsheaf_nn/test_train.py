"""Training: the SGD baseline against a plain torch loop; sheaf training (Sec. 5.2)."""

import copy

import pytest
import torch

from cellsheaf_nn import datasets, losses
from cellsheaf_nn.train import mlp, output_activation, train_sgd

D = torch.float64


# ---------------------------------------------------------------- SGD baseline

def test_he_init_statistics_and_seed():
    a, b = mlp([50, 400, 1], seed=3), mlp([50, 400, 1], seed=3)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not a[0].bias.detach().any()
    assert abs(float(a[0].weight.detach().var()) - 2 / 50) < 0.004


@pytest.mark.parametrize("name,depth,optimizer,batch_size", [
    ("paraboloid", "1H", None, None), ("blobs", "2H", None, None), ("circular", "1H", "adam", 64),
])
def test_sgd_matches_plain_torch_loop(name, depth, optimizer, batch_size):
    task = datasets.load(name, seed=0)
    model = mlp(task.sizes(depth), output=task.output, seed=1)
    ref = copy.deepcopy(model)
    hist = train_sgd(model, task.X_train, task.Y_train, loss=task.loss, steps=30, optimizer=optimizer,
                     lr=0.01, batch_size=batch_size, seed=5, progress=False, eval_every=10)
    # the plain loop
    opt = torch.optim.Adam(ref.parameters(), lr=0.01) if optimizer else torch.optim.SGD(ref.parameters(), lr=0.01)
    y = task.Y_train
    for step in range(30):
        if batch_size:
            epoch, k = divmod(step, 300 // batch_size)
            perm = torch.randperm(300, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch))
            idx = perm[k * batch_size:(k + 1) * batch_size]
            xb, yb = task.X_train[idx], y[idx]
        else:
            xb, yb = task.X_train, y
        out = ref(xb)
        if task.loss == "mse":
            value = torch.nn.functional.mse_loss(out, yb)
        elif task.loss == "bce":
            value = torch.nn.functional.binary_cross_entropy(out, yb)
        else:
            value = torch.nn.functional.nll_loss(torch.log(out), yb)
        opt.zero_grad()
        value.backward()
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-12)
    assert hist.step == [0, 10, 20, 30]
    with torch.no_grad():
        final = losses.get(task.loss)(ref(task.X_train), y)
    assert hist.train_loss[-1] == pytest.approx(float(final), rel=1e-12)


def test_sgd_default_rates_and_history():
    task = datasets.paraboloid(seed=0)
    model = mlp(task.sizes("1H"), seed=0)
    ref = copy.deepcopy(model)
    hist = train_sgd(model, task.X_train, task.Y_train, steps=1, progress=False,
                     X_val=task.X_test, Y_val=task.Y_test)
    torch.nn.functional.mse_loss(ref(task.X_train), task.Y_train).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.005 * p.grad
    assert all(torch.allclose(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert len(hist.val_loss) == 2 and hist.train_acc == []


def test_sgd_reduces_loss_on_every_task():
    for name in ["paraboloid", "saddle", "circular", "blobs"]:
        task = datasets.load(name, seed=0)
        model = mlp(task.sizes("1H"), output=task.output, seed=0)
        hist = train_sgd(model, task.X_train, task.Y_train, loss=task.loss, steps=100, lr=0.02, progress=False)
        assert hist.train_loss[-1] < 0.8 * hist.train_loss[0], name


def test_sgd_bad_input():
    task = datasets.blobs(seed=0)
    model = mlp(task.sizes("1H"), output="softmax", seed=0)
    X, Y = task.X_train, task.Y_train
    with pytest.raises(ValueError, match=r"shape \(300, 3\); the network takes \(B, 2\)"):
        train_sgd(model, torch.zeros(300, 3, dtype=D), Y, loss="ce", steps=1, progress=False)
    with pytest.raises(TypeError, match="float32"):
        train_sgd(model, X.float(), Y, loss="ce", steps=1, progress=False)
    with pytest.raises(ValueError, match="outside the classes"):
        train_sgd(model, X, Y + 1, loss="ce", steps=1, progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        train_sgd(model, X.clone().fill_(float("inf")), Y, loss="ce", steps=1, progress=False)
    with pytest.raises(ValueError, match="needs a sigmoid output"):
        train_sgd(model, X, Y, loss="bce", steps=1, progress=False)
    with pytest.raises(ValueError, match="300 inputs but 299 targets"):
        train_sgd(model, X, Y[:-1], loss="ce", steps=1, progress=False)
    reg = datasets.paraboloid(seed=0)
    with pytest.raises(FloatingPointError, match="diverged at step"):
        train_sgd(mlp([2, 30, 1], seed=0), reg.X_train, reg.Y_train * 1e3, lr=10.0, steps=50, progress=False)


def test_output_activation_names():
    assert output_activation(mlp([2, 3, 1])) == "identity"
    assert output_activation(mlp([2, 3, 2], output="softmax")) == "softmax"


# ---------------------------------------------------------------- sheaf training

import numpy as np  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import cellsheaf as cs  # noqa: E402
import cellsheaf_nn as csnn  # noqa: E402
from cellsheaf_nn.train import SheafTrainer  # noqa: E402


def _numpy_joint_step(W1, b1, W2, b2, X, Z1, A1, Y, alpha, beta, dt, lam, mu):
    """One Euler step of Eq. (26) (Eq. 29 with lam, mu) for a [n0, n1, n2] ReLU net, written out by hand
    (numpy, batch rows)."""
    relu_mask = (Z1 >= 0).astype(float)              # the fast selection rule, Eq. (12)
    r1 = Z1 - (X @ W1.T + b1)                        # weight edge 1: z1 − W̄1 x̄
    ra = A1 - relu_mask * Z1                         # activation edge: P ā1 − R z1
    r2 = Y - (A1 @ W2.T + b2)                        # weight edge 2, output clamped to Y: z2 − W̄2 ā1
    dZ1 = r1 - relu_mask * ra + lam * Z1             # ∂E/∂z1
    dA1 = ra - r2 @ W2 + lam * A1                    # ∂E/∂a1 (neural block; the ones block is fixed)
    # ∂E/∂W̄ = −Σ_b r x̄ᵀ, projected onto (W | diag(b)) (Eq. 25)
    W1n, b1n = W1 - dt * beta * (-r1.T @ X + mu * W1), b1 - dt * beta * (-r1.sum(0) + mu * b1)
    W2n, b2n = W2 - dt * beta * (-r2.T @ A1 + mu * W2), b2 - dt * beta * (-r2.sum(0) + mu * b2)
    return W1n, b1n, W2n, b2n, Z1 - dt * alpha * dZ1, A1 - dt * alpha * dA1


@pytest.mark.parametrize("lam,mu", [(0.0, 0.0), (0.3, 0.2)])
def test_joint_dynamics_equal_a_hand_computed_euler_step(lam, mu):
    g = torch.Generator().manual_seed(0)
    model = mlp([2, 3, 1], seed=0)
    with torch.no_grad():
        model[0].bias.copy_(torch.randn(3, generator=g, dtype=D))
        model[2].bias.copy_(torch.randn(1, generator=g, dtype=D))
    ns = csnn.compile(model)
    X, Y = torch.randn(4, 2, generator=g, dtype=D), torch.randn(4, 1, generator=g, dtype=D)
    trainer = SheafTrainer(ns, mode="joint", loss="mse", alpha=0.7, beta=0.3, dt=0.05, init="random", seed=3,
                           lam=lam, mu=mu)
    trainer.fit(X, Y, steps=0, progress=False)   # lays out the initial stalks only
    S, x0 = trainer.sheaf, trainer.stalks.clone()
    Z1, A1 = x0[:, S.vertex_slice("z1")], x0[:, S.vertex_slice("a1")][:, :3]
    assert torch.equal(x0[:, S.vertex_slice("z2")], Y) and bool((x0[:, S.vertex_slice("a1")][:, 3:] == 1).all())
    n = lambda t: t.detach().numpy().copy()  # noqa: E731
    expected = _numpy_joint_step(n(model[0].weight), n(model[0].bias), n(model[2].weight), n(model[2].bias),
                                 n(X), n(Z1), n(A1), n(Y), 0.7, 0.3, 0.05, lam, mu)
    trainer.fit(X, Y, steps=1, progress=False)
    got = ns.to_module()
    x1 = trainer.stalks
    actual = (got[0].weight, got[0].bias, got[2].weight, got[2].bias,
              x1[:, S.vertex_slice("z1")], x1[:, S.vertex_slice("a1")][:, :3])
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(n(a), e, rtol=1e-12, atol=1e-13)
    # the zero entries of W̄ = (W | diag(b)) stay zero (Eq. 25), the boundary does not move
    Wbar = S.edge("weight:z1").Fu.matrix()
    assert bool((Wbar[:, 2:] - torch.diag(got[0].bias.detach()) == 0).all())
    fixed = [c for v in ("x", "z2") for c in range(S.vertex_slice(v).start, S.vertex_slice(v).stop)]
    assert torch.equal(x1[:, fixed], x0[:, fixed])


@pytest.mark.parametrize("name", ["paraboloid", "saddle", "circular", "blobs"])
def test_every_mode_reduces_the_loss(name):
    task = datasets.load(name, seed=0, n_train=60)
    init = "forward_pass" if task.classification else "random"
    for mode, steps, kw in [("joint", 150, dict(dt=0.02, init=init)),
                            ("nudged", 6, dict(optimizer="adam", lr=0.05)),
                            ("equilibrium", 2, dict(optimizer="adam", lr=0.05, init="forward_pass", max_iter=5))]:
        ns = csnn.compile(mlp(task.sizes("1H"), output=task.output, seed=0))
        hist = SheafTrainer(ns, mode=mode, loss=task.loss, **kw).fit(task.X_train, task.Y_train, steps=steps,
                                                                      progress=False)
        assert hist.train_loss[-1] < 0.9 * hist.train_loss[0], (name, mode, hist.train_loss)
        assert hist.step[-1] == steps and set(hist.discord) >= {"weight"}


@pytest.mark.parametrize("mode,kw", [("joint", dict(dt=0.01, batch_size=20)),
                                     ("nudged", dict(optimizer="adam", lr=0.01, batch_size=20)),
                                     ("equilibrium", dict(optimizer="sgd", lr=0.01, init="forward_pass",
                                                          max_iter=4))])
def test_resume_equals_uninterrupted(tmp_path, mode, kw):
    task = datasets.blobs(seed=0, n_train=40)
    model = mlp(task.sizes("1H" if mode == "equilibrium" else "2H"), output="softmax", seed=1)
    steps = {"joint": 20, "nudged": 4, "equilibrium": 2}[mode]
    full = SheafTrainer(csnn.compile(model), mode=mode, loss="ce", seed=2, **kw)
    full.fit(task.X_train, task.Y_train, steps=steps, progress=False)
    first = SheafTrainer(csnn.compile(model), mode=mode, loss="ce", seed=2, **kw)
    first.fit(task.X_train, task.Y_train, steps=steps // 2, progress=False)
    first.save(tmp_path / "ckpt.pt")
    second = SheafTrainer(csnn.compile(model), mode=mode, loss="ce", seed=2, **kw).load(tmp_path / "ckpt.pt")
    second.fit(task.X_train, task.Y_train, steps=steps - steps // 2, progress=False)
    for k, W in full._tensors().items():
        assert torch.equal(W, second._tensors()[k]), k
    assert torch.equal(full.stalks, second.stalks)
    assert second.step == steps and second.history.train_loss[-1] == full.history.train_loss[-1]
    # the same trainer continued in place
    first.fit(task.X_train, task.Y_train, steps=steps - steps // 2, progress=False)
    assert all(torch.equal(W, first._tensors()[k]) for k, W in full._tensors().items())


class _Residual(torch.nn.Module):
    def __init__(self, n_in, width, n_out, depth=2):
        super().__init__()
        self.inp = torch.nn.Linear(n_in, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.out = torch.nn.Linear(width, n_out)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.out(h)


def _autograd(model, X, Y, loss):
    model.zero_grad()
    loss(model(X), Y).backward()
    return {k: p.grad for k, p in model.named_parameters()}


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), case=st.sampled_from(["mse", "huber", "bce", "ce", "residual"]),
       widths=st.lists(st.integers(1, 12), min_size=1, max_size=3))
def test_nudged_local_gradients_match_autograd(seed, case, widths):
    g = torch.Generator().manual_seed(seed)
    n_out = {"bce": 1, "ce": 3}.get(case, 2)
    output = {"bce": "sigmoid", "ce": "softmax"}.get(case, "identity")
    model = _Residual(3, widths[0] + 1, n_out).double() if case == "residual" else \
        mlp([3, *widths, n_out], output=output)
    csnn.he_init(model, seed)
    with torch.no_grad():   # nonzero biases: no pre-activation sits exactly on a ReLU kink, where the
        for p in model.parameters():   # sheaf's R(0) = 1 (Eq. 12) and torch's relu'(0) = 0 differ
            if p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=D))
    X = torch.randn(16, 3, generator=g, dtype=D)
    Y = {"bce": (torch.rand(16, 1, generator=g, dtype=D) > 0.5).double(),
         "ce": torch.randint(0, 3, (16,), generator=g)}.get(case, torch.randn(16, n_out, generator=g, dtype=D))
    loss = losses.get("huber", tau=0.5) if case == "huber" else losses.get("mse" if case == "residual" else case)
    trainer = SheafTrainer(csnn.compile(model), mode="nudged", loss=loss, gamma=1e-8)  # bias O(γ), up to ~1e3·γ
    local = trainer.local_gradients(X, Y)
    exact = _autograd(csnn.compile(model).to_module(), X, Y, loss)
    assert set(local) == set(exact)
    scale = max(float(g.norm()) for g in exact.values())
    for k in exact:
        if float(exact[k].norm()) < 1e-9 * scale:   # e.g. a layer behind dead ReLUs: zero up to the O(γ) bias
            assert float(local[k].norm()) < 1e-3 * scale
            continue
        cos = torch.nn.functional.cosine_similarity(local[k].flatten(), exact[k].flatten(), dim=0)
        assert float(cos) > 0.999, (k, float(cos))
        assert float((local[k] - exact[k]).norm()) <= 1e-3 * float(exact[k].norm())


def test_trainer_bad_input():
    task = datasets.blobs(seed=0, n_train=40)
    ns = csnn.compile(mlp(task.sizes("1H"), output="softmax", seed=0))
    with pytest.raises(ValueError, match="needs a sigmoid output"):
        SheafTrainer(ns, loss="bce")
    with pytest.raises(ValueError, match="mode must be one of"):
        SheafTrainer(ns, mode="backprop", loss="ce")
    with pytest.raises(ValueError, match="optimizers drive the local modes"):
        SheafTrainer(ns, mode="joint", loss="ce", optimizer="adam")
    trainer = SheafTrainer(ns, mode="joint", loss="ce")
    with pytest.raises(ValueError, match="outside the classes"):
        trainer.fit(task.X_train, task.Y_train + 4, steps=1, progress=False)
    with pytest.raises(TypeError, match="float32"):
        trainer.fit(task.X_train.float(), task.Y_train, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"the network takes \(B, 2\)"):
        trainer.fit(task.X_train[:, :1], task.Y_train, steps=1, progress=False)
    bad = task.X_train.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        trainer.fit(bad, task.Y_train, steps=1, progress=False)
    reg = datasets.paraboloid(seed=0, n_train=40)
    diverging = SheafTrainer(csnn.compile(mlp([2, 30, 1], seed=0)), mode="joint", loss="mse", dt=5.0,
                             beta=1.0)
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+.*smaller dt"):
        diverging.fit(reg.X_train, reg.Y_train, steps=200, progress=False)


@pytest.mark.parametrize("mode, options, hint", [("joint", {"dt": 5.0}, "smaller dt"),
                                                  ("nudged", {"lr": 1e6}, "smaller lr")])
def test_an_energy_that_overflows_is_reported_as_a_divergence(mode, options, hint):
    """Stalks and weights still finite, their energy not: the trainer names the step and the fix."""
    task = datasets.saddle(seed=0)
    trainer = SheafTrainer(csnn.compile(mlp(task.sizes("1H"), seed=0)), mode=mode, loss="mse", **options)
    with pytest.raises(FloatingPointError, match=rf"mode='{mode}'\) diverged at step \d+: .*{hint}"):
        trainer.fit(task.X_train, task.Y_train, steps=200, progress=False)


def test_callbacks_records_and_progress():
    task = datasets.paraboloid(seed=0, n_train=50)
    trainer = SheafTrainer(csnn.compile(mlp([2, 8, 1], seed=0)), mode="joint", loss="mse", dt=0.01)
    seen = []
    hist = trainer.fit(task.X_train, task.Y_train, X_val=task.X_test, Y_val=task.Y_test, steps=40, eval_every=10,
                       record_every=5, callbacks=[lambda step, h, t: seen.append(step) or step >= 20])
    assert seen == [10, 20] and hist.step == [0, 10, 20] and len(hist.val_loss) == 3
    assert [r["step"] for r in hist.records] == [5, 10, 15, 20]
    assert trainer.discord().keys() == {"weight", "act"}


class _Scaled(torch.nn.Module):
    """A learned gate vector and a learned shift used directly in ``forward``."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        self.gate = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 1.5]))
        self.shift = torch.nn.Parameter(torch.tensor([0.1, 0.2, -0.3, 0.0]))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) * self.gate + self.shift))


def test_parameters_used_in_forward_are_sheaf_parameters_with_local_gradients():
    torch.manual_seed(0)
    model = _Scaled().double()
    ns = csnn.compile(model)
    assert set(ns.parameters) == {"gate", "shift", "fc.weight", "fc.bias", "head.weight", "head.bias"}
    X, Y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    assert torch.allclose(ns.infer(X), model(X), atol=1e-12, rtol=0)
    trainer = csnn.SheafTrainer(ns, mode="nudged", loss="mse", gamma=1e-7)
    local = trainer.local_gradients(X, Y)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(X), Y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(local[name], p.grad, rtol=1e-4, atol=1e-7), name
    trainer.fit(X, Y, steps=3, progress=False)
    back = ns.to_module()
    assert not torch.equal(back.gate.detach(), model.gate.detach())
    assert torch.allclose(back(X), ns.infer(X), atol=1e-12, rtol=0)


def test_fit_data_at_the_public_boundary():
    """Complex data refused naming inputs or targets, integer inputs cast to the network's dtype, an empty or
    scalar data set refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    ns = csnn.compile(model)
    tr = csnn.SheafTrainer(ns, loss="mse")
    X, Y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="training inputs must be real"):
        tr.fit(X.to(torch.complex128), Y, steps=1, progress=False)
    with pytest.raises(TypeError, match="training targets must be real"):
        tr.fit(X, Y.to(torch.complex128), steps=1, progress=False)
    with pytest.raises(ValueError, match="training data is empty"):
        tr.fit(X[:0], Y[:0], steps=1, progress=False)
    with pytest.raises(ValueError, match="training data: 4 inputs but a scalar target"):
        tr.fit(X, torch.tensor(1.0), steps=1, progress=False)
    hist = tr.fit(torch.randint(0, 3, (4, 2)), Y, steps=1, progress=False)
    assert len(hist.train_loss) and all(torch.isfinite(p).all() for p in ns.to_module().parameters())


def test_clamped_fallback_runs_newton_on_the_unconverged_items_only():
    """Items the region steps leave unconverged (here: a cap of one step) go to low-rank Newton alone, and those
    it leaves unconverged to general Newton alone: the result is each solver's from the same point."""
    task = datasets.blobs(seed=0, n_train=40)
    ns = csnn.compile(mlp(task.sizes("1H"), output="softmax", seed=1))
    trainer = SheafTrainer(ns, mode="equilibrium", loss="ce", optimizer="sgd", lr=0.01, init="forward_pass",
                           max_iter=1, tol=1e-9)
    trainer.fit(task.X_train, task.Y_train, steps=1, progress=False)
    X, Y = task.X_train, trainer.loss.target(task.Y_train, ns.n_out, ns.dtype)
    start = trainer.stalks.clone()
    plan, inputs, target = trainer._nudge_plan()
    x = start.clone()
    x[:, inputs[0]], x[:, target] = X, Y  # one input: inputs holds its one slice
    plan._write_constants(x)
    first, report = cs.nudge.clamped_equilibrium(trainer.sheaf, plan, x, tol=1e-9, max_iter=1)
    assert not bool(report["converged"].all())   # the fallback is exercised
    idx = torch.nonzero(~report["converged"]).flatten()
    second, report2, _ = cs.nudge.low_rank_newton(trainer.sheaf, plan, first[idx], tol=1e-9, max_iter=1)
    out, _ = trainer._clamped_state((X,), Y, start)
    torch.testing.assert_close(out[report["converged"]], first[report["converged"]], rtol=0, atol=0)
    torch.testing.assert_close(out[idx[report2["converged"]]], second[report2["converged"]], rtol=0, atol=0)
    last = idx[~report2["converged"]]
    assert last.numel()
    want = cs.minimize(trainer.sheaf, trainer._boundary((X[last],), Y[last]), method="newton",
                       x0=second[~report2["converged"]], tol=1e-9, max_iter=1,
                       options=cs.gauss_newton.NewtonOptions(hold_kinks_at_start=True)).x.flat
    torch.testing.assert_close(out[last], want, rtol=1e-8, atol=1e-10)
