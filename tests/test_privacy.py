"""Privacy: sparse nearest neighbours against brute force, membership inference, the memorisation audit (distance
to closest record, exact copies) and attribute inference on hand-computed cases, copies and independent data,
cross-checked against sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema
from ehr_diffusers.evaluation.ehr.privacy import (
    attribute_bootstrap,
    attribute_f1,
    attribute_inference,
    binary_entropy,
    distance_to_closest_record,
    exact_copies,
    membership_f1,
    membership_inference,
    memorisation,
    nearest_distances,
    nearest_jaccard,
    nearest_neighbours,
    privacy,
)
from ehr_diffusers.evaluation.ehr.vectors import as_csr
from ehr_diffusers.evaluation.stats import roc_auc, tpr_at_fpr


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


# ----------------------------------------------------------------------------- sparse nearest neighbours vs brute force
def _schema(codes: int = 4) -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=0, maximum=100),
        ColumnGroup("num_admissions", "count", minimum=0, maximum=10),
        ColumnGroup("icd10_categories", "multi_hot", [f"C{i:02d}" for i in range(codes)]),
    ])


def _records(n: int, seed: int, codes: int = 40, grid: int | None = None) -> np.ndarray:
    """Schema vectors: sex, age and admissions in [0, 1] (on a grid of 1/grid when given, exact in float32), codes
    with prevalence 2% to 50%."""
    rng = np.random.default_rng(seed)
    continuous = rng.random((n, 2)) if grid is None else rng.integers(0, grid + 1, (n, 2)) / grid
    return np.column_stack([rng.random(n) < 0.5, continuous[:, 0], continuous[:, 1],
                            rng.random((n, codes)) < np.linspace(0.02, 0.5, codes)]).astype(np.float32)


def _brute(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    q, r = queries.astype(np.float64), references.astype(np.float64)
    return ((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2)


def test_sparse_nearest_neighbours_equal_brute_force_with_continuous_columns() -> None:
    # continuous values on a 1/8 grid: every distance is exact in float32, so values and tie-breaking must match
    queries, references = _records(300, 1, grid=8), _records(700, 2, grid=8)  # 700 rows: several table blocks
    pairs = _brute(queries, references)
    distance, index = nearest_neighbours(queries, references, chunk_rows=37)
    np.testing.assert_array_equal(distance, pairs.min(axis=1))
    np.testing.assert_array_equal(index, pairs.argmin(axis=1))  # the lowest index among ties, like numpy
    assert (pairs == pairs.min(axis=1, keepdims=True)).sum(axis=1).max() > 1  # ties did occur
    # arbitrary continuous values: float32 rounding only
    queries, references = _records(200, 3), _records(300, 4)
    np.testing.assert_allclose(nearest_distances(queries, references), _brute(queries, references).min(axis=1),
                               atol=1e-5)
    # scipy sparse input gives the same answer as dense
    np.testing.assert_array_equal(nearest_distances(sp.csr_matrix(queries), references),
                                  nearest_distances(queries, references))


def test_worker_threads_give_the_same_answer_and_restore_torch_threads() -> None:
    queries, references = _records(500, 5, grid=8), _records(400, 6, grid=8)
    previous = torch.get_num_threads()
    default = nearest_neighbours(queries, references)
    torch.set_num_threads(3)
    try:
        three = nearest_neighbours(queries, references)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(default[0], three[0])
    np.testing.assert_array_equal(default[1], three[1])


def _brute_jaccard(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    q, r = (queries >= 0.5).astype(np.float64), (references >= 0.5).astype(np.float64)
    shared = q @ r.T
    union = q.sum(axis=1)[:, None] + r.sum(axis=1)[None, :] - shared
    return np.where(union > 0, 1 - shared / np.maximum(union, 1), 0.0)


def test_nearest_jaccard_equals_brute_force_with_empty_sets() -> None:
    queries, references = _population(300, 30, d=30), _population(700, 31, d=30)
    queries[:4], references[5] = 0.0, 0.0  # empty sets: 0 from each other, 1 from any other set
    np.testing.assert_allclose(nearest_jaccard(queries, references, chunk_rows=23),
                               _brute_jaccard(queries, references).min(axis=1), atol=1e-6)
    assert (nearest_jaccard(queries[:4], references) == 0).all()
    assert (nearest_jaccard(queries[:4], references[:5]) == 1).all()
    assert nearest_jaccard(np.array([[1, 1, 0, 0]], np.float32), np.array([[1, 0, 1, 0]], np.float32))[0] == (
        pytest.approx(2 / 3))


def test_dcr_uses_code_sets_against_a_train_sample_as_large_as_the_holdout() -> None:
    schema = _schema(40)
    train, holdout, synthetic = _records(150, 7), _records(150, 8), _records(120, 9)
    result = distance_to_closest_record(train, holdout, synthetic, schema=schema)
    # equal sizes: the train sample is the whole split; demographics (columns 0-2) play no part
    codes = slice(3, None)
    np.testing.assert_allclose(result["distances_to_train"],
                               _brute_jaccard(synthetic[:, codes], train[:, codes]).min(axis=1), atol=1e-6)
    np.testing.assert_allclose(result["distances_to_holdout"],
                               _brute_jaccard(synthetic[:, codes], holdout[:, codes]).min(axis=1), atol=1e-6)
    assert result["share_closer_to_train"] == pytest.approx(result["closer_to_train"].mean())
    assert result["train_rows"] == result["holdout_rows"] == 150
    larger = distance_to_closest_record(_records(400, 10), holdout, synthetic, schema=schema)
    assert larger["train_rows"] == 150  # sampled down to the holdout's size
    capped = distance_to_closest_record(train, holdout, synthetic, schema=schema, max_synthetic=50)
    assert (capped["synthetic_rows"], capped["synthetic_rows_given"], len(capped["closer_to_train"])) == (50, 120, 50)
    # a synthetic record at equal distance from both sides counts one half
    tie = np.array([[1, 1, 0, 0]], np.float32)
    both = np.array([[1, 0, 0, 0]], np.float32)
    assert distance_to_closest_record(both, both, tie)["share_closer_to_train"] == 0.5
    copies = membership_inference(train, holdout, train.copy(), schema=schema)
    assert (copies["member_distances"] == 0).all() and copies["f1_sweep"]["0"] == pytest.approx(1.0)


def test_exact_copies_count_code_sets_of_two_or_more_codes() -> None:
    train = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]], np.float32)
    records = np.array([[1, 1, 0, 0],     # a copy of train row 0
                        [0.9, 0.6, 0.2, 0],  # the same set at >= 0.5
                        [1, 1, 1, 0],     # a superset: no copy
                        [0, 0, 1, 0],     # one code: not counted
                        [0, 0, 0, 0]], np.float32)
    result = exact_copies(records, train)
    assert (result["copies"], result["eligible"], result["records"], result["rate"]) == (2, 3, 5, pytest.approx(2 / 3))
    assert exact_copies(records[3:], train)["rate"] is None and "at least 2 codes" in exact_copies(records[3:],
                                                                                                   train)["reason"]


def test_memorisation_audit_catches_copies_and_passes_fresh_records() -> None:
    """Copies of train records: copy rate 1 and DCR share near 1. A fresh sample of the same distribution: DCR share
    near 0.5 and a copy rate near the holdout's own."""
    schema = _schema(40)
    train, holdout = _records(400, 32), _records(400, 33)
    copies = memorisation(train, holdout, train[::2].copy(), schema)
    assert copies["exact_copies"]["synthetic"]["rate"] == 1.0
    assert copies["distance_to_closest_record"]["share_closer_to_train"] > 0.95
    fresh = memorisation(train, holdout, _records(400, 34), schema)
    assert abs(fresh["distance_to_closest_record"]["share_closer_to_train"] - 0.5) < 0.08
    reference = fresh["exact_copies"]["holdout"]
    assert reference["eligible"] > 350
    assert abs(fresh["exact_copies"]["synthetic"]["rate"] - reference["rate"]) < 0.05


# ------------------------------------------------------------------------------------------------ attribute inference
def _hand_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns: sex, age, admissions, codes A B C D. A is the most common code in train, so with known_codes=1 the
    attacker knows sex, age, admissions and A."""
    def row(sex: int, age: float, codes: str) -> list[float]:
        return [sex, age, 0.0] + [float(c in codes) for c in "ABCD"]

    train = [row(1, 0.5, "AB"), row(0, 0.25, "AC"), row(1, 0.0, "D")]
    synthetic = [row(1, 0.5, "ABC"), row(0, 0.25, "A"), row(1, 0.0, "AD"), row(1, 0.5, "AD")]  # rows 0, 3 tie
    holdout = [row(1, 0.5, "AD"), row(0, 0.25, "AC"), row(1, 0.0, ""), row(0, 1.0, "B")]
    return tuple(np.array(x, dtype=np.float32) for x in (train, holdout, synthetic))


def test_attribute_inference_by_hand() -> None:
    train, holdout, synthetic = _hand_case()
    result = attribute_inference(train, holdout, synthetic, _schema(), known_codes=1)
    assert result["known_columns"] == 4 and result["unknown_codes"] == 3 and result["victims"] == 3
    np.testing.assert_array_equal(result["unknown_code_columns"], [4, 5, 6])  # B, C, D
    # every unknown code is in 1 of 3 train rows: equal weights H(1/3), so the figure is the plain mean of F1s.
    # Victim 0 -> synthetic 0 (distance 0, tied with row 3: the lower index wins): predicts B, C (true B);
    # victim 1 -> synthetic 1: predicts nothing (true C); victim 2 -> synthetic 2 (1 < 1.25 < 2.0625): predicts D.
    # F1: B 1, C 0 (one false positive, one false negative), D 1.
    assert result["f1"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(result["predicted"].toarray(), [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    # Baseline: victim 0 -> holdout 0 predicts D (true B), victim 1 -> holdout 1 predicts C, victim 2 -> holdout 2
    # predicts nothing (true D). F1: B 0, C 1, D 0.
    assert result["baseline_f1"] == pytest.approx(1 / 3)
    assert result["difference"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(result["weights"], binary_entropy(np.full(3, 1 / 3)))
    assert binary_entropy(np.array([0.5, 0.0, 1.0])).tolist() == [1.0, 0.0, 0.0]


def test_attribute_inference_on_copies_is_perfect_and_the_holdout_baseline_is_not() -> None:
    train, holdout = _records(300, 10), _records(300, 11)
    result = attribute_inference(train, holdout, train.copy(), _schema(40), known_codes=8)
    assert result["f1"] == 1.0
    assert result["baseline_f1"] < 0.6 and result["difference"] > 0.4
    assert result["known_columns"] == 3 + 8 and result["unknown_codes"] == 32


def test_attribute_f1_matches_sklearn_and_resamples_victims() -> None:
    train, holdout, synthetic = _records(400, 12), _records(400, 13), _records(400, 14)
    train[:, 3] = 1.0  # a code present in every train row and one never present: weight 0, they drop out
    train[:, 4] = 0.0
    result = attribute_inference(train, holdout, synthetic, _schema(40), known_codes=0)  # demographics only
    true, predicted, weights = result["true"].toarray(), result["predicted"].toarray(), result["weights"]
    prevalence = train[:, result["unknown_code_columns"]].mean(axis=0)
    expected_weights = np.array([stats.entropy([p, 1 - p], base=2) for p in prevalence])
    np.testing.assert_allclose(weights, expected_weights, atol=1e-12)
    assert result["weighted_codes"] == int((expected_weights > 0).sum()) == result["unknown_codes"] - 2
    f1 = np.array([f1_score(true[:, j], predicted[:, j], zero_division=0) for j in range(true.shape[1])])
    assert result["f1"] == pytest.approx((weights * f1).sum() / weights.sum())
    # bootstrap resamples of victims: the figure recomputed on the resampled rows, where codes that no resampled
    # victim has or is predicted to have (F1 = 0/0) drop out
    for rows in (np.random.default_rng(0).integers(0, len(true), len(true)), np.array([0, 0, 1, 2])):
        resampled_true, resampled_predicted = true[rows], predicted[rows]
        defined = (resampled_true.sum(axis=0) + resampled_predicted.sum(axis=0) > 0) & (weights > 0)
        f1 = np.array([f1_score(resampled_true[:, j], resampled_predicted[:, j], zero_division=0)
                       for j in range(true.shape[1])])
        expected = (weights[defined] * f1[defined]).sum() / weights[defined].sum()
        assert attribute_f1(result["true"], result["predicted"], weights, rows) == pytest.approx(expected)
    assert not defined.all()  # the small resample did lose codes
    assert attribute_f1(result["true"], result["predicted"], weights, np.arange(len(true))) == pytest.approx(
        result["f1"])


def test_attribute_bootstrap_replicates_are_attribute_f1_on_resampled_victims() -> None:
    train, holdout, synthetic = _records(120, 27), _records(120, 28), _records(120, 29)
    result = attribute_inference(train, holdout, synthetic, _schema(40), known_codes=5)
    replicates = attribute_bootstrap(result, reps=5, seed=4, batch=2)
    rng = np.random.default_rng(4)  # the same draws, one resample of all victims per replicate
    for k in range(5):
        rows = rng.integers(0, 120, 120)
        f1 = attribute_f1(result["true"], result["predicted"], result["weights"], rows)
        baseline = attribute_f1(result["true"], result["baseline_predicted"], result["weights"], rows)
        assert replicates["f1"][k] == pytest.approx(f1) and replicates["baseline_f1"][k] == pytest.approx(baseline)
        assert replicates["difference"][k] == pytest.approx(f1 - baseline)
    assert replicates["reps"] == 5 and len(set(replicates["f1"])) > 1
    with pytest.raises(ValueError, match="skipped"):
        attribute_bootstrap(attribute_inference(train[:1], holdout, synthetic, _schema(40), known_codes=5))


def test_attribute_inference_knows_the_most_common_train_codes_and_equalises_reference_sizes() -> None:
    train, holdout, synthetic = _records(200, 15), _records(150, 16), _records(250, 17)
    synthetic[:, 3:13] = 1.0  # the synthetic set's most common codes are not train's
    result = attribute_inference(train, holdout, synthetic, _schema(40), known_codes=4)
    top_train = 3 + np.argsort(-train[:, 3:].mean(axis=0), kind="stable")[:4]
    assert not set(top_train) & set(result["unknown_code_columns"])
    assert result["reference_rows"] == 150  # the synthetic set is sampled down to the holdout's size


# --------------------------------------------------------------------------------------------- all three, bad input
def test_privacy_and_memorisation_equal_the_functions_alone() -> None:
    train, holdout, synthetic, schema = _records(260, 18), _records(240, 19), _records(230, 20), _schema(40)
    together = {**privacy(train, holdout, synthetic, schema, known_codes=6, seed=3),
                **memorisation(train, holdout, synthetic, schema, seed=3)}
    mia = membership_inference(train, holdout, synthetic, seed=3)
    dcr = distance_to_closest_record(train, holdout, synthetic, seed=3, schema=schema)
    aia = attribute_inference(train, holdout, synthetic, schema, known_codes=6, seed=3)
    for name, alone in (("membership_inference", mia), ("distance_to_closest_record", dcr),
                        ("attribute_inference", aia)):
        for key, value in alone.items():
            other = together[name][key]
            if sp.issparse(value):
                assert (value != other).nnz == 0
            else:
                np.testing.assert_array_equal(np.asarray(other), np.asarray(value))
    assert mia["members"] == 240 and dcr["synthetic_rows"] == 230 and dcr["train_rows"] == 240
    assert together["exact_copies"]["synthetic"] == exact_copies(synthetic, train, schema)


def test_bad_input() -> None:
    schema = _schema(40)
    train, holdout, synthetic = _records(50, 21), _records(50, 22), _records(50, 23)
    with pytest.raises(ValueError, match="synthetic has 42 columns, expected 43"):
        attribute_inference(train, holdout, synthetic[:, :-1], schema)
    with pytest.raises(ValueError, match="holdout has 42 columns, expected 43"):
        membership_inference(train, holdout[:, 1:], synthetic, schema=schema)
    with pytest.raises(ValueError, match="holdout has 42 columns"):
        distance_to_closest_record(train, holdout[:, 1:], synthetic)
    with pytest.raises(ValueError, match="2-D"):
        nearest_distances(train[0], synthetic)
    with pytest.raises(ValueError, match="train holds NaN"):
        privacy(np.where(train == 1, np.nan, train), holdout, synthetic, schema)
    with pytest.raises(ValueError, match="known_codes must be at least 0"):
        attribute_inference(train, holdout, synthetic, schema, known_codes=-1)
    codes_only = EHRSchema([ColumnGroup("icd10_categories", "multi_hot", ["A", "B"])])
    with pytest.raises(ValueError, match="would know nothing"):
        attribute_inference(train[:, 3:5], holdout[:, 3:5], synthetic[:, 3:5], codes_only, known_codes=0)
    with pytest.raises(ValueError, match="at least one reference row"):
        nearest_neighbours(train, synthetic[:0])


def test_too_few_rows_are_skipped_with_a_reason() -> None:
    schema = _schema(40)
    train, holdout, synthetic = _records(50, 24), _records(50, 25), _records(50, 26)
    for result in privacy(train[:1], holdout, synthetic, schema, known_codes=4).values():
        assert "train has 1 (needs 2)" in result["reason"]
    result = attribute_inference(train, holdout[:1], synthetic, schema, known_codes=4)
    assert "holdout has 1" in result["reason"] and result["f1"] is result["baseline_f1"] is None
    assert distance_to_closest_record(train, holdout, synthetic[:0])["share_closer_to_train"] is None
    # a vocabulary no larger than known_codes leaves nothing to infer (the default 256 on a small demo vocabulary)
    result = privacy(train, holdout, synthetic, schema, known_codes=40)["attribute_inference"]
    assert result["f1"] is None and "leaves none of the 40 codes" in result["reason"]
    # a split whose unknown codes never vary has no weighted code: None with a reason, not NaN
    flat = train.copy()
    flat[:, 3:] = 0.0
    result = attribute_inference(flat, holdout, synthetic, schema, known_codes=3)
    assert result["f1"] is None and result["weighted_codes"] == 0 and "every weight is 0" in result["reason"]


# ------------------------------------------------------------------------------------ the helpers shared with fidelity
def test_membership_f1_is_sklearns_f1_with_members_as_positives() -> None:
    rng = np.random.default_rng(40)
    members, nonmembers = rng.integers(0, 12, 300).astype(np.float64), rng.integers(2, 14, 250).astype(np.float64)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    for theta in (0, 3, 5, 20):
        called = np.r_[members, nonmembers] <= theta
        assert membership_f1(members, nonmembers, theta) == pytest.approx(f1_score(labels, called))
        # the count form it replaced, to the last digit: 2 TP / (2 TP + FP + FN)
        true_positive, false_positive = (members <= theta).sum(), (nonmembers <= theta).sum()
        denominator = 2 * true_positive + false_positive + len(members) - true_positive
        assert membership_f1(members, nonmembers, theta) == float(2 * true_positive / denominator)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, bool])
def test_as_csr_equals_scipys_conversion(dtype: type) -> None:
    dense = (_population(500, 41, d=40) * np.random.default_rng(42).integers(1, 4, (500, 40))).astype(dtype)
    matrix = as_csr(dense, "x")
    expected = sp.csr_matrix(dense.astype(np.float32))
    assert matrix.dtype == np.float32 and matrix.has_canonical_format and matrix.shape == dense.shape
    np.testing.assert_array_equal(matrix.indptr, expected.indptr)
    np.testing.assert_array_equal(matrix.indices, expected.indices)
    np.testing.assert_array_equal(matrix.data, expected.data)
    assert as_csr(np.zeros((0, 5)), "x").shape == (0, 5)
    with pytest.raises(ValueError, match="x must be a 2-D matrix"):
        as_csr(np.zeros(5), "x")


def test_as_csr_copies_sparse_input_only_when_asked() -> None:
    source = sp.csr_matrix(_population(50, 43))
    assert np.shares_memory(as_csr(source, "x").data, source.data)
    copied = as_csr(source, "x", copy=True)
    assert not np.shares_memory(copied.data, source.data) and (copied != source).nnz == 0
