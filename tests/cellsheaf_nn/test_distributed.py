"""Data-parallel training on 2 gloo processes equals one process on all the data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cellsheaf_nn as csnn

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_distributed.py"


def _run(tmp_path: Path, mode: str, procs: int, extra: list[str] = ()) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{procs}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([*launch, str(SCRIPT), "--mode", mode, "--steps", "5", "--out", str(out), *extra],
                         capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"{procs} process(es)" in res.stdout
    return torch.load(out / f"weights-{mode}.pt", weights_only=True)


@pytest.mark.parametrize("mode, extra", [("nudged", []), ("equilibrium", ["--tol", "1e-12"]), ("joint", []),
                                         ("nudged", ["--batch-size", "16"])])
def test_two_gloo_processes_match_one_process_on_all_data(tmp_path, mode, extra):
    one, two = _run(tmp_path, mode, 1, extra), _run(tmp_path, mode, 2, extra)
    start = csnn.mlp(csnn.datasets.paraboloid(seed=0).sizes("1H"), seed=0).state_dict()
    assert one.keys() == two.keys()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-3                                             # training did change the weights
    if "--batch-size" in extra:   # minibatches: each update uses the union of the ranks' minibatches, not one process's
        return
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-10


def test_without_a_process_group_everything_is_local():
    g = {"w": torch.tensor([1.0, 2.0])}
    assert csnn.distributed.union_mean(g, 3) == g
    assert csnn.distributed.all_sum([g["w"]])[0] is g["w"]
    assert csnn.distributed.union_count(5) == 5
