"""Fidelity of generated transitions: SynthER's validity and diversity, plus per-dimension marginals.

SynthER (Lu et al. 2023, https://arxiv.org/abs/2303.06614) judges generated data by *validity* (error of the
generated ``(r, s')`` against what the simulator returns for the generated ``(s, a)``) and *diversity*
(L2 distance of each generated transition to the nearest real one), and compares both with additive-noise
augmentation (S4RL). :func:`fidelity_report` computes them for synthetic data, for that noise baseline and
for real data (the floor), so every number can be read against a reference.

Shapes: ``N`` transitions, ``Do`` observation dim, ``Da`` action dim, ``Ds`` simulator-state dims of the
observation (``nq - k + nv``), ``D = 2 * Do + Da + 1`` the row ``[s, a, r, s']``, ``M`` real rows, ``Q`` query rows.

Simulator validity rebuilds the MuJoCo state from the observation. Gymnasium v5 locomotion observations are
``qpos[k:]`` then ``qvel`` (``_get_obs`` of ``*_v5.py``); the ``k`` excluded root coordinates (x, or x and y)
are set to 0, which is exact because these tasks are translation invariant. Caveats:

- Hopper-v5 and Walker2d-v5 clip ``qvel`` to [-10, 10] in the observation, so a transition whose ``s`` has a
  clipped velocity cannot be rebuilt exactly; ``clipped_fraction`` and the ``*_unclipped`` errors say how much
  that matters (random-action Walker2d: most transitions; Hopper: usually none).
- Ant-v5 observations end with 78 contact-force dims (``cfrc_ext``); they are derived quantities, ignored for
  the state and the comparison (only the first ``Ds = 27`` dims are compared).
- Ant-v5's forward reward reads the torso's ``xpos``, which after ``mj_step`` is one sub-step stale, so its
  reward depends on the previous step too: even real Ant data has a small reward error (the ``real`` floor).
- Actions are clipped to [-1, 1] and mapped to the env's bounds as :func:`diffrl.envs.make_env` does;
  terminals count as true above 0.5 (SynthER's ``terminal_threshold``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffrl.data.formats import check_arrays
from diffrl.envs import make_env
from diffrl.errors import DatasetError, EnvError

__all__ = ["simulator_validity", "diversity", "marginals", "fidelity_report", "format_fidelity", "LAYOUTS"]

REQUIRED = ("observations", "actions", "rewards", "next_observations")
VAR_FLOOR = 1e-8  # a constant reference dim would otherwise divide by zero
STD_FLOOR = 1e-6  # constant real dims are left unscaled (std taken as 1)
COPY_TOL = 1e-3  # z-scored L2 distance below which a synthetic row counts as a copy of a real one


@dataclass(frozen=True)
class Layout:
    """How a Gymnasium v5 observation holds the MuJoCo state (read from ``_get_obs`` in ``*_v5.py``)."""

    excluded: int
    """leading qpos entries left out of the observation (root x, or x and y)"""
    vel_clip: float | None
    """bound on qvel in the observation, if the env clips it"""
    terminates: bool
    """whether the env has a termination condition (``terminate_when_unhealthy``)"""


LAYOUTS = {
    "Hopper-v5": Layout(excluded=1, vel_clip=10.0, terminates=True),
    "Walker2d-v5": Layout(excluded=1, vel_clip=10.0, terminates=True),
    "HalfCheetah-v5": Layout(excluded=1, vel_clip=None, terminates=False),
    "Swimmer-v5": Layout(excluded=2, vel_clip=None, terminates=False),
    "Ant-v5": Layout(excluded=2, vel_clip=None, terminates=True),
}


def _layout(env_id: str) -> Layout:
    if env_id not in LAYOUTS:
        raise EnvError(f"simulator validity supports {', '.join(LAYOUTS)} (observations that hold the MuJoCo "
                       f"state), not {env_id!r}; use diversity() and marginals() for other envs.")
    return LAYOUTS[env_id]


def _transitions(arrays: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Check the per-transition arrays at the boundary; rewards and terminals come back as (N,)."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DatasetError(f"{source} lacks {', '.join(map(repr, missing))}; pass the keys "
                           f"{', '.join(REQUIRED)} (and optionally 'terminals'), as in SynthER's npz files.")
    out = {k: np.asarray(arrays[k]) for k in REQUIRED}
    for k in ("rewards", "terminals"):
        if arrays.get(k) is not None:
            a = np.asarray(arrays[k])
            out[k] = a.reshape(-1) if a.ndim == 2 and a.shape[1] == 1 else a
    check_arrays({k: out[k] for k in REQUIRED}, source)
    if out["observations"].shape[1] != out["next_observations"].shape[1]:
        raise DatasetError(f"{source}: observations have {out['observations'].shape[1]} dims but "
                           f"next_observations have {out['next_observations'].shape[1]}; they must match.")
    if "terminals" in out:
        t = out["terminals"]
        if t.shape != out["rewards"].shape or not np.all(np.isfinite(t.astype(np.float64))):
            raise DatasetError(f"{source}: terminals have shape {t.shape} (or non-finite values); expected "
                               f"finite values of shape {out['rewards'].shape}.")
        out["terminals"] = t.astype(np.float64) > 0.5  # SynthER's terminal_threshold
    return out


def _reference(reference: Mapping[str, Any], obs_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``next_observations`` (M, Do) and ``rewards`` (M,) of the variance reference, checked."""
    if "next_observations" not in reference or "rewards" not in reference:
        raise DatasetError("reference must hold 'next_observations' and 'rewards' (pass the real data's arrays).")
    nxt, rew = np.asarray(reference["next_observations"]), np.asarray(reference["rewards"]).reshape(-1)
    if nxt.ndim != 2 or nxt.shape[1] != obs_dim or len(nxt) != len(rew) or len(rew) < 2:
        raise DatasetError(f"reference next_observations have shape {nxt.shape} and rewards {rew.shape}; expected "
                           f"(M, {obs_dim}) and (M,) with M >= 2, from the same env as the evaluated data.")
    return nxt, rew


def _rows(t: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[s, a, r, s']`` rows (N, D), float32."""
    return np.concatenate([t["observations"], t["actions"], t["rewards"][:, None], t["next_observations"]],
                          axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------------------- validity


def simulator_validity(env_id: str, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                       next_observations: np.ndarray, terminals: np.ndarray | None = None, *,
                       reference: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Replay each transition's ``(s, a)`` in MuJoCo and compare its ``(r, s', done)`` with the simulator's.

    Args:
        env_id: one of :data:`LAYOUTS` (Gymnasium MuJoCo v5 locomotion, default options).
        observations, actions, rewards, next_observations: (N, Do), (N, Da) in [-1, 1], (N,), (N, Do).
        terminals: (N,) 0/1 (or scores, true above 0.5); gives ``termination_agreement`` for envs that terminate.
        reference: arrays with ``next_observations`` and ``rewards`` whose per-dim variance normalizes the
            errors (the real data); None uses the evaluated arrays' own variance.
    Returns:
        JSON-able dict: ``next_obs_nmse`` (mean over the Ds dims of MSE / reference variance),
        ``next_obs_nmse_median`` (median over transitions of their dim-averaged normalized error),
        ``next_obs_nmse_per_dim``, ``reward_nmse``, raw ``next_obs_mse`` and ``reward_mse``,
        ``termination_agreement`` (None without terminals or termination), ``clipped_fraction``,
        ``next_obs_nmse_unclipped`` and ``reward_nmse_unclipped`` (over transitions whose ``s`` has no clipped
        velocity; None for envs that do not clip), ``num``.
    """
    layout = _layout(env_id)
    t = _transitions({"observations": observations, "actions": actions, "rewards": rewards,
                      "next_observations": next_observations, "terminals": terminals}, "the evaluated transitions")
    env = make_env(env_id).unwrapped  # unwrapped: no checker, no TimeLimit; set_state/step on MuJoCo directly
    try:
        nq, nv, k = env.model.nq, env.model.nv, layout.excluded
        ds = nq - k + nv  # observation dims that hold the state (Ant's contact forces follow them)
        do, da = t["observations"].shape[1], t["actions"].shape[1]
        full = env.observation_space.shape[0]
        if do not in (full, ds):
            raise DatasetError(f"observations have {do} dims but {env_id} observations have {full}; pass data "
                               f"collected on {env_id} with Gymnasium's default options.")
        if da != env.model.nu:
            raise DatasetError(f"actions have {da} dims but {env_id} has {env.model.nu} actuators; pass data "
                               f"collected on {env_id}.")
        low, high = env.action_space.low, env.action_space.high
        raw = low + (np.clip(t["actions"], -1.0, 1.0) + 1.0) / 2.0 * (high - low)  # make_env's RescaleAction
        obs = t["observations"].astype(np.float64)
        n = len(obs)
        pred = np.empty((n, ds))  # (N, Ds) simulator's next state
        pred_r, pred_done = np.empty(n), np.empty(n, dtype=bool)
        qpos = np.zeros(nq)  # root x (and y) stay 0: translation invariance
        for i in range(n):
            qpos[k:] = obs[i, :nq - k]
            env.set_state(qpos, obs[i, nq - k:ds])
            o, r, done, _, _ = env.step(raw[i])
            pred[i], pred_r[i], pred_done[i] = o[:ds], r, done
    finally:
        env.close()

    ref_next, ref_r = _reference(t if reference is None else reference, do)
    var = np.maximum(ref_next[:, :ds].var(axis=0, dtype=np.float64), VAR_FLOOR)  # (Ds,)
    var_r = max(float(ref_r.var(dtype=np.float64)), VAR_FLOOR)
    sq = (pred - t["next_observations"][:, :ds].astype(np.float64)) ** 2  # (N, Ds)
    sq_r = (pred_r - t["rewards"].astype(np.float64)) ** 2  # (N,)
    per_transition = (sq / var).mean(axis=1)  # (N,)
    out: dict[str, Any] = {
        "num": n,
        "next_obs_nmse": float((sq.mean(axis=0) / var).mean()),
        "next_obs_nmse_median": float(np.median(per_transition)),
        "next_obs_nmse_per_dim": (sq.mean(axis=0) / var).tolist(),
        "reward_nmse": float(sq_r.mean() / var_r),
        "next_obs_mse": float(sq.mean()),
        "reward_mse": float(sq_r.mean()),
        "termination_agreement": None,
        "clipped_fraction": None,
        "next_obs_nmse_unclipped": None,
        "reward_nmse_unclipped": None,
    }
    if layout.terminates and "terminals" in t:
        out["termination_agreement"] = float(np.mean(pred_done == t["terminals"]))
    if layout.vel_clip is not None:
        clipped = np.any(np.abs(obs[:, nq - k:ds]) >= layout.vel_clip - 1e-4, axis=1)  # (N,) s was clipped
        out["clipped_fraction"] = float(clipped.mean())
        if not clipped.all():
            out["next_obs_nmse_unclipped"] = float((sq[~clipped].mean(axis=0) / var).mean())
            out["reward_nmse_unclipped"] = float(sq_r[~clipped].mean() / var_r)
    return out


# ---------------------------------------------------------------------------------------------- diversity


def _nearest(real: np.ndarray, mean: np.ndarray, std: np.ndarray, query: np.ndarray,
             exclude: np.ndarray | None = None, chunk: int | None = None) -> np.ndarray:
    """Distance (Q,) from each z-scored query (Q, D) to its nearest z-scored real row, real read in chunks.

    ``exclude[j]`` is a real row index query ``j`` may not match (itself, for real-to-real distances).
    """
    q = len(query)
    chunk = chunk or max(1, 2**24 // q)  # (Q, chunk) float32 block of at most 64 MiB
    # |x - y|^2 - |x|^2 = [-2x, 1] . [y, |y|^2]: one matmul per chunk gives distances up to a per-query constant.
    q_aug = np.concatenate([-2.0 * query, np.ones((q, 1))], axis=1).astype(np.float32)  # (Q, D + 1)
    best, arg = np.full(q, np.inf, dtype=np.float32), np.zeros(q, dtype=np.int64)
    rows = np.arange(q)
    for lo in range(0, len(real), chunk):
        block = ((real[lo:lo + chunk] - mean) / std).astype(np.float32)  # (C, D)
        d = q_aug @ np.concatenate([block, (block**2).sum(axis=1, keepdims=True)], axis=1).T  # (Q, C)
        if exclude is not None:
            inside = (exclude >= lo) & (exclude < lo + len(block))
            d[inside, exclude[inside] - lo] = np.inf
        j = d.argmin(axis=1)
        dj = d[rows, j]
        better = dj < best
        best[better], arg[better] = dj[better], j[better] + lo
    # The matmul form loses float32 precision near 0 (an exact copy reads ~1e-3); recompute the winner exactly.
    nearest = (real[arg].astype(np.float64) - mean) / std  # (Q, D)
    return np.linalg.norm(query - nearest, axis=1)


def _standardizer(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = real.mean(axis=0, dtype=np.float64)
    std = real.std(axis=0, dtype=np.float64)
    return mean, np.where(std < STD_FLOOR, 1.0, std)


def _check_rows(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real, synthetic = np.asarray(real), np.asarray(synthetic)
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise DatasetError(f"real rows have shape {real.shape} and synthetic rows {synthetic.shape}; both must be "
                           "(N, D) with the same D (concatenate [s, a, r, s'] the same way).")
    if len(real) < 2 or len(synthetic) < 1:
        raise DatasetError(f"diversity and marginals need at least 2 real rows and 1 synthetic row, got "
                           f"{len(real)} and {len(synthetic)}.")
    return real, synthetic


def diversity(real: np.ndarray, synthetic: np.ndarray, *, max_points: int = 2000, seed: int = 0,
              copy_tol: float = COPY_TOL) -> dict[str, Any]:
    """Nearest-real-neighbour distances of synthetic rows, against real rows' own (SynthER's diversity).

    Rows are z-scored with the real data's per-dim mean and std. Up to ``max_points`` synthetic rows are matched
    against all real rows (read in chunks: 1M real rows need no more than ~64 MiB extra); up to ``max_points``
    real rows are matched against the other real rows (leave-one-out), the reference scale.

    Args:
        real: (M, D) real rows, e.g. ``[s, a, r, s']``.
        synthetic: (N, D) rows built the same way.
        max_points: rows sampled (without replacement) from each side as queries.
        seed: seed of that sampling.
        copy_tol: z-scored distance below which a row counts as a copy (memorization).
    Returns:
        ``nn_mean``, ``nn_median`` (synthetic to real), ``real_nn_mean``, ``real_nn_median`` (real to other
        real), ``nn_ratio_mean``, ``nn_ratio_median`` (synthetic / real; < 1 hugs the data, ~1 like fresh
        samples, > 1 off the data), ``copy_fraction``, ``real_copy_fraction``, ``copy_tol``, ``num_queries``.
    """
    real, synthetic = _check_rows(real, synthetic)
    rng = np.random.default_rng(seed)
    mean, std = _standardizer(real)
    syn_idx = rng.choice(len(synthetic), min(max_points, len(synthetic)), replace=False)
    real_idx = rng.choice(len(real), min(max_points, len(real)), replace=False)
    d_syn = _nearest(real, mean, std, (synthetic[syn_idx].astype(np.float64) - mean) / std)
    d_real = _nearest(real, mean, std, (real[real_idx].astype(np.float64) - mean) / std, exclude=real_idx)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    out = {"nn_mean": float(d_syn.mean()), "nn_median": float(np.median(d_syn)),
           "real_nn_mean": float(d_real.mean()), "real_nn_median": float(np.median(d_real))}
    out["nn_ratio_mean"] = ratio(out["nn_mean"], out["real_nn_mean"])
    out["nn_ratio_median"] = ratio(out["nn_median"], out["real_nn_median"])
    out.update(copy_fraction=float(np.mean(d_syn < copy_tol)), real_copy_fraction=float(np.mean(d_real < copy_tol)),
               copy_tol=copy_tol, num_queries=len(syn_idx))
    return out


# ---------------------------------------------------------------------------------------------- marginals


def _quantiles(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """np.quantile(x, u, axis=0) (linear method) from one sort per column, faster on large arrays."""
    xs = np.sort(x, axis=0)  # (M, D)
    pos = u * (len(xs) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(xs) - 1)
    w = (pos - lo)[:, None]
    return xs[lo].astype(np.float64) * (1.0 - w) + xs[hi].astype(np.float64) * w


def marginals(real: np.ndarray, synthetic: np.ndarray, *, num_quantiles: int = 1000) -> dict[str, Any]:
    """Per-dimension 1-D Wasserstein-1 distance between real and synthetic rows, in units of the real std.

    ``W1 = integral over u in (0, 1) of |F_real^-1(u) - F_syn^-1(u)|``, evaluated at ``num_quantiles`` midpoints
    ``u = (i + 0.5) / num_quantiles`` (linear-interpolated quantiles).

    Args:
        real: (M, D) real rows.
        synthetic: (N, D) rows built the same way.
        num_quantiles: resolution of the quantile grid.
    Returns:
        ``w1_mean``, ``w1_max``, ``w1_argmax`` (the worst dim) and ``w1_per_dim`` (D floats).
    """
    real, synthetic = _check_rows(real, synthetic)
    _, std = _standardizer(real)
    u = (np.arange(num_quantiles) + 0.5) / num_quantiles
    qr, qs = _quantiles(real, u), _quantiles(synthetic, u)  # (num_quantiles, D)
    w1 = np.abs(qr - qs).mean(axis=0) / std  # (D,)
    return {"w1_mean": float(w1.mean()), "w1_max": float(w1.max()), "w1_argmax": int(w1.argmax()),
            "w1_per_dim": w1.tolist()}


# ------------------------------------------------------------------------------------------------ report


def _subsample(t: dict[str, np.ndarray], num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    idx = np.sort(rng.choice(len(t["observations"]), min(num, len(t["observations"])), replace=False))
    return {k: v[idx] for k, v in t.items()}


def _noised(t: dict[str, np.ndarray], real: dict[str, np.ndarray], scale: float,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """S4RL-style additive Gaussian noise: std = ``scale`` x the real per-dim std; actions clipped, terminals kept."""
    out = dict(t)
    for k in REQUIRED:
        std = real[k].std(axis=0, dtype=np.float64)
        out[k] = (t[k] + scale * std * rng.standard_normal(t[k].shape)).astype(np.float32)
    out["actions"] = np.clip(out["actions"], -1.0, 1.0)
    return out


def fidelity_report(real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray], env_id: str, *,
                    num: int = 2000, noise_scale: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Validity, diversity and marginals of synthetic data, of a noise baseline, and of real data (the floor).

    Every column uses ``num`` transitions against the full real data, so the real column is also the
    finite-sample floor of diversity and marginals. Validity errors are normalized by the real data's variance.

    Args:
        real: arrays ``observations, actions, rewards, next_observations`` and optionally ``terminals``
            (SynthER's npz layout; extra keys are ignored).
        synthetic: the same keys, e.g. ``dict(np.load("samples.npz"))``.
        env_id: one of :data:`LAYOUTS`.
        num: transitions sampled from each source (without replacement).
        noise_scale: std of the noise baseline in units of the real per-dim std (S4RL/SynthER compare with it).
        seed: seed of the sampling and of the noise.
    Returns:
        JSON-able ``{"real": col, "synthetic": col, "noise_baseline": col, "settings": {...}}``, each ``col`` with
        ``validity`` (:func:`simulator_validity`), ``diversity`` (:func:`diversity`; for real: each sampled real
        row to its nearest other real row) and ``marginals`` (:func:`marginals`).
    """
    _layout(env_id)
    if num < 1 or noise_scale < 0:
        raise ValueError(f"num must be >= 1 and noise_scale >= 0, got num={num}, noise_scale={noise_scale}")
    real_t, syn_t = _transitions(real, "the real data"), _transitions(synthetic, "the synthetic data")
    rng = np.random.default_rng(seed)
    columns = {"real": _subsample(real_t, num, rng), "synthetic": _subsample(syn_t, num, rng)}
    columns["noise_baseline"] = _noised(columns["real"], real_t, noise_scale, rng)
    real_rows = _rows(real_t)
    report: dict[str, Any] = {}
    for name, t in columns.items():
        rows = _rows(t)
        report[name] = {"validity": simulator_validity(env_id, **t, reference=real_t),
                        "marginals": marginals(real_rows, rows)}
        if name != "real":
            report[name]["diversity"] = diversity(real_rows, rows, max_points=num, seed=seed)
    d = report["synthetic"]["diversity"]
    report["real"]["diversity"] = {"nn_mean": d["real_nn_mean"], "nn_median": d["real_nn_median"],
                                   "nn_ratio_mean": 1.0, "nn_ratio_median": 1.0,
                                   "copy_fraction": d["real_copy_fraction"], "copy_tol": d["copy_tol"]}
    report["settings"] = {"env_id": env_id, "num": num, "noise_scale": noise_scale, "seed": seed,
                          "real_size": len(real_t["observations"]), "synthetic_size": len(syn_t["observations"]),
                          "num_real": len(columns["real"]["observations"]),
                          "num_synthetic": len(columns["synthetic"]["observations"])}
    return report


_ROWS = (  # (label, section, key, format)
    ("next-state NMSE vs simulator", "validity", "next_obs_nmse", "{:.3g}"),
    ("next-state NMSE, median transition", "validity", "next_obs_nmse_median", "{:.3g}"),
    ("next-state NMSE, unclipped velocities", "validity", "next_obs_nmse_unclipped", "{:.3g}"),
    ("velocity-clipped fraction", "validity", "clipped_fraction", "{:.3f}"),
    ("reward NMSE vs simulator", "validity", "reward_nmse", "{:.3g}"),
    ("reward NMSE, unclipped velocities", "validity", "reward_nmse_unclipped", "{:.3g}"),
    ("termination agreement", "validity", "termination_agreement", "{:.3f}"),
    ("NN distance to real (mean, z-units)", "diversity", "nn_mean", "{:.3g}"),
    ("NN distance / real-real NN distance", "diversity", "nn_ratio_mean", "{:.3g}"),
    ("near-copy fraction", "diversity", "copy_fraction", "{:.3f}"),
    ("marginal W1 / std (mean over dims)", "marginals", "w1_mean", "{:.3g}"),
    ("marginal W1 / std (worst dim)", "marginals", "w1_max", "{:.3g}"),
)


def format_fidelity(report: Mapping[str, Any]) -> str:
    """A compact markdown table of :func:`fidelity_report`: rows are metrics, columns real / synthetic / noise."""
    s = report["settings"]
    cols = ("real", "synthetic", "noise_baseline")
    lines = [f"Fidelity on {s['env_id']}: {s['num_synthetic']} synthetic and {s['num_real']} real transitions; "
             f"noise baseline = real + N(0, ({s['noise_scale']:g} x std)^2).", "",
             "| metric | real | synthetic | noise baseline |", "|---|---:|---:|---:|"]
    for label, section, key, fmt in _ROWS:
        values = [report[c][section].get(key) for c in cols]
        if all(v is None for v in values):
            continue  # e.g. no velocity clipping or no termination in this env
        if key == "copy_fraction":
            label = f"near-copy fraction (< {report['synthetic']['diversity']['copy_tol']:g})"
        cells = ["n/a" if v is None else fmt.format(v) for v in values]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)
