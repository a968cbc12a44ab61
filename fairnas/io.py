"""Files that survive crashes: atomic writes, safe checkpoint loading, JSON and JSONL helpers.

Every output goes to a temporary file in the same folder, is flushed and fsynced, then renamed
over the target with ``os.replace``: a crash or a full disk while saving leaves the previous file
intact, and the failure is raised as :class:`OutputWriteError` naming the file. Appends to JSON
lines files are rolled back the same way. Checkpoints are loaded with ``weights_only=True`` so no
pickled code ever runs, and the project's own model files can also be written as safetensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

logger = logging.getLogger(__name__)

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message says what it is and what to do."""


class OutputWriteError(OSError):
    """An output could not be written (disk full, no permission); the message names the file
    and says that its previous version, if any, is intact."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file, then rename it over ``path``.

    Raises :class:`OutputWriteError` (disk full, permission) naming the target; the old file
    is untouched and no temporary file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
            raise _write_error(error, f"could not write {path}: {error.strerror or error}; "
                                      f"the previous version (if any) is intact") from error
        raise
    _sync_folder(path.parent)
    return path


def _write_error(error: OSError, message: str) -> OutputWriteError:
    """The cause's error number is kept so callers can still tell a full disk (ENOSPC)."""
    return OutputWriteError(error.errno, message) if error.errno else OutputWriteError(message)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable across a power loss; best effort (not every system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` through a temporary file (serialised in memory first, then written)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it, so a record is either wholly there or absent.

    A failed write (a full disk) is cut off again, so the file keeps its earlier lines only and
    later appends do not land behind half a line; a kill mid-write can still leave a torn last
    line, which :func:`read_jsonl` ignores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode("utf-8")
    with open(path, "ab") as handle:
        size = handle.tell()
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):
                handle.truncate(size)
            raise _write_error(error, f"could not append to {path}: "
                                      f"{error.strerror or error}; its earlier lines are "
                                      f"intact") from error


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Read JSON lines, ignoring a torn last line left by a crash mid-append."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                logger.warning("ignoring a torn last line in %s", path)
                return
            raise ValueError(f"{path}:{number + 1} is not valid JSON") from None


def describe_bad_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not a loadable checkpoint, or ``None`` if it looks like one."""
    if not path.exists():
        return f"checkpoint {path} does not exist"
    if path.is_dir():
        return f"checkpoint {path} is a folder, expected a file"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(200)
    if head.startswith(LFS_POINTER_PREFIX):
        return (
            f"{path} is a Git LFS pointer file ({size} bytes), not the weights: fetch the real "
            f"file with `git lfs pull` in the repository it came from"
        )
    if size == 0:
        return f"checkpoint {path} is empty (0 bytes); it was not written completely"
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return (
            f"checkpoint {path} is truncated or corrupt ({size} bytes; the zip archive inside "
            f"is incomplete): download or copy it again"
        )
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch checkpoint safely (``weights_only``), with a clear error for bad files."""
    path = Path(path)
    problem = describe_bad_checkpoint(path)
    if problem:
        raise CheckpointError(problem)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(
                f"checkpoint {path} is not a valid safetensors file: {error}"
            ) from error
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) could not be read: {error}. "
            f"It may be truncated, corrupt, or contain objects other than tensors "
            f"(only weights are loaded; no pickled code is executed)"
        ) from error
    except Exception as error:  # weights_only refuses arbitrary globals with UnpicklingError
        # torch's message runs over several lines and advises weights_only=False, which is
        # exactly what must not be done with an untrusted file: keep its first line only.
        if isinstance(error, pickle.UnpicklingError):
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            what = f", such as {found.group(1)}" if found else ""
            reason = f"it holds objects that are not plain weights{what}"
        else:
            reason = "it is not a PyTorch checkpoint"
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) was refused: {reason}. Only "
            f"weights are loaded; no pickled code is executed"
        ) from error


def save_safetensors(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


# -- the project's model files as safetensors ------------------------------------------------

SAFETENSORS_METADATA_KEY = "fairnas"


def _plain(value: Any) -> Any:
    """JSON-ready copy: tensors become nested lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_model_file_as_safetensors(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a project model file (``model.pt``, ``supernet.pt``) as safetensors.

    ``state["model"]`` becomes the tensors; every other entry (architecture, space, ledger) is
    kept as JSON in the file's metadata, so :func:`load_model_file` returns the same keys and a
    reader of the safetensors file never unpickles anything.
    """
    if not isinstance(state.get("model"), dict):
        raise ValueError("expected a project model file with a 'model' state dict")
    extra = {k: _plain(v) for k, v in state.items() if k != "model"}
    return save_safetensors(path, state["model"],
                            metadata={SAFETENSORS_METADATA_KEY: json.dumps(extra)})


def load_model_file(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """A project model file, from a torch checkpoint or its safetensors export (same keys)."""
    path = Path(path)
    state = load_checkpoint(path, map_location)
    if path.suffix != ".safetensors":
        return state
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        extra = json.loads(metadata.get(SAFETENSORS_METADATA_KEY, "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its '{SAFETENSORS_METADATA_KEY}' metadata is not valid "
                              f"JSON ({error})") from error
    return {**extra, "model": state}
