"""DPPO (Ren et al. 2024, arXiv:2409.00588): behaviour-clone a chunked diffusion policy, then fine-tune it with PPO
over the denoising MDP; the Gaussian and GMM baselines go through the same two commands, and the paper's other
fine-tuning methods start from the same pre-training run (``--algo``).

    diffrl dppo pretrain --dataset D [--policy-type diffusion|gaussian|gmm] [--preset quick|paper] [--seed S]
    diffrl dppo finetune --policy PRETRAIN_RUN_DIR [--algo dppo|dpoer|dql|idql|dipo|qsm|drwr|dawr] [--env ID]
        [--ft-denoising-steps K']
        [--use-ddim --ddim-steps S] [--n-envs N] [--preset quick|paper] [--seed S]
    diffrl dppo pretrain --resume RUN_DIR
    diffrl dppo finetune [--algo A] --resume RUN_DIR

Pre-training reads top to bottom: load the dataset, fit the min-max normalisation of observations and actions
(the env wrapper will use the same statistics), lay out every (history, chunk) sample that stays inside its
episode, train with :class:`~diffrl.diffusion.trainer.DiffusionTrainer` (epsilon-prediction DDPM loss, or the
Gaussian / GMM policy's BC negative log-likelihood; AdamW, cosine LR, EMA 0.995 copied until ``ema_start`` then
updated every ``ema_every`` steps), checkpoint raw and EMA weights with the model spec and the normalisation, and
evaluate the EMA policy in the env.

Fine-tuning reads top to bottom: read the pre-training run (policy spec, normalisation, EMA weights), build DPPO (or
plain PPO for a Gaussian or GMM policy) and ``n_envs`` chunk envs, then each iteration of the on-policy loop: roll out
``n_steps`` chunks per env recording the ``K' + 1`` chains, score values, scale rewards, GAE, run ``update_epochs``
PPO epochs over (env step x denoising step) minibatches (critic only during warm-up), log, evaluate, checkpoint.
Evaluation routes the denoising steps exactly as training does (the same :class:`~diffrl.agents.dppo.DiffusionPolicy`),
so DPPO issue #29 cannot happen. Resume is exact on CPU.

``--algo`` (:data:`FINETUNE_ALGOS`, one :class:`FinetuneAlgo` per method) picks the method: ``dppo`` (the default,
the above), ``dpoer`` (the same loop with DPOER's temperature, :mod:`diffrl.agents.dpoer`); ``dql``, ``idql``,
``dipo`` or ``qsm`` (Diffusion-QL, IDQL, DIPO, QSM in the chunk off-policy loop,
:mod:`diffrl.pipelines.chunk_offpolicy`); ``drwr`` or ``dawr`` (reward- / advantage-weighted regression in the loop of
:mod:`diffrl.pipelines.chunk_rwr`). :class:`BaselineFinetune` is what such a baseline's config adds to its agent's
parameters and its loop's settings.

The pieces other systems reuse live below this module: the agents in :mod:`diffrl.agents.ppo` (PPO, critic,
Gaussian and GMM policies) and :mod:`diffrl.agents.dppo` (diffusion policy, DPPO); the policy spec, loading and
evaluation in :mod:`diffrl.pipelines.chunk_policy`; the rollout, GAE and PPO epochs in
:mod:`diffrl.pipelines.onpolicy`; the chunk envs in :mod:`diffrl.envs.chunking`. This module holds DPPO's configs,
presets, the two stages and the table of fine-tuning methods; their resume checks, checkpoints, logging and timers
are the run session's (:class:`~diffrl.runs.session.RunSession`).

Shapes: ``To`` / ``Do`` observation history / dim, ``Ta`` / ``Da`` chunk length / action dim, ``K'`` fine-tuned
denoising steps.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from diffrl.agents.base import Params
from diffrl.agents.dipo import DIPO, DIPOParams
from diffrl.agents.dpoer import DPOER, DPOERParams
from diffrl.agents.dppo import DPPO, DPPOParams, dppo_model_spec
from diffrl.agents.dql import DQL, DQLParams
from diffrl.agents.idql import IDQL, IDQLParams
from diffrl.agents.ppo import (
    ChunkPolicy,
    ChunkPPO,
    GaussianPolicy,
    GaussianPPOParams,
    GMMPolicy,
    GMMPPOParams,
    PPOParams,
)
from diffrl.agents.ppo_utils import RunningRewardScaler
from diffrl.agents.qsm import QSM, QSMParams
from diffrl.agents.rwr import DAWR, DRWR, AWRParams, RWRParams
from diffrl.config import (
    check,
    check_choice,
    check_non_negative,
    check_positive,
    check_unit_interval,
    to_dict,
)
from diffrl.data import dataset_env, dataset_run_name, fingerprint, load_dataset
from diffrl.data.sequence import ChunkDataset
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.nets import ACTIVATIONS
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.envs import VecEnv, env_signature
from diffrl.envs.chunking import chunk_env, chunk_envs
from diffrl.envs.wrappers import ActionChunkEnv, MinMaxNormalization
from diffrl.errors import ConfigError, DiffrlWarning
from diffrl.eval import evaluate, reference_scores
from diffrl.pipelines import chunk_offpolicy, chunk_policy, chunk_rwr, online, onpolicy
from diffrl.pipelines.chunk_offpolicy import ChunkOffPolicyConfig
from diffrl.pipelines.chunk_policy import (
    POLICY_TYPES,
    ChunkActor,
    GaussianSpec,
    GMMSpec,
    PolicySpec,
    PretrainedPolicy,
    build_agent,
    evaluate_chunk_policy,
    normalized_mean,
)
from diffrl.pipelines.chunk_rwr import ChunkRWRConfig, awr_updates_per_iteration
from diffrl.pipelines.common import RunConfig
from diffrl.registry import Command, System
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.logger import episode_stats
from diffrl.runs.seeding import derive_seed, seed_everything
from diffrl.runs.session import RateMeter, RunSession, due

PIPELINES = {("pretrain", "diffusion"): "dppo_pretrain", ("pretrain", "gaussian"): "dppo_pretrain_gaussian",
             ("pretrain", "gmm"): "dppo_pretrain_gmm", ("finetune", "diffusion"): "dppo_finetune",
             ("finetune", "gaussian"): "dppo_finetune_gaussian", ("finetune", "gmm"): "dppo_finetune_gmm"}
SAMPLE_STREAM, MINIBATCH_STREAM = 15_485_863, 32_452_843  # derive_seed streams of rollout noise and minibatches
ENTROPY_STREAM = 67_867_967  # derive_seed stream of DPOER's entropy estimates


# ------------------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass(frozen=True)
class EvalPathSettings:
    """How a diffusion chunk policy is evaluated (both DPPO stages)."""

    eval_mean_path: bool = False
    """evaluate a DDPM diffusion policy along the noise-free mean path instead of DPPO's sampled chain (not a sample
    of the policy PPO trains, but on diffrl's Walker2d BC policies the better controller: 56-58 vs 16-35; no effect
    on DDIM, whose eta-0 path is already noise-free, or on Gaussian policies); a GMM policy is evaluated with its
    most likely mode's mean instead of the mean of a mode drawn by weight (DPPO's)"""


@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainerSettings, EvalPathSettings, RunConfig):
    """``diffrl dppo pretrain``: behaviour cloning of a chunked policy (epsilon-prediction DDPM, or the Gaussian or
    GMM baseline by negative log-likelihood). Steps of eval_every / log_every / checkpoint_every are gradient
    steps."""

    dataset: str = ""
    """Minari dataset id or a path to a D4RL .hdf5 / DPPO .npz file"""
    env: str | None = None
    """evaluation env id (default: the env recorded in the dataset)"""
    seed: int = 0
    """run seed"""
    policy_type: str = "diffusion"
    """diffusion (DPPO), gaussian or gmm (the baselines fine-tuned with plain PPO)"""
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
    gmm_modes: int = 5
    """GMM policy: mixture components (DPPO: 5)"""
    gmm_hidden: tuple[int, ...] | None = None
    """GMM policy: hidden widths of the mean and the mode-weight networks (None: gaussian_hidden, so presets size
    both baselines alike; DPPO's robomimic can/lift: 512 512 512, square/transport: 1024 1024 1024)"""
    gmm_residual: bool = True
    """GMM policy: residual networks (equal widths, odd count)"""
    gmm_activation: str = "mish"
    """GMM policy: activation of both networks (DPPO: Mish)"""
    gmm_std: float = 0.1
    """GMM policy: the fixed std of behaviour cloning, and the initial std of fine-tuning (DPPO: 0.1)"""
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
                     "unet_dim", "gaussian_std", "gmm_modes", "gmm_std"):
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
        if self.policy_type == "gmm":  # gmm_hidden may be gaussian_hidden, checked here under gmm_residual
            widths = self.gmm_widths
            check(len(widths) > 0 and all(h > 0 for h in widths), "gmm_hidden", widths,
                  "one or more positive layer widths")
            if self.gmm_residual:
                check(len(set(widths)) == 1 and len(widths) % 2 == 1, "gmm_hidden", widths, "an odd number of "
                      "equal widths for residual networks (e.g. 512 512 512), or pass --no-gmm-residual")
        check_choice("gmm_activation", self.gmm_activation, ACTIVATIONS)

    @property
    def gmm_widths(self) -> tuple[int, ...]:
        """The GMM networks' hidden widths: ``gmm_hidden``, or ``gaussian_hidden`` when unset."""
        return self.gaussian_hidden if self.gmm_hidden is None else self.gmm_hidden


CHUNK_FIELDS = ("horizon_steps", "act_steps", "cond_steps", "denoising_steps")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(DPPOParams, EvalPathSettings, RunConfig):
    """``diffrl dppo finetune [--algo dppo]``: PPO fine-tuning of a pre-trained policy; DPPO over the last K'
    denoising steps of a diffusion policy, plain PPO for a Gaussian or GMM one (the type is read from the
    pre-training run). Steps of eval_every / log_every / checkpoint_every are iterations."""

    PARAMS: ClassVar[type[DPPOParams]] = DPPOParams  # the agent parameters of a diffusion policy (dppo_params)

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
    """Gaussian and GMM policies only: env steps per minibatch (they score one transition per env step); None:
    batch_size / ft_denoising_steps, so they take as many minibatches, and gradient steps, per epoch as DPPO"""
    n_critic_warmup_itr: int = 0
    """first iterations that train only the critic (the actor is not stepped)"""
    reward_scale_running: bool = True
    """divide rewards by the running std of a discounted return (gamma 0.99), clipped to +-10 (DPPO)"""
    logprob_batch_size: int = 10_000
    """pairs per network call when scoring a rollout's old log-probs and values"""
    max_episode_steps: int | None = None
    """override the env's time limit (None keeps the registered one; DPPO's Gym runs: 1000)"""
    std_min: float = 0.01
    """Gaussian and GMM policies only: lower bound of the learnable std (DPPO: 0.01)"""
    std_max: float = 0.2
    """Gaussian and GMM policies only: upper bound of the learnable std (DPPO: 0.2)"""
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
        """This config's DPPO hyper-parameters (``PARAMS``: DPOER's for ``--algo dpoer``) with the given chunking
        and K."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.PARAMS)}
        values.update(horizon_steps=horizon_steps, act_steps=act_steps, cond_steps=cond_steps,
                      denoising_steps=denoising_steps, **override)
        return self.PARAMS(**values)


@dataclasses.dataclass(frozen=True)
class DPOERFinetuneConfig(FinetuneConfig, DPOERParams):
    """``diffrl dppo finetune --algo dpoer``: DPPO with a SAC-style entropy temperature (DPOER, the TF port
    NotOneRing/TEST's ``diffusion_sac_ppo.py``): DPPO's loop and settings, plus alpha, its Adam step on
    ``-log(alpha) (H_target - H)`` and ``alpha log pi / lambda_alpha_entropy`` in PPO's unclipped branch (diffusion
    policies only). Steps of eval_every / log_every / checkpoint_every are iterations."""

    PARAMS: ClassVar[type[DPPOParams]] = DPOERParams


@dataclasses.dataclass(frozen=True)
class BaselineFinetune(EvalPathSettings):
    """What a baseline of ``diffrl dppo finetune`` that runs in a loop module of its own (Diffusion-QL, IDQL, DIPO and
    QSM in :mod:`~diffrl.pipelines.chunk_offpolicy`, DRWR and DAWR in :mod:`~diffrl.pipelines.chunk_rwr`) adds to its
    agent's parameters and its loop's settings.

    A method's config is ``class XFinetuneConfig(BaselineFinetune, XParams, LoopConfig)``, in that order, with
    ``AGENT = X``: the chunk fields here replace the agent's (the pre-training run's chunking fills them,
    :meth:`agent_params`), and ``__post_init__`` runs the loop's checks, then the agent's through its parameters.
    ``X(model, obs_dim, params, device, seed=...)`` is the agent the loop drives, on the pre-trained DDPM; its
    parameters have ``horizon_steps``, ``act_steps`` and ``cond_steps``."""

    AGENT: ClassVar[Any]  # the agent class, e.g. DQL

    policy: Path | None = None
    """run directory of `diffrl dppo pretrain` (required): a diffusion policy, its EMA weights and normalisation"""
    env: str | None = None
    """environment id (default: the pre-training run's; another env is refused)"""
    max_episode_steps: int | None = None
    """override the env's time limit (None keeps the registered one; DPPO's Gym runs: 1000)"""
    horizon_steps: int | None = None
    """Ta (default: the pre-training run's; another value is refused)"""
    act_steps: int | None = None
    """executed actions per chunk (default: the pre-training run's; may be lowered to <= Ta)"""
    cond_steps: int | None = None
    """To (default: the pre-training run's; another value is refused)"""

    def __post_init__(self) -> None:
        # the agent's own checks run through agent_params below, with stand-ins for the chunking still unknown
        params_cls, loop_cls = self.parts()
        loop_cls.__post_init__(self)  # the loop's and the run's checks
        check(self.policy is not None, "policy", self.policy, "the run directory of `diffrl dppo pretrain` (--policy)")
        for name in ("horizon_steps", "act_steps", "cond_steps", "max_episode_steps"):
            value = getattr(self, name)
            check(value is None or value > 0, name, value, "> 0, or unset to take the default")
        horizon = self.horizon_steps or self.act_steps or 1
        self.params_with(horizon, self.act_steps or horizon, self.cond_steps or 1)

    @classmethod
    def parts(cls) -> tuple[type, type]:
        """The agent's parameter class and the loop's config class among the bases."""
        params = next(b for b in cls.__bases__ if issubclass(b, Params) and not issubclass(b, RunConfig))
        loop = next(b for b in cls.__bases__ if issubclass(b, RunConfig))
        return params, loop

    def params_with(self, horizon_steps: int, act_steps: int, cond_steps: int) -> Any:
        """This config's agent parameters with the given chunking."""
        params_cls = self.parts()[0]
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(params_cls)}
        values.update(horizon_steps=horizon_steps, act_steps=act_steps, cond_steps=cond_steps)
        return params_cls(**values)

    def agent_params(self, spec: PolicySpec) -> Any:
        """The agent parameters with the pre-trained policy's chunking (a conflicting value is refused)."""
        return self.params_with(*chunking(self, spec))


@dataclasses.dataclass(frozen=True)
class DQLFinetuneConfig(BaselineFinetune, DQLParams, ChunkOffPolicyConfig):
    """``diffrl dppo finetune --algo dql``: Diffusion-QL (Wang et al. 2023, arXiv:2208.06193) on the pre-trained
    diffusion policy, as DPPO's baseline: double Q, every denoising step trained through BC + normalised Q loss, a
    replay buffer of chunk transitions. Steps of eval_every / log_every / checkpoint_every are iterations."""

    AGENT: ClassVar[Any] = DQL


@dataclasses.dataclass(frozen=True)
class IDQLFinetuneConfig(BaselineFinetune, IDQLParams, ChunkOffPolicyConfig):
    """``diffrl dppo finetune --algo idql``: IDQL (Hansen-Estruch et al. 2023, arXiv:2304.10573) on the pre-trained
    diffusion policy, as DPPO's baseline: expectile V, double Q on V(s'), the whole chain behaviour-cloned on the
    buffer's chunks, acting by critic-scored candidates (:mod:`diffrl.agents.idql`). Needs act_steps = Ta. Steps of
    eval_every / log_every / checkpoint_every are iterations."""

    AGENT: ClassVar[Any] = IDQL


@dataclasses.dataclass(frozen=True)
class DIPOFinetuneConfig(BaselineFinetune, DIPOParams, ChunkOffPolicyConfig):
    """``diffrl dppo finetune --algo dipo``: DIPO (Yang et al. 2023, arXiv:2305.13122) on the pre-trained diffusion
    policy, as DPPO's baseline: buffer chunks improved by gradient ascent on the critic and written back, the chain
    behaviour-cloned on them, its EMA copy acting and evaluated (:mod:`diffrl.agents.dipo`). Needs act_steps = Ta.
    Steps of eval_every / log_every / checkpoint_every are iterations."""

    AGENT: ClassVar[Any] = DIPO


@dataclasses.dataclass(frozen=True)
class QSMFinetuneConfig(BaselineFinetune, QSMParams, ChunkOffPolicyConfig):
    """``diffrl dppo finetune --algo qsm``: Q-score matching (Psenka et al. 2024, arXiv:2312.11752) on the pre-trained
    diffusion policy, as DPPO's baseline: the chain's noise prediction regressed on the critic's action gradient
    (:mod:`diffrl.agents.qsm`). Needs act_steps = Ta. Steps of eval_every / log_every / checkpoint_every are
    iterations."""

    AGENT: ClassVar[Any] = QSM


@dataclasses.dataclass(frozen=True)
class DRWRFinetuneConfig(BaselineFinetune, RWRParams, ChunkRWRConfig):
    """``diffrl dppo finetune --algo drwr``: reward-weighted regression of the pre-trained diffusion policy on its own
    chunks, weighted by their returns-to-go (DPPO's DRWR baseline, :mod:`diffrl.agents.rwr`, in the loop of
    :mod:`diffrl.pipelines.chunk_rwr`). Steps of eval_every / log_every / checkpoint_every are iterations."""

    AGENT: ClassVar[Any] = DRWR


@dataclasses.dataclass(frozen=True)
class DAWRFinetuneConfig(BaselineFinetune, AWRParams, ChunkRWRConfig):
    """``diffrl dppo finetune --algo dawr``: advantage-weighted regression of the pre-trained diffusion policy on the
    chunks of a FIFO buffer, weighted by TD(lambda) advantages of a learned V (DPPO's DAWR baseline,
    :mod:`diffrl.agents.rwr`, in the loop of :mod:`diffrl.pipelines.chunk_rwr`). Steps of eval_every / log_every /
    checkpoint_every are iterations."""

    AGENT: ClassVar[Any] = DAWR

    def __post_init__(self) -> None:
        super().__post_init__()
        awr_updates_per_iteration(self, self)  # a replay setting without a critic step fails before the run opens


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
    # The off-policy methods, at DPPO's env-step budget: `quick` collects DPPO's 4 x 250 chunks per iteration for 20
    # iterations (80k env steps); gradient steps per iteration keep the reference's ratio to env steps (Hopper DQL:
    # 500 * 40 / 1000 * 16 = 320 per 80k env steps, here 16 per 4k), the buffer keeps the last 50 iterations as the
    # reference's 1M of 20k per iteration, and the critic trains alone for 2 iterations (8k env steps; the
    # reference: 5 of its 1000)
    "finetune_dql": {
        "quick": dict(n_envs=4, n_steps=250, n_train_itr=20, batch_size=1_000, replay_ratio=16.0, buffer_size=50_000,
                      n_critic_warmup_itr=2, eval_every=5, eval_episodes=5, checkpoint_every=5),
        # cfg/gym/finetune/hopper-v2/ft_dql_diffusion_mlp.yaml (reference/dppo-baselines.md): 40 envs x 500 chunks,
        # batch 1000, replay ratio 16, buffer 1M, 5 critic warm-up iterations, actor 1e-4 / critic 1e-3
        "paper": dict(n_envs=40, n_steps=500, n_train_itr=1000, batch_size=1_000, replay_ratio=16.0,
                      buffer_size=1_000_000, n_critic_warmup_itr=5, actor_lr=1e-4, critic_lr=1e-3, gamma=0.99,
                      tau=0.005, min_sampling_std=0.1, noise_clip=3.0, scale_reward_factor=0.01,
                      max_episode_steps=1000, eval_every=10, eval_episodes=10, checkpoint_every=100),
    },
    # IDQL, DIPO and QSM: DQL's quick budget and scaling (the reference's replay ratio, so its gradient steps per env
    # step; a buffer of the last 50 iterations, as the reference's 25k vector steps or 1M of 20k per iteration)
    "finetune_idql": {
        "quick": dict(n_envs=4, n_steps=250, n_train_itr=20, batch_size=1_000, replay_ratio=128.0,
                      buffer_size=50_000, n_critic_warmup_itr=2, eval_every=5, eval_episodes=5, checkpoint_every=5),
        # cfg/gym/finetune/hopper-v2/ft_idql_diffusion_mlp.yaml (reference/dppo-baselines.md): 40 envs x 500 chunks,
        # batch 1000, replay ratio 128, buffer 25k vector steps x 40 envs, 5 critic warm-up iterations
        "paper": dict(n_envs=40, n_steps=500, n_train_itr=1000, batch_size=1_000, replay_ratio=128.0,
                      buffer_size=25_000 * 40, n_critic_warmup_itr=5, actor_lr=1e-4, critic_lr=1e-3, gamma=0.99,
                      tau=0.001, scale_reward_factor=0.01, max_episode_steps=1000, eval_every=10, eval_episodes=10,
                      checkpoint_every=100),
    },
    "finetune_dipo": {
        "quick": dict(n_envs=4, n_steps=250, n_train_itr=20, batch_size=1_000, replay_ratio=64.0,
                      buffer_size=50_000, n_critic_warmup_itr=2, eval_every=5, eval_episodes=5, checkpoint_every=5),
        # cfg/gym/finetune/hopper-v2/ft_dipo_diffusion_mlp.yaml: 40 envs x 500 chunks, batch 1000, replay ratio 64,
        # buffer 1M, 5 critic warm-up iterations
        "paper": dict(n_envs=40, n_steps=500, n_train_itr=1000, batch_size=1_000, replay_ratio=64.0,
                      buffer_size=1_000_000, n_critic_warmup_itr=5, actor_lr=1e-4, critic_lr=1e-3, gamma=0.99,
                      tau=0.005, scale_reward_factor=0.01, max_episode_steps=1000, eval_every=10, eval_episodes=10,
                      checkpoint_every=100),
    },
    "finetune_qsm": {
        "quick": dict(n_envs=4, n_steps=250, n_train_itr=20, batch_size=1_000, replay_ratio=16.0,
                      buffer_size=50_000, n_critic_warmup_itr=2, eval_every=5, eval_episodes=5, checkpoint_every=5),
        # cfg/gym/finetune/hopper-v2/ft_qsm_diffusion_mlp.yaml: 40 envs x 500 chunks, batch 1000, replay ratio 16,
        # buffer 25k vector steps x 40 envs, 5 critic warm-up iterations
        "paper": dict(n_envs=40, n_steps=500, n_train_itr=1000, batch_size=1_000, replay_ratio=16.0,
                      buffer_size=25_000 * 40, n_critic_warmup_itr=5, actor_lr=1e-4, critic_lr=1e-3, gamma=0.99,
                      tau=0.005, scale_reward_factor=0.01, max_episode_steps=1000, eval_every=10, eval_episodes=10,
                      checkpoint_every=100),
    },
    # DRWR and DAWR at DPPO's budget: their gradient steps per env step are the reference's with its batch of 1000
    # (DRWR: 16 epochs over the iteration's finished chunks; DAWR: replay ratio 64); DAWR's FIFO buffer keeps the
    # last 10 iterations, as the reference's 5000 vector steps of 500 per iteration
    "finetune_drwr": {
        "quick": dict(n_envs=4, n_steps=250, n_train_itr=20, eval_every=5, eval_episodes=5, checkpoint_every=5),
        # cfg/gym/finetune/hopper-v2/ft_rwr_diffusion_mlp.yaml: the defaults (RWRParams, ChunkRWRConfig)
        "paper": dict(n_envs=40, n_steps=500, n_train_itr=1000, max_episode_steps=1000, eval_every=10,
                      eval_episodes=10, checkpoint_every=100),
    },
    "finetune_dawr": {
        "quick": dict(n_envs=4, n_steps=250, n_train_itr=20, buffer_steps=2_500, eval_every=5, eval_episodes=5,
                      checkpoint_every=5),
        # cfg/gym/finetune/hopper-v2/ft_awr_diffusion_mlp.yaml: the defaults (AWRParams, ChunkRWRConfig)
        "paper": dict(n_envs=40, n_steps=500, n_train_itr=1000, max_episode_steps=1000, eval_every=10,
                      eval_episodes=10, checkpoint_every=100),
    },
}


# ------------------------------------------------------------------------------------------ the policy's spec
class _GaussianBC(GaussianPolicy):
    """The Gaussian policy with the trainer's ``loss(x, cond, generator)``: chunks ``x (B, Ta, Da)`` given flattened
    histories ``cond (B, To * Do)`` (its state dict is a plain :class:`GaussianPolicy`'s)."""

    def loss(self, x: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return self.bc_loss(cond, x)  # type: ignore[arg-type]


class _GMMBC(GMMPolicy):
    """The GMM policy with the trainer's ``loss(x, cond, generator)`` (its state dict is a plain
    :class:`GMMPolicy`'s)."""

    def loss(self, x: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return self.bc_loss(cond, x)  # type: ignore[arg-type]


def policy_spec(cfg: PretrainConfig, obs_dim: int, act_dim: int) -> PolicySpec:
    """What a checkpoint records to rebuild the policy: type, dims, chunking and the architecture."""
    chunking: dict[str, Any] = dict(policy_type=cfg.policy_type, obs_dim=obs_dim, act_dim=act_dim,
                                    horizon_steps=cfg.horizon_steps, act_steps=cfg.act_steps,
                                    cond_steps=cfg.cond_steps)
    if cfg.policy_type == "diffusion":
        shape = DPPOParams(horizon_steps=cfg.horizon_steps, act_steps=cfg.act_steps, cond_steps=cfg.cond_steps,
                           denoising_steps=cfg.denoising_steps, ft_denoising_steps=1, clip_x0=cfg.clip_x0)
        model = dppo_model_spec(obs_dim, act_dim, shape, hidden=cfg.hidden, blocks=cfg.blocks, time_dim=cfg.time_dim,
                                activation=cfg.activation)
        if cfg.denoiser == "unet":
            model["denoiser"] = {"type": "unet", "dim": cfg.unet_dim, "dim_mults": list(cfg.unet_dim_mults)}
        return PolicySpec(**chunking, denoising_steps=cfg.denoising_steps, model_spec=model)
    if cfg.policy_type == "gmm":
        return PolicySpec(**chunking, gmm=GMMSpec(cfg.gmm_modes, cfg.gmm_widths, cfg.gmm_residual, cfg.gmm_activation,
                                                  cfg.gmm_std))
    return PolicySpec(**chunking, gaussian=GaussianSpec(cfg.gaussian_hidden, cfg.gaussian_residual,
                                                        cfg.gaussian_activation, cfg.gaussian_std))


# ----------------------------------------------------------------------------------------------- pre-training
@dataclasses.dataclass
class PretrainCounters:
    """Pre-training's counters (saved in every checkpoint; the gradient step is the trainer's)."""

    last_eval: dict[str, float] | None = None


def pretrain(cfg: PretrainConfig) -> Path:
    """Behaviour-clone ``cfg``'s policy on ``cfg.dataset`` and evaluate it; returns the run directory."""
    device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ setup (checks before any write)
    ds = load_dataset(cfg.dataset, env_id=cfg.env)
    env_id = dataset_env(ds, cfg.env, str(cfg.dataset))
    seed_everything(cfg.seed)
    norm = MinMaxNormalization.fit(ds.observations, ds.actions)  # the env wrapper uses these same statistics
    data = ChunkDataset.from_offline(ds, horizon_steps=cfg.horizon_steps, cond_steps=cfg.cond_steps,
                                     normalization=norm, device=device)
    obs, chunks = data.tensors()  # (M, To, Do), (M, Ta, Da): chunks never cross an episode's end
    spec = policy_spec(cfg, ds.obs_dim, ds.act_dim)
    eval_env = chunk_env(env_id, spec, norm, max_episode_steps=cfg.max_episode_steps)
    refs = reference_scores(ds.metadata)
    if cfg.policy_type == "diffusion":
        model = spec.diffusion_model()
    elif cfg.policy_type == "gmm":  # DPPO clones the GMM's means and weights with a fixed std
        model = spec.gmm_policy(cfg.gmm_std, cfg.gmm_std, _GMMBC)
    else:  # DPPO clones the Gaussian mean with a fixed std
        model = spec.gaussian_policy(cfg.gaussian_std, cfg.gaussian_std, _GaussianBC)
    trainer = DiffusionTrainer(model.to(device), chunks, cfg, cond=obs.flatten(1), seed=cfg.seed)  # type: ignore[arg-type]
    session = RunSession(cfg, PIPELINES["pretrain", cfg.policy_type], dataset_run_name(cfg.dataset),
                         signature=env_signature(env_id, eval_env.env), fingerprint=fingerprint(ds),
                         meta={"policy": spec.to_dict(), "ref_scores": refs}, load_parts=("policy", "state"))
    if session.resumed:
        ckpt.load_weights(trainer, session.parts["policy"], session.run_dir)
    c = session.start(PretrainCounters(), timers={"train_s": 0.0, "eval_s": 0.0})
    session.progress_bar(cfg.steps, trainer.step, desc=f"dppo pretrain {cfg.policy_type}", unit="step")

    def evaluate_ema() -> dict[str, float]:
        with session.timers.time("eval_s"):
            return evaluate_chunk_policy(spec.build_policy(trainer.ema.shadow.state_dict()), eval_env,
                                         cfg.eval_episodes, cfg.seed, device, refs, cfg.eval_mean_path)

    # ------------------------------------------------------------------ loop
    losses: list[torch.Tensor] = []
    start_step, rate, last_loss = trainer.step, RateMeter(trainer.step), float("nan")
    while trainer.step < cfg.steps:
        with session.timers.time("train_s"):
            losses.append(trainer.train_step())
        step = trainer.step
        row: dict[str, float] = {}
        on_grid = due(cfg.eval_every, step - 1, step)
        if on_grid or step == cfg.steps:  # off-grid final evaluation: summary only (see pipelines.online)
            c.last_eval = evaluate_ema()
            if on_grid:
                row.update(c.last_eval)
        if due(cfg.log_every, step - 1, step) or step == cfg.steps:
            last_loss = float(torch.stack(losses).mean())
            row.update({"train/loss": last_loss, "train/lr": trainer.opt.param_groups[0]["lr"],
                        "perf/steps_per_s": rate.rate(step)})
            session.check_finite(row, step)
            losses = []
        session.log(step, row)
        session.progress(1, loss=last_loss, **({"eval": c.last_eval["eval/return_mean"]} if c.last_eval else {}))
        if due(cfg.checkpoint_every, step - 1, step) or step == cfg.steps:
            # "policy": the raw weights, the EMA (what is evaluated and fine-tuned), the optimiser and the batch RNG
            session.save(step, parts={"policy": trainer.state_dict(), "normalization": norm.state_dict()},
                         meta={"gradient_steps": step})
    if c.last_eval is None:  # resumed at the end: evaluate once more for the summary
        c.last_eval = evaluate_ema()
    eval_env.close()

    # ------------------------------------------------------------------ summary
    last, timers = c.last_eval, session.timers
    return session.finish({
        "policy_type": cfg.policy_type, "dataset": str(cfg.dataset), "env_id": env_id, "gradient_steps": trainer.step,
        "env_steps": 0, "wall_s": session.wall_s(), "final_loss": last_loss,
        "updates_per_s": (trainer.step - start_step) / max(timers["train_s"], 1e-9),
        "eval_return_mean": last["eval/return_mean"], "eval_return_std": last["eval/return_std"],
        "eval_length_mean": last["eval/length_mean"], "normalized_score": last.get("eval/normalized_score"),
        "eval_episodes": cfg.eval_episodes, "eval_mean_path": cfg.eval_mean_path, "transitions": len(ds),
        "chunk_samples": len(data), "policy": spec.to_dict(), "time_breakdown_s": dict(timers)})


# ------------------------------------------------------------------------------------------------- fine-tuning
def load_pretrained(run_dir: Path) -> PretrainedPolicy:
    """The EMA policy, normalisation and settings of a ``diffrl dppo pretrain`` run (one sentence if it is not one)."""
    pipelines = tuple(PIPELINES["pretrain", t] for t in POLICY_TYPES)
    return chunk_policy.load_pretrained(run_dir, pipelines, "diffrl dppo pretrain")


def chunking(cfg: FinetuneConfig | BaselineFinetune, spec: PolicySpec) -> tuple[int, int, int]:
    """``(Ta, act_steps, To)`` of a fine-tuning run: the pre-trained policy's, ``act_steps`` lowered where ``cfg``
    says so; another Ta, To or K in ``cfg`` is refused (one sentence)."""
    for name in CHUNK_FIELDS:
        given, saved = getattr(cfg, name, None), getattr(spec, name)
        if given is not None and saved is not None and given != saved and name != "act_steps":
            raise ConfigError(f"{name}={given} differs from the pre-trained policy's {saved}; leave --"
                              f"{name.replace('_', '-')} unset (fine-tuning keeps the pre-trained model's).")
    act = cfg.act_steps if cfg.act_steps is not None else spec.act_steps
    return spec.horizon_steps, act, spec.cond_steps


def agent_params(cfg: FinetuneConfig, spec: PolicySpec) -> DPPOParams | GaussianPPOParams | GMMPPOParams:
    """``cfg``'s PPO settings with the pre-trained policy's chunking and K (a conflicting value is refused)."""
    ta, act, to = chunking(cfg, spec)
    if spec.policy_type == "diffusion":
        return cfg.dppo_params(ta, act, to, spec.denoising_steps)  # type: ignore[arg-type]
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PPOParams)}
    common.update(horizon_steps=ta, act_steps=act, cond_steps=to)
    if spec.policy_type == "gmm":  # sampled unclipped (DPPO's GMM), whatever noise_clip the other policies use
        m: GMMSpec = spec.gmm  # type: ignore[assignment]
        return GMMPPOParams(**{**common, "noise_clip": None}, num_modes=m.num_modes, hidden=tuple(m.hidden),
                            residual=m.residual, activation=m.activation,
                            std_init=min(max(m.std, cfg.std_min), cfg.std_max), std_min=cfg.std_min,
                            std_max=cfg.std_max)
    g: GaussianSpec = spec.gaussian  # type: ignore[assignment]
    return GaussianPPOParams(**common, hidden=tuple(g.hidden), residual=g.residual, activation=g.activation,
                             std_init=min(max(g.std, cfg.std_min), cfg.std_max), std_min=cfg.std_min,
                             std_max=cfg.std_max)


def minibatch_size(cfg: FinetuneConfig, agent: ChunkPPO) -> int:
    """Pairs per minibatch: ``batch_size`` for DPPO; for the Gaussian and GMM baselines ``gaussian_batch_size`` or
    ``batch_size / ft_denoising_steps``. With one batch for both, the Gaussian policy's ``K'`` times fewer pairs
    made one minibatch per epoch in both presets: 5 gradient steps per iteration against DPPO's 20."""
    if isinstance(agent, DPPO):
        return cfg.batch_size
    if cfg.gaussian_batch_size is not None:
        return cfg.gaussian_batch_size
    return max(1, cfg.batch_size // cfg.ft_denoising_steps)


def finetuning_source(cfg: FinetuneConfig | BaselineFinetune) -> tuple[PretrainedPolicy, str]:
    """What ``cfg`` fine-tunes and on which env id (checked before anything is written; one sentence otherwise).

    Fresh: the pre-training run's EMA policy. Resume: the spec and normalisation of the run's own checkpoint (the
    restored agent state brings the weights; the pre-training run is not read again).
    """
    algo = algo_name(cfg)
    if cfg.resume is None:
        pretrained = load_pretrained(Path(str(cfg.policy)))
    else:
        manifest, parts = ckpt.load_checkpoint(Path(cfg.resume), parts=("normalization",))
        pretrained = PretrainedPolicy.from_finetuning(Path(str(cfg.policy)), manifest, parts)
    policy_type = pretrained.spec.policy_type
    if policy_type not in FINETUNE_ALGOS[algo].policy_types:
        raise ConfigError(f"--algo {algo} fine-tunes diffusion policies but {cfg.policy} pre-trained a {policy_type} "
                          "policy; fine-tune it with --algo dppo (plain PPO), or pre-train with --policy-type "
                          "diffusion.")
    env_id = cfg.env or pretrained.env["env_id"]
    if env_id != pretrained.env["env_id"]:
        raise ConfigError(f"the policy in {cfg.policy} was pre-trained on {pretrained.env['env_id']} data; fine-tune "
                          f"it on {pretrained.env['env_id']}, not {env_id}.")
    return pretrained, env_id


def warn_clip_x0(cfg: FinetuneConfig | BaselineFinetune, pretrained: PretrainedPolicy) -> None:
    """Say once, when fine-tuning a diffusion policy starts, that it clamps predicted clean chunks elsewhere than the
    pre-trained model did (DPPO sets denoised_clip_value in each stage's config independently)."""
    spec = pretrained.spec
    if cfg.resume is None and spec.policy_type == "diffusion" and hasattr(cfg, "clip_x0"):
        pretrained_clip = spec.model_spec["diffusion"].get("clip_x0")  # type: ignore[index]
        if cfg.clip_x0 != pretrained_clip:
            warnings.warn(f"fine-tuning clamps predicted clean chunks at clip_x0={cfg.clip_x0}, the pre-trained "
                          f"model at {pretrained_clip}; pass --clip-x0 {pretrained_clip} to keep the model's.",
                          DiffrlWarning, stacklevel=3)


def finetuning_inputs(cfg: FinetuneConfig) -> tuple[PretrainedPolicy, str,
                                                    DPPOParams | GaussianPPOParams | GMMPPOParams]:
    """What ``cfg`` fine-tunes (:func:`finetuning_source`), on which env id, with which PPO settings."""
    pretrained, env_id = finetuning_source(cfg)
    params = agent_params(cfg, pretrained.spec)
    warn_clip_x0(cfg, pretrained)
    return pretrained, env_id, params


def finetuning_envs(cfg: FinetuneConfig | BaselineFinetune, pretrained: PretrainedPolicy, env_id: str,
                   act_steps: int) -> tuple[VecEnv, ActionChunkEnv, dict[str, Any]]:
    """The ``n_envs`` training chunk envs, the evaluation chunk env and its signature, which must be the one the
    policy was pre-trained for (one sentence otherwise)."""
    spec, norm = pretrained.spec, pretrained.normalization
    envs = chunk_envs(env_id, cfg.n_envs, cfg.seed, spec, norm, act_steps, cfg.max_episode_steps)
    eval_env = chunk_env(env_id, spec, norm, act_steps, cfg.max_episode_steps)
    signature = env_signature(env_id, eval_env.env)
    if signature != pretrained.env:
        envs.close()
        eval_env.close()
        raise ConfigError(f"{env_id} as installed here has spaces {signature} but the policy in {cfg.policy} was "
                          f"trained for {pretrained.env}.")
    return envs, eval_env, signature


def pretrained_ddpm(pretrained: PretrainedPolicy) -> DDPM:
    """The pre-trained DDPM of a diffusion policy, with its EMA weights when ``pretrained`` carries them (a fresh
    start; on resume and evaluation the checkpoint's agent state brings the weights)."""
    model = pretrained.spec.diffusion_model()
    if pretrained.weights is not None:
        ckpt.load_weights(model, pretrained.weights, pretrained.run_dir)
    return model


def build_ppo(cfg: FinetuneConfig, pretrained: PretrainedPolicy, device: torch.device) -> ChunkPPO:
    """``--algo dppo``'s agent: DPPO on a diffusion policy, plain PPO on a Gaussian or GMM one."""
    return build_agent(pretrained, agent_params(cfg, pretrained.spec), device)


def build_dpoer(cfg: DPOERFinetuneConfig, pretrained: PretrainedPolicy, device: torch.device) -> DPOER:
    """``--algo dpoer``'s agent, its entropy estimates drawn from their own seed stream."""
    return DPOER(pretrained_ddpm(pretrained), pretrained.spec.obs_dim, agent_params(cfg, pretrained.spec),  # type: ignore[arg-type]
                 device, seed=derive_seed(cfg.seed, ENTROPY_STREAM))


def build_baseline(cfg: BaselineFinetune, pretrained: PretrainedPolicy, device: torch.device) -> Any:
    """A baseline's agent (``cfg.AGENT``) on the pre-trained DDPM, seeded with the run seed."""
    return cfg.AGENT(pretrained_ddpm(pretrained), pretrained.spec.obs_dim, cfg.agent_params(pretrained.spec),
                     device, seed=cfg.seed)


@dataclasses.dataclass
class FinetuneCounters:
    """The fine-tuning loop's counters (saved in every checkpoint's ``state["loop"]``, where fine-tuning runs
    have always kept them)."""

    itr: int = 0
    env_steps: int = 0
    best_eval: float = -np.inf
    last_eval: dict[str, float] | None = None
    initial_eval: dict[str, float] | None = None  # the pre-trained policy through the fine-tuning routing


def perf_row(ro: onpolicy.Rollout, spent: dict[str, float], timers: dict[str, float]) -> dict[str, float]:
    """One iteration's ``perf/*`` timings, from the timers' growth since ``spent``."""
    rollout, scoring, update = (timers[k] - spent[k] for k in ("rollout_s", "scoring_s", "update_s"))
    return {"perf/rollout_s": rollout, "perf/scoring_s": scoring, "perf/update_s": update,
            "perf/rollout_s_per_env_step": rollout / max(ro.env_steps, 1),
            "perf/update_s_per_env_step": (scoring + update) / max(ro.env_steps, 1),
            "perf/env_steps_per_s": ro.env_steps / max(rollout + scoring + update, 1e-9)}


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune the pre-trained policy of ``cfg.policy`` with PPO (``--algo dppo``; DPOER's temperature with
    ``--algo dpoer``); returns the run directory."""
    device = resolve_device(cfg.device)
    algo = algo_name(cfg)

    # ------------------------------------------------------------------ setup (checks before any write)
    pretrained, env_id, params = finetuning_inputs(cfg)
    spec, norm = pretrained.spec, pretrained.normalization
    seed_everything(cfg.seed)
    envs, eval_env, signature = finetuning_envs(cfg, pretrained, env_id, params.act_steps)
    agent = FINETUNE_ALGOS[algo].build(cfg, pretrained, device)
    scaler = RunningRewardScaler(cfg.n_envs) if cfg.reward_scale_running else None
    sample_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, SAMPLE_STREAM))  # rollout noise
    minibatch_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, MINIBATCH_STREAM))
    session = RunSession(cfg, finetune_pipeline(algo, spec.policy_type), env_id, signature=signature, meta={
        "policy": spec.to_dict(), "ref_scores": pretrained.ref_scores, "dataset": pretrained.dataset,
        "pretrain_run": str(cfg.policy), "agent_params": to_dict(params)})
    if session.resumed:
        state = session.parts["state"]
        agent.load_state_dict(state["agent"])
        if scaler is not None:
            scaler.load_state_dict(state["reward_scaler"])
        sample_gen.set_state(state["sample_gen"])
        minibatch_gen.set_state(state["minibatch_gen"])
        obs = envs.load_state_dict(state["envs"])  # replays the running episodes
    else:
        obs = envs.reset()
    c = session.start(FinetuneCounters(), timers={"rollout_s": 0.0, "scoring_s": 0.0, "update_s": 0.0, "eval_s": 0.0})
    timers = session.timers

    def evaluate_agent() -> dict[str, float]:  # the fine-tuning routing itself: agent.policy
        with timers.time("eval_s"):
            return evaluate_chunk_policy(agent.policy, eval_env, cfg.eval_episodes, cfg.seed, device,
                                         pretrained.ref_scores, cfg.eval_mean_path)

    # ------------------------------------------------------------------ loop
    if not session.resumed and cfg.eval_every > 0:  # the pre-trained policy through the fine-tuning routing
        c.initial_eval = evaluate_agent()
        session.log(0, {"itr": 0.0, **c.initial_eval}, env_steps=0)
    session.progress_bar(cfg.n_train_itr, c.itr, desc=f"{session.pipeline} {env_id}", unit="itr")
    while c.itr < cfg.n_train_itr:
        spent = dict(timers)
        with timers.time("rollout_s"):
            ro = onpolicy.collect(agent, envs, obs, cfg.n_steps, sample_gen)
        with timers.time("scoring_s"):
            values, adv, ret, stats = onpolicy.advantages(agent, ro, cfg.gamma, cfg.gae_lambda, scaler,
                                                          cfg.logprob_batch_size)
        with timers.time("update_s"):
            metrics = onpolicy.ppo_update(agent, ro, values, adv, ret, update_epochs=cfg.update_epochs,
                                          minibatch_size=minibatch_size(cfg, agent),
                                          critic_only=c.itr < cfg.n_critic_warmup_itr, generator=minibatch_gen,
                                          logprob_batch_size=cfg.logprob_batch_size)
        obs, c.env_steps, c.itr = ro.last_obs, c.env_steps + ro.env_steps, c.itr + 1

        done_all = c.itr >= cfg.n_train_itr
        row: dict[str, float] = {}
        on_grid = due(cfg.eval_every, c.itr - 1, c.itr)
        if on_grid or done_all:  # off-grid final evaluation: summary only (see pipelines.online)
            c.last_eval = evaluate_agent()
            if on_grid:
                c.best_eval = max(c.best_eval, c.last_eval["eval/return_mean"])
                row.update(c.last_eval)
        if due(cfg.log_every, c.itr - 1, c.itr) or done_all:
            row.update({**metrics, **stats, **episode_stats(ro.episodes)})
            session.check_finite(row, c.env_steps)
            row.update({"itr": float(c.itr), "gradient_steps": float(agent.num_updates),
                        **perf_row(ro, spent, timers)})
        session.log(c.env_steps, row, env_steps=c.env_steps)
        session.progress(1, **({"eval": c.last_eval["eval/return_mean"]} if c.last_eval else {}))
        if due(cfg.checkpoint_every, c.itr - 1, c.itr) or done_all:
            session.save(c.env_steps, state={
                "agent": agent.state_dict(), "envs": envs.state_dict(), "sample_gen": sample_gen.get_state(),
                "minibatch_gen": minibatch_gen.get_state(),
                **({"reward_scaler": scaler.state_dict()} if scaler is not None else {})},
                parts={"normalization": norm.state_dict()},
                meta={"iteration": c.itr, "env_steps": c.env_steps, "gradient_steps": agent.num_updates})
    if c.last_eval is None:  # resumed at the end: evaluate once more for the summary
        c.last_eval = evaluate_agent()
    envs.close()
    eval_env.close()
    return session.finish(finetune_summary(cfg, c, agent, spec, env_id, params, timers, session.wall_s()))


def finetune_summary(cfg: FinetuneConfig, c: FinetuneCounters, agent: ChunkPPO, spec: PolicySpec, env_id: str,
                     params: PPOParams, timers: dict[str, float], wall: float) -> dict[str, Any]:
    """``summary.json`` of a fine-tuning run: the final, best and initial evaluations, counts and costs."""
    last, initial = c.last_eval or {}, c.initial_eval
    train_s = timers["rollout_s"] + timers["scoring_s"] + timers["update_s"]
    return {"algo": algo_name(cfg), "policy_type": spec.policy_type, "env_id": env_id, "pretrain_run": str(cfg.policy),
            "iterations": c.itr, "env_steps": c.env_steps, "gradient_steps": agent.num_updates,
            "actor_updates": agent.num_actor_updates, "wall_s": wall, "env_steps_per_s": c.env_steps / max(wall, 1e-9),
            "eval_return_mean": last["eval/return_mean"], "eval_return_std": last["eval/return_std"],
            "normalized_score": last.get("eval/normalized_score"),
            "best_eval_return": max(float(c.best_eval), last["eval/return_mean"]),
            "initial_eval_return": initial["eval/return_mean"] if initial else None,
            "initial_normalized_score": initial.get("eval/normalized_score") if initial else None,
            "eval_episodes": cfg.eval_episodes, "eval_mean_path": cfg.eval_mean_path,
            "rollout_s_per_env_step": timers["rollout_s"] / max(c.env_steps, 1),
            "update_s_per_iteration": (timers["scoring_s"] + timers["update_s"]) / max(c.itr, 1),
            "train_env_steps_per_s": c.env_steps / max(train_s, 1e-9),
            "agent_params": to_dict(params), "time_breakdown_s": dict(timers)}


def finetune_baseline(cfg: BaselineFinetune) -> Path:
    """Fine-tune the pre-trained diffusion policy of ``cfg.policy`` with a baseline that runs in a loop of its own
    (``--algo dql|idql|dipo|qsm``: :func:`diffrl.pipelines.chunk_offpolicy.train`; ``--algo drwr|dawr``:
    :func:`diffrl.pipelines.chunk_rwr.train`); returns the run directory."""
    device = resolve_device(cfg.device)
    algo = algo_name(cfg)
    train = FINETUNE_ALGOS[algo].train
    assert train is not None, f"--algo {algo} runs in a loop: its FinetuneAlgo names the loop's train"
    pretrained, env_id = finetuning_source(cfg)
    spec = pretrained.spec
    params = cfg.agent_params(spec)
    warn_clip_x0(cfg, pretrained)
    seed_everything(cfg.seed)
    envs, eval_env, signature = finetuning_envs(cfg, pretrained, env_id, params.act_steps)
    agent = FINETUNE_ALGOS[algo].build(cfg, pretrained, device)  # on resume the loop restores its state
    session = RunSession(cfg, finetune_pipeline(algo, spec.policy_type), env_id, signature=signature, meta={
        "policy": spec.to_dict(), "ref_scores": pretrained.ref_scores, "dataset": pretrained.dataset,
        "pretrain_run": str(cfg.policy), "agent_params": to_dict(params)})
    run_dir = train(
        cfg, session, agent, envs, eval_env, ref_scores=pretrained.ref_scores, eval_mean_path=cfg.eval_mean_path,
        parts={"normalization": pretrained.normalization.state_dict()},
        summary={"algo": algo, "policy_type": spec.policy_type, "pretrain_run": str(cfg.policy),
                 "agent_params": to_dict(params)})
    envs.close()
    eval_env.close()
    return run_dir


# ------------------------------------------------------------------------------------ the fine-tuning methods
@dataclasses.dataclass(frozen=True)
class FinetuneAlgo:
    """One method of ``diffrl dppo finetune --algo NAME``."""

    config: type
    """its config class (its fields are the command's flags)"""
    run: Callable[[Any], Path]
    """``run(cfg) -> run_dir``"""
    build: Callable[[Any, PretrainedPolicy, torch.device], Any]
    """``build(cfg, pretrained, device)``: its agent, on the pre-trained weights when ``pretrained`` carries them
    (the agent state of a checkpoint is loaded into it on resume and by ``diffrl eval``); ``agent.policy`` is the
    chunk policy evaluation samples"""
    presets: Mapping[str, Mapping[str, Any]]
    """preset name -> field values (``--preset``)"""
    policy_types: tuple[str, ...] = ("diffusion",)
    """the pre-trained policy types it fine-tunes"""
    train: Callable[..., Path] | None = None
    """a :class:`BaselineFinetune` method's loop: ``train(cfg, session, agent, envs, eval_env, *, ref_scores,
    eval_mean_path, parts, summary)`` (:func:`diffrl.pipelines.chunk_offpolicy.train`,
    :func:`diffrl.pipelines.chunk_rwr.train`)"""


FINETUNE_ALGOS: dict[str, FinetuneAlgo] = {
    "dppo": FinetuneAlgo(FinetuneConfig, finetune, build_ppo, PRESETS["finetune"], POLICY_TYPES),
    "dpoer": FinetuneAlgo(DPOERFinetuneConfig, finetune, build_dpoer, PRESETS["finetune"]),  # the port: DPPO's configs
    "dql": FinetuneAlgo(DQLFinetuneConfig, finetune_baseline, build_baseline, PRESETS["finetune_dql"],
                        train=chunk_offpolicy.train),
    "idql": FinetuneAlgo(IDQLFinetuneConfig, finetune_baseline, build_baseline, PRESETS["finetune_idql"],
                         train=chunk_offpolicy.train),
    "dipo": FinetuneAlgo(DIPOFinetuneConfig, finetune_baseline, build_baseline, PRESETS["finetune_dipo"],
                         train=chunk_offpolicy.train),
    "qsm": FinetuneAlgo(QSMFinetuneConfig, finetune_baseline, build_baseline, PRESETS["finetune_qsm"],
                        train=chunk_offpolicy.train),
    "drwr": FinetuneAlgo(DRWRFinetuneConfig, finetune_baseline, build_baseline, PRESETS["finetune_drwr"],
                         train=chunk_rwr.train),
    "dawr": FinetuneAlgo(DAWRFinetuneConfig, finetune_baseline, build_baseline, PRESETS["finetune_dawr"],
                         train=chunk_rwr.train),
}
"""``--algo`` -> method, in ``diffrl dppo finetune --help`` order; ``dppo`` is the default."""


def algo_name(cfg: Any) -> str:
    """The ``--algo`` a fine-tuning config belongs to."""
    return next(name for name, algo in FINETUNE_ALGOS.items() if type(cfg) is algo.config)


def finetune_pipeline(algo: str, policy_type: str) -> str:
    """The pipeline name a fine-tuning run records: ``dppo_finetune[_gaussian|_gmm]`` for ``--algo dppo`` (the names
    DPPO runs have always had), ``dppo_finetune_<algo>`` for the others."""
    return PIPELINES["finetune", policy_type] if algo == "dppo" else f"dppo_finetune_{algo}"


def run_finetune(cfg: Any) -> Path:
    """``diffrl dppo finetune``: run the method ``cfg`` belongs to; returns the run directory."""
    return FINETUNE_ALGOS[algo_name(cfg)].run(cfg)


# -------------------------------------------------------------------------------------------------- evaluation
def load_finetuned(run_dir: Path, cfg: Any, device: str = "auto") -> tuple[Any, PretrainedPolicy, dict[str, Any]]:
    """The fine-tuned agent of a fine-tuning run's latest checkpoint (any ``--algo``: for DPPO the frozen base +
    fine-tuned copy), what it was pre-trained as, and the checkpoint manifest; built from the checkpoint alone (the
    pre-training run is not read). ``cfg``: the run's config (``registry.load_config(run_dir,
    SYSTEM.command("finetune"))``)."""
    manifest, parts = ckpt.load_checkpoint(run_dir, parts=("state", "normalization"))
    pretrained = PretrainedPolicy.from_finetuning(Path(str(cfg.policy)), manifest, parts)
    agent = FINETUNE_ALGOS[algo_name(cfg)].build(cfg, pretrained, resolve_device(device))
    agent.load_state_dict(parts["state"]["agent"])
    return agent, pretrained, manifest


def evaluate_run(run_dir: Path, cfg: Any, episodes: int = 10, device: str = "auto", seed: int | None = None,
                 mean_path: bool | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of a ``diffrl dppo`` run with :func:`diffrl.eval.evaluate`: a pre-training run
    with its EMA weights, a fine-tuning run (any ``--algo``) with its agent's policy, routed as during training;
    ``cfg``: the run's saved config; ``mean_path`` (default: the run's ``eval_mean_path``) as in
    :class:`~diffrl.pipelines.chunk_policy.ChunkActor`."""
    mean_path = cfg.eval_mean_path if mean_path is None else mean_path
    dev = resolve_device(device)
    if not isinstance(cfg, PretrainConfig):
        agent, pretrained, manifest = load_finetuned(run_dir, cfg, device)
        policy: ChunkPolicy = agent.policy
        act_steps = chunking(cfg, pretrained.spec)[1]
    else:
        manifest, parts = ckpt.load_checkpoint(run_dir, parts=("policy", "normalization"))
        pretrained = PretrainedPolicy.from_pretraining(run_dir, manifest, parts)
        policy = pretrained.spec.build_policy(pretrained.weights, pretrained.run_dir)  # type: ignore[arg-type]
        act_steps = pretrained.spec.act_steps
    env_id = pretrained.env["env_id"]
    env = chunk_env(env_id, pretrained.spec, pretrained.normalization, act_steps, cfg.max_episode_steps)
    ckpt.check_env(manifest, env_signature(env_id, env.env), run_dir)  # the one env check of every evaluate_run
    seed = cfg.seed if seed is None else seed
    result = evaluate(ChunkActor(policy, dev, seed, mean_path), env, episodes, seed=seed)
    env.close()
    out = {"run_dir": str(run_dir), "env_id": env_id, "checkpoint_step": manifest["step"], "episodes": episodes,
           "policy_type": pretrained.spec.policy_type, "eval_mean_path": mean_path, **result.to_dict()}
    if not isinstance(cfg, PretrainConfig):
        out["algo"] = algo_name(cfg)
    score = normalized_mean(result.returns, pretrained.ref_scores)
    if score is not None:
        out["normalized_score"] = score
    return out


SYSTEM = System("dppo", "DPPO: BC of a diffusion (or Gaussian / GMM) chunk policy, then PPO fine-tuning (or a "
                "baseline's)", commands=(
    Command("pretrain", {"": PretrainConfig}, pretrain, {"": PRESETS["pretrain"]},
            pipelines={PIPELINES["pretrain", t]: PretrainConfig for t in POLICY_TYPES}, evaluate=evaluate_run,
            eval_options=("mean_path",), summary_lines=online.summary_lines,
            help="--dataset D [--policy-type diffusion|gaussian|gmm]"),
    Command("finetune", {name: a.config for name, a in FINETUNE_ALGOS.items()}, run_finetune,
            {name: a.presets for name, a in FINETUNE_ALGOS.items()},
            pipelines={finetune_pipeline(name, t): a.config for name, a in FINETUNE_ALGOS.items()
                       for t in a.policy_types},
            algo_flag="--algo", default_algo="dppo", evaluate=evaluate_run, eval_options=("mean_path",),
            summary_lines=online.summary_lines,
            help="--policy PRETRAIN_RUN_DIR [--ft-denoising-steps K'] [--use-ddim --ddim-steps S]"),))
