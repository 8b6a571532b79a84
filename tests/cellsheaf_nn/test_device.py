"""Compiled networks on every device the suite has: inference and training equal the CPU run."""

from __future__ import annotations

import torch

import cellsheaf_nn as csnn


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()


def test_inference_follows_the_network(device):
    model = _model()
    ns = csnn.compile(model).to(device)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = ns.infer(x.to(device))
    assert y.device.type == device.type
    torch.testing.assert_close(y.cpu(), model(x), rtol=1e-12, atol=1e-12)
    yd = ns.infer(x.to(device), method="diffusion", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(yd.cpu(), model(x), rtol=1e-7, atol=1e-7)


def test_training_follows_the_network(device):
    task = csnn.datasets.paraboloid(seed=0, n_train=40)
    X, Y = task.X_train, task.Y_train
    weights = []
    for dev in (torch.device("cpu"), device):
        ns = csnn.compile(csnn.mlp(task.sizes("1H"), seed=0)).to(dev)
        trainer = csnn.SheafTrainer(ns, mode="nudged", loss="mse", optimizer="adam", lr=0.01)
        trainer.fit(X.to(dev), Y.to(dev), steps=3, progress=False)
        weights.append({k: v.detach().cpu() for k, v in ns.to_module().state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-9, atol=1e-10)
