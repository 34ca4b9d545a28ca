"""The shared statistics: confidence intervals against published values and scipy, ROC figures and F1 against
sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ehr_diffusers.evaluation import stats as evaluation_stats
from ehr_diffusers.evaluation.stats import (
    binary_f1,
    bootstrap_interval,
    cut_to_range,
    fisher_z_interval,
    mean_interval,
    normal_interval,
    percentile_bootstrap,
    roc_curve,
    two_sample_bootstrap,
    wilson_interval,
)


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
    monkeypatch.setattr(evaluation_stats, "BOOTSTRAP_BLOCK_INDICES", 400 * 64)  # blocks of 64 resamples
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


def test_binary_f1_is_sklearns_per_column_and_nan_without_positives() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(5)
    predicted, labels = rng.random((200, 4)) < 0.3, rng.random((200, 4)) < [0.05, 0.2, 0.5, 0.0]
    predicted[:, 3] = False
    result = binary_f1(predicted, labels)
    for j in range(3):
        assert result[j] == pytest.approx(f1_score(labels[:, j], predicted[:, j]))
    assert np.isnan(result[3])
    # one target: the F1 of the positive class, not micro-F1 (accuracy)
    assert float(binary_f1(np.zeros(100, bool), np.arange(100) < 10)) == 0.0


def test_roc_curve_is_sklearns() -> None:
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    rng = np.random.default_rng(6)
    positive, negative = rng.integers(0, 8, 60).astype(float), rng.integers(2, 10, 80).astype(float)
    fpr, tpr = roc_curve(positive, negative)
    expected_fpr, expected_tpr, _ = sklearn_roc_curve(np.r_[np.ones(60), np.zeros(80)], np.r_[positive, negative],
                                                      drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)


def test_normal_interval_is_centred_and_cut_to_the_range() -> None:
    replicates = [0.1, 0.3, 0.2, 0.25]
    spread = evaluation_stats.Z_95 * np.std(replicates, ddof=1)
    assert normal_interval(0.2, replicates) == pytest.approx((0.2 - spread, 0.2 + spread))
    assert normal_interval(0.05, replicates, (0.0, 1.0)) == (0.0, pytest.approx(0.05 + spread))
    assert normal_interval(0.2, [0.1, None]) is None and normal_interval(0.2, [0.1]) is None
    assert cut_to_range((-0.5, 1.5), (0.0, 1.0)) == (0.0, 1.0)


def test_bootstrap_helpers_give_none_instead_of_a_partial_interval() -> None:
    values = np.arange(30, dtype=float)
    assert bootstrap_interval(lambda i: values[i].mean(), 30, 50, 0) == percentile_bootstrap(
        lambda i: values[i].mean(), 30, reps=50, seed=0)
    assert bootstrap_interval(lambda i: None if values[i].min() > 0 else 1.0, 30, 50, 0) is None
    assert bootstrap_interval(lambda i: 1.0, 1, 50, 0) is None
    low, high = two_sample_bootstrap(lambda a, b: a.mean() - b.mean(), values, values + 5, 200, 0)
    assert low < -5 < high
    assert two_sample_bootstrap(lambda a, b: 0.0, values[:1], values, 200, 0) is None
