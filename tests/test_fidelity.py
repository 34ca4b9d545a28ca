"""Fidelity metrics on hand-computed cases, identical data, and mistakes that evaluation code for synthetic EHR is
known to make."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema
from ehr_diffusers.evaluation.ehr.fidelity import (
    NO_CATEGORY,
    code_matrix,
    code_moments,
    codes_per_patient,
    correlation_distance,
    correlation_matrix,
    demographics,
    dimension_wise_prediction,
    fidelity,
    field_categories,
    headline_figures,
    never_generated,
    pair_cooccurrence,
    pair_cooccurrence_all,
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
    assert result["frobenius"] == pytest.approx(np.sqrt(8))
    assert result["yan_scaled"] == pytest.approx(np.sqrt(8) / 4 * 1e6)
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
    assert counts["real_max"] == 3 and counts["synthetic_max"] == 2
    assert counts["wasserstein"] == pytest.approx(stats.wasserstein_distance([2, 3, 2, 0], [2, 0, 2, 1]))
    missing = never_generated(real, synthetic, ["A", "B", "C"])
    assert missing["codes"] == ["C"] and missing["count"] == 1 and missing["of_present"] == 3
    assert missing["real_occurrence_share"] == pytest.approx(2 / 7)


def test_pair_rates_are_chosen_on_the_real_side() -> None:
    """Top pairs are the real split's most frequent; pairs_all is every pair of codes frequent in the real split,
    whatever the synthetic set holds."""
    real = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=np.float32)  # D never present
    synthetic = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32)
    assert pair_cooccurrence(real, synthetic, top_k=2)["indices"].tolist() == [[0, 1], [0, 2]]
    frequent = pair_cooccurrence_all(real, synthetic, min_prevalence=0.5)  # A 0.75, B 0.5, C 0.5, D 0
    np.testing.assert_allclose(frequent["real_rates"], [0.5, 0.5, 0.25])      # AB, AC, BC
    np.testing.assert_allclose(frequent["synthetic_rates"], [0.25, 0.0, 0.0])
    assert frequent["pairs"] == 3 and frequent["codes"] == 3
    assert frequent["pearson"]["value"] == pytest.approx(stats.pearsonr([0.5, 0.5, 0.25], [0.25, 0, 0])[0])
    assert pair_cooccurrence_all(real, synthetic, min_prevalence=0.8)["pearson"]["reason"] == "fewer than 2 values"


def test_identical_sets_are_perfect_and_a_shift_of_codes_per_patient_is_measured() -> None:
    """Identical sets: pair r 1 (top pairs and all frequent pairs), codes-per-patient Wasserstein 0. One code more
    in every record: Wasserstein exactly 1 and the mean and max one higher; one more in half the records: 0.5."""
    rng = np.random.default_rng(30)
    real = (rng.random((400, 12)) < np.linspace(0.05, 0.5, 12)).astype(np.float32)
    real[:, :3] *= real[:, 3:4]  # linked codes, so that pair rates are not just products of prevalences
    identical = real.copy()
    assert pair_cooccurrence(real, identical)["pearson"]["value"] == pytest.approx(1.0)
    assert pair_cooccurrence_all(real, identical)["pearson"]["value"] == pytest.approx(1.0)
    assert codes_per_patient(real, identical)["wasserstein"] == 0.0
    widened = np.concatenate([real, np.zeros((400, 1), np.float32)], axis=1)
    shifted = widened.copy()
    shifted[:, -1] = 1.0  # a code no real record has, added to every record
    counts = codes_per_patient(widened, shifted)
    assert counts["wasserstein"] == pytest.approx(1.0)
    assert counts["synthetic_mean"] - counts["real_mean"] == pytest.approx(1.0)
    assert counts["synthetic_max"] == counts["real_max"] + 1
    shifted[::2, -1] = 0.0
    assert codes_per_patient(widened, shifted)["wasserstein"] == pytest.approx(0.5)


def test_headline_figures_are_the_suites_figures() -> None:
    schema = _wide_schema()
    train, holdout, synthetic = _related(500, 31), _related(400, 32), _related(300, 33, links=False)
    plain = headline_figures(holdout, synthetic, schema, train=train)
    full = fidelity(holdout, synthetic, schema)
    assert plain["pairs_pearson"] == pytest.approx(full["pairs"]["pearson"]["value"])
    assert plain["pairs_pearson_all"] == pytest.approx(full["pairs_all"]["pearson"]["value"])
    assert plain["prevalence_pearson"] == pytest.approx(full["prevalence"]["pearson"]["value"])
    assert plain["prevalence_spearman"] == pytest.approx(full["prevalence"]["spearman"]["value"])
    assert plain["cmd_yan"] == pytest.approx(full["correlation"]["yan_scaled"])
    counts = full["codes_per_patient"]
    assert (plain["codes_per_patient_wasserstein"], plain["codes_per_patient_real_mean"],
            plain["codes_per_patient_synthetic_mean"], plain["codes_per_patient_synthetic_max"]) == pytest.approx(
        (counts["wasserstein"], counts["real_mean"], counts["synthetic_mean"], counts["synthetic_max"]))
    fields = full["demographics"]["fields"]
    assert plain["age_wasserstein"] == pytest.approx(fields["age"]["wasserstein"])
    assert plain["num_admissions_wasserstein"] == pytest.approx(fields["num_admissions"]["wasserstein"])
    assert all(isinstance(value, float) for value in plain.values())
    assert 0.0 <= plain["exact_copy_rate"] <= 1.0 and 0.0 <= plain["holdout_copy_rate"] <= 1.0
    copies = headline_figures(holdout, train[:300], schema, train=train)
    assert copies["exact_copy_rate"] == 1.0
    same = headline_figures(holdout, holdout.copy(), schema)
    assert same["pairs_pearson"] == pytest.approx(1.0) and same["codes_per_patient_wasserstein"] == 0.0
    assert same["age_wasserstein"] == 0.0 and "exact_copy_rate" not in same
    # soft probabilities are read as present at >= 0.5, as the suite reads decoded records
    soft = holdout.copy()
    soft[:, FIRST_CODE:] *= 0.6
    assert headline_figures(holdout, soft, schema)["pairs_pearson"] == pytest.approx(1.0)


def test_identical_data_is_perfect_and_demographics_use_real_units() -> None:
    schema = _schema()
    real = schema.encode(_records(300, 1))
    result = fidelity(real, real.copy(), schema)
    assert result["prevalence"]["pearson"]["value"] == pytest.approx(1.0)
    assert result["correlation"]["frobenius"] == 0.0 and result["codes_per_patient"]["wasserstein"] == 0.0
    assert all(value.get("wasserstein", value.get("total_variation")) == 0.0
               for value in result["demographics"]["fields"].values())
    # ages compared in years on both sides (comparing de-normalised synthetic ages with normalised
    # real ones is a known mistake)
    older = [{**record, "age": min(record["age"] + 5, 90)} for record in _records(300, 1)]
    shifted = fidelity(real, schema.encode(older), schema)["demographics"]["fields"]["age"]
    assert 4.0 < shifted["wasserstein"] <= 5.0 and shifted["synthetic_mean"] > shifted["real_mean"]
    everyone_white = [{**record, "race": "WHITE"} for record in _records(300, 1)]
    race = fidelity(real, schema.encode(everyone_white), schema)["demographics"]["fields"]["race"]
    assert race["total_variation"] == pytest.approx(1 - race["real_shares"]["WHITE"])


def test_bad_input_is_named() -> None:
    schema = _schema()
    real = schema.encode(_records(10, 2))
    with pytest.raises(ValueError, match=r"synthetic vectors must have shape \(n, 9\)"):
        fidelity(real, real[:, :5], schema)
    with pytest.raises(ValueError, match="at least 2 real and synthetic records"):
        fidelity(real, real[:1], schema)
    with pytest.raises(ValueError, match="train and real must be different splits"):
        fidelity(real, real, schema, train=real.copy())  # an equal copy is the same split
    with pytest.raises(ValueError, match="real_codes must hold 0/1 codes"):
        codes_per_patient(np.full((3, 2), 0.7), np.ones((3, 2)))
    with pytest.raises(ValueError, match="codes must hold 0/1 codes"):
        code_moments(np.full((3, 2), 0.3))


def test_one_hot_fields_with_no_or_several_categories_are_counted_apart() -> None:
    """A generator that leaves race empty is not credited with its first category (WHITE)."""
    schema = _schema()
    real = schema.encode(_records(40, 3))
    synthetic = real.copy()
    race = schema.slices["race"]
    synthetic[:10, race] = 0.0      # none
    synthetic[10:12, race] = 1.0    # several
    assert field_categories(synthetic[:12, race]).tolist() == [3] * 12
    shares = demographics(real, synthetic, schema)["race"]
    assert shares["synthetic_shares"][NO_CATEGORY] == pytest.approx(12 / 40)
    assert NO_CATEGORY not in demographics(real, real, schema)["race"]["real_shares"]
    moved = np.abs(field_categories(real[:12, race]) - 3).astype(bool).sum()  # rows whose category was lost
    assert shares["total_variation"] == pytest.approx(moved / 40)


# ---------------------------------------------------------------------------------------------------- new helpers
CODES = list("ABCDEFGH")
FIRST_CODE = 6  # sex, age, admissions, race (3), then the codes


def _wide_schema() -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=20, maximum=90),
        ColumnGroup("num_admissions", "count", minimum=0, maximum=10),
        ColumnGroup("race", "one_hot", ["WHITE", "BLACK", "MISSING"]),
        ColumnGroup("icd10_categories", "multi_hot", CODES),
    ])


def _related(n: int, seed: int, links: bool = True) -> np.ndarray:
    """Records whose codes depend on age, sex and a latent factor (and on each other when ``links``), encoded."""
    schema = _wide_schema()
    rng = np.random.default_rng(seed)
    sex = rng.random(n) < 0.5
    age = rng.integers(20, 81, n)
    latent = rng.normal(size=n)
    base = np.array([-0.5, -1.0, -1.5, -2.0, -2.2, -2.5, -3.0, -3.5])
    logits = base + np.outer(latent, np.linspace(1.5, 0.5, 8)) + np.outer((age - 50) / 30, np.linspace(-1, 1, 8))
    logits[:, 1] += 1.0 * sex
    codes = rng.random((n, 8)) < 1 / (1 + np.exp(-logits))
    if links:
        codes[:, 7] |= codes[:, 6] & (rng.random(n) < 0.5)
    records = [{"sex": "F" if s else "M", "age": int(a), "num_admissions": int(rng.integers(0, 5)),
                "race": ["WHITE", "BLACK", "MISSING"][int(rng.integers(0, 3))],
                "icd10_categories": [c for c, hit in zip(CODES, row) if hit]} for s, a, row in zip(sex, age, codes)]
    return schema.encode(records)


def _sklearn_models(train: np.ndarray, columns: np.ndarray, C: float = 1.0):
    from sklearn.linear_model import LogisticRegression

    train, models = train.astype(np.float64), []   # in float32, scikit-learn's lbfgs stops short
    for column in columns:
        keep = np.arange(train.shape[1]) != column
        models.append((keep, LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(train[:, keep], train[:, column])))
    return models


# ---------------------------------------------------------------------------------------------------- dimension-wise
def test_joint_fit_is_each_per_code_logistic_regression() -> None:
    """The batched fit equals scikit-learn's LogisticRegression (same C, L2, unpenalised intercept) per code, with
    the target's own column left out."""
    from ehr_diffusers.evaluation.ehr.fidelity import _fit_logistic

    train = _related(800, 0)
    features = sp.csr_matrix(train)
    columns = FIRST_CODE + np.arange(8)                                 # every code column of the wide schema
    for C in (1.0, 0.1, 10.0):
        fit = _fit_logistic(features, train[:, columns], columns, C=C, tol=1e-6)
        assert fit.converged.all()
        assert np.all(fit.weights[columns, np.arange(8)] == 0.0)
        for j, (keep, model) in enumerate(_sklearn_models(train, columns, C)):
            np.testing.assert_allclose(fit.weights[keep, j], model.coef_[0], atol=1e-3)
            assert fit.intercepts[j] == pytest.approx(model.intercept_[0], abs=1e-3)
    # the default tolerance: the same predictions (AUROC depends on nothing else)
    fit = _fit_logistic(features, train[:, columns], columns)
    for j, (keep, model) in enumerate(_sklearn_models(train, columns)):
        ours = train @ fit.weights[:, j] + fit.intercepts[j]
        np.testing.assert_allclose(ours, model.decision_function(train[:, keep]), atol=5e-3)


def test_dimension_wise_matches_sklearn_auroc_and_f1_on_the_holdout() -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, roc_auc_score

    schema = _wide_schema()
    train, holdout, synthetic = _related(800, 0), _related(600, 1), _related(700, 2)
    result = dimension_wise_prediction(train, holdout, synthetic, schema, top_k=5)
    assert result["split"] == {"trtr": "train->holdout", "tstr": "synthetic->holdout"}
    codes_by_prevalence = np.argsort(-train[:, FIRST_CODE:].sum(axis=0), kind="stable")[:5]
    assert [row["code"] for row in result["per_code"]] == [CODES[i] for i in codes_by_prevalence]
    columns = FIRST_CODE + codes_by_prevalence
    imbalanced = 0
    for source, key in ((train, "trtr"), (synthetic, "tstr")):
        for row, column, (keep, model) in zip(result["per_code"], columns, _sklearn_models(source, columns)):
            scores = model.decision_function(holdout[:, keep])
            labels = holdout[:, column]
            assert row[key]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
            # threshold: the F1-maximising one on the model's own training set, never on the holdout
            precision, recall, thresholds = precision_recall_curve(source[:, column],
                                                                   model.decision_function(source[:, keep]))
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            threshold = thresholds[np.argmax(f1[:-1])]
            expected = f1_score(labels, scores >= threshold)
            assert row[key]["f1"] == pytest.approx(expected, abs=0.01)
            if row["holdout_prevalence"] < 0.2:
                # micro-F1 on one binary target is accuracy (a known mistake);
                # ours is the positive class's F1
                assert abs(row[key]["f1"] - accuracy_score(labels, scores >= threshold)) > 0.2
                imbalanced += 1
    assert imbalanced >= 2


def test_threshold_and_auroc_helpers_by_hand() -> None:
    from sklearn.metrics import roc_auc_score

    from ehr_diffusers.evaluation.ehr.fidelity import _auroc, _f1_thresholds
    from ehr_diffusers.evaluation.stats import binary_f1

    scores = np.array([[0.1], [0.4], [0.35], [0.8]], dtype=np.float32)
    labels = np.array([[0], [0], [1], [1]], dtype=np.float32)
    # t = 0.35: 3 predicted, 2 right, F1 = 4/5; t = 0.8: F1 = 2/3
    assert _f1_thresholds(scores, labels)[0] == np.float32(0.35)
    tied = np.array([[1.0, 3], [1.0, 3], [2.0, 1], [2.0, 3], [0.0, 2]], dtype=np.float32)
    tied_labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [0, 1]], dtype=np.float32)
    np.testing.assert_allclose(_auroc(tied, tied_labels),
                               [roc_auc_score(tied_labels[:, j], tied[:, j]) for j in range(2)])
    assert np.isnan(_auroc(tied, np.zeros_like(tied))).all()
    # 90 negatives, 10 positives, nothing predicted positive: accuracy 0.9, F1 0
    imbalanced = np.zeros((100, 1), dtype=bool)
    imbalanced[:10] = True
    assert binary_f1(np.zeros_like(imbalanced), imbalanced)[0] == 0.0


def test_trtr_is_measured_on_the_holdout_not_on_train_rows() -> None:
    """In train, H is a copy of G; in the holdout they are independent. Scored on train rows, H would look perfectly
    predictable; on the holdout it is not."""
    schema = _wide_schema()
    train, holdout = _related(1000, 3), _related(1000, 4, links=False)
    train[:, FIRST_CODE + 7] = train[:, FIRST_CODE + 6]
    result = dimension_wise_prediction(train, holdout, train.copy(), schema, top_k=8)
    row = next(row for row in result["per_code"] if row["code"] == "H")
    assert row["trtr"]["auroc"] < 0.8
    with pytest.raises(ValueError, match="different splits"):
        dimension_wise_prediction(train, train, holdout, schema)
    with pytest.raises(ValueError, match="different splits"):
        fidelity(train, holdout, schema, train=train)


def test_identical_sources_give_tstr_equal_to_trtr_and_means_of_per_code_numbers() -> None:
    schema = _wide_schema()
    train, holdout = _related(600, 5), _related(600, 6)
    result = fidelity(holdout, train.copy(), schema, train=train, top_k_codes=8)["dimension_wise"]
    assert all(row["trtr"] == row["tstr"] for row in result["per_code"])
    means = result["means"]
    assert means["auroc_ratio"] == 1.0 and means["f1_ratio"] == 1.0 and means["codes"] == 8
    assert result["agreement"]["pearson_auroc"]["value"] == pytest.approx(1.0)
    # averaging (mean, std) tuples is a known mistake; ours are plain means of per-code numbers
    aurocs = [row["trtr"]["auroc"] for row in result["per_code"]]
    assert all(isinstance(value, float) for value in aurocs)
    assert means["trtr_auroc"] == pytest.approx(np.mean(aurocs))
    assert means["trtr_f1"] == pytest.approx(np.mean([row["trtr"]["f1"] for row in result["per_code"]]))


def test_tstr_is_trained_on_the_synthetic_records() -> None:
    """An "F1 alignment" that compares real-data models only uses no synthetic data at all. Synthetic records
    whose columns are shuffled independently keep every prevalence but no dependence: TSTR must fall to chance while
    TRTR does not."""
    schema = _wide_schema()
    train, holdout = _related(1000, 20), _related(1000, 21)
    rng = np.random.default_rng(22)
    shuffled = np.stack([rng.permutation(column) for column in train.T], axis=1)
    means = dimension_wise_prediction(train, holdout, shuffled, schema, top_k=8)["means"]
    assert means["trtr_auroc"] > 0.65
    assert abs(means["tstr_auroc"] - 0.5) < 0.06 and means["auroc_ratio"] < 0.85


def test_codes_a_source_cannot_train_are_none_and_counted_as_constant_models() -> None:
    schema = _wide_schema()
    train, holdout, synthetic = _related(800, 7), _related(800, 8), _related(800, 9)
    synthetic[:, FIRST_CODE] = 0.0        # A never generated
    synthetic[:, FIRST_CODE + 1] = 1.0        # B on every record
    result = dimension_wise_prediction(train, holdout, synthetic, schema, top_k=8)
    rows = {row["code"]: row for row in result["per_code"]}
    assert rows["A"]["tstr"]["auroc"] is None and "only negatives" in rows["A"]["tstr"]["reason"]
    assert rows["A"]["tstr"]["constant"] == {"auroc": 0.5, "f1": 0.0}
    p = holdout[:, FIRST_CODE + 1].mean()
    assert rows["B"]["tstr"]["constant"]["f1"] == pytest.approx(2 * p / (1 + p))
    assert rows["A"]["trtr"]["auroc"] is not None
    means, trainable = result["means"], result["means_trainable"]
    assert means["codes"] == 8 and means["tstr_untrainable"] == 2
    assert trainable["codes"] == 6 and trainable["tstr_untrainable"] == 0 and result["agreement"]["codes"] == 6
    filled = [row["tstr"]["auroc"] if row["tstr"]["auroc"] is not None else 0.5 for row in result["per_code"]]
    assert means["tstr_auroc"] == pytest.approx(np.mean(filled))
    assert means["auroc_ratio"] == pytest.approx(means["tstr_auroc"] / means["trtr_auroc"])


def test_codes_without_both_classes_in_the_holdout_are_left_out() -> None:
    schema = _wide_schema()
    train, holdout, synthetic = _related(600, 10), _related(600, 11), _related(600, 12)
    holdout[:, FIRST_CODE] = 0.0
    result = dimension_wise_prediction(train, holdout, synthetic, schema, top_k=8)
    row = next(row for row in result["per_code"] if row["code"] == "A")
    assert row["trtr"] == row["tstr"] == {"auroc": None, "f1": None,
                                          "reason": "the holdout has only negatives for this code"}
    assert result["means"]["codes"] == 7
    tiny = dimension_wise_prediction(train[:1], holdout, synthetic, schema)
    assert "fewer than 2 rows" in tiny["reason"]
    with pytest.raises(ValueError, match=r"synthetic vectors must have shape \(n, 14\)"):
        dimension_wise_prediction(train, holdout, synthetic[:, :10], schema)


# ---------------------------------------------------------------------------------------------------- speed paths
def test_weights_equal_resampled_rows_and_precomputed_real_moments() -> None:
    rng = np.random.default_rng(13)
    real = (rng.random((300, 6)) < [0.5, 0.3, 0.2, 0.1, 0.4, 0.05]).astype(np.float32)
    synthetic = (rng.random((250, 6)) < [0.4, 0.3, 0.25, 0.1, 0.3, 0.0]).astype(np.float32)
    indices = rng.integers(0, 250, 250)
    weights = np.bincount(indices, minlength=250)
    resampled = synthetic[indices]
    moments = code_moments(real)
    for function in (prevalence, correlation_distance, pair_cooccurrence, pair_cooccurrence_all):
        weighted = function(moments, sp.csr_matrix(synthetic), synthetic_weights=weights)
        plain = function(real, resampled)
        for key, value in plain.items():
            if isinstance(value, dict):
                assert weighted[key] == pytest.approx(value)
            elif isinstance(value, np.ndarray):
                np.testing.assert_allclose(weighted[key], value, atol=1e-12)
            else:
                assert weighted[key] == pytest.approx(value)
    weighted = codes_per_patient(real, synthetic, synthetic_weights=weights)
    assert weighted["wasserstein"] == pytest.approx(codes_per_patient(real, resampled)["wasserstein"])
    assert weighted["synthetic_mean"] == pytest.approx(resampled.sum(axis=1).mean())
    assert weighted["synthetic_max"] == resampled.sum(axis=1).max()  # over the rows drawn, not every row
    np.testing.assert_allclose(correlation_matrix(synthetic, weights), correlation_matrix(resampled), atol=1e-12)
    with pytest.raises(ValueError, match="synthetic_weights must have one weight per row"):
        correlation_distance(real, synthetic, synthetic_weights=weights[:10])
    with pytest.raises(ValueError, match="synthetic_weights must be finite, non-negative"):
        codes_per_patient(real, synthetic, synthetic_weights=-weights)
    with pytest.raises(ValueError, match="weights apply to a code matrix"):
        prevalence(real, code_moments(synthetic), synthetic_weights=weights)


def test_sparse_input_gives_the_dense_figures() -> None:
    schema = _wide_schema()
    train, holdout, synthetic = _related(400, 14), _related(400, 15), _related(400, 16)
    dense = fidelity(holdout, synthetic, schema, train=train, top_k_codes=4)
    sparse = fidelity(sp.csr_matrix(holdout), sp.csc_matrix(synthetic), schema, train=sp.coo_matrix(train),
                      top_k_codes=4)
    assert sparse["dimension_wise"]["per_code"] == dense["dimension_wise"]["per_code"]
    assert sparse["correlation"] == dense["correlation"] and sparse["demographics"] == dense["demographics"]
    assert sparse["never_generated"] == dense["never_generated"]
    assert {name: section["split"] for name, section in dense.items()} == {
        "prevalence": "holdout", "correlation": "holdout", "pairs": "holdout", "pairs_all": "holdout",
        "codes_per_patient": "holdout", "never_generated": "holdout", "demographics": "holdout",
        "dimension_wise": {"trtr": "train->holdout", "tstr": "synthetic->holdout"}}
    named = fidelity(holdout, synthetic, schema, train=train, top_k_codes=1, real_split="holdout_eval")
    assert named["correlation"]["split"] == "holdout_eval"
    assert named["dimension_wise"]["split"] == {"trtr": "train->holdout_eval", "tstr": "synthetic->holdout_eval"}
    assert code_matrix(holdout, schema).toarray().tolist() == (holdout[:, FIRST_CODE:] >= 0.5).tolist()
    # code columns are read as 0/1 (>= 0.5) without touching the caller's matrix
    soft = sp.csr_matrix(holdout * 0.7)
    assert code_moments(code_matrix(soft, schema)).mean == pytest.approx(holdout[:, FIRST_CODE:].mean(axis=0))
    assert soft.max() == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------- known mistakes
def test_age_distance_is_in_years_on_both_sides() -> None:
    """Comparing de-normalised synthetic ages with normalised real ones is a known mistake; here both
    sides go through the schema, so ten years older is a distance of ten."""
    schema = _schema()
    records = [{**record, "age": min(record["age"], 80)} for record in _records(300, 17)]
    real = schema.encode(records)
    assert fidelity(real, real.copy(), schema)["demographics"]["fields"]["age"]["wasserstein"] == 0.0
    older = schema.encode([{**record, "age": record["age"] + 10} for record in records])
    age = fidelity(real, older, schema)["demographics"]["fields"]["age"]
    assert age["wasserstein"] == pytest.approx(10.0)
    assert age["synthetic_mean"] - age["real_mean"] == pytest.approx(10.0)


def test_identical_real_and_synthetic_is_perfect_fidelity() -> None:
    schema = _wide_schema()
    train, holdout = _related(500, 18), _related(500, 19)
    result = fidelity(holdout, holdout.copy(), schema, train=train, top_k_codes=8)
    assert result["prevalence"]["pearson"]["value"] == pytest.approx(1.0)
    assert result["prevalence"]["spearman"]["value"] == pytest.approx(1.0)
    assert result["correlation"]["frobenius"] == 0.0 and result["pairs"]["mean_abs_diff"] == 0.0
    assert result["never_generated"]["count"] == 0 and result["codes_per_patient"]["wasserstein"] == 0.0
    assert result["dimension_wise"]["split"] == {"trtr": "train->holdout", "tstr": "synthetic->holdout"}
    assert fidelity(holdout, holdout.copy(), schema)["dimension_wise"] == {"split": None,
                                                                         "reason": "no real train split given"}


def test_cross_check_against_sdmetrics() -> None:
    """sdmetrics' CorrelationSimilarity is 1 - |r_real - r_syn| / 2 per column pair, TVComplement is 1 - TVD,
    KSComplement is 1 - the KS statistic."""
    pandas = pytest.importorskip("pandas")
    from sdmetrics.column_pairs import CorrelationSimilarity
    from sdmetrics.single_column import KSComplement, TVComplement

    schema = _wide_schema()
    real, synthetic = _related(400, 20), _related(300, 21, links=False)
    real_corr = correlation_matrix(code_matrix(real, schema))
    synthetic_corr = correlation_matrix(code_matrix(synthetic, schema))
    for i, j in ((0, 1), (2, 5), (6, 7)):
        frame = lambda x: pandas.DataFrame({"a": x[:, FIRST_CODE + i], "b": x[:, FIRST_CODE + j]},  # noqa: E731, B023  (called within the same iteration)
                                           dtype=float)
        score = CorrelationSimilarity.compute(frame(real), frame(synthetic), coefficient="Pearson")
        assert abs(real_corr[i, j] - synthetic_corr[i, j]) == pytest.approx(2 * (1 - score), abs=1e-9)
    fields = demographics(real, synthetic, schema)
    race = lambda x: pandas.Series(x[:, 3:6].argmax(axis=1).astype(str))  # noqa: E731
    assert fields["race"]["total_variation"] == pytest.approx(1 - TVComplement.compute(race(real), race(synthetic)))
    sex = lambda x: pandas.Series(x[:, 0].astype(int).astype(str))  # noqa: E731
    assert fields["sex"]["total_variation"] == pytest.approx(1 - TVComplement.compute(sex(real), sex(synthetic)))
    age = lambda x: pandas.Series(schema.decode_column("age", x[:, 1]).astype(float))  # noqa: E731
    assert fields["age"]["ks_statistic"] == pytest.approx(1 - KSComplement.compute(age(real), age(synthetic)))
    assert 0 < fields["age"]["ks_statistic"] < 1


def test_side_by_side_fits_give_the_sequential_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    from ehr_diffusers.evaluation.ehr import fidelity as module

    schema = _wide_schema()
    train, holdout, synthetic = _related(500, 22), _related(500, 23), _related(500, 24)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert module._workers() == 1
    sequential = dimension_wise_prediction(train, holdout, synthetic, schema, top_k=6)
    monkeypatch.setattr(module, "_workers", lambda: 2)
    threaded = dimension_wise_prediction(train, holdout, synthetic, schema, top_k=6)
    assert threaded["per_code"] == sequential["per_code"] and threaded["means"] == sequential["means"]
