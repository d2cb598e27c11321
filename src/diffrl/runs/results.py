"""Result rows: one small JSON row per finished run, appended to a JSONL file that is kept in the repository
(``benchmarks/results/``), so that every published number can be checked and its table regenerated.

A row holds what a referee needs to check the number without the run directory: the run's full config, seed,
final and per-evaluation scores (raw and, where the dataset or env defines references, normalised), wall clock and
its breakdown, and the provenance of the code and machine (library versions, git revision, CPU, threads, date).

``read_rows`` / ``append_row`` keep such files safe against a writer killed mid-row: a torn last line (no newline,
not JSON) is dropped on read with a warning and cut off before the next append; any other bad line is an error
naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from diffrl.runs.logger import read_metrics, x_column
from diffrl.runs.rundir import SUMMARY_FILE, read_config, read_summary

# libraries whose versions decide a run's numbers (the ones installed are recorded)
LIBRARIES = ("diffrl", "torch", "numpy", "gymnasium", "mujoco", "gymnasium-robotics", "dm-control", "ray", "rliable",
             "stable-baselines3")
# what benchmark runs write into the checkout (rows, generated tables, figures): not code edits (``provenance``)
OUTPUTS = ("benchmarks/results", "benchmarks/RESULTS.md", "benchmarks/figures")
SCORE_COLUMNS = ("eval/return_mean", "eval/normalized_score", "eval/success_rate")


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a JSONL results file (none if it does not exist), less a torn last line."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                print(f"{path}:{i}: ignoring a torn last line (a killed writer); that run will run again",
                      file=sys.stderr)
                continue
            raise ValueError(f"{path}:{i}: not a JSON row: {e}") from e
    return rows


def append_row(path: Path | str, row: dict[str, Any]) -> None:
    """Append one row as one JSON line, flushed and fsynced, first cutting off a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a torn last line: keep everything up to its start
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write((json.dumps(row, default=str) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


CHECKOUT = Path(__file__).resolve().parents[3]  # src/diffrl/runs/results.py -> the checkout (editable installs)


def _git(*args: str, root: Path = CHECKOUT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_edited(root: Path = CHECKOUT) -> bool | None:
    """Whether the checkout's tracked files differ from its revision, less the files benchmark runs write
    (``OUTPUTS``: a sweep appending rows is not an edit of the code that made them); None outside git."""
    out = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in OUTPUTS),
               root=root)
    return None if out is None else bool(out)


def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's vector / matrix extensions that decide bf16 speed (AVX2, AVX512, AVX512-BF16, AMX)."""
    flags = (_cpuinfo("flags") or "").split()
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def provenance() -> dict[str, Any]:
    """Versions of the libraries that decide the numbers, git revision (and whether the tree had edits), machine."""
    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    rev = _git("rev-parse", "HEAD")
    dirty = code_edited()
    threads = None
    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    gpu = None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        gpu = sys.modules["torch"].cuda.get_device_name(0)
    return {"versions": versions, "git_rev": rev, "git_dirty": dirty,
            "machine": {"cpu": _cpu(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "torch_threads": threads,
                        "gpu": gpu, "host": platform.node()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _number(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def finished_at(run_dir: Path) -> str:
    """When the run wrote its summary (UTC): with the sweep and trial it names one finished run."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((Path(run_dir) / SUMMARY_FILE).stat().st_mtime))


def run_row(run_dir: Path | str) -> dict[str, Any]:
    """The row of one finished run directory: config, seed, final and per-evaluation scores, wall clock."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    summary = read_summary(run_dir)
    metrics = read_metrics(run_dir)
    config = dict(cfg["config"])
    x = x_column(metrics)
    curves = {}
    for col in SCORE_COLUMNS:
        pts = [[r[x], r[col]] for r in metrics if _number(r.get(col)) is not None]
        if pts:
            curves[col.split("/", 1)[1]] = pts
    scalars = {k: _number(v) for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"pipeline": cfg["pipeline"], "env": config.get("env") or summary.get("env_id"),
            "seed": summary.get("seed", config.get("seed")), "config": config, "final": scalars,
            "curve_x": x, "curves": curves, "wall_s": _number(summary.get("wall_s")),
            "time_breakdown_s": summary.get("time_breakdown_s"), "finished": finished_at(run_dir)}
