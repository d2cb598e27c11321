"""One writer per run directory, through the CLI: a resume of a run whose process still lives is refused with one
sentence and changes nothing; once that process is killed, the resume works."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from diffrl.cli import main

TINY = ["--env", "Hopper-v5", "--hidden", "32", "32", "--batch-size", "32", "--buffer-size", "2000",
        "--learning-starts", "20", "--eval-every", "0", "--log-every", "20", "--checkpoint-every", "50",
        "--no-progress"]


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the training process exited early: {log.read_text()}"
        assert time.monotonic() < end, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def test_a_resume_while_the_run_is_still_being_written_is_refused_and_works_after_the_writer_is_killed(
        tmp_path, capsys):
    run_dir = tmp_path / "run"
    cli = "import sys; from diffrl.cli import main; sys.exit(main())"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the writer
        proc = subprocess.Popen([sys.executable, "-c", cli, "train", "sac", "--run-dir", str(run_dir),
                                 "--steps", "1000000", *TINY], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(run_dir / "config.yaml", proc, log)
        wait_for(run_dir / "checkpoints" / "latest", proc, log)
        proc.send_signal(signal.SIGSTOP)  # paused, not gone: it still holds the lock, and its files hold still
        before = tree_digest(run_dir)
        capsys.readouterr()
        assert main(["train", "sac", "--resume", str(run_dir), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by another process (pid {proc.pid} on host " in err
        assert "wait for it to finish or stop it (nothing was changed)" in err and "Traceback" not in err
        assert tree_digest(run_dir) == before
    finally:
        proc.kill()
        proc.wait()

    step = json.loads((run_dir / "checkpoints" / "latest" / "manifest.json").read_text())["step"]
    assert main(["train", "sac", "--resume", str(run_dir), "--steps", str(step + 20), "--no-progress"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == step + 20
    assert (run_dir / ".lock").read_bytes() == b""  # released: a finished run's lock names nobody
