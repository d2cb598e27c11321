"""The run-directory lock (runs/lock.py): a second writer from another process is refused with the holder named,
the same process may lock twice, a killed holder (or its surviving fork) never leaves the lock stuck, and a session
holds the lock from before its first write until finish()."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffrl.errors import CheckpointError, DiffrlWarning, RunLocked
from diffrl.pipelines.common import RunConfig
from diffrl.runs import lock as lock_mod
from diffrl.runs.lock import LOCK_FILE, RunLock, lock_run_dir, read_holder
from diffrl.runs.session import RunSession


def is_locked(run_dir: Path) -> bool:
    """Probe with a new open file: flock conflicts between open files even within one process."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the probe's own lock
    return False


# Each line is one write(2) on the pipe (atomic below PIPE_BUF): print() makes one write per piece when Python runs
# unbuffered (PYTHONUNBUFFERED), and the parent's and the child's pieces then interleave.
HOLDER = """
import os, sys, time
from diffrl.runs.lock import RunLock
RunLock(sys.argv[1]).acquire()
if len(sys.argv) > 2:  # a forked child (a vector-env worker) that would outlive its parent
    if os.fork() == 0:  # the at-fork hook has run once fork() returns here
        os.write(1, f"child {os.getpid()}\\n".encode())
        time.sleep(60)
        os._exit(0)
os.write(1, b"locked\\n")
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path) -> Iterator[subprocess.Popen]:
    """Another process holding tmp_path's lock (killed at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_with_a_sentence_naming_the_holder_and_the_lock_file_is_unchanged(
        tmp_path, holder):
    before = (tmp_path / LOCK_FILE).read_bytes()
    with pytest.raises(RunLocked) as e:
        RunLock(tmp_path).acquire()
    message = str(e.value)
    assert message.startswith(f"{tmp_path} is being written by another process (pid {holder.pid} on host ")
    assert message.endswith("; wait for it to finish or stop it (nothing was changed).")
    assert read_holder(tmp_path)["pid"] == holder.pid and " since 20" in message
    assert (tmp_path / LOCK_FILE).read_bytes() == before


def test_the_lock_is_free_as_soon_as_its_holder_is_killed(tmp_path, holder):
    assert is_locked(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert not is_locked(tmp_path)
    with RunLock(tmp_path).acquire() as lock:
        assert lock.held and read_holder(tmp_path)["pid"] == os.getpid()


def test_a_forked_child_that_outlives_its_killed_parent_does_not_keep_the_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "fork"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = sorted(proc.stdout.readline() for _ in range(2))  # the parent's and the child's, in either order
    child = int(lines[0].split()[1])
    try:
        assert lines[1] == "locked\n"
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the child still lives
        assert not is_locked(tmp_path)
    finally:
        proc.kill()
        os.kill(child, signal.SIGKILL)


def test_the_same_process_may_lock_twice_and_holds_the_lock_until_the_last_release(tmp_path):
    outer = RunLock(tmp_path).acquire()
    with lock_run_dir(tmp_path) as inner:  # SynthER offline: the outer run and the agent's session, one directory
        assert inner.held and is_locked(tmp_path)
    assert is_locked(tmp_path), "the inner release must not unlock the outer holder"
    outer.release()
    outer.release()  # idempotent
    assert not is_locked(tmp_path)
    assert (tmp_path / LOCK_FILE).read_bytes() == b"" and read_holder(tmp_path) is None  # a free lock names nobody


def test_resuming_a_directory_without_a_run_leaves_no_lock_file(tmp_path):
    lock = lock_run_dir(tmp_path, resume=True)
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()


def test_a_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    with pytest.warns(DiffrlWarning, match="cannot be locked .No locks available.; the run goes on"):
        lock = RunLock(tmp_path).acquire()
    assert lock.held
    lock.release()
    assert not lock.held


@dataclasses.dataclass(frozen=True)
class Cfg(RunConfig):
    seed: int = 0
    lr: float = 0.1


@dataclasses.dataclass
class Counters:
    step: int = 0


def test_a_session_holds_its_run_directory_from_before_its_first_write_until_finish(tmp_path):
    run_dir = tmp_path / "run"
    cfg = Cfg(run_dir=run_dir, progress=False)
    s = RunSession(cfg, "p", "env")
    assert is_locked(run_dir) and not (run_dir / "config.yaml").exists()
    s.start(Counters())
    s.save(1)
    s.finish({})
    assert not is_locked(run_dir)

    r = RunSession(dataclasses.replace(cfg, resume=run_dir), "p", "env")
    assert is_locked(run_dir)
    r.start(Counters())
    r.finish({})
    assert not is_locked(run_dir)
    with pytest.raises(CheckpointError, match="lr=0.5"):  # a refused resume does not keep the lock
        RunSession(dataclasses.replace(cfg, resume=run_dir, lr=0.5), "p", "env")
    assert not is_locked(run_dir)


def test_a_session_that_is_dropped_without_finish_releases_its_lock(tmp_path):
    s = RunSession(Cfg(run_dir=tmp_path / "run", progress=False), "p", "env")
    assert is_locked(tmp_path / "run")
    del s  # a loop that stopped with an error
    assert not is_locked(tmp_path / "run")


def test_a_resume_while_another_process_writes_is_refused_before_reading_or_writing(tmp_path):
    run_dir = tmp_path / "run"
    s = RunSession(Cfg(run_dir=run_dir, progress=False), "p", "env")
    s.start(Counters())
    s.save(1)
    s.finish({})
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        with pytest.raises(RunLocked, match=f"pid {proc.pid} "):
            RunSession(Cfg(run_dir=run_dir, progress=False, resume=run_dir), "p", "env")
    finally:
        proc.kill()
        proc.wait()
