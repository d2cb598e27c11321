"""benchmarks/harness.py: the resumable JSONL harness (rows round-trip, finished runs skipped, torn lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import harness  # noqa: E402


def test_rows_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out" / "r.jsonl"  # the folder is created
    assert harness.read_rows(path) == []
    rows = [{"env": "Hopper-v5", "seed": 0, "steps": None, "curve": [[0, 1.5]]}, {"env": "x", "seed": 1, "s": "é"}]
    for r in rows:
        harness.append_row(path, r)
    assert harness.read_rows(path) == rows
    # the format of the scripts before the harness: one json.dumps(row) per line
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)


def test_finished_job_skipped_unfinished_runs(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    harness.append_row(path, {"env": "A", "seed": 0, "steps": None, "score": 1.0})
    ran = []

    def run_one(key: dict) -> dict:
        ran.append(key)
        return {**key, "score": 2.0}

    jobs = [{"env": "A", "seed": 0, "steps": None}, {"env": "A", "seed": 1, "steps": None}]
    rows = harness.run_all(jobs, path, run_one)
    assert ran == [{"env": "A", "seed": 1, "steps": None}]
    assert [r["seed"] for r in rows] == [0, 1] and harness.read_rows(path) == rows
    # started again: everything is finished; a key field missing from a row reads as None (old rows)
    assert harness.run_all(jobs, path, run_one) == rows and len(ran) == 1
    assert harness.finished([{"env": "A", "seed": 0}], {"env": "A", "seed": 0, "steps": None})
    assert not harness.finished(rows, {"env": "A", "seed": 0, "steps": 5})
    # --table-only runs nothing
    assert harness.run_all([{"env": "B", "seed": 0}], path, run_one, table_only=True) == rows and len(ran) == 1


def test_torn_last_line_ignored_then_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.jsonl"
    harness.append_row(path, {"seed": 0})
    with path.open("a") as f:
        f.write('{"seed": 1, "sco')  # a writer killed mid-row
    assert harness.read_rows(path) == [{"seed": 0}]
    assert "torn last line" in capsys.readouterr().err
    rows = harness.run_all([{"seed": 0}, {"seed": 1}], path, lambda key: {**key, "score": 1.0})
    prov = {"versions", "git_rev", "git_dirty", "machine", "date"}  # every new row records its provenance
    assert set(rows[1]) == {"seed", "score"} | prov and rows[1]["versions"]["torch"]
    assert rows[0] == {"seed": 0} and {k: v for k, v in rows[1].items() if k not in prov} == {"seed": 1, "score": 1.0}
    # the append cut the torn line off: the file reads clean, and a bad line that is not the last is an error
    assert harness.read_rows(path) == rows
    assert path.read_text().startswith('{"seed": 0}\n{"seed": 1, "score": 1.0, "versions": ')
    path.write_text('{"seed": 0}\n{"se\n{"seed": 1}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2"):
        harness.read_rows(path)


def test_result_rows_count_code_edits_not_the_rows_and_tables_that_runs_write(tmp_path):
    import subprocess

    from diffrl.runs.results import code_edited

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("# results\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    assert code_edited(tmp_path) is False
    (tmp_path / "benchmarks" / "results" / "rows.jsonl").write_text("{}\n{}\n")  # a sweep appended a row
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("# results, regenerated\n")
    assert code_edited(tmp_path) is False
    (tmp_path / "src.py").write_text("x = 2\n")
    assert code_edited(tmp_path) is True
