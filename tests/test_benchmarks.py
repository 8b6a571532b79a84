"""The benchmark entries that print device figures run through the same code on the CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_figures_run_on_the_cpu(capsys):
    figures = _load("bench_distributed").device_figures("cpu", repeats=1)   # the GPU entry, device="cpu"
    out = capsys.readouterr().out
    assert "CPU ns.infer / model(x)" in out and "CPU nudged update / backprop step" in out
    assert set(figures) == {"infer_ms", "forward_ms", "nudged_ms", "backprop_ms"}
    assert all(v > 0 for v in figures.values())


def test_sync_audit_cases_run():
    from cellsheaf import syncs

    cases = _load("bench_syncs").cases()
    with syncs.count_syncs() as n:
        iterations = cases["cg (16 right-hand sides, n=400)"]()
    assert iterations > 0 and n[0] > 0
    assert torch.Tensor.item.__name__ == "item"   # the counter unwrapped the methods it wrapped


def test_speed_updates_run():
    bench = _load("bench_train")
    task = bench.datasets.paraboloid(seed=0)
    X, Y = task.X_train[:16], task.Y_train[:16]
    for mode, kw in [("nudged", dict(optimizer="adam", lr=0.02)),
                     ("equilibrium", dict(optimizer="adam", lr=0.02, init="forward_pass")),
                     ("joint", dict(alpha=1.0, beta=1 / 16, dt=0.005))]:
        bench._sheaf_update(task, "1H", mode, 0, X, Y, **kw)()   # one timed update of --speed, as it runs there


def test_infer_zoo_models_load_from_outside_the_repository(tmp_path):
    # `python benchmarks/bench_infer.py` puts benchmarks/ on the path, not the repository: the zoo still loads
    code = (f"import runpy; m = runpy.run_path({str(ROOT / 'benchmarks' / 'bench_infer.py')!r}); "
            "print([name for name, _, _ in m['zoo_models']()])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).resolve() != ROOT and "site-packages" in p)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LeNet CNN" in res.stdout
