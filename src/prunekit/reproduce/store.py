"""A results file that grows one finished configuration at a time, so long experiment grids can span sessions."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import IO, Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from prunekit.fileformat import json_text, write_text

__all__ = ["ResultStore", "command_line", "environment"]


def command_line() -> str:
    """The command that is running, as typed (relative paths kept)."""
    return shlex.join([os.path.relpath(sys.executable) if os.path.isabs(sys.executable) else sys.executable,
                       *sys.argv])


def environment() -> dict[str, Any]:
    """Versions, threads, machine and load of this run."""
    import prunekit

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


class ResultStore:
    """``{"experiment", "commands", "environment", "meta", "runs": {key: record}}`` in one JSON file.

    Every :meth:`put` rewrites the file atomically; :meth:`done` tells a rerun which keys to skip.

    Examples:
        >>> import tempfile
        >>> store = ResultStore(tempfile.mkdtemp() + "/r.json", "demo")
        >>> store.done("a"), store.put("a", {"accuracy": 0.9}), ResultStore(store.path, "demo").done("a")
        (False, None, True)
    """

    def __init__(self, path: str | os.PathLike[str], experiment: str, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if self.path.exists():
            self.doc = json.loads(self.path.read_text())
            self.doc.setdefault("experiment", self.doc.pop("benchmark", None))  # files written before the rename
            if self.doc.get("experiment") != experiment:
                raise ValueError(f"{self.path} holds results of {self.doc.get('experiment')!r}, not {experiment!r}")
        else:
            self.doc = {"experiment": experiment, "commands": [], "environment": environment(), "meta": {},
                        "runs": {}}
        cmd = command_line()
        if cmd not in self.doc["commands"]:
            self.doc["commands"].append(cmd)
        self.doc["meta"].update(meta or {})
        self._mine: set[str] = set()  # keys this store put: they win over the file's; the file's win over the rest

    @property
    def runs(self) -> dict[str, Any]:
        return self.doc["runs"]

    def done(self, key: str) -> bool:
        return key in self.doc["runs"]

    def put(self, key: str, record: dict[str, Any]) -> None:
        record = {**record, "command": command_line(),
                  "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.doc["runs"][key] = record
        self._mine.add(key)
        self.save()

    def save(self) -> None:
        """Write the file atomically, first merging runs that other processes wrote to it (under a file lock).

        So several processes may fill one grid at once (e.g. one per seed), also re-running finished keys: a key is
        never lost, and a record another process wrote since this store read the file is not overwritten with the
        older copy this store read (only the keys this store :meth:`put` win over the file's).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock = _locked(lock_path)
        try:
            if self.path.exists():
                on_disk = json.loads(self.path.read_text())
                runs = self.doc["runs"]
                self.doc["runs"] = {**runs, **on_disk.get("runs", {}), **{k: runs[k] for k in self._mine}}
                for cmd in on_disk.get("commands", []):
                    if cmd not in self.doc["commands"]:
                        self.doc["commands"].append(cmd)
            write_text(self.path, json_text(self.doc, indent=1))
        finally:
            if fcntl is not None:  # removed while still held: a process waiting on it retries on a fresh file
                lock_path.unlink(missing_ok=True)
            lock.close()


def _locked(path: Path) -> IO[str]:
    """Open ``path`` and hold an exclusive lock on it (where ``fcntl`` exists). The holder removes the file when it
    is done, so no lock file is left behind; a process that got the lock on a file removed meanwhile tries again."""
    while True:
        lock = open(path, "a")
        if fcntl is None:
            return lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()
