"""Dydiff end to end through the CLI on a tiny Hopper dataset: the three stages, the model buffer in the agent's
batches, the rollout-fidelity table, resume of each stage, reuse of trained stages by path, bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from diffrl.cli import main

STAGES = ["--steps", "60", "--batch-size", "32", "--eval-every", "30", "--eval-episodes", "1", "--log-every", "10",
          "--horizon", "8", "--diffusion-steps", "40", "--diffusion-batch-size", "16",
          "--unet-dim", "8", "--unet-mults", "1", "2", "--sample-steps", "3", "--rollouts", "16", "--every", "20",
          "--capacity", "5000", "--min-model-rows", "10", "--dynamics-members", "3", "--dynamics-elites", "2",
          "--dynamics-hidden", "16", "16", "--reward-hidden", "16", "--model-max-epochs", "3",
          "--fidelity-rollouts", "8", "--no-progress"]
TINY = [*STAGES, "--hidden", "32", "32"]  # TD3+BC's networks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dydiff")


@pytest.fixture(scope="module")
def full_run(workdir, hopper_random) -> Path:
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--run-dir", str(workdir / "full")]) == 0
    return workdir / "full"


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))


def test_run_writes_every_stage_and_trains_on_model_rollouts(full_run) -> None:
    for name in ("config.yaml", "summary.json", "diffusion/summary.json", "rollout_fidelity.png"):
        assert (full_run / name).is_file(), name
    assert (full_run / "models" / "checkpoints" / "latest").exists()
    s = json.loads((full_run / "summary.json").read_text())
    assert s["pipeline"] == "dydiff_td3bc" and s["gradient_steps"] == 60
    rows = [r for r in _rows(full_run) if r.get("dydiff/transitions_added")]
    # rollouts at steps 0, 20 and 40, each logged with the next metrics row; the buffer only grows
    assert len(rows) == 3
    sizes = [float(r["dydiff/model_buffer"]) for r in rows]
    assert sizes[0] > 0 and sizes == sorted(sizes)
    fid = s["rollout_fidelity"]
    assert set(fid["models"]) == {"dydiff (data actions)", "single-step (data actions)", "single-step (policy)",
                                  "dydiff + injection (policy)"}
    for m in fid["models"].values():
        err = np.asarray(m["state_error"], dtype=float)
        assert err.shape == (7,) and np.all(err[np.isfinite(err)] > 0)  # models, not the simulator
    assert "dydiff (data actions)" in fid["table"]
    # the table as scalars, which result rows keep, and each stage's cost
    assert s["fidelity/dydiff_injection_policy/h1"] == fid["models"]["dydiff + injection (policy)"]["state_error"][0]
    assert s["fidelity/single_step_data_actions/h7"] == fid["models"]["single-step (data actions)"]["state_error"][6]
    assert s["fidelity/dydiff_data_actions/return_error"] == fid["models"]["dydiff (data actions)"]["return_error"]
    assert "fidelity/dydiff_data_actions/h10" not in s  # horizons past the windows' are not made up
    assert s["stage_s/window_model"] > 0 and s["stage_s/single_step_models"] > 0 and s["stage_s/agent"] > 0


def test_fidelity_command_prints_the_table_and_keeps_it(full_run, capsys) -> None:
    assert main(["dydiff", "fidelity", "--run", str(full_run), "--rollouts", "6", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "single-step (data actions)" in out and "rollout_fidelity.png" in out
    assert json.loads((full_run / "summary.json").read_text())["rollout_fidelity"]["rollouts"] == 6
    # another sampler is measured beside the run's own table, not over it
    assert main(["dydiff", "fidelity", "--run", str(full_run), "--rollouts", "6", "--sampler", "dpmpp_2m",
                 "--sample-steps", "4"]) == 0
    s = json.loads((full_run / "summary.json").read_text())
    assert s["rollout_fidelity_dpmpp_2m_4"]["sampler"] == {"sampler": "dpmpp_2m", "steps": 4}
    assert s["rollout_fidelity"]["sampler"]["sampler"] == "heun"
    assert (full_run / "rollout_fidelity_dpmpp_2m_4.png").is_file()


def test_resume_after_each_stage_gives_the_uninterrupted_run(full_run, workdir, hopper_random, monkeypatch) -> None:
    from diffrl.pipelines import dydiff

    killed = workdir / "killed"
    real = dydiff.single_step_models

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dydiff, "single_step_models", dies)  # after the window model's stage
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--run-dir", str(killed)]) == 130
    assert (killed / "diffusion" / "summary.json").is_file() and not (killed / "models").exists()
    monkeypatch.setattr(dydiff, "single_step_models", real)
    # resume into the agent's stage, stopped at 30 of 60 gradient steps, then resumed to the end
    assert main(["dydiff", "--resume", str(killed), "--steps", "30"]) == 0
    window_mtime = (killed / "diffusion" / "summary.json").stat().st_mtime_ns
    assert main(["dydiff", "--resume", str(killed), "--steps", "60"]) == 0
    assert (killed / "diffusion" / "summary.json").stat().st_mtime_ns == window_mtime  # not retrained
    key = "critic_loss"
    assert [r[key] for r in _rows(killed) if r.get(key)] == [r[key] for r in _rows(full_run) if r.get(key)]


def test_trained_stages_are_reused_by_path(full_run, workdir, hopper_random) -> None:
    reuse = workdir / "reuse"
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--fidelity-rollouts", "0", "--diffusion",
                 str(full_run), "--models", str(full_run), "--run-dir", str(reuse)]) == 0
    assert not (reuse / "diffusion").exists() and not (reuse / "models").exists()
    s, first = (json.loads((d / "summary.json").read_text()) for d in (reuse, full_run))
    assert s["stage_s/window_model"] == first["stage_s/window_model"]  # the reused stage's own cost
    assert not any(k.startswith("fidelity/") for k in s)  # --fidelity-rollouts 0
    key = "critic_loss"
    assert [r[key] for r in _rows(reuse) if r.get(key)] == [r[key] for r in _rows(full_run) if r.get(key)]


def test_bad_inputs_are_one_sentence(workdir, hopper_random, capsys) -> None:
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--horizon", "5000", "--run-dir",
                 str(workdir / "long")]) == 2
    err = capsys.readouterr().err
    assert "longer than every episode" in err and "Traceback" not in err
    assert not (workdir / "long").exists()
    no_rewards = workdir / "no-rewards.hdf5"
    with h5py.File(hopper_random) as src, h5py.File(no_rewards, "w") as dst:
        for key in src:
            if key != "rewards":
                dst.create_dataset(key, data=src[key][()])
        dst.attrs.update(src.attrs)
    assert main(["dydiff", "--dataset", str(no_rewards), *TINY, "--run-dir", str(workdir / "norew")]) == 2
    assert "no 'rewards'" in capsys.readouterr().err
    assert main(["dydiff", "fidelity", "--run", str(workdir)]) == 2
    capsys.readouterr()
    not_a_folder = workdir / "cache-file"
    not_a_folder.write_text("")
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--stage-cache", str(not_a_folder), "--run-dir",
                 str(workdir / "bad-cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file; give --stage-cache a folder" in err and not_a_folder.read_text() == ""
    assert not (workdir / "bad-cache").exists()


def test_diffusion_ql_trains_on_dydiff_rollouts(full_run, workdir, hopper_random) -> None:
    run = workdir / "dql"
    assert main(["dydiff", "--algo", "dql", "--dataset", str(hopper_random), *STAGES, "--steps", "40",
                 "--eval-candidates", "4", "--fidelity-rollouts", "0", "--diffusion", str(full_run), "--models",
                 str(full_run), "--run-dir", str(run)]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["pipeline"] == "dydiff_dql" and s["gradient_steps"] == 40
    rows = [r for r in _rows(run) if r.get("dydiff/transitions_added")]
    assert len(rows) == 2 and float(rows[-1]["dydiff/model_buffer"]) > float(rows[0]["dydiff/model_buffer"]) > 0


def test_the_control_trains_no_model_and_is_the_plain_agent(workdir, hopper_random) -> None:
    # --real-ratio 1 without the fidelity check: no batch takes a model row, so no stage is trained or loaded (the
    # control never depends on another run's models) and the agent's updates are offline TD3+BC's, update for update
    control = workdir / "control"
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--real-ratio", "1", "--fidelity-rollouts", "0",
                 "--run-dir", str(control)]) == 0
    assert not (control / "diffusion").exists() and not (control / "models").exists()
    s = json.loads((control / "summary.json").read_text())
    assert s["diffusion_run"] is None and s["stage_s/window_model"] is None and s["stage_s/agent"] > 0
    assert not any(k.startswith(("fidelity/", "dydiff/")) for k in s)
    plain = workdir / "plain"
    assert main(["offline", "td3bc", "--dataset", str(hopper_random), "--steps", "60", "--batch-size", "32",
                 "--eval-every", "30", "--eval-episodes", "1", "--log-every", "10", "--hidden", "32", "32",
                 "--no-progress", "--run-dir", str(plain)]) == 0
    key = "critic_loss"
    got = [r[key] for r in _rows(control) if r.get(key)]
    assert got and got == [r[key] for r in _rows(plain) if r.get(key)]
    assert not any(k.startswith("dydiff/") for r in _rows(control) for k, v in r.items() if v)


def test_a_stage_cache_trains_each_stage_once_and_changes_no_result(full_run, workdir, hopper_random) -> None:
    cache = workdir / "cache"

    def stages() -> list[str]:
        return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))

    first = workdir / "cached"
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--fidelity-rollouts", "0", "--stage-cache",
                 str(cache), "--run-dir", str(first)]) == 0
    assert not (first / "diffusion").exists() and not (first / "models").exists()
    assert [n.split("-")[-2] for n in stages()] == ["models", "window"]
    key = "critic_loss"  # the same updates as the run that trained its own stages (same seed, data and settings)
    got = [r[key] for r in _rows(first) if r.get(key)]
    assert got and got == [r[key] for r in _rows(full_run) if r.get(key)]
    # Diffusion-QL on the same data and seed needs the same stages: it trains none (here the variant Dydiff's code
    # trains, whose flags the module docstring lists: agent settings are not part of a stage's key)
    dql = workdir / "cached-dql"
    variant = ["--q-action", "pred_start", "--no-lr-decay", "--normalize-states", "--critic-hidden", "256", "256",
               "--critic-activation", "relu", "--eval-draw"]
    assert main(["dydiff", "--algo", "dql", "--dataset", str(hopper_random), *STAGES, "--steps", "20",
                 "--eval-candidates", "4", "--fidelity-rollouts", "0", "--stage-cache", str(cache), "--run-dir",
                 str(dql), *variant]) == 0
    assert len(stages()) == 2
    config = yaml.safe_load((dql / "config.yaml").read_text())["config"]
    assert (config["q_action"], config["lr_decay"], config["normalize_states"], config["critic_hidden"],
            config["critic_activation"], config["eval_draw"]) == ("pred_start", False, True, [256, 256], "relu", True)
    s, t = (json.loads((d / "summary.json").read_text()) for d in (first, dql))
    assert (s["diffusion_run"], s["models_run"]) == (t["diffusion_run"], t["models_run"])
    assert Path(s["diffusion_run"]).parent == cache
    # another sampler reuses the window model (training never samples) and samples with its own settings
    euler = workdir / "cached-euler"
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--steps", "20", "--fidelity-rollouts", "0",
                 "--sampler", "euler", "--s-churn", "0", "--stage-cache", str(cache), "--run-dir", str(euler)]) == 0
    assert len(stages()) == 2
    assert json.loads((euler / "summary.json").read_text())["diffusion_run"] == s["diffusion_run"]
    assert yaml.safe_load((euler / "config.yaml").read_text())["config"]["sampler"] == "euler"
    # another seed is another pair of stages
    assert main(["dydiff", "--dataset", str(hopper_random), *TINY, "--steps", "20", "--fidelity-rollouts", "0",
                 "--seed", "1", "--stage-cache", str(cache), "--run-dir", str(workdir / "cached-s1")]) == 0
    assert len(stages()) == 4


def test_a_cached_stage_held_by_another_process_is_waited_for(tmp_path) -> None:
    import subprocess
    import sys

    from diffrl.pipelines.dydiff import cached_stage

    (tmp_path / ".locks" / "stage").mkdir(parents=True)
    released = tmp_path / "released"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from diffrl.runs.lock import lock_run_dir\n"
        f"lock = lock_run_dir(Path({str(tmp_path / '.locks' / 'stage')!r})); print('held', flush=True)\n"
        f"time.sleep(1.0); Path({str(released)!r}).touch(); lock.release()")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with cached_stage(tmp_path, "stage", poll_s=0.05) as stage:
        assert released.exists() and stage == tmp_path / "stage"  # only after the other process let go
    assert holder.wait(timeout=30) == 0
