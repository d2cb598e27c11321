"""diffrl.runs.stats: rliable's aggregate metrics and stratified-bootstrap CIs checked against NumPy-only
computations written here, probability of improvement, profiles, paired differences and curve bands."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rliable import metrics as rlm

from diffrl.errors import ConfigError
from diffrl.runs import stats
from diffrl.runs.stats import Bootstrap

# 5 runs x 2 tasks on different scales, the runs ranked alike on both tasks: a bootstrap that pools the tasks, or
# that resamples whole rows (runs jointly across tasks), gives clearly different intervals from the stratified one.
SCORES = np.array([[0.0, 100.0], [3.0, 104.0], [7.0, 109.0], [10.0, 111.0], [14.0, 118.0]])  # (R=5, T=2)


def numpy_iqm(scores: np.ndarray) -> np.ndarray:
    """IQM of each row of ``scores`` (B, n): the mean of the pooled scores left after cutting floor(n/4) from each
    end (scipy.stats.trim_mean(x, 0.25), which rliable.metrics.aggregate_iqm applies to the flattened matrix)."""
    s = np.sort(scores, axis=-1)
    k = int(0.25 * s.shape[-1])
    return s[..., k:s.shape[-1] - k].mean(axis=-1)


def stratified_bootstrap_iqm(x: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """IQM of ``reps`` stratified resamples: within each task, R runs drawn with replacement from that task's."""
    r, t = x.shape
    idx = rng.integers(0, r, size=(reps, r, t))  # run index per (resample, slot, task)
    return numpy_iqm(x[idx, np.arange(t)].reshape(reps, r * t))


def _covers(reference: np.ndarray, value: float, p: float, tol: float) -> bool:
    """Whether ``value`` is a ``p``-quantile of the empirical distribution ``reference`` up to ``tol`` in
    probability; the distribution is discrete, so compare both sides of the jump at ``value``."""
    return bool(np.mean(reference < value) <= p + tol and np.mean(reference <= value) >= p - tol)


def test_iqm_point_estimate_is_the_mean_of_the_middle_of_the_pooled_scores():
    got = stats.aggregate_metrics(SCORES, boot=Bootstrap(reps=50))["iqm"].value
    # 10 pooled scores, 2 cut from each end: 7, 10, 14, 100, 104, 109
    assert got == pytest.approx(np.mean([7.0, 10.0, 14.0, 100.0, 104.0, 109.0]))
    assert got == pytest.approx(float(numpy_iqm(SCORES.ravel())))


def test_iqm_ci_is_the_stratified_bootstrap_percentile_interval_within_monte_carlo_error():
    # rliable's resamples come from NumPy's global RNG, ours from a Generator: the draws differ, so compare the
    # interval ends as quantiles. A p-quantile estimated from B resamples sits at probability p +- sqrt(p(1-p)/B)
    # under the bootstrap distribution; both estimates carry that error, and we allow 4 standard deviations.
    reps, ref_reps, p = 2000, 50_000, 0.025
    ci = stats.aggregate_metrics(SCORES, boot=Bootstrap(reps=reps, seed=1))["iqm"]
    reference = stratified_bootstrap_iqm(SCORES, ref_reps, np.random.default_rng(7))
    tol = 4 * math.sqrt(p * (1 - p) * (1 / reps + 1 / ref_reps))
    assert _covers(reference, ci.lo, p, tol) and _covers(reference, ci.hi, 1 - p, tol)
    # the check has power: the intervals of the two wrong bootstraps fail it
    rng = np.random.default_rng(8)
    r, t = SCORES.shape
    rows = numpy_iqm(SCORES[rng.integers(0, r, size=(ref_reps, r))].reshape(ref_reps, r * t))  # runs jointly
    pooled = numpy_iqm(rng.choice(SCORES.ravel(), size=(ref_reps, r * t)))  # tasks mixed
    for wrong in (rows, pooled):
        lo, hi = np.percentile(wrong, [100 * p, 100 * (1 - p)])
        assert not (_covers(reference, lo, p, tol) and _covers(reference, hi, 1 - p, tol))


def test_mean_median_and_optimality_gap_follow_rliables_definitions_in_numpy():
    x = np.array([[10.0, 50.0, 120.0], [30.0, 70.0, 80.0]])  # (R=2, T=3); per-task means 20, 60, 100
    res = stats.aggregate_metrics(x, gap_threshold=100.0, boot=Bootstrap(reps=50))
    assert res["mean"].value == pytest.approx(60.0)
    assert res["median"].value == pytest.approx(60.0)  # median over tasks of the per-task means
    assert res["optimality_gap"].value == pytest.approx(100 - np.mean([10, 50, 100, 30, 70, 80]))  # clipped at 100
    assert "optimality_gap" not in stats.aggregate_metrics(x, boot=Bootstrap(reps=50))
    for iv in res.values():
        assert iv.lo is not None and iv.hi is not None and iv.lo <= iv.value <= iv.hi


def test_probability_of_improvement_is_one_when_every_run_of_x_beats_every_run_of_y():
    x = np.array([[10.0, 5.0], [11.0, 6.0], [12.0, 7.0]])
    y = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0], [4.0, 3.0]])
    p = stats.probability_of_improvement(x, y, boot=Bootstrap(reps=200))
    assert (p.value, p.lo, p.hi) == (1.0, 1.0, 1.0)  # every resample keeps X above Y
    assert stats.probability_of_improvement(y, x, boot=Bootstrap(reps=200)).value == 0.0
    assert stats.probability_of_improvement(x, x, boot=Bootstrap(reps=200)).value == 0.5


def test_improvement_probability_equals_rliables_mann_whitney_version_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 4, size=(rng.integers(1, 6), 3)).astype(float)  # small integers: many ties
        y = rng.integers(0, 4, size=(rng.integers(1, 6), 3)).astype(float)
        assert stats.improvement_probability(x, y) == pytest.approx(rlm.probability_of_improvement(x, y))


def test_one_run_gives_point_estimates_and_no_interval():
    res = stats.aggregate_metrics(SCORES[:1], gap_threshold=50.0)
    assert res["iqm"].value == pytest.approx(50.0) and all(iv.lo is None and iv.hi is None for iv in res.values())
    p = stats.probability_of_improvement(SCORES[:1], SCORES[1:])
    assert p.value == 0.0 and p.lo is None
    profile = stats.performance_profile(SCORES[:1], np.array([50.0]))
    assert profile.fraction.tolist() == [0.5] and profile.lo is None
    mean, lo, hi = stats.curve_band(np.array([[1.0, 2.0]]))
    assert mean.tolist() == [1.0, 2.0] and lo is None and hi is None


def test_same_seed_gives_the_same_interval_and_the_global_numpy_stream_is_left_alone():
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    a = stats.aggregate_metrics(SCORES, boot=Bootstrap(reps=300, seed=5))["iqm"]
    assert np.random.random() == expected_next  # rliable drew from the global RNG; its state was put back
    b = stats.aggregate_metrics(SCORES, boot=Bootstrap(reps=300, seed=5))["iqm"]
    c = stats.aggregate_metrics(SCORES, boot=Bootstrap(reps=300, seed=6))["iqm"]
    assert (a.lo, a.hi) == (b.lo, b.hi) and (a.lo, a.hi) != (c.lo, c.hi)


def test_paired_difference_uses_only_the_shared_seeds_in_seed_order():
    x = {0: 10.0, 1: 12.0, 2: 15.0, 10: 20.0}
    y = {10: 18.0, 2: 14.0, 0: 9.0, 7: 0.0}
    d = stats.paired_difference(x, y, boot=Bootstrap(reps=200))
    assert d is not None and d.seeds == (0, 2, 10) and d.differences == (1.0, 1.0, 2.0)
    assert d.mean.value == pytest.approx(4 / 3)
    assert 1.0 <= d.mean.lo <= d.mean.value <= d.mean.hi <= 2.0  # a mean of resampled differences
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None
    one = stats.paired_difference({0: 3.0, 1: 1.0}, {0: 1.0})
    assert one is not None and one.mean.value == 2.0 and one.mean.lo is None


def test_performance_profile_is_the_fraction_of_all_runs_above_each_threshold():
    taus = np.array([-1.0, 5.0, 105.0, 200.0])
    prof = stats.performance_profile(SCORES, taus, boot=Bootstrap(reps=200))
    assert prof.fraction.tolist() == [1.0, 0.8, 0.3, 0.0]  # of the 10 scores: 8 above 5, 3 above 105
    assert prof.lo is not None and prof.hi is not None
    assert np.all(prof.lo <= prof.fraction) and np.all(prof.fraction <= prof.hi)
    assert prof.lo[0] == prof.hi[0] == 1.0 and prof.lo[-1] == prof.hi[-1] == 0.0


def test_curve_band_is_the_mean_over_runs_with_a_band_inside_the_runs_range():
    curves = np.array([[0.0, 10.0, 20.0], [2.0, 14.0, 20.0], [4.0, 12.0, 20.0]])  # (R=3, P=3)
    mean, lo, hi = stats.curve_band(curves, boot=Bootstrap(reps=300))
    assert mean.tolist() == pytest.approx([2.0, 12.0, 20.0])
    assert lo is not None and hi is not None
    assert np.all(curves.min(0) <= lo) and np.all(lo <= mean) and np.all(mean <= hi)
    assert np.all(hi <= curves.max(0)) and lo[2] == hi[2] == 20.0 and hi[0] > lo[0]


def test_bad_inputs_raise_config_errors_that_say_what_is_wrong():
    with pytest.raises(ConfigError, match=r"\(runs, tasks\)"):
        stats.aggregate_metrics(np.arange(4.0))
    with pytest.raises(ConfigError, match="NaN"):
        stats.aggregate_metrics(np.array([[1.0], [np.nan]]))
    with pytest.raises(ConfigError, match="same tasks"):
        stats.probability_of_improvement(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ConfigError, match="reps=0"):
        Bootstrap(reps=0)
