"""The cellsheaf-nn command end to end in a temp folder: subprocess runs of every subcommand and error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cellsheaf as cs
import cellsheaf_nn as csnn
from cellsheaf_nn import cli

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m cellsheaf_nn ARGS`` in ``cwd`` (the installed package, as a user runs it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cellsheaf_nn", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def model_files(tmp_path):
    """A trained-looking [2, 5, 1] model saved whole, as a state dict, and as a JSON spec with weights."""
    from cellsheaf_nn.train import mlp

    model = mlp([2, 5, 1], seed=3)
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-0.5, 0.5, 5, dtype=F64))
    cli.save_model(tmp_path / "model.pt", cli.ArchitectureSpec(sizes=[2, 5, 1]), model)  # the safe format
    torch.save(model, tmp_path / "pickled.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "arch.json").write_text(json.dumps({"sizes": [2, 5, 1], "weights": "weights.pt"}))
    X = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    np.savetxt(tmp_path / "x.csv", X.numpy(), delimiter=",", header="x1,x2", comments="")
    np.savetxt(tmp_path / "y.csv", model(X).detach().numpy() + 0.2, delimiter=",")
    return model, X


# ---------------------------------------------------------------------------- subcommands


def test_help_of_every_command(capsys):
    for cmd in ("demo", "compile", "infer", "diagnose", "train"):
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: cellsheaf-nn {cmd}" in capsys.readouterr().out
    code, out, _ = in_process(capsys)
    assert code == 2 and "Start with: cellsheaf-nn demo" in out


def test_compile_spec_and_saved_model_agree(tmp_path, model_files, capsys):
    model, _ = model_files
    code, out, _ = in_process(capsys, "compile", str(tmp_path / "arch.json"), "--spec-out",
                              str(tmp_path / "out" / "sheaf.json"))
    assert code == 0
    assert "4 vertices, 3 edges (2 weight, 1 act)" in out and "det δ_Ω   1" in out
    S = cs.Sheaf.from_spec((tmp_path / "out" / "sheaf.json").read_text())
    assert S == csnn.compile(model).sheaf
    code, out2, _ = in_process(capsys, "compile", str(tmp_path / "model.pt"))
    assert code == 0 and out2.splitlines()[1] == out.splitlines()[1]


def test_infer_matches_model_and_pins(tmp_path, model_files, capsys):
    model, X = model_files
    code, _, err = in_process(capsys, "infer", str(tmp_path / "model.pt"), str(tmp_path / "x.csv"),
                              "--out", str(tmp_path / "y_hat.csv"))
    assert code == 0 and "converged=True" in err
    y = np.loadtxt(tmp_path / "y_hat.csv", delimiter=",", ndmin=2)
    np.testing.assert_allclose(y, model(X).detach().numpy(), atol=1e-12)
    code, out, _ = in_process(capsys, "infer", str(tmp_path / "arch.json"), str(tmp_path / "x.csv"),
                              "--pin", "a1:0,1=0.5")
    assert code == 0
    ns = csnn.compile(model)
    ns.pin("a1", [0, 1], torch.tensor([0.5, 0.5], dtype=F64))
    np.testing.assert_allclose(np.loadtxt(out.splitlines(), delimiter=",", ndmin=2),
                               ns.infer(X, check=False).numpy(), atol=1e-8)


def test_diagnose_writes_report_and_figures(tmp_path, model_files, capsys):
    code, out, err = in_process(capsys, "diagnose", str(tmp_path / "model.pt"), str(tmp_path / "x.csv"),
                                "--labels", str(tmp_path / "y.csv"), "--out", str(tmp_path / "diag"))
    assert code == 0, err
    assert "lambda_1" in out and "discord with the output pinned" in out
    for name in ("report.txt", "spectrum.json", "pinned_discord.json", "sheaf_graph.png", "spectrum.png",
                 "residuals.png"):
        assert (tmp_path / "diag" / name).stat().st_size > 0, name
    table = json.loads((tmp_path / "diag" / "pinned_discord.json").read_text())
    assert set(table) == {"weight:z1", "act:a1", "weight:z2", "total"} and table["total"][0] > 0


def test_train_configs(tmp_path, capsys):
    cfg = {"task": "paraboloid", "steps": 40, "n_train": 40, "model": {"sizes": [2, 6, 1]}}
    (tmp_path / "sgd.json").write_text(json.dumps({**cfg, "method": "sgd",
                                                   "options": {"optimizer": "adam", "lr": 0.01}}))
    code, out, _ = in_process(capsys, "train", str(tmp_path / "sgd.json"), "--out", str(tmp_path / "sgd"))
    assert code == 0 and "sgd training on paraboloid [2, 6, 1]: 40 steps" in out
    hist = json.loads((tmp_path / "sgd" / "history.json").read_text())
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    model = cli.load_model(tmp_path / "sgd" / "model.pt")  # train's output reloads without unpickling code
    assert isinstance(model, torch.nn.Module) and (tmp_path / "sgd" / "surface.png").exists()
    (tmp_path / "sheaf.json").write_text(json.dumps({**cfg, "method": "sheaf",
                                                     "options": {"mode": "joint", "dt": 0.02}}))
    code, out, _ = in_process(capsys, "train", str(tmp_path / "sheaf.json"), "--out", str(tmp_path / "sheaf"))
    assert code == 0 and "sheaf training" in out
    hist = json.loads((tmp_path / "sheaf" / "history.json").read_text())
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    trained = cli.load_model(tmp_path / "sheaf" / "model.pt")
    assert trained[0].weight.shape == (6, 2)
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "method": "sheaf", "options": {"mdoe": "joint"}}))
    msg = _user_error(capsys, "train", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad"))
    assert "bad training option" in msg and "mdoe" in msg


def test_demo_quick_end_to_end(tmp_path):
    res = run("demo", "--quick", "--out", "demo", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [ln[:2] for ln in lines if ln[:1].isdigit()] == ["1.", "2.", "3.", "4.", "5.", "6."]
    assert "det δ_Ω = 1" in res.stdout
    for name in ("report.txt", "sheaf_graph.png", "convergence.png", "phase_plane.png", "training.png",
                 "surface.png", "spectrum.png", "residuals.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name
    assert "written to" in lines[-1] and str((tmp_path / "demo").resolve()) in lines[-1]


# ---------------------------------------------------------------------------- what mistakes get


def _user_error(capsys, *args) -> str:
    code, _, err = in_process(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: ") and "Traceback" not in err
    return lines[0]


def test_unreadable_and_wrong_format_model_files(tmp_path, model_files, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01 definitely not a torch file")
    msg = _user_error(capsys, "compile", str(tmp_path / "garbage.pt"))
    assert "cannot read model file" in msg and "not a torch file" in msg
    assert "not found" in _user_error(capsys, "compile", str(tmp_path / "missing.pt"))
    assert "holds a state dict" in _user_error(capsys, "compile", str(tmp_path / "weights.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "holds a Tensor, not a torch.nn.Module" in _user_error(capsys, "compile", str(tmp_path / "tensor.pt"))
    assert "is a folder" in _user_error(capsys, "compile", str(tmp_path))


class CumSum(torch.nn.Module):
    """An operation the compiler has no op compiler for."""

    def forward(self, x):
        return x.cumsum(-1)


def test_model_with_unsupported_op(tmp_path, capsys):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3), CumSum()).double(), tmp_path / "odd.pt")
    msg = _user_error(capsys, "compile", str(tmp_path / "odd.pt"), "--trust-pickle")
    assert msg.startswith("cellsheaf-nn compile: error: cannot compile the model:") and "cumsum" in msg
    assert "Supported" not in msg  # the list of supported ops is left to the hint


def test_spec_validation_errors_name_the_field(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"sizes": [2, 0, 1], "outptu": "sigmoid"}))
    msg = _user_error(capsys, "compile", str(tmp_path / "bad.json"))
    assert "fails validation" in msg and "sizes.1: Input should be greater than 0" in msg and "outptu" in msg
    (tmp_path / "broken.json").write_text("{sizes: [2, 1]")
    assert "is not valid JSON" in _user_error(capsys, "compile", str(tmp_path / "broken.json"))
    (tmp_path / "cfg.json").write_text(json.dumps({"task": "mnist", "steps": -1}))
    msg = _user_error(capsys, "train", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "o"))
    assert "task:" in msg and "steps:" in msg


def test_unwritable_output_and_wrong_input_width(tmp_path, model_files, capsys):
    (tmp_path / "file").write_text("")
    msg = _user_error(capsys, "diagnose", str(tmp_path / "model.pt"), str(tmp_path / "x.csv"),
                      "--out", str(tmp_path / "file" / "sub"))
    assert msg.startswith("cellsheaf-nn diagnose: error: cannot write to folder")
    np.savetxt(tmp_path / "x3.csv", np.ones((4, 3)), delimiter=",")
    msg = _user_error(capsys, "infer", str(tmp_path / "model.pt"), str(tmp_path / "x3.csv"))
    assert "have 3 columns but the model takes 2" in msg
    msg = _user_error(capsys, "diagnose", str(tmp_path / "model.pt"), str(tmp_path / "x.csv"), "--labels",
                      str(tmp_path / "x.csv"), "--out", str(tmp_path / "d"))
    assert "labels in" in msg and "have 2 columns but the model outputs 1" in msg
    (tmp_path / "x.txt2").write_text("1,2")
    assert "unknown format" in _user_error(capsys, "infer", str(tmp_path / "model.pt"), str(tmp_path / "x.txt2"))
    (tmp_path / "nan.csv").write_text("1,nan\n")
    assert "NaN" in _user_error(capsys, "infer", str(tmp_path / "model.pt"), str(tmp_path / "nan.csv"))
    msg = _user_error(capsys, "infer", str(tmp_path / "model.pt"), str(tmp_path / "x.csv"), "--method", "diffusion",
                      "--max-steps", "3")
    assert "did not converge" in msg
    assert "cannot read pin" in _user_error(capsys, "infer", str(tmp_path / "model.pt"), str(tmp_path / "x.csv"),
                                            "--pin", "a1=3")
    assert "cannot pin 'q9:0=1'" in _user_error(capsys, "infer", str(tmp_path / "model.pt"),
                                                str(tmp_path / "x.csv"), "--pin", "q9:0=1")


def test_subprocess_error_has_no_traceback_unless_debug(tmp_path, capsys):
    res = run("infer", "nothing.pt", "x.csv", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[0] == "cellsheaf-nn infer: error: model file nothing.pt not found"
    with pytest.raises(cli.UserError, match="not found"):
        cli.main(["--debug", "infer", str(tmp_path / "nothing.pt"), "x.csv"])


class _Writes:
    """A pickle whose loading writes a file (as a malicious model file would run any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_pickled_models_load_only_when_trusted(tmp_path, model_files, capsys):
    model, X = model_files
    evil = tmp_path / "evil.pt"
    torch.save(_Writes(tmp_path / "pwned.txt"), evil)
    for command in (["compile", str(evil)], ["infer", str(evil), str(tmp_path / "x.csv")],
                    ["diagnose", str(evil), str(tmp_path / "x.csv"), "--out", str(tmp_path / "d")]):
        msg = _user_error(capsys, *command)
        assert f"model file {evil} is a pickled Python object" in msg and "refused" in msg
        assert not (tmp_path / "pwned.txt").exists()
    assert "--trust-pickle" in _user_error(capsys, "compile", str(tmp_path / "pickled.pt"))
    code, out, _ = in_process(capsys, "compile", str(tmp_path / "pickled.pt"), "--trust-pickle")
    assert code == 0 and "4 vertices" in out
    torch.testing.assert_close(cli.load_model(tmp_path / "model.pt")(X), model(X))


def test_threads_option_and_bad_mode_exit_code(tmp_path, capsys):
    cfg = {"task": "paraboloid", "steps": 2, "n_train": 20, "model": {"sizes": [2, 3, 1]}, "method": "sheaf"}
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "options": {"mode": "backprop"}}))
    code, _, err = in_process(capsys, "train", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o"),
                              "--threads", "1")
    assert code == 2 and "mode must be one of" in err
    before = torch.get_num_threads()
    code, _, err = in_process(capsys, "compile", str(tmp_path / "nothing.json"), "--threads", "0")
    assert code == 2 and "--threads" in err and torch.get_num_threads() == before
