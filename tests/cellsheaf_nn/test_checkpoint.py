"""Checkpoints: atomic writes, validated transactional loads, errors that name the file; divergence restore."""

import os

import pytest
import torch

import cellsheaf_nn as csnn
from cellsheaf_nn import datasets
from cellsheaf_nn.checkpoint import FORMAT_VERSION, CheckpointError, read_checkpoint, write_checkpoint
from cellsheaf_nn.train import SheafTrainer, mlp

TASK = datasets.blobs(seed=0, n_train=30)


def _trainer(mode="nudged", **kw):
    ns = csnn.compile(mlp(TASK.sizes("1H"), output="softmax", seed=1))
    kw = {"optimizer": "adam", "lr": 0.01, **kw} if mode != "joint" else kw
    return SheafTrainer(ns, mode=mode, loss="ce", **kw)


def _weights(trainer):
    return {k: W.detach().clone() for k, W in trainer._tensors().items()}


@pytest.fixture
def saved(tmp_path):
    trainer = _trainer(mode="joint", dt=0.01)
    trainer.fit(TASK.X_train, TASK.Y_train, steps=3, progress=False)
    path = tmp_path / "ckpt.pt"
    trainer.save(path)
    return trainer, path


def test_a_crash_while_saving_keeps_the_previous_checkpoint(saved, monkeypatch):
    trainer, path = saved
    before = path.read_bytes()

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # as a kill would, mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_truncated_empty_foreign_and_code_bearing_files_are_named(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"{bad.name} is truncated"):
            _trainer(mode="joint", dt=0.01).load(bad)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt is empty"):
        read_checkpoint(empty, "cellsheaf_nn.SheafTrainer")
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="other.pt is not a cellsheaf_nn.SheafTrainer checkpoint"):
        _trainer().load(other)
    evil = tmp_path / "evil.pt"
    torch.save(_Evil(), evil)
    with pytest.raises(CheckpointError, match="evil.pt holds Python objects"):
        _trainer().load(evil)
    with pytest.raises(CheckpointError, match="missing.pt not found"):
        _trainer().load(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    write_checkpoint(path, {"x": torch.zeros(1)}, kind="k")
    state = torch.load(path, weights_only=True)
    state["version"] = FORMAT_VERSION + 1
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"new.pt has format version {FORMAT_VERSION + 1}"):
        read_checkpoint(path, kind="k")


@pytest.mark.parametrize("break_it, message", [
    (lambda s: s.pop("step"), r"lacks the entries \['step'\]"),
    (lambda s: s.update(stalks=torch.zeros(30, 3, dtype=torch.float64)), r"'stalks' has shape \(30, 3\)"),
    (lambda s: next(iter(s["parameters"].values())).fill_(float("nan")), "parameter .* NaN"),
    (lambda s: s["parameters"].update({k: torch.zeros(2, 2, dtype=torch.float64) for k in list(s["parameters"])[:1]}),
     r"parameter .* has shape \(2, 2\)"),
    (lambda s: s.update(step=-1), "'step' must be a non-negative int"),
    (lambda s: s.update(history=[1, 2]), "'history' is not a training history"),
    (lambda s: s.update(mode="nudged"), "mode='nudged'"),
])
def test_a_bad_checkpoint_changes_nothing(saved, tmp_path, break_it, message):
    trainer, _ = saved
    state = trainer.state_dict()
    break_it(state)
    path = tmp_path / "bad.pt"
    write_checkpoint(path, state, kind="cellsheaf_nn.SheafTrainer")
    fresh = _trainer(mode="joint", dt=0.01)
    before, ns_before = _weights(fresh), csnn.compile(mlp(TASK.sizes("1H"), output="softmax", seed=1))
    with pytest.raises(CheckpointError, match="bad.pt does not fit this trainer: .*" + message):
        fresh.load(path)
    assert all(torch.equal(before[k], F) for k, F in fresh._tensors().items())
    assert fresh.step == 0 and fresh.stalks is None and not fresh.history.step
    x = TASK.X_test[:5]
    assert torch.equal(fresh.ns.infer(x), ns_before.infer(x))


def test_a_bad_optimizer_state_changes_nothing(tmp_path):
    trainer = _trainer()
    trainer.fit(TASK.X_train, TASK.Y_train, steps=2, progress=False)
    state = trainer.state_dict()
    state["optimizer"]["state"][0]["exp_avg"].fill_(float("inf"))
    fresh = _trainer()
    before = _weights(fresh)
    with pytest.raises(ValueError, match="'optimizer' state 'exp_avg' of parameter 0 contains NaN or Inf"):
        fresh.load_state_dict(state)
    assert all(torch.equal(before[k], F) for k, F in fresh._tensors().items())
    state = trainer.state_dict()
    state["optimizer"]["param_groups"][0]["params"] = [0]
    with pytest.raises(ValueError, match="'optimizer' does not fit"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize("mode, options", [("nudged", {"lr": 1e6, "optimizer": "sgd"}),
                                           ("joint", {"dt": 5.0, "beta": 1.0})])
def test_after_a_divergence_the_network_is_at_its_last_finite_state(mode, options):
    task = datasets.saddle(seed=0)
    ns = csnn.compile(mlp(task.sizes("1H"), seed=0))
    trainer = SheafTrainer(ns, mode=mode, loss="mse", **options)
    states = []
    with pytest.raises(csnn.DivergenceError, match="diverged at step"):
        trainer.fit(task.X_train, task.Y_train, steps=200, progress=False,
                    callbacks=[lambda step, h, t: states.append((step, _weights(t)))], eval_every=1)
    last_step, last = states[-1]
    assert trainer.step == last_step and trainer.history.step[-1] == last_step
    assert all(torch.equal(last[k], F) for k, F in trainer._tensors().items())
    y = ns.infer(task.X_test)
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("lr", [-0.1, 0.0, float("nan"), float("inf")])
def test_a_bad_learning_rate_is_named(lr):
    ns = csnn.compile(mlp([2, 4, 1], seed=0))
    with pytest.raises(ValueError, match="lr must be positive"):
        SheafTrainer(ns, lr=lr)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        csnn.train_sgd(mlp([2, 4, 1], seed=0), torch.zeros(3, 2, dtype=torch.float64),
                       torch.zeros(3, 1, dtype=torch.float64), lr=lr, progress=False)


def test_the_default_mode_is_nudged():
    assert SheafTrainer(csnn.compile(mlp([2, 4, 1], seed=0))).mode == "nudged"


def test_a_checkpoint_is_plain_tagged_data(saved):
    _, path = saved
    state = torch.load(path, weights_only=True)
    assert state["format"] == "cellsheaf_nn.SheafTrainer" and state["version"] == FORMAT_VERSION
