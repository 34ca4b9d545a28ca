"""The statistics every evaluation shares, whatever the modality: 95% confidence intervals, rank and threshold
figures of a two-class score, and F1. Every reported figure carries an interval from here.

* ``wilson_interval``: the Wilson score interval of a proportion (Wilson 1927). Unlike the normal ("Wald") interval
  it stays inside [0, 1] and is not empty at 0/n or n/n, where accuracy and violation rates often sit.
* ``percentile_bootstrap``: the percentile interval of any statistic over index resamples of ``range(n)`` (Efron and
  Tibshirani 1993, ch. 13); the statistic gets the indices, so it can resample rows, prompts or patients.
  ``bootstrap_interval`` is the same, None where a resample has no value; ``two_sample_bootstrap`` resamples two
  samples independently.
* ``normal_interval``: estimate +- 1.96 bootstrap standard errors, for distances whose percentile interval sits beside
  the estimate; ``cut_to_range`` keeps a symmetric interval inside the range its figure can take.
* ``fisher_z_interval``: Pearson r over n items, through z = atanh(r) with standard error 1 / sqrt(n - 3).
* ``mean_interval``: Student's t interval of a mean (seeds of a benchmark, per-code figures).
* ``roc_auc`` (Mann-Whitney), ``roc_curve`` and ``tpr_at_fpr`` of scores of positives against negatives;
  ``binary_f1``, the F1 of the positive class.

``figure`` is the one form of a reported number, in every modality: value, split, interval and its method, or
None with the reason.

The intervals are plain ``(low, high)`` floats. When one does not exist (no trials, too few items) the interval
functions raise ``ValueError`` and ``bootstrap_interval``, ``two_sample_bootstrap`` and ``normal_interval`` return
None, so that callers report None with a reason instead of a NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

Z_95 = 1.959964  # the 0.975 quantile of the standard normal
# Index resamples are drawn and, for a vectorised statistic, evaluated in blocks of at most this many indices.
BOOTSTRAP_BLOCK_INDICES = 1 << 22


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of ``successes`` out of ``total`` trials."""
    if total <= 0:
        raise ValueError(f"wilson_interval needs total > 0, got total={total}")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must lie in [0, total={total}], got {successes}")
    p = successes / total
    z2 = z * z
    denominator = 1.0 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / total + z2 / (4 * total * total))
    # at 0/n and n/n the bound equals p exactly in exact arithmetic; set it, rather than keep the rounding error
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


def percentile_bootstrap(
    statistic: Callable[[np.ndarray], float | np.ndarray],
    n: int,
    reps: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    vectorized: bool = False,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over ``reps`` resamples (with replacement) of the indices ``range(n)``.

    ``statistic(indices)`` gets one int64 index array of length ``n`` per resample and returns a number. With
    ``vectorized=True`` it instead gets a block of resamples, an array of shape (block, n), and returns one number per
    row (e.g. ``lambda idx: values[idx].mean(axis=-1)``): one call per block of at most ``BOOTSTRAP_BLOCK_INDICES``
    indices rather than one per resample. Both forms draw the same resamples for the same seed, so they agree.
    A statistic that is not finite on some resample is an error, never silently dropped.
    """
    if n < 1:
        raise ValueError(f"percentile_bootstrap needs n >= 1, got {n}")
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    block = max(1, min(reps, BOOTSTRAP_BLOCK_INDICES // n))
    values = np.empty(reps, dtype=np.float64)
    for start in range(0, reps, block):
        count = min(block, reps - start)
        indices = rng.integers(0, n, size=(count, n))
        if vectorized:
            result = np.asarray(statistic(indices), dtype=np.float64)
            if result.shape != (count,):
                raise ValueError(f"a vectorized statistic must return one value per resample, shape ({count},); "
                                 f"got shape {result.shape}")
            values[start : start + count] = result
        else:
            values[start : start + count] = [float(statistic(row)) for row in indices]
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise ValueError(f"statistic was not finite on {bad} of {reps} bootstrap resamples")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def fisher_z_interval(r: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Interval of a Pearson correlation ``r`` over ``n`` items by Fisher's z transform (needs n > 3)."""
    if n <= 3:
        raise ValueError(f"fisher_z_interval needs n > 3 items, got n={n}")
    if not -1.0 <= r <= 1.0 or math.isnan(r):
        raise ValueError(f"r must lie in [-1, 1], got {r}")
    if abs(r) == 1.0:  # atanh is infinite: a perfect correlation has a degenerate interval
        return float(r), float(r)
    centre, half = math.atanh(r), z / math.sqrt(n - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


def mean_interval(values: np.ndarray | list[float], alpha: float = 0.05) -> tuple[float, float]:
    """Student's t interval of the mean of ``values`` (needs at least 2 finite values)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if len(array) < 2:
        raise ValueError(f"mean_interval needs at least 2 values, got {len(array)}")
    if not np.isfinite(array).all():
        raise ValueError("values hold NaN or infinite entries")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    mean = float(array.mean())
    half = float(stats.t.ppf(1 - alpha / 2, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return mean - half, mean + half


def bootstrap_interval(statistic: Callable[[np.ndarray], float | None], n: int, reps: int, seed: int
                       ) -> tuple[float, float] | None:
    """:func:`percentile_bootstrap` of ``statistic`` over resamples of range(n); None when a resample has no value
    (e.g. a constant side) or there are too few rows to resample."""
    if n < 2 or reps < 2:
        return None

    def finite(indices: np.ndarray) -> float:
        value = statistic(indices)
        return np.nan if value is None else float(value)

    try:
        return percentile_bootstrap(finite, n, reps=reps, seed=seed)
    except ValueError:  # a resample without a value: no interval rather than one over the lucky resamples
        return None


def two_sample_bootstrap(statistic: Callable[[np.ndarray, np.ndarray], float], first: np.ndarray,
                         second: np.ndarray, reps: int, seed: int) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(first*, second*)`` with both samples resampled independently; None when
    either has fewer than 2 items."""
    if min(len(first), len(second)) < 2 or reps < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(first[rng.integers(0, len(first), len(first))],
                                 second[rng.integers(0, len(second), len(second))]) for _ in range(reps)])
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def cut_to_range(interval: tuple[float, float], support: tuple[float, float]) -> tuple[float, float]:
    """``interval`` cut to ``support``, the range its figure can take, so that a symmetric interval (normal bootstrap,
    t over seeds) does not claim, say, a negative distance."""
    return max(interval[0], support[0]), min(interval[1], support[1])


def normal_interval(estimate: float, replicates: list[float | None],
                    support: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float] | None:
    """estimate +- 1.96 bootstrap standard errors, cut to ``support``; None when a replicate had no value or there
    are too few.

    Distances between samples (CMD, Wasserstein, 1 - r) grow with the sampling noise that resampling adds, so their
    percentile intervals sit beside the estimate rather than around it; the normal interval keeps it centred
    (Efron and Tibshirani 1993, ch. 13)."""
    if len(replicates) < 2 or any(value is None for value in replicates):
        return None
    spread = Z_95 * float(np.std(np.asarray(replicates, dtype=np.float64), ddof=1))
    return cut_to_range((estimate - spread, estimate + spread), support)


def roc_auc(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (the Mann-Whitney form of ROC AUC)."""
    ranks = stats.rankdata(np.concatenate([scores_positive, scores_negative]))
    n_pos, n_neg = len(scores_positive), len(scores_negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores_positive: np.ndarray, scores_negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the rules "score >= t", one point per distinct score (tied scores move
    together), from (0, 0) to (1, 1)."""
    scores = np.concatenate([scores_positive, scores_negative])
    labels = np.concatenate([np.ones(len(scores_positive)), np.zeros(len(scores_negative))])
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tpr = np.r_[0, np.cumsum(sorted_labels)[last_of_tie] / max(len(scores_positive), 1)]
    fpr = np.r_[0, np.cumsum(1 - sorted_labels)[last_of_tie] / max(len(scores_negative), 1)]
    return fpr, tpr


def tpr_at_fpr(scores_positive: np.ndarray, scores_negative: np.ndarray, fpr: float = 0.01) -> float:
    """The largest true-positive rate of a threshold rule "score > t" whose false-positive rate is at most ``fpr``."""
    allowed = int(np.floor(fpr * len(scores_negative)))
    ordered = np.sort(scores_negative)[::-1]
    # with t at the (allowed+1)-th largest negative score, at most ``allowed`` negatives score above it
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float((scores_positive > threshold).mean())


def binary_f1(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """F1 of the positive class, 2 TP / (2 TP + FP + FN), per column (along the first axis; a 0-d array for 1-D
    input); NaN where no item is predicted or labelled positive. Not micro-F1, which on one binary target is
    accuracy."""
    predicted, labels = np.asarray(predicted, dtype=bool), np.asarray(labels, dtype=bool)
    true_positive = (predicted & labels).sum(axis=0)
    denominator = predicted.sum(axis=0) + labels.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * true_positive / np.where(denominator > 0, denominator, 1), np.nan)


def figure(value: Any, split: str | None, ci: tuple[float, float] | list[float] | None = None,
           method: str | None = None, reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """One reported number: its value, the real split it used, its 95% CI and how that was made; a figure that could
    not be computed has value None and the reason."""
    if value is None:
        return {"value": None, "split": split, "ci95": None, "reason": reason or "not computed", **extra}
    value = float(value) if not isinstance(value, (int, np.integer)) or isinstance(value, bool) else int(value)
    if ci is None:
        return {"value": value, "split": split, "ci95": None,
                "ci_method": f"no interval ({reason or 'too few rows or replicates without a value'})", **extra}
    return {"value": value, "split": split, "ci95": [float(ci[0]), float(ci[1])], "ci_method": method, **extra}
