"""Fidelity metrics on hand-computed cases, identical data, and the seed system's mistakes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ehr_diffusers.data.schema import ColumnGroup, EHRSchema
from ehr_diffusers.evaluation.fidelity import (
    codes_per_patient,
    correlation_distance,
    correlation_matrix,
    fidelity,
    never_generated,
    pair_cooccurrence,
    prevalence,
)


def _schema() -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=20, maximum=90),
        ColumnGroup("num_admissions", "count", minimum=0, maximum=10),
        ColumnGroup("race", "one_hot", ["WHITE", "BLACK", "MISSING"]),
        ColumnGroup("icd10_categories", "multi_hot", ["A", "B", "C"]),
    ])


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"sex": rng.choice(["M", "F"]), "age": int(rng.integers(20, 91)), "num_admissions": int(rng.integers(0, 4)),
             "race": rng.choice(["WHITE", "BLACK", "MISSING"]),
             "icd10_categories": [c for c, p in zip("ABC", (0.5, 0.3, 0.1)) if rng.random() < p]} for _ in range(n)]


def test_prevalence_by_hand() -> None:
    real = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 1]], dtype=np.float32)       # 0.75, 0.5, 0.25
    synthetic = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=np.float32)  # 0.75, 0.5, 0.25
    result = prevalence(real, synthetic)
    assert result["pearson"]["value"] == pytest.approx(1.0) and result["mean_abs_diff_x1000"] == 0.0
    other = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=np.float32)      # 0.5, 0.25, 0.5
    result = prevalence(real, other)
    assert result["mean_abs_diff_x1000"] == pytest.approx((0.25 + 0.25 + 0.25) / 3 * 1000)
    assert result["pearson"]["value"] == pytest.approx(stats.pearsonr([0.75, 0.5, 0.25], [0.5, 0.25, 0.5])[0])
    assert result["spearman"]["value"] == pytest.approx(stats.spearmanr([0.75, 0.5, 0.25], [0.5, 0.25, 0.5])[0])
    flat = prevalence(real, np.ones_like(real))
    assert flat["pearson"] == {"value": None, "reason": "one side has no variance"}


def test_correlation_matrix_matches_numpy_and_cmd_by_hand() -> None:
    rng = np.random.default_rng(0)
    codes = (rng.random((200, 5)) < [0.5, 0.3, 0.2, 0.1, 0.4]).astype(np.float32)
    np.testing.assert_allclose(correlation_matrix(codes), np.corrcoef(codes.T), atol=1e-9)
    with_constant = np.concatenate([codes, np.zeros((200, 1), np.float32)], axis=1)
    corr = correlation_matrix(with_constant)
    assert corr[5, 5] == 1.0 and np.all(corr[5, :5] == 0.0)
    # two columns: real perfectly correlated, synthetic perfectly anti-correlated: difference 2 in two cells
    real = np.array([[1, 1], [0, 0], [1, 1], [0, 0]], dtype=np.float32)
    synthetic = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    result = correlation_distance(real, synthetic)
    assert result["frobenius"] == pytest.approx(np.sqrt(8)) and result["yan_scaled"] == pytest.approx(np.sqrt(8) / 4 * 1e6)
    assert correlation_distance(real, real)["frobenius"] == 0.0


def test_pairs_codes_per_patient_and_never_generated() -> None:
    real = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=np.float32)
    synthetic = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=np.float32)
    pairs = pair_cooccurrence(real, synthetic, top_k=2)
    # real pair rates: AB 0.5, AC 0.5, BC 0.25 -> the top two are AB and AC (stable order)
    assert pairs["indices"].tolist() == [[0, 1], [0, 2]]
    np.testing.assert_allclose(pairs["real_rates"], [0.5, 0.5])
    np.testing.assert_allclose(pairs["synthetic_rates"], [0.5, 0.0])
    counts = codes_per_patient(real, synthetic)
    assert counts["real_mean"] == 1.75 and counts["synthetic_mean"] == 1.25
    assert counts["wasserstein"] == pytest.approx(stats.wasserstein_distance([2, 3, 2, 0], [2, 0, 2, 1]))
    missing = never_generated(real, synthetic, ["A", "B", "C"])
    assert missing["codes"] == ["C"] and missing["count"] == 1 and missing["of_present"] == 3
    assert missing["real_occurrence_share"] == pytest.approx(2 / 7)


def test_identical_data_is_perfect_and_demographics_use_real_units() -> None:
    schema = _schema()
    real = schema.encode(_records(300, 1))
    result = fidelity(real, real.copy(), schema)
    assert result["prevalence"]["pearson"]["value"] == pytest.approx(1.0)
    assert result["correlation"]["frobenius"] == 0.0 and result["codes_per_patient"]["wasserstein"] == 0.0
    assert all(value.get("wasserstein", value.get("total_variation")) == 0.0
               for value in result["demographics"].values())
    # ages compared in years on both sides (the seed compared de-normalised synthetic ages with normalised real ones)
    older = [{**record, "age": min(record["age"] + 5, 90)} for record in _records(300, 1)]
    shifted = fidelity(real, schema.encode(older), schema)["demographics"]["age"]
    assert 4.0 < shifted["wasserstein"] <= 5.0 and shifted["synthetic_mean"] > shifted["real_mean"]
    everyone_white = [{**record, "race": "WHITE"} for record in _records(300, 1)]
    race = fidelity(real, schema.encode(everyone_white), schema)["demographics"]["race"]
    assert race["total_variation"] == pytest.approx(1 - race["real_shares"]["WHITE"])


def test_bad_input_is_named() -> None:
    schema = _schema()
    real = schema.encode(_records(10, 2))
    with pytest.raises(ValueError, match=r"synthetic vectors must have shape \(n, 9\)"):
        fidelity(real, real[:, :5], schema)
    with pytest.raises(ValueError, match="at least 2 real and synthetic records"):
        fidelity(real, real[:1], schema)
