"""`diffrl iter` end to end on FetchReach-v4: plain HER, ITER (KER + GER) and ITER-Diffusion through the CLI, the
run directory, the synthetic episodes' own buffer and mixing ratio, exact resume, and clear errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffrl.augment.ger import ger_minibatch
from diffrl.cli import main
from diffrl.data.episodes import EpisodeBuffer
from diffrl.pipelines import iter_her

TINY = ["--env", "FetchReach-v4", "--epochs", "2", "--n-cycles", "2", "--n-batches", "3",
        "--before-ger-minibatch-size", "16", "--hidden", "16", "16", "--eval-episodes", "2", "--no-progress"]
DDPM = ["--ddpm", "--ddpm-train-start", "0", "--ddpm-aug-start", "1", "--ddpm-aug-freq", "1", "--ddpm-n-synth", "6",
        "--ddpm-train-steps", "3", "--ddpm-time-steps", "4", "--ddpm-dim", "8", "--ddpm-batch-size", "4",
        "--ddpm-n-train-episodes", "8", "--ddpm-tol", "1e9", "--ddpm-kinematics-tol", "inf", "--synthetic-ratio",
        "0.25"]  # every filter off: a 3-step model's episodes are far from Fetch's dynamics
REASONS = ("goal", "kinematics", "object", "consistency")


def rows(run_dir) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))


def test_plain_her_run_directory_and_success_per_epoch(tmp_path) -> None:
    assert main(["iter", *TINY, "--n-ker", "0", "--n-ger", "0", "--run-dir", str(tmp_path / "r")]) == 0
    d = tmp_path / "r"
    assert (d / "config.yaml").exists() and (d / "checkpoints" / "latest" / "manifest.json").exists()
    s = json.loads((d / "summary.json").read_text())
    assert s["pipeline"] == "iter" and s["env_steps"] == 2 * 2 * 50 and s["epochs"] == 2
    assert s["gradient_steps"] == 2 * 2 * 3 and s["real_episodes"] == 4
    r = rows(d)
    assert [int(x["env_steps"]) for x in r] == [100, 200] and all(x["eval/success_rate"] != "" for x in r)
    assert main(["eval", str(d), "--episodes", "2"]) == 0
    # `diffrl eval` on the final checkpoint replays the run's last test (same seeded episodes, same weights)
    ev = json.loads((d / "eval-step-200-2ep.json").read_text())
    assert ev["success_rate"] == s["success_rate"] == float(r[-1]["eval/success_rate"])
    assert ev["return_mean"] == s["eval_return_mean"]
    assert main(["report", str(d), "--out", str(tmp_path / "rep")]) == 0  # goal tasks plot the success rate
    assert "eval/success_rate" in json.dumps(json.loads((tmp_path / "rep" / "report.json").read_text()))


def test_ker_stores_2_nker_episodes_per_rollout_and_ger_runs(tmp_path) -> None:
    assert main(["iter", *TINY, "--n-ker", "2", "--n-ger", "1", "--run-dir", str(tmp_path / "r")]) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["real_episodes"] == 4 * 2 * 2 and s["env_steps"] == 200  # reflections are data, not env steps


def test_gamma_follows_the_horizon_and_dense_tasks_judge_success_by_distance(tmp_path) -> None:
    # baselines: gamma = 1 - 1/T; a Dense task's reward is -distance, so "reward > -0.5" would call every step of
    # FetchReach (goals within 0.26 m of the gripper) a success and every context "successful"
    assert main(["iter", *TINY, "--env", "FetchReachDense-v4", "--max-episode-steps", "10", "--n-ker", "1",
                 "--n-ger", "0", *DDPM, "--run-dir", str(tmp_path / "r")]) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["gamma"] == pytest.approx(0.9) and s["env_steps"] == 2 * 2 * 10
    assert float(rows(tmp_path / "r")[1]["ddpm/success_fraction"]) < 1.0


def test_iter_diffusion_logs_generation_and_keeps_synthetic_episodes_apart(tmp_path) -> None:
    assert main(["iter", *TINY, "--n-ker", "1", "--n-ger", "1", *DDPM, "--run-dir", str(tmp_path / "r")]) == 0
    r = rows(tmp_path / "r")
    assert r[0]["ddpm/loss_mean"] != "" and r[0].get("ddpm/generated", "") == ""  # epoch 0 trains only
    last = r[1]
    # every filter is off, so nothing is rejected, under any reason
    assert float(last["ddpm/generated"]) == float(last["ddpm/accepted"]) == 6
    assert [float(last[f"ddpm/{k}"]) for k in ("rejection_rate", *(f"reject_{c}" for c in REASONS))] == [0.0] * 5
    for key in ("kl/obs", "fd/obs", "kl/act", "fd/act", "kl/ag", "fd/ag", "kl/g", "fd/g"):
        assert f"ddpm/{key}" in last and last[f"ddpm/{key}"] != ""
    assert float(last["buffer/synthetic_episodes"]) == 6 and float(last["buffer/real_episodes"]) == 8
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["synthetic_episodes"] == 6 and s["real_episodes"] == 8
    assert (s["ddpm_generated"], s["ddpm_accepted"], s["ddpm_rejected_kinematics"]) == (6, 6, 0)
    assert s["time_breakdown_s"]["diffusion_train_s"] > 0 and s["time_breakdown_s"]["sampling_s"] > 0


def test_the_generator_leaves_the_agents_random_streams_alone(tmp_path) -> None:
    # ITER-Diffusion with no synthetic share must be ITER exactly: a paired comparison of the two arms
    common = [*TINY, "--n-ker", "1", "--n-ger", "1"]
    assert main(["iter", *common, "--run-dir", str(tmp_path / "iter")]) == 0
    ddpm = [a if a != "0.25" else "0" for a in DDPM]  # --synthetic-ratio 0
    assert main(["iter", *common, *ddpm, "--run-dir", str(tmp_path / "ddpm")]) == 0
    runs = [rows(tmp_path / d) for d in ("iter", "ddpm")]
    assert float(runs[1][1]["buffer/synthetic_episodes"]) > 0  # it did generate
    agent_keys = [k for k in runs[0][0] if not k.startswith("perf/") and k != "wall_s"]
    assert [[r[k] for k in agent_keys] for r in runs[0]] == [[r[k] for k in agent_keys] for r in runs[1]]


def test_a_generation_event_that_rejects_every_episode_does_not_stop_the_run(tmp_path) -> None:
    # 1e-9 m rejects all: no synthetic success rate exists (it was logged as NaN and tripped the divergence check).
    # Both the kinematics and the consistency check fail every episode; each counts under the first, kinematics.
    ddpm = [{"1e9": "1e-9", "inf": "1e-9"}.get(a, a) for a in DDPM]
    with pytest.warns(UserWarning, match=r"rejected all 6 generated episodes \(kinematics 100%\) after 6 generator"):
        assert main(["iter", *TINY, "--n-ker", "0", "--n-ger", "0", *ddpm, "--run-dir", str(tmp_path / "r")]) == 0
    last = rows(tmp_path / "r")[1]
    assert float(last["ddpm/rejection_rate"]) == 1.0 and last.get("ddpm/synthetic_success_rate", "") == ""
    assert {c: float(last[f"ddpm/reject_{c}"]) for c in REASONS} == {"goal": 0.0, "kinematics": 1.0, "object": 0.0,
                                                                      "consistency": 0.0}
    assert float(last["buffer/synthetic_episodes"]) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())  # the run's totals: one event of 6 episodes
    assert {k: v for k, v in s.items() if k.startswith("ddpm_") and "median" not in k} == {
        "ddpm_generated": 6, "ddpm_accepted": 0, "ddpm_rejected_goal": 0, "ddpm_rejected_kinematics": 6,
        "ddpm_rejected_object": 0, "ddpm_rejected_consistency": 0}
    assert s["ddpm_last_kinematics_error_median"] == pytest.approx(float(last["ddpm/kinematics_error_median"]))


def test_minibatches_take_the_synthetic_ratio_and_ger_multiplies_them() -> None:
    cfg = iter_her.ITERConfig(env="FetchReach-v4", before_ger_minibatch_size=40, synthetic_ratio=0.25, n_ger=2)
    rng = np.random.default_rng(0)

    def filled(value: float) -> EpisodeBuffer:
        buf = EpisodeBuffer(4, 5, 10, 4, 3)
        buf.add_episodes({"obs": np.full((4, 6, 10), value), "ag": rng.uniform(size=(4, 6, 3)),
                          "g": rng.uniform(size=(4, 5, 3)), "act": np.zeros((4, 5, 4))})
        return buf

    reward = lambda ag, g: -(np.linalg.norm(ag - g, axis=-1) > 0.05).astype(np.float32)  # noqa: E731
    batch = iter_her.her_batch(filled(1.0), filled(-1.0), cfg, reward)
    assert len(batch) == 40 and int((batch.obs[:, 0] == -1.0).sum()) == 10
    big = ger_minibatch(batch, cfg.n_ger, rng, cfg.env, reward, cfg.ger_radius)
    assert len(big) == 120 and np.allclose(big.obs[:40], batch.obs) and np.allclose(big.obs[40:80], batch.obs)
    moved = np.linalg.norm((big.goal[40:] - big.goal[:40].repeat(2, 1)).numpy(), axis=-1)
    assert moved.max() <= 0.05 + 1e-6 and moved.min() > 0
    np.testing.assert_array_equal(big.rew.numpy(), reward(big.next_achieved_goal.numpy(), big.goal.numpy()))


def test_resume_of_a_killed_run_reproduces_the_uninterrupted_run(tmp_path) -> None:
    # a generation event in each epoch, so the generation totals of the summary must survive the kill too
    ddpm = [a if i == 0 or DDPM[i - 1] != "--ddpm-aug-start" else "0" for i, a in enumerate(DDPM)]
    args = [*TINY, "--n-ker", "1", "--n-ger", "1", *ddpm]
    assert main(["iter", *args, "--run-dir", str(tmp_path / "full")]) == 0
    part = [a if a != "2" or i == 0 or args[i - 1] != "--epochs" else "1" for i, a in enumerate(args)]
    assert main(["iter", *part, "--run-dir", str(tmp_path / "part")]) == 0
    assert main(["iter", "--resume", str(tmp_path / "part"), "--epochs", "2"]) == 0
    curves = [[{k: v for k, v in x.items() if k != "wall_s" and not k.startswith("perf/")} for x in rows(tmp_path / d)]
              for d in ("full", "part")]
    assert curves[0] == curves[1]
    totals = [{k: v for k, v in json.loads((tmp_path / d / "summary.json").read_text()).items() if "ddpm_" in k}
              for d in ("full", "part")]
    assert totals[0] == totals[1] and totals[0]["ddpm_generated"] == 12


@pytest.mark.parametrize(("args", "message"), [
    (["--env", "HalfCheetah-v5"], "not a goal-conditioned task"),
    (["--env", "FetchPush-v1"], "FetchPush-v4"),
    (["--env", "FetchPsh-v4"], "Did you mean"),
])
def test_bad_input_is_one_sentence(tmp_path, capsys, args, message) -> None:
    assert main(["iter", *TINY, *args, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_inconsistent_ddpm_schedule_is_rejected_while_parsing(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:  # tyro prints the config's sentence
        main(["iter", *TINY, "--ddpm-aug-start", "1", "--ddpm-train-start", "5", "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "ddpm_aug_start" in capsys.readouterr().err and not (tmp_path / "r").exists()
