"""Membership inference and distance to closest record: hand-computed distances, copies, independent data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from ehr_diffusers.evaluation.privacy import (
    distance_to_closest_record,
    membership_inference,
    nearest_distances,
    roc_auc,
    tpr_at_fpr,
)


def _population(n: int, seed: int, d: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, d)) < np.linspace(0.02, 0.5, d)).astype(np.float32)


def test_nearest_distances_by_hand_and_in_chunks() -> None:
    queries = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=np.float32)
    references = np.array([[1, 0, 0], [1, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(nearest_distances(queries, references), [1, 1, 0])
    scaled = np.array([[0.5, 1.0]], dtype=np.float32)
    assert nearest_distances(scaled, np.array([[0.0, 1.0]], np.float32))[0] == pytest.approx(0.25)
    big_q, big_r = _population(300, 1), _population(500, 2)
    brute = ((big_q[:, None, :] - big_r[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    np.testing.assert_allclose(nearest_distances(big_q, big_r, chunk_rows=7), brute, atol=1e-4)
    with pytest.raises(ValueError, match="at least one reference row"):
        nearest_distances(big_q, big_r[:0])


def test_auc_and_tpr_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    positive, negative = rng.normal(1.0, 1.0, 400).round(1), rng.normal(0.0, 1.0, 500).round(1)  # with ties
    labels = np.r_[np.ones(400), np.zeros(500)]
    assert roc_auc(positive, negative) == pytest.approx(roc_auc_score(labels, np.r_[positive, negative]))
    fpr, tpr, _ = roc_curve(labels, np.r_[positive, negative])
    expected = tpr[fpr <= 0.01].max()
    assert tpr_at_fpr(positive, negative, 0.01) <= expected + 1e-12
    assert tpr_at_fpr(positive, negative, 0.01) >= expected - 1 / 400 - 1e-12


def test_copies_of_training_rows_are_caught_and_independent_data_is_chance() -> None:
    train, holdout = _population(400, 10), _population(400, 11)
    copies = membership_inference(train, holdout, synthetic=train.copy())
    assert copies["auc"] > 0.95 and copies["tpr_at_1pct_fpr"] > 0.5 and copies["f1_sweep"]["0"] > 0.6
    assert distance_to_closest_record(train, holdout, train.copy())["share_closer_to_train"] > 0.95
    independent = _population(400, 12)
    fair = membership_inference(train, holdout, synthetic=independent)
    assert abs(fair["auc"] - 0.5) < 0.08 and fair["members"] == fair["nonmembers"] == 400
    assert abs(distance_to_closest_record(train, holdout, independent)["share_closer_to_train"] - 0.5) < 0.08


def test_f1_at_theta_by_hand_and_balanced_sampling() -> None:
    train = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.float32)
    holdout = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=np.float32)
    synthetic = np.array([[1, 1, 1, 1]], dtype=np.float32)
    result = membership_inference(train, holdout, synthetic, theta=1, seed=0)
    assert result["members"] == result["nonmembers"] == 2
    # members are at distance 0 and 4; every holdout row is at 2 or 1 -> called members only within theta = 1
    called_members = int((result["member_distances"] <= 1).sum())
    called_nonmembers = int((result["nonmember_distances"] <= 1).sum())
    expected = 2 * called_members / (2 * called_members + called_nonmembers + (2 - called_members))
    assert result["f1"] == pytest.approx(expected)
    assert membership_inference(train[:1], holdout, synthetic)["auc"] is None
