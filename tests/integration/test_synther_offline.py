"""SynthER offline end to end through the CLI: diffusion, samples.npz, fidelity, agent on synthetic / mixed / real
data, the mixing ratio, the small-data subset, reuse of a trained model and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from diffrl.cli import main
from diffrl.data import load_dataset
from diffrl.pipelines import offline, synther_offline

TINY = ["--steps", "100", "--batch-size", "32", "--eval-every", "50", "--eval-episodes", "1", "--log-every", "50",
        "--hidden", "32", "32", "--diffusion-steps", "100", "--diffusion-width", "32", "--diffusion-depth", "2",
        "--diffusion-batch-size", "64", "--num-samples", "1500", "--sample-batch-size", "1000", "--sampler",
        "dpmpp_2m_sde", "--sample-steps", "6", "--fidelity-samples", "200", "--no-progress"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synther")


@pytest.fixture(scope="module")
def dataset(hopper_random) -> Path:
    return hopper_random


@pytest.fixture(scope="module")
def synthetic_run(workdir, dataset) -> Path:
    assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY, "--run-dir",
                 str(workdir / "syn")]) == 0
    return workdir / "syn"


def test_synthetic_run_writes_everything(synthetic_run) -> None:
    for name in ("config.yaml", "metrics.csv", "summary.json", "samples.npz", "diffusion/summary.json"):
        assert (synthetic_run / name).is_file(), name
    assert (synthetic_run / "checkpoints" / "latest").exists()
    with np.load(synthetic_run / "samples.npz") as f:
        assert f["observations"].shape == (1500, 11) and f["actions"].shape == (1500, 3)
        assert f["rewards"].shape == (1500,) and f["next_observations"].shape == (1500, 11)
        assert set(np.unique(f["terminals"])) <= {0.0, 1.0} and np.abs(f["actions"]).max() <= 1.0
        on_bound = np.mean(np.any(np.abs(f["actions"]) == 1.0, axis=1))  # the rows clipping moved onto a bound
    s = json.loads((synthetic_run / "summary.json").read_text())
    assert s["out_of_range_fraction"] == pytest.approx(on_bound, abs=1e-9)
    assert s["pipeline"] == "synther_offline_td3bc" and s["data_mode"] == "synthetic" and s["batch_real_ratio"] == 0
    assert s["normalized_score"] is not None and s["num_samples"] == 1500
    assert s["fidelity"]["real"]["validity"]["next_obs_nmse"] < 1e-6
    assert s["fidelity"]["synthetic"]["validity"]["next_obs_nmse"] > 1e-3
    assert s["diffusion_run"].endswith("diffusion")


def test_mixing_ratio_is_honoured(dataset, workdir, monkeypatch) -> None:
    """Batches take exactly real_ratio of their rows from the real data (synthetic rows are marked)."""
    real = load_dataset(str(dataset))
    n = 500
    marked = {"observations": real.observations[:n], "actions": real.actions[:n],
              "rewards": np.full(n, 1000.0, np.float32), "next_observations": real.next_observations[:n],
              "terminals": np.zeros(n, np.float32)}
    seen: list[float] = []
    build = offline.build

    def spy(*args, **kwargs):
        agent = build(*args, **kwargs)
        update = agent.update

        def recording(batch):
            seen.append(float((batch["rew"] >= 999).float().mean()))
            return update(batch)

        agent.update = recording
        return agent

    monkeypatch.setattr(offline, "build", spy)
    cfg = synther_offline.ALGOS["td3bc"](dataset=str(dataset), steps=20, batch_size=40, eval_every=0,
                                         eval_episodes=1, hidden=(16, 16), progress=False,
                                         run_dir=workdir / "mix")
    offline.run(cfg, offline.OfflineData(real=real, synthetic=marked, real_ratio=0.25, run_dir=workdir / "mix",
                                         pipeline="synther_offline_td3bc"))
    assert len(seen) == 20 and all(abs(f - 0.75) < 1e-9 for f in seen)


def test_real_mode_small_data_and_reuse_of_a_trained_model(workdir, dataset, synthetic_run) -> None:
    with pytest.warns(UserWarning, match="scales rewards by"):  # IQL's reward scale on 30% of a tiny dataset
        assert main(["synther", "offline", "--algo", "iql", "--dataset", str(dataset), *TINY, "--data-mode", "real",
                     "--data-fraction", "0.3", "--run-dir", str(workdir / "real")]) == 0
    s = json.loads((workdir / "real" / "summary.json").read_text())
    assert not (workdir / "real" / "samples.npz").exists() and not (workdir / "real" / "diffusion").exists()
    full = len(load_dataset(str(dataset)))
    assert 0.15 * full < s["real_transitions"] < 0.5 * full  # ~30% of the episodes
    assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY, "--data-mode", "mixed",
                 "--diffusion", str(synthetic_run / "diffusion"), "--run-dir", str(workdir / "mixed")]) == 0
    s = json.loads((workdir / "mixed" / "summary.json").read_text())
    assert s["batch_real_ratio"] == 0.5 and s["diffusion_run"] == str(synthetic_run / "diffusion")
    assert not (workdir / "mixed" / "diffusion").exists() and s["diffusion_same_data"] is True
    # same model, seed and generation settings: the transitions come from the model's cache, not a second sampling
    assert s["generation_s"] == 0.0 and Path(s["samples_from"]).parent == synthetic_run / "diffusion" / "generated"
    with np.load(synthetic_run / "samples.npz") as a, np.load(workdir / "mixed" / "samples.npz") as b:
        cached = {k: b[k] for k in b.files}
        assert all(np.array_equal(a[k], cached[k]) for k in a.files)
    # a damaged cache entry is regenerated, and generation is deterministic: the same transitions again
    Path(s["samples_from"] + ".json").write_text("{not json")
    assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY, "--data-mode", "mixed",
                 "--diffusion", str(synthetic_run / "diffusion"), "--run-dir", str(workdir / "mixed2")]) == 0
    s2 = json.loads((workdir / "mixed2" / "summary.json").read_text())
    assert s2["generation_s"] > 0 and "samples_from" not in s2
    with np.load(workdir / "mixed2" / "samples.npz") as f:
        assert all(np.array_equal(f[k], cached[k]) for k in f.files)
    # a model of the whole dataset reused in a small-data run is allowed, but said and recorded (it saw more data)
    with pytest.warns(UserWarning, match="trained on other data"):
        assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY, "--data-fraction",
                     "0.3", "--diffusion", str(synthetic_run / "diffusion"), "--run-dir", str(workdir / "other")]) == 0
    assert json.loads((workdir / "other" / "summary.json").read_text())["diffusion_same_data"] is False


def test_resume_of_a_run_stopped_before_its_first_diffusion_checkpoint(workdir, dataset, monkeypatch) -> None:
    from diffrl.diffusion.trainer import DiffusionTrainer

    step = DiffusionTrainer.train_step
    calls = {"n": 0}

    def dies_at_step_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return step(self)

    run_dir = workdir / "killed"
    monkeypatch.setattr(DiffusionTrainer, "train_step", dies_at_step_5)
    assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY, "--run-dir",
                 str(run_dir)]) == 130  # Ctrl-C
    assert (run_dir / "diffusion" / "config.yaml").exists() and not (run_dir / "diffusion" / "checkpoints").exists()
    monkeypatch.setattr(DiffusionTrainer, "train_step", step)
    assert main(["synther", "offline", "--algo", "td3bc", "--resume", str(run_dir)]) == 0
    assert (run_dir / "samples.npz").exists() and (run_dir / "diffusion" / "summary.json").exists()


def test_resume_continues_the_agent_without_retraining(workdir, dataset, synthetic_run) -> None:
    part = workdir / "part"
    args = ["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY]
    assert main([*args[:-1], "--steps", "50", "--no-progress", "--run-dir", str(part)]) == 0
    samples = (part / "samples.npz").stat().st_mtime_ns
    assert main(["synther", "offline", "--algo", "td3bc", "--resume", str(part), "--steps", "100"]) == 0
    assert (part / "samples.npz").stat().st_mtime_ns == samples  # read back, not regenerated
    curves = [[r["critic_loss"] for r in csv.DictReader((d / "metrics.csv").read_text().splitlines())]
              for d in (synthetic_run, part)]
    assert curves[0] == curves[1]  # same data, same seeds: the resumed run is the uninterrupted one


def test_bad_inputs(dataset, workdir, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["synther", "offline", "--dataset", str(dataset), "--data-mode", "upsampled"])
    assert "data_mode" in capsys.readouterr().err
    for flag, value, name in (("--out-of-range", "drop", "out_of_range"), ("--terminals", "always", "terminals")):
        with pytest.raises(SystemExit):
            main(["synther", "offline", "--dataset", str(dataset), flag, value])
        assert name in capsys.readouterr().err
    assert main(["synther", "offline", "--algo", "bc", "--dataset", str(dataset)]) == 2
    assert "unknown algorithm" in capsys.readouterr().err
    assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY, "--diffusion",
                 str(workdir / "nothing"), "--run-dir", str(workdir / "bad")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_rule_terminals_and_rejected_actions_on_a_reused_model(workdir, dataset, synthetic_run) -> None:
    from diffrl.envs.termination import termination_rule

    run = workdir / "rule"
    assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(dataset), *TINY, "--terminals", "rule",
                 "--out-of-range", "reject", "--diffusion", str(synthetic_run / "diffusion"),
                 "--run-dir", str(run)]) == 0
    with np.load(run / "samples.npz") as f:
        want = termination_rule("Hopper-v5")(f["next_observations"]).astype(np.float32)
        np.testing.assert_array_equal(f["terminals"], want)
        assert np.all(np.abs(f["actions"]) < 1.0)
    s = json.loads((run / "summary.json").read_text())
    assert s["terminal_rate"] == pytest.approx(float(want.mean()))
    assert 0.0 <= s["terminal_rule_disagreement"] <= 1.0 and 0.0 <= s["out_of_range_fraction"] < 1.0
    # the synthetic-mode run beside it kept the model's flags and measured how far they are from the rule
    base = json.loads((synthetic_run / "summary.json").read_text())
    with np.load(synthetic_run / "samples.npz") as f:
        model_flags = f["terminals"] > 0.5
        rule_flags = termination_rule("Hopper-v5")(f["next_observations"])
    assert base["terminal_rule_disagreement"] == pytest.approx(float(np.mean(model_flags != rule_flags)))


def test_rule_terminals_for_an_env_without_a_known_rule_write_nothing(workdir, capsys) -> None:
    import h5py

    # a dataset that claims a DMC task: its termination is not known
    path = workdir / "dmc.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for k in ("observations", "next_observations"):
            f[k] = rng.normal(size=(40, 17)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, (40, 6)).astype(np.float32)
        f["rewards"] = rng.normal(size=40).astype(np.float32)
        f["terminals"] = np.zeros(40, bool)
        f["timeouts"] = np.r_[np.zeros(39, bool), True]
    assert main(["synther", "offline", "--algo", "td3bc", "--dataset", str(path), "--env",
                 "dm_control/cheetah-run-v0", *TINY, "--terminals", "rule", "--run-dir", str(workdir / "dmc")]) == 2
    assert "no termination rule is known for 'dm_control/cheetah-run-v0'" in capsys.readouterr().err
    assert not (workdir / "dmc").exists()
