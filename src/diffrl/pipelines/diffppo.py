"""DiffPPO (Gao et al., arXiv:2409.01427): PPO made sample-efficient with a diffusion model learned from logged data.

    diffrl diffppo --env ID --dataset D --mode prior|augment [--data-fraction F] [--preset quick|paper]

Two modes, both the PPO loop of :mod:`diffrl.pipelines.ppo` (``diffrl train ppo``'s settings) with hooks
(:class:`~diffrl.pipelines.ppo.PPOHooks`); each stage runs in a sub-directory of the run, resumable and reusable:

``prior`` (the paper's v6, "PPO-DAP"; brief section B):

1. ``prior/``: a diffusion action prior ``p(a | s)``, an epsilon-DDPM over one action ``(1, Da)`` (DPPO's chunk
   denoiser with a one-step chunk, ``prior_denoising_steps`` cosine steps) conditioned on the raw state z-scored with
   the dataset's statistics, trained on the logged data (``--prior PATH`` reuses one);
2. PPO online. The prior's denoiser gets LoRA adapters (rank 8) and one adapter step (lr 1e-5) on the denoising loss
   of the iteration's on-policy actions every ``prior_every`` iterations; a Q head ``Q(s, a)`` on [normalised obs,
   action] is fitted after each update by one-step TD on ``r + gamma (1 - terminated) V(s')`` (the iteration's
   transitions, the loop's scaled rewards, the updated critic's V). Before each update, for every state of the
   rollout (never the dataset's), the prior proposes K actions, each moved by one ``grad_a Q`` step and weighted by
   ``softmax(beta Q)`` with beta annealed 0 -> 1, keeping the top 20% (:func:`~diffrl.agents.proposals.propose`);
   each PPO minibatch's actor loss gets ``aux_coef * weighted NLL of its states' proposals under the PPO Gaussian``
   and ``kl_coef * KL bound`` (below). PPO's clipped objective and the critic see only rollout data.

``augment`` (the paper's v1): a ``data_fraction`` slice of the dataset's episodes (a *limited* logged dataset);

1. ``diffusion/``: SynthER's transition model on that slice (:func:`diffrl.pipelines.diffusion.run`; ``--diffusion
   PATH`` reuses one), then ``samples.npz``: ``num_samples`` generated transitions;
2. pre-training before the first PPO iteration: the observation normaliser and the reward scale from the data, the
   Gaussian's mean by behaviour cloning on real + synthetic (s, a), the value on the real episodes' discounted
   returns; then PPO online. ``--no-synthetic`` is the control: the same pre-training on the real slice alone.

The KL estimator (prior mode). With ``a = mu(s) + std * eps`` (reparameterised, ``eps ~ N(0, I)``),
``KL(pi || prior) = E_pi[log pi(a | s) - log p(a | s)] <= E_pi[log pi(a | s) + B(a, s)]`` where ``B >= -log p`` is
the prior's DDPM variational bound (:func:`~diffrl.diffusion.likelihood.ddpm_nll_bound`, Ho et al. eq. 5). One
``a`` per state and ``kl_num_t`` uniformly drawn denoising steps per ``a`` give an unbiased estimate of that upper
bound; its gradient reaches the policy through ``a`` (the mean) and ``log pi`` (the std), never the prior (frozen
here; the reference used a Gaussian stand-in for the prior's density).

Deviations, each for a reason:

- The prior conditions on dataset-normalised raw states while the PPO policy acts on running-normalised ones: a
  minibatch's observations are mapped back to raw units with the loop's CURRENT statistics (they were normalised
  with the statistics of their step; the two differ by one rollout's update, and the normalised clip at 10 is not
  undone).
- The Q head's targets use the rewards scaled with the reward scaler's statistics after the rollout (the loop
  scales each step with the statistics after that step), so Q lives in the critic's units.
- Proposals are drawn once per iteration, for all of its states, and reused by the update's epochs: the prior, the
  Q head and beta do not change during an update, so this is the same distribution of proposals at a tenth of the
  prior's cost per state (10 epochs). Per-minibatch draws (``--fresh-proposals``: new proposals each time a state
  is in a minibatch) cost an update-epochs multiple of that (benchmarks/RESULTS.md has the measured costs).
- "Every N updates" is every ``prior_every`` PPO iterations (one update phase each); the adapter step uses all of
  the iteration's actions, clipped to the action bounds (the env executes them clipped).
- Augment: the value is fitted on the real episodes only (synthetic transitions have no episodes); the BC loss is
  the Gaussian NLL with the std held at ``std_init`` (``GaussianPolicy.bc_loss``: the mean's weighted MSE); the
  normaliser's and scaler's running counts start at the real slice's transitions so online data moves them.

``summary.json`` adds the stages, ``train_s`` (rollout + update seconds: the wall clock to compare with plain PPO,
whose summary has the same figures) and ``peak_rss_mib`` (``ru_maxrss`` of the process, stages included; plain
PPO records the same; ``peak_cuda_mib`` on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffrl.agents.nets import mlp
from diffrl.agents.ppo import GaussianPPO
from diffrl.agents.ppo_utils import PPOBatch, RunningObsNormalizer, RunningRewardScaler
from diffrl.agents.proposals import Proposals, beta_schedule, propose
from diffrl.config import check, check_choice, check_non_negative, check_positive, check_unit_interval, to_dict
from diffrl.data import OfflineDataset, dataset_run_name, fingerprint, load_dataset
from diffrl.diffusion.adapters import add_lora, lora_state_dict
from diffrl.diffusion.likelihood import ddpm_nll_bound
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.spec import build_model, load_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.errors import CheckpointError, ConfigError
from diffrl.pipelines import diffusion, online, onpolicy, ppo
from diffrl.pipelines.common import DiffusionSettings, RunConfig, reused_stage, stage_status
from diffrl.registry import Command, System
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.lock import lock_run_dir
from diffrl.runs.memory import peak_rss_mib
from diffrl.runs.rundir import check_resumable, new_run_dir, read_summary, write_config, write_json_atomic
from diffrl.runs.seeding import derive_seed, seed_everything
from diffrl.runs.session import RunSession

PIPELINE = "diffppo"
# derive_seed streams of the hooks' generators
PROPOSAL_STREAM, KL_STREAM, Q_STREAM, PRIOR_STREAM, LORA_STREAM, PRETRAIN_STREAM = (
    31_337_001, 31_337_002, 31_337_003, 31_337_004, 31_337_005, 31_337_006)


@dataclasses.dataclass(frozen=True)
class DiffPPOSettings(DiffusionSettings):
    """DiffPPO's settings on top of PPO's (the prior's: the reference's ``algo/diffppo.py``; brief section B)."""

    dataset: str = ""
    """logged data: a Minari id or a path to a D4RL .hdf5 / DPPO .npz file, collected on --env"""
    mode: str = "prior"
    """prior (v6, PPO-DAP: a diffusion action prior guides PPO) or augment (v1: synthetic data for pre-training)"""
    data_fraction: float | None = None
    """keep this random fraction of the dataset's episodes (None: 0.1 in augment mode, 1.0 in prior mode)"""
    # ---- prior mode
    prior: Path | None = None
    """reuse this action prior (a DiffPPO run directory or its prior/ stage) instead of training one"""
    prior_steps: int = 50_000
    """prior gradient steps on the dataset (ours: the reference trains no diffusion prior)"""
    prior_batch_size: int = 256
    """(state, action) pairs per prior step"""
    prior_lr: float = 3e-4
    """prior learning rate (AdamW, cosine)"""
    prior_hidden: int = 256
    """width of the prior's denoiser (DPPO's chunk MLP with one residual block)"""
    prior_denoising_steps: int = 10
    """DDPM steps of the prior (ours: few, as DPPO's 10-20, since the prior is sampled for every rollout state)"""
    lora_rank: int = 8
    """rank of the prior's LoRA adapters (the reference's 8)"""
    lora_lr: float = 1e-5
    """adapter learning rate (the reference's 1e-5)"""
    prior_every: int = 10
    """one adapter step every this many PPO iterations (the reference's 10 updates)"""
    num_proposals: int = 10
    """K, prior proposals per state (the reference's 10)"""
    proposal_step: float = 0.3
    """alpha of the grad_a Q step on each proposal (the reference's 0.3)"""
    proposal_keep: float = 0.2
    """fraction of proposals kept per state (the reference's ceil(0.2 K))"""
    fresh_proposals: bool = False
    """draw new proposals for every minibatch instead of once per iteration for all of its states (costlier)"""
    beta_anneal: float = 0.3
    """beta rises 0 -> 1 over this fraction of the iterations (the reference's 30%)"""
    aux_coef: float = 0.01
    """lambda_aux of the proposals' weighted NLL (the reference's 0.01)"""
    kl_coef: float = 0.005
    """lambda_KL of the KL bound to the prior (the reference's 0.005)"""
    kl_num_t: int = 1
    """denoising steps drawn per action for the prior's ELBO (Monte Carlo; the bound's L_T is exact)"""
    q_hidden: tuple[int, ...] = (64, 64)
    """hidden widths of the Q head (tanh, as PPO's critic)"""
    q_lr: float = 3e-4
    """Q head learning rate (Adam)"""
    q_epochs: int = 1
    """epochs of TD minibatches (num_minibatches per epoch) over each iteration's transitions"""
    # ---- augment mode
    synthetic: bool = True
    """pre-train on real + synthetic data (False: the control, the real slice alone; no diffusion model)"""
    num_samples: int = 1_000_000
    """generated transitions"""
    diffusion: Path | None = None
    """reuse a transition model (a DiffPPO run directory, its diffusion/ stage or a `diffrl diffusion train` run)"""
    pretrain_steps: int = 10_000
    """gradient steps of BC on the policy's mean and, separately, of the value fit (ours)"""
    pretrain_batch_size: int = 256
    """samples per pre-training step"""
    pretrain_lr: float = 1e-3
    """pre-training learning rate (Adam)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset:
            raise ConfigError("--dataset is required: logged data of --env (a Minari id or a .hdf5 / .npz path).")
        check_choice("mode", self.mode, ("prior", "augment"))
        if self.data_fraction is not None:
            check_unit_interval("data_fraction", self.data_fraction)
        for name in ("prior_steps", "prior_batch_size", "prior_lr", "prior_hidden", "prior_denoising_steps",
                     "lora_rank", "lora_lr", "prior_every", "num_proposals", "kl_num_t", "q_lr", "q_epochs",
                     "num_samples", "pretrain_batch_size", "pretrain_lr"):
            check_positive(name, getattr(self, name))
        for name in ("proposal_step", "aux_coef", "kl_coef", "pretrain_steps"):
            check_non_negative(name, getattr(self, name))
        check_unit_interval("proposal_keep", self.proposal_keep)
        check(0 <= self.beta_anneal <= 1, "beta_anneal", self.beta_anneal, "in [0, 1]")

    @property
    def fraction(self) -> float:
        """The fraction of episodes kept (``data_fraction`` or the mode's default)."""
        if self.data_fraction is not None:
            return self.data_fraction
        return 0.1 if self.mode == "augment" else 1.0


@dataclasses.dataclass(frozen=True)
class DiffPPOConfig(DiffPPOSettings, ppo.PPOConfig):
    """``diffrl diffppo``: PPO with a diffusion action prior (``--mode prior``) or pre-trained on diffusion-upsampled
    logged data (``--mode augment``). Steps are env steps, as ``diffrl train ppo``."""


# quick: minutes on one CPU core (Hopper-v5, 50k env steps, a 128-wide prior / transition model); paper: the
# paper's 1M online steps and the reference's coefficients (the defaults); the model sizes there are ours
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"steps": 50_000, "eval_every": 10_000, "eval_episodes": 5, "checkpoint_every": 10_000,
              "prior_steps": 5_000, "prior_hidden": 128, "diffusion_steps": 5_000, "diffusion_width": 256,
              "diffusion_depth": 3, "sampler": "dpmpp_2m_sde", "sample_steps": 32, "num_samples": 100_000,
              "pretrain_steps": 2_000},
    "paper": {"steps": 1_000_000, "eval_every": 20_000, "eval_episodes": 10, "checkpoint_every": 50_000,
              "prior_steps": 50_000, "diffusion_steps": 100_000, "diffusion_width": 1024, "num_samples": 1_000_000,
              "pretrain_steps": 10_000},
}


# ------------------------------------------------------------------------------------------------- data
def real_data(cfg: DiffPPOConfig) -> tuple[OfflineDataset, int]:
    """The dataset checked against ``cfg.env`` and its ``fraction`` of episodes; one sentence when it does not fit."""
    full = load_dataset(cfg.dataset, env_id=cfg.env)  # dims and action bounds against the env
    recorded = full.metadata.get("env_id")
    if recorded and recorded != cfg.env:
        raise ConfigError(f"dataset {cfg.dataset} was collected on {recorded}, not on --env {cfg.env}; pass "
                          f"--env {recorded} or a dataset of {cfg.env}.")
    episodes = len(full.episode_slices())
    if round(cfg.fraction * episodes) < 1:
        raise ConfigError(f"data_fraction={cfg.fraction} keeps no episode of the {episodes} in {cfg.dataset}; "
                          f"raise it to at least {1 / episodes:.3g}.")
    real = full.subset_episodes(cfg.fraction, cfg.seed) if cfg.fraction < 1.0 else full
    return real, episodes


# ------------------------------------------------------------------------------------- prior mode: stage 1
@dataclasses.dataclass(frozen=True)
class PriorConfig(TrainerSettings, RunConfig):
    """The action prior's training run (the ``prior/`` stage of a DiffPPO run)."""

    dataset: str = ""
    """the dataset (its fingerprint is checked on resume)"""
    seed: int = 0
    """run seed"""
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the model spec (:func:`prior_spec`)"""
    log_every: int = 500
    """metrics row every this many steps"""


def prior_spec(obs_dim: int, act_dim: int, hidden: int, steps: int) -> dict[str, Any]:
    """DPPO's diffusion policy with a one-action chunk: an epsilon-DDPM over ``(1, Da)`` conditioned on the
    z-scored state, DPPO's chunk MLP (one residual block), a cosine schedule, the clean action clipped to [-1, 1]."""
    return {"type": "ddpm", "event_shape": [1, act_dim], "cond_dim": obs_dim,
            "denoiser": {"type": "chunk_mlp", "hidden": hidden, "blocks": 1, "time_dim": 16, "activation": "mish"},
            "normalizer": {"kind": "none"},
            "diffusion": {"num_steps": steps, "schedule": "cosine", "prediction": "epsilon", "clip_x0": 1.0},
            "sampler": {"sampler": "ddpm"}}


def train_prior(cfg: PriorConfig, ds: OfflineDataset, mean: np.ndarray, std: np.ndarray) -> Path:
    """Train (or resume) the action prior on ``ds``'s (state, action) pairs; returns its run directory."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(cfg.spec).to(device)
    cond = torch.as_tensor((ds.observations - mean) / std, dtype=torch.float32, device=device)  # (N, Do)
    act = torch.as_tensor(ds.actions, device=device).clamp(-1.0, 1.0)[:, None]  # (N, 1, Da)
    trainer = DiffusionTrainer(model, act, cfg, cond=cond, seed=cfg.seed)
    session = RunSession(cfg, PIPELINE + "_prior", dataset_run_name(cfg.dataset), fingerprint=fingerprint(ds),
                         meta={"model_spec": cfg.spec, "cond_mean": mean.tolist(), "cond_std": std.tolist()})
    if session.resumed:
        trainer.load_state_dict(session.parts["diffusion"])
    c = session.start(diffusion.Counters(), timers={"train_s": 0.0})
    session.progress_bar(cfg.steps, trainer.step, desc="diffppo action prior", unit="step")
    diffusion.train_steps(session, trainer, c, cfg.steps, cfg.log_every, cfg.checkpoint_every)
    return session.finish({"dataset": cfg.dataset, "gradient_steps": trainer.step, "final_loss": c.last_loss,
                           "transitions": len(ds), "wall_s": session.wall_s(), "env_steps": 0})


def action_prior(cfg: DiffPPOConfig, ds: OfflineDataset, run_dir: Path,
                 device: torch.device) -> tuple[DDPM, np.ndarray, np.ndarray, Path]:
    """Stage 1: the prior (EMA weights) and its condition statistics, from ``--prior``, a finished stage, a resumed
    one or a new one."""
    if cfg.prior is not None:
        prior_dir = reused_stage(cfg.prior, "prior")
    else:
        prior_dir = run_dir / "prior"
        status = stage_status(prior_dir)
        if status != "done":
            resume = status == "resume"
            mean, std = ds.observations.mean(0), ds.observations.std(0) + 1e-6
            pcfg = PriorConfig(dataset=str(cfg.dataset), seed=cfg.seed,
                               spec=prior_spec(ds.obs_dim, ds.act_dim, cfg.prior_hidden, cfg.prior_denoising_steps),
                               steps=cfg.prior_steps, batch_size=cfg.prior_batch_size, lr=cfg.prior_lr,
                               checkpoint_every=min(10_000, cfg.prior_steps), device=cfg.device,
                               progress=cfg.progress, run_dir=None if resume else prior_dir,
                               resume=prior_dir if resume else None, runs_root=cfg.runs_root)
            train_prior(pcfg, ds, mean, std)
    try:
        model, meta = load_model(prior_dir, device=device)
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"{prior_dir} holds no DiffPPO action prior ({e}).") from None
    if not isinstance(model, DDPM) or "cond_mean" not in meta:
        raise CheckpointError(f"{prior_dir} holds no DiffPPO action prior (a DDPM with its condition statistics).")
    if tuple(model.event_shape) != (1, ds.act_dim) or model.cond_dim != ds.obs_dim:
        raise CheckpointError(f"the action prior in {prior_dir} models {model.event_shape[-1]}-dim actions of "
                              f"{model.cond_dim}-dim states; this dataset has {ds.act_dim} and {ds.obs_dim}.")
    return model, np.asarray(meta["cond_mean"]), np.asarray(meta["cond_std"]), prior_dir


def _gen(seed: int, stream: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream))


# ------------------------------------------------------------------------------------- prior mode: the hooks
class PriorHooks(ppo.PPOHooks):
    """PPO-DAP's additions to the PPO loop (module docstring): the LoRA-adapted prior, the Q head, the proposals'
    auxiliary NLL and the KL bound per minibatch, the Q fit and the adapter step after each update.

    Args:
        cfg: the run's config.
        prior: the pre-trained prior (adapters are added here; its own weights stay frozen).
        cond_mean, cond_std: the dataset statistics the prior's condition was z-scored with, ``(Do,)``.
        device: torch device.
    """

    def __init__(self, cfg: DiffPPOConfig, prior: DDPM, cond_mean: np.ndarray, cond_std: np.ndarray,
                 device: torch.device) -> None:
        self.cfg, self.prior, self.device = cfg, prior.eval(), device
        self.adapters = add_lora(prior.net, cfg.lora_rank, generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, LORA_STREAM)))
        for p in self.adapters:
            p.requires_grad_(False)  # trainable only inside the adapter step: the KL term must not reach them
        self.adapter_opt = torch.optim.Adam(self.adapters, lr=cfg.lora_lr)
        d_obs, d_act = prior.cond_dim, prior.event_shape[-1]
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed, whatever ran before
            torch.manual_seed(derive_seed(cfg.seed, Q_STREAM))
            self.q = mlp(d_obs + d_act, cfg.q_hidden, 1, nn.Tanh).to(device)
        self.q_opt = torch.optim.Adam(self.q.parameters(), lr=cfg.q_lr)
        self.cond_mean = torch.as_tensor(cond_mean, dtype=torch.float32, device=device)
        self.cond_std = torch.as_tensor(cond_std, dtype=torch.float32, device=device)
        self.gens = {name: _gen(cfg.seed, stream, device) for name, stream in
                     (("proposal", PROPOSAL_STREAM), ("kl", KL_STREAM), ("q", Q_STREAM), ("prior", PRIOR_STREAM))}
        self.adapter_steps, self.beta = 0, 0.0
        self.proposals: Proposals | None = None  # of the current iteration's states, (M, k, Da)
        self.obs_norm: RunningObsNormalizer | None = None
        self.agent: GaussianPPO | None = None

    def setup(self, agent: GaussianPPO, obs_norm: RunningObsNormalizer | None,
              scaler: RunningRewardScaler | None) -> None:
        self.agent, self.obs_norm = agent, obs_norm

    # ---------------------------------------------------------------------------------------- conversions
    def condition(self, obs: torch.Tensor) -> torch.Tensor:
        """The prior's condition ``(B, Do)`` of the loop's running-normalised observations ``(B, Do)``: back to raw
        units with the loop's current statistics, then z-scored with the dataset's (module docstring)."""
        raw = obs
        if self.obs_norm is not None:
            n = self.obs_norm
            raw = obs * torch.as_tensor(np.sqrt(n.var + n.eps), dtype=obs.dtype, device=obs.device) \
                + torch.as_tensor(n.mean, dtype=obs.dtype, device=obs.device)
        return (raw - self.cond_mean) / self.cond_std

    def prior_sample(self, obs: torch.Tensor, num: int) -> torch.Tensor:
        """``num`` prior actions per state, ``(B, num, Da)``, for normalised observations ``(B, Do)``."""
        cond = self.condition(obs).repeat_interleave(num, dim=0)  # (B * num, Do)
        a = self.prior.sample(len(cond), cond, generator=self.gens["proposal"])  # (B * num, 1, Da)
        return a.view(len(obs), num, -1)

    def q_value(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``Q(s, a)`` ``(B,)`` of normalised observations and actions in [-1, 1]."""
        return self.q(torch.cat([obs, act], dim=-1)).squeeze(-1)

    # -------------------------------------------------------------------------------------------- hooks
    def begin_iteration(self, itr: int, iterations: int) -> None:
        c = self.cfg
        self.beta = beta_schedule(itr / (c.beta_anneal * iterations)) if c.beta_anneal > 0 else 1.0

    def propose(self, obs: torch.Tensor) -> Proposals:
        """The kept proposals of normalised states ``(B, Do)`` with this iteration's beta."""
        c = self.cfg
        return propose(self.prior_sample, self.q_value, obs, num=c.num_proposals, step=c.proposal_step,
                       beta=self.beta, keep=c.proposal_keep)

    def before_update(self, ro: onpolicy.Rollout) -> None:
        """The proposals of every state of the rollout, once for the update's epochs (module docstring)."""
        self.proposals = None if self.cfg.fresh_proposals else self.propose(ro.obs.flatten(0, 1)[:, 0])

    def extra_loss(self, batch: PPOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``aux_coef * weighted NLL of the proposals + kl_coef * (log pi(a|s) + B(a, s))`` on the minibatch's own
        (rollout) states; proposals and the prior carry no gradient."""
        assert self.agent is not None
        c, policy = self.cfg, self.agent.policy
        hist = batch.obs                                                     # (B, 1, Do) the rollout's states
        obs = hist[:, 0]                                                     # (B, Do)
        if self.proposals is None:
            props = self.propose(obs)
        else:
            assert batch.env_step is not None
            props = self.proposals.take(batch.env_step)
        b, k, d_act = props.actions.shape
        lp = policy.log_prob(hist.repeat_interleave(k, dim=0), props.actions.reshape(b * k, 1, d_act)).view(b, k)
        aux = -(props.weights * lp).sum(1).mean()
        mean = policy(hist)                                                  # (B, 1, Da)
        eps = torch.randn(mean.shape, generator=self.gens["kl"], device=mean.device)
        a = mean + policy.std() * eps                                        # reparameterised a ~ pi
        bound = ddpm_nll_bound(self.prior, a, self.condition(obs), generator=self.gens["kl"], num_t=c.kl_num_t)
        kl = (policy.log_prob(hist, a) + bound).mean()
        return c.aux_coef * aux + c.kl_coef * kl, {
            "diffppo/aux_nll": aux.detach(), "diffppo/kl_bound": kl.detach(),
            "diffppo/proposal_q": props.q.mean(), "diffppo/beta": torch.tensor(self.beta)}

    def after_update(self, itr: int, ro: onpolicy.Rollout, agent: GaussianPPO,
                     scaler: RunningRewardScaler | None) -> dict[str, float]:
        """Fit the Q head on the iteration's one-step TD targets; every ``prior_every`` iterations one adapter step
        of the prior on the iteration's actions."""
        c = self.cfg
        obs = ro.obs.flatten(0, 1)[:, 0]                                     # (M, Do)
        act = ro.chains[:, :, 1].flatten(0, 1)[:, 0].clamp(-1.0, 1.0)       # (M, Da) the executed actions
        nxt = onpolicy.next_observations(ro).flatten(0, 1)                   # (M, 1, Do)
        rew = scaler.scale(ro.rewards) if scaler is not None else ro.rewards
        r = torch.as_tensor(np.asarray(rew, dtype=np.float32).reshape(-1), device=obs.device)
        alive = torch.as_tensor(~ro.terminated.reshape(-1), dtype=torch.float32, device=obs.device)
        target = r + c.gamma * alive * agent.values(nxt)                     # (M,)
        m, size = len(obs), max(1, len(obs) // c.num_minibatches)
        losses = []
        for _ in range(c.q_epochs):
            perm = torch.randperm(m, generator=self.gens["q"], device=self.gens["q"].device).to(obs.device)
            for i in range(max(1, m // size)):
                idx = perm[i * size:(i + 1) * size]
                loss = ((self.q_value(obs[idx], act[idx]) - target[idx]) ** 2).mean()
                self.q_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.q_opt.step()
                losses.append(loss.detach())
        out = {"diffppo/q_loss": float(torch.stack(losses).mean())}
        if itr % c.prior_every == 0:
            out["diffppo/prior_loss"] = self.adapt(obs, act)
        out["diffppo/adapter_steps"] = float(self.adapter_steps)
        return out

    def adapt(self, obs: torch.Tensor, act: torch.Tensor) -> float:
        """One step of the prior's adapters on the denoising loss of on-policy actions ``(M, Da)`` at normalised
        observations ``(M, Do)``; only the adapters change."""
        for p in self.adapters:
            p.requires_grad_(True)
        try:
            loss = self.prior.loss(act[:, None], self.condition(obs), self.gens["prior"])
            self.adapter_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.adapter_opt.step()
        finally:
            for p in self.adapters:
                p.requires_grad_(False)
        self.adapter_steps += 1
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": lora_state_dict(self.prior.net), "adapter_opt": self.adapter_opt.state_dict(),
                "q": self.q.state_dict(), "q_opt": self.q_opt.state_dict(), "adapter_steps": self.adapter_steps,
                "gens": {k: g.get_state() for k, g in self.gens.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = self.prior.net.load_state_dict(state["adapters"], strict=False).unexpected_keys
        if missing:
            raise CheckpointError(f"the checkpoint's prior adapters do not fit this prior ({missing[:3]}).")
        self.adapter_opt.load_state_dict(state["adapter_opt"])
        self.q.load_state_dict(state["q"])
        self.q_opt.load_state_dict(state["q_opt"])
        self.adapter_steps = int(state["adapter_steps"])
        for k, g in self.gens.items():
            s = state["gens"][k]
            g.set_state(s.cpu() if isinstance(s, torch.Tensor) else s)


# ---------------------------------------------------------------------------------- augment mode: stage 1
def transition_model(cfg: DiffPPOConfig, real: OfflineDataset, run_dir: Path) -> Path:
    """Stage 1: SynthER's transition model of the real slice (trained here, resumed, or ``--diffusion``)."""
    if cfg.diffusion is not None:
        return reused_stage(cfg.diffusion, "diffusion")
    model_dir = run_dir / "diffusion"
    status = stage_status(model_dir)
    if status == "done":
        return model_dir
    dcfg = diffusion.stage_config(cfg, model_dir, status == "resume", len(real))
    return diffusion.run(dcfg, dataset=real)


def synthetic_data(cfg: DiffPPOConfig, model_dir: Path, run_dir: Path) -> dict[str, np.ndarray]:
    """``num_samples`` generated transitions in ``run_dir/samples.npz`` (generated once; generation is seeded)."""
    path = run_dir / "samples.npz"
    if not path.is_file():
        diffusion.sample_to_file(model_dir, cfg.num_samples, path, sampler=cfg.sampler, steps=cfg.sample_steps,
                                 batch_size=cfg.sample_batch_size, seed=cfg.seed, device=cfg.device, overwrite=True,
                                 bf16=cfg.bf16, progress=cfg.progress, out_of_range=cfg.out_of_range,
                                 terminals=cfg.terminals)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def discounted_returns(ds: OfflineDataset, gamma: float) -> np.ndarray:
    """Discounted return-to-go ``(N,)`` of every transition within its episode (no bootstrap at a time limit)."""
    out = np.zeros(len(ds), dtype=np.float64)
    for e in ds.episode_slices():
        g = 0.0
        for t in range(e.stop - 1, e.start - 1, -1):
            g = float(ds.rewards[t]) + gamma * g
            out[t] = g
    return out


class AugmentHooks(ppo.PPOHooks):
    """DiffPPO v1's pre-training before PPO: statistics from the data, BC of the mean on real + synthetic (s, a),
    the value on the real episodes' discounted returns (module docstring).

    Args:
        cfg: the run's config.
        real: the real slice.
        synthetic: generated transitions (SynthER's npz layout), or None (the control).
    """

    def __init__(self, cfg: DiffPPOConfig, real: OfflineDataset, synthetic: dict[str, np.ndarray] | None) -> None:
        self.cfg, self.real, self.synthetic = cfg, real, synthetic
        self.figures: dict[str, Any] = {}

    def pretrain(self, agent: GaussianPPO, obs_norm: RunningObsNormalizer | None,
                 scaler: RunningRewardScaler | None) -> None:
        c, real, t0 = self.cfg, self.real, time.perf_counter()
        obs, act = real.observations, real.actions
        if self.synthetic is not None:
            obs = np.concatenate([obs, self.synthetic["observations"]])
            act = np.concatenate([act, self.synthetic["actions"]])
        if obs_norm is not None:  # the data's moments, weighted as the real slice's transitions
            obs_norm.mean, obs_norm.var, obs_norm.count = obs.mean(0).astype(np.float64), \
                obs.var(0).astype(np.float64), float(len(real))
        returns = discounted_returns(real, c.gamma)
        if scaler is not None:  # the running return the scaler tracks, over the real episodes in order
            ends, run_ret, tracked = real.terminals | real.timeouts, 0.0, np.empty(len(real))
            for t in range(len(real)):
                run_ret = float(real.rewards[t]) + c.gamma * run_ret
                tracked[t] = run_ret
                run_ret = 0.0 if ends[t] else run_ret
            scaler.mean, scaler.var, scaler.count = float(tracked.mean()), float(tracked.var()), float(len(real))
            returns = returns / scaler.std
        device = agent.device
        x = torch.as_tensor(obs_norm(obs, update=False) if obs_norm is not None else obs, device=device)[:, None]
        y = torch.as_tensor(act, device=device).clamp(-1.0, 1.0)[:, None]   # (N, 1, Da)
        gen = torch.Generator(device=device).manual_seed(derive_seed(c.seed, PRETRAIN_STREAM))
        policy = agent.policy
        bc = self._fit(list(policy.parameters()), lambda i: policy.bc_loss(x[i], y[i]), len(x), gen)
        xr = x[:len(real)]
        v = torch.as_tensor(returns, dtype=torch.float32, device=device)
        vf = self._fit(list(agent.critic.parameters()), lambda i: ((agent.critic(xr[i]) - v[i]) ** 2).mean(),
                       len(xr), gen)
        self.figures = {"pretrain_bc_loss": bc, "pretrain_value_loss": vf, "pretrain_rows_real": len(real),
                        "pretrain_rows_synthetic": len(x) - len(real), "pretrain_s": time.perf_counter() - t0}

    def _fit(self, params: list[nn.Parameter], loss_fn: Any, n: int, gen: torch.Generator) -> float | None:
        c = self.cfg
        opt = torch.optim.Adam(params, lr=c.pretrain_lr)
        last = None
        for _ in range(c.pretrain_steps):
            idx = torch.randint(n, (c.pretrain_batch_size,), generator=gen, device=gen.device)
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
        return last

    def summary(self) -> dict[str, Any]:
        return dict(self.figures)  # empty after a resume: the first attempt's summary figures are kept by run()


# ------------------------------------------------------------------------------------------------------ run
def _peak_memory() -> dict[str, float]:
    out = {"peak_rss_mib": peak_rss_mib()}  # of this run, stages included (a sweep resets it per trial)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(cfg: DiffPPOConfig) -> Path:
    """The mode's stage, then PPO with the mode's hooks; returns the run directory."""
    real, episodes = real_data(cfg)  # every check before anything is written
    run_dir = Path(cfg.resume) if cfg.resume is not None else new_run_dir(
        PIPELINE, dataset_run_name(cfg.dataset), cfg.seed, cfg.runs_root, cfg.run_dir)
    with lock_run_dir(run_dir, resume=cfg.resume is not None):
        if cfg.resume is not None:
            check_resumable(run_dir, PIPELINE, cfg)
        write_config(run_dir, PIPELINE, to_dict(cfg))
        device = resolve_device(cfg.device)
        extra: dict[str, Any] = {"mode": cfg.mode, "dataset": cfg.dataset, "data_fraction": cfg.fraction,
                                 "real_transitions": len(real), "real_episodes": len(real.episode_slices()),
                                 "dataset_episodes": episodes}
        hooks: ppo.PPOHooks
        t0 = time.perf_counter()
        if cfg.mode == "prior":
            prior, mean, std, prior_dir = action_prior(cfg, real, run_dir, device)
            hooks = PriorHooks(cfg, prior, mean, std, device)
            hooks.fingerprint = fingerprint(real)
            extra["prior_run"] = str(prior_dir)
        else:
            synthetic = None
            if cfg.synthetic:
                model_dir = transition_model(cfg, real, run_dir)
                synthetic = synthetic_data(cfg, model_dir, run_dir)
                extra.update(diffusion_run=str(model_dir), num_samples=len(synthetic["observations"]))
            hooks = AugmentHooks(cfg, real, synthetic)
            hooks.fingerprint = fingerprint(real, synthetic)
            extra["synthetic"] = synthetic is not None
        extra["stage_s"] = time.perf_counter() - t0
        hooks.pipeline, hooks.run_dir, hooks.name = PIPELINE, run_dir, dataset_run_name(cfg.dataset)
        resume = cfg.resume is not None and bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
        before = read_summary(run_dir) if resume and (run_dir / "summary.json").is_file() else {}
        ppo.run(dataclasses.replace(cfg, resume=run_dir if resume else None), hooks)
        summary = read_summary(run_dir)
        for key in ("pretrain_bc_loss", "pretrain_value_loss", "pretrain_rows_real", "pretrain_rows_synthetic",
                    "pretrain_s"):
            if key not in summary and key in before:
                summary[key] = before[key]
        breakdown = summary.get("time_breakdown_s", {})
        summary.update(extra, train_s=breakdown.get("rollout_s", 0.0) + breakdown.get("update_s", 0.0),
                       **_peak_memory())
        write_json_atomic(run_dir / "summary.json", summary)
    return run_dir


def evaluate_run(run_dir: Path, cfg: DiffPPOConfig, episodes: int = 10, device: str = "auto",
                 seed: int | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint's PPO policy (the prior only shapes training; the policy acts alone)."""
    return ppo.evaluate_run(run_dir, cfg, episodes, device, seed)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = online.summary_lines(summary) if "time_breakdown_s" in summary else []
    if "train_s" in summary:
        lines.append(f"mode {summary.get('mode')}: train {summary['train_s']:.1f} s, peak RSS "
                     f"{summary.get('peak_rss_mib', math.nan):.0f} MiB")
    return lines


SYSTEM = System("diffppo", "DiffPPO: PPO with a diffusion action prior or diffusion-upsampled pre-training data",
                commands=(Command("", {"": DiffPPOConfig}, run, {"": PRESETS}, pipelines={PIPELINE: DiffPPOConfig},
                                  evaluate=evaluate_run, summary_lines=summary_lines,
                                  help="--env ID --dataset D --mode prior|augment"),))
