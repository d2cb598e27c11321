"""One writer per run directory: an exclusive lock on ``<run_dir>/.lock``.

Two processes writing one run directory (a double ``--resume``, a sweep restarting a trial whose old process still
lives) would interleave their metrics and overwrite each other's checkpoints. Every process that writes a run
directory holds its lock while it writes; a second one is refused with :class:`~diffrl.errors.RunLocked`, one
sentence naming the holder, before it changes anything::

    with lock_run_dir(run_dir):        # or: lock = lock_run_dir(run_dir) ... lock.release()
        ...                            # write config.yaml, metrics, checkpoints

- **Never stuck.** The lock is ``fcntl.flock`` on the open file: the kernel drops it when the file's last descriptor
  closes, that is at :meth:`RunLock.release` and, regardless, when the process exits or is killed (``SIGKILL``
  included). A leftover ``.lock`` file is therefore harmless: only a live process holds the lock. The file's content
  (the holder's pid, host and start time, JSON) serves only to name the holder in the refusal; it is emptied on
  release and the file is never deleted (deleting a lock file races with a process that has just opened it).
- **Re-entrant within a process.** flock belongs to an open file, so a second ``open`` + ``flock`` by the same process
  would refuse itself. A process-level table (lock file -> descriptor, count) lets SynthER offline's outer run and its
  agent's session lock the same directory; the lock is held until the last holder releases it.
- **Forked children** (vector-env workers, data loaders) close their inherited descriptor without unlocking, so a
  child that outlives a killed parent does not keep the lock; ``exec``-ed children never get it (``O_CLOEXEC``).
- **Filesystems without flock** (flock fails with ENOLCK, EOPNOTSUPP, ENOSYS or EINVAL; some network or FUSE
  filesystems) and platforms without ``fcntl``: the run goes on unlocked, with a :class:`~diffrl.errors.DiffrlWarning`
  saying that a second writer is not refused there. (Linux NFS clients emulate flock with byte-range locks, which do
  hold across hosts; the host in the refusal tells which machine the holder runs on.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from diffrl.errors import DiffrlWarning, RunLocked

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go on unlocked (see the module docstring)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_UNLOCKED = -1  # the descriptor recorded for a directory whose filesystem cannot lock

_table_lock = threading.Lock()
_held: dict[str, list[int]] = {}  # realpath of a lock file -> [descriptor or _UNLOCKED, holders in this process]


class RunLock:
    """The exclusive, re-entrant lock of one run directory (see the module docstring). :meth:`acquire` (or
    :func:`lock_run_dir`) takes it; :meth:`release`, or the end of a ``with`` block over it, gives it back.

    Args:
        run_dir: the run directory; it must exist when :meth:`acquire` is called.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._key: str | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds (a share of) the lock."""
        return self._key is not None

    def acquire(self) -> RunLock:
        """Take the lock without waiting; returns ``self``.

        Raises:
            RunLocked: another process holds it (the sentence names its pid, host and start time).
        """
        if self._key is not None:
            return self
        key = os.path.realpath(self.path)
        with _table_lock:
            entry = _held.get(key)
            if entry is None:
                entry = _held[key] = [_flock(self.path, self.run_dir), 0]
            entry[1] += 1
            self._key = key
        return self

    def release(self) -> None:
        """Give up this object's share; the last share in the process unlocks. Idempotent."""
        key, self._key = self._key, None
        if key is None:
            return
        with _table_lock:
            entry = _held.get(key)
            if entry is None:  # forgotten in a forked child
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
        _unlock(entry[0])

    def __enter__(self) -> RunLock:
        return self  # like a file from open(): taken by acquire() / lock_run_dir(), released when the block exits

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process (this one included) holds the run directory's lock; changes nothing."""
    path = Path(run_dir) / LOCK_FILE
    if os.path.realpath(path) in _held:
        return True
    if fcntl is None or not path.is_file():
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_run_dir(run_dir: Path, *, resume: bool = False) -> RunLock:
    """Lock the existing directory ``run_dir`` for writing; returns the held :class:`RunLock`.

    Args:
        run_dir: the run directory.
        resume: the directory is about to be resumed: lock it only if it holds a run (its ``config.yaml`` or lock
            file), so that a wrong ``--resume`` path is left without a lock file (the caller's checks then refuse it;
            the returned lock is not held).

    Raises:
        RunLocked: another process is writing the directory.
    """
    from diffrl.runs.rundir import CONFIG_FILE  # here: rundir imports torch, the lock itself needs none

    lock = RunLock(run_dir)
    if resume and not ((lock.run_dir / CONFIG_FILE).is_file() or lock.path.is_file()):
        return lock
    return lock.acquire()


@contextlib.contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """A short section that processes sharing ``path`` (a lock file, created if missing) run one at a time: a
    blocking ``flock``, dropped when the block ends or the process dies. Where flock is unsupported (no ``fcntl``,
    a filesystem without it) the section runs unlocked."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def read_holder(run_dir: Path) -> dict[str, Any] | None:
    """The pid, host and start time the last holder wrote to ``run_dir/.lock`` (``None``: free, or unreadable).
    The content says who holds the lock only while the lock is held; see :class:`RunLock`."""
    try:
        return _parse((Path(run_dir) / LOCK_FILE).read_bytes())
    except OSError:
        return None


def refusal(run_dir: Path, holder: dict[str, Any] | None) -> str:
    """The sentence that refuses a second writer of ``run_dir``."""
    who = f" (pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')})" if holder else ""
    return (f"{run_dir} is being written by another process{who}; wait for it to finish or stop it "
            "(nothing was changed).")


# ----------------------------------------------------------------------------------------------------- internals
def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):  # empty (free, or the holder is writing it) or foreign
        return None
    return data if isinstance(data, dict) else None


def _flock(path: Path, run_dir: Path) -> int:
    """Open and flock ``path``; write the holder's identity into it. Returns the descriptor, or ``_UNLOCKED``."""
    if fcntl is None:
        _warn_unlocked(run_dir, "this platform has no fcntl")
        return _UNLOCKED
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: a live process holds it; read who, change nothing
        holder = _parse(os.pread(fd, 4096, 0))
        os.close(fd)
        raise RunLocked(refusal(run_dir, holder)) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _UNSUPPORTED:
            raise
        _warn_unlocked(run_dir, e.strerror or str(e))
        return _UNLOCKED
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


def _unlock(fd: int) -> None:
    if fd == _UNLOCKED:
        return
    with contextlib.suppress(OSError):  # the directory may be gone; the kernel unlocks at close regardless
        os.ftruncate(fd, 0)  # empty while we still hold it: a free lock names nobody
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: also frees it if a copy of the descriptor lives elsewhere
    os.close(fd)


def _warn_unlocked(run_dir: Path, why: str) -> None:
    warnings.warn(f"{run_dir} cannot be locked ({why}); the run goes on, but a second process writing the same "
                  "directory is not refused there.", DiffrlWarning, stacklevel=4)


def _forget_after_fork() -> None:
    """In a forked child: close the inherited descriptors. Closing a copy does not unlock (the parent's descriptor
    still holds the lock); it only stops a child that outlives its parent from keeping the lock."""
    global _table_lock
    _table_lock = threading.Lock()  # another thread may have held it at the fork
    for fd, _ in _held.values():
        if fd != _UNLOCKED:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
