"""SynthER online end to end: the CLI run directory, the synthetic buffer's life cycle, the real buffer left
untouched by generation, the mixing ratio, and exact resume of a killed run."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from diffrl.augment import TransitionLayout
from diffrl.augment.synther import SynthERGenerator
from diffrl.cli import main
from diffrl.data import ReplayBuffer
from diffrl.envs.termination import termination_rule
from diffrl.errors import ConfigError
from diffrl.pipelines import synther_online

TINY = ["--env", "Hopper-v5", "--steps", "500", "--learning-starts", "100", "--batch-size", "32", "--utd", "2",
        "--retrain-every", "200", "--diffusion-steps", "40", "--diffusion-width", "32", "--diffusion-depth", "2",
        "--diffusion-dim-t", "16", "--diffusion-batch-size", "32", "--num-samples", "300", "--sampler",
        "dpmpp_2m_sde", "--sample-steps", "4", "--eval-every", "200", "--eval-episodes", "1", "--log-every", "100",
        "--checkpoint-every", "200", "--hidden", "32", "32", "--no-progress"]


def test_cli_run_directory_and_wall_clock_breakdown(tmp_path) -> None:
    assert main(["synther", "online", *TINY, "--run-dir", str(tmp_path / "r")]) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["pipeline"] == "synther_online_sac" and s["env_steps"] == 500
    assert set(s["time_breakdown_s"]) >= {"env_s", "update_s", "diffusion_train_s", "sampling_s"}
    assert s["time_breakdown_s"]["diffusion_train_s"] > 0 and s["time_breakdown_s"]["sampling_s"] > 0
    rows = list(csv.DictReader((tmp_path / "r" / "metrics.csv").read_text().splitlines()))
    assert {"perf/env_s", "perf/update_s", "perf/diffusion_train_s", "perf/sampling_s"} <= set(rows[-1])
    retrains = [float(r["diffusion/retrains"]) for r in rows if r.get("diffusion/retrains")]
    assert retrains == [1.0, 2.0]  # at 201 and 401 env steps (none at the last step: its samples would go unused)
    assert main(["eval", str(tmp_path / "r"), "--episodes", "1"]) == 0


def test_resume_of_a_killed_run_reproduces_the_uninterrupted_run(tmp_path) -> None:
    assert main(["synther", "online", *TINY, "--run-dir", str(tmp_path / "full")]) == 0
    args = [a if a != "500" else "200" for a in TINY]  # stop at the first retrain boundary, before it retrains
    assert main(["synther", "online", *args, "--run-dir", str(tmp_path / "part")]) == 0
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["time_breakdown_s"]["diffusion_train_s"] == 0
    assert main(["synther", "online", "--resume", str(tmp_path / "part"), "--steps", "500"]) == 0
    curves = [[{k: v for k, v in r.items() if k != "wall_s" and not k.startswith("perf/") and not k.endswith("_s")}
               for r in csv.DictReader((tmp_path / d / "metrics.csv").read_text().splitlines())]
              for d in ("full", "part")]
    assert curves[0] == curves[1]


def _filled_buffer(n: int = 500) -> ReplayBuffer:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.for_transitions(1000, 11, 3, seed=0)
    buf.add_batch(obs=rng.normal(size=(n, 11)), act=rng.uniform(-1, 1, (n, 3)), rew=rng.normal(size=n),
                  next_obs=rng.normal(size=(n, 11)), done=(rng.uniform(size=n) < 0.05).astype(np.float32))
    return buf


def _digest(buf: ReplayBuffer) -> str:
    h = hashlib.sha256()
    for k in sorted(buf.storage):
        h.update(buf.storage[k].numpy().tobytes())
    return h.hexdigest() + f"{buf.ptr},{buf.size}"


def test_generation_replaces_the_synthetic_buffer_and_never_touches_real_data() -> None:
    cfg = synther_online.ALGOS["sac"](env="Hopper-v5", num_samples=200, diffusion_steps=20, diffusion_width=32,
                                      diffusion_depth=1, diffusion_dim_t=16, diffusion_batch_size=32,
                                      sampler="dpmpp_2m_sde", sample_steps=3, sample_batch_size=64)
    layout = TransitionLayout(11, 3)
    gen = SynthERGenerator(layout, cfg.generator_settings(layout), torch.device("cpu"), seed=0)
    real = _filled_buffer()
    before = _digest(real)
    m = gen.retrain(real)
    assert _digest(real) == before  # SynthER's PR #10 bug (live observation overwritten) cannot happen here
    assert len(gen.synthetic) == 200 and m["diffusion/retrains"] == 1.0
    first = gen.synthetic.storage["obs"][:200].clone()
    gen.retrain(real)
    assert len(gen.synthetic) == 200  # replaced, not appended
    assert not torch.equal(first, gen.synthetic.storage["obs"][:200])
    assert set(np.unique(gen.synthetic.storage["done"][:200].numpy())) <= {0.0, 1.0}
    assert gen.synthetic.storage["act"][:200].abs().max() <= 1.0
    batch = gen.sampler(real, 0.25).sample(40)
    assert len(batch["obs"]) == 40
    # --out-of-range reject reaches the generator: no synthetic action sits on a bound
    rejecting = SynthERGenerator(layout, dataclasses.replace(cfg, out_of_range="reject").generator_settings(layout),
                                 torch.device("cpu"), seed=0)
    m = rejecting.retrain(real)
    assert 0.0 <= m["diffusion/out_of_range_fraction"] < 0.98
    assert rejecting.synthetic.storage["act"][:200].abs().max() < 1.0 and len(rejecting.synthetic) == 200
    # --terminals rule: the synthetic flags are Hopper's rule on the generated next observation
    ruled = SynthERGenerator(layout, dataclasses.replace(cfg, terminals="rule").generator_settings(layout),
                             torch.device("cpu"), seed=0)
    m = ruled.retrain(real)
    nxt, done = ruled.synthetic.storage["next_obs"][:200].numpy(), ruled.synthetic.storage["done"][:200].numpy()
    np.testing.assert_array_equal(done, termination_rule("Hopper-v5")(nxt).astype(np.float32))
    assert "diffusion/terminal_rule_disagreement" in m
    dmc = synther_online.ALGOS["sac"](env="dm_control/cheetah-run-v0", terminals="rule")
    with pytest.raises(ConfigError, match="no termination rule"):
        dmc.generator_settings(TransitionLayout(17, 6, terminals=False))
    # 30 real rows come first in a mixed batch, then 10 synthetic ones
    real_rows = {tuple(np.round(r, 5)) for r in real.storage["obs"][:500].numpy()}
    from_real = [tuple(np.round(r, 5)) in real_rows for r in batch["obs"].numpy()]
    assert sum(from_real) == 30


def test_warm_start_continues_the_previous_model_and_survives_a_checkpoint() -> None:
    cfg = synther_online.ALGOS["sac"](env="Hopper-v5", num_samples=100, diffusion_steps=10, diffusion_width=32,
                                      diffusion_depth=1, diffusion_dim_t=16, diffusion_batch_size=32,
                                      sampler="dpmpp_2m_sde", sample_steps=3, warm_start=True)
    layout = TransitionLayout(11, 3)
    real = _filled_buffer()
    gen = SynthERGenerator(layout, cfg.generator_settings(layout), torch.device("cpu"), seed=0)
    gen.retrain(real)
    first = gen.trainer
    weights = [p.clone() for p in first.model.parameters()]
    gen.retrain(real)
    assert gen.trainer is first  # the same model, trained on
    # its EMA restarted at the refit (start_step, then this retrain's 10 steps), not 20 steps across two statistics
    assert first.ema.step == first.ema.start_step + 10
    assert any(not torch.equal(a, b) for a, b in zip(weights, first.model.parameters(), strict=True))
    state = gen.state_dict()
    assert state["trainer"] is not None
    other = SynthERGenerator(layout, cfg.generator_settings(layout), torch.device("cpu"), seed=0)
    other.load_state_dict(state, real)
    for a, b in zip(first.model.parameters(), other.trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(other.synthetic.storage["obs"], gen.synthetic.storage["obs"])


def test_dmc_defaults_and_the_800k_batch_rule_follow_synthers_configs() -> None:
    cfg = synther_online.ALGOS["sac"](env="Hopper-v5")
    assert cfg.resolved("Hopper-v5") == (True, True)  # OpenAI-gym config: terminals modelled, rewards z-scored
    assert cfg.resolved("dm_control/cheetah-run-v0") == (False, False)  # DMC config: neither
    forced = synther_online.ALGOS["sac"](env="Hopper-v5", model_terminals=False, normalize_reward=True)
    assert forced.resolved("dm_control/cheetah-run-v0") == (False, True)
    assert cfg.diffusion_batch_for(799_999) == 256 and cfg.diffusion_batch_for(800_000) == 1024
    assert synther_online.ALGOS["sac"](env="Hopper-v5", diffusion_batch_size=64).diffusion_batch_for(10**6) == 64
    layout = TransitionLayout(17, 6, terminals=False)
    skip = cfg.generator_settings(layout, normalize_reward=False).spec["normalizer"]["skip_dims"]
    assert skip == [layout.reward_index]
