"""Confidence intervals against published values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ehr_diffusers.evaluation import intervals
from ehr_diffusers.evaluation.intervals import fisher_z_interval, mean_interval, percentile_bootstrap, wilson_interval


@pytest.mark.parametrize(
    ("successes", "total", "expected"),
    [
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (5, 10, (0.2366, 0.7634)),
        # Newcombe (1998), Statistics in Medicine 17:857-872, table II, method 3 (Wilson score)
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0, 0.1611)),
        (1, 29, (0.0061, 0.1718)),
    ],
)
def test_wilson_matches_published_values(successes: int, total: int, expected: tuple[float, float]) -> None:
    low, high = wilson_interval(successes, total)
    assert low == pytest.approx(expected[0], abs=5e-5) and high == pytest.approx(expected[1], abs=5e-5)


def test_wilson_is_exact_at_the_ends_and_rejects_bad_counts() -> None:
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    # the 99% interval is wider than the 95% one
    assert wilson_interval(5, 10, z=stats.norm.ppf(0.995))[0] < wilson_interval(5, 10)[0]
    with pytest.raises(ValueError, match="total > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_fisher_z_by_hand_and_against_scipy() -> None:
    half = 1.959964 / math.sqrt(28 - 3)
    low, high = fisher_z_interval(0.5, 28)
    assert low == pytest.approx(math.tanh(math.atanh(0.5) - half)) and low == pytest.approx(0.15603, abs=1e-5)
    assert high == pytest.approx(0.73582, abs=1e-5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(size=40)
    result = stats.pearsonr(x, y)
    expected = result.confidence_interval(0.95)
    assert fisher_z_interval(float(result.statistic), 40) == pytest.approx((expected.low, expected.high), abs=1e-6)
    assert fisher_z_interval(1.0, 10) == (1.0, 1.0)
    with pytest.raises(ValueError, match="n > 3"):
        fisher_z_interval(0.5, 3)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fisher_z_interval(1.5, 10)


def test_mean_interval_by_hand_and_against_scipy() -> None:
    # mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776445
    low, high = mean_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5 / 5)
    assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-5)
    assert (low, high) == pytest.approx((1.0368, 4.9632), abs=1e-4)
    values = np.random.default_rng(1).normal(2.0, 3.0, 12)
    expected = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean_interval(values) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([1.0])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, float("nan")])


def test_percentile_bootstrap_reproduces_its_resamples() -> None:
    values = np.random.default_rng(2).exponential(size=50)
    low, high = percentile_bootstrap(lambda idx: values[idx].mean(), len(values), reps=300, seed=4)
    # the same draws by hand: one (reps, n) block of integers from the seeded generator
    draws = np.random.default_rng(4).integers(0, 50, size=(300, 50))
    expected = np.quantile(values[draws].mean(axis=1), [0.025, 0.975])
    assert (low, high) == pytest.approx(tuple(expected))
    vectorised = percentile_bootstrap(lambda idx: values[idx].mean(axis=-1), len(values), reps=300, seed=4,
                                      vectorized=True)
    assert vectorised == pytest.approx((low, high))
    assert percentile_bootstrap(lambda idx: values[idx].mean(), 50, reps=300, seed=5) != (low, high)


def test_percentile_bootstrap_in_blocks_and_close_to_t(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(3).normal(10.0, 2.0, 400)
    statistic = lambda idx: values[idx].mean(axis=-1)  # noqa: E731
    whole = percentile_bootstrap(statistic, len(values), reps=1000, vectorized=True)
    t_low, t_high = mean_interval(values)
    assert whole[0] == pytest.approx(t_low, abs=0.05) and whole[1] == pytest.approx(t_high, abs=0.05)
    monkeypatch.setattr(intervals, "BOOTSTRAP_BLOCK_INDICES", 400 * 64)  # blocks of 64 resamples
    blocked_vectorised = percentile_bootstrap(statistic, len(values), reps=1000, vectorized=True)
    blocked_loop = percentile_bootstrap(lambda idx: values[idx].mean(), len(values), reps=1000)
    assert blocked_vectorised == pytest.approx(blocked_loop)
    assert blocked_vectorised[0] == pytest.approx(t_low, abs=0.05)


def test_percentile_bootstrap_rejects_bad_input() -> None:
    assert percentile_bootstrap(lambda idx: 3.0, 1) == (3.0, 3.0)
    with pytest.raises(ValueError, match="not finite on"):
        percentile_bootstrap(lambda idx: float("nan"), 5, reps=10)
    with pytest.raises(ValueError, match="one value per resample"):
        percentile_bootstrap(lambda idx: 1.0, 5, reps=10, vectorized=True)
    with pytest.raises(ValueError, match="n >= 1"):
        percentile_bootstrap(lambda idx: 1.0, 0)
    with pytest.raises(ValueError, match="alpha"):
        percentile_bootstrap(lambda idx: 1.0, 5, alpha=1.5)
