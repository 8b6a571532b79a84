"""The ``cellsheaf-nn`` command: look at a network through its sheaf from the shell.

Subcommands
-----------
``demo``      no arguments: train a small network on built-in data, compile it,
              diffuse to the forward pass, pin a hidden neuron, train with local
              updates, print a report and write figures into a folder.
``compile``   a saved torch model or a JSON architecture spec → sheaf summary and JSON spec.
``infer``     run a model as a sheaf on inputs from a file (with optional pins).
``diagnose``  spectral and discord report plus figures.
``train``     a JSON training config → a trained model, its history and figures.

User mistakes (missing or unreadable files, specs failing validation, folders
that cannot be written, inputs of the wrong width) end with a one-line message,
a hint and exit code 2; ``--debug`` shows the traceback instead.

Examples
--------
>>> from cellsheaf_nn.cli import main
>>> main(["compile", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from torch import nn

__all__ = ["main", "build_parser", "UserError", "ArchitectureSpec", "TrainConfig", "load_model", "load_array",
           "save_array", "output_folder", "run_demo"]

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2
OUTPUTS = ("identity", "sigmoid", "softmax", "tanh")
TASKS = ("paraboloid", "saddle", "circular", "blobs", "digits")


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line with a hint, never as a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


# ---------------------------------------------------------------------------- specs


class ArchitectureSpec(BaseModel):
    """A ReLU MLP described in JSON: ``{"sizes": [2, 30, 1], "output": "identity", "seed": 0}``.

    ``weights`` optionally names a ``state_dict`` file (``torch.save(model.state_dict(), path)``,
    relative to the spec's folder) to load into the network.
    """

    model_config = ConfigDict(extra="forbid")

    sizes: list[PositiveInt] = Field(min_length=2, description="layer widths [n_in, n_1, ..., n_out]")
    output: Literal["identity", "sigmoid", "softmax", "tanh"] = "identity"
    seed: int = 0
    dtype: Literal["float64", "float32"] = "float64"
    weights: str | None = None

    def build(self, base: Path) -> nn.Module:
        """The He-initialised network (with the weights loaded, if given)."""
        from .train import mlp

        model = mlp(self.sizes, output=self.output, seed=self.seed, dtype=getattr(torch, self.dtype))
        if self.weights is not None:
            path = base / self.weights
            state = _torch_load(path, "weights file", weights_only=True)
            if not isinstance(state, dict):
                raise UserError(f"weights file {path} holds a {type(state).__name__}, not a state dict",
                                "save weights with torch.save(model.state_dict(), path)")
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                first = str(err).strip().splitlines()
                raise UserError(f"weights file {path} does not fit sizes {self.sizes}: "
                                f"{first[1].strip() if len(first) > 1 else first[0]}",
                                "check the sizes in the spec against the saved model") from None
        return model


class TrainConfig(BaseModel):
    """What ``cellsheaf-nn train`` reads: a task, an architecture and a training method.

    Example: ``{"task": "paraboloid", "method": "sheaf", "steps": 2000}``. Without
    ``model`` the task's architecture of depth ``depth`` is used. ``options``
    are passed on to `cellsheaf_nn.train.SheafTrainer` (``method="sheaf"``,
    e.g. ``mode``, ``dt``, ``init``) or `cellsheaf_nn.train.train_sgd`
    (``method="sgd"``, e.g. ``optimizer``, ``lr``); ``eval_every`` defaults to
    a twentieth of the steps.
    """

    model_config = ConfigDict(extra="forbid")

    task: Literal["paraboloid", "saddle", "circular", "blobs", "digits"] = "paraboloid"
    depth: Literal["1H", "2H"] = "1H"
    model: ArchitectureSpec | None = None
    method: Literal["sheaf", "sgd"] = "sheaf"
    steps: PositiveInt = 1000
    seed: int = 0
    n_train: PositiveInt | None = Field(None, description="use only the first n_train training points")
    options: dict[str, Any] = Field(default_factory=dict)


def _validation_message(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (and {len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return f"{what} fails validation: " + "; ".join(parts) + more


def _read_spec(path: Path, cls: type[BaseModel], what: str) -> BaseModel:
    text = _read_text(path, what)
    try:
        return cls.model_validate_json(text)
    except ValidationError as err:
        if any(e["type"] == "json_invalid" for e in err.errors()):
            raise UserError(f"{what} {path} is not valid JSON: {err.errors()[0]['msg']}",
                            "check the file's syntax (e.g. with python -m json.tool)") from None
        fields = ", ".join(cls.model_fields)
        raise UserError(_validation_message(err, f"{what} {path}"), f"the fields are: {fields}") from None


# ---------------------------------------------------------------------------- files


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise UserError(f"{what} {path} not found", "check the path")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file", "give the path of a file")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {what} {path}: {err}", "check the file and its permissions") from None


def _torch_load(path: Path, what: str, weights_only: bool) -> Any:
    if not path.exists():
        raise UserError(f"{what} {path} not found", "check the path")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file", "give the path of a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, UnicodeDecodeError,
            AttributeError, ModuleNotFoundError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read {what} {path}: not a torch file ({reason[:160]})",
                        "save models with torch.save(model, path), or describe one in a JSON architecture spec "
                        "(.json)") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err}", "check the file and its permissions") from None


MODEL_KIND = "cellsheaf_nn.model"


def save_model(path: str | Path, spec: ArchitectureSpec, model: nn.Module) -> Path:
    """Save ``model`` in the safe format: its architecture spec and its state dict (plain data, no code).

    Written atomically (`cellsheaf_nn.checkpoint`); `load_model` reads it back without unpickling code.
    """
    from .checkpoint import write_checkpoint

    path = Path(path)
    arch = spec.model_dump(exclude={"weights"})
    write_checkpoint(path, {"architecture": arch, "state_dict": {k: v.detach().cpu() for k, v in
                                                                  model.state_dict().items()}}, kind=MODEL_KIND)
    return path


def load_model(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """A torch module from a JSON `ArchitectureSpec` (``.json``), a model saved by `save_model` (what
    ``cellsheaf-nn train`` writes), or — only with ``trust_pickle=True`` — a ``torch.save``-d module.

    The first two are plain data. A ``torch.save``-d module is a pickle: loading it runs code from the
    file, so it is refused unless ``trust_pickle`` says you trust the file.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _read_spec(path, ArchitectureSpec, "architecture spec").build(path.parent)
    obj = _safe_or_trusted_load(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == MODEL_KIND:
        return _model_from_checkpoint(path, obj)
    if isinstance(obj, dict):
        raise UserError(f"model file {path} holds a state dict (the weights only), not a model",
                        "save the whole module with torch.save(model, path), or write a JSON architecture spec "
                        'with "weights" naming the state dict file')
    if not isinstance(obj, nn.Module):
        raise UserError(f"model file {path} holds a {type(obj).__name__}, not a torch.nn.Module",
                        "save a model with torch.save(model, path)")
    return obj.eval()


def _safe_or_trusted_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; a file that needs more (pickled code) only with trust."""
    if not path.exists():
        raise UserError(f"model file {path} not found", "check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported operand" in str(err):  # garbage; anything else names a Python object it refused
            raise UserError(f"cannot read model file {path}: not a torch file", "check the file") from None
    except Exception:  # noqa: BLE001 - whatever a broken file raises, it is reported by _torch_load below
        return _torch_load(path, "model file", weights_only=True)
    if not trust_pickle:
        raise UserError(f"model file {path} is a pickled Python object; loading it would run code from the file, "
                        "so it is refused (pass --trust-pickle only if you trust the file)",
                        "or save the model safely: a JSON architecture spec with a state dict, or the model.pt "
                        "that cellsheaf-nn train writes")
    return _torch_load(path, "model file", weights_only=False)


def _model_from_checkpoint(path: Path, obj: dict) -> nn.Module:
    """The module described by a `save_model` file (architecture spec + state dict)."""
    try:
        spec = ArchitectureSpec.model_validate(obj.get("architecture"))
    except ValidationError as err:
        raise UserError(_validation_message(err, f"the architecture in model file {path}"),
                        "save it again with cellsheaf-nn train") from None
    model = spec.build(path.parent)
    try:
        model.load_state_dict(obj.get("state_dict") or {})
    except (RuntimeError, TypeError) as err:
        raise UserError(f"model file {path}: the weights do not fit its architecture "
                        f"({str(err).strip().splitlines()[0]})", "save it again with cellsheaf-nn train") from None
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise UserError(f"model file {path} has NaN or Inf weights", "retrain with a smaller learning rate")
    return model.eval()


def _compile(model: nn.Module):
    from . import compile as compile_model
    from .compile import CompileError
    from .ops import UnsupportedOpError

    try:
        return compile_model(model)
    except (CompileError, UnsupportedOpError) as err:
        cause = str(err).strip().splitlines()[0].split(". Supported:")[0]
        raise UserError(f"cannot compile the model: {cause}",
                        "register an op compiler for it (docs/extending.md); cellsheaf_nn.supported_ops() lists "
                        "the built-in ones") from None


def load_array(path: str | Path, what: str = "inputs", width: int | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A 2-d float tensor from ``.csv`` (optional header line), ``.npy``, ``.pt``/``.pth`` or ``.json``.

    ``width`` checks the number of columns (the model's input width for
    ``what="inputs"``, its output width otherwise). A 1-d file is one column
    when ``width == 1`` and otherwise one row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        data = _torch_load(path, what + " file", weights_only=True)
    elif suffix == ".npy":
        if not path.exists():
            raise UserError(f"{what} file {path} not found", "check the path")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {what} file {path}: {err}", "write it with numpy.save") from None
    elif suffix == ".json":
        try:
            data = json.loads(_read_text(path, what + " file"))
        except json.JSONDecodeError as err:
            raise UserError(f"{what} file {path} is not valid JSON: {err}", "write a list of rows") from None
    elif suffix in (".csv", ".txt"):
        text = _read_text(path, what + " file").strip().splitlines()
        rows = [r for r in text if r.strip() and not r.lstrip().startswith("#")]
        try:
            float(rows[0].split(",")[0]) if rows else None
        except ValueError:
            rows = rows[1:]  # a header line
        try:
            data = [[float(v) for v in r.split(",")] for r in rows]
        except ValueError as err:
            raise UserError(f"{what} file {path} has a non-numeric entry ({err})",
                            "write comma-separated numbers, one sample per line") from None
        if len({len(r) for r in data}) > 1:
            raise UserError(f"{what} file {path} has rows of different lengths", "write one sample per line")
    else:
        raise UserError(f"{what} file {path} has an unknown format {suffix or '(no suffix)'}",
                        "use .csv, .npy, .pt or .json")
    try:
        t = torch.as_tensor(np.asarray(data, dtype=np.float64) if not isinstance(data, torch.Tensor) else data)
    except (TypeError, ValueError) as err:
        raise UserError(f"{what} file {path} does not hold a numeric array ({err})", "write a 2-d array") from None
    if t.dim() == 1:
        t = t.unsqueeze(1) if width == 1 else t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] == 0:
        raise UserError(f"{what} in {path} have shape {tuple(t.shape)}; expected a non-empty 2-d array (B, d)",
                        "one sample per row")
    if width is not None and t.shape[1] != width:
        role = "takes" if what == "inputs" else "outputs"
        hint = f"give one sample of {width} values per row" + ("" if what == "inputs" else
                                                               " (one-hot rows for class labels)")
        raise UserError(f"{what} in {path} have {t.shape[1]} columns but the model {role} {width}", hint)
    t = t.to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{what} in {path} contain NaN or Inf values", "clean the data first")
    return t


def save_array(path: str | Path, t: torch.Tensor) -> Path:
    """Write a 2-d tensor as ``.csv``, ``.npy``, ``.pt`` or ``.json`` (by suffix)."""
    path = Path(path)
    output_folder(path.parent)
    a = t.detach().cpu().numpy()
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            np.savetxt(path, a.reshape(a.shape[0], -1), delimiter=",", fmt="%.17g")
        elif suffix == ".npy":
            np.save(path, a)
        elif suffix in (".pt", ".pth"):
            torch.save(t.detach().cpu(), path)
        elif suffix == ".json":
            path.write_text(json.dumps(a.tolist()))
        else:
            raise UserError(f"output file {path} has an unknown format {suffix or '(no suffix)'}",
                            "use .csv, .npy, .pt or .json")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}", "choose another output path") from None
    return path


def output_folder(path: str | Path) -> Path:
    """Create ``path`` (and parents) and check it can be written; a `UserError` says why not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".cellsheaf-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to folder {path}: {err.strerror or err}",
                        "choose another folder with --out") from None
    return path


# ---------------------------------------------------------------------------- small helpers


@contextmanager
def _stage(name: str, progress: bool) -> Iterator[None]:
    """Announce a stage on stderr (with its duration) when progress is shown."""
    t0 = time.perf_counter()
    if progress:
        print(f"… {name}", file=sys.stderr, flush=True)
    yield
    if progress:
        print(f"  done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def sheaf_summary(ns) -> str:
    """A few lines describing a compiled network's sheaf."""
    S = ns.sheaf
    x = torch.zeros(ns.n_in, dtype=ns.dtype)
    n_fixed = ns.boundary(x).resolve(S).fixed.numel()
    kinds: dict[str, int] = {}
    for e in ns.edge_info.values():
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    lines = [
        f"network   {ns.n_in} inputs -> {ns.n_out} outputs (output vertex {ns.output!r})",
        f"sheaf     {len(S.vertices)} vertices, {len(S.edges)} edges "
        f"({', '.join(f'{n} {k}' for k, n in kinds.items())})",
        f"cochains  C0={S.C0} ({S.C0 - n_fixed} free, {n_fixed} stubborn), C1={S.C1}",
        "vertices  " + ", ".join(f"{v}[{S.dim(v)}]" for v in S.vertices),
    ]
    try:
        lines.append(f"det δ_Ω   {ns.coboundary_determinant(x):.6g} at x = 0 (Lemma 3.2)")
    except ValueError as err:
        lines.append(f"det δ_Ω   not square ({err})")
    return "\n".join(lines)


def _parse_pin(text: str) -> tuple[str, list[int], list[float]]:
    """``VERTEX:COORDS=VALUES`` (e.g. ``a1:0,2=1.5,0``) -> (vertex, coords, values)."""
    try:
        left, right = text.split("=", 1)
        vertex, coords = left.split(":", 1)
        idx = [int(c) for c in coords.split(",")]
        vals = [float(v) for v in right.split(",")]
    except ValueError:
        raise UserError(f"cannot read pin {text!r}", "write VERTEX:COORDS=VALUES, e.g. a1:0=1.5 or a1:0,2=1.5,0") \
            from None
    if len(vals) == 1:
        vals = vals * len(idx)
    if len(vals) != len(idx):
        raise UserError(f"pin {text!r} gives {len(vals)} values for {len(idx)} coordinates",
                        "give one value per coordinate, or one for all")
    return vertex, idx, vals


def _apply_pins(ns, pins: Sequence[str], strength: float | None) -> None:
    for text in pins:
        vertex, idx, vals = _parse_pin(text)
        try:
            ns.pin(vertex, idx, torch.tensor(vals, dtype=ns.dtype), strength=strength)
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(f"cannot pin {text!r}: {str(err).strip(chr(39))}",
                            f"vertices are {', '.join(ns.layout)}") from None


class _NoFigures:
    """Stands in for `cellsheaf_nn.plots` without matplotlib: every figure is skipped."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _figures(progress: bool):
    """`cellsheaf_nn.plots`, or a stand-in that skips figures when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:  # pragma: no cover - matplotlib is an optional extra
        print("(matplotlib is not installed: no figures; pip install 'cellsheaf[plot]')", file=sys.stderr)
        return _NoFigures()
    from . import plots

    return plots


# ---------------------------------------------------------------------------- commands


def _cmd_compile(args) -> int:
    model = load_model(args.model, args.trust_pickle)
    ns = _compile(model)
    print(sheaf_summary(ns))
    if args.spec_out:
        path = Path(args.spec_out)
        output_folder(path.parent)
        try:
            path.write_text(ns.sheaf.to_spec().model_dump_json(indent=1))
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}", "choose another path") from None
        print(f"spec      written to {path}")
    return EXIT_OK


def _cmd_infer(args) -> int:
    ns = _compile(load_model(args.model, args.trust_pickle))
    X = load_array(args.inputs, "inputs", width=ns.n_in, dtype=ns.dtype)
    _apply_pins(ns, args.pin, args.strength)
    from .neural import ConvergenceError

    t0 = time.perf_counter()
    try:
        y, state = ns.infer(X, method=args.method, return_state=True, check=not args.allow_unconverged,
                            max_steps=args.max_steps, tol=args.tol)
    except ConvergenceError as err:
        raise UserError(str(err).split(" (pass")[0], "raise --max-steps, or pass --allow-unconverged to keep the "
                        "last state") from None
    info = state.info
    print(f"{len(X)} inputs, method {info.method}: converged={info.converged}, iterations={info.iterations}, "
          f"max energy {float(info.energy.max()) if info.energy is not None else 0.0:.3g}, "
          f"{time.perf_counter() - t0:.2f}s", file=sys.stderr)
    y = y.reshape(len(X), -1)
    if args.out:
        print(f"outputs written to {save_array(args.out, y)}", file=sys.stderr)
    else:
        np.savetxt(sys.stdout, y.detach().numpy(), delimiter=",", fmt="%.10g")
    return EXIT_OK


def _cmd_diagnose(args) -> int:
    from . import diagnostics as dg

    out = output_folder(args.out)
    ns = _compile(load_model(args.model, args.trust_pickle))
    X = load_array(args.inputs, "inputs", width=ns.n_in, dtype=ns.dtype)
    Y = load_array(args.labels, "labels", width=ns.n_out, dtype=ns.dtype) if args.labels else None
    if Y is not None and len(Y) != len(X):
        raise UserError(f"{len(Y)} labels for {len(X)} inputs", "give one label row per input row")
    progress = _want_progress(args)
    with _stage("spectra and discord", progress):
        summary = dg.spectral_summary(ns, X)
        pinned = dg.pinned_discord(ns, X, Y) if Y is not None else None
        text = dg.report(ns, X, Y, summary=summary, pinned=pinned)
    (out / "report.txt").write_text(text + "\n")
    (out / "spectrum.json").write_text(json.dumps(summary.as_dict(), indent=1))
    if pinned is not None:
        (out / "pinned_discord.json").write_text(json.dumps(pinned.table(), indent=1))
    figs = _figures(progress)
    with _stage("figures", progress):
        figs.sheaf_graph(ns, path=out / "sheaf_graph.png")
        figs.spectral_summary(summary, path=out / "spectrum.png")
        if pinned is not None:
            figs.discord_residuals(dg.residuals(ns, pinned.state), path=out / "residuals.png",
                                   title="residuals with the output pinned to the labels")
    print(text)
    files = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
    print(f"written to {out}/: {', '.join(files)}")
    return EXIT_OK


def _task_data(cfg: TrainConfig):
    from . import datasets

    try:
        task = datasets.load(cfg.task, seed=cfg.seed)
    except ImportError as err:
        raise UserError(f"task {cfg.task!r} needs an optional dependency: {err}", "pip install 'cellsheaf[data]'") \
            from None
    X, Y = task.X_train, task.Y_train
    if cfg.n_train is not None:
        X, Y = X[: cfg.n_train], Y[: cfg.n_train]
    return task, X, Y


def train_from_config(cfg: TrainConfig, out: Path, progress: bool, base: Path = Path(".")) -> str:
    """Train as ``cfg`` says; write ``model.pt``, ``history.json`` and figures into ``out``; return a summary."""
    from . import train as tr

    task, X, Y = _task_data(cfg)
    spec = cfg.model or ArchitectureSpec(sizes=task.sizes(cfg.depth), output=task.output, seed=cfg.seed)
    if spec.sizes[0] != X.shape[1] or spec.sizes[-1] != (task.n_classes if task.kind == "multiclass" else 1):
        raise UserError(f"model sizes {spec.sizes} do not fit task {cfg.task!r} "
                        f"({X.shape[1]} inputs, {task.n_classes or 1} outputs)",
                        "fix model.sizes, or leave model out to use the task's architecture")
    model = spec.build(base)
    options = dict(cfg.options)
    eval_every = options.pop("eval_every", max(1, cfg.steps // 20))
    t0 = time.perf_counter()
    try:
        if cfg.method == "sgd":
            hist = tr.train_sgd(model, X, Y, loss=task.loss, steps=cfg.steps, X_val=task.X_test,
                                Y_val=task.Y_test, seed=cfg.seed, progress=progress, eval_every=eval_every,
                                **options)
        else:
            ns = _compile(model)
            trainer = tr.SheafTrainer(ns, loss=task.loss, seed=cfg.seed, **options)
            hist = trainer.fit(X, Y, steps=cfg.steps, X_val=task.X_test, Y_val=task.Y_test, progress=progress,
                               eval_every=eval_every)
            model = ns.to_module()
    except (TypeError, ValueError) as err:
        if isinstance(err, FloatingPointError):
            raise
        raise UserError(f"bad training option: {err}", "see the documentation of the trainer for its options") \
            from None
    wall = time.perf_counter() - t0
    save_model(out / "model.pt", spec, model)
    (out / "history.json").write_text(json.dumps(hist.to_dict()))
    figs = _figures(progress)
    figs.training_curves({"train loss": hist.train_loss, "test loss": hist.val_loss, "step": hist.step}, x="step",
                         path=out / "training.png", title=f"{cfg.method} training on {cfg.task}")
    if X.shape[1] == 2:
        with torch.no_grad():
            figs.decision_surface(model, task.X_test, task.Y_test, path=out / "surface.png",
                                  title=f"{cfg.task}: {cfg.method}-trained network")
    val = f", test loss {hist.val_loss[-1]:.4g}" if hist.val_loss else ""
    return (f"{cfg.method} training on {cfg.task} {spec.sizes}: {cfg.steps} steps in {wall:.1f}s, "
            f"train loss {hist.train_loss[0]:.4g} -> {hist.train_loss[-1]:.4g}{val}")


def _cmd_train(args) -> int:
    cfg = _read_spec(Path(args.config), TrainConfig, "training config")
    out = output_folder(args.out)
    print(train_from_config(cfg, out, _want_progress(args), base=Path(args.config).parent))
    print(f"model, history and figures written to {out}/")
    return EXIT_OK


# ---------------------------------------------------------------------------- the demo


def run_demo(out: Path, seed: int = 0, progress: bool = False, quick: bool = False) -> str:
    """The demo behind ``cellsheaf-nn demo``: returns its report; figures go into ``out``.

    1. train a [2, 16, 1] network by SGD on the paraboloid task (built in);
    2. compile it: the harmonic extension equals the forward pass, det δ_Ω = 1;
    3. integrate the heat equation (18) from random stalks to the forward pass;
    4. pin a hidden neuron and watch the whole network, upstream too, adjust;
    5. train a fresh network by the joint dynamics (26), every weight updated from its own edge;
    6. spectral and pinned-discord diagnostics of the SGD-trained network.

    The networks are small, so torch runs single-threaded here (faster than
    contending threads on small tensors); the previous setting is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(out, seed, progress, quick)
    finally:
        torch.set_num_threads(threads)


def _demo(out: Path, seed: int, progress: bool, quick: bool) -> str:
    from . import datasets, diagnostics as dg, train as tr

    figs = _figures(progress)
    lines: list[str] = []
    say = lines.append
    g = torch.Generator().manual_seed(seed)
    task = datasets.paraboloid(seed=seed)
    sizes = [2, 16, 1]

    with _stage("training a small network by SGD", progress):
        steps = 100 if quick else 1500
        model = tr.mlp(sizes, seed=seed)
        hist = tr.train_sgd(model, task.X_train, task.Y_train, loss="mse", steps=steps, optimizer="adam", lr=0.01,
                            X_val=task.X_test, Y_val=task.Y_test, eval_every=steps // 10, seed=seed,
                            progress=progress)
        model.requires_grad_(False)
    say(f"1. SGD-trained {sizes} on the paraboloid task ({steps} Adam steps): test loss {hist.val_loss[-1]:.4f}")

    with _stage("compiling it into a sheaf", progress):
        ns = _compile(model)
        X = task.X_test
        gap = float((ns.infer(X) - model(X)).abs().max())
        det = ns.coboundary_determinant(X[0])
    say(f"2. compiled: vertices {ns.sheaf.vertices}, edges {ns.sheaf.edges}")
    say(f"   harmonic extension vs forward pass on {len(X)} inputs: max |difference| = {gap:.1e}; "
        f"det δ_Ω = {det:.6g} (Lemma 3.2)")
    figs.sheaf_graph(ns, path=out / "sheaf_graph.png", title=f"the sheaf of a {sizes} network")

    with _stage("diffusing from random stalks", progress):
        Xd = X[:6]
        steps = 600 if quick else 6000
        t, path = dg.diffusion_path(ns, Xd, steps=steps, every=steps // 300, generator=g)
        trace = dg.discord_trace(ns, path)
        out_traj = path[:, 0, ns.coords(ns.output)]
        fwd = model(Xd)
        err = float((path[-1][:, ns.coords(ns.output)] - fwd).abs().max())
    start, end = float(sum(v[0] for v in trace.values())), float(sum(v[-1] for v in trace.values()))
    say(f"3. heat equation (18), Euler from random stalks, {steps} steps to t = {float(t[-1]):.0f}: "
        f"discord {start:.3g} -> {end:.1e}, outputs within {err:.1e} of the forward pass (Thm 4.1)")
    figs.discord_convergence(trace, t, output=out_traj, forward=fwd[0], ns=ns, path=out / "convergence.png",
                             title="diffusion reaches the forward pass")
    z1 = path[:, :, ns.coords("z1", [0, 1])]
    figs.phase_plane(z1, fixed_point=path[-1][:, ns.coords("z1", [0, 1])], labels=("$z^{(1)}_0$", "$z^{(1)}_1$"),
                     path=out / "phase_plane.png", title="pre-activations during diffusion")

    with _stage("pinning a hidden neuron", progress):
        x1 = X[:1]
        _, base = ns.infer(x1, return_state=True)
        j = int(base["a1"][0].argmax())
        pin = ns.pin("a1", [j], torch.zeros(1, dtype=ns.dtype))
        try:
            y_pin, pinned = ns.infer(x1, return_state=True, check=False)
        finally:
            ns.unpin(pin)
        dz1 = float((pinned["z1"] - base["z1"]).abs().max())
    say(f"4. hard pin of neuron a1[{j}] ({float(base['a1'][0, j]):.3f} -> 0): output "
        f"{float(base[ns.output][0, 0]):.4f} -> {float(y_pin[0, 0]):.4f}, and upstream the pre-activations z1 "
        f"move by up to {dz1:.3f}: the constraint spreads both ways (Sec. 5.1)")

    with _stage("training with local updates (joint dynamics)", progress):
        steps, n = (100, 50) if quick else (2000, 300)
        ns_local = _compile(tr.mlp(sizes, seed=seed + 1))
        trainer = tr.SheafTrainer(ns_local, mode="joint", loss="mse", dt=0.02, init="forward_pass", seed=seed)
        lhist = trainer.fit(task.X_train[:n], task.Y_train[:n], X_val=task.X_test, Y_val=task.Y_test, steps=steps,
                            eval_every=steps // 20, progress=progress)
    say(f"5. sheaf training of a fresh {sizes} (joint dynamics (26), {steps} Euler steps; each weight moves by "
        f"its own edge's discord): test loss {lhist.val_loss[0]:.3f} -> {lhist.val_loss[-1]:.3f}")
    figs.training_curves({"sheaf-trained: test loss": lhist.val_loss, "step": lhist.step}, x="step",
                         path=out / "training.png", title="sheaf training (joint dynamics)")
    figs.decision_surface(ns_local.infer, task.X_test, task.Y_test, path=out / "surface.png",
                          title="sheaf-trained regression surface")

    with _stage("spectral and discord diagnostics", progress):
        Xs, Ys = task.X_test[: 20 if quick else 50], task.Y_test[: 20 if quick else 50]
        summary = dg.spectral_summary(ns, Xs)
        s = summary.as_dict()
        pinned = dg.pinned_discord(ns, Xs, Ys)
    say(f"6. spectrum of L[Ω,Ω] over {len(Xs)} inputs: λ₁ median {s['lambda_1']['median']:.4f}, "
        f"λ_max median {s['lambda_max']['median']:.3f}, condition {s['condition']['median']:.1f}; "
        f"Fiedler vector on {s['fiedler_block']} ({s['fiedler_energy'][s['fiedler_block']]:.0%})")
    table = pinned.table()
    say("   discord with the output pinned to the labels (mean per input, Table 3): "
        + ", ".join(f"{k} {m:.2g}" for k, (m, _) in table.items()))
    figs.spectral_summary(summary, path=out / "spectrum.png", title="spectrum of L[Ω,Ω] of the SGD-trained network")
    figs.discord_residuals(dg.residuals(ns, pinned.state), path=out / "residuals.png",
                           title="per-coordinate residuals with the output pinned to the labels")
    return "\n".join(lines)


def _cmd_demo(args) -> int:
    out = output_folder(args.out)
    t0 = time.perf_counter()
    report = run_demo(out, seed=args.seed, progress=_want_progress(args), quick=args.quick)
    (out / "report.txt").write_text(report + "\n")
    print(report)
    print(f"figures and report written to {out.resolve()}/ ({time.perf_counter() - t0:.0f}s)")
    return EXIT_OK


# ---------------------------------------------------------------------------- parser and entry point


def _want_progress(args) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cellsheaf-nn``."""
    p = argparse.ArgumentParser(
        prog="cellsheaf-nn",
        description="Look at a neural network through its cellular sheaf (Bosca & Ghrist).",
        epilog="Start with: cellsheaf-nn demo",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=description)
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        c.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
        c.add_argument("--threads", type=int, default=1, metavar="N",
                       help="torch CPU threads (default: %(default)s; small networks run fastest on one)")
        return c

    model_help = ("a JSON architecture spec, a model.pt written by cellsheaf-nn train, or (with --trust-pickle) "
                  "a torch.save-d module")
    trust_help = ("allow loading a torch.save-d module: unpickling runs code from the file, so only for files "
                  "you trust (refused by default)")
    c = command("demo", "run the built-in demonstration (no arguments needed)",
                "Train a small network, compile it, diffuse to the forward pass, pin a neuron, train with local "
                "updates, print a report and write figures.")
    c.add_argument("--out", default="cellsheaf-nn-demo", help="folder for figures and report "
                   "(default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    c.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    c.set_defaults(run=_cmd_demo)

    c = command("compile", "compile a model and print its sheaf", "Compile a model into a sheaf; print a summary "
                "and optionally write the sheaf's JSON spec.")
    c.add_argument("model", help=model_help)
    c.add_argument("--trust-pickle", action="store_true", help=trust_help)
    c.add_argument("--spec-out", help="write the sheaf's JSON spec here")
    c.set_defaults(run=_cmd_compile)

    c = command("infer", "run a model as a sheaf on inputs", "Infer outputs by solving on the sheaf, optionally "
                "with pinned neurons; outputs go to --out or stdout (CSV).")
    c.add_argument("model", help=model_help)
    c.add_argument("--trust-pickle", action="store_true", help=trust_help)
    c.add_argument("inputs", help="inputs, one sample per row (.csv, .npy, .pt or .json)")
    c.add_argument("--method", default="auto", choices=["auto", "propagate", "newton", "euler", "diffusion"],
                   help="solver (default: %(default)s)")
    c.add_argument("--pin", action="append", default=[], metavar="VERTEX:COORDS=VALUES",
                   help="pin neurons, e.g. a1:0=1.5 (repeatable)")
    c.add_argument("--strength", type=float, default=None, help="soft pins with this strength γ (default: hard)")
    c.add_argument("--max-steps", type=int, default=None, help="step / iteration cap of the iterative methods")
    c.add_argument("--tol", type=float, default=None, help="gradient-norm tolerance of the iterative methods")
    c.add_argument("--allow-unconverged", action="store_true", help="return the last state if the solver stalls")
    c.add_argument("--out", help="write the outputs here (.csv, .npy, .pt, .json)")
    c.set_defaults(run=_cmd_infer)

    c = command("diagnose", "spectral and discord diagnostics", "Spectrum of L[Ω,Ω] at each input's activation "
                "pattern, eigenvector block energies, and (with labels) discord with the output pinned.")
    c.add_argument("model", help=model_help)
    c.add_argument("--trust-pickle", action="store_true", help=trust_help)
    c.add_argument("inputs", help="inputs, one sample per row (.csv, .npy, .pt or .json)")
    c.add_argument("--labels", help="targets for pinned discord, one row per input")
    c.add_argument("--out", default="cellsheaf-nn-diagnose", help="folder for report and figures "
                   "(default: %(default)s)")
    c.set_defaults(run=_cmd_diagnose)

    c = command("train", "train from a JSON config", "Train a network as a config file says: "
                '{"task": "paraboloid", "method": "sheaf" | "sgd", "steps": 1000, "depth": "1H", '
                '"model": {"sizes": [...], "output": ...}, "options": {...}}.')
    c.add_argument("config", help="a JSON training config")
    c.add_argument("--out", default="cellsheaf-nn-train", help="folder for model, history and figures "
                   "(default: %(default)s)")
    c.set_defaults(run=_cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cellsheaf-nn``; returns the exit code (0 ok, 2 user mistake, 1 internal error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER
    if args.threads < 1:
        print(f"cellsheaf-nn {args.command}: error: --threads must be at least 1, got {args.threads}",
              file=sys.stderr)
        return EXIT_USER
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"cellsheaf-nn {args.command}: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command-line tool
        if args.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"cellsheaf-nn {args.command}: {type(err).__name__}: {msg}", file=sys.stderr)
        print("hint: rerun with --debug for the traceback", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
