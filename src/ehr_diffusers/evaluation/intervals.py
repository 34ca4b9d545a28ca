"""95% confidence intervals shared by the evaluation modules: every reported figure carries one.

* ``wilson_interval``: the Wilson score interval of a proportion (Wilson 1927). Unlike the normal ("Wald") interval
  it stays inside [0, 1] and is not empty at 0/n or n/n, where accuracy and violation rates often sit.
* ``percentile_bootstrap``: the percentile interval of any statistic over index resamples of ``range(n)`` (Efron and
  Tibshirani 1993, ch. 13); the statistic gets the indices, so it can resample rows, prompts or patients.
* ``fisher_z_interval``: Pearson r over n items, through z = atanh(r) with standard error 1 / sqrt(n - 3).
* ``mean_interval``: Student's t interval of a mean (seeds of a benchmark, per-code figures).

All return plain ``(low, high)`` floats and raise ``ValueError`` when the interval does not exist (no trials, too
few items), so that callers report None with a reason instead of a NaN.
"""

from __future__ import annotations

import math
from typing import Callable

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
