"""Whole-file writes and JSON reads on a local disk or any `etils.epath` path (`gs://...`): the one atomic writer.

A reader sees the old file or the new one, never half of it. A local file is written to a temporary name unique to
this host and process (`tmp_name`), flushed to disk, and renamed into place; a `gs://` object is uploaded in one
write (objects appear whole, so no temporary name is needed there). When the storage refuses the write (no space,
a file size limit, read-only, quota: `cli.storage_failure`), the temporary file is removed and `cli.StorageRefused`
says so in one line. Layer 0: imports only `cli`.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from etils import epath

from ttm_jax import cli

TMP_MARK = ".tmp."

RERUN = "free space (or make the folder writable), then run the same command again"


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_")


def tmp_name(path: str) -> str:
    """A temporary name for `path` unique to this host and process: `path.tmp.<host>-<pid>`."""
    return f"{path}{TMP_MARK}{_host()}-{os.getpid()}"


def is_stale_tmp(filename: str) -> bool:
    """True for a temporary file left by a dead process of this host (others' are never judged stale here)."""
    _, sep, tag = filename.rpartition(TMP_MARK)
    host, _, pid = tag.rpartition("-")
    if not sep or not pid.isdigit() or host != _host():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL path (`gs://...`): written whole through `etils.epath`, no local rename."""
    return "://" in os.fspath(path)


def remove_stale_tmp(folder: str, *, recursive: bool = False) -> None:
    """Deletes the temporary files that killed runs on this host left in `folder` (and below it, `recursive`); the
    files of a live process (a concurrent run writing the same, deterministic files) and of other hosts are left
    alone. A `gs://` folder has none (objects are uploaded whole)."""
    if is_remote(folder):
        return
    for where, _, names in os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]:
        for name in names:
            if is_stale_tmp(name):
                try:
                    os.remove(os.path.join(where, name))
                except FileNotFoundError:
                    pass  # its process finished it meanwhile


def refused(path: str, tmp: str, error: BaseException, *, then: str = RERUN) -> None:
    """When the storage refused writing `path` (`cli.storage_failure`): remove the temporary file `tmp` and raise
    `cli.StorageRefused` in one line ending with `then` (what the user does next); otherwise return (the caller
    re-raises)."""
    reason = cli.storage_failure(error)
    if reason is None:
        return
    try:
        os.remove(tmp)
    except OSError:
        pass  # never created, or the storage refuses even that: a stale temporary file is ignored and replaced
    raise cli.StorageRefused(f"{path}: could not be written ({reason}); nothing of it was kept and {then}") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path`, all or nothing (module docstring); a local parent folder is created when missing."""
    path = os.fspath(path)
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    tmp = tmp_name(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the bytes do (a crash would leave 0 bytes)
        os.replace(tmp, path)
    except OSError as e:
        refused(path, tmp, e)
        try:
            os.remove(tmp)
        except OSError:
            pass  # never created
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = True) -> None:
    """Writes `obj` as JSON (`json.dumps` with `indent` and `sort_keys`), all or nothing (`write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys).encode())


_RAISE = object()


def read_json(path: str | os.PathLike, *, missing: Any = _RAISE) -> Any:
    """The JSON value in `path` (local or any `etils.epath` path). Without `missing`, a file that is absent or does not
    parse raises (`FileNotFoundError`, `json.JSONDecodeError`); with it, such a file gives `missing` instead (the
    resumable jobs read their done-markers so: an absent or unreadable marker means "not done")."""
    try:
        return json.loads(epath.Path(path).read_text())
    except (OSError, ValueError):
        if missing is _RAISE:
            raise
        return missing
