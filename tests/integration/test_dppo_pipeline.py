"""`diffrl dppo pretrain|finetune` end to end on Hopper-v5 through the CLI: the run directories, raw and EMA weights,
the chunk envs, the fine-tuned routing in `diffrl eval` (DPPO issue #29), the Gaussian and GMM baselines' plain PPO,
`--algo dpoer`, `dql`, `idql`, `dipo`, `qsm`, `drwr` and `dawr` on the same pre-training run, exact resume of killed
fine-tuning runs, the presets' env-step budgets, and one-sentence errors."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl.agents.dipo import DIPO
from diffrl.agents.dppo import DiffusionPolicy
from diffrl.agents.dql import DQL
from diffrl.agents.idql import IDQL, CandidateSelection
from diffrl.agents.ppo import GMMPPO, GaussianPolicy, GaussianPPO, GMMPolicy
from diffrl.agents.qsm import QSM
from diffrl.agents.rwr import DAWR, DRWR
from diffrl.cli import main
from diffrl.config import from_dict, to_dict
from diffrl.data import load_dataset
from diffrl.envs import VecEnv, make_env
from diffrl.envs.chunking import chunk_env, chunk_envs
from diffrl.envs.wrappers import MinMaxNormalization
from diffrl.errors import DiffrlWarning
from diffrl.eval import evaluate
from diffrl.eval.evaluate import EVAL_SEED_STREAM
from diffrl.pipelines import dppo
from diffrl.pipelines.chunk_policy import ChunkActor
from diffrl.registry import find_run
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.rundir import write_config
from diffrl.runs.seeding import derive_seed

PRE = ["--steps", "40", "--denoising-steps", "5", "--hidden", "32", "--gaussian-hidden", "32", "32", "32",
       "--batch-size", "32", "--ema-start", "10", "--ema-every", "2", "--log-every", "20", "--eval-episodes", "2",
       "--max-episode-steps", "40", "--no-progress"]
FT = ["--ft-denoising-steps", "3", "--n-envs", "2", "--n-steps", "8", "--batch-size", "12", "--update-epochs", "2",
      "--actor-lr", "1e-3", "--critic-hidden", "16", "16", "16", "--eval-every", "2", "--eval-episodes", "2",
      "--max-episode-steps", "40", "--checkpoint-every", "1", "--no-progress"]
DPOER_FT = [*FT, "--delay-alpha-update", "3", "--entropy-samples", "8"]
DQL_FT = ["--n-envs", "2", "--n-steps", "8", "--batch-size", "8", "--replay-ratio", "2", "--critic-hidden", "16", "16",
          "16", "--n-critic-warmup-itr", "1", "--eval-every", "2", "--eval-episodes", "2", "--max-episode-steps", "40",
          "--checkpoint-every", "1", "--no-progress"]
# the other baselines: DQL's loop settings (off-policy) or their own (DRWR, DAWR), tiny networks and inner loops
RUN_FT = ["--n-envs", "2", "--n-steps", "8", "--eval-every", "2", "--eval-episodes", "2", "--max-episode-steps", "40",
          "--checkpoint-every", "1", "--no-progress"]
BASELINE_FT = {
    "idql": [*DQL_FT, "--value-hidden", "16", "16", "16", "--num-candidates", "3"],
    "dipo": [*DQL_FT, "--action-gradient-steps", "2"],
    "qsm": DQL_FT,
    "drwr": [*RUN_FT, "--batch-size", "8", "--update-epochs", "2"],
    "dawr": [*RUN_FT, "--batch-size", "8", "--replay-ratio", "2", "--critic-update-ratio", "2", "--critic-hidden", "16",
             "16", "16", "--buffer-steps", "16"],
}


def rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def curve(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without its clocks: what an exact resume must reproduce."""
    return [{k: v for k, v in x.items() if k != "wall_s" and not k.startswith("perf/")} for x in rows(run_dir)]


def config(run_dir: Path) -> dppo.PretrainConfig | dppo.FinetuneConfig:
    """The run's saved config, as `diffrl eval` passes it."""
    return find_run(run_dir)[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dppo")


@pytest.fixture(scope="module")
def pretrained(workdir, hopper_random) -> Path:
    assert main(["dppo", "pretrain", "--dataset", str(hopper_random), *PRE, "--run-dir", str(workdir / "pre")]) == 0
    return workdir / "pre"


@pytest.fixture(scope="module")
def gaussian_pretrained(workdir, hopper_random) -> Path:
    assert main(["dppo", "pretrain", "--dataset", str(hopper_random), "--policy-type", "gaussian", *PRE,
                 "--run-dir", str(workdir / "gpre")]) == 0
    return workdir / "gpre"


@pytest.fixture(scope="module")
def finetuned(workdir, pretrained) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffrlWarning)  # the pre-trained model's clip_x0 is kept: nothing to say
        assert main(["dppo", "finetune", "--policy", str(pretrained), *FT, "--n-train-itr", "3",
                     "--run-dir", str(workdir / "ft")]) == 0
    return workdir / "ft"


def test_pretrain_keeps_raw_and_ema_weights_the_dataset_normalisation_and_evaluates_the_ema_policy(pretrained,
                                                                                                  hopper_random):
    s = summary(pretrained)
    assert s["pipeline"] == "dppo_pretrain" and s["gradient_steps"] == 40 and s["env_steps"] == 0
    meta = load_dataset(hopper_random).metadata
    expected = 100 * (s["eval_return_mean"] - meta["ref_min_score"]) / (meta["ref_max_score"] - meta["ref_min_score"])
    assert s["normalized_score"] == pytest.approx(expected) and s["eval_episodes"] == 2
    assert [int(r["step"]) for r in rows(pretrained)] == [20, 40]
    manifest, parts = ckpt.load_checkpoint(pretrained)
    policy = manifest["meta"]["policy"]
    assert policy["type"] == "diffusion" and policy["denoising_steps"] == 5 and policy["horizon_steps"] == 4
    raw, ema = parts["policy"]["model"], parts["policy"]["ema"]["shadow"]
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA lags the raw weights
    ds = load_dataset(hopper_random)
    fitted = MinMaxNormalization.fit(ds.observations, ds.actions).state_dict()
    assert all(np.array_equal(parts["normalization"][k], v) for k, v in fitted.items())
    # `diffrl eval` evaluates the same EMA policy the run evaluated at its end
    out = dppo.evaluate_run(pretrained, config(pretrained), episodes=2, device="cpu")
    assert out["return_mean"] == pytest.approx(s["eval_return_mean"]) and out["policy_type"] == "diffusion"
    assert s["eval_mean_path"] is False and out["eval_mean_path"] is False
    # `diffrl eval --path mean`: the noise-free DDPM mean path, another evaluation of the same weights
    assert main(["eval", str(pretrained), "--episodes", "2", "--path", "mean"]) == 0
    mean = json.loads((pretrained / f"eval-step-{out['checkpoint_step']}-2ep-mean.json").read_text())
    assert mean["eval_mean_path"] is True and mean["returns"] != out["returns"]


def test_finetune_announces_another_clip_x0_once_and_its_eval_mean_path_is_the_runs_evaluation(workdir, pretrained):
    assert dppo.load_pretrained(pretrained).spec.model_spec["diffusion"]["clip_x0"] == 1.0
    run = workdir / "ft-clip"
    with pytest.warns(DiffrlWarning, match=r"clip_x0=0.5, the pre-trained model at 1.0; pass --clip-x0 1.0"):
        assert main(["dppo", "finetune", "--policy", str(pretrained), *FT, "--n-train-itr", "1", "--clip-x0", "0.5",
                     "--eval-mean-path", "--run-dir", str(run)]) == 0
    s = summary(run)
    assert s["agent_params"]["clip_x0"] == 0.5 and s["eval_mean_path"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffrlWarning)  # not again when the finished run is evaluated
        # --path run: the run's own mean-path evaluation
        out = dppo.evaluate_run(run, config(run), episodes=2, device="cpu")
    assert out["eval_mean_path"] is True and out["return_mean"] == pytest.approx(s["eval_return_mean"])


def test_eval_path_is_refused_for_runs_of_other_pipelines(tmp_path, capsys):
    write_config(tmp_path, "train_sac", {"env": "Hopper-v5"})  # a registered non-DPPO pipeline
    assert main(["eval", str(tmp_path), "--path", "mean"]) == 2
    assert "--path mean applies to `diffrl dppo` runs only" in capsys.readouterr().err


def test_chunk_envs_sum_chunk_rewards_seed_episodes_and_replay_running_ones_exactly(pretrained):
    source = dppo.load_pretrained(pretrained)
    norm = source.normalization

    def envs() -> VecEnv:
        return chunk_envs("Hopper-v5", 2, 3, source.spec, norm)

    vec, rng = envs(), np.random.default_rng(0)
    obs = vec.reset()
    chunks = rng.uniform(-1, 1, (3, 2, 4, 3)).astype(np.float32)
    steps = [vec.step(c) for c in chunks[:2]]
    # by hand: env 1's first episode from its seed, the 4 executed actions un-normalised, rewards summed
    raw = make_env("Hopper-v5")
    o, _ = raw.reset(seed=derive_seed(3, 1, 0))
    np.testing.assert_array_equal(obs[1, -1], norm.normalize_obs(o))
    for k, step in enumerate(steps):
        total, n = 0.0, 0
        for a in norm.unnormalize_act(chunks[k, 1]):
            _, r, te, tr, _ = raw.step(a)
            total, n = total + float(r), n + 1
            if te or tr:
                break
        assert step.reward[1] == pytest.approx(total) and step.env_steps >= n
    # a copy rebuilt from the state dict continues bit-exactly
    state = vec.state_dict()
    copy = envs()
    np.testing.assert_array_equal(copy.load_state_dict(state), steps[-1].obs)
    a, b = vec.step(chunks[2]), copy.step(chunks[2])
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.reward, b.reward)


def test_finetune_logs_every_iteration_and_writes_the_run_directory(finetuned):
    s = summary(finetuned)
    assert s["pipeline"] == "dppo_finetune" and s["policy_type"] == "diffusion" and s["iterations"] == 3
    assert s["agent_params"]["denoising_steps"] == 5 and s["agent_params"]["ft_denoising_steps"] == 3  # K from pretrain
    assert s["gradient_steps"] == 3 * 2 * (2 * 8 * 3 // 12) and s["actor_updates"] == s["gradient_steps"]
    assert s["initial_eval_return"] is not None and s["normalized_score"] is not None
    assert {"rollout_s", "scoring_s", "update_s", "eval_s"} <= set(s["time_breakdown_s"])
    r = rows(finetuned)
    assert [x["itr"] for x in r] == ["0.0", "1.0", "2.0", "3.0"]  # the pre-trained policy at env step 0, then each
    steps = [int(x["env_steps"]) for x in r]
    assert steps[0] == 0 and all(b > a for a, b in zip(steps, steps[1:])) and steps[-1] == s["env_steps"]
    assert [x["eval/return_mean"] != "" for x in r] == [True, False, True, False]  # eval every 2; final: summary
    for key in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "perf/rollout_s_per_env_step",
                "perf/update_s_per_env_step", "train/reward_scale_std"):
        assert all(x[key] != "" for x in r[1:]), key
    # the clip schedule is exponential between base and coef (0.01 both here: DPPO's Gym setting)
    assert float(r[1]["clip_coef_mean"]) == pytest.approx(0.01)
    manifest, parts = ckpt.load_checkpoint(finetuned)
    assert manifest["meta"]["iteration"] == 3 and set(parts) == {"state", "normalization"}


def test_eval_of_a_finetuned_run_routes_the_last_k_prime_steps_to_the_finetuned_network(finetuned, pretrained):
    agent, source, _ = dppo.load_finetuned(finetuned, config(finetuned), device="cpu")
    policy = agent.policy
    assert isinstance(policy, DiffusionPolicy) and policy.chain_steps == 5 and policy.ft_steps == 3
    assert [policy.net_for_step(i) is policy.ft_net for i in range(5)] == [False, False, True, True, True]
    ema = ckpt.load_checkpoint(pretrained)[1]["policy"]["ema"]["shadow"]
    base = policy.base.state_dict()
    assert all(torch.equal(base[k], ema[k]) for k in ema)  # the frozen base is the pre-trained EMA model
    ft = policy.ft_net.state_dict()
    assert any(not torch.equal(ft[k], base[f"net.{k}"]) for k in ft)  # the fine-tuned copy moved
    # `diffrl eval` = the evaluation the run itself did (same routing, same episodes) ...
    finetuned_eval = dppo.evaluate_run(finetuned, config(finetuned), episodes=2, device="cpu")
    assert finetuned_eval["return_mean"] == pytest.approx(summary(finetuned)["eval_return_mean"])
    assert main(["eval", str(finetuned), "--episodes", "2"]) == 0
    # ... and it differs from the pre-trained policy only through the fine-tuned copy: reset that copy to the base
    # network and the same evaluation reproduces the pre-training run's exactly
    pretrained_eval = dppo.evaluate_run(pretrained, config(pretrained), episodes=2, device="cpu")
    assert finetuned_eval["returns"] != pretrained_eval["returns"]
    policy.ft_net.load_state_dict(policy.base.net.state_dict())
    env = chunk_env("Hopper-v5", source.spec, source.normalization, max_episode_steps=40)
    reset = evaluate(ChunkActor(policy, torch.device("cpu"), 0), env, 2, seed=0)
    assert reset.returns == pretrained_eval["returns"]


def test_a_gaussian_pretrain_run_is_finetuned_with_plain_ppo(workdir, gaussian_pretrained, capsys):
    s = summary(gaussian_pretrained)
    assert s["pipeline"] == "dppo_pretrain_gaussian" and s["policy_type"] == "gaussian"
    run = workdir / "gft"
    assert main(["dppo", "finetune", "--policy", str(gaussian_pretrained), *FT, "--n-train-itr", "2",
                 "--n-critic-warmup-itr", "1", "--run-dir", str(run)]) == 0
    s = summary(run)
    assert s["pipeline"] == "dppo_finetune_gaussian" and s["policy_type"] == "gaussian"
    # one transition per env step, and batch_size / K' per minibatch: DPPO's 2 * 8 * 3 / 12 = 4 minibatches an epoch
    assert s["gradient_steps"] == 2 * 2 * (2 * 8 // (12 // 3))
    assert s["actor_updates"] == s["gradient_steps"] // 2  # the first iteration trains the critic only
    assert [x["train/critic_only"] for x in rows(run)[1:]] == ["1.0", "0.0"]
    agent, _, _ = dppo.load_finetuned(run, config(run), device="cpu")
    assert isinstance(agent, GaussianPPO) and isinstance(agent.policy, GaussianPolicy)
    assert agent.num_transitions == 1
    r = rows(run)[1:]
    assert all(float(x["clip_coef_mean"]) == pytest.approx(0.01) for x in r)  # constant clip, no denoising schedule
    assert all(float(x["entropy"]) == pytest.approx(0.5 + 0.5 * np.log(2 * np.pi) + np.log(0.1), abs=0.05) for x in r)
    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    assert f"return {s['eval_return_mean']:.1f}" in capsys.readouterr().out


def test_a_gmm_pretrain_run_is_finetuned_with_ppo_and_a_killed_finetuning_run_resumes_exactly(workdir, hopper_random):
    pre, ft, part = workdir / "gmm-pre", workdir / "gmm-ft", workdir / "gmm-part"
    assert main(["dppo", "pretrain", "--dataset", str(hopper_random), "--policy-type", "gmm", *PRE, "--gmm-hidden",
                 "32", "32", "32", "--run-dir", str(pre)]) == 0
    s = summary(pre)
    assert s["pipeline"] == "dppo_pretrain_gmm" and s["policy"]["gmm"] == {
        "num_modes": 5, "hidden": [32, 32, 32], "residual": True, "activation": "mish", "std": 0.1}
    assert dppo.evaluate_run(pre, config(pre), episodes=2, device="cpu")["return_mean"] == pytest.approx(
        s["eval_return_mean"])  # `diffrl eval` evaluates the EMA policy the run evaluated
    # DPPO's clamp (-5, 2) on the joint log-density of a 4 x 3 chunk: nearly every sample sits on the upper bound
    assert main(["dppo", "finetune", "--policy", str(pre), *FT, "--n-train-itr", "1",
                 "--run-dir", str(workdir / "gmm-ft-dppo-clamp")]) == 0
    assert float(rows(workdir / "gmm-ft-dppo-clamp")[1]["logprob_clamped_frac"]) > 0.9
    # a wide clamp lets every sample count
    wide = ["--logprob-clamp", "-1000", "1000"]
    assert main(["dppo", "finetune", "--policy", str(pre), *FT, *wide, "--n-train-itr", "3", "--run-dir",
                 str(ft)]) == 0
    s = summary(ft)
    assert s["pipeline"] == "dppo_finetune_gmm" and s["policy_type"] == "gmm"
    assert s["agent_params"]["noise_clip"] is None and s["agent_params"]["num_modes"] == 5  # DPPO's GMM: unclipped
    assert s["gradient_steps"] == 3 * 2 * (2 * 8 // (12 // 3))  # one transition per env step, as the Gaussian
    r = rows(ft)[1:]
    assert all(float(x["logprob_clamped_frac"]) == 0 for x in r)
    # the bonus's entropy is the weighted joint entropy of the modes over Ta * Da = 12 elements, std 0.1 each
    assert all(float(x["entropy"]) == pytest.approx(12 * (0.5 + 0.5 * np.log(2 * np.pi) + np.log(0.1)), abs=0.5)
               for x in r)
    agent, _, _ = dppo.load_finetuned(ft, config(ft), device="cpu")
    assert isinstance(agent, GMMPPO) and isinstance(agent.policy, GMMPolicy)
    ema = ckpt.load_checkpoint(pre)[1]["policy"]["ema"]["shadow"]
    assert any(not torch.equal(agent.policy.state_dict()[k], v) for k, v in ema.items())  # PPO moved the policy
    assert dppo.evaluate_run(ft, config(ft), episodes=2, device="cpu")["return_mean"] == pytest.approx(
        s["eval_return_mean"])
    # killed after iteration 2's log row, before its checkpoint: the resumed run is the uninterrupted one
    assert main(["dppo", "finetune", "--policy", str(pre), *FT, *wide, "--n-train-itr", "2", "--run-dir",
                 str(part)]) == 0
    shutil.rmtree(ckpt.list_checkpoints(part / "checkpoints")[-1])
    assert main(["dppo", "finetune", "--resume", str(part), "--n-train-itr", "3", "--no-progress"]) == 0
    assert curve(part) == curve(ft)
    assert summary(part)["eval_return_mean"] == s["eval_return_mean"]


def test_unet_policy_is_finetuned_with_ddim_routing_the_last_k_prime_ddim_steps(workdir, hopper_random):
    pre, ft = workdir / "unet-pre", workdir / "unet-ft"
    assert main(["dppo", "pretrain", "--dataset", str(hopper_random), *PRE, "--denoiser", "unet", "--unet-dim", "8",
                 "--steps", "10", "--run-dir", str(pre)]) == 0
    assert ckpt.load_checkpoint(pre)[0]["meta"]["policy"]["model_spec"]["denoiser"]["type"] == "unet"
    assert main(["dppo", "finetune", "--policy", str(pre), *FT, "--use-ddim", "--ddim-steps", "3",
                 "--ft-denoising-steps", "2", "--n-train-itr", "1", "--run-dir", str(ft)]) == 0
    agent, source, _ = dppo.load_finetuned(ft, config(ft), device="cpu")
    policy = agent.policy
    assert isinstance(policy, DiffusionPolicy) and policy.use_ddim and policy.chain_steps == 3
    assert [policy.net_for_step(i) is policy.ft_net for i in range(3)] == [False, True, True]
    assert summary(ft)["gradient_steps"] == 2 * (2 * 8 * 2 // 12)
    # `diffrl eval` on the checkpoint reproduces the run's own final evaluation ...
    cfg = config(ft)
    out = dppo.evaluate_run(ft, cfg, episodes=2, device="cpu")
    assert out["return_mean"] == pytest.approx(summary(ft)["eval_return_mean"])
    # ... and its returns are the simulator's rewards of the policy's DDIM chunks, replayed step by step on a raw
    # Hopper from the eval seeds: executed prefix un-normalised, stopped at the episode's end
    actor = ChunkActor(policy, torch.device("cpu"), cfg.seed)
    norm, act_steps = source.normalization, source.spec.act_steps
    raw, returns = make_env("Hopper-v5", max_episode_steps=40), []
    for k in range(2):
        o, _ = raw.reset(seed=derive_seed(cfg.seed, EVAL_SEED_STREAM, k))
        total, done = 0.0, False
        while not done:
            chunk = actor.act(norm.normalize_obs(o.astype(np.float32))[None, None], deterministic=True)[0]
            for a in norm.unnormalize_act(chunk)[:act_steps]:
                o, r, te, tr, _ = raw.step(a.astype(raw.action_space.dtype))
                total += float(r)
                done = te or tr
                if done:
                    break
        returns.append(total)
    assert out["returns"] == pytest.approx(returns, rel=1e-12)  # up to the order of the float sums
    # the fine-tuned copy takes part: routed back to the base network, the same evaluation returns other values
    policy.ft_net.load_state_dict(policy.base.net.state_dict())
    env = chunk_env("Hopper-v5", source.spec, norm, max_episode_steps=40)
    assert evaluate(ChunkActor(policy, torch.device("cpu"), cfg.seed), env, 2, seed=cfg.seed).returns != returns


def test_resume_of_a_killed_finetuning_run_reproduces_the_uninterrupted_run(workdir, pretrained, finetuned):
    part = workdir / "part"
    assert main(["dppo", "finetune", "--policy", str(pretrained), *FT, "--n-train-itr", "2",
                 "--run-dir", str(part)]) == 0
    # killed after logging iteration 2 but before its checkpoint landed: resume must redo iteration 2
    newest = ckpt.list_checkpoints(part / "checkpoints")
    assert len(newest) == 2
    shutil.rmtree(newest[-1])
    assert main(["dppo", "finetune", "--resume", str(part), "--n-train-itr", "3", "--no-progress"]) == 0
    assert curve(part) == curve(finetuned)
    assert summary(part)["eval_return_mean"] == summary(finetuned)["eval_return_mean"]



def kill_and_resume(part: Path, algo: str, n_train_itr: int = 3) -> None:
    """Drop the newest checkpoint of a run (killed after logging its last iteration, before that checkpoint landed)
    and resume it to ``n_train_itr`` iterations."""
    shutil.rmtree(ckpt.list_checkpoints(part / "checkpoints")[-1])
    assert main(["dppo", "finetune", "--algo", algo, "--resume", str(part), "--n-train-itr", str(n_train_itr),
                 "--no-progress"]) == 0


def test_dpoer_is_dppos_loop_with_a_logged_temperature_and_a_killed_run_resumes_exactly(workdir, pretrained,
                                                                                      finetuned):
    full, part = workdir / "dpoer", workdir / "dpoer-part"
    argv = ["dppo", "finetune", "--algo", "dpoer", "--policy", str(pretrained), *DPOER_FT]
    assert main([*argv, "--n-train-itr", "3", "--run-dir", str(full)]) == 0
    s = summary(full)
    assert s["pipeline"] == "dppo_finetune_dpoer" and s["algo"] == "dpoer" and s["policy_type"] == "diffusion"
    assert s["agent_params"]["alpha_init"] == 0.272 and s["agent_params"]["entropy_estimator"] == "knn"
    assert s["gradient_steps"] == summary(finetuned)["gradient_steps"]  # DPPO's minibatches
    r, dppo_rows = rows(full), rows(finetuned)
    # the same seed rolls out as DPPO does: the pre-trained policy's evaluation and the first iteration's episodes
    assert r[0]["eval/return_mean"] == dppo_rows[0]["eval/return_mean"]
    assert r[1]["train/episode_return"] == dppo_rows[1]["train/episode_return"]
    alpha, h = ([float(x[k]) for x in r[1:]] for k in ("alpha", "entropy_estimate"))
    assert all(np.isfinite(float(x["temperature_loss"])) for x in r[1:])
    # this barely trained policy is far above the target -Ta Da = -12: the temperature only falls
    assert min(h) > -12 and 0.272 > alpha[0] > alpha[1] > alpha[2] > 0.26
    assert dppo.evaluate_run(full, config(full), episodes=2, device="cpu")["return_mean"] == pytest.approx(
        s["eval_return_mean"])
    # killed after iteration 2's log row: the resumed run restores alpha, its Adam state, the cached H, the
    # minibatch count of the entropy schedule and the entropy generator
    assert main([*argv, "--n-train-itr", "2", "--run-dir", str(part)]) == 0
    kill_and_resume(part, "dpoer")
    assert curve(part) == curve(full)


def test_dql_trains_the_whole_chain_off_policy_evaluates_in_diffrl_eval_and_a_killed_run_resumes_exactly(
        workdir, pretrained, capsys):
    full, part = workdir / "dql", workdir / "dql-part"
    argv = ["dppo", "finetune", "--algo", "dql", "--policy", str(pretrained), *DQL_FT]
    assert main([*argv, "--n-train-itr", "3", "--run-dir", str(full)]) == 0
    s = summary(full)
    assert s["pipeline"] == "dppo_finetune_dql" and s["algo"] == "dql" and s["policy_type"] == "diffusion"
    assert s["agent_params"]["horizon_steps"] == 4 and s["agent_params"]["cond_steps"] == 1  # the pre-trained chunking
    assert s["gradient_steps"] == 3 * (8 * 2 * 2 // 8) and s["updates_per_iteration"] == 4
    assert [x["train/critic_only"] for x in rows(full)[1:]] == ["1.0", "0.0", "0.0"]
    agent, _, _ = dppo.load_finetuned(full, config(full), device="cpu")
    policy = agent.policy
    assert isinstance(agent, DQL) and policy.ft_steps == policy.chain_steps == 5  # every denoising step trains
    ema = ckpt.load_checkpoint(pretrained)[1]["policy"]["ema"]["shadow"]
    assert all(torch.equal(policy.base.state_dict()[k], v) for k, v in ema.items())  # starts from the EMA model
    assert any(not torch.equal(v, ema[f"net.{k}"]) for k, v in policy.ft_net.state_dict().items())
    capsys.readouterr()
    assert main(["eval", str(full), "--episodes", "2"]) == 0  # the run's own final evaluation, through agent.policy
    assert f"return {s['eval_return_mean']:.1f}" in capsys.readouterr().out
    assert main([*argv, "--n-train-itr", "2", "--run-dir", str(part)]) == 0
    kill_and_resume(part, "dql")  # agent, replay buffer, running episodes
    assert curve(part) == curve(full)


@pytest.mark.parametrize(("algo", "agent", "resume"), [
    ("idql", IDQL, False), ("dipo", DIPO, True), ("qsm", QSM, False), ("drwr", DRWR, False), ("dawr", DAWR, True)])
def test_each_baseline_finetunes_through_the_cli_and_diffrl_eval_reproduces_its_final_evaluation(
        workdir, pretrained, capsys, algo, agent, resume):
    full = workdir / algo
    argv = ["dppo", "finetune", "--algo", algo, "--policy", str(pretrained), *BASELINE_FT[algo]]
    assert main([*argv, "--n-train-itr", "2", "--run-dir", str(full)]) == 0
    s = summary(full)
    assert s["pipeline"] == f"dppo_finetune_{algo}" and s["algo"] == algo and s["policy_type"] == "diffusion"
    assert s["iterations"] == 2 and s["agent_params"]["horizon_steps"] == 4  # the pre-trained chunking
    assert [x["itr"] for x in rows(full)] == ["0.0", "1.0", "2.0"]
    if algo in ("idql", "dipo", "qsm"):  # the chunk off-policy loop: 8 * 2 / 8 * 2 steps per iteration
        assert s["gradient_steps"] == 2 * 4 and s["updates_per_iteration"] == 4
    # the agent rebuilt from the checkpoint alone: DIPO acts with its EMA copy, IDQL by candidates scored by its
    # target critic (and V when exploring), so more than the chain's weights must come back
    restored, _, _ = dppo.load_finetuned(full, config(full), device="cpu")
    assert type(restored) is agent
    if algo == "dipo":
        assert restored.policy is restored.actor_target and restored.policy is not restored.actor
    if algo == "idql":
        policy = restored.policy
        assert isinstance(policy, CandidateSelection) and policy.critic_target is restored.critic_target
    assert dppo.evaluate_run(full, config(full), episodes=2, device="cpu")["return_mean"] == pytest.approx(
        s["eval_return_mean"])
    capsys.readouterr()
    assert main(["eval", str(full), "--episodes", "2"]) == 0
    assert f"return {s['eval_return_mean']:.1f}" in capsys.readouterr().out
    if resume:  # DIPO: rewritten buffer actions, EMA actor; DAWR: FIFO buffer, critic, running episodes
        part = workdir / f"{algo}-part"
        assert main([*argv, "--n-train-itr", "2", "--run-dir", str(part)]) == 0
        kill_and_resume(part, algo, n_train_itr=2)
        assert curve(part) == curve(full)
        assert summary(part)["eval_return_mean"] == s["eval_return_mean"]


@pytest.mark.parametrize(("algo", "message"), [
    ("bogus", "unknown algorithm 'bogus' for `diffrl dppo finetune`: choose one of dppo, dpoer, dql, idql, dipo, qsm, "
              "drwr, dawr"),
    ("dql", "--algo dql fine-tunes diffusion policies but"),
    ("dawr", "--algo dawr fine-tunes diffusion policies but"),
    ("dpoer", "pre-trained a gaussian policy; fine-tune it with --algo dppo"),
])
def test_an_unknown_algo_or_a_diffusion_method_on_a_gaussian_pretraining_run_is_one_sentence(
        workdir, gaussian_pretrained, capsys, algo, message):
    out = workdir / "bad-algo"
    assert main(["dppo", "finetune", "--algo", algo, "--policy", str(gaussian_pretrained), "--n-train-itr", "1",
                 "--no-progress", "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_every_finetuning_method_has_both_presets_at_dppos_env_step_budget(preset):
    ref = dppo.FinetuneConfig(policy=Path("runs/pre"), **dppo.PRESETS["finetune"][preset])
    for name, algo in dppo.FINETUNE_ALGOS.items():
        cfg = algo.config(policy=Path("runs/pre"), **algo.presets[preset])
        assert from_dict(algo.config, to_dict(cfg)) == cfg, name
        # chunks per iteration and iterations (the chunk length is the pre-training run's): the same env steps
        assert (cfg.n_envs, cfg.n_steps, cfg.n_train_itr, cfg.eval_every) == (
            ref.n_envs, ref.n_steps, ref.n_train_itr, ref.eval_every), name


def test_a_pretraining_checkpoint_in_the_layout_before_the_run_session_resumes_exactly_and_keeps_its_clocks(
        workdir, pretrained, hopper_random):
    run = workdir / "pre-old-layout"
    assert main(["dppo", "pretrain", "--dataset", str(hopper_random), *PRE, "--checkpoint-every", "20",
                 "--run-dir", str(run)]) == 0
    first, last = ckpt.list_checkpoints(run / "checkpoints")
    shutil.rmtree(last)  # killed before its final checkpoint landed
    # step 20 rewritten as pre-training wrote it before the run session: its loop fields at the top of `state`
    # (clocks set far ahead, so the resumed run shows whether it read them)
    manifest, parts = ckpt.load_checkpoint(first)
    assert set(parts["state"]) == {"rng", "loop"}
    parts["state"] = {"rng": parts["state"]["rng"], "wall_s": 2000.0, "last_eval": None,
                      "timers": {"train_s": 1000.0, "eval_s": 500.0}}
    ckpt.save_checkpoint(run / "checkpoints", 20, parts, manifest["meta"], keep_last=0)
    assert main(["dppo", "pretrain", "--resume", str(run), "--no-progress"]) == 0
    assert curve(run) == curve(pretrained)
    s = summary(run)
    assert s["eval_return_mean"] == summary(pretrained)["eval_return_mean"]
    assert s["wall_s"] > 2000.0 and s["time_breakdown_s"]["train_s"] > 1000.0
    assert s["time_breakdown_s"]["eval_s"] > 500.0


@pytest.mark.parametrize(("args", "message"), [
    (["--policy", "/nonexistent/pretrain-run"], "/nonexistent/pretrain-run does not exist"),
    (["--env", "Walker2d-v5"], "pre-trained on Hopper-v5 data"),
    (["--ft-denoising-steps", "8"], "invalid ft_denoising_steps=8: it must be <= the 5 transitions"),
    (["--horizon-steps", "8"], "horizon_steps=8 differs from the pre-trained policy's 4"),
])
def test_bad_finetune_inputs_get_one_sentence_and_write_nothing(workdir, pretrained, capsys, args, message):
    out = workdir / "bad"
    argv = ["dppo", "finetune", "--policy", str(pretrained), *FT, "--n-train-itr", "1", *args, "--run-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_presets_build_valid_configs_that_round_trip(preset):
    pre = dppo.PretrainConfig(dataset="d.hdf5", **dppo.PRESETS["pretrain"][preset])
    ft = dppo.FinetuneConfig(policy=Path("runs/pre"), **dppo.PRESETS["finetune"][preset])
    assert from_dict(dppo.PretrainConfig, to_dict(pre)) == pre and from_dict(dppo.FinetuneConfig, to_dict(ft)) == ft
    assert pre.denoising_steps == 20 and pre.horizon_steps == pre.act_steps == 4 and ft.ft_denoising_steps == 10
    if preset == "paper":  # DPPO's Hopper: 40 envs x 500 chunks x 4 actions; 200k pairs in 4 minibatches of 50k
        assert ft.n_envs * ft.n_steps * pre.act_steps == 80_000
        assert ft.n_envs * ft.n_steps * ft.ft_denoising_steps // ft.batch_size == 4 and pre.hidden == 512


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "/nonexistent/data.hdf5"], "/nonexistent/data.hdf5 does not exist"),
    (["--env", "Walker2d-v5"], "pass the env the dataset was collected on"),
])
def test_bad_pretrain_inputs_get_one_sentence_and_write_nothing(workdir, hopper_random, capsys, args, message):
    out = workdir / "bad-pre"
    assert main(["dppo", "pretrain", "--dataset", str(hopper_random), *PRE, *args, "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_finetuning_a_finetuning_run_or_resuming_across_stages_is_refused(workdir, pretrained, finetuned, capsys):
    assert main(["dppo", "finetune", "--policy", str(finetuned), *FT, "--run-dir", str(workdir / "bad2")]) == 2
    assert "pass the run directory of `diffrl dppo pretrain`" in capsys.readouterr().err
    assert main(["dppo", "finetune", "--resume", str(pretrained)]) == 2
    assert "diffrl dppo pretrain --resume" in capsys.readouterr().err
    assert not (workdir / "bad2").exists()
