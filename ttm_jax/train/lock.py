"""One run per workdir: a lock file `<workdir>/lock.json` held by the training run (process 0) while it writes.

The lock records its holder (`host`, `pid`, `started` (UTC), `command`). A second run on the same workdir refuses to
start and names the holder. A lock left behind by a run that died (SIGKILL, OOM, a lost VM) is *stale*: on the same
host a dead pid proves it, and the new run takes the lock over with a warning; on another host nothing can be proven
from here, so the error says how to check and how to remove it (`rm <workdir>/lock.json`).

Local paths are locked atomically (`O_CREAT | O_EXCL`); other filesystems (gs://) by check-then-write, which narrows
but cannot close the race between two runs starting in the same instant.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from typing import Any

from absl import logging
from etils import epath

from ttm_jax import cli

LOCK_FILE = "lock.json"


class WorkdirLocked(cli.UserError, RuntimeError):
    """Another run holds the workdir; the message names it and the fix."""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `<workdir>/lock.json` (module docstring); removed on exit."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.held = False

    def _write_new(self, text: str) -> bool:
        if _is_local(self.path):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if self.path.exists():
            return False
        self.path.write_text(text)
        return True

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        me = _holder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._write_new(json.dumps(me, indent=2)):
            self.held = True
            return
        other = self._read()
        who = (f"pid {other.get('pid', '?')} on host {other.get('host', '?')}, started {other.get('started', '?')} "
               f"({other.get('command', '?')!r})")
        if other.get("host") == me["host"] and isinstance(other.get("pid"), int) and not _alive(other["pid"]):
            logging.warning("%s: stale lock of %s (that process is gone); taking it over", self.path, who)
            print(f"warning: {self.path}: stale lock of {who}: that process is gone; taking the workdir over",
                  file=sys.stderr, flush=True)
            self.path.unlink()
            if self._write_new(json.dumps(me, indent=2)):
                self.held = True
                return
            other = self._read()
            who = f"pid {other.get('pid', '?')} on host {other.get('host', '?')}"
        if other.get("host") == me["host"]:
            raise WorkdirLocked(f"{self.path.parent}: another run holds this workdir: {who}. Wait for it to finish, "
                                f"stop it, or train in another --workdir")
        raise WorkdirLocked(f"{self.path.parent}: another run holds this workdir: {who}. It runs on another host, so "
                            f"this one cannot tell whether it is still alive: check that host (ps -p "
                            f"{other.get('pid', '?')}); if it is gone, remove {self.path} and run again, else use "
                            f"another --workdir")

    def release(self) -> None:
        if self.held:
            try:
                if self._read().get("pid") == os.getpid():
                    self.path.unlink()
            finally:
                self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
