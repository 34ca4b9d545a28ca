"""Fidelity of synthetic records to real ones: code prevalence, code correlation, code pairs, codes per patient,
codes never generated, and the demographic fields.

Every function takes real and synthetic vectors in the same ``EHRSchema`` layout (``schema.encode``) and returns
plain numbers, so that callers (the report, benchmarks) say which real split they used. Everything is vectorised over
records: a 50,000 x 1,800 comparison is a few matrix products, never a loop over rows or column pairs. A figure that
cannot be computed (too few rows, no variance) is None with a ``reason``, never a silent NaN.

Definitions (CONVENTIONS.md):

* prevalence: per-code means; Pearson and Spearman r between real and synthetic, and the mean absolute difference
  x 1,000;
* correlation (CMD): ||R_real - R_syn||_F over the code columns, with R the Pearson correlation matrix (a column with
  no variance correlates 0 with every other and 1 with itself), and Yan et al.'s (2022) scaling ||.||_F / d^2 x 10^6;
* pairs: the ``top_k`` most frequent real code pairs, their rates in both, Pearson r and mean absolute difference;
* demographics: 1-Wasserstein distance for age (years) and admissions (counts), total variation distance
  (half the L1 distance of the category shares) for binary and one-hot fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from ..data.schema import EHRSchema

MIN_ROWS = 2


def _check(real: np.ndarray, synthetic: np.ndarray, schema: EHRSchema) -> None:
    for name, array in (("real", real), ("synthetic", synthetic)):
        if array.ndim != 2 or array.shape[1] != schema.dim:
            raise ValueError(f"{name} vectors must have shape (n, {schema.dim}) (the schema's layout), got "
                             f"{array.shape}")


def _correlation(x: np.ndarray, y: np.ndarray, method: str) -> dict[str, Any]:
    """Pearson or Spearman r, or None with the reason when either side is constant or too short."""
    if len(x) < MIN_ROWS:
        return {"value": None, "reason": f"fewer than {MIN_ROWS} values"}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"value": None, "reason": "one side has no variance"}
    result = stats.pearsonr(x, y) if method == "pearson" else stats.spearmanr(x, y)
    return {"value": float(result.statistic)}


def code_matrix(vectors: np.ndarray, schema: EHRSchema) -> np.ndarray:
    """The multi-hot ICD-10 columns as float32 0/1 (rows, codes)."""
    return (np.asarray(vectors)[:, schema.slices["icd10_categories"]] >= 0.5).astype(np.float32)


def prevalence(real_codes: np.ndarray, synthetic_codes: np.ndarray) -> dict[str, Any]:
    """Per-code prevalence agreement (the arrays are returned too, for the scatter plot)."""
    real_p, synthetic_p = real_codes.mean(axis=0), synthetic_codes.mean(axis=0)
    return {
        "pearson": _correlation(real_p, synthetic_p, "pearson"),
        "spearman": _correlation(real_p, synthetic_p, "spearman"),
        "mean_abs_diff_x1000": float(np.abs(real_p - synthetic_p).mean() * 1000),
        "real_prevalence": real_p,
        "synthetic_prevalence": synthetic_p,
    }


def correlation_matrix(codes: np.ndarray) -> np.ndarray:
    """Pearson correlation of the code columns through one matrix product (float64); constant columns correlate 0
    with the others and 1 with themselves."""
    x = codes.astype(np.float64)
    mean = x.mean(axis=0)
    covariance = x.T @ x / len(x) - np.outer(mean, mean)
    std = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
    scale = np.outer(std, std)
    corr = np.divide(covariance, scale, out=np.zeros_like(covariance), where=scale > 0)
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def correlation_distance(real_codes: np.ndarray, synthetic_codes: np.ndarray) -> dict[str, Any]:
    """CMD: the Frobenius norm of the difference of the code correlation matrices, raw and Yan-scaled."""
    if min(len(real_codes), len(synthetic_codes)) < MIN_ROWS:
        return {"frobenius": None, "yan_scaled": None, "reason": f"fewer than {MIN_ROWS} rows"}
    d = real_codes.shape[1]
    difference = correlation_matrix(real_codes) - correlation_matrix(synthetic_codes)
    frobenius = float(np.linalg.norm(difference))
    return {"frobenius": frobenius, "yan_scaled": frobenius / d**2 * 1e6, "codes": d}


def pair_cooccurrence(real_codes: np.ndarray, synthetic_codes: np.ndarray, top_k: int = 100) -> dict[str, Any]:
    """Rates of the ``top_k`` most frequent real code pairs (i < j) in both data sets."""
    real_pairs = real_codes.T @ real_codes / len(real_codes)
    synthetic_pairs = synthetic_codes.T @ synthetic_codes / len(synthetic_codes)
    upper = np.triu_indices(real_pairs.shape[0], k=1)
    order = np.argsort(-real_pairs[upper], kind="stable")[:top_k]
    rows, cols = upper[0][order], upper[1][order]
    real_rates, synthetic_rates = real_pairs[rows, cols], synthetic_pairs[rows, cols]
    return {
        "pairs": len(order),
        "pearson": _correlation(real_rates, synthetic_rates, "pearson"),
        "mean_abs_diff": float(np.abs(real_rates - synthetic_rates).mean()) if len(order) else None,
        "indices": np.stack([rows, cols], axis=1),
        "real_rates": real_rates,
        "synthetic_rates": synthetic_rates,
    }


def codes_per_patient(real_codes: np.ndarray, synthetic_codes: np.ndarray) -> dict[str, Any]:
    real_counts, synthetic_counts = real_codes.sum(axis=1), synthetic_codes.sum(axis=1)
    return {
        "real_mean": float(real_counts.mean()),
        "synthetic_mean": float(synthetic_counts.mean()),
        "wasserstein": float(stats.wasserstein_distance(real_counts, synthetic_counts)),
        "real_counts": real_counts,
        "synthetic_counts": synthetic_counts,
    }


def never_generated(real_codes: np.ndarray, synthetic_codes: np.ndarray, vocabulary: list[str]) -> dict[str, Any]:
    """Codes present in the real split that no synthetic record has, and the share of real code occurrences they
    account for."""
    present = real_codes.sum(axis=0) > 0
    missing = present & (synthetic_codes.sum(axis=0) == 0)
    occurrences = real_codes.sum()
    return {
        "count": int(missing.sum()),
        "of_present": int(present.sum()),
        "real_occurrence_share": float(real_codes[:, missing].sum() / occurrences) if occurrences else None,
        "codes": [vocabulary[i] for i in np.flatnonzero(missing)],
    }


def demographics(real: np.ndarray, synthetic: np.ndarray, schema: EHRSchema) -> dict[str, Any]:
    """Per non-code field: 1-Wasserstein distance in the field's own units for age and counts, total variation
    distance of the category shares for binary and one-hot fields."""
    out: dict[str, Any] = {}
    for group in schema.groups:
        if group.kind == "multi_hot":
            continue
        where = schema.slices[group.name]
        real_block, synthetic_block = real[:, where], synthetic[:, where]
        if group.kind in ("continuous", "count"):
            real_values = schema.decode_column(group.name, real_block[:, 0])
            synthetic_values = schema.decode_column(group.name, synthetic_block[:, 0])
            out[group.name] = {"wasserstein": float(stats.wasserstein_distance(real_values, synthetic_values)),
                               "real_mean": float(real_values.mean()), "synthetic_mean": float(synthetic_values.mean())}
            continue
        if group.kind == "binary":
            real_shares = np.array([1 - real_block[:, 0].mean(), real_block[:, 0].mean()])
            synthetic_shares = np.array([1 - synthetic_block[:, 0].mean(), synthetic_block[:, 0].mean()])
        else:
            real_shares = np.bincount(real_block.argmax(axis=1), minlength=group.width) / len(real_block)
            synthetic_shares = np.bincount(synthetic_block.argmax(axis=1), minlength=group.width) / len(synthetic_block)
        out[group.name] = {
            "total_variation": float(0.5 * np.abs(real_shares - synthetic_shares).sum()),
            "real_shares": dict(zip(map(str, group.categories), real_shares.round(6).tolist())),
            "synthetic_shares": dict(zip(map(str, group.categories), synthetic_shares.round(6).tolist())),
        }
    return out


def fidelity(real: np.ndarray, synthetic: np.ndarray, schema: EHRSchema, top_k_pairs: int = 100) -> dict[str, Any]:
    """Every figure above for one real split and one synthetic set (vectors in ``schema``'s layout)."""
    real, synthetic = np.asarray(real, dtype=np.float32), np.asarray(synthetic, dtype=np.float32)
    _check(real, synthetic, schema)
    if min(len(real), len(synthetic)) < MIN_ROWS:
        raise ValueError(f"fidelity needs at least {MIN_ROWS} real and synthetic records, got {len(real)} and "
                         f"{len(synthetic)}")
    real_codes, synthetic_codes = code_matrix(real, schema), code_matrix(synthetic, schema)
    return {
        "prevalence": prevalence(real_codes, synthetic_codes),
        "correlation": correlation_distance(real_codes, synthetic_codes),
        "pairs": pair_cooccurrence(real_codes, synthetic_codes, top_k_pairs),
        "codes_per_patient": codes_per_patient(real_codes, synthetic_codes),
        "never_generated": never_generated(real_codes, synthetic_codes, schema.codes),
        "demographics": demographics(real, synthetic, schema),
    }
