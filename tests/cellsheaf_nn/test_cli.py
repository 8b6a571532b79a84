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


# ---------------------------------------------------------------------------- your own model on your own data


def _blob_data(n: int = 24, seed: int = 0):
    """Three separable classes in 2-d: inputs (n, 2) and class indices (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=F64)
    return centres[y] + 0.3 * torch.randn(n, 2, dtype=F64, generator=g), y


def test_train_own_model_on_npz_and_csv(tmp_path, capsys):
    X, y = _blob_data()
    np.savez(tmp_path / "train.npz", X=X.numpy(), y=y.numpy())
    cli.save_model(tmp_path / "net.pt", cli.ArchitectureSpec(sizes=[2, 8, 3], output="softmax"),
                   csnn.mlp([2, 8, 3], output="softmax", seed=1))
    code, out, err = in_process(capsys, "train", "--model", str(tmp_path / "net.pt"), "--data",
                                str(tmp_path / "train.npz"), "--steps", "30", "--out", str(tmp_path / "o"))
    assert code == 0, err
    line = out.splitlines()[0]
    assert line.startswith("sheaf training (nudged) on train.npz [2, 8, 3]: 30 steps")  # nudged is the default
    assert "train accuracy" in line
    hist = json.loads((tmp_path / "o" / "history.json").read_text())
    assert len(hist["train_acc"]) == len(hist["step"]) and hist["train_loss"][-1] < hist["train_loss"][0]
    assert float(line.split("train accuracy ")[1].split(" -> ")[1][:5]) == pytest.approx(hist["train_acc"][-1],
                                                                                           abs=1e-3)
    trained = cli.load_model(tmp_path / "o" / "model.pt")
    acc = float((trained(X).argmax(1) == y).double().mean())
    assert acc == pytest.approx(hist["train_acc"][-1])
    # the same data as csv with a named label column, by SGD: the same accuracy definition
    header = "a,label,b"
    rows = np.column_stack([X[:, 0].numpy(), y.numpy(), X[:, 1].numpy()])
    np.savetxt(tmp_path / "train.csv", rows, delimiter=",", header=header, comments="")
    code, out, err = in_process(capsys, "train", "--model", str(tmp_path / "net.pt"), "--data",
                                str(tmp_path / "train.csv"), "--label", "label", "--method", "sgd", "--steps", "5",
                                "--out", str(tmp_path / "c"))
    assert code == 0, err
    assert out.startswith("sgd training on train.csv [2, 8, 3]: 5 steps") and "train accuracy" in out


def test_train_x_y_files_regression_with_config_and_validation(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    X = torch.rand(20, 3, dtype=F64, generator=g)
    Y = X.sum(1)
    np.save(tmp_path / "X.npy", X.numpy())
    np.save(tmp_path / "y.npy", Y.numpy())  # 1-d targets: one column
    torch.save({"X": X[:6], "y": Y[:6, None]}, tmp_path / "val.pt")
    (tmp_path / "cfg.json").write_text(json.dumps({
        "model": {"sizes": [3, 4, 1]}, "data": {"x": "X.npy", "y": "y.npy"}, "val_data": "val.pt",
        "steps": 10, "options": {"mode": "joint", "dt": 0.02, "loss": "mse"}}))
    code, out, err = in_process(capsys, "train", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert out.startswith("sheaf training (joint) on X.npy [3, 4, 1]: 10 steps") and "test loss" in out
    assert "accuracy" not in out  # regression
    hist = json.loads((tmp_path / "o" / "history.json").read_text())
    assert len(hist["val_loss"]) == len(hist["step"]) and not hist["train_acc"]


NET_MODULE = '''
import torch
import cellsheaf_nn as csnn


class Cube(torch.nn.Module):
    """An operation with no built-in compiler: registered below."""

    def forward(self, x):
        return x ** 3


@csnn.register(Cube, override=True)
def compile_cube(b, module, x):
    import cellsheaf as cs
    return b.activation(x, cs.maps.Function(lambda v: v ** 3, x.dim, x.dim))


class Net(torch.nn.Module):
    def __init__(self, width=4, n_in=2):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(n_in, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CubeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.cube = torch.nn.Linear(2, 2), Cube()

    def forward(self, x):
        return self.cube(self.fc(x))
'''


def test_train_a_class_from_a_py_file_and_reload_only_with_import(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = "cli_user_net_a"
    monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / f"{name}.py").write_text(NET_MODULE)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 2, dtype=F64, generator=g)
    np.savetxt(tmp_path / "d.csv", np.column_stack([X.numpy(), X.sum(1).numpy()]), delimiter=",")
    (tmp_path / "cfg.json").write_text(json.dumps({"model": {"class": f"{name}.py:Net", "kwargs": {"width": 3}},
                                                   "data": "d.csv", "steps": 5, "method": "sgd"}))
    code, out, err = in_process(capsys, "train", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "sgd training on d.csv Net: 5 steps" in out
    saved = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
    assert saved["architecture"]["class"] == f"{name}:Net" and saved["architecture"]["kwargs"] == {"width": 3}
    model = cli.load_model(tmp_path / "o" / "model.pt")  # its module is imported (by the config) in this process
    assert type(model).__name__ == "Net" and model.fc1.weight.shape == (3, 2)
    # in a fresh process the module is not imported: a model file never imports code by itself
    monkeypatch.delitem(sys.modules, name)
    msg = _user_error(capsys, "compile", str(tmp_path / "o" / "model.pt"))
    assert f"needs class Net from module '{name}', which is not imported" in msg
    code, out, err = in_process(capsys, "compile", str(tmp_path / "o" / "model.pt"), "--import",
                                str(tmp_path / f"{name}.py"))
    assert code == 0, err


def test_import_registers_custom_ops_on_every_subcommand(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = "cli_user_ops_b"
    monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / f"{name}.py").write_text(NET_MODULE)
    msg = _user_error(capsys, "compile", f"{name}:CubeNet")  # not on the path: not importable by name
    assert f"cannot import module '{name}'" in msg
    code, out, err = in_process(capsys, "compile", f"{name}:CubeNet", "--import", str(tmp_path / f"{name}.py"))
    assert code == 0, err
    assert "3 vertices" in out
    np.savetxt(tmp_path / "x.csv", np.array([[0.5, -1.0], [2.0, 0.25]]), delimiter=",")
    code, out, err = in_process(capsys, "infer", f"{name}:CubeNet", str(tmp_path / "x.csv"), "--import",
                                str(tmp_path / f"{name}.py"))
    assert code == 0, err
    module = sys.modules[name]
    model = module.CubeNet().double()  # built with no arguments: the default initialisation of torch
    assert np.loadtxt(out.splitlines(), delimiter=",", ndmin=2).shape == (2, 2)
    assert isinstance(model.cube, module.Cube)
    for cmd in (["compile", "m.json"], ["infer", "m.json", "x.csv"], ["diagnose", "m.json", "x.csv"],
                ["train", "--steps", "1"], ["demo", "--quick"]):
        msg = _user_error(capsys, *cmd, "--import", "no_such_module_xyz.ops")
        assert "cannot import module 'no_such_module_xyz.ops': no module named 'no_such_module_xyz'" in msg
    (tmp_path / "broken_mod_c.py").write_text("raise RuntimeError('boom')\n")
    msg = _user_error(capsys, "compile", "m.json", "--import", str(tmp_path / "broken_mod_c.py"))
    assert "importing" in msg and "broken_mod_c.py failed: RuntimeError: boom" in msg
    assert "broken_mod_c" not in sys.modules


class ScriptNet(torch.nn.Module):
    """Stands for a class defined in the user's script (module ``__main__``)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(x)


def test_pickled_model_of_a_script_class_gets_the_right_hint(tmp_path, capsys, monkeypatch):
    main_module = sys.modules["__main__"]
    monkeypatch.setattr(ScriptNet, "__module__", "__main__")
    monkeypatch.setattr(main_module, "ScriptNet", ScriptNet, raising=False)
    torch.save(ScriptNet(), tmp_path / "script.pt")
    monkeypatch.delattr(main_module, "ScriptNet")
    msg = _user_error(capsys, "compile", str(tmp_path / "script.pt"), "--trust-pickle")
    assert "was pickled from class ScriptNet defined in the script that saved it (module __main__)" in msg
    _, _, err = in_process(capsys, "compile", str(tmp_path / "script.pt"), "--trust-pickle")
    assert "move the class into a module file" in err and "--import" in err


def test_every_user_mistake_in_train_exits_2(tmp_path, capsys):
    X, y = _blob_data(12)
    np.savez(tmp_path / "d.npz", X=X.numpy(), y=y.numpy())
    np.savez(tmp_path / "keys.npz", inputs_wrong=X.numpy())
    np.save(tmp_path / "one.npy", X.numpy())
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,x\n")
    (tmp_path / "ok.csv").write_text("a,b,label\n1,2,0\n")
    np.savez(tmp_path / "wide.npz", X=np.ones((12, 5)), y=y.numpy())
    np.savez(tmp_path / "short.npz", X=X.numpy(), y=y.numpy()[:5])
    np.savez(tmp_path / "range.npz", X=X.numpy(), y=(y.numpy() + 3))
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps({"sizes": [2, 4, 3], "output": "softmax"}))
    base = ["train", "--model", str(spec), "--steps", "2", "--out", str(tmp_path / "o")]
    d = str(tmp_path / "d.npz")
    cases = {
        "--mode": (["--data", d, "--mode", "backprop"], None),  # argparse: exit 2
        "unknown loss": (["--data", d, "--loss", "hinge"], "unknown loss 'hinge'"),
        "loss fit": (["--data", d, "--loss", "bce"], "does not fit the model"),
        "missing": (["--data", str(tmp_path / "nope.npz")], "not found"),
        "keys": (["--data", str(tmp_path / "keys.npz")], "expected X and y"),
        "one array": (["--data", str(tmp_path / "one.npy")], "holds a single array"),
        "non-numeric": (["--data", str(tmp_path / "bad.csv")], "non-numeric entry"),
        "width": (["--data", str(tmp_path / "wide.npz")], "cannot run on the training inputs (5 columns)"),
        "rows": (["--data", str(tmp_path / "short.npz")], "12 inputs but 5 targets"),
        "range": (["--data", str(tmp_path / "range.npz")], "is not one of 0..2"),
        "label": (["--data", str(tmp_path / "ok.csv"), "--label", "species"], "no column named 'species'"),
        "x only": (["--x", str(tmp_path / "one.npy")], "give both x and y"),
        "steps": (["--data", d, "--steps", "0"], "steps: Input should be greater than 0"),
        "sgd mode": (["--data", d, "--method", "sgd", "--mode", "joint"], "--mode joint applies to method sheaf"),
    }
    torch.save(csnn.mlp([2, 3, 3]), tmp_path / "pickled.pt")
    for label, (extra, expected) in cases.items():
        if expected is None:
            with pytest.raises(SystemExit) as exc:
                cli.main(base + extra)
            assert exc.value.code == 2, label
            capsys.readouterr()
            continue
        msg = _user_error(capsys, *base, *extra)
        assert expected in msg, (label, msg)
    assert "is a pickled Python object" in _user_error(capsys, "train", "--model", str(tmp_path / "pickled.pt"),
                                                        "--data", d, "--out", str(tmp_path / "o"))
    assert "no model to train" in _user_error(capsys, "train", "--data", d, "--out", str(tmp_path / "o"))
    (tmp_path / "both.json").write_text(json.dumps({"task": "blobs", "data": "d.npz"}))
    assert "give either task ('blobs') or data" in _user_error(capsys, "train", str(tmp_path / "both.json"))
    (tmp_path / "div.json").write_text(json.dumps({"task": "paraboloid", "n_train": 20, "steps": 30,
                                                   "model": {"sizes": [2, 3, 1]},
                                                   "options": {"mode": "joint", "dt": 1e6}}))
    assert "training diverged" in _user_error(capsys, "train", str(tmp_path / "div.json"), "--out",
                                              str(tmp_path / "o"))


def test_loss_in_options_works_or_names_the_duplicate(tmp_path, capsys):
    cfg = {"task": "circular", "n_train": 30, "steps": 3, "model": {"sizes": [2, 4, 1], "output": "sigmoid"}}
    (tmp_path / "ok.json").write_text(json.dumps({**cfg, "options": {"loss": "bce", "lr": 0.05}}))
    code, out, err = in_process(capsys, "train", str(tmp_path / "ok.json"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "train accuracy" in out and "test accuracy" in out
    (tmp_path / "same.json").write_text(json.dumps({**cfg, "loss": "bce", "options": {"loss": "bce"}}))
    code, _, err = in_process(capsys, "train", str(tmp_path / "same.json"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    (tmp_path / "dup.json").write_text(json.dumps({**cfg, "loss": "bce", "options": {"loss": "mse"}}))
    msg = _user_error(capsys, "train", str(tmp_path / "dup.json"), "--out", str(tmp_path / "o"))
    assert "loss is given twice: loss='bce' and options.loss='mse'" in msg
    (tmp_path / "prog.json").write_text(json.dumps({**cfg, "options": {"progress": True}}))
    msg = _user_error(capsys, "train", str(tmp_path / "prog.json"), "--out", str(tmp_path / "o"))
    assert "options.progress is set by the command" in msg


def test_progress_bar_shows_the_loss_and_stays(tmp_path, capsys):
    cfg = cli.TrainConfig(task="paraboloid", n_train=20, steps=4, model={"sizes": [2, 3, 1]})
    cli.train_from_config(cfg, tmp_path, progress=True)
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\r")[-1]  # what is left on the line when the bar closes
    assert "100%" in last and "4/4" in last and "loss=" in last  # leave=True: not erased


def test_diagnose_labels_as_class_indices(tmp_path, capsys):
    X, y = _blob_data(9)
    model = csnn.mlp([2, 5, 3], output="softmax", seed=0)
    cli.save_model(tmp_path / "net.pt", cli.ArchitectureSpec(sizes=[2, 5, 3], output="softmax"), model)
    np.savetxt(tmp_path / "x.csv", X.numpy(), delimiter=",")
    np.savetxt(tmp_path / "idx.csv", y.numpy(), delimiter=",")
    np.savetxt(tmp_path / "onehot.csv", torch.nn.functional.one_hot(y, 3).numpy(), delimiter=",")
    tables = []
    for labels in ("idx.csv", "onehot.csv"):
        code, _, err = in_process(capsys, "diagnose", str(tmp_path / "net.pt"), str(tmp_path / "x.csv"),
                                  "--labels", str(tmp_path / labels), "--out", str(tmp_path / labels[:-4]))
        assert code == 0, err
        tables.append(json.loads((tmp_path / labels[:-4] / "pinned_discord.json").read_text()))
    assert tables[0] == tables[1]
    ns = csnn.compile(model)
    direct = csnn.diagnostics.pinned_discord(ns, X, y).table()  # the Python API takes class indices too
    assert direct["total"][0] == pytest.approx(tables[0]["total"][0], rel=1e-12)
    np.savetxt(tmp_path / "bad.csv", np.array([0.5, 1, 2, 0, 1, 2, 0, 1, 2]), delimiter=",")
    msg = _user_error(capsys, "diagnose", str(tmp_path / "net.pt"), str(tmp_path / "x.csv"), "--labels",
                      str(tmp_path / "bad.csv"), "--out", str(tmp_path / "d"))
    assert "0.5 is not one of 0..2" in msg
