"""Rollout drift: a dynamics model's multi-step trajectories against MuJoCo's, state error by horizon.

Dydiff claims that its trajectory diffusion model, which predicts a whole rollout at once, drifts less over long
horizons than a single-step model chained autoregressively. :func:`simulate` replays given action sequences from
given start states in the simulator; :func:`drift` compares a model's trajectories (same starts, same actions) with
them per horizon; :func:`drift_table` and :func:`plot_drift` put several models side by side.

Shapes: ``N`` rollouts, ``H`` steps per rollout, ``Do`` observation dim, ``Da`` action dim. Step ``t`` (0..H-1)
takes row ``t`` of a trajectory and action ``t`` to row ``t + 1``, reward ``t`` and terminal flag ``t``.

The MuJoCo state is rebuilt from the observation as in :mod:`diffrl.eval.fidelity`: Gymnasium v5 locomotion
observations are ``qpos[k:] ++ qvel`` (default options), and the ``k`` excluded root coordinates are set to 0, exact
because these tasks are translation invariant. Hopper-v5 and Walker2d-v5 clip ``qvel`` to [-10, 10] in the
observation, so a start state with a clipped velocity is not the dataset's true state (``start_clipped`` says
which). Ant-v5 is not supported: its default observation appends 78 contact-force dims a model predicts but the
state does not determine, and excludes x and y.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import mujoco
import numpy as np

from diffrl.envs import make_env
from diffrl.errors import ConfigError
from diffrl.eval.fidelity import LAYOUTS, STD_FLOOR

__all__ = ["SUPPORTED", "SimulatedRollouts", "supports_state_reset", "simulate", "drift", "drift_table",
           "plot_drift"]

SUPPORTED = ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Swimmer-v5")
"""envs whose observation is the whole MuJoCo state but the translation-invariant root coordinates"""


def supports_state_reset(env_id: str) -> bool:
    """True if the simulator can be put in the state an observation of ``env_id`` describes (see module docstring)."""
    return env_id in SUPPORTED


@dataclasses.dataclass(frozen=True)
class SimulatedRollouts:
    """The simulator's trajectories from :func:`simulate`.

    Row ``t + 1`` is valid iff no step before ``t`` terminated: the terminal next state itself is valid, the rows
    after it are not. Invalid rows are NaN, so that using them without the ``alive`` mask shows.
    """

    obs: np.ndarray
    """(N, H+1, Do) float64; ``obs[:, 0]`` is the start observation, rows after termination NaN"""
    rewards: np.ndarray
    """(N, H) float64; 0 for steps not taken (after termination)"""
    terminated: np.ndarray
    """(N, H) bool; True only at the step that terminated (the env's own ``is_healthy`` rule)"""
    alive: np.ndarray
    """(N, H+1) bool; row ``t`` is a valid simulator state. ``alive[:, 1:]`` also says which steps were taken"""
    start_clipped: np.ndarray
    """(N,) bool; the start observation holds a velocity at the env's observation clip bound, so the simulator
    starts from the clipped velocity, not the dataset's true one"""


def _check_env(env_id: str) -> None:
    if not supports_state_reset(env_id):
        raise ConfigError(f"rollout drift needs an env whose observation holds the MuJoCo state; {env_id!r} is not "
                          f"one of the supported {', '.join(SUPPORTED)} (default options).")


def simulate(env_id: str, start_obs: np.ndarray, actions: np.ndarray) -> SimulatedRollouts:
    """Replay action sequences in MuJoCo from start states given as observations.

    Each start state is set with ``env.unwrapped.set_state(qpos, qvel)``, ``qpos = [0] * k ++ obs[:nq-k]``,
    ``qvel = obs[nq-k:]`` (``k = 1`` root x, ``k = 2`` for Swimmer's x and y, which the observation excludes and the
    dynamics do not depend on), after resetting MuJoCo's data so that no solver warm start carries over from the
    previous rollout. Then the ``H`` actions are stepped until the env terminates.

    Args:
        env_id: one of :data:`SUPPORTED`.
        start_obs: (N, Do) start observations, e.g. from a dataset.
        actions: (N, H, Da) in [-1, 1], the convention of :func:`diffrl.envs.make_env` and of diffrl's datasets.
    Returns:
        :class:`SimulatedRollouts`.
    """
    _check_env(env_id)
    start_obs, actions = np.asarray(start_obs, np.float64), np.asarray(actions, np.float64)
    layout = LAYOUTS[env_id]
    env = make_env(env_id).unwrapped  # unwrapped: no TimeLimit (H may exceed what is left of an episode), no checker
    try:
        model, data = env.model, env.data
        nq, nu, k = model.nq, model.nu, layout.excluded
        do = env.observation_space.shape[0]
        if start_obs.ndim != 2 or start_obs.shape[1] != do:
            raise ValueError(f"start_obs has shape {start_obs.shape}; expected (N, {do}) observations of {env_id}.")
        n = len(start_obs)
        if actions.ndim != 3 or actions.shape[0] != n or actions.shape[2] != nu or actions.shape[1] < 1:
            raise ValueError(f"actions have shape {actions.shape}; expected (N, H, Da) = ({n}, H >= 1, {nu}) for "
                             f"{n} start states of {env_id}.")
        if not (np.all(np.isfinite(start_obs)) and np.all(np.isfinite(actions))):
            raise ValueError("start_obs and actions must be finite; drop the rows holding NaN or inf.")
        h = actions.shape[1]
        low, high = env.action_space.low, env.action_space.high
        # make_env's ClipAction then RescaleAction, applied here because the unwrapped env is stepped directly.
        raw = low + (np.clip(actions, -1.0, 1.0) + 1.0) / 2.0 * (high - low)  # (N, H, Da)
        obs = np.full((n, h + 1, do), np.nan)
        obs[:, 0] = start_obs
        rewards, terminated = np.zeros((n, h)), np.zeros((n, h), dtype=bool)
        alive = np.zeros((n, h + 1), dtype=bool)
        alive[:, 0] = True
        qpos = np.zeros(nq)  # root x (and y) stay 0: translation invariance
        for i in range(n):
            mujoco.mj_resetData(model, data)  # a clean solver warm start: rollouts do not depend on their order
            qpos[k:] = start_obs[i, :nq - k]
            env.set_state(qpos, start_obs[i, nq - k:])
            for t in range(h):
                obs[i, t + 1], rewards[i, t], terminated[i, t], _, _ = env.step(raw[i, t])
                alive[i, t + 1] = True
                if terminated[i, t]:
                    break
    finally:
        env.close()
    if layout.vel_clip is None:
        start_clipped = np.zeros(n, dtype=bool)
    else:
        start_clipped = np.any(np.abs(start_obs[:, nq - k:]) >= layout.vel_clip - 1e-4, axis=1)
    return SimulatedRollouts(obs=obs, rewards=rewards, terminated=terminated, alive=alive,
                             start_clipped=start_clipped)


def drift(sim: SimulatedRollouts, pred_obs: np.ndarray, pred_rewards: np.ndarray | None = None, *,
          scale: np.ndarray | None = None) -> dict[str, np.ndarray | float]:
    """State error by horizon and return error of a model's trajectories against the simulator's.

    ``state_error[h-1] = mean over rollouts alive at h of sqrt(mean_d ((pred[h, d] - sim[h, d]) / scale[d])^2)``
    for ``h = 1..H`` (NaN where no rollout is alive). The return error is the mean over rollouts of
    ``|sum_t pred_r[t] - sum_t sim_r[t]|`` over each rollout's steps taken in the simulator.

    Args:
        sim: the simulator's rollouts from :func:`simulate`.
        pred_obs: (N, H+1, Do) a model's trajectories from the same start states and actions.
        pred_rewards: (N, H) (or (N, H, 1)) the model's rewards; None skips the return error.
        scale: (Do,) per-dim std of the dataset's observations; None is 1. Entries below 1e-6 count as 1
            (a constant dim is left unscaled, as in :mod:`diffrl.eval.fidelity`).
    Returns:
        ``state_error`` (H,), ``alive`` (H,) rollouts alive at each horizon, ``return_error`` (NaN without
        ``pred_rewards``), ``sim_return`` (mean simulator return over the steps taken), ``pred_return`` (NaN without
        ``pred_rewards``), ``start_clipped_fraction``, ``num`` (N) and ``horizon`` (H).
    """
    pred_obs = np.asarray(pred_obs, np.float64)
    n, h1, do = sim.obs.shape
    if pred_obs.shape != sim.obs.shape:
        raise ValueError(f"pred_obs has shape {pred_obs.shape} but the simulator's trajectories have {sim.obs.shape}; "
                         "predict from the same start states and actions, start observation included (row 0).")
    if scale is None:
        scale = np.ones(do)
    scale = np.asarray(scale, np.float64)
    if scale.shape != (do,) or not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise ValueError(f"scale has shape {scale.shape} (or negative or non-finite entries); expected ({do},) "
                         "non-negative per-dim stds of the dataset's observations.")
    scale = np.where(scale < STD_FLOOR, 1.0, scale)
    alive = sim.alive[:, 1:]  # (N, H) row h valid, i.e. step h-1 taken
    diff = np.where(alive[..., None], (pred_obs[:, 1:] - np.nan_to_num(sim.obs[:, 1:])) / scale, 0.0)
    rms = np.sqrt((diff**2).mean(axis=-1))  # (N, H)
    count = alive.sum(axis=0)  # (H,)
    with np.errstate(invalid="ignore", divide="ignore"):
        state_error = np.where(count > 0, (rms * alive).sum(axis=0) / count, np.nan)
    sim_ret = (sim.rewards * alive).sum(axis=1)  # (N,)
    out: dict[str, np.ndarray | float] = {
        "state_error": state_error, "alive": count, "return_error": float("nan"),
        "sim_return": float(sim_ret.mean()), "pred_return": float("nan"),
        "start_clipped_fraction": float(sim.start_clipped.mean()), "num": n, "horizon": h1 - 1}
    if pred_rewards is not None:
        pred_rewards = np.asarray(pred_rewards, np.float64)
        if pred_rewards.shape == (n, h1 - 1, 1):
            pred_rewards = pred_rewards[..., 0]
        if pred_rewards.shape != (n, h1 - 1):
            raise ValueError(f"pred_rewards has shape {pred_rewards.shape}; expected ({n}, {h1 - 1}), one reward per "
                             "step of each rollout.")
        pred_ret = np.where(alive, pred_rewards, 0.0).sum(axis=1)  # (N,) over the steps the simulator took
        out["return_error"] = float(np.abs(pred_ret - sim_ret).mean())
        out["pred_return"] = float(pred_ret.mean())
    return out


def _cell(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.4g}"


def drift_table(results: Mapping[str, Mapping], horizons: Sequence[int] = (1, 5, 10, 25, 50, 100)) -> str:
    """A plain-text table of :func:`drift` results: one row per model, the state error at each of ``horizons`` up to
    the longest rollout (n/a for a model with shorter ones), then the return error.

    Args:
        results: model name (e.g. ``"dydiff"``, ``"single-step"``) -> its :func:`drift` dict.
        horizons: the horizons shown, where <= H.
    Returns:
        The table, columns aligned with spaces.
    """
    if not results:
        raise ValueError("results is empty; pass {model name: drift(...)} for at least one model.")
    longest = max(len(r["state_error"]) for r in results.values())
    shown = [h for h in horizons if 1 <= h <= longest]
    header = ["model", *[f"h={h}" for h in shown], "return err"]
    rows = [header]
    for name, r in results.items():
        err = np.asarray(r["state_error"])
        rows.append([name, *[_cell(err[h - 1]) if h <= len(err) else "n/a" for h in shown],
                     _cell(r.get("return_error"))])
    widths = [max(len(row[j]) for row in rows) for j in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def plot_drift(results: Mapping[str, Mapping], path: Path) -> Path:
    """Plot state error against horizon, one line per model, log y; writes ``path`` (e.g. ``drift.png``).

    Args:
        results: model name -> its :func:`drift` dict.
        path: the image file; its suffix picks the format.
    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg canvas: no global backend switch, no display
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in results.items():
        err = np.asarray(r["state_error"], np.float64)
        ax.plot(np.arange(1, len(err) + 1), np.where(err > 0, err, np.nan), label=name)  # log y: 0 is not drawn
    ax.set_yscale("log")
    ax.set_xlabel("horizon (steps)")
    ax.set_ylabel("state error (RMS over dims, in dataset stds)")
    ax.set_title("rollout drift against the simulator")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
