"""Statistics over runs with rliable: aggregate metrics, probability of improvement and performance profiles, each
with stratified-bootstrap confidence intervals (Agarwal et al., 2021, "Deep RL at the Edge of the Statistical
Precipice", https://arxiv.org/abs/2108.13264).

Shapes: an arm's scores are a matrix ``(R, T)``: R runs (seeds) x T tasks, ``scores[r, t]`` the final score of
run ``r`` on task ``t``; a learning curve set is ``(R, P)``: R runs x P aligned evaluation points. The stratified
bootstrap resamples runs with replacement within each task (never pools tasks) and takes percentile intervals.
A CI needs at least 2 runs: with one, every function here returns the point estimate and ``lo = hi = None``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from rliable import library as rly
from rliable import metrics as rlm

from diffrl.errors import ConfigError

DEFAULT_REPS = 2000
"""bootstrap resamples per interval: the percentile CI's Monte-Carlo error is then a small fraction of its width"""
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Bootstrap:
    """Settings of every stratified-bootstrap interval (percentile method)."""

    reps: int = DEFAULT_REPS
    """bootstrap resamples"""
    seed: int = DEFAULT_SEED
    """NumPy seed of the resampling; each interval starts from it, so a number never depends on what else is in
    the report"""
    confidence: float = DEFAULT_CONFIDENCE
    """coverage of the two-sided interval"""

    def __post_init__(self) -> None:
        if self.reps < 1:
            raise ConfigError(f"bootstrap reps={self.reps} must be >= 1 (e.g. {DEFAULT_REPS}).")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence={self.confidence} must be in (0, 1), e.g. {DEFAULT_CONFIDENCE}.")


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap CI; ``lo`` and ``hi`` are ``None`` when fewer than 2 runs give none."""

    value: float
    lo: float | None = None
    hi: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class Profile:
    """A performance profile: the fraction of runs (over all tasks) scoring above each threshold ``tau``."""

    taus: np.ndarray  # (K,)
    fraction: np.ndarray  # (K,)
    lo: np.ndarray | None  # (K,), None with one run
    hi: np.ndarray | None

    def to_dict(self) -> dict[str, list[float] | None]:
        return {k: None if v is None else [float(x) for x in v]
                for k, v in (("taus", self.taus), ("fraction", self.fraction), ("lo", self.lo), ("hi", self.hi))}


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences ``x[seed] - y[seed]`` over the seeds two arms share on one task, and their mean."""

    seeds: tuple[Hashable, ...]
    differences: tuple[float, ...]
    mean: Interval

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "differences": list(self.differences), "mean": self.mean.to_dict()}


@contextmanager
def _global_seed(seed: int) -> Iterator[None]:
    # rliable 1.2 draws its bootstrap indices with np.random.choice, NumPy's global RNG, and ignores random_state:
    # seed that for reproducible intervals, then give the caller's stream back untouched.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _intervals(func: Callable[..., np.ndarray], data: np.ndarray | list[np.ndarray],
               boot: Bootstrap) -> tuple[np.ndarray, np.ndarray]:
    """``func(data)`` and its percentile CI, ``(K,)`` and ``(2, K)``, by rliable's stratified bootstrap (an
    independent one per array when ``data`` is a list)."""
    with _global_seed(boot.seed):
        point, ci = rly.get_interval_estimates({"x": data}, func, method="percentile", reps=boot.reps,
                                               confidence_interval_size=boot.confidence)
    return np.atleast_1d(np.asarray(point["x"], dtype=np.float64)), np.asarray(ci["x"], dtype=np.float64)


def _matrix(scores: np.ndarray, name: str, ndim: int = 2) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != ndim or 0 in s.shape:
        want = "(runs, tasks)" if ndim == 2 else "(runs, points)"
        raise ConfigError(f"{name} must be a non-empty {want} matrix; got shape {s.shape}.")
    if not np.isfinite(s).all():
        raise ConfigError(f"{name} holds NaN or inf scores; leave those runs out before computing statistics.")
    return s


def aggregate_metrics(scores: np.ndarray, *, gap_threshold: float | None = None,
                      boot: Bootstrap = Bootstrap()) -> dict[str, Interval]:
    """IQM, mean, median and (with ``gap_threshold``) optimality gap of one arm's scores, with stratified-bootstrap
    CIs (rliable.metrics definitions).

    Args:
        scores: ``(R, T)`` final scores, R runs x T tasks.
        gap_threshold: score counted as optimal (gamma): 100 for D4RL normalised scores; ``None`` leaves the
            optimality gap out.
        boot: bootstrap settings.

    Returns:
        ``{"iqm", "mean", "median"[, "optimality_gap"]}``: IQM is the 25%-trimmed mean of all R*T scores pooled;
        mean and median are over tasks of the per-task mean; the gap is ``gamma - mean(min(scores, gamma))``.
    """
    s = _matrix(scores, "scores")
    fns: list[tuple[str, Callable[[np.ndarray], float]]] = [
        ("iqm", rlm.aggregate_iqm), ("mean", rlm.aggregate_mean), ("median", rlm.aggregate_median)]
    if gap_threshold is not None:
        fns.append(("optimality_gap", functools.partial(rlm.aggregate_optimality_gap, gamma=gap_threshold)))

    def all_metrics(x: np.ndarray) -> np.ndarray:  # one bootstrap for all four: same resamples, one pass
        return np.array([f(x) for _, f in fns], dtype=np.float64)

    if s.shape[0] < 2:
        return {name: Interval(float(v)) for (name, _), v in zip(fns, all_metrics(s))}
    point, ci = _intervals(all_metrics, s, boot)
    return {name: Interval(float(point[i]), float(ci[0, i]), float(ci[1, i])) for i, (name, _) in enumerate(fns)}


def improvement_probability(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y): the probability that a random run of X beats a random run of Y on the same task (ties count
    1/2), averaged over tasks; the Mann-Whitney U / (n m) that ``rliable.metrics.probability_of_improvement``
    computes, vectorised (scipy's mannwhitneyu also computes a p-value, ~1 ms per task per bootstrap resample).

    Args:
        x: ``(Rx, T)`` scores of arm X; y: ``(Ry, T)`` scores of arm Y on the same T tasks.
    """
    pairs_x, pairs_y = x[:, None, :], y[None, :, :]  # (Rx, 1, T) vs (1, Ry, T)
    per_task = (pairs_x > pairs_y).mean(axis=(0, 1)) + 0.5 * (pairs_x == pairs_y).mean(axis=(0, 1))  # (T,)
    return float(per_task.mean())


def probability_of_improvement(x: np.ndarray, y: np.ndarray, *, boot: Bootstrap = Bootstrap()) -> Interval:
    """P(X > Y) (:func:`improvement_probability`) with a CI from rliable's stratified bootstrap that resamples the
    runs of X and of Y independently within each task; no CI unless both arms have at least 2 runs.

    Args:
        x: ``(Rx, T)`` scores of arm X; y: ``(Ry, T)`` scores of arm Y on the same tasks, in the same order.
    """
    sx, sy = _matrix(x, "x"), _matrix(y, "y")
    if sx.shape[1] != sy.shape[1]:
        raise ConfigError(f"x and y must score the same tasks; got {sx.shape[1]} and {sy.shape[1]} task columns.")
    if min(sx.shape[0], sy.shape[0]) < 2:
        return Interval(improvement_probability(sx, sy))
    point, ci = _intervals(lambda a, b: np.array([improvement_probability(a, b)]), [sx, sy], boot)
    return Interval(float(point[0]), float(ci[0, 0]), float(ci[1, 0]))


def performance_profile(scores: np.ndarray, taus: np.ndarray, *, boot: Bootstrap = Bootstrap()) -> Profile:
    """The score distribution of one arm: fraction of all its runs (pooled over tasks) scoring above each ``tau``
    (rliable's run-score profile, Agarwal et al. 2021, Sec. 4.1), with pointwise stratified-bootstrap CIs.

    Args:
        scores: ``(R, T)`` final scores; taus: ``(K,)`` thresholds.
    """
    s, t = _matrix(scores, "scores"), np.asarray(taus, dtype=np.float64)

    def above(x: np.ndarray, tau_list: np.ndarray) -> np.ndarray:  # rliable's run_score_deviation for all taus
        return (x[..., None] > tau_list).reshape(-1, len(tau_list)).mean(axis=0)

    if s.shape[0] < 2:
        return Profile(t, above(s, t), None, None)
    with _global_seed(boot.seed):
        point, ci = rly.create_performance_profile({"x": s}, t, custom_profile_func=above, reps=boot.reps,
                                                   confidence_interval_size=boot.confidence)
    return Profile(t, np.asarray(point["x"], np.float64), np.asarray(ci["x"][0], np.float64),
                   np.asarray(ci["x"][1], np.float64))


def _seed_key(seed: Hashable) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, (int, float)) else (1, str(seed))


def paired_difference(x: Mapping[Hashable, float], y: Mapping[Hashable, float], *,
                      boot: Bootstrap = Bootstrap()) -> PairedDifference | None:
    """Per-seed paired differences of two arms on one task and their mean with a bootstrap CI over seeds.

    Args:
        x, y: final score by seed of arm X and arm Y on the same task.

    Returns:
        ``None`` when they share no seed; no CI with a single shared seed.
    """
    shared = sorted(set(x) & set(y), key=_seed_key)
    if not shared:
        return None
    d = np.array([float(x[s]) - float(y[s]) for s in shared])  # (S,)
    if len(d) < 2:
        mean = Interval(float(d.mean()))
    else:
        point, ci = _intervals(rlm.aggregate_mean, d[:, None], boot)  # (S, 1): seeds x one task
        mean = Interval(float(point[0]), float(ci[0, 0]), float(ci[1, 0]))
    return PairedDifference(tuple(shared), tuple(float(v) for v in d), mean)


def curve_band(curves: np.ndarray, *,
               boot: Bootstrap = Bootstrap()) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Mean learning curve over runs and its pointwise bootstrap CI band (runs resampled independently at each
    point, as rliable does for sample-efficiency curves).

    Args:
        curves: ``(R, P)``: R runs evaluated at the same P points.

    Returns:
        ``(mean, lo, hi)``, each ``(P,)``; ``lo`` and ``hi`` are ``None`` with one run.
    """
    c = _matrix(curves, "curves")
    if c.shape[0] < 2:
        return c[0].copy(), None, None
    mean, ci = _intervals(rlm.aggregate_mean, c[:, None, :], boot)  # (R, 1, P): one task, P points
    return mean, ci[0], ci[1]
