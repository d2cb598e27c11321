"""DPOER: DPPO plus a SAC-style entropy temperature (the TF port NotOneRing/TEST: ``SAC_PPODiffusion`` in
``code/model/diffusion/diffusion_sac_ppo.py`` at commit 9356180, ``TrainSACPPODiffusionAgent`` in
``code/agent/finetune/train_sac_ppo_diffusion_agent.py`` at 526fef8; the name's expansion is not stated there).
Everything else is :class:`~diffrl.agents.dppo.DPPO`'s: the rollout, the denoising MDP, the clip schedule, the
critic, and the log-prob's std floor ``min_logprob_std`` (the port's DPOER file floors it with
``min_sampling_std``; both are 0.1 in DPPO's Gym configs).

Per PPO minibatch of (env step, fine-tuned transition) pairs, with ``r`` the ratio, ``A`` the normalised and
denoising-discounted advantage, ``log pi`` the transition's clamped, truncated, mean-reduced log-probability (DPPO's
reduction) and ``lambda = lambda_alpha_entropy``::

    pg1 = -A r + alpha log pi / lambda          pg2 = -A clip(r, 1 - eps_i, 1 + eps_i)
    L_pi = mean(max(pg1, pg2))                  (the entropy term lives in the unclipped branch only, as the port)
    L_alpha = -log(alpha) (H_target - H)        H_target = -Ta Da (the port's per-env table is exactly this)

``H``, the entropy of the policy's action chunk, is estimated every ``delay_alpha_update`` minibatches and reused in
between. The temperature steps after the actor and critic on every minibatch, critic warm-up included (the port's
order). Its loss only moves ``alpha``: ``H`` is a constant, and ``alpha`` enters ``L_pi`` detached.

Shapes: ``B`` minibatch pairs, ``M`` samples per state of the entropy estimate, ``To`` / ``Do`` observation history
length / dim, ``Ta`` / ``Da`` chunk length / action dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from diffrl.agents.dppo import DPPO, DPPOParams
from diffrl.agents.ppo_utils import PPOBatch
from diffrl.config import check, check_choice, check_positive
from diffrl.diffusion.models import DDPM
from diffrl.eval.entropy import gmm_rows_entropy, policy_entropy

__all__ = ["DPOERParams", "DPOER", "ENTROPY_ESTIMATORS"]

ENTROPY_ESTIMATORS = ("knn", "port")


@dataclasses.dataclass(frozen=True)
class DPOERParams(DPPOParams):
    """DPOER hyper-parameters: DPPO's (``ent_coef`` stays 0: the temperature replaces the bonus) plus the
    temperature's. Defaults: the port's ``diffusion_sac_ppo.py`` at 9356180 unless noted."""

    alpha_init: float = 0.272
    """initial temperature alpha (the port: ``tf.Variable([0.272])``)"""
    alpha_lr: float = 3e-4
    """Adam learning rate of log alpha (the port: ``Adam([alpha], lr=3e-4)``)"""
    lambda_alpha_entropy: float = 1e4
    """lambda, dividing alpha log pi in the policy loss (the port: 1e4; its square / transport _C1000 configs: 1e3)"""
    target_entropy: float | None = None
    """H_target in nats (None: -Ta * Da, the port's value for every env it lists)"""
    delay_alpha_update: int = 50
    """re-estimate H every this many minibatches (first one included) and reuse it in between (the port at 9356180:
    50, its README's "DPOER_50"; its earlier setting was 10000)"""
    entropy_estimator: str = "knn"
    """knn: Kozachenko-Leonenko over entropy_samples whole chunks per state, whitened (diffrl.eval.entropy); port:
    the port's 3-component GMM fitted to the Ta rows of one resampled denoising output per pair (not an estimate of
    the policy's entropy; kept to reproduce the port)"""
    entropy_samples: int = 32
    """knn: M, chunks drawn per state"""
    entropy_states: int = 32
    """knn: states of the minibatch (its first ones; minibatches are shuffled) whose entropies are averaged"""
    clip_entropy: bool = False
    """clamp H to [2 H_target, H_target / 2] before the temperature loss (the port's clip_entropy, True in its
    square / transport _C* configs; at 9356180 the clamp itself is commented out, in other versions it is active)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha_init", "alpha_lr", "lambda_alpha_entropy", "delay_alpha_update", "entropy_states"):
            check_positive(name, getattr(self, name))
        check_choice("entropy_estimator", self.entropy_estimator, ENTROPY_ESTIMATORS)
        check(self.entropy_samples >= 2, "entropy_samples", self.entropy_samples, ">= 2 (a nearest neighbour needs "
              "two samples; 32 or more for a usable estimate)")
        if self.entropy_estimator == "port":
            check(self.horizon_steps >= 3, "horizon_steps", self.horizon_steps, ">= 3 with entropy_estimator='port' "
                  "(it fits 3 mixture components to a chunk's Ta rows); or use entropy_estimator='knn'")
        check(self.target_entropy is None or math.isfinite(self.target_entropy), "target_entropy",
              self.target_entropy, "a finite number of nats, or None for -Ta * Da")


class DPOER(DPPO):
    """DPPO with a learned entropy temperature (module docstring).

    The temperature is stored as ``log alpha`` and Adam steps ``log alpha``; the port keeps alpha itself in a
    ``tf.Variable`` (its optimiser is named ``log_alpha_optimizer`` all the same). Adam's steps are about ``lr`` in
    size whatever the gradient's scale, so a raw alpha shrinking from 0.272 crosses zero after ~900 minibatches
    whenever ``H > H_target`` for that long, and its log is then NaN. With a sound estimate of ``H`` that is the
    usual case: the last transition adds noise of std >= ``min_sampling_std`` = 0.1 to every chunk element, so
    ``H >= Ta Da (0.5 log(2 pi e) + log 0.1) = -0.88 Ta Da > H_target = -Ta Da`` (entropy power inequality).
    ``log alpha`` keeps alpha positive; it moves alpha by a factor ``~exp(+-lr)`` per step instead.

    Args:
        model: the pre-trained (EMA) DDPM (as :class:`~diffrl.agents.dppo.DPPO`).
        obs_dim: ``Do``.
        params: :class:`DPOERParams`.
        device: torch device.
        seed: seed of the generator the entropy estimates draw from (saved in :meth:`state_dict`).
    """

    p: DPOERParams

    def __init__(self, model: DDPM, obs_dim: int, params: DPOERParams, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        super().__init__(model, obs_dim, params, device)
        ta, da = self.policy.event_shape
        self.target_entropy = float(-ta * da if params.target_entropy is None else params.target_entropy)
        self.log_alpha = torch.tensor(math.log(params.alpha_init), device=self.device, requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=params.alpha_lr)
        self.optims["temperature"] = self.alpha_opt
        self.entropy_gen = torch.Generator(device=self.device).manual_seed(seed)
        self.entropy_calls = 0  # minibatches seen by the entropy schedule (the port's step_count)
        self.entropy_estimate = torch.tensor(float("nan"), dtype=torch.float64)  # the cached H

    @property
    def alpha(self) -> torch.Tensor:
        """The temperature ``exp(log alpha)``, detached."""
        return self.log_alpha.detach().exp()

    # ------------------------------------------------------------------------------------------- losses
    def policy_loss(self, new_lp: torch.Tensor, old_lp: torch.Tensor, advantages: torch.Tensor, idx: torch.Tensor,
                    alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mean(max(-A r + alpha log pi / lambda, -A clip(r)))`` and the ratio and clip coefficient, all ``(B,)``
        but the loss (:meth:`ChunkPPO.policy_loss` with the port's entropy term). ``new_lp`` / ``old_lp``: reduced
        log-probs :meth:`log_probs`; ``advantages``: raw, normalised here per minibatch and scaled by the denoising
        discount afterwards (as DPPO); ``alpha``: the temperature (default: the current one)."""
        alpha = self.alpha if alpha is None else alpha
        ratio = (new_lp - old_lp).exp()
        adv = self.scaled_advantages(advantages, idx)
        clip = self.clip_coef(idx)
        pg1 = -adv * ratio + alpha * new_lp / self.p.lambda_alpha_entropy  # the port's pg_loss1
        pg2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
        return torch.max(pg1, pg2).mean(), ratio, clip

    def temperature_loss(self, entropy: torch.Tensor | float) -> torch.Tensor:
        """``-log(alpha) (H_target - H)`` (the port's ``-mean(log(alpha) (-H + H_target))``): minimising it raises
        alpha while ``H < H_target`` and lowers it while ``H > H_target``."""
        return -self.log_alpha * (self.target_entropy - float(entropy))

    # ------------------------------------------------------------------------------------------- entropy
    @torch.no_grad()
    def estimate_entropy(self, batch: PPOBatch) -> torch.Tensor:
        """A fresh estimate of ``H`` (nats, float64 scalar) on a minibatch, with ``entropy_estimator``, clamped with
        ``clip_entropy``. Draws from the agent's own entropy generator only."""
        p = self.p
        if p.entropy_estimator == "knn":
            obs = self._obs(batch.obs[:p.entropy_states])  # (S, To, Do)
            # whiten: a chunk's elements are correlated over its Ta steps, which biases the k-NN estimate upward by
            # ~3.3 nats in 12 dims at M = 32; whitened ~0.65, isotropic's (tests/unit/test_entropy.py). M = 32: the
            # bias falls only to 0.49 at M = 64, and H drives alpha through its sign against H_target alone
            h = policy_entropy(lambda o: self.policy.sample(o, False, self.entropy_gen).action, obs,
                               p.entropy_samples, whiten=True).mean()
        else:
            # the port: x_{i+1} resampled from each pair's transition, std floored at min_sampling_std, noise
            # clamped, then a GMM over the Ta rows of each sample; the port adds the mixture weights' entropy H(w)
            # (<= log 3) to the components' that gmm_rows_entropy returns, and fits with k-means starts (sklearn)
            mean, std = self.policy.transition(self._obs(batch.obs), batch.chain_x, batch.denoise_idx.long())
            std = std.expand_as(mean).clamp(min=p.min_sampling_std)
            z = torch.randn(mean.shape, generator=self.entropy_gen, device=mean.device)
            if p.noise_clip is not None:
                z = z.clamp(-p.noise_clip, p.noise_clip)
            h = gmm_rows_entropy(mean + std * z).mean()
        h = h.double().cpu()
        if p.clip_entropy:
            h = h.clamp(2 * self.target_entropy, self.target_entropy / 2)
        return h

    def entropy_for(self, batch: PPOBatch) -> torch.Tensor:
        """``H`` for this minibatch: re-estimated on every ``delay_alpha_update``-th call (the first included),
        else the cached estimate (the port's ``step_count % delay_alpha_update``)."""
        if self.entropy_calls % self.p.delay_alpha_update == 0:
            self.entropy_estimate = self.estimate_entropy(batch)
        self.entropy_calls += 1
        return self.entropy_estimate

    # -------------------------------------------------------------------------------------------- update
    def update(self, batch: PPOBatch, critic_only: bool = False) -> dict[str, torch.Tensor]:
        """One DPOER step on a minibatch: DPPO's step (:meth:`ChunkPPO.update`, whose policy loss is
        :meth:`policy_loss` here), then one Adam step of ``log alpha`` on :meth:`temperature_loss`. ``critic_only``
        (critic warm-up): the actor is not stepped; the temperature is, as the port's.

        Returns :meth:`ChunkPPO.update`'s metrics (``entropy`` is ``entropy_estimate`` here) and ``alpha`` (the
        temperature this step's policy loss used), ``entropy_estimate`` (H), ``temperature_loss``.
        """
        entropy = self.entropy_for(batch)
        alpha = self.alpha  # what policy_loss reads in the step below
        metrics = super().update(batch, critic_only)
        temp_loss = self.temperature_loss(entropy)
        self.alpha_opt.zero_grad(set_to_none=True)
        temp_loss.backward()
        self.alpha_opt.step()
        h = entropy.to(device=self.device, dtype=torch.float32)
        return {**metrics, "entropy": h, "alpha": alpha, "entropy_estimate": h,
                "temperature_loss": temp_loss.detach()}

    # --------------------------------------------------------------------------------------------- state
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "log_alpha": self.log_alpha.detach().clone(),
                "entropy_calls": self.entropy_calls, "entropy_estimate": self.entropy_estimate.clone(),
                "entropy_gen": self.entropy_gen.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.entropy_calls = int(state["entropy_calls"])
        self.entropy_estimate = torch.as_tensor(state["entropy_estimate"], dtype=torch.float64).clone()
        self.entropy_gen.set_state(state["entropy_gen"])
