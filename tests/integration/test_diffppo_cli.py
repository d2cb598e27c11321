"""`diffrl diffppo` end to end through the CLI on the tiny Hopper dataset: both modes, their stages, resume after a
stage and mid-PPO to the uninterrupted run's metrics, PPO's minibatches drawn from rollouts only (prior mode), the
augment control pre-trained on the real slice alone, and bad inputs refused in one sentence."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from diffrl.agents.ppo import GaussianPPO
from diffrl.cli import main
from diffrl.pipelines import diffppo, ppo
from diffrl.runs import checkpoint as ckpt

# 2 envs x 64 steps = 128 env steps per iteration, 3 iterations; tiny nets, a few diffusion steps
PPO = ["--env", "Hopper-v5", "--n-envs", "2", "--n-steps", "64", "--num-minibatches", "4", "--update-epochs", "2",
       "--max-episode-steps", "40", "--eval-every", "256", "--eval-episodes", "2", "--log-every", "128",
       "--checkpoint-every", "128", "--keep-checkpoints", "0", "--no-progress", "--steps", "384",
       "--hidden", "16", "16", "--critic-hidden", "16", "16"]
PRIOR = ["--mode", "prior", "--prior-steps", "40", "--prior-hidden", "32", "--prior-batch-size", "64",
         "--prior-denoising-steps", "5", "--prior-every", "1", "--q-hidden", "16", "16"]
AUGMENT = ["--mode", "augment", "--data-fraction", "0.2", "--diffusion-steps", "30", "--diffusion-width", "32",
           "--diffusion-depth", "1", "--diffusion-dim-t", "16", "--diffusion-batch-size", "64", "--sample-steps", "4",
           "--num-samples", "300", "--pretrain-steps", "20", "--pretrain-batch-size", "64"]


def curve(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without its clocks: what an exact resume must reproduce."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "wall_s" and not k.startswith("perf/")} for r in csv.DictReader(f)]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diffppo")


@pytest.fixture(scope="module")
def prior_run(workdir, hopper_random) -> tuple[Path, list[torch.Tensor], list[torch.Tensor]]:
    """The uninterrupted prior-mode run, recording every PPO minibatch's states and every rollout's."""
    batches: list[torch.Tensor] = []
    rollouts: list[torch.Tensor] = []
    update, after = GaussianPPO.update, diffppo.PriorHooks.after_update

    def record_update(self, batch, critic_only=False):
        batches.append(batch.obs.clone())
        return update(self, batch, critic_only)

    def record_after(self, itr, ro, agent, scaler):
        rollouts.append(ro.obs.flatten(0, 1).clone())
        batches.append(None)  # an iteration boundary
        return after(self, itr, ro, agent, scaler)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GaussianPPO, "update", record_update)
        mp.setattr(diffppo.PriorHooks, "after_update", record_after)
        run_dir = workdir / "prior"
        assert main(["diffppo", "--dataset", str(hopper_random), *PPO, *PRIOR, "--run-dir", str(run_dir)]) == 0
    return run_dir, batches, rollouts


@pytest.fixture(scope="module")
def augment_run(workdir, hopper_random) -> Path:
    run_dir = workdir / "augment"
    assert main(["diffppo", "--dataset", str(hopper_random), *PPO, *AUGMENT, "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_prior_mode_trains_the_prior_stage_then_ppo_with_proposals_kl_and_an_adapted_prior(prior_run):
    run_dir = prior_run[0]
    assert (run_dir / "prior" / "summary.json").is_file()
    s = summary(run_dir)
    assert s["pipeline"] == "diffppo" and s["mode"] == "prior" and s["env_steps"] == 384
    assert s["train_s"] > 0 and s["peak_rss_mib"] > 0 and s["prior_run"].endswith("prior")
    rows = curve(run_dir)
    assert [int(r["step"]) for r in rows] == [128, 256, 384]
    assert [float(r["diffppo/adapter_steps"]) for r in rows] == [1, 2, 3]  # prior_every 1
    assert [float(r["diffppo/beta"]) for r in rows] == [0.0, 1.0, 1.0]  # 0 -> 1 over 30% of 3 iterations
    assert all(float(r["diffppo/kl_bound"]) != 0 and float(r["diffppo/aux_nll"]) > 0 for r in rows)
    _, parts = ckpt.load_checkpoint(run_dir, parts=("state",))
    hooks = parts["state"]["hooks"]
    assert hooks["adapter_steps"] == 3
    assert any(float(v.abs().sum()) > 0 for k, v in hooks["adapters"].items() if k.endswith("lora_B"))


def test_prior_mode_ppo_minibatches_come_only_from_that_iterations_rollout(prior_run):
    _, batches, rollouts = prior_run
    itr, seen = 0, 0
    for b in batches:
        if b is None:
            itr += 1
            continue
        states = rollouts[itr]                                   # (M, 1, Do), the rollout's normalised states
        match = (b[:, None] == states[None]).all(-1).all(-1).any(1)  # each minibatch row is one of them
        assert bool(match.all())
        seen += 1
    assert itr == 3 and seen == 3 * 2 * 4  # 2 epochs x 4 minibatches per iteration


def test_prior_mode_resumes_after_its_stage_and_mid_ppo_to_the_uninterrupted_run(prior_run, workdir, hopper_random,
                                                                                 monkeypatch):
    whole = prior_run[0]
    killed = workdir / "prior-killed"

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ppo, "run", dies)  # after the prior's stage, before PPO
    assert main(["diffppo", "--dataset", str(hopper_random), *PPO, *PRIOR, "--run-dir", str(killed)]) == 130
    assert (killed / "prior" / "summary.json").is_file() and not (killed / "checkpoints").exists()
    monkeypatch.undo()
    stage = (killed / "prior" / "summary.json").stat().st_mtime_ns
    assert main(["diffppo", "--resume", str(killed), "--no-progress"]) == 0
    assert (killed / "prior" / "summary.json").stat().st_mtime_ns == stage  # not retrained
    assert curve(killed) == curve(whole)

    split = workdir / "prior-split"  # killed after the first iteration's checkpoint
    shutil.copytree(whole, split, symlinks=True)
    (split / "checkpoints" / ckpt.LATEST).unlink()
    for newer in ckpt.list_checkpoints(split / "checkpoints")[1:]:
        shutil.rmtree(newer)
    assert main(["diffppo", "--resume", str(split), "--no-progress"]) == 0
    assert curve(split) == curve(whole)


def test_augment_mode_pretrains_on_real_and_synthetic_data_and_resumes_to_the_uninterrupted_run(
        augment_run, workdir, hopper_random, monkeypatch):
    s = summary(augment_run)
    assert s["mode"] == "augment" and s["synthetic"] and s["num_samples"] == 300
    assert (augment_run / "diffusion" / "summary.json").is_file() and (augment_run / "samples.npz").is_file()
    assert s["pretrain_rows_synthetic"] == 300 and s["pretrain_rows_real"] == s["real_transitions"]
    assert s["real_episodes"] == round(0.2 * s["dataset_episodes"])

    killed = workdir / "augment-killed"
    monkeypatch.setattr(ppo, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["diffppo", "--dataset", str(hopper_random), *PPO, *AUGMENT, "--run-dir", str(killed)]) == 130
    assert (killed / "samples.npz").is_file() and not (killed / "checkpoints").exists()
    monkeypatch.undo()
    assert main(["diffppo", "--resume", str(killed), "--no-progress"]) == 0
    assert curve(killed) == curve(augment_run)

    split = workdir / "augment-split"
    shutil.copytree(augment_run, split, symlinks=True)
    (split / "checkpoints" / ckpt.LATEST).unlink()
    for newer in ckpt.list_checkpoints(split / "checkpoints")[1:]:
        shutil.rmtree(newer)
    assert main(["diffppo", "--resume", str(split), "--no-progress"]) == 0
    assert curve(split) == curve(augment_run)
    assert summary(split)["pretrain_rows_synthetic"] == 300  # the first attempt's pre-training figures are kept


def test_augment_control_pretrains_on_the_real_slice_alone(augment_run, workdir, hopper_random):
    control = workdir / "control"
    assert main(["diffppo", "--dataset", str(hopper_random), *PPO, *AUGMENT, "--no-synthetic",
                 "--run-dir", str(control)]) == 0
    s, with_synthetic = summary(control), summary(augment_run)
    assert not s["synthetic"] and s["pretrain_rows_synthetic"] == 0
    assert s["pretrain_rows_real"] == with_synthetic["pretrain_rows_real"]  # the same real slice
    assert not (control / "diffusion").exists() and not (control / "samples.npz").exists()
    assert s["pretrain_bc_loss"] != with_synthetic["pretrain_bc_loss"]


def test_bad_inputs_are_refused_in_one_sentence_before_anything_is_written(workdir, hopper_random, capsys):
    cases = [(["--env", "Walker2d-v5"], "observations have 11 dims but Walker2d-v5"),
             (["--data-fraction", "0.001"], "keeps no episode of the")]
    other = workdir / "hopper-v4.hdf5"  # same dims, recorded for another env id
    with h5py.File(hopper_random) as src, h5py.File(other, "w") as dst:
        for key in src:
            dst.create_dataset(key, data=src[key][()])
        meta = json.loads(src.attrs["diffrl_metadata"])
        dst.attrs["diffrl_metadata"] = json.dumps({**meta, "env_id": "Hopper-v4"})
    for flags, sentence in cases:
        bad = workdir / "bad"
        assert main(["diffppo", "--dataset", str(hopper_random), *PPO, *PRIOR, *flags, "--run-dir", str(bad)]) == 2
        err = capsys.readouterr().err
        assert sentence in " ".join(err.split()) and "Traceback" not in err
        assert not bad.exists()
    assert main(["diffppo", "--dataset", str(other), *PPO, *PRIOR, "--run-dir", str(workdir / "bad")]) == 2
    assert "was collected on Hopper-v4, not on --env Hopper-v5" in " ".join(capsys.readouterr().err.split())
