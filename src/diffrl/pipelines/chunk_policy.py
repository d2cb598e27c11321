"""Chunk policies across runs: the spec a pre-training run records, loading a pre-trained policy into a fine-tuning
run, building the policy or its PPO agent, and evaluating a chunk policy.

Every system that pre-trains or fine-tunes chunk policies uses these (DPPO and its Gaussian and GMM baselines today;
DiffPPO's diffusion action prior next). A fine-tuning run gets its policy one of two ways:

- fresh: :func:`load_pretrained` reads the latest checkpoint of a pre-training run (spec, normalisation, EMA
  weights) and :func:`build_agent` loads those weights into the new agent;
- resume (and evaluation of a fine-tuning run): :meth:`PretrainedPolicy.from_finetuning` reads the spec and the
  normalisation from the fine-tuning run's own checkpoint, without weights; the agent state restored from that
  checkpoint brings them (the pre-training run is not read again).

Shapes: ``To`` / ``Do`` observation history length / dim, ``Ta`` / ``Da`` chunk length / action dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffrl.agents.dppo import DPPO, DiffusionPolicy, DPPOParams
from diffrl.agents.ppo import (
    GMMPPO,
    ChunkPolicy,
    ChunkPPO,
    GaussianPolicy,
    GaussianPPO,
    GaussianPPOParams,
    GMMPolicy,
    GMMPPOParams,
    PPOParams,
    policy_module,
)
from diffrl.diffusion.models import DDPM
from diffrl.diffusion.spec import build_model
from diffrl.envs.wrappers import MinMaxNormalization
from diffrl.errors import CheckpointError, ConfigError
from diffrl.eval import evaluate, normalized_score
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.rundir import read_config
from diffrl.runs.seeding import derive_seed

POLICY_TYPES = ("diffusion", "gaussian", "gmm")
EVAL_NOISE_STREAM = 49_979_687  # derive_seed stream of the evaluation chain's noise (ChunkActor)


# ----------------------------------------------------------------------------------------------------- the spec
@dataclasses.dataclass(frozen=True)
class GaussianSpec:
    """Architecture of a pre-trained :class:`~diffrl.agents.ppo.GaussianPolicy`."""

    hidden: tuple[int, ...]
    """hidden widths of the mean network"""
    residual: bool
    """residual mean network"""
    activation: str
    """activation of the mean network"""
    std: float
    """the fixed std of behaviour cloning (fine-tuning starts from it, clamped into its std bounds)"""


@dataclasses.dataclass(frozen=True)
class GMMSpec:
    """Architecture of a pre-trained :class:`~diffrl.agents.ppo.GMMPolicy`."""

    num_modes: int
    """mixture components C"""
    hidden: tuple[int, ...]
    """hidden widths of the mean and mode-weight networks"""
    residual: bool
    """residual networks"""
    activation: str
    """activation of both networks"""
    std: float
    """the fixed std of behaviour cloning (fine-tuning starts from it, clamped into its std bounds)"""


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What a checkpoint records to rebuild a chunk policy: its type, dims, chunking and architecture.

    Checkpoint manifests (``meta["policy"]``) and ``summary.json`` store :meth:`to_dict`'s layout, the one diffrl
    has written since DPPO's first release; :meth:`from_dict` reads it back (old runs included).
    """

    policy_type: str
    """diffusion, gaussian or gmm (the ``"type"`` key of the stored layout)"""
    obs_dim: int
    """Do"""
    act_dim: int
    """Da"""
    horizon_steps: int
    """Ta, the predicted chunk length"""
    act_steps: int
    """actions of a chunk executed in the env"""
    cond_steps: int
    """To, the observation history length"""
    denoising_steps: int | None = None
    """diffusion: K, the DDPM's denoising steps"""
    model_spec: dict[str, Any] | None = None
    """diffusion: the DDPM (:func:`diffrl.diffusion.spec.build_model`'s spec)"""
    gaussian: GaussianSpec | None = None
    """gaussian: the mean network and the std"""
    gmm: GMMSpec | None = None
    """gmm: the modes, the networks and the std"""

    def __post_init__(self) -> None:
        if self.policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type must be one of {POLICY_TYPES}, got {self.policy_type!r}")
        parts = {"diffusion": "denoising_steps and model_spec", "gaussian": "gaussian", "gmm": "gmm"}
        given = (self.denoising_steps is not None, self.model_spec is not None, self.gaussian is not None,
                 self.gmm is not None)
        wanted = {"diffusion": (True, True, False, False), "gaussian": (False, False, True, False),
                  "gmm": (False, False, False, True)}[self.policy_type]
        if given != wanted:
            raise ValueError(f"a {self.policy_type} policy spec has {parts[self.policy_type]} and nothing else")

    def to_dict(self) -> dict[str, Any]:
        """The stored layout: ``type, obs_dim, act_dim, horizon_steps, act_steps, cond_steps`` then
        ``denoising_steps, model_spec`` (diffusion), ``gaussian: {hidden, residual, activation, std}`` or
        ``gmm: {num_modes, hidden, residual, activation, std}``."""
        out: dict[str, Any] = {"type": self.policy_type, "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                               "horizon_steps": self.horizon_steps, "act_steps": self.act_steps,
                               "cond_steps": self.cond_steps}
        if self.gaussian is not None:
            g = self.gaussian
            out["gaussian"] = {"hidden": list(g.hidden), "residual": g.residual, "activation": g.activation,
                               "std": g.std}
        elif self.gmm is not None:
            m = self.gmm
            out["gmm"] = {"num_modes": m.num_modes, "hidden": list(m.hidden), "residual": m.residual,
                          "activation": m.activation, "std": m.std}
        else:
            out.update(denoising_steps=self.denoising_steps, model_spec=self.model_spec)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicySpec:
        """Read :meth:`to_dict`'s layout (a checkpoint's ``meta["policy"]``)."""
        try:
            common = dict(policy_type=data["type"], obs_dim=data["obs_dim"], act_dim=data["act_dim"],
                          horizon_steps=data["horizon_steps"], act_steps=data["act_steps"],
                          cond_steps=data["cond_steps"])
            if data["type"] == "diffusion":
                return cls(**common, denoising_steps=data["denoising_steps"], model_spec=data["model_spec"])
            if data["type"] == "gmm":
                m = data["gmm"]
                return cls(**common, gmm=GMMSpec(int(m["num_modes"]), tuple(m["hidden"]), m["residual"],
                                                 m["activation"], m["std"]))
            g = data["gaussian"]
            return cls(**common, gaussian=GaussianSpec(tuple(g["hidden"]), g["residual"], g["activation"], g["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's policy spec is incomplete or unknown ({e!r}); it was not "
                                  "written by a diffrl chunk-policy pre-training run.") from e

    def diffusion_model(self) -> DDPM:
        """The (untrained) DDPM of a diffusion policy spec."""
        return build_model(self.model_spec)  # type: ignore[arg-type, return-value]

    def gaussian_policy(self, std_min: float, std_max: float,
                        cls: type[GaussianPolicy] = GaussianPolicy) -> GaussianPolicy:
        """The (untrained) Gaussian policy of a Gaussian spec, its std starting at the pre-trained one clamped into
        ``[std_min, std_max]``."""
        g = self.gaussian
        if g is None:
            raise ValueError(f"a {self.policy_type} policy spec has no Gaussian policy")
        return cls(self.obs_dim, self.act_dim, self.horizon_steps, self.cond_steps, hidden=tuple(g.hidden),
                   residual=g.residual, activation=g.activation, std_init=min(max(g.std, std_min), std_max),
                   std_min=std_min, std_max=std_max)

    def gmm_policy(self, std_min: float, std_max: float, cls: type[GMMPolicy] = GMMPolicy) -> GMMPolicy:
        """The (untrained) GMM policy of a GMM spec, its std starting at the pre-trained one clamped into
        ``[std_min, std_max]``."""
        m = self.gmm
        if m is None:
            raise ValueError(f"a {self.policy_type} policy spec has no GMM policy")
        return cls(self.obs_dim, self.act_dim, self.horizon_steps, self.cond_steps, num_modes=m.num_modes,
                   hidden=tuple(m.hidden), residual=m.residual, activation=m.activation,
                   std_init=min(max(m.std, std_min), std_max), std_min=std_min, std_max=std_max)

    def build_policy(self, weights: dict[str, torch.Tensor],
                     source: Path | str = "the checkpoint") -> DiffusionPolicy | GaussianPolicy | GMMPolicy:
        """The pre-trained policy ready to act: the DDPM behind a :class:`DiffusionPolicy` whose fine-tuned copy is
        still the pre-trained network (so it acts through the routing fine-tuning will use), or the Gaussian / GMM
        policy with its pre-trained std; ``weights`` from ``source`` (named in errors)."""
        if self.policy_type == "diffusion":
            model = self.diffusion_model()
            ckpt.load_weights(model, weights, source)
            return DiffusionPolicy(model, 1, clip_x0=model.clip_x0)
        policy: GaussianPolicy | GMMPolicy
        if self.policy_type == "gmm":
            std = float(self.gmm.std)  # type: ignore[union-attr]
            policy = self.gmm_policy(std, std)
        else:
            std = float(self.gaussian.std)  # type: ignore[union-attr]
            policy = self.gaussian_policy(std, std)
        ckpt.load_weights(policy, weights, source)
        return policy


# ------------------------------------------------------------------------------------------ pre-trained policy
@dataclasses.dataclass(frozen=True)
class PretrainedPolicy:
    """What fine-tuning takes from a pre-training run (or, on resume / evaluation, from its own checkpoint)."""

    run_dir: Path
    """the pre-training run"""
    spec: PolicySpec
    """the policy"""
    env: dict[str, Any]
    """env signature the data came from"""
    normalization: MinMaxNormalization
    """the data's min-max normalisation (the chunk envs use it)"""
    ref_scores: dict[str, float] | None
    """the dataset's reference returns ``{"min", "max"}`` for normalised scores"""
    dataset: str
    """the dataset pre-training read"""
    weights: dict[str, torch.Tensor] | None
    """EMA weights (fresh start); None on resume, where the agent state of the checkpoint supplies them"""

    @classmethod
    def from_pretraining(cls, run_dir: Path, manifest: dict[str, Any], parts: dict[str, Any]) -> PretrainedPolicy:
        """Fresh start: a pre-training checkpoint (parts ``policy``, ``normalization``), with its EMA weights."""
        return cls._read(run_dir, manifest, parts, parts["policy"]["ema"]["shadow"])

    @classmethod
    def from_finetuning(cls, pretrain_run: Path, manifest: dict[str, Any], parts: dict[str, Any]
                        ) -> PretrainedPolicy:
        """Resume or evaluation: a fine-tuning checkpoint (part ``normalization``), without weights."""
        return cls._read(pretrain_run, manifest, parts, None)

    @classmethod
    def _read(cls, run_dir: Path, manifest: dict[str, Any], parts: dict[str, Any],
              weights: dict[str, torch.Tensor] | None) -> PretrainedPolicy:
        meta = manifest["meta"]
        return cls(Path(run_dir), PolicySpec.from_dict(meta["policy"]), meta["env"],
                   MinMaxNormalization.from_state_dict(parts["normalization"]), meta.get("ref_scores"),
                   str(meta.get("dataset")), weights)


def load_pretrained(run_dir: Path, pipelines: Collection[str], command: str) -> PretrainedPolicy:
    """The EMA policy, normalisation and settings of the latest checkpoint of a pre-training run of one of
    ``pipelines`` (one sentence naming ``command`` if ``run_dir`` is not one)."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--policy {run_dir} does not exist; pass the run directory of `{command}`.")
    pipeline = read_config(run_dir).get("pipeline")
    if pipeline not in pipelines:
        raise ConfigError(f"--policy {run_dir} is a {pipeline} run; pass the run directory of `{command}`.")
    manifest, parts = ckpt.load_checkpoint(run_dir, parts=("policy", "normalization"))
    return PretrainedPolicy.from_pretraining(run_dir, manifest, parts)


def build_agent(pretrained: PretrainedPolicy, params: PPOParams, device: torch.device) -> ChunkPPO:
    """DPPO on the pre-trained DDPM (``params``: :class:`DPPOParams`), or plain PPO on the pre-trained Gaussian
    (:class:`GaussianPPOParams`) or GMM policy (:class:`GMMPPOParams`); with the EMA weights when ``pretrained`` has
    them."""
    spec = pretrained.spec
    if spec.policy_type == "diffusion":
        if not isinstance(params, DPPOParams):
            raise TypeError(f"a diffusion policy is fine-tuned with DPPOParams, got {type(params).__name__}")
        model = spec.diffusion_model()
        if pretrained.weights is not None:
            ckpt.load_weights(model, pretrained.weights, pretrained.run_dir)
        return DPPO(model, spec.obs_dim, params, device)
    if spec.policy_type == "gmm":
        if not isinstance(params, GMMPPOParams):
            raise TypeError(f"a GMM policy is fine-tuned with GMMPPOParams, got {type(params).__name__}")
        gmm = spec.gmm_policy(params.std_min, params.std_max)
        if pretrained.weights is not None:
            ckpt.load_weights(gmm, pretrained.weights, pretrained.run_dir)
        return GMMPPO(spec.obs_dim, spec.act_dim, params, device, policy=gmm)
    if not isinstance(params, GaussianPPOParams):
        raise TypeError(f"a Gaussian policy is fine-tuned with GaussianPPOParams, got {type(params).__name__}")
    policy = spec.gaussian_policy(params.std_min, params.std_max)
    if pretrained.weights is not None:
        ckpt.load_weights(policy, pretrained.weights, pretrained.run_dir)
    return GaussianPPO(spec.obs_dim, spec.act_dim, params, device, policy=policy)


# -------------------------------------------------------------------------------------------------- evaluation
class ChunkActor:
    """A chunk policy as :func:`~diffrl.eval.evaluate` sees it: normalised histories ``(1, To, Do)`` -> normalised
    chunks ``(1, Ta, Da)``, sampled for evaluation (DPPO's DDPM chain, noise except at t = 0 / DDIM eta 0 /
    Gaussian mean / the mean of a GMM mode drawn by weight) through the policy's own routing of denoising steps. The
    chain's noise (the GMM's mode draws) comes from the actor's own generator, so an evaluation is reproducible and
    draws nothing from the training RNGs. ``mean_path``: the noise-free DDPM mean path instead
    (:meth:`DiffusionPolicy.chain`), the GMM's most likely mode. Puts the policy in eval mode."""

    def __init__(self, policy: ChunkPolicy, device: torch.device, seed: int, mean_path: bool = False) -> None:
        policy_module(policy).to(device).eval()
        self.policy, self.device, self.mean_path = policy, device, mean_path
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(seed, EVAL_NOISE_STREAM))

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The agent contract: chunks ``(B, Ta, Da)`` for histories ``(B, To, Do)`` (evaluation passes
        ``deterministic=True``)."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return self.policy.sample(o, deterministic, self.generator, self.mean_path and deterministic
                                  ).action.cpu().numpy()


def normalized_mean(returns: list[float], refs: dict[str, float] | None) -> float | None:
    """D4RL's normalised score x100 of the mean return (OfflineDataset.normalized_score) with the dataset's refs."""
    if not refs:
        return None
    return float(normalized_score(np.mean(returns), refs["min"], refs["max"]))


def evaluate_chunk_policy(policy: ChunkPolicy, env: gym.Env, episodes: int, seed: int, device: torch.device,
                          refs: dict[str, float] | None, mean_path: bool) -> dict[str, float]:
    """:func:`~diffrl.eval.evaluate` (deterministic, eval seeds) of a chunk policy through a :class:`ChunkActor`;
    metrics with the normalised score. The policy's train/eval mode is restored afterwards."""
    was_training = policy_module(policy).training
    result = evaluate(ChunkActor(policy, device, seed, mean_path), env, episodes, seed=seed)
    policy_module(policy).train(was_training)
    out = result.metrics()
    score = normalized_mean(result.returns, refs)
    if score is not None:
        out["eval/normalized_score"] = score
    return out
