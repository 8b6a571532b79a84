"""The ``cellsheaf-nn`` command: look at a network through its sheaf from the shell.

Subcommands
-----------
``demo``      no arguments: train a small network on built-in data, compile it,
              diffuse to the forward pass, pin a hidden neuron, train with local
              updates, print a report and write figures into a folder.
``compile``   a model (file or class) → sheaf summary and JSON spec.
``infer``     run a model as a sheaf on inputs from a file (with optional pins).
``diagnose``  spectral and discord report plus figures.
``train``     a model on a built-in task or on your data files → the trained model, its history and figures.

Every command takes ``--import MODULE`` (repeatable: modules that register op
compilers or define model classes), ``--threads N`` (default 1) and
``--no-progress``. Model files are plain data (a JSON spec, or the architecture
and state dict that ``train`` writes); a pickled module loads only with
``--trust-pickle``. User mistakes (missing or unreadable files, specs or data
failing validation, data that do not fit the model, unknown options, modules
that fail to import, a diverging training) end with a one-line message, a hint
and exit code 2; exit code 1 means an internal error. ``--debug`` shows the
traceback instead.

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
import re
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PositiveInt, Tag, ValidationError,
                      model_validator)
from torch import nn

__all__ = ["main", "build_parser", "UserError", "ArchitectureSpec", "ModuleSpec", "DataSpec", "TrainConfig",
           "save_model", "load_model", "import_user_module", "load_array", "load_dataset", "as_targets", "save_array",
           "output_folder", "train_from_config", "run_demo"]

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

    def build(self, base: Path, allow_import: bool = True) -> nn.Module:
        """The He-initialised network (with the weights loaded, if given)."""
        from .train import mlp

        model = mlp(self.sizes, output=self.output, seed=self.seed, dtype=getattr(torch, self.dtype))
        if self.weights is not None:
            _load_weights(model, base / self.weights, f"sizes {self.sizes}")
        return model

    def describe(self, model: nn.Module) -> str:
        """A short name of the architecture for reports: its sizes."""
        return str(self.sizes)


class ModuleSpec(BaseModel):
    """A model class of your own: ``{"class": "mypkg.models:Net", "kwargs": {"width": 16}}``.

    ``class`` is ``MODULE:CLASS`` (an importable module) or ``FILE.py:CLASS`` (a file, imported as the
    module named after it); the model is ``CLASS(**kwargs)``, converted to ``dtype`` (``null`` keeps the
    class's own), with the state dict ``weights`` (relative to the spec's folder) loaded if given.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: str = Field(alias="class", pattern=r"^.+:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$",
                        description="MODULE:CLASS or FILE.py:CLASS")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float64", "float32"] | None = "float64"
    weights: str | None = None

    def build(self, base: Path, allow_import: bool = True) -> nn.Module:
        """``CLASS(**kwargs)``; ``allow_import=False`` uses only modules imported already (``--import``)."""
        cls = _resolve_class(self.class_, base, allow_import)
        try:
            model = cls(**self.kwargs)
        except Exception as err:  # noqa: BLE001 - the user's constructor: any error is theirs, shown in one line
            raise UserError(f"cannot build the model {self.class_}(**{self.kwargs}): {_first_line(err)}",
                            'check the class and its "kwargs" (--debug shows the traceback)') from err
        if self.dtype is not None:
            model = model.to(getattr(torch, self.dtype))
        if self.weights is not None:
            _load_weights(model, base / self.weights, f"class {self.class_}")
        return model

    def describe(self, model: nn.Module) -> str:
        """A short name of the architecture for reports: the class name."""
        return type(model).__name__


ModelSpec = ArchitectureSpec | ModuleSpec


def _model_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "file"
    if isinstance(value, ModuleSpec) or (isinstance(value, dict) and ("class" in value or "class_" in value)):
        return "class"
    if isinstance(value, (ArchitectureSpec, dict)):
        return "mlp"
    return None


class DataSpec(BaseModel):
    """Where data come from: one file holding inputs and targets, or one file each.

    ``{"path": "train.npz"}`` (arrays ``X`` and ``y``), ``{"path": "train.pt"}`` (a dict with tensors
    ``X`` and ``y``, or a pair ``(X, y)``), ``{"path": "train.csv", "label": "species"}`` (one sample per
    row; ``label`` names the target column(s) by header name or index, default the last column) or
    ``{"x": "X.npy", "y": "y.npy"}`` (each ``.csv``, ``.npy``, ``.pt`` or ``.json``). A plain string is a
    ``path``. Targets in one column for a model with several outputs are class indices.
    """

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    x: str | None = None
    y: str | None = None
    label: str | int | list[str | int] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.path is None) == (self.x is None and self.y is None):
            raise ValueError("give either path (one file with inputs and targets) or x and y (two files)")
        if self.path is None and (self.x is None or self.y is None):
            raise ValueError(f"give both x and y files (only {'x' if self.y is None else 'y'} is given)")
        if self.label is not None and (self.path is None or Path(self.path).suffix.lower() != ".csv"):
            raise ValueError("label selects target columns of a .csv path only")
        return self


def _path_to_data(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


_DataField = Annotated[DataSpec | None, BeforeValidator(_path_to_data)]


class TrainConfig(BaseModel):
    """What ``cellsheaf-nn train`` reads: data (a built-in task or your files), a model and a method.

    Example: ``{"task": "paraboloid", "method": "sheaf", "steps": 2000}``, or
    ``{"model": "model.pt", "data": "train.npz", "val_data": "test.npz"}``. ``model`` is a
    model reference (a model file or ``MODULE:CLASS``, as on the command line), an MLP
    ([`ArchitectureSpec`][cellsheaf_nn.cli.ArchitectureSpec]) or a class ([`ModuleSpec`][cellsheaf_nn.cli.ModuleSpec]); without it a task's architecture of depth
    ``depth`` is used. ``data``/``val_data``: a [`DataSpec`][cellsheaf_nn.cli.DataSpec] (or a file name) instead of ``task``.
    ``loss`` defaults to the task's, or to what fits the model's output (sigmoid ``bce``, softmax
    or class-index targets ``cross_entropy``, otherwise ``mse``). ``options`` are passed on to
    [`cellsheaf_nn.train.SheafTrainer`][cellsheaf_nn.train.SheafTrainer] (``method="sheaf"``, e.g. ``mode`` (default ``"nudged"``),
    ``dt``, ``init``) or [`cellsheaf_nn.train.train_sgd`][cellsheaf_nn.train.train_sgd] (``method="sgd"``, e.g. ``optimizer``,
    ``lr``); ``eval_every`` defaults to a twentieth of the steps. File paths are relative to the
    config's folder.
    """

    model_config = ConfigDict(extra="forbid")

    task: Literal["paraboloid", "saddle", "circular", "blobs", "digits"] | None = None
    depth: Literal["1H", "2H"] = "1H"
    model: Annotated[Annotated[ArchitectureSpec, Tag("mlp")] | Annotated[ModuleSpec, Tag("class")]
                     | Annotated[str, Tag("file")], Discriminator(_model_kind)] | None = None
    data: _DataField = None
    val_data: _DataField = None
    loss: str | None = None
    method: Literal["sheaf", "sgd"] = "sheaf"
    steps: PositiveInt = 1000
    seed: int = 0
    n_train: PositiveInt | None = Field(None, description="use only the first n_train training points")
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _task_or_data(self) -> "TrainConfig":
        if self.task is not None and self.data is not None:
            raise ValueError(f"give either task ({self.task!r}) or data, not both")
        if self.val_data is not None and self.data is None:
            raise ValueError("val_data goes with data (a task brings its own test set)")
        return self


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
                        "check the file; models are saved with cellsheaf_nn.cli.save_model or described in a JSON "
                        "spec (.json)") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err}", "check the file and its permissions") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _load_weights(model: nn.Module, path: Path, architecture: str) -> None:
    """Load the state dict saved at ``path`` into ``model`` (a `UserError` says what does not fit)."""
    state = _torch_load(path, "weights file", weights_only=True)
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} holds a {type(state).__name__}, not a state dict",
                        "save weights with torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UserError(f"weights file {path} does not fit {architecture}: "
                        f"{first[1].strip() if len(first) > 1 else first[0]}",
                        "check the architecture in the spec against the saved model") from None


# ---------------------------------------------------------------------------- user code: --import, model classes

CLASS_REF = re.compile(r"^(?P<module>.+\.py|[A-Za-z_][\w.]*):(?P<qualname>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


def import_user_module(name: str) -> ModuleType:
    """Import a module by dotted name (``mypkg.ops``) or from a ``.py`` file, as ``--import`` does.

    A file ``path/to/ops.py`` becomes the module ``ops`` (its folder goes on ``sys.path``, as for a
    script). Importing runs the module's code: that is how it registers op compilers
    ([`cellsheaf_nn.register`][cellsheaf_nn.ops.register]) or defines model classes. Any failure is a [`UserError`][cellsheaf_nn.cli.UserError] naming the module.
    """
    if name.endswith(".py") or "/" in name or os.sep in name:
        return _import_file(Path(name).expanduser())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise UserError(f"cannot import module {name!r}: no module named {err.name!r}",
                            "install it, put its folder on PYTHONPATH, or give the path of its .py file") from None
        raise UserError(f"importing module {name!r} failed: {_first_line(err)}",
                        "install what it needs (--debug shows the traceback)") from err
    except Exception as err:  # noqa: BLE001 - the user's module: any error is theirs, named in one line
        raise UserError(f"importing module {name!r} failed: {type(err).__name__}: {_first_line(err)}",
                        "fix the module (--debug shows the traceback)") from err


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise UserError(f"cannot import {path}: file not found", "check the path of the .py file")
    name = path.stem
    if not name.isidentifier():
        raise UserError(f"cannot import {path}: {name!r} is not a valid module name",
                        "rename the file (letters, digits and underscores)")
    loaded = sys.modules.get(name)
    if loaded is not None:
        where = getattr(loaded, "__file__", None)
        if where is not None and Path(where).resolve() == path.resolve():
            return loaded
        raise UserError(f"cannot import {path} as module {name!r}: a module of that name is already loaded "
                        f"({where or 'built in'})", "rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: any error is theirs, named in one line
        del sys.modules[name]
        raise UserError(f"importing {path} failed: {type(err).__name__}: {_first_line(err)}",
                        "fix the file (--debug shows the traceback)") from err
    return module


def _resolve_class(ref: str, base: Path, allow_import: bool) -> type:
    """The ``nn.Module`` subclass named by ``MODULE:CLASS`` or ``FILE.py:CLASS``."""
    match = CLASS_REF.match(ref)
    if match is None:
        raise UserError(f"cannot read the class reference {ref!r}", "write MODULE:CLASS or FILE.py:CLASS")
    module_name, qualname = match["module"], match["qualname"]
    if module_name.endswith(".py"):
        file = base / Path(module_name).expanduser()
        if not allow_import:
            raise UserError(f"the model needs class {qualname} from the file {module_name}, which is not imported",
                            f"pass --import {file} if you trust that code")
        module = _import_file(file)
    elif module_name in sys.modules:
        module = sys.modules[module_name]
    elif allow_import:
        module = import_user_module(module_name)
    else:
        raise UserError(f"the model needs class {qualname} from module {module_name!r}, which is not imported "
                        "(a model file never imports code by itself)",
                        f"pass --import {module_name} (or --import path/to/{module_name.rsplit('.', 1)[-1]}.py) "
                        "if you trust that code")
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UserError(f"module {module.__name__!r} has no class {qualname!r}",
                            f"check the name after the colon in {ref!r}")
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise UserError(f"{ref} is not a torch.nn.Module subclass", "name a model class")
    return obj


# ---------------------------------------------------------------------------- model files

MODEL_KIND = "cellsheaf_nn.model"


def save_model(path: str | Path, spec: ModelSpec, model: nn.Module) -> Path:
    """Save ``model`` in the safe format: its architecture and its state dict (plain data, no code).

    ``spec`` is an [`ArchitectureSpec`][cellsheaf_nn.cli.ArchitectureSpec] (an MLP) or a [`ModuleSpec`][cellsheaf_nn.cli.ModuleSpec] (a class, stored as
    ``MODULE:CLASS`` of ``type(model)`` with its ``kwargs``). Written atomically
    ([`cellsheaf_nn.checkpoint`][cellsheaf_nn.checkpoint]); [`load_model`][cellsheaf_nn.cli.load_model] reads it back without unpickling anything.

    Examples
    --------
    >>> import tempfile, pathlib, torch
    >>> from cellsheaf_nn import cli, mlp
    >>> spec, path = cli.ArchitectureSpec(sizes=[2, 3, 1]), pathlib.Path(tempfile.mkdtemp()) / "model.pt"
    >>> _ = cli.save_model(path, spec, mlp([2, 3, 1], seed=0))
    >>> cli.load_model(path)[0].weight.shape
    torch.Size([3, 2])
    """
    from .checkpoint import write_checkpoint

    path = Path(path)
    arch = spec.model_dump(exclude={"weights"}, by_alias=True)
    if isinstance(spec, ModuleSpec):
        arch["class"] = f"{type(model).__module__}:{type(model).__qualname__}"
    write_checkpoint(path, {"architecture": arch, "state_dict": {k: v.detach().cpu() for k, v in
                                                                  model.state_dict().items()}}, kind=MODEL_KIND)
    return path


def load_model(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """A torch module from a model reference, as the commands take it.

    ``path`` is a JSON [`ArchitectureSpec`][cellsheaf_nn.cli.ArchitectureSpec] or [`ModuleSpec`][cellsheaf_nn.cli.ModuleSpec] (``.json``), a model saved by [`save_model`][cellsheaf_nn.cli.save_model]
    (what ``cellsheaf-nn train`` writes), ``MODULE:CLASS`` / ``FILE.py:CLASS`` (the class built with
    no arguments), or — only with ``trust_pickle=True`` — a ``torch.save``-d module. The first two are
    plain data: a saved model of a class of your own only uses modules imported already (``--import``).
    A ``torch.save``-d module is a pickle: loading it runs code from the file, so it is refused unless
    ``trust_pickle`` says you trust the file.
    """
    return _load_model(str(path), Path("."), trust_pickle)[0]


def _load_model(ref: str, base: Path, trust_pickle: bool) -> tuple[nn.Module, ModelSpec | None]:
    """The model a reference names and its architecture (``None`` for a pickled module)."""
    path = base / Path(ref).expanduser()
    if not path.exists() and CLASS_REF.match(ref) and path.suffix.lower() not in (".pt", ".pth", ".json"):
        spec = ModuleSpec.model_validate({"class": ref})
        return spec.build(base), spec
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(_read_text(path, "model spec"))
        except json.JSONDecodeError:
            raw = None  # _read_spec reports it
        is_class = isinstance(raw, dict) and "class" in raw
        spec = _read_spec(path, ModuleSpec if is_class else ArchitectureSpec,
                          "model spec" if is_class else "architecture spec")
        return spec.build(path.parent), spec
    obj = _safe_or_trusted_load(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == MODEL_KIND:
        return _model_from_checkpoint(path, obj)
    if isinstance(obj, dict):
        raise UserError(f"model file {path} holds a state dict (the weights only), not a model",
                        'write a JSON spec naming the architecture and "weights": the state dict file '
                        "(see the command-line docs)")
    if not isinstance(obj, nn.Module):
        raise UserError(f"model file {path} holds a {type(obj).__name__}, not a torch.nn.Module",
                        "save a model with cellsheaf_nn.cli.save_model, or describe it in a JSON spec")
    return obj.eval(), None


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
    return _unpickle_model(path)


def _unpickle_model(path: Path) -> Any:
    """``torch.load`` of a trusted pickle; a class the pickle cannot find gets the hint that fits."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except AttributeError as err:
        found = re.search(r"Can't get attribute '([\w.]+)' on <module '([\w.]+)'", str(err))
        if found and found[2].split(".")[-1] == "__main__":  # the script (or runner) that was running
            raise UserError(f"model file {path} was pickled from class {found[1]} defined in the script that saved "
                            "it (module __main__), so it cannot be loaded anywhere else",
                            "move the class into a module file (e.g. mynet.py), save model.state_dict(), and use "
                            '{"class": "mynet.py:' + found[1] + '", "weights": "weights.pt"} as the model, '
                            "or pass --import mynet.py to load a model file that needs it") from None
        if found:
            raise UserError(f"model file {path} needs class {found[1]} from module {found[2]!r}, which has no such "
                            "class", f"pass --import with the module that defines {found[1]}") from None
        return _torch_load(path, "model file", weights_only=False)
    except ModuleNotFoundError as err:
        raise UserError(f"model file {path} needs module {err.name!r} to unpickle, which cannot be imported",
                        f"pass --import {err.name} (or --import path/to/{(err.name or 'module').split('.')[-1]}.py)"
                        ", or put its folder on PYTHONPATH") from None
    except Exception:  # noqa: BLE001 - whatever a broken file raises, it is reported by _torch_load below
        return _torch_load(path, "model file", weights_only=False)


def _model_from_checkpoint(path: Path, obj: dict) -> tuple[nn.Module, ModelSpec]:
    """The module described by a `save_model` file (architecture + state dict)."""
    arch = obj.get("architecture")
    cls = ModuleSpec if isinstance(arch, dict) and "class" in arch else ArchitectureSpec
    try:
        spec = cls.model_validate(arch)
    except ValidationError as err:
        raise UserError(_validation_message(err, f"the architecture in model file {path}"),
                        "save it again with cellsheaf-nn train") from None
    model = spec.build(path.parent, allow_import=False)
    try:
        model.load_state_dict(obj.get("state_dict") or {})
    except (RuntimeError, TypeError) as err:
        raise UserError(f"model file {path}: the weights do not fit its architecture "
                        f"({str(err).strip().splitlines()[0]})", "save it again with cellsheaf-nn train") from None
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise UserError(f"model file {path} has NaN or Inf weights", "retrain with a smaller learning rate")
    return model.eval(), spec


def _compile(model: nn.Module, input_shape: tuple[int, ...] | None = None):
    from . import compile as compile_model
    from .compile import CompileError
    from .ops import UnsupportedOpError

    try:
        return compile_model(model, input_shape=input_shape)
    except (CompileError, UnsupportedOpError) as err:
        cause = str(err).strip().splitlines()[0].split(". Supported:")[0]
        raise UserError(f"cannot compile the model: {cause}",
                        "register an op compiler for it in a module and pass --import MODULE (see the docs page "
                        "Extending to a new architecture); cellsheaf_nn.supported_ops() lists the built-in ones") \
            from None


def _read_csv(path: Path, what: str) -> tuple[list[str] | None, np.ndarray]:
    """Comma-separated numbers, one sample per line; an optional header line; ``#`` comments."""
    lines = _read_text(path, what + " file").strip().splitlines()
    rows = [r for r in lines if r.strip() and not r.lstrip().startswith("#")]
    header = None
    if rows:
        try:
            float(rows[0].split(",")[0])
        except ValueError:
            header, rows = [h.strip() for h in rows[0].split(",")], rows[1:]
    try:
        data = [[float(v) for v in r.split(",")] for r in rows]
    except ValueError as err:
        raise UserError(f"{what} file {path} has a non-numeric entry ({err})",
                        "write comma-separated numbers, one sample per line") from None
    if len({len(r) for r in data} | ({len(header)} if header and data else set())) > 1:
        raise UserError(f"{what} file {path} has rows of different lengths", "write one sample per line")
    return header, np.asarray(data, dtype=np.float64).reshape(len(data), -1)


def _read_numeric(path: Path, what: str) -> torch.Tensor:
    """The array in a ``.csv``, ``.npy``, ``.pt``/``.pth`` or ``.json`` file as a float64 tensor (any shape)."""
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
        data = _read_csv(path, what)[1]
    else:
        raise UserError(f"{what} file {path} has an unknown format {suffix or '(no suffix)'}",
                        "use .csv, .npy, .pt or .json")
    return _numeric(data, path, what)


def _numeric(data: Any, path: Path, what: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor) and (data.is_complex() or data.dtype == torch.bool):
        raise UserError(f"{what} in {path} are {data.dtype}, not real numbers", "store real numbers")
    try:
        t = data.detach().to(torch.float64) if isinstance(data, torch.Tensor) else \
            torch.as_tensor(np.asarray(data, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise UserError(f"{what} file {path} does not hold a numeric array ({_first_line(err)})",
                        "write a 2-d array of real numbers") from None
    if t.numel() == 0 or t.dim() == 0:
        raise UserError(f"{what} in {path} have shape {tuple(t.shape)}; expected a non-empty 2-d array (B, d)",
                        "one sample per row")
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{what} in {path} contain NaN or Inf values", "clean the data first")
    return t


def load_array(path: str | Path, what: str = "inputs", width: int | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A 2-d float tensor from ``.csv`` (optional header line), ``.npy``, ``.pt``/``.pth`` or ``.json``.

    ``width`` checks the number of columns (the model's input width for
    ``what="inputs"``, its output width otherwise). A 1-d file is one column
    when ``width == 1`` and otherwise one row.
    """
    path = Path(path)
    t = _read_numeric(path, what)
    if t.dim() == 1:
        t = t.unsqueeze(1) if width == 1 else t.unsqueeze(0)
    return _checked_width(t, path, what, width).to(dtype)


def _checked_width(t: torch.Tensor, path: Path, what: str, width: int | None) -> torch.Tensor:
    if t.dim() != 2:
        raise UserError(f"{what} in {path} have shape {tuple(t.shape)}; expected a non-empty 2-d array (B, d)",
                        "one sample per row")
    if width is not None and t.shape[1] != width:
        role = "takes" if what == "inputs" else "outputs"
        hint = f"give one sample of {width} values per row" + ("" if what == "inputs" else
                                                               f" (or one class index 0..{width - 1} per row)")
        raise UserError(f"{what} in {path} have {t.shape[1]} columns but the model {role} {width}", hint)
    return t


def as_targets(t: torch.Tensor, n_out: int, path: Path | str = "", what: str = "targets",
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Targets for a model with ``n_out`` outputs: one column of integers ``0..n_out-1`` for a model with
    several outputs are class indices (an int64 ``(B,)`` tensor); anything else is ``(B, n_out)`` floats.

    Examples
    --------
    >>> import torch
    >>> from cellsheaf_nn.cli import as_targets
    >>> as_targets(torch.tensor([2.0, 0.0]), n_out=3)
    tensor([2, 0])
    """
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if n_out > 1 and t.dim() == 2 and t.shape[1] == 1:
        labels = t[:, 0]
        bad = (labels != labels.round()) | (labels < 0) | (labels >= n_out)
        if bool(bad.any()):
            raise UserError(f"{what} in {path} have one column, so they are class indices for a model with {n_out} "
                            f"outputs, but {float(labels[bad][0]):g} is not one of 0..{n_out - 1}",
                            f"give class indices 0..{n_out - 1}, or rows of {n_out} values (one-hot or "
                            "probabilities)")
        return labels.to(torch.int64)
    return _checked_width(t, Path(path), what, n_out).to(dtype)


def load_dataset(spec: DataSpec, base: Path = Path("."), what: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, d)`` and raw targets (float64, ``(B,)`` or ``(B, k)``) as a [`DataSpec`][cellsheaf_nn.cli.DataSpec] says."""
    if spec.path is None:
        X = _read_numeric(base / spec.x, f"{what} inputs")
        Y = _read_numeric(base / spec.y, f"{what} targets")
        where = f"{base / spec.x} and {base / spec.y}"
    else:
        path = base / spec.path
        X, Y = _read_pair(path, spec.label, what)
        where = str(path)
    X = _checked_width(X.unsqueeze(1) if X.dim() == 1 else X, Path(where), f"{what} inputs", None)
    if Y.dim() > 2:
        raise UserError(f"{what} targets in {where} have shape {tuple(Y.shape)}; expected (B,) or (B, k)",
                        "one target row per sample")
    if len(Y) != len(X):
        raise UserError(f"{what} data in {where}: {len(X)} inputs but {len(Y)} targets",
                        "give one target per input row")
    return X, Y


_X_KEYS, _Y_KEYS = ("X", "x", "inputs"), ("y", "Y", "targets", "labels")


def _read_pair(path: Path, label: str | int | list | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets from one ``.npz``, ``.pt`` or ``.csv`` file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, a = _read_csv(path, what + " data")
        cols = _label_columns(label, header, a.shape[1], path)
        keep = [c for c in range(a.shape[1]) if c not in cols]
        if not keep:
            raise UserError(f"{what} data {path}: no input columns left after the label columns",
                            "a csv file holds the inputs and the label column(s)")
        return _numeric(a[:, keep], path, what + " inputs"), _numeric(a[:, cols], path, what + " targets")
    if suffix == ".npz":
        if not path.exists():
            raise UserError(f"{what} data file {path} not found", "check the path")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise UserError(f"cannot read {what} data file {path}: {_first_line(err)}",
                            "write it with numpy.savez(path, X=inputs, y=targets)") from None
    elif suffix in (".pt", ".pth"):
        obj = _torch_load(path, what + " data file", weights_only=True)
        arrays = dict(zip(("X", "y"), obj)) if isinstance(obj, (tuple, list)) and len(obj) == 2 else obj
        if not isinstance(arrays, dict):
            raise UserError(f"{what} data file {path} holds a {type(obj).__name__}",
                            "save a dict: torch.save({'X': inputs, 'y': targets}, path)")
    elif suffix in (".npy", ".json", ".txt"):
        raise UserError(f"{what} data file {path} holds a single array, not inputs and targets",
                        "give the inputs and targets as two files (--x and --y), or one .npz, .pt or .csv file")
    else:
        raise UserError(f"{what} data file {path} has an unknown format {suffix or '(no suffix)'}",
                        "use .npz (X and y), .pt (a dict with X and y), .csv (a label column), or --x and --y")
    x_key = next((k for k in _X_KEYS if k in arrays), None)
    y_key = next((k for k in _Y_KEYS if k in arrays), None)
    if x_key is None or y_key is None:
        raise UserError(f"{what} data file {path} has entries {sorted(map(str, arrays))}; expected X and y",
                        "store the inputs as X and the targets as y")
    return _numeric(arrays[x_key], path, what + " inputs"), _numeric(arrays[y_key], path, what + " targets")


def _label_columns(label: str | int | list | None, header: list[str] | None, n: int, path: Path) -> list[int]:
    """Column indices of the label column(s) of a csv file (default: the last column)."""
    labels = [n - 1] if label is None else label if isinstance(label, list) else [label]
    cols = []
    for item in labels:
        if isinstance(item, str) and not item.lstrip("-").isdigit():
            if header is None or item not in header:
                raise UserError(f"data file {path} has no column named {item!r}" +
                                (f"; its columns are {', '.join(header)}" if header else " (no header line)"),
                                "give the label column's name (--label) or its index")
            cols.append(header.index(item))
        else:
            c = int(item)
            if not -n <= c < n:
                raise UserError(f"data file {path} has {n} columns; there is no column {c}",
                                "give the label column's index (0-based; -1 is the last) or its name")
            cols.append(c % n)
    return cols


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
    """Create ``path`` (and parents) and check it can be written; a [`UserError`][cellsheaf_nn.cli.UserError] says why not."""
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
    Y = as_targets(_read_numeric(Path(args.labels), "labels"), ns.n_out, args.labels, "labels", ns.dtype) \
        if args.labels else None
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


@dataclass
class _TrainingData:
    """What a model is trained on: a built-in task or the user's files (targets as the loss takes them)."""

    name: str
    X: torch.Tensor
    Y: torch.Tensor
    X_val: torch.Tensor | None
    Y_val: torch.Tensor | None
    task: Any = None


def _training_data(cfg: TrainConfig, base: Path) -> _TrainingData:
    from . import datasets

    if cfg.data is None:
        name = cfg.task or "paraboloid"
        try:
            task = datasets.load(name, seed=cfg.seed)
        except ImportError as err:
            raise UserError(f"task {name!r} needs an optional dependency: {err}", "pip install 'cellsheaf[data]'") \
                from None
        data = _TrainingData(name, task.X_train, task.Y_train, task.X_test, task.Y_test, task)
    else:
        X, Y = load_dataset(cfg.data, base)
        X_val, Y_val = load_dataset(cfg.val_data, base, "validation") if cfg.val_data is not None else (None, None)
        data = _TrainingData(Path(cfg.data.path or cfg.data.x).name, X, Y, X_val, Y_val)
    if cfg.n_train is not None:
        data.X, data.Y = data.X[: cfg.n_train], data.Y[: cfg.n_train]
    return data


def _training_model(cfg: TrainConfig, data: _TrainingData, base: Path,
                    trust_pickle: bool) -> tuple[nn.Module, ModelSpec | None]:
    if cfg.model is None:
        if data.task is None:
            raise UserError("no model to train: give one with --model or \"model\" in the config",
                            f'e.g. --model mynet.py:Net, --model model.pt, or "model": {{"sizes": '
                            f"[{data.X.shape[1]}, 30, N_OUT]}}")
        spec = ArchitectureSpec(sizes=data.task.sizes(cfg.depth), output=data.task.output, seed=cfg.seed)
        return spec.build(base), spec
    if isinstance(cfg.model, str):
        return _load_model(cfg.model, base, trust_pickle)
    return cfg.model.build(base), cfg.model


def _output_width(model: nn.Module, X: torch.Tensor, dtype: torch.dtype) -> int:
    """The number of outputs of ``model`` on a row of ``X``; a `UserError` if the data do not fit it."""
    try:
        with torch.no_grad():
            out = model(X[:1].to(dtype))
    except Exception as err:  # noqa: BLE001 - any error of the model on these inputs means they do not fit it
        raise UserError(f"the model cannot run on the training inputs ({X.shape[1]} columns): {_first_line(err)}",
                        "give as many input columns as the model takes") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model returns {shape} for one input row; cellsheaf-nn train needs (1, n_out)",
                        "return one output row per sample (flatten it in the model)")
    return out.shape[1]


_SET_BY_COMMAND = ("ns", "model", "X", "Y", "X_val", "Y_val", "progress", "callbacks")


def _with_options_merged(cfg: TrainConfig) -> TrainConfig:
    """``loss``, ``seed`` and ``steps`` may also be given in ``options``; given twice, they must agree."""
    options = dict(cfg.options)
    for key in _SET_BY_COMMAND:
        if key in options:
            raise UserError(f"options.{key} is set by the command, not an option",
                            "remove it from options (--no-progress turns the progress bar off)")
    moved = {}
    for key in ("loss", "seed", "steps"):
        if key in options:
            value = options.pop(key)
            if key in cfg.model_fields_set and getattr(cfg, key) != value:
                raise UserError(f"{key} is given twice: {key}={getattr(cfg, key)!r} and options.{key}={value!r}",
                                f"keep one of them (a command-line --{key} sets {key})")
            moved[key] = value
    if not moved:
        return cfg
    try:
        return TrainConfig.model_validate({**cfg.model_dump(by_alias=True, exclude_unset=True), **moved,
                                           "options": options})
    except ValidationError as err:
        raise UserError(_validation_message(err, "training config"), "fix the value in options") from None


def _default_loss(activation: str, Y: torch.Tensor) -> str:
    """The loss that fits a model's output activation (class indices on a linear output: cross-entropy)."""
    fits = {"sigmoid": "bce", "softmax": "cross_entropy", "log_softmax": "nll"}
    return fits.get(activation, "mse" if Y.is_floating_point() else "cross_entropy")


def _checked_loss(name: str, activation: str):
    from . import losses

    try:
        return losses.get(name).bind(activation)
    except KeyError:
        raise UserError(f"unknown loss {name!r}", f"choose from {', '.join(sorted(losses.LOSSES))} (or aliases "
                        f"{', '.join(sorted(losses.ALIASES))})") from None
    except ValueError as err:
        raise UserError(f"loss {name!r} does not fit the model: {err}", "choose a loss for its output") from None


def train_from_config(cfg: TrainConfig, out: Path, progress: bool, base: Path = Path("."),
                      trust_pickle: bool = False) -> str:
    """Train as ``cfg`` says; write ``model.pt``, ``history.json`` and figures into ``out``; return a summary.

    Paths in ``cfg`` are relative to ``base``. A model loaded from a trusted pickle (no architecture
    to store) gets its trained weights written as ``weights.pt`` (a state dict) instead of ``model.pt``.
    """
    from . import train as tr

    cfg = _with_options_merged(cfg)
    data = _training_data(cfg, base)
    model, spec = _training_model(cfg, data, base, trust_pickle)
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float64
    n_out = _output_width(model, data.X, dtype)
    if data.task is None:
        data.Y = as_targets(data.Y, n_out, cfg.data.path or cfg.data.y, "training targets", dtype)
        if data.X_val is not None:
            data.Y_val = as_targets(data.Y_val, n_out, cfg.val_data.path or cfg.val_data.y, "validation targets",
                                    dtype)
    X, X_val = data.X.to(dtype), (data.X_val.to(dtype) if data.X_val is not None else None)
    ns = _compile(model, input_shape=(X.shape[1],)) if cfg.method == "sheaf" else None
    activation = tr._output_activation_of(ns) if ns is not None else tr.output_activation(model)
    loss_name = cfg.loss or (data.task.loss if data.task is not None else _default_loss(activation, data.Y))
    loss = _checked_loss(loss_name, activation)
    for what, x, y in (("training", X, data.Y), ("validation", X_val, data.Y_val)):
        if x is not None:
            try:
                tr.check_data(x, y, X.shape[1], n_out, dtype, loss, what)
            except (TypeError, ValueError) as err:
                raise UserError(f"{what} data do not fit the model and the loss {loss_name!r}: {err}",
                                "check the targets' shape and values against the model's outputs") from None
    options = dict(cfg.options)
    fit_options = {k: options.pop(k) for k in ("eval_every", "record_every") if k in options}
    fit_options.setdefault("eval_every", max(1, cfg.steps // 20))
    t0 = time.perf_counter()
    try:
        if cfg.method == "sgd":
            hist = tr.train_sgd(model, X, data.Y, loss=loss_name, steps=cfg.steps, X_val=X_val, Y_val=data.Y_val,
                                seed=cfg.seed, progress=progress, **fit_options, **options)
        else:
            trainer = tr.SheafTrainer(ns, loss=loss_name, seed=cfg.seed, **options)
            hist = trainer.fit(X, data.Y, steps=cfg.steps, X_val=X_val, Y_val=data.Y_val, progress=progress,
                               **fit_options)
            model = ns.to_module()
    except tr.DivergenceError as err:
        raise UserError(f"training diverged: {_first_line(err)}",
                        "use a smaller step (options dt, lr or beta)") from None
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"bad training option: {_first_line(err)}",
                        "see the documentation of the trainer for its options") from None
    wall = time.perf_counter() - t0
    if spec is not None:
        save_model(out / "model.pt", spec, model)
    else:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "weights.pt")
    (out / "history.json").write_text(json.dumps(hist.to_dict()))
    figs = _figures(progress)
    figs.training_curves({"train loss": hist.train_loss, "test loss": hist.val_loss, "step": hist.step}, x="step",
                         path=out / "training.png", title=f"{cfg.method} training on {data.name}")
    if X.shape[1] == 2:
        Xs, Ys = (X_val, data.Y_val) if X_val is not None else (X, data.Y)
        with torch.no_grad():
            figs.decision_surface(model, Xs, Ys if Ys.dim() == 1 or Ys.shape[1] == 1 else None,
                                  path=out / "surface.png", title=f"{data.name}: {cfg.method}-trained network")
    mode = f" ({trainer.mode})" if cfg.method == "sheaf" else ""
    arch = spec.describe(model) if spec is not None else type(model).__name__
    val = f", test loss {hist.val_loss[-1]:.4g}" if hist.val_loss else ""
    acc = f", train accuracy {hist.train_acc[0]:.3f} -> {hist.train_acc[-1]:.3f}" if hist.train_acc else ""
    val_acc = f", test accuracy {hist.val_acc[-1]:.3f}" if hist.val_acc else ""
    return (f"{cfg.method} training{mode} on {data.name} {arch}: {cfg.steps} steps in {wall:.1f}s, "
            f"train loss {hist.train_loss[0]:.4g} -> {hist.train_loss[-1]:.4g}{val}{acc}{val_acc}")


def _absolute_ref(ref: str) -> str:
    """A model reference typed on the command line, made independent of the config's folder."""
    match = CLASS_REF.match(ref)
    if match and not Path(ref).exists():
        module = match["module"]
        return (str(Path(module).expanduser().resolve()) if module.endswith(".py") else module) \
            + ":" + match["qualname"]
    return str(Path(ref).expanduser().resolve())


def _config_from_args(args) -> tuple[TrainConfig, Path]:
    """The training config file (if any) with the command-line options on top; and the config's folder."""
    if args.config is not None:
        cfg, base = _read_spec(Path(args.config), TrainConfig, "training config"), Path(args.config).parent
    else:
        cfg, base = TrainConfig(), Path(".")
    raw = cfg.model_dump(by_alias=True, exclude_unset=True)
    here = lambda p: str(Path(p).expanduser().resolve())  # noqa: E731 - paths typed are relative to cwd
    if args.model is not None:
        raw["model"] = _absolute_ref(args.model)
    if args.data is not None or args.x is not None or args.y is not None:
        raw.pop("task", None)
        raw["data"] = {k: here(v) for k, v in (("path", args.data), ("x", args.x), ("y", args.y)) if v is not None}
    if args.label is not None:
        data = raw.get("data")
        data = {"path": data} if isinstance(data, str) else dict(data or {})
        data["label"] = int(args.label) if args.label.lstrip("-").isdigit() else args.label
        raw["data"] = data
    if args.val_data is not None:
        raw["val_data"] = here(args.val_data)
    for key in ("loss", "steps", "method"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.mode is not None:
        raw["options"] = {**raw.get("options", {}), "mode": args.mode}
    try:
        return TrainConfig.model_validate(raw), base
    except ValidationError as err:
        raise UserError(_validation_message(err, "training config"), f"the fields are: "
                        f"{', '.join(TrainConfig.model_fields)}") from None


def _cmd_train(args) -> int:
    cfg, base = _config_from_args(args)
    if args.mode is not None and cfg.method != "sheaf":
        raise UserError(f"--mode {args.mode} applies to method sheaf, not {cfg.method}", "drop --mode")
    out = output_folder(args.out)
    print(train_from_config(cfg, out, _want_progress(args), base=base, trust_pickle=args.trust_pickle))
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
        c.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import a module (mypkg.ops) or a .py file first, e.g. one that registers op compilers "
                            "or defines model classes (repeatable)")
        return c

    model_help = ("a JSON architecture spec, a model.pt written by cellsheaf-nn train, MODULE:CLASS or "
                  "FILE.py:CLASS, or (with --trust-pickle) a torch.save-d module")
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

    c = command("train", "train a model on a task or on your data",
                "Train a model on a built-in task or on your own data, by local sheaf updates (default, mode "
                "nudged) or by SGD. Settings come from an optional JSON config and/or the options below "
                "(options win). Data: --data FILE (.npz with X and y, .pt with a dict {'X', 'y'}, or .csv with "
                "a label column) or --x FILE --y FILE.")
    c.add_argument("config", nargs="?", help="a JSON training config (optional)")
    c.add_argument("--model", help=model_help)
    c.add_argument("--trust-pickle", action="store_true", help=trust_help)
    c.add_argument("--data", metavar="FILE", help="training data: .npz (X, y), .pt (dict X, y) or .csv")
    c.add_argument("--x", metavar="FILE", help="training inputs, one sample per row (.csv, .npy, .pt, .json)")
    c.add_argument("--y", metavar="FILE", help="training targets, one row (or class index) per sample")
    c.add_argument("--label", metavar="COLUMN", help="the target column of a --data .csv: a header name or an "
                   "index (default: the last column)")
    c.add_argument("--val-data", metavar="FILE", help="validation data, in the form of --data")
    c.add_argument("--loss", help="loss (default: the task's, or what fits the model's output)")
    c.add_argument("--method", choices=["sheaf", "sgd"], help="local sheaf updates (default) or SGD")
    c.add_argument("--mode", choices=["nudged", "equilibrium", "joint"], help="sheaf training mode "
                   "(default: nudged)")
    c.add_argument("--steps", type=int, help="number of updates (default: 1000)")
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
        for name in args.imports:
            import_user_module(name)
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
