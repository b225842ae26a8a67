"""Checkpoint files written whole or not at all, and read with errors that name the file.

``atomic_write`` / ``atomic_write_files``: the bytes go to ``<name>.tmp-<pid>`` in the same
directory, are flushed to the disk, and replace ``<name>`` with one ``os.replace``: a process
killed at any point leaves either the old file or the new one under ``<name>``, never a truncated one (``open(path, "w")`` and
``torch.save``/``safetensors.save_file`` to the final name truncate it first). The temporary name
is in the same directory because a rename is atomic only within one file system.

``read_safetensors`` / ``read_json``: a truncated, empty or corrupt file raises ``CheckpointError``
naming the path (safetensors says "incomplete metadata" and ``json`` "Expecting value", naming no file).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not belong with the files beside it; the
    message names the file."""


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory entry is; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    atomic_write_files([(path, data)])


def atomic_write_files(items) -> None:
    """Write every ``(path, data)`` of ``items`` atomically, in order: all of them are written to their
    temporary names and flushed first, then renamed one right after the other, so that a kill leaves
    the directory mixed (some files old, some new) only for the time of the renames, not of the writes."""
    staged = []
    try:
        for path, data in items:
            path = os.fspath(path)
            tmp = f"{path}.tmp-{os.getpid()}"
            staged.append((tmp, path))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for d in dict.fromkeys(os.path.dirname(p) or "." for _, p in staged):
        _fsync_dir(d)


def remove(path: str) -> None:
    """Remove ``path`` if it exists (and make the removal durable)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    _fsync_dir(os.path.dirname(path) or ".")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str, what: str) -> bytes:
    """The bytes of ``path`` (``what`` says which file it is, for the error)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what}: {exc}") from exc
    if not data:
        raise CheckpointError(f"{path}: the {what} is empty (a save that was interrupted?)")
    return data


def read_safetensors(path: str, what: str, data: Optional[bytes] = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; ``data``: its bytes when already read."""
    from safetensors.torch import load

    data = read_bytes(path, what) if data is None else data
    try:
        tensors = load(data)
        # the metadata: the header's "__metadata__" (8 bytes of header length, then the JSON header),
        # which safetensors' torch loader drops
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own SafetensorError, and OSError/ValueError for other damage
        raise CheckpointError(
            f"{path}: the {what} is truncated or corrupt ({type(exc).__name__}: {exc}); it was probably written "
            "by a save that was interrupted"
        ) from exc
    return tensors, dict(meta)


def read_safetensors_metadata(path: str) -> Optional[dict]:
    """The ``__metadata__`` of a safetensors file's header, read without its tensors; None if the
    header cannot be read."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def read_torch(path: str, what: str, data: Optional[bytes] = None) -> dict:
    """The tensors of a ``torch.save`` file (weights only)."""
    import io

    import torch

    data = read_bytes(path, what) if data is None else data
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn zip archive: RuntimeError, EOFError, UnpicklingError
        raise CheckpointError(
            f"{path}: the {what} is truncated or corrupt ({type(exc).__name__}: {exc}); it was probably written "
            "by a save that was interrupted"
        ) from exc


def read_json(path: str, what: str):
    data = read_bytes(path, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({exc}); truncated or edited by hand?") from exc
