"""Privacy of synthetic records against the real training split: membership inference and distance to closest record.

Distances are squared Euclidean over the schema vector: for 0/1 columns (sex, death, one-hot fields, codes) that is
the Hamming distance, for the scaled age and admission columns the squared difference, so theta = 5 means "about five
fields differ". Nearest neighbours come from chunked matrix products (|q|^2 + |r|^2 - 2 q.r), never from a loop over
record pairs.

* Membership inference (Choi et al. 2017, as in EHRDiff): members are train rows, non-members holdout rows, the same
  number of each (seeded sample). The attacker scores a record by its distance to the nearest synthetic record; a
  record within theta is called a member. Reported: F1 at theta = 5 and over a sweep of theta, ROC AUC (0.5 is
  chance), and the true-positive rate at 1% false-positive rate.
* Distance to closest record (DCR): for each synthetic record, whether its nearest real record is in train or in the
  holdout (equal-size samples; ties count one half). The share closer to train is 0.5 when the model does not copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

CHUNK_ROWS = 2048


def nearest_distances(queries: np.ndarray, references: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """For each query row, the squared Euclidean distance to its nearest reference row (float64, clipped at 0)."""
    queries, references = np.asarray(queries, np.float32), np.asarray(references, np.float32)
    if len(references) == 0:
        raise ValueError("nearest_distances needs at least one reference row")
    reference_norms = np.einsum("ij,ij->i", references, references)
    out = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), chunk_rows):
        block = queries[start : start + chunk_rows]
        squared = np.einsum("ij,ij->i", block, block)[:, None] + reference_norms[None, :] - 2.0 * block @ references.T
        out[start : start + len(block)] = np.clip(squared.min(axis=1), 0.0, None)
    return out


def roc_auc(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (the Mann-Whitney form of ROC AUC)."""
    ranks = stats.rankdata(np.concatenate([scores_positive, scores_negative]))
    n_pos, n_neg = len(scores_positive), len(scores_negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores_positive: np.ndarray, scores_negative: np.ndarray, fpr: float = 0.01) -> float:
    """The largest true-positive rate of a threshold rule "score > t" whose false-positive rate is at most ``fpr``."""
    allowed = int(np.floor(fpr * len(scores_negative)))
    ordered = np.sort(scores_negative)[::-1]
    # with t at the (allowed+1)-th largest negative score, at most ``allowed`` negatives score above it
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float((scores_positive > threshold).mean())


def _f1(members_called: np.ndarray, nonmembers_called: np.ndarray) -> float:
    true_positive = members_called.sum()
    false_positive = nonmembers_called.sum()
    false_negative = len(members_called) - true_positive
    denominator = 2 * true_positive + false_positive + false_negative
    return float(2 * true_positive / denominator) if denominator else 0.0


def _balanced(train: np.ndarray, holdout: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(train), len(holdout))
    return (train[rng.choice(len(train), n, replace=False)], holdout[rng.choice(len(holdout), n, replace=False)])


def membership_inference(
    train: np.ndarray,
    holdout: np.ndarray,
    synthetic: np.ndarray,
    theta: float = 5.0,
    sweep: tuple[float, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20),
    seed: int = 0,
) -> dict[str, Any]:
    """The distance attack above on equal numbers of train (members) and holdout (non-members) rows."""
    members, nonmembers = _balanced(np.asarray(train), np.asarray(holdout), np.random.default_rng(seed))
    if len(members) < 2:
        return {"reason": "fewer than 2 rows in train or holdout", "auc": None}
    member_distance = nearest_distances(members, synthetic)
    nonmember_distance = nearest_distances(nonmembers, synthetic)
    # rounding: distances of 0/1 vectors are whole numbers up to float error
    member_distance, nonmember_distance = member_distance.round(6), nonmember_distance.round(6)
    return {
        "members": len(members),
        "nonmembers": len(nonmembers),
        "theta": theta,
        "f1": _f1(member_distance <= theta, nonmember_distance <= theta),
        "f1_sweep": {str(t): _f1(member_distance <= t, nonmember_distance <= t) for t in sweep},
        "auc": roc_auc(-member_distance, -nonmember_distance),
        "tpr_at_1pct_fpr": tpr_at_fpr(-member_distance, -nonmember_distance, 0.01),
        "member_distances": member_distance,
        "nonmember_distances": nonmember_distance,
    }


def distance_to_closest_record(train: np.ndarray, holdout: np.ndarray, synthetic: np.ndarray,
                               seed: int = 0) -> dict[str, Any]:
    """Share of synthetic records nearer to train than to the holdout, with equal-size real samples (ideal 0.5)."""
    train_sample, holdout_sample = _balanced(np.asarray(train), np.asarray(holdout), np.random.default_rng(seed))
    to_train = nearest_distances(synthetic, train_sample).round(6)
    to_holdout = nearest_distances(synthetic, holdout_sample).round(6)
    share = float(((to_train < to_holdout) + 0.5 * (to_train == to_holdout)).mean())
    return {"share_closer_to_train": share, "real_rows_each": len(train_sample),
            "median_distance_to_train": float(np.median(to_train)),
            "median_distance_to_holdout": float(np.median(to_holdout))}
