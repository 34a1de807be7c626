"""One owner per run folder: an exclusive lock file `<run_dir>/.lock` naming its holder's host and pid.

    with run_lock.acquire(run_dir):          # UserError (exit 2) when another live run holds it
        ...                                  # write config.yaml, rewind metrics, train, save

The lock is `fcntl.flock` on the file, held for as long as the process keeps it open: the kernel
drops it when the holder exits or is killed, so a lock left by a dead run is never "held". The file's
text (`{"host": ..., "pid": ...}`) only names the holder in messages; a file that still names a
holder when its lock is free is stale (the run was killed) and is taken over with a log line. On a
filesystem without `flock` the text decides: a live pid on this host, or any other host, refuses
(that host cannot be checked from here: the message says to delete the file if that run is gone).
Released by truncating the file (never by deleting it: a process that opened the old file would
then hold a lock on a name no one else sees).

Multi-process runs: only process 0 takes the lock; every process learns the outcome (one host
all-gather), so a refused run stops on all of them. The lock is re-entrant within a process (a run
folder opened twice by one process, e.g. a `Trainer` built again in a notebook, is not refused).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable

from sftrl_jax import errors
from sftrl_jax.errors import UserError

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # real path -> [open file, count] of the locks this process holds


class RunLock:
    """A held lock (release() or the context manager's exit lets it go; idempotent)."""

    def __init__(self, key: str | None):
        self._key = key

    def release(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            f = _held.pop(key)[0]
            try:
                f.truncate(0)  # no holder named: the next run takes it silently
                f.flush()
            except OSError:
                pass
            f.close()  # drops the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: str, *, log: Callable[[str], None] = print) -> RunLock:
    """Locks `run_dir` (created if missing) for this run; raises UserError naming the folder, host and
    pid of a live holder. Every process of a multi-process run calls it; process 0 takes the lock."""
    import jax

    lead = jax.process_index() == 0
    lock, error = RunLock(None), None
    if lead:
        try:
            lock = _lock(run_dir, log=log)
        except UserError as e:
            error = str(e)
    if jax.process_count() > 1:
        from sftrl_jax.parallel import distributed

        error = distributed.allgather_objects(error)[0]
    if error is not None:
        raise UserError(error)
    return lock


def holder(run_dir: str) -> dict | None:
    """The holder named in `run_dir`'s lock file ({"host", "pid"}), or None (no file, or released)."""
    try:
        with open(os.path.join(run_dir, LOCK_FILE), encoding="utf-8") as f:
            return _parse(f.read())
    except OSError:
        return None


def _lock(run_dir: str, *, log: Callable[[str], None]) -> RunLock:
    path = os.path.join(run_dir, LOCK_FILE)
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        return RunLock(key)
    try:
        os.makedirs(run_dir, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise UserError(f"run folder {run_dir}: cannot open its lock file {path}: {errors.cause(e)}") from None
    try:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(_in_use(run_dir, path, _named(f, wait_s=1.0))) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # no flock on this filesystem: the file's text decides
            named = _named(f)
            if named is not None and (named["host"] != me["host"] or _alive(named["pid"])):
                raise UserError(_in_use(run_dir, path, named, by_text=True)) from None
        named = _named(f)
        if named is not None and named != me:
            where = "this host" if named["host"] == me["host"] else f"host {named['host']}"
            log(
                f"run folder {run_dir}: taking over the stale lock of pid {named['pid']} on {where} "
                f"(that run ended without releasing it: killed or crashed)"
            )
        f.seek(0)
        f.truncate(0)
        f.write(json.dumps(me) + "\n")
        f.flush()
    except BaseException:
        f.close()
        raise
    _held[key] = [f, 1]
    return RunLock(key)


def _in_use(run_dir: str, path: str, named: dict | None, *, by_text: bool = False) -> str:
    who = f"pid {named['pid']} on host {named['host']}" if named else "another process"
    gone = " (delete the lock file if that process is gone)" if by_text else ""
    return (
        f"run folder {run_dir} is in use by {who} (lock file {path}); wait for that run to end or "
        f"choose another run folder{gone}"
    )


def _named(f, *, wait_s: float = 0.0) -> dict | None:
    """The holder the lock file names; a holder that has just taken the lock may not have written
    its name yet: up to `wait_s` seconds for it."""
    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        named = _parse(f.read())
        if named is not None or time.monotonic() >= deadline:
            return named
        time.sleep(0.05)


def _parse(text: str) -> dict | None:
    try:
        d = json.loads(text)
    except ValueError:
        return None
    if isinstance(d, dict) and isinstance(d.get("host"), str) and isinstance(d.get("pid"), int):
        return {"host": d["host"], "pid": d["pid"]}
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
