"""DPPO (Ren et al. 2024, arXiv:2409.00588): behaviour-clone a chunked diffusion policy, then fine-tune it with PPO
over the denoising MDP; the Gaussian baseline goes through the same two commands.

    diffrl dppo pretrain --dataset D [--policy-type diffusion|gaussian] [--preset quick|paper] [--seed S]
    diffrl dppo finetune --policy PRETRAIN_RUN_DIR [--env ID] [--ft-denoising-steps K'] [--use-ddim --ddim-steps S]
        [--n-envs N] [--preset quick|paper] [--seed S]
    diffrl dppo pretrain|finetune --resume RUN_DIR

Pre-training reads top to bottom: load the dataset, fit the min-max normalisation of observations and actions
(the env wrapper will use the same statistics), lay out every (history, chunk) sample that stays inside its
episode, train with :class:`~diffrl.diffusion.trainer.DiffusionTrainer` (epsilon-prediction DDPM loss, or the
Gaussian policy's BC loss; AdamW, cosine LR, EMA 0.995 copied until ``ema_start`` then updated every
``ema_every`` steps), checkpoint raw and EMA weights with the model spec and the normalisation, and evaluate the
EMA policy in the env.

Fine-tuning reads top to bottom: read the pre-training run (policy type, spec, normalisation, EMA weights, chunking),
build DPPO (or plain PPO for a Gaussian policy) and ``n_envs`` chunk envs, then each iteration: roll out ``n_steps``
chunks per env recording the ``K' + 1`` chains, score old log-probs and values, scale rewards, GAE, run
``update_epochs`` PPO epochs over (env step x denoising step) minibatches (critic only during warm-up), log,
evaluate, checkpoint. Evaluation routes the denoising steps exactly as training does (the same
:class:`~diffrl.agents.dppo.DiffusionPolicy`), so DPPO issue #29 cannot happen. Resume is exact on CPU.

Shapes: ``T`` rollout steps (chunks) per env, ``N`` envs, ``M = T N``, ``S`` scored transitions per env step
(``K'`` for DPPO, 1 for the Gaussian policy), ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk
length / action dim.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch

from diffrl.agents.dppo import (
    DPPO,
    ChunkPPO,
    DiffusionPolicy,
    DPPOParams,
    GaussianPolicy,
    GaussianPPO,
    GaussianPPOParams,
    PPOParams,
    dppo_model_spec,
)
from diffrl.agents.ppo_utils import RunningRewardScaler, gae, ppo_minibatches
from diffrl.config import (
    check,
    check_choice,
    check_non_negative,
    check_positive,
    check_unit_interval,
    from_dict,
    to_dict,
)
from diffrl.data import load_dataset, validate
from diffrl.data.datasets import normalized_score
from diffrl.data.sequence import ChunkDataset
from diffrl.diffusion.nets import ACTIVATIONS
from diffrl.diffusion.spec import build_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.envs import VecEnv, env_signature, make_env
from diffrl.envs.wrappers import ActionChunkEnv, MinMaxNormalization
from diffrl.errors import CheckpointError, ConfigError, DiffrlWarning
from diffrl.eval import evaluate
from diffrl.pipelines.common import RunConfig
from diffrl.pipelines.offline import fingerprint
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import Logger, check_finite
from diffrl.runs.progress import Progress
from diffrl.runs.rundir import check_resumable, new_run_dir, read_config, write_config, write_summary
from diffrl.runs.seeding import derive_seed, get_rng_state, seed_everything, set_rng_state

POLICY_TYPES = ("diffusion", "gaussian")
PIPELINES = {("pretrain", "diffusion"): "dppo_pretrain", ("pretrain", "gaussian"): "dppo_pretrain_gaussian",
             ("finetune", "diffusion"): "dppo_finetune", ("finetune", "gaussian"): "dppo_finetune_gaussian"}
SAMPLE_STREAM, MINIBATCH_STREAM, EVAL_NOISE_STREAM = 15_485_863, 32_452_843, 49_979_687  # derive_seed streams


# ------------------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass(frozen=True)
class EvalPathSettings:
    """How a diffusion chunk policy is evaluated (both DPPO stages)."""

    eval_mean_path: bool = False
    """evaluate a DDPM diffusion policy along the noise-free mean path instead of DPPO's sampled chain (not a sample
    of the policy PPO trains, but on diffrl's Walker2d BC policies the better controller: 56-58 vs 16-35; no effect
    on DDIM, whose eta-0 path is already noise-free, or on Gaussian policies)"""


@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainerSettings, EvalPathSettings, RunConfig):
    """``diffrl dppo pretrain``: behaviour cloning of a chunked policy (epsilon-prediction DDPM, or the Gaussian
    baseline). Steps of eval_every / log_every / checkpoint_every are gradient steps."""

    dataset: str = ""
    """Minari dataset id or a path to a D4RL .hdf5 / DPPO .npz file"""
    env: str | None = None
    """evaluation env id (default: the env recorded in the dataset)"""
    seed: int = 0
    """run seed"""
    policy_type: str = "diffusion"
    """diffusion (DPPO) or gaussian (the baseline fine-tuned with plain PPO)"""
    horizon_steps: int = 4
    """Ta, predicted action chunk length"""
    act_steps: int = 4
    """actions of a chunk executed in the env (<= horizon_steps)"""
    cond_steps: int = 1
    """To, observation history length the policy is conditioned on"""
    denoising_steps: int = 20
    """K, DDPM denoising steps (cosine schedule)"""
    denoiser: str = "mlp"
    """mlp (DPPO's residual DiffusionMLP with a time embedding) or unet (temporal 1-D UNet with FiLM)"""
    hidden: int = 512
    """MLP denoiser width (DPPO's Gym mlp_dims [512, 512, 512] = width 512, one residual block)"""
    blocks: int = 1
    """MLP denoiser residual blocks"""
    time_dim: int = 16
    """MLP denoiser time embedding width"""
    activation: str = "relu"
    """MLP denoiser activation (DPPO's Gym configs: ReLU)"""
    unet_dim: int = 32
    """UNet base width (widths unet_dim * mult must be divisible by 8)"""
    unet_dim_mults: tuple[int, ...] = (1, 2)
    """UNet width multipliers per level (DPPO: [1, 2])"""
    clip_x0: float | None = 1.0
    """clamp of the predicted clean chunk when sampling (DPPO's denoised_clip_value; data lie in [-1, 1])"""
    gaussian_hidden: tuple[int, ...] = (512, 512, 512)
    """Gaussian policy: hidden widths of the mean network"""
    gaussian_residual: bool = True
    """Gaussian policy: residual mean network (equal widths, odd count)"""
    gaussian_activation: str = "mish"
    """Gaussian policy: activation of the mean network"""
    gaussian_std: float = 0.1
    """Gaussian policy: the fixed std of behaviour cloning, and the initial std of fine-tuning (DPPO: 0.1)"""
    max_episode_steps: int | None = None
    """override the evaluation env's time limit (None keeps the registered one)"""
    steps: int = 1_560_000
    """gradient steps (DPPO: 200 epochs of a 1M-sample dataset at batch 128)"""
    batch_size: int = 128
    """samples per gradient step"""
    lr: float = 1e-3
    """peak learning rate (AdamW; DPPO: cosine 1e-3 -> 1e-4, here cosine to 0)"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    grad_clip: float = 0.0
    """gradient-norm clip (0: none, as DPPO's pre-training)"""
    ema_decay: float = 0.995
    """EMA decay of the weights that are evaluated and fine-tuned"""
    ema_every: int = 10
    """update the EMA every this many gradient steps"""
    ema_start: int = 156_000
    """copy the live weights into the EMA until this step (DPPO: 20 epochs)"""
    ema_warmup_power: float = 0.0
    """EMA decay ramp (0: constant decay, as DPPO)"""
    eval_every: int = 0
    """also evaluate every this many gradient steps (0: only at the end)"""
    log_every: int = 500
    """write a metrics row every this many gradient steps"""
    checkpoint_every: int = 100_000
    """write a checkpoint every this many gradient steps (and at the end)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.dataset), "dataset", self.dataset, "a Minari id or a dataset path (--dataset)")
        check_choice("policy_type", self.policy_type, POLICY_TYPES)
        check_choice("denoiser", self.denoiser, ("mlp", "unet"))
        for name in ("horizon_steps", "act_steps", "cond_steps", "denoising_steps", "hidden", "blocks", "time_dim",
                     "unet_dim", "gaussian_std"):
            check_positive(name, getattr(self, name))
        check(self.act_steps <= self.horizon_steps, "act_steps", self.act_steps,
              f"<= horizon_steps={self.horizon_steps}")
        check_choice("activation", self.activation, ACTIVATIONS)
        check(len(self.unet_dim_mults) > 0 and all(m > 0 and self.unet_dim * m % 8 == 0 for m in self.unet_dim_mults),
              "unet_dim_mults", self.unet_dim_mults, f"positive multipliers with unet_dim={self.unet_dim} * each "
              "divisible by 8 (the UNet's group norm)")
        check(self.clip_x0 is None or self.clip_x0 > 0, "clip_x0", self.clip_x0, "> 0 or None")
        check(self.max_episode_steps is None or self.max_episode_steps > 0, "max_episode_steps",
              self.max_episode_steps, "> 0")
        check(len(self.gaussian_hidden) > 0 and all(h > 0 for h in self.gaussian_hidden), "gaussian_hidden",
              self.gaussian_hidden, "one or more positive layer widths")
        if self.gaussian_residual:
            check(len(set(self.gaussian_hidden)) == 1 and len(self.gaussian_hidden) % 2 == 1, "gaussian_hidden",
                  self.gaussian_hidden, "an odd number of equal widths for a residual mean network (e.g. 512 512 "
                  "512), or pass --no-gaussian-residual")
        check_choice("gaussian_activation", self.gaussian_activation, ACTIVATIONS)


CHUNK_FIELDS = ("horizon_steps", "act_steps", "cond_steps", "denoising_steps")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(DPPOParams, EvalPathSettings, RunConfig):
    """``diffrl dppo finetune``: PPO fine-tuning of a pre-trained policy; DPPO over the last K' denoising steps of a
    diffusion policy, plain PPO for a Gaussian one (the type is read from the pre-training run). Steps of
    eval_every / log_every / checkpoint_every are iterations."""

    policy: Path | None = None
    """run directory of `diffrl dppo pretrain` (required): policy type, model, EMA weights, normalisation"""
    env: str | None = None
    """environment id (default: the pre-training run's; another env is refused)"""
    seed: int = 0
    """run seed (critic init, rollout noise, minibatches, episode resets)"""
    n_envs: int = 40
    """parallel environments (stepped in sequence)"""
    n_steps: int = 500
    """action chunks per env per iteration (an iteration runs about n_envs * n_steps * act_steps env steps)"""
    n_train_itr: int = 1000
    """fine-tuning iterations"""
    gamma: float = 0.99
    """discount per chunk (DPPO applies gamma once per executed chunk)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    update_epochs: int = 5
    """PPO epochs over each iteration's (env step x denoising step) pairs"""
    batch_size: int = 50_000
    """(env step, denoising step) pairs per minibatch (DPPO Hopper: 500 * 40 * 10 pairs / 50k = 4 minibatches)"""
    gaussian_batch_size: int | None = None
    """Gaussian policy only: env steps per minibatch (it scores one transition per env step); None: batch_size /
    ft_denoising_steps, so both policies take as many minibatches, and gradient steps, per epoch"""
    n_critic_warmup_itr: int = 0
    """first iterations that train only the critic (the actor is not stepped)"""
    reward_scale_running: bool = True
    """divide rewards by the running std of a discounted return (gamma 0.99), clipped to +-10 (DPPO)"""
    logprob_batch_size: int = 10_000
    """pairs per network call when scoring a rollout's old log-probs and values"""
    max_episode_steps: int | None = None
    """override the env's time limit (None keeps the registered one; DPPO's Gym runs: 1000)"""
    std_min: float = 0.01
    """Gaussian policy only: lower bound of the learnable std (DPPO: 0.01)"""
    std_max: float = 0.2
    """Gaussian policy only: upper bound of the learnable std (DPPO: 0.2)"""
    clip_ploss_coef_base: float = 0.01
    """PPO clip at the noisiest fine-tuned step (DPPO's Gym configs: 0.01 = no schedule; robomimic: 1e-3)"""
    horizon_steps: int | None = None  # type: ignore[assignment]
    """Ta (default: the pre-training run's; another value is refused)"""
    act_steps: int | None = None  # type: ignore[assignment]
    """executed actions per chunk (default: the pre-training run's; may be lowered to <= Ta)"""
    cond_steps: int | None = None  # type: ignore[assignment]
    """To (default: the pre-training run's; another value is refused)"""
    denoising_steps: int | None = None  # type: ignore[assignment]
    """K (default: the pre-trained model's; another value is refused)"""
    eval_every: int = 10
    """evaluate every this many iterations, and once before fine-tuning (0: only at the end)"""
    log_every: int = 1
    """write a metrics row every this many iterations"""
    checkpoint_every: int = 100
    """write a checkpoint every this many iterations (and at the end)"""

    RESUMABLE: ClassVar[frozenset[str]] = RunConfig.RESUMABLE | {"n_train_itr"}

    def __post_init__(self) -> None:
        # The chunk fields are None until the pre-training run fills them (agent_params), so DPPOParams' own checks
        # run through dppo_params below with stand-ins for whatever is still unknown.
        RunConfig.__post_init__(self)
        check(self.policy is not None, "policy", self.policy, "the run directory of `diffrl dppo pretrain` (--policy)")
        for name in CHUNK_FIELDS:
            value = getattr(self, name)
            check(value is None or value > 0, name, value, "> 0, or unset to take the pre-training run's")
        for name in ("n_envs", "n_steps", "n_train_itr", "update_epochs", "batch_size", "logprob_batch_size",
                     "std_min", "std_max"):
            check_positive(name, getattr(self, name))
        check(self.gaussian_batch_size is None or self.gaussian_batch_size > 0, "gaussian_batch_size",
              self.gaussian_batch_size, "> 0, or unset for batch_size / ft_denoising_steps")
        check_non_negative("n_critic_warmup_itr", self.n_critic_warmup_itr)
        check_unit_interval("gamma", self.gamma)
        check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", self.gae_lambda, "in [0, 1]")
        check(self.std_min <= self.std_max, "std_min", self.std_min, f"<= std_max={self.std_max}")
        check(self.max_episode_steps is None or self.max_episode_steps > 0, "max_episode_steps",
              self.max_episode_steps, "> 0")
        check(not self.use_ddim or self.ddim_steps is not None, "ddim_steps", self.ddim_steps,
              "set with --use-ddim (e.g. --ddim-steps 5)")
        horizon = self.horizon_steps or self.act_steps or 1
        k = self.denoising_steps or max(self.ft_denoising_steps, self.ddim_steps or 1)
        self.dppo_params(horizon, self.act_steps or 1, self.cond_steps or 1, k, ent_coef=0.0)

    def dppo_params(self, horizon_steps: int, act_steps: int, cond_steps: int, denoising_steps: int,
                    **override: Any) -> DPPOParams:
        """This config's DPPO hyper-parameters with the given chunking and K."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(DPPOParams)}
        values.update(horizon_steps=horizon_steps, act_steps=act_steps, cond_steps=cond_steps,
                      denoising_steps=denoising_steps, **override)
        return DPPOParams(**values)


# Named presets: `quick` runs on a 2-core CPU in minutes (Hopper-v5); `paper` is DPPO's Gym setting (GPU-sized).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "pretrain": {
        # Hopper-v5 `data collect --kind medium --preset quick` (100k transitions): 15 s on one core, EMA policy 183
        # (the data's episodes: 193)
        "quick": dict(hidden=256, gaussian_hidden=(256, 256, 256), steps=5_000, batch_size=128, ema_start=500,
                      log_every=250, checkpoint_every=2_500, eval_episodes=5),
        # cfg/gym/pretrain/hopper-medium-v2 (v0.7, brief section 2): K 20, Ta 4, [512] * 3 residual ReLU, time_dim 16,
        # batch 128, lr 1e-3, 200 epochs; EMA 0.995 every 10 batches from epoch 20 (1M samples: 7.8k batches/epoch)
        "paper": dict(denoising_steps=20, horizon_steps=4, act_steps=4, hidden=512, blocks=1, time_dim=16,
                      activation="relu", steps=1_560_000, batch_size=128, lr=1e-3, weight_decay=1e-6,
                      ema_decay=0.995, ema_every=10, ema_start=156_000, checkpoint_every=100_000, eval_episodes=10),
    },
    "finetune": {
        # ~4k env steps per iteration, 20 iterations: 76 s on one core; DPPO lifts that policy from 183 to 275
        "quick": dict(n_envs=4, n_steps=250, n_train_itr=20, ft_denoising_steps=10, batch_size=2_500,
                      update_epochs=5, eval_every=5, eval_episodes=5, checkpoint_every=5),
        # cfg/gym/finetune/hopper-v2/ft_ppo_diffusion_mlp.yaml (v0.7, brief section 1): 40 envs x 500 chunks x 4
        # actions = 80k env steps per iteration, K' 10, batch 50k pairs, 5 epochs, actor 1e-4 / critic 1e-3
        "paper": dict(n_envs=40, n_steps=500, n_train_itr=1000, ft_denoising_steps=10, batch_size=50_000,
                      update_epochs=5, actor_lr=1e-4, critic_lr=1e-3, gamma=0.99, gae_lambda=0.95,
                      gamma_denoising=0.99, clip_ploss_coef=0.01, clip_ploss_coef_base=0.01, min_sampling_std=0.1,
                      min_logprob_std=0.1, noise_clip=3.0, n_critic_warmup_itr=0, max_episode_steps=1000,
                      eval_every=10, eval_episodes=10, checkpoint_every=100),
    },
}


def load_config(run_dir: Path) -> PretrainConfig | FinetuneConfig:
    """The config a ``diffrl dppo`` run was started with (from its ``config.yaml``)."""
    saved = read_config(run_dir)
    stage = next((s for (s, _), name in PIPELINES.items() if name == saved.get("pipeline")), None)
    if stage is None:
        raise CheckpointError(f"{run_dir} is a {saved.get('pipeline')} run, not a `diffrl dppo` run.")
    return from_dict(PretrainConfig if stage == "pretrain" else FinetuneConfig, saved["config"])


# ------------------------------------------------------------------------------------------- policies and envs
class _GaussianBC(GaussianPolicy):
    """The Gaussian policy with the trainer's ``loss(x, cond, generator)``: chunks ``x (B, Ta, Da)`` given flattened
    histories ``cond (B, To * Do)`` (its state dict is a plain :class:`GaussianPolicy`'s)."""

    def loss(self, x: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return self.bc_loss(cond, x)  # type: ignore[arg-type]


def policy_meta(cfg: PretrainConfig, obs_dim: int, act_dim: int) -> dict[str, Any]:
    """What a checkpoint records to rebuild the policy: type, dims, chunking and the architecture."""
    meta: dict[str, Any] = {"type": cfg.policy_type, "obs_dim": obs_dim, "act_dim": act_dim,
                            "horizon_steps": cfg.horizon_steps, "act_steps": cfg.act_steps,
                            "cond_steps": cfg.cond_steps}
    if cfg.policy_type == "diffusion":
        shape = DPPOParams(horizon_steps=cfg.horizon_steps, act_steps=cfg.act_steps, cond_steps=cfg.cond_steps,
                           denoising_steps=cfg.denoising_steps, ft_denoising_steps=1, clip_x0=cfg.clip_x0)
        spec = dppo_model_spec(obs_dim, act_dim, shape, hidden=cfg.hidden, blocks=cfg.blocks, time_dim=cfg.time_dim,
                               activation=cfg.activation)
        if cfg.denoiser == "unet":
            spec["denoiser"] = {"type": "unet", "dim": cfg.unet_dim, "dim_mults": list(cfg.unet_dim_mults)}
        meta.update(denoising_steps=cfg.denoising_steps, model_spec=spec)
    else:
        meta["gaussian"] = {"hidden": list(cfg.gaussian_hidden), "residual": cfg.gaussian_residual,
                            "activation": cfg.gaussian_activation, "std": cfg.gaussian_std}
    return meta


def _gaussian(meta: dict[str, Any], std_min: float, std_max: float, cls: type = GaussianPolicy) -> GaussianPolicy:
    g = meta["gaussian"]
    return cls(meta["obs_dim"], meta["act_dim"], meta["horizon_steps"], meta["cond_steps"], hidden=tuple(g["hidden"]),
               residual=g["residual"], activation=g["activation"], std_init=min(max(g["std"], std_min), std_max),
               std_min=std_min, std_max=std_max)


def pretrained_policy(meta: dict[str, Any], weights: dict[str, torch.Tensor],
                      source: Path | str = "the checkpoint") -> DiffusionPolicy | GaussianPolicy:
    """A pre-trained policy ready to act: the DDPM behind a :class:`DiffusionPolicy` whose fine-tuned copy is still
    the pre-trained network (so it acts through the routing fine-tuning will use), or the Gaussian policy."""
    if meta["type"] == "diffusion":
        model = build_model(meta["model_spec"])
        ckpt.load_weights(model, weights, source)
        return DiffusionPolicy(model, 1, clip_x0=model.clip_x0)  # type: ignore[arg-type]
    std = float(meta["gaussian"]["std"])
    policy = _gaussian(meta, std, std)
    ckpt.load_weights(policy, weights, source)
    return policy


class ChunkActor:
    """A chunk policy as :func:`~diffrl.eval.evaluate` sees it: normalised histories ``(1, To, Do)`` -> normalised
    chunks ``(1, Ta, Da)``, sampled for evaluation (DPPO's DDPM chain, noise except at t = 0 / DDIM eta 0 /
    Gaussian mean) through the policy's own routing of denoising steps. The chain's noise comes from the actor's
    own generator, so an evaluation is reproducible and draws nothing from the training RNGs. ``mean_path``: the
    noise-free DDPM mean path instead (:meth:`DiffusionPolicy.chain`)."""

    def __init__(self, policy: DiffusionPolicy | GaussianPolicy, device: torch.device, seed: int,
                 mean_path: bool = False) -> None:
        self.policy, self.device, self.mean_path = policy.to(device).eval(), device, mean_path
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(seed, EVAL_NOISE_STREAM))

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return self.policy.act(o, deterministic, self.generator, self.mean_path and deterministic)[0].cpu().numpy()


def chunk_wrapper(meta: dict[str, Any], normalization: MinMaxNormalization,
                  act_steps: int | None = None) -> Callable[[gym.Env], ActionChunkEnv]:
    """Wraps an env to execute the policy's chunks in the normalised units of its data."""
    return lambda env: ActionChunkEnv(env, act_steps or meta["act_steps"], meta["cond_steps"], meta["horizon_steps"],
                                      normalization)


def chunk_env(env_id: str, meta: dict[str, Any], normalization: MinMaxNormalization, act_steps: int | None = None,
              max_episode_steps: int | None = None) -> ActionChunkEnv:
    """``make_env(env_id)`` executing the policy's chunks (:func:`chunk_wrapper`)."""
    return chunk_wrapper(meta, normalization, act_steps)(make_env(env_id, max_episode_steps=max_episode_steps))


def _normalized(returns: list[float], refs: dict[str, float] | None) -> float | None:
    """D4RL's normalised score x100 of the mean return (OfflineDataset.normalized_score) with the dataset's refs."""
    if not refs:
        return None
    return float(normalized_score(np.mean(returns), refs["min"], refs["max"]))


def _evaluate(policy: DiffusionPolicy | GaussianPolicy, env: gym.Env, episodes: int, seed: int,
              device: torch.device, refs: dict[str, float] | None, mean_path: bool) -> dict[str, float]:
    """``evaluate`` (deterministic, eval seeds) of a chunk policy; metrics with the normalised score."""
    result = evaluate(ChunkActor(policy, device, seed, mean_path), env, episodes, seed=seed)
    out = result.metrics()
    score = _normalized(result.returns, refs)
    if score is not None:
        out["eval/normalized_score"] = score
    return out


def chunk_envs(env_id: str, num_envs: int, seed: int, meta: dict[str, Any], normalization: MinMaxNormalization,
               act_steps: int | None = None, max_episode_steps: int | None = None) -> VecEnv:
    """``num_envs`` seeded :class:`ActionChunkEnv` copies (:class:`~diffrl.envs.VecEnv`'s explicit resets and exact
    replay; episode lengths count env steps)."""
    return VecEnv(env_id, num_envs, seed, max_episode_steps=max_episode_steps,
                  wrap=chunk_wrapper(meta, normalization, act_steps))


# ----------------------------------------------------------------------------------------------- pre-training
def pretrain(cfg: PretrainConfig) -> Path:
    """Behaviour-clone ``cfg``'s policy on ``cfg.dataset`` and evaluate it; returns the run directory."""
    pipeline = PIPELINES["pretrain", cfg.policy_type]
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    ds = load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = cfg.env or ds.metadata.get("env_id")
    if not env_id:
        raise ConfigError(f"dataset {cfg.dataset} records no environment; pass --env ID for evaluation.")
    if cfg.env is None:
        validate(ds, env_id, source=str(cfg.dataset))
    seed_everything(cfg.seed)
    norm = MinMaxNormalization.fit(ds.observations, ds.actions)  # the env wrapper uses these same statistics
    data = ChunkDataset.from_offline(ds, horizon_steps=cfg.horizon_steps, cond_steps=cfg.cond_steps,
                                     normalization=norm, device=device)
    obs, chunks = data.tensors()  # (M, To, Do), (M, Ta, Da): chunks never cross an episode's end
    meta = policy_meta(cfg, ds.obs_dim, ds.act_dim)
    eval_env = chunk_env(env_id, meta, norm, max_episode_steps=cfg.max_episode_steps)
    signature = env_signature(env_id, eval_env.env)
    refs = ({"min": float(ds.metadata["ref_min_score"]), "max": float(ds.metadata["ref_max_score"])}
            if ds.metadata.get("ref_min_score") is not None and ds.metadata.get("ref_max_score") is not None
            and ds.metadata["ref_max_score"] != ds.metadata["ref_min_score"] else None)
    model = build_model(meta["model_spec"]) if cfg.policy_type == "diffusion" else _gaussian(
        meta, cfg.gaussian_std, cfg.gaussian_std, _GaussianBC)  # DPPO clones the Gaussian mean with a fixed std
    trainer = DiffusionTrainer(model.to(device), chunks, cfg, cond=obs.flatten(1), seed=cfg.seed)  # type: ignore[arg-type]
    data_id = fingerprint(ds)

    resumed, wall_offset, last_eval = cfg.resume is not None, 0.0, None
    timers = {"train_s": 0.0, "eval_s": 0.0}
    if resumed:
        run_dir = Path(cfg.resume)  # type: ignore[arg-type]
        check_resumable(run_dir, pipeline, cfg)
        manifest, parts = ckpt.load_checkpoint(run_dir, parts=("policy", "state"))
        if manifest["meta"].get("dataset_fingerprint") != data_id:
            raise CheckpointError(f"the dataset {cfg.dataset} differs from the one {run_dir} was trained on; "
                                  "resume with the same data (nothing was changed).")
        ckpt.load_weights(trainer, parts["policy"], run_dir)
        state = parts["state"]
        wall_offset, last_eval, timers = float(state["wall_s"]), state["last_eval"], dict(state["timers"])
        set_rng_state(state["rng"])
    else:
        name = Path(cfg.dataset).stem if Path(cfg.dataset).suffix else cfg.dataset
        run_dir = new_run_dir(pipeline, name, cfg.seed, cfg.runs_root, cfg.run_dir)
    write_config(run_dir, pipeline, to_dict(cfg))
    logger = Logger(run_dir, resume_step=trainer.step if resumed else None, wall_offset=wall_offset,
                    wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))
    ckpt_meta = {"pipeline": pipeline, "policy": meta, "env": signature, "ref_scores": refs,
                 "dataset": str(cfg.dataset), "dataset_fingerprint": data_id, "seed": cfg.seed}

    def save() -> None:
        # "policy" holds the raw weights, the EMA (what is evaluated and fine-tuned), the optimiser and the batch RNG
        parts = {"policy": trainer.state_dict(), "normalization": norm.state_dict(),
                 "state": {"rng": get_rng_state(), "wall_s": logger.wall_s(), "last_eval": last_eval,
                           "timers": timers}}
        meta_now = {**ckpt_meta, "gradient_steps": trainer.step}
        ckpt.save_checkpoint(run_dir / "checkpoints", trainer.step, parts, meta_now, keep_last=cfg.keep_checkpoints)

    def evaluate_ema() -> dict[str, float]:
        t0 = time.perf_counter()
        weights = trainer.ema.shadow.state_dict()
        out = _evaluate(pretrained_policy(meta, weights), eval_env, cfg.eval_episodes, cfg.seed, device, refs,
                        cfg.eval_mean_path)
        timers["eval_s"] += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ loop
    bar = Progress(cfg.steps, initial=trainer.step, desc=f"dppo pretrain {cfg.policy_type}", unit="step",
                   enabled=cfg.progress)
    losses: list[torch.Tensor] = []
    start_step, t_rate, steps_rate, last_loss = trainer.step, time.perf_counter(), trainer.step, float("nan")
    while trainer.step < cfg.steps:
        t0 = time.perf_counter()
        losses.append(trainer.train_step())
        timers["train_s"] += time.perf_counter() - t0
        step = trainer.step
        row: dict[str, float] = {}
        on_grid = cfg.eval_every > 0 and step % cfg.eval_every == 0
        if on_grid or step == cfg.steps:  # off-grid final evaluation: summary only (see pipelines.online)
            last_eval = evaluate_ema()
            if on_grid:
                row.update(last_eval)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            last_loss = float(torch.stack(losses).mean())
            row.update({"train/loss": last_loss, "train/lr": trainer.opt.param_groups[0]["lr"],
                        "perf/steps_per_s": (step - steps_rate) / max(now - t_rate, 1e-9)})
            check_finite(row, step, run_dir)
            losses, t_rate, steps_rate = [], now, step
        if row:
            logger.log(step, row)
        bar.update(1, loss=last_loss, **({"eval": last_eval["eval/return_mean"]} if last_eval else {}))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
    bar.close()
    logger.close()
    if last_eval is None:  # resumed at the end: evaluate once more for the summary
        last_eval = evaluate_ema()

    # ------------------------------------------------------------------ summary
    summary = {"pipeline": pipeline, "policy_type": cfg.policy_type, "dataset": str(cfg.dataset), "env_id": env_id,
               "seed": cfg.seed, "gradient_steps": trainer.step, "env_steps": 0, "wall_s": logger.wall_s(),
               "final_loss": last_loss, "updates_per_s": (trainer.step - start_step) / max(timers["train_s"], 1e-9),
               "eval_return_mean": last_eval["eval/return_mean"], "eval_return_std": last_eval["eval/return_std"],
               "eval_length_mean": last_eval["eval/length_mean"],
               "normalized_score": last_eval.get("eval/normalized_score"), "eval_episodes": cfg.eval_episodes,
               "eval_mean_path": cfg.eval_mean_path, "transitions": len(ds), "chunk_samples": len(data), "policy": meta,
               "time_breakdown_s": timers}
    write_summary(run_dir, summary)
    eval_env.close()
    return run_dir


# ------------------------------------------------------------------------------------------------- fine-tuning
@dataclasses.dataclass
class Source:
    """What fine-tuning takes from a pre-training run (or, on resume / evaluation, from its own checkpoint)."""

    run_dir: Path
    policy: dict[str, Any]       # policy_meta of the pre-training run
    env: dict[str, Any]          # env signature the data came from
    normalization: MinMaxNormalization
    ref_scores: dict[str, float] | None
    dataset: str
    weights: dict[str, torch.Tensor] | None  # EMA weights (None: the agent state of a checkpoint supplies them)


def _source(run_dir: Path, manifest: dict[str, Any], parts: dict[str, Any], weights: bool) -> Source:
    meta = manifest["meta"]
    norm = MinMaxNormalization.from_state_dict(parts["normalization"])
    return Source(Path(run_dir), meta["policy"], meta["env"], norm, meta.get("ref_scores"), str(meta.get("dataset")),
                  parts["policy"]["ema"]["shadow"] if weights else None)


def load_pretrained(run_dir: Path) -> Source:
    """The EMA policy, normalisation and settings of a ``diffrl dppo pretrain`` run (one sentence if it is not one)."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--policy {run_dir} does not exist; pass the run directory of `diffrl dppo pretrain`.")
    pipeline = read_config(run_dir).get("pipeline")
    if pipeline not in (PIPELINES["pretrain", "diffusion"], PIPELINES["pretrain", "gaussian"]):
        raise ConfigError(f"--policy {run_dir} is a {pipeline} run; pass the run directory of `diffrl dppo pretrain`.")
    manifest, parts = ckpt.load_checkpoint(run_dir, parts=("policy", "normalization"))
    return _source(run_dir, manifest, parts, weights=True)


def agent_params(cfg: FinetuneConfig, policy: dict[str, Any]) -> DPPOParams | GaussianPPOParams:
    """``cfg``'s PPO settings with the pre-trained policy's chunking and K (a conflicting value is refused)."""
    for name in CHUNK_FIELDS:
        given, saved = getattr(cfg, name), policy.get(name)
        if given is not None and saved is not None and given != saved and name != "act_steps":
            raise ConfigError(f"{name}={given} differs from the pre-trained policy's {saved}; leave --"
                              f"{name.replace('_', '-')} unset (fine-tuning keeps the pre-trained model's).")
    ta, to = policy["horizon_steps"], policy["cond_steps"]
    act = cfg.act_steps if cfg.act_steps is not None else policy["act_steps"]
    if policy["type"] == "diffusion":
        return cfg.dppo_params(ta, act, to, policy["denoising_steps"])
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PPOParams)}
    common.update(horizon_steps=ta, act_steps=act, cond_steps=to)
    g = policy["gaussian"]
    return GaussianPPOParams(**common, hidden=tuple(g["hidden"]), residual=g["residual"], activation=g["activation"],
                             std_init=min(max(g["std"], cfg.std_min), cfg.std_max), std_min=cfg.std_min,
                             std_max=cfg.std_max)


def build_agent(source: Source, params: PPOParams, device: torch.device) -> ChunkPPO:
    """DPPO on the pre-trained DDPM, or plain PPO on the pre-trained Gaussian policy (EMA weights when given)."""
    meta = source.policy
    if meta["type"] == "diffusion":
        model = build_model(meta["model_spec"])
        if source.weights is not None:
            ckpt.load_weights(model, source.weights, source.run_dir)
        return DPPO(model, meta["obs_dim"], params, device)  # type: ignore[arg-type]
    p: GaussianPPOParams = params  # type: ignore[assignment]
    policy = _gaussian(meta, p.std_min, p.std_max)
    if source.weights is not None:
        ckpt.load_weights(policy, source.weights, source.run_dir)
    return GaussianPPO(meta["obs_dim"], meta["act_dim"], p, device, policy=policy)


@dataclasses.dataclass
class Rollout:
    """One iteration's experience (``T`` chunks from each of ``N`` envs)."""

    obs: torch.Tensor            # (T, N, To, Do) normalised histories acted from
    chains: torch.Tensor         # (T, N, S + 1, Ta, Da) recorded chains (K' + 1 states for DPPO)
    rewards: np.ndarray          # (T, N) summed over each chunk's executed actions
    terminated: np.ndarray       # (T, N) bool
    truncated: np.ndarray        # (T, N) bool
    final_obs: dict[tuple[int, int], np.ndarray]  # (t, i) -> true final history of an episode truncated there
    last_obs: np.ndarray         # (N, To, Do) where the next rollout starts
    env_steps: int
    episodes: list[tuple[float, int]]


def collect(agent: ChunkPPO, envs: VecEnv, obs: np.ndarray, n_steps: int, generator: torch.Generator) -> Rollout:
    """Roll out ``n_steps`` chunks per env with exploration noise, recording the chains PPO re-scores."""
    T, N = n_steps, envs.num_envs
    obs_buf = torch.zeros((T, N, *obs.shape[1:]), device=agent.device)
    chains: torch.Tensor | None = None
    rewards, term, trunc = np.zeros((T, N)), np.zeros((T, N), dtype=bool), np.zeros((T, N), dtype=bool)
    final: dict[tuple[int, int], np.ndarray] = {}
    env_steps, episodes = 0, []
    for t in range(T):
        o = torch.as_tensor(obs, dtype=torch.float32, device=agent.device)
        action, chain = agent.sample(o, deterministic=False, generator=generator)  # (N, Ta, Da), (N, S + 1, Ta, Da)
        if chains is None:
            chains = torch.zeros((T, *chain.shape), device=agent.device)  # type: ignore[union-attr]
        obs_buf[t], chains[t] = o, chain
        step = envs.step(action.cpu().numpy())
        rewards[t], term[t], trunc[t] = step.reward, step.terminated, step.truncated
        final.update({(t, i): step.next_obs[i] for i in np.flatnonzero(step.truncated)})  # type: ignore[index]
        env_steps += step.env_steps
        episodes += [(ret, length) for _, ret, length, _ in step.finished]
        obs = step.obs
    return Rollout(obs_buf, chains, rewards, term, trunc, final, obs, env_steps, episodes)  # type: ignore[arg-type]


def advantages(agent: ChunkPPO, ro: Rollout, cfg: FinetuneConfig, scaler: RunningRewardScaler | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Values ``(M,)``, GAE advantages and returns ``(M,)`` of a rollout (rewards scaled first).

    Bootstrapping is masked by termination only; after a time-limit truncation the value of the TRUE final
    observation is used (DPPO uses the auto-reset observation's), and the GAE recursion stops at either end.
    """
    T, N = ro.rewards.shape
    values = agent.values(ro.obs.flatten(0, 1), cfg.logprob_batch_size).view(T, N)
    next_values = torch.empty_like(values)
    next_values[:-1] = values[1:]
    next_values[-1] = agent.values(ro.last_obs)
    if ro.final_obs:
        (ts, idx), finals = zip(*ro.final_obs.keys()), np.stack(list(ro.final_obs.values()))
        next_values[list(ts), list(idx)] = agent.values(finals)
    rewards = scaler(ro.rewards, ro.terminated | ro.truncated) if scaler is not None else ro.rewards
    adv, ret = gae(torch.as_tensor(rewards, dtype=torch.float32), values.cpu(), next_values.cpu(),
                   torch.as_tensor(ro.terminated), cfg.gamma, cfg.gae_lambda, truncated=torch.as_tensor(ro.truncated))
    var = float(ret.var())
    stats = {"train/explained_variance": 1.0 - float((ret - values.cpu()).var()) / var if var > 0 else 0.0,
             "train/reward_scaled_mean": float(np.mean(rewards)), "train/value_mean": float(values.mean())}
    if scaler is not None:
        stats["train/reward_scale_std"] = scaler.std
    device = agent.device
    return values.flatten(), adv.flatten().to(device), ret.flatten().to(device), stats


def minibatch_size(cfg: FinetuneConfig, agent: ChunkPPO) -> int:
    """Pairs per minibatch: ``batch_size`` for DPPO; for the Gaussian baseline ``gaussian_batch_size`` or
    ``batch_size / ft_denoising_steps``. With one batch for both, the Gaussian policy's ``K'`` times fewer pairs
    made one minibatch per epoch in both presets: 5 gradient steps per iteration against DPPO's 20."""
    if isinstance(agent, DPPO):
        return cfg.batch_size
    if cfg.gaussian_batch_size is not None:
        return cfg.gaussian_batch_size
    return max(1, cfg.batch_size // cfg.ft_denoising_steps)


def ppo_update(agent: ChunkPPO, ro: Rollout, values: torch.Tensor, adv: torch.Tensor, ret: torch.Tensor,
               cfg: FinetuneConfig, critic_only: bool, generator: torch.Generator) -> dict[str, float]:
    """``update_epochs`` epochs of minibatches over the ``M S`` (env step, denoising step) pairs; stops the whole
    update once a minibatch's approx_kl exceeds target_kl (DPPO). Returns metrics averaged over minibatches."""
    obs = ro.obs.flatten(0, 1)                                              # (M, To, Do)
    chains = ro.chains.flatten(0, 1)                                        # (M, S + 1, Ta, Da)
    old = agent.chain_log_probs(obs, chains, cfg.logprob_batch_size)        # (M, S)
    history: list[dict[str, torch.Tensor]] = []
    stopped = False
    for _ in range(cfg.update_epochs):
        for batch in ppo_minibatches(obs, chains, old, adv, ret, values, minibatch_size(cfg, agent),
                                     generator=generator):
            history.append(agent.update(batch, critic_only=critic_only))
            if agent.should_stop(history[-1]):
                stopped = True
                break
        if stopped:
            break
    out = {k: float(torch.stack([h[k] for h in history]).mean()) for k in history[0]}
    out.update({"train/minibatches": float(len(history)), "train/kl_stop": float(stopped),
                "train/critic_only": float(critic_only)})
    return out


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune the pre-trained policy of ``cfg.policy`` with PPO; returns the run directory."""
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    resumed = cfg.resume is not None
    if resumed:
        run_dir = Path(cfg.resume)  # type: ignore[arg-type]
        manifest, parts = ckpt.load_checkpoint(run_dir)
        source = _source(Path(str(cfg.policy)), manifest, parts, weights=False)
    else:
        source = load_pretrained(Path(str(cfg.policy)))
    env_id = cfg.env or source.env["env_id"]
    if env_id != source.env["env_id"]:
        raise ConfigError(f"the policy in {cfg.policy} was pre-trained on {source.env['env_id']} data; fine-tune it "
                          f"on {source.env['env_id']}, not {env_id}.")
    params = agent_params(cfg, source.policy)
    if not resumed and source.policy["type"] == "diffusion":
        # DPPO sets denoised_clip_value in each stage's config independently: said once, when fine-tuning starts
        pretrained_clip = source.policy["model_spec"]["diffusion"].get("clip_x0")
        if cfg.clip_x0 != pretrained_clip:
            warnings.warn(f"fine-tuning clamps predicted clean chunks at clip_x0={cfg.clip_x0}, the pre-trained "
                          f"model at {pretrained_clip}; pass --clip-x0 {pretrained_clip} to keep the model's.",
                          DiffrlWarning, stacklevel=2)
    pipeline = PIPELINES["finetune", source.policy["type"]]
    act_steps = params.act_steps
    seed_everything(cfg.seed)
    envs = chunk_envs(env_id, cfg.n_envs, cfg.seed, source.policy, source.normalization, act_steps,
                      cfg.max_episode_steps)
    eval_env = chunk_env(env_id, source.policy, source.normalization, act_steps, cfg.max_episode_steps)
    signature = env_signature(env_id, eval_env.env)
    if signature != source.env:
        raise ConfigError(f"{env_id} as installed here has spaces {signature} but the policy in {cfg.policy} was "
                          f"trained for {source.env}.")
    agent = build_agent(source, params, device)
    scaler = RunningRewardScaler(cfg.n_envs) if cfg.reward_scale_running else None
    sample_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, SAMPLE_STREAM))  # rollout noise
    minibatch_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, MINIBATCH_STREAM))

    itr, env_steps, best_eval, last_eval, initial_eval, wall_offset = 0, 0, -np.inf, None, None, 0.0
    timers = {"rollout_s": 0.0, "scoring_s": 0.0, "update_s": 0.0, "eval_s": 0.0}
    if resumed:
        check_resumable(run_dir, pipeline, cfg)
        ckpt.check_env(manifest, signature, run_dir, resume=True)
        state = parts["state"]
        agent.load_state_dict(state["agent"])
        if scaler is not None:
            scaler.load_state_dict(state["reward_scaler"])
        sample_gen.set_state(state["sample_gen"])
        minibatch_gen.set_state(state["minibatch_gen"])
        loop = state["loop"]
        itr, env_steps, best_eval = int(loop["itr"]), int(loop["env_steps"]), float(loop["best_eval"])
        last_eval, initial_eval = loop["last_eval"], loop["initial_eval"]
        timers, wall_offset = dict(loop["timers"]), float(loop["wall_s"])
        obs = envs.load_state_dict(state["envs"])
        set_rng_state(state["rng"])  # last: the replay must not disturb any RNG we restore
    else:
        run_dir = new_run_dir(pipeline, env_id, cfg.seed, cfg.runs_root, cfg.run_dir)
        obs = envs.reset()
    write_config(run_dir, pipeline, to_dict(cfg))
    logger = Logger(run_dir, resume_step=env_steps if resumed else None, wall_offset=wall_offset,
                    wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))
    ckpt_meta = {"pipeline": pipeline, "policy": source.policy, "env": signature, "ref_scores": source.ref_scores,
                 "dataset": source.dataset, "pretrain_run": str(cfg.policy), "seed": cfg.seed,
                 "agent_params": to_dict(params)}

    def save() -> None:
        state = {"agent": agent.state_dict(), "rng": get_rng_state(), "envs": envs.state_dict(),
                 "sample_gen": sample_gen.get_state(), "minibatch_gen": minibatch_gen.get_state(),
                 "loop": {"itr": itr, "env_steps": env_steps, "best_eval": float(best_eval), "last_eval": last_eval,
                          "initial_eval": initial_eval, "timers": timers, "wall_s": logger.wall_s()}}
        if scaler is not None:
            state["reward_scaler"] = scaler.state_dict()
        meta = {**ckpt_meta, "iteration": itr, "env_steps": env_steps, "gradient_steps": agent.num_updates}
        ckpt.save_checkpoint(run_dir / "checkpoints", env_steps, {"state": state,
                                                                  "normalization": source.normalization.state_dict()},
                             meta, keep_last=cfg.keep_checkpoints)

    def evaluate_agent() -> dict[str, float]:  # the fine-tuning routing itself: agent.policy
        t0 = time.perf_counter()
        out = _evaluate(agent.policy, eval_env, cfg.eval_episodes, cfg.seed, device, source.ref_scores,
                        cfg.eval_mean_path)
        agent.policy.train()
        timers["eval_s"] += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ loop
    if not resumed and cfg.eval_every > 0:  # the pre-trained policy through the fine-tuning routing, at env step 0
        initial_eval = evaluate_agent()
        logger.log(0, {"itr": 0.0, **initial_eval}, env_steps=0)
    bar = Progress(cfg.n_train_itr, initial=itr, desc=f"{pipeline} {env_id}", unit="itr", enabled=cfg.progress)
    while itr < cfg.n_train_itr:
        t0 = time.perf_counter()
        ro = collect(agent, envs, obs, cfg.n_steps, sample_gen)
        obs = ro.last_obs
        env_steps += ro.env_steps
        t1 = time.perf_counter()
        values, adv, ret, stats = advantages(agent, ro, cfg, scaler)
        t2 = time.perf_counter()
        metrics = ppo_update(agent, ro, values, adv, ret, cfg, itr < cfg.n_critic_warmup_itr, minibatch_gen)
        t3 = time.perf_counter()
        timers["rollout_s"] += t1 - t0
        timers["scoring_s"] += t2 - t1
        timers["update_s"] += t3 - t2
        itr += 1
        done_all = itr >= cfg.n_train_itr
        row: dict[str, float] = {}
        on_grid = cfg.eval_every > 0 and itr % cfg.eval_every == 0
        if on_grid or done_all:  # off-grid final evaluation: summary only (see pipelines.online)
            last_eval = evaluate_agent()
            if on_grid:
                best_eval = max(best_eval, last_eval["eval/return_mean"])
                row.update(last_eval)
        if itr % cfg.log_every == 0 or done_all:
            row.update(metrics)
            row.update(stats)
            if ro.episodes:
                row["train/episode_return"] = float(np.mean([r for r, _ in ro.episodes]))
                row["train/episode_length"] = float(np.mean([n for _, n in ro.episodes]))
                row["train/episodes"] = float(len(ro.episodes))
            check_finite(row, env_steps, run_dir)
            row.update({"itr": float(itr), "gradient_steps": float(agent.num_updates),
                        "perf/rollout_s": t1 - t0, "perf/scoring_s": t2 - t1, "perf/update_s": t3 - t2,
                        "perf/rollout_s_per_env_step": (t1 - t0) / max(ro.env_steps, 1),
                        "perf/update_s_per_env_step": (t3 - t1) / max(ro.env_steps, 1),
                        "perf/env_steps_per_s": ro.env_steps / max(t3 - t0, 1e-9)})
        if row:
            logger.log(env_steps, row, env_steps=env_steps)
        bar.update(1, **({"eval": last_eval["eval/return_mean"]} if last_eval else {}))
        if itr % cfg.checkpoint_every == 0 or done_all:
            save()
    bar.close()
    logger.close()
    if last_eval is None:  # resumed at the end: evaluate once more for the summary
        last_eval = evaluate_agent()

    # ------------------------------------------------------------------ summary
    wall = logger.wall_s()
    train_s = timers["rollout_s"] + timers["scoring_s"] + timers["update_s"]
    summary = {"pipeline": pipeline, "policy_type": source.policy["type"], "env_id": env_id, "seed": cfg.seed,
               "pretrain_run": str(cfg.policy), "iterations": itr, "env_steps": env_steps,
               "gradient_steps": agent.num_updates, "actor_updates": agent.num_actor_updates, "wall_s": wall,
               "env_steps_per_s": env_steps / max(wall, 1e-9),
               "eval_return_mean": last_eval["eval/return_mean"], "eval_return_std": last_eval["eval/return_std"],
               "normalized_score": last_eval.get("eval/normalized_score"),
               "best_eval_return": max(float(best_eval), last_eval["eval/return_mean"]),
               "initial_eval_return": initial_eval["eval/return_mean"] if initial_eval else None,
               "initial_normalized_score": initial_eval.get("eval/normalized_score") if initial_eval else None,
               "eval_episodes": cfg.eval_episodes, "eval_mean_path": cfg.eval_mean_path,
               "rollout_s_per_env_step": timers["rollout_s"] / max(env_steps, 1),
               "update_s_per_iteration": (timers["scoring_s"] + timers["update_s"]) / max(itr, 1),
               "train_env_steps_per_s": env_steps / max(train_s, 1e-9),
               "agent_params": to_dict(params), "time_breakdown_s": timers}
    write_summary(run_dir, summary)
    envs.close()
    eval_env.close()
    return run_dir


# -------------------------------------------------------------------------------------------------- evaluation
def load_finetuned(run_dir: Path, device: str = "auto") -> tuple[ChunkPPO, Source, dict[str, Any]]:
    """The fine-tuned agent of a fine-tuning run's latest checkpoint (frozen base + fine-tuned copy), its source
    settings and the checkpoint manifest; built from the checkpoint alone (the pre-training run is not read)."""
    cfg = load_config(run_dir)
    if not isinstance(cfg, FinetuneConfig):
        raise CheckpointError(f"{run_dir} is a pre-training run, not a `diffrl dppo finetune` run.")
    manifest, parts = ckpt.load_checkpoint(run_dir, parts=("state", "normalization"))
    source = _source(Path(str(cfg.policy)), manifest, parts, weights=False)
    agent = build_agent(source, agent_params(cfg, source.policy), resolve_device(device))
    agent.load_state_dict(parts["state"]["agent"])
    return agent, source, manifest


def evaluate_run(run_dir: Path, episodes: int = 10, device: str = "auto", seed: int | None = None,
                 mean_path: bool | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of a ``diffrl dppo`` run with :func:`diffrl.eval.evaluate`: a pre-training run
    with its EMA weights, a fine-tuning run with the fine-tuned routing of denoising steps (as during training);
    ``mean_path`` (default: the run's ``eval_mean_path``) as in :class:`ChunkActor`."""
    cfg = load_config(run_dir)
    mean_path = cfg.eval_mean_path if mean_path is None else mean_path
    dev = resolve_device(device)
    if isinstance(cfg, FinetuneConfig):
        agent, source, manifest = load_finetuned(run_dir, device)
        policy: DiffusionPolicy | GaussianPolicy = agent.policy
        act_steps = agent.p.act_steps
    else:
        manifest, parts = ckpt.load_checkpoint(run_dir, parts=("policy", "normalization"))
        source = _source(run_dir, manifest, parts, weights=True)
        policy = pretrained_policy(source.policy, source.weights, source.run_dir)  # type: ignore[arg-type]
        act_steps = source.policy["act_steps"]
    env_id = source.env["env_id"]
    env = chunk_env(env_id, source.policy, source.normalization, act_steps, cfg.max_episode_steps)
    if env_signature(env_id, env.env) != source.env:
        raise CheckpointError(f"the checkpoint in {run_dir} does not match {env_id} as installed here.")
    seed = cfg.seed if seed is None else seed
    result = evaluate(ChunkActor(policy, dev, seed, mean_path), env, episodes, seed=seed)
    env.close()
    out = {"run_dir": str(run_dir), "env_id": env_id, "checkpoint_step": manifest["step"], "episodes": episodes,
           "policy_type": source.policy["type"], "eval_mean_path": mean_path, **result.to_dict()}
    score = _normalized(result.returns, source.ref_scores)
    if score is not None:
        out["normalized_score"] = score
    return out
