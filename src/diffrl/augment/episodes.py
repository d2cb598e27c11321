"""ITER-Diffusion's episode generator: a trajectory DDPM over whole goal-conditioned Fetch episodes.

Shapes: ``N`` episodes of ``T`` steps (50 for Fetch), ``Do`` / ``Da`` / ``Dg`` observation / action / goal dims,
``C = Do + Da + 2 Dg`` channels (35 for Push), ``M`` contexts. An episode dict holds float32 arrays
``obs (N, T+1, Do)``, ``act (N, T, Da)`` in [-1, 1], ``ag (N, T+1, Dg)`` achieved goals and ``g (N, T, Dg)``
desired goals (constant per episode for real data).

The model sees one episode as ``T + 1`` rows ``[obs_t, act_t, ag_t, g_t]`` (event shape ``(T+1, C)``); the last
row has no action or desired goal, so ``act_T := 0`` and ``g_T := g_{T-1}``. It is conditioned on ``[g_0, obs_0]``
and ``obs_0``, ``ag_0``, every ``g_t`` and ``act_T`` are also inpainted, so they are exact in the output.

Fetch observations (gymnasium-robotics ``fetch/*.py``): ``grip_pos[0:3], object_pos[3:6], object_rel_pos[6:9]
= object - grip, ...``; the achieved goal is ``object_pos`` for Push / Slide / PickAndPlace and ``grip_pos`` for
Reach.

Reference: EzgiAskin/ITER-Diffusion, branch ``iter_ker_ger``, ``her/ddpm_temporal.py`` and ``her/her.py``. What
we do differently is said where it happens; in short: a cosine schedule (betas capped at 0.5) and the posterior
std when sampling (its linear schedule never reaches noise and its sampler std is wrong), a down-sampling UNet
with FiLM conditioning (its conv stack never down-samples), one optimiser and an EMA across calls, constant
desired goals, clipped actions, achieved goals read from the observation, and a filter the reference lacks:
generated episodes are rejected when their goal moves, their gripper steps break Fetch's mocap kinematics, their
object starts moving without the gripper near it, or (``tol``, which there only labelled episodes) their raw
achieved goals contradict their observations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from diffrl.config import check, check_choice, check_non_negative, check_positive
from diffrl.diffusion.inpaint import Inpaint
from diffrl.diffusion.models import DiffusionModel
from diffrl.diffusion.spec import build_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.errors import DatasetError
from diffrl.runs.seeding import derive_seed

FETCH_SUCCESS_THRESHOLD = 0.05
"""metres: Fetch's ``distance_threshold``"""
FETCH_MOCAP_STEP = 0.05
"""metres per unit action: Fetch's ``_set_action`` scales ``action[:3]`` by 0.05 (``pos_ctrl *= 0.05``) and
``mocap_set_action`` moves the gripper's mocap target that far from the gripper"""
GRIP, OBJECT, REL = slice(0, 3), slice(3, 6), slice(6, 9)
"""slices of a Fetch observation: gripper position, object position, object position relative to the gripper"""
COMPONENTS = ("obs", "act", "ag", "g")
REST_STEPS = 3
"""an object is at rest after this many steps that each move it less than ``object_still``: on FetchPush-v4 a
tumbling block or one bouncing on the floor dips below it for a single step (``object_onset_distance``)"""
FILTER_CHECKS = ("goal", "kinematics", "object", "consistency")
"""the filter's checks; a rejected episode is counted under the first one it fails, in this order"""



# ------------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class EpisodeLayout:
    """Where each part of an episode sits in the model's rows ``[obs, act, ag, g]``."""

    obs_dim: int
    act_dim: int
    goal_dim: int
    object_task: bool = True
    """the achieved goal is the object position ``obs[3:6]`` (Push / Slide / PickAndPlace), else ``obs[0:3]``"""

    def __post_init__(self) -> None:
        if self.goal_dim != 3:
            raise ValueError(f"the episode layout reads Fetch goals (3-d positions) from observations, got "
                             f"goal_dim={self.goal_dim}")
        need = 9 if self.object_task else 3
        if self.obs_dim < need:
            raise ValueError(f"a Fetch {'object' if self.object_task else 'Reach'} observation has at least {need} "
                             f"dims, got obs_dim={self.obs_dim}")

    @property
    def channels(self) -> int:
        return self.obs_dim + self.act_dim + 2 * self.goal_dim

    @property
    def obs(self) -> slice:
        return slice(0, self.obs_dim)

    @property
    def act(self) -> slice:
        return slice(self.obs_dim, self.obs_dim + self.act_dim)

    @property
    def ag(self) -> slice:
        start = self.obs_dim + self.act_dim
        return slice(start, start + self.goal_dim)

    @property
    def g(self) -> slice:
        return slice(self.channels - self.goal_dim, self.channels)

    def achieved_goal(self, obs: np.ndarray) -> np.ndarray:
        """The achieved goal a Fetch observation implies (``(..., Do) -> (..., 3)``)."""
        return obs[..., OBJECT if self.object_task else GRIP]

    def check(self, episodes: Mapping[str, Any]) -> tuple[int, int]:
        """``(N, T)`` of an episode dict; raises :class:`DatasetError` if a key is missing or a shape is off."""
        missing = [k for k in COMPONENTS if k not in episodes]
        if missing:
            raise DatasetError(f"episodes lack {missing}: an episode dict needs keys {list(COMPONENTS)}.")
        obs = np.asarray(episodes["obs"])
        if obs.ndim != 3 or obs.shape[1] < 2:
            raise DatasetError(f"episode 'obs' must be (N, T+1, {self.obs_dim}) with T >= 1, got {obs.shape}.")
        n, t = obs.shape[0], obs.shape[1] - 1
        expected = {"obs": (n, t + 1, self.obs_dim), "act": (n, t, self.act_dim), "ag": (n, t + 1, self.goal_dim),
                    "g": (n, t, self.goal_dim)}
        for key, shape in expected.items():
            got = np.shape(episodes[key])
            if got != shape:
                raise DatasetError(f"episode {key!r} has shape {got}, expected {shape} (N={n} episodes of T={t} "
                                   f"steps with obs/act/goal dims {self.obs_dim}/{self.act_dim}/{self.goal_dim}).")
        return n, t

    def join(self, episodes: Mapping[str, Any]) -> np.ndarray:
        """Rows ``(N, T+1, C)`` float32 of an episode dict, with ``act_T := 0`` and ``g_T := g_{T-1}``."""
        n, _ = self.check(episodes)
        act = np.asarray(episodes["act"], dtype=np.float32)
        g = np.asarray(episodes["g"], dtype=np.float32)
        act = np.concatenate([act, np.zeros((n, 1, self.act_dim), np.float32)], axis=1)
        g = np.concatenate([g, g[:, -1:]], axis=1)
        return np.concatenate([np.asarray(episodes["obs"], dtype=np.float32), act,
                               np.asarray(episodes["ag"], dtype=np.float32), g], axis=2)

    def split(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``(N, T+1, C)`` back to an episode dict (the padded ``act_T`` and ``g_T`` dropped), unchanged."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 3 or rows.shape[2] != self.channels:
            raise DatasetError(f"episode rows have shape {rows.shape}, the layout expects (N, T+1, {self.channels}).")
        return {"obs": rows[:, :, self.obs].copy(), "act": rows[:, :-1, self.act].copy(),
                "ag": rows[:, :, self.ag].copy(), "g": rows[:, :-1, self.g].copy()}


# ------------------------------------------------------------------------------------------------- filter
def consistency_error(obs: np.ndarray, ag: np.ndarray, object_task: bool) -> np.ndarray:
    """Per-episode disagreement (metres) of generated quantities that the observation determines.

    ``max_t max(||ag_t - ag(obs_t)||, ||rel_t - (obj_t - grip_t)||)`` (the second term for object tasks only),
    for ``obs (N, T+1, Do)`` and ``ag (N, T+1, 3)``; returns ``(N,)``. ITER-Diffusion's ``ddpm_tol`` only labelled
    synthetic successes; the filter rejects raw samples beyond it. The repair overwrites these channels, so this
    measures how coherent a raw sample is, not whether the stored episode is physical (the dynamics checks).
    """
    implied = obs[..., OBJECT] if object_task else obs[..., GRIP]
    err = np.linalg.norm(ag - implied, axis=-1)  # (N, T+1)
    if object_task:
        err = np.maximum(err, np.linalg.norm(obs[..., REL] - (obs[..., OBJECT] - obs[..., GRIP]), axis=-1))
    return err.max(axis=-1)


def kinematics_error(obs: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Per-episode violation (metres) of Fetch's mocap kinematics by the gripper's steps.

    Action ``a_t`` puts the mocap target ``u_t = 0.05 clip(a_t[:3], -1, 1)`` (``FETCH_MOCAP_STEP``) from the
    gripper, and a weld constraint pulls the gripper towards it during the step: in free space the gripper covers a
    little over half of ``u_t`` per step (benchmarks/RESULTS.md), less when the table, the arm's reach or the object
    blocks it (the env clips only the action, it has no workspace clipping). So each axis of ``d_t = grip_{t+1} -
    grip_t`` lies between 0 and ``u_t``, up to the arm's momentum. Returns ``max_t max_axis`` of how far ``d_t``
    leaves that interval ``(N,)``, for ``obs (N, T+1, Do)`` and ``act (N, T, Da)``.
    """
    d = np.diff(np.asarray(obs, dtype=np.float64)[..., GRIP], axis=1)  # (N, T, 3)
    u = FETCH_MOCAP_STEP * np.clip(np.asarray(act, dtype=np.float64)[..., :3], -1.0, 1.0)
    excess = np.maximum(np.maximum(d - np.maximum(u, 0.0), np.minimum(u, 0.0) - d), 0.0)
    return excess.max(axis=(1, 2)) if excess.size else np.zeros(len(d))


def object_onset_distance(obs: np.ndarray, still: float) -> np.ndarray:
    """Per-episode gripper distance (metres) at the moments the object starts to move, for object tasks.

    The object is at rest at ``obs_0`` (a reset). Only contact sets a resting object moving, so when it starts to
    move -- step ``t`` moves it more than ``still`` metres after ``REST_STEPS`` steps that did not -- the gripper
    must be near it: we take ``min(||obj_t - grip_t||, ||obj_{t+1} - grip_{t+1}||)``. Once moving it may slide,
    tumble or fall off the table away from the gripper (a tumbling or bouncing block can dip below ``still`` for a
    step, hence the rest of several steps). Returns the largest such distance per episode (0 if the object never
    starts to move) ``(N,)`` for ``obs (N, T+1, Do)``.
    """
    obs = np.asarray(obs, dtype=np.float64)
    moving = np.linalg.norm(np.diff(obs[..., OBJECT], axis=1), axis=-1) > still  # (N, T)
    n, t = moving.shape
    before = np.concatenate([np.zeros((n, REST_STEPS), dtype=bool), moving], axis=1)  # steps before 0 rest
    rested = ~np.any([before[:, REST_STEPS - k:REST_STEPS - k + t] for k in range(1, REST_STEPS + 1)], axis=0)
    dist = np.linalg.norm(obs[..., OBJECT] - obs[..., GRIP], axis=-1)  # (N, T+1)
    near = np.minimum(dist[:, :-1], dist[:, 1:])
    return np.where(moving & rested, near, 0.0).max(axis=1) if t else np.zeros(n)


def goal_drift(g: np.ndarray) -> np.ndarray:
    """Per-episode ``max_t ||g_t - g_0||`` (metres) of desired goals ``g (N, T, Dg)``: a Fetch goal is fixed for
    the whole episode. Returns ``(N,)``."""
    g = np.asarray(g, dtype=np.float64)
    return np.linalg.norm(g - g[:, :1], axis=-1).max(axis=1) if g.size else np.zeros(len(g))


def filter_errors(raw: Mapping[str, np.ndarray], episodes: Mapping[str, np.ndarray], object_task: bool,
                  object_still: float) -> dict[str, np.ndarray]:
    """The filter's per-episode measures ``{check: (N,)}`` for every check in ``FILTER_CHECKS`` (metres).

    ``consistency`` is measured on the ``raw`` samples (the repair overwrites those channels); the dynamics checks
    on the ``episodes`` as they would be stored (repaired: actions clipped). ``object`` is 0 without an object.
    """
    n = len(episodes["obs"])
    return {"goal": goal_drift(episodes["g"]),
            "kinematics": kinematics_error(episodes["obs"], episodes["act"]),
            "object": object_onset_distance(episodes["obs"], object_still) if object_task else np.zeros(n),
            "consistency": consistency_error(raw["obs"], raw["ag"], object_task)}


def first_failure(errors: Mapping[str, np.ndarray], limits: Mapping[str, float]) -> np.ndarray:
    """Index into ``FILTER_CHECKS`` of the first check each episode fails (``errors[c] > limits[c]``), -1 where it
    passes them all. ``errors``: ``{check: (N,)}``; returns ``(N,)`` int."""
    n = len(next(iter(errors.values())))
    reason = np.full(n, -1, dtype=np.int64)
    for i, check_name in reversed(list(enumerate(FILTER_CHECKS))):  # earlier checks overwrite later ones
        reason[np.asarray(errors[check_name]) > limits[check_name]] = i
    return reason


def goal_reached(ag: np.ndarray, g: np.ndarray, threshold: float = FETCH_SUCCESS_THRESHOLD) -> np.ndarray:
    """Success of each ``(ag, g)`` pair ``(K, Dg)``: ``||ag - g|| < threshold`` (the env's ``distance_threshold``;
    judged by distance, not by reward, because the Dense tasks' reward is ``-distance``). Returns ``(K,)`` bool."""
    return np.linalg.norm(ag - g, axis=-1) < threshold


def successful_contexts(episodes: Mapping[str, np.ndarray], threshold: float = FETCH_SUCCESS_THRESHOLD
                        ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Contexts ``{"obs0": (M, Do), "g": (M, Dg)}`` of the episodes with at least one successful step.

    Step ``t`` succeeds when ``ag_{t+1}`` reaches ``g_t`` (``goal_reached``). The reference samples contexts from
    such episodes; when none succeeded we fall back to all episodes and report it (``fallback = 1``). Info:
    ``successful_episodes``, ``success_fraction``, ``fallback``.
    """
    ag, g = np.asarray(episodes["ag"]), np.asarray(episodes["g"])
    n, t, dg = g.shape
    hit = goal_reached(ag[:, 1:].reshape(-1, dg), g.reshape(-1, dg), threshold).reshape(n, t).any(1)
    idx = np.flatnonzero(hit)
    fallback = len(idx) == 0
    if fallback:
        idx = np.arange(n)
    obs = np.asarray(episodes["obs"])
    contexts = {"obs0": obs[idx, 0].astype(np.float32), "g": g[idx, 0].astype(np.float32)}
    return contexts, {"successful_episodes": float(hit.sum()), "success_fraction": float(hit.mean()) if n else 0.0,
                      "fallback": float(fallback)}


# ---------------------------------------------------------------------------------------------- generator
@dataclasses.dataclass(frozen=True)
class EpisodeDiffusionSettings:
    """The episode DDPM and its optimisation (ITER-Diffusion's ``--ddpm_*`` flags where they exist)."""

    num_steps: int = 50
    """DDPM steps K (the reference's ``--ddpm-time-steps``)"""
    schedule: str = "cosine"
    """beta schedule, cosine or linear (Ho et al.'s, scaled to K so it reaches noise; the reference's unscaled
    1e-4..2e-2 over 50 steps ends at alpha_bar ~ 0.6 yet sampling starts from N(0, I))"""
    max_beta: float = 0.5
    """cap on the cosine betas. Nichol & Dhariwal's 0.999 makes the first sampling step multiply the noise
    prediction's error by 1 / sqrt(1 - 0.999) ~ 32, which wrecks the episodes' consistency (benchmarks/RESULTS.md);
    0.5 caps the last three of 50 steps and still ends at alpha_bar_K ~ 1e-3"""
    prediction: str = "x0"
    """what the UNet predicts: the clean episode (``x0``) or the noise (``epsilon``, the reference's). On
    KER-augmented FetchPush-v4 episodes x0-prediction yields consistent episodes within a CPU budget and
    epsilon-prediction does not (benchmarks/RESULTS.md): its noise estimate's error is amplified by
    1 / sqrt(alpha_bar) early in sampling, and short CPU training never makes it small enough"""
    clip_x0: float | None = None
    """clamp the predicted clean episode to [-clip_x0, clip_x0] z-scores while sampling (None: no clamp; real
    Fetch velocity channels reach large z-scores, so keep it generous)"""
    dim: int = 32
    """UNet base width (a multiple of 8, its GroupNorm groups)"""
    dim_mults: tuple[int, ...] = (1, 2, 4)
    """UNet width multipliers per level (small for CPU; the reference's conv stack is 256/512/1024 wide)"""
    lr: float = 1e-3
    """Adam learning rate, constant (the reference's 1e-4 learns too slowly for CPU-sized budgets,
    benchmarks/RESULTS.md)"""
    batch_size: int = 64
    """episodes per gradient step (the reference's)"""
    train_steps: int = 80
    """gradient steps per ``fit`` call when not given: ~ the reference's 10 passes over 500 episodes at batch 64"""
    n_train_episodes: int = 500
    """``fit`` trains on at most this many episodes, drawn without replacement (``ddpm_n_train_sample``)"""
    grad_clip: float = 1.0
    """gradient-norm clip (0: none; the reference does not clip)"""
    ema: bool = True
    """sample from an EMA of the weights (the reference has none and samples the live weights). The EMA restarts
    from the live weights whenever the normaliser is refitted (``refit_normalizer``)"""
    ema_decay: float = 0.995
    """EMA decay, applied every step (a ~200-step window: ITER trains ~80 steps per epoch, so SynthER's every-10
    steps would lag ~25 epochs); the weights are copied until step 100, then the decay ramps up (diffusion.ema); a
    refit restarts the ramp (``refit_normalizer``)"""
    tol: float = 0.05
    """metres: the consistency check (``ddpm_tol``, which only labelled episodes there) rejects generated episodes
    whose raw achieved goal or object-relative position disagrees with their own observation by more than this
    (``consistency_error``). The repair overwrites those channels, so it measures how coherent the raw sample is;
    the dynamics checks below judge the stored episode. ``inf`` turns it off"""
    kinematics_tol: float = 0.015
    """metres: reject episodes whose gripper steps leave Fetch's mocap kinematics by more than this, on any axis
    of any step (``kinematics_error``: each step lies between 0 and 0.05 x action). Above the largest violation in
    real FetchPush-v4 episodes (random, scripted and KER-reflected; benchmarks/RESULTS.md), below what actions of
    another episode or noise produce. ``inf`` turns it off"""
    contact_radius: float = 0.14
    """metres: reject object-task episodes in which the object starts to move while the gripper is farther than
    this from it (``object_onset_distance``; gripper-object centre distance, so the block's and gripper's sizes are
    inside it). Above the largest onset distance in real FetchPush-v4 episodes (benchmarks/RESULTS.md). ``inf``
    turns it off"""
    object_still: float = 0.005
    """metres per step: the object counts as moving when a step moves it more than this (well above a resting
    block's jitter on FetchPush-v4, benchmarks/RESULTS.md); used by the contact check"""
    goal_tol: float = 1e-3
    """metres: reject episodes whose desired goal moves by more than this within the episode (a Fetch goal is
    fixed; the sampler inpaints it, so this guards the episode dict as a whole). ``inf`` turns it off"""
    scale_floor: float = 1e-3
    """lower bound on each channel's z-score scale (data units), so a channel almost constant in the first
    training set (e.g. object velocity under a random policy) is not blown up when later data moves"""
    refit_normalizer: bool = True
    """refit the z-score statistics on every ``fit`` call's episodes. Kept from the first call instead, the
    statistics of an early, random-policy buffer (the block barely moves) made later data tens of z-scores large
    and the loss diverge on FetchPush-v4 (benchmarks/RESULTS.md). The network and Adam continue in the new units.
    The EMA restarts from the live weights with its decay ramp (``EMA.reset``): left running, it went on averaging
    networks fitted to earlier statistics (at decay 0.995 and 80 steps per call, two thirds of its weight came from
    before the last refit), i.e. networks that read the new z-scores wrongly. Restarted, its first update copies the
    weights, so it holds only weights produced by steps under the current statistics, as the live model does.
    Freezing the statistics once the buffer is large would bring back the divergence above whenever the policy
    changes the data; fixed physical scales would need hand-set scales per task and channel. Unlike the reference,
    only real episodes enter the statistics"""
    sample_batch_size: int = 500
    """episodes per sampler call"""
    bf16: bool = False
    """run the UNet under bfloat16 autocast in training and sampling"""

    def __post_init__(self) -> None:
        for name in ("num_steps", "dim", "lr", "batch_size", "n_train_episodes", "tol", "kinematics_tol",
                     "contact_radius", "object_still", "goal_tol", "scale_floor", "sample_batch_size"):
            check_positive(name, getattr(self, name))
        for name in ("train_steps", "grad_clip"):
            check_non_negative(name, getattr(self, name))
        check_choice("schedule", self.schedule, ("cosine", "linear"))
        check_choice("prediction", self.prediction, ("epsilon", "x0"))
        check(self.dim % 8 == 0, "dim", self.dim, "a multiple of 8 (the UNet's GroupNorm groups)")
        check(len(self.dim_mults) >= 1 and all(m >= 1 for m in self.dim_mults), "dim_mults", self.dim_mults,
              "a non-empty tuple of positive integers")
        check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")
        check(0 < self.max_beta < 1, "max_beta", self.max_beta, "in (0, 1)")
        check(self.clip_x0 is None or self.clip_x0 > 0, "clip_x0", self.clip_x0, "None or > 0")


class EpisodeGenerator:
    """A DDPM over whole episodes, conditioned on ``[g_0, obs_0]``; ``fit`` trains it, ``generate`` samples,
    repairs and filters episodes.

    Built on the diffusion core: ``build_model`` (DDPM, temporal UNet, x0 or epsilon prediction, z-score normaliser
    inside the model) and one ``DiffusionTrainer`` kept across ``fit`` calls, so Adam's moments and the EMA
    persist (the reference re-created Adam on every call).
    """

    def __init__(self, obs_dim: int, act_dim: int, goal_dim: int, T: int, object_task: bool,  # noqa: N803
                 settings: EpisodeDiffusionSettings | None = None, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if T < 1:
            raise ValueError(f"episodes need at least one step, got T={T}")
        self.layout = EpisodeLayout(obs_dim, act_dim, goal_dim, object_task)
        self.T, self.settings = int(T), settings or EpisodeDiffusionSettings()
        self.device = torch.device(device)
        s, lay = self.settings, self.layout
        self.spec: dict[str, Any] = {
            "type": "ddpm", "event_shape": [self.T + 1, lay.channels], "cond_dim": goal_dim + obs_dim,
            "denoiser": {"type": "unet", "dim": s.dim, "dim_mults": list(s.dim_mults)},
            "normalizer": {"kind": "zscore"},
            "diffusion": {"num_steps": s.num_steps, "schedule": s.schedule, "prediction": s.prediction,
                          "clip_x0": s.clip_x0, **({"max_beta": s.max_beta} if s.schedule == "cosine" else {})},
            "sampler": {"sampler": "ddpm"},
        }
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's global RNG alone
            torch.manual_seed(derive_seed(seed, 0))
            model = build_model(self.spec).to(self.device)
        trainer_settings = TrainerSettings(
            steps=max(s.train_steps, 1), batch_size=s.batch_size, lr=s.lr, adam_beta2=0.999,  # torch Adam's betas
            lr_schedule="constant", grad_clip=s.grad_clip, ema_decay=s.ema_decay, ema_every=1, bf16=s.bf16)
        # the trainer needs a dataset to exist; fit() replaces this one-episode placeholder before any step
        placeholder = torch.zeros(1, self.T + 1, lay.channels, device=self.device)
        self.trainer = DiffusionTrainer(model, placeholder, trainer_settings,
                                        cond=torch.zeros(1, goal_dim + obs_dim, device=self.device),
                                        seed=derive_seed(seed, 1))
        self.sample_gen = torch.Generator(device=self.device).manual_seed(derive_seed(seed, 2))
        self.normalizer_fitted = False
        self.fits = 0
        self.generated = self.accepted = 0
        self.rejected: dict[str, int] | None = dict.fromkeys(FILTER_CHECKS, 0)  # None: unknown (older checkpoint)
        self.last_errors: dict[str, float] = {}  # the last event's median errors (metres)

    # --------------------------------------------------------------------------------------------- helpers
    @property
    def sampling_model(self) -> DiffusionModel:
        """The weights ``generate`` samples from: the EMA (default) or the live model."""
        return self.trainer.ema.shadow if self.settings.ema else self.trainer.model

    @property
    def limits(self) -> dict[str, float]:
        """The filter's threshold per check (metres), from the settings."""
        s = self.settings
        return {"goal": s.goal_tol, "kinematics": s.kinematics_tol, "object": s.contact_radius,
                "consistency": s.tol}

    def _cond(self, obs0: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
        """``[g_0, obs_0]`` ``(M, Dg + Do)``, z-scored with the model's statistics (the core feeds ``cond`` to the
        network as is)."""
        norm, lay = self.trainer.model.normalizer, self.layout
        return torch.cat([(g0 - norm.shift[lay.g]) / norm.scale[lay.g],
                          (obs0 - norm.shift[lay.obs]) / norm.scale[lay.obs]], dim=-1)

    # ----------------------------------------------------------------------------------------------- train
    def fit(self, episodes: Mapping[str, np.ndarray], steps: int | None = None) -> dict[str, float]:
        """Train for ``steps`` gradient steps (default ``settings.train_steps``) on minibatches of whole episodes.

        At most ``n_train_episodes`` episodes are used (a random subset without replacement). The normaliser's
        statistics are fitted on these episodes at every call (``refit_normalizer``, default; the EMA then restarts
        from the live weights) or on the first call only. Returns ``loss_mean``, ``loss_std`` over the steps and
        ``steps``.
        """
        n, t = self.layout.check(episodes)
        if t != self.T:
            raise DatasetError(f"episodes have T={t} steps, the generator was built for T={self.T}.")
        steps = self.settings.train_steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        rows = torch.as_tensor(self.layout.join(episodes))  # (N, T+1, C)
        gen = self.trainer.gen
        if n > self.settings.n_train_episodes:
            idx = torch.randperm(n, generator=gen, device=gen.device)[:self.settings.n_train_episodes]
            rows = rows[idx.cpu()]
        rows = rows.to(self.device)
        model = self.trainer.model
        if self.settings.refit_normalizer or not self.normalizer_fitted:
            model.normalizer.fit(rows)
            model.normalizer.scale.clamp_(min=self.settings.scale_floor)
            if self.normalizer_fitted:  # a refit: average only weights trained under these statistics
                self.trainer.ema.reset()
            else:
                self.trainer.ema.shadow.normalizer.load_state_dict(model.normalizer.state_dict())
            self.normalizer_fitted = True
        lay = self.layout
        self.trainer.data = rows
        self.trainer.cond = self._cond(rows[:, 0, lay.obs], rows[:, 0, lay.g])
        losses = [self.trainer.train_step() for _ in range(steps)]
        self.fits += 1
        if not losses:
            return {"loss_mean": float("nan"), "loss_std": float("nan"), "steps": 0.0}
        loss = torch.stack(losses).float()
        return {"loss_mean": float(loss.mean()), "loss_std": float(loss.std(unbiased=False)), "steps": float(steps)}

    # -------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def sample_rows(self, obs0: torch.Tensor, g0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Raw generated rows ``(M, T+1, C)`` (data units) for contexts ``obs0 (M, Do)``, ``g0 (M, Dg)``.

        DDPM ancestral sampling with the posterior std ``sqrt(beta~_t)`` (the reference used
        ``sqrt(beta_t / (1 - alpha_bar_t))``, ~0.91 at t = 1, so its samples kept unit-scale noise), conditioned on
        ``[g_0, obs_0]`` and inpainting ``obs_0``, ``ag_0 = ag(obs_0)``, ``g_t = g_0`` at every row (the reference
        added per-step noise to the goals) and ``act_T = 0``.
        """
        lay, m, rows = self.layout, len(obs0), self.T + 1
        model = self.sampling_model
        model.amp_dtype = torch.bfloat16 if self.settings.bf16 else None
        mask = torch.zeros(m, rows, lay.channels, dtype=torch.bool, device=self.device)
        values = torch.zeros(m, rows, lay.channels, device=self.device)
        mask[:, 0, lay.obs] = True
        values[:, 0, lay.obs] = obs0
        mask[:, 0, lay.ag] = True  # ag_0 follows from obs_0 (ours; the reference generated it)
        values[:, 0, lay.ag] = lay.achieved_goal(obs0)
        mask[:, :, lay.g] = True
        values[:, :, lay.g] = g0[:, None]
        mask[:, -1, lay.act] = True  # act_T := 0 (values already 0)
        return model.sample(m, self._cond(obs0, g0), sampler="ddpm", inpaint=Inpaint(mask, values),
                            generator=generator)

    def repair(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Make a generated episode dict self-consistent: actions clipped to [-1, 1] (the reference did not clip),
        achieved goals replaced by the observation's (the reference's own comment flags its ag as wrong), and for
        object tasks ``object_rel_pos`` recomputed as ``object - grip`` in rows 1..T (row 0 is the real context)."""
        out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in raw.items()}
        out["act"] = np.clip(out["act"], -1.0, 1.0)
        if self.layout.object_task:
            obs = out["obs"]
            obs[:, 1:, REL] = obs[:, 1:, OBJECT] - obs[:, 1:, GRIP]
        out["ag"] = self.layout.achieved_goal(out["obs"]).copy()
        return out

    def generate(self, contexts: Mapping[str, np.ndarray], n: int | None = None, *,
                 generator: torch.Generator | None = None, success_threshold: float = FETCH_SUCCESS_THRESHOLD
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Sample ``n`` episodes, repair them and keep those passing the filter (``FILTER_CHECKS``).

        Args:
            contexts: ``{"obs0": (M, Do), "g": (M, Dg)}`` (e.g. from :func:`successful_contexts`).
            n: episodes to generate, each from a context drawn uniformly with replacement (as the reference);
                ``None``: one episode per context, in order.
            generator: torch generator on the generator's device; default the generator's own (checkpointed).
            success_threshold: how ``synthetic_success_rate`` decides success (see ``goal_reached``).

        Returns ``(episodes, stats)``: the accepted episodes (the episode dict layout) and ``generated``,
        ``accepted``, ``rejection_rate``; ``reject_<check>`` for each check (the share of generated episodes whose
        first failed check it is, so they sum to ``rejection_rate``); ``consistency_error_median`` (metres, all
        generated episodes, measured before the repair), ``kinematics_error_median`` (metres);
        ``synthetic_success_rate`` (accepted episodes whose final ag reaches g; NaN if none).
        """
        lay, s = self.layout, self.settings
        obs0 = np.asarray(contexts["obs0"], dtype=np.float32)
        g0 = np.asarray(contexts["g"], dtype=np.float32)
        if obs0.ndim != 2 or obs0.shape[1] != lay.obs_dim or g0.shape != (len(obs0), lay.goal_dim) or not len(obs0):
            raise DatasetError(f"contexts must hold obs0 (M, {lay.obs_dim}) and g (M, {lay.goal_dim}) with M >= 1, "
                               f"got {obs0.shape} and {g0.shape}.")
        gen = self.sample_gen if generator is None else generator
        obs0_t, g0_t = torch.as_tensor(obs0, device=self.device), torch.as_tensor(g0, device=self.device)
        if n is not None:
            idx = torch.randint(len(obs0), (int(n),), generator=gen, device=gen.device).to(self.device)
            obs0_t, g0_t = obs0_t[idx], g0_t[idx]
        total = len(obs0_t)
        bs = s.sample_batch_size
        chunks = [self.sample_rows(obs0_t[i:i + bs], g0_t[i:i + bs], gen).cpu().numpy() for i in range(0, total, bs)]
        raw = lay.split(np.concatenate(chunks) if chunks else np.zeros((0, self.T + 1, lay.channels), np.float32))
        fixed = self.repair(raw)
        errors = filter_errors(raw, fixed, lay.object_task, s.object_still)
        reason = first_failure(errors, self.limits)
        keep = reason < 0
        episodes = {k: v[keep] for k, v in fixed.items()}
        n_acc = int(keep.sum())
        success = goal_reached(episodes["ag"][:, -1], episodes["g"][:, -1], success_threshold)
        counts = {c: int((reason == i).sum()) for i, c in enumerate(FILTER_CHECKS)}
        medians = {f"{c}_error_median": float(np.median(errors[c])) if total else float("nan")
                   for c in ("consistency", "kinematics")}
        self.generated += total
        self.accepted += n_acc
        if self.rejected is not None:
            self.rejected = {c: self.rejected[c] + counts[c] for c in FILTER_CHECKS}
        if total:
            self.last_errors = medians
        return episodes, {
            "generated": float(total), "accepted": float(n_acc),
            "rejection_rate": 1.0 - n_acc / total if total else 0.0,
            **{f"reject_{c}": counts[c] / total if total else 0.0 for c in FILTER_CHECKS}, **medians,
            "synthetic_success_rate": float(success.mean()) if n_acc else float("nan"),
        }

    def totals(self) -> dict[str, float]:
        """The generation events so far: ``generated``, ``accepted``, ``rejected_<check>`` (each episode under the
        first check it failed; left out after a resume from a checkpoint that did not count them) and the last
        event's ``last_<check>_error_median``; empty before the first event."""
        if not self.generated:
            return {}
        rejected = {f"rejected_{c}": n for c, n in (self.rejected or {}).items()}
        return {"generated": self.generated, "accepted": self.accepted, **rejected,
                **{f"last_{k}": v for k, v in self.last_errors.items()}}

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: model (normaliser inside), EMA, optimiser, both RNGs and the counters."""
        return {"trainer": self.trainer.state_dict(), "sample_gen": self.sample_gen.get_state(),
                "normalizer_fitted": self.normalizer_fitted, "fits": self.fits, "generated": self.generated,
                "accepted": self.accepted, "rejected": self.rejected, "last_errors": dict(self.last_errors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trainer.load_state_dict(dict(state["trainer"]))
        gen_state = state["sample_gen"]
        self.sample_gen.set_state(gen_state.cpu() if isinstance(gen_state, torch.Tensor) else gen_state)
        self.normalizer_fitted = bool(state["normalizer_fitted"])
        self.fits, self.generated, self.accepted = int(state["fits"]), int(state["generated"]), int(state["accepted"])
        # checkpoints from before the per-check totals: unknown once something was generated, not zero
        rejected = state.get("rejected", None if self.generated else dict.fromkeys(FILTER_CHECKS, 0))
        self.rejected = None if rejected is None else {c: int(rejected[c]) for c in FILTER_CHECKS}
        self.last_errors = {k: float(v) for k, v in state.get("last_errors", {}).items()}


__all__ = ["EpisodeLayout", "EpisodeDiffusionSettings", "EpisodeGenerator", "consistency_error", "kinematics_error",
           "object_onset_distance", "goal_drift", "filter_errors", "first_failure", "goal_reached",
           "successful_contexts", "FETCH_SUCCESS_THRESHOLD", "FETCH_MOCAP_STEP", "FILTER_CHECKS"]
