"""``benchmarks/gpu_check.py``: its ``--smoke`` run on the CPU measures every item and appends one row, and
``--device cuda`` without a GPU is one sentence and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFRL_PROGRESS": "0"}
LABELS = ("SynthER denoiser training", "SynthER Heun sampling", "SAC update", "REDQ (N=10, M=2) update",
          "DPPO fine-tuning iteration", "sweep --gpus-per-trial")
ITEMS = ("diffusion_train", "diffusion_sample", "sac_update", "redq_update", "dppo_iteration", "dppo_env_steps",
         "sweep")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, cwd=SCRIPT.parents[1], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    rows = tmp_path_factory.mktemp("gpu-check") / "rows.jsonl"
    return run("--smoke", "--device", "cpu", "--results", str(rows)), rows


def test_smoke_run_on_cpu_prints_a_table_row_for_every_item(smoke):
    proc, _ = smoke
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| item | setting | rate on this device | unit | CPU reference | ratio |")
    for label in LABELS:
        assert any(line.startswith(f"| {label} |") for line in table), label
    assert "torch " + torch.__version__ in proc.stdout and "CUDA " in proc.stdout  # the header names the versions


def test_smoke_run_appends_one_row_with_a_positive_rate_for_every_item_and_the_provenance(smoke):
    proc, rows = smoke
    assert proc.returncode == 0, proc.stderr
    lines = rows.read_text().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["smoke"] is True and row["device"] == "cpu" and row["versions"]["torch"] == torch.__version__
    assert "git_rev" in row and row["machine"]["cores"] > 0
    by_item: dict[str, list[dict]] = {}
    for m in row["measurements"]:
        by_item.setdefault(m["item"], []).append(m)
    assert set(by_item) == set(ITEMS)
    assert all(m["value"] > 0 for ms in by_item.values() for m in ms)
    assert len(by_item["diffusion_train"]) == len(by_item["diffusion_sample"]) == 4  # 2 widths x fp32 / bf16
    sweep = by_item["sweep"][0]
    assert sweep["all_finished"] and sweep["value"] == sweep["trials"] == 2 and sweep["on_cuda"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu_exits_2_with_one_sentence(tmp_path):
    proc = run("--device", "cuda", "--results", str(tmp_path / "rows.jsonl"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA GPU" in lines[0] and "--device cpu" in lines[0]
    assert not (tmp_path / "rows.jsonl").exists()
