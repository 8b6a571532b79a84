"""Crash-safe checkpoint files: atomic writes, a format version, and reads that say what is wrong.

A checkpoint is a ``torch.save``-d dict of tensors, numbers, strings, lists and
dicts only (read back with ``weights_only=True``, so loading never runs code).
[`write_checkpoint`][cellsheaf_nn.checkpoint.write_checkpoint] writes it to a temporary file in the target's folder,
flushes and fsyncs it, then renames it over the target (`os.replace`): a crash
at any moment leaves either the old file or the new one, never a truncated
mix. [`read_checkpoint`][cellsheaf_nn.checkpoint.read_checkpoint] checks that the file is a checkpoint of a known format
and version and raises [`CheckpointError`][cellsheaf_nn.checkpoint.CheckpointError] naming the file and the problem
(missing, truncated, not a checkpoint, a newer format) otherwise.

Examples
--------
>>> import tempfile, pathlib, torch
>>> from cellsheaf_nn.checkpoint import read_checkpoint, write_checkpoint
>>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt.pt"
>>> write_checkpoint(path, {"w": torch.ones(2)}, kind="example")
>>> read_checkpoint(path, kind="example")["w"]
tensor([1., 1.])
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "FORMAT_VERSION", "write_checkpoint", "read_checkpoint"]

FORMAT_VERSION = 1
_FORMAT_KEY, _VERSION_KEY = "format", "version"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and what is wrong with it."""


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any], kind: str) -> None:
    """Write ``state`` (tagged with ``kind`` and `FORMAT_VERSION`) to ``path`` atomically.

    The data go to a temporary file in the same folder, are flushed and
    fsynced, and the file is renamed over ``path``; on any error the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({_FORMAT_KEY: kind, _VERSION_KEY: FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platform dependent
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The state stored by [`write_checkpoint`][cellsheaf_nn.checkpoint.write_checkpoint] under ``kind``, without the format tags.

    Raises
    ------
    CheckpointError
        Naming ``path``: missing or a folder, unreadable, truncated or not a
        torch file, holding code (refused: only plain data is loaded), not a
        ``kind`` checkpoint, or written by a newer format version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a write was interrupted")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "Unsupported operand" not in str(err):  # garbage says so; anything else is a refused Python object
            raise CheckpointError(f"checkpoint {path} holds Python objects other than plain data; refused "
                                  "(only files written by save() load)") from None
        raise CheckpointError(f"checkpoint {path} is not a torch file ({first[:120]})") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch file ({reason[:120]})") from None
    except OSError as err:
        if err.errno == 22 or "Invalid argument" in str(err):  # torch's reader on a cut-off archive
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(obj, dict) or obj.get(_FORMAT_KEY) != kind:
        what = f"a {type(obj).__name__}" if not isinstance(obj, dict) else \
            f"format {obj.get(_FORMAT_KEY)!r}" if _FORMAT_KEY in obj else "a dict without a format tag"
        raise CheckpointError(f"checkpoint {path} is not a {kind} checkpoint (it holds {what})")
    version = obj.get(_VERSION_KEY)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this cellsheaf_nn reads "
                              f"versions 1..{FORMAT_VERSION} (upgrade cellsheaf_nn to read newer files)")
    return {k: v for k, v in obj.items() if k not in (_FORMAT_KEY, _VERSION_KEY)}
