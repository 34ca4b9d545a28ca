"""The controls every X-ray prediction figure is compared with: the events shuffled between triplets, and paired
differences between the same model with and without the true events.

An event effect is only real where the prediction with a triplet's own events beats the same model given another
triplet's events (EHRXDiff, arXiv 2409.07012, reports no such control; without it a model that ignores the events
looks good wherever findings do not change).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..stats import mean_interval


def derangement(n: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """A seeded permutation with no fixed point: triplet i takes the events of triplet ``result[i]`` != i.

    With ``groups`` (the subject of each triplet) no triplet takes the events of its own subject either, whose
    overlapping intervals would share events: the rows are laid out subject by subject (subjects, and the rows of
    each, in a seeded order) and each takes the events of the row as many places on as the largest subject has rows.
    """
    if n < 2:
        raise ValueError(f"shuffling events needs at least 2 triplets, got {n}")
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n)
        shift = 1
    else:
        labels = np.asarray(groups)
        if len(labels) != n:
            raise ValueError(f"groups has {len(labels)} labels for {n} triplets")
        subjects, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        shift = int(counts.max())
        if 2 * shift > n:
            raise ValueError(f"one subject holds {shift} of the {n} triplets: the events cannot be shuffled across "
                             "subjects")
        subject_order = rng.permutation(len(subjects))
        rows = [rng.permutation(np.flatnonzero(inverse == subject)) for subject in subject_order]
        order = np.concatenate(rows)
    result = np.empty(n, dtype=np.int64)
    result[order] = np.roll(order, -shift)
    return result


def paired_difference(difference: np.ndarray, reference: np.ndarray, clusters: np.ndarray | None = None
                      ) -> dict[str, Any]:
    """Mean difference (control minus true events) with a Student t 95% interval, relative to the mean reference, and
    the share of triplets where it is positive. With ``clusters`` (the subject of each triplet) the mean and its
    interval are over subject means (``mean_per_triplet`` keeps the plain mean): one patient's consecutive triplets
    are not independent."""
    difference = np.asarray(difference, dtype=np.float64)
    units = difference
    if clusters is not None:
        _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
        units = np.bincount(inverse, weights=difference) / np.bincount(inverse)
    low, high = mean_interval(units)
    return {"mean": float(units.mean()), "ci95": [low, high], "units": int(len(units)),
            "mean_per_triplet": float(difference.mean()), "relative": float(units.mean() / np.mean(reference)),
            "share_of_triplets_better_with_true": float((difference > 0).mean())}
