"""The benchmarks' shared resumable harness: one JSON row per finished run, appended to a JSONL results file
under ``benchmarks/results/`` (committed: every published number can be checked and its table regenerated), with
the provenance of the code and machine (``diffrl.runs.results.provenance``: versions, git revision, CPU, date).

A run is identified by its key (a dict of the fields that name it: env, seed, arm, budget...); a row of the
results file whose fields include the key marks the run finished, and it is skipped when the benchmark is started
again. ``--table-only`` reprints a benchmark's tables from the rows already written and runs nothing.

A writer killed mid-row leaves a torn last line (no trailing newline, not valid JSON): ``read_rows`` drops it with
a warning on stderr, so that run is simply run again, and ``append_row`` cuts it off before writing. Any other
line that is not JSON is an error naming the file and line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from diffrl.runs.results import append_row, provenance, read_rows

__all__ = ["RESULTS", "Row", "Key", "read_rows", "append_row", "matches", "finished", "print_row", "run_all",
           "add_common_args", "finished_trials", "dataset_prints", "by_data"]

# the committed result rows (run directories and caches stay in the git-ignored benchmarks/out/)
RESULTS = Path(__file__).parent / "results"

Row = dict
Key = dict


def matches(row: Row, key: Key) -> bool:
    """Whether a row has every field of the key with the same value (a missing field reads as None)."""
    return all(row.get(k) == v for k, v in key.items())


def finished(rows: Iterable[Row], key: Key) -> bool:
    """Whether some row records the run that the key names."""
    return any(matches(r, key) for r in rows)


def print_row(row: Row) -> None:
    """Print a row as its JSON line (what several benchmarks show as each run finishes)."""
    print(json.dumps(row), flush=True)


def run_all(jobs: Iterable[Key], path: Path | str, run_one: Callable[[Key], Row], rows: list[Row] | None = None,
            table_only: bool = False, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Run each job (a run's key) not yet finished and append its row (``run_one(key)``, which should include the key).

    ``rows``: the rows read so far (default: ``read_rows(path)``); new rows are appended to it, and it is returned
    for the tables. ``table_only``: run nothing. ``on_row``: called with each new row once it is written.
    """
    rows = read_rows(path) if rows is None else rows
    for key in jobs:
        if table_only or finished(rows, key):
            continue
        row = {**run_one(key), **provenance()}
        rows.append(row)
        append_row(path, row)
        if on_row is not None:
            on_row(row)
    return rows


def add_common_args(parser: argparse.ArgumentParser, results: Path, tables: str = "tables") -> None:
    """``--results`` (the JSONL file, default ``results``) and ``--table-only`` ("print the <tables> of ...")."""
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--table-only", action="store_true",
                        help=f"print the {tables} of the finished runs, run nothing")


def finished_trials(sweep_dir: Path, spec_file: str) -> Iterable[tuple[Any, Path]]:
    """``(trial, run_dir)`` of every finished trial of the sweep saved in ``sweep_dir``; a directory that holds no
    sweep stops the script with one sentence (run ``diffrl sweep <spec_file>`` first, or give --sweep)."""
    from diffrl.errors import ConfigError
    from diffrl.sweep import saved_spec, trial_state, trials

    try:
        spec = saved_spec(sweep_dir)
    except ConfigError as e:
        raise SystemExit(f"{e} Run `diffrl sweep {spec_file}` first, or give --sweep.") from None
    for t in trials(spec):
        if trial_state(sweep_dir / "trials" / t.id) == "done":
            yield t, sweep_dir / "trials" / t.id


def dataset_prints(datasets: Iterable[Path], table_only: bool) -> dict[str, str]:
    """Each present dataset's fingerprint by file stem (rows name the data they ran on); a missing dataset stops a
    run (one sentence: how to build it), not a ``--table-only`` reprint."""
    from diffrl.data import fingerprint, load_dataset

    datasets = list(datasets)
    missing = [str(d) for d in datasets if not Path(d).exists()]
    if missing and not table_only:
        raise SystemExit(f"missing: {', '.join(missing)}; build them with `python benchmarks/datasets.py`")
    return {Path(d).stem: fingerprint(load_dataset(str(d))) for d in datasets if Path(d).exists()}


def by_data(rows: Iterable[Row]) -> Iterable[tuple[str, str | None, list[Row]]]:
    """The rows grouped by the data they ran on: ``(dataset, fingerprint, rows)`` in first-seen order."""
    rows = list(rows)
    for stem, fp in dict.fromkeys((r["dataset"], r.get("dataset_fingerprint")) for r in rows):
        yield stem, fp, [r for r in rows if r["dataset"] == stem and r.get("dataset_fingerprint") == fp]
