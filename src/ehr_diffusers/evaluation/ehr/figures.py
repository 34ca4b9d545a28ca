"""Every reported figure of an EHR evaluation: its value, the real split it used, and a 95% confidence interval
naming its method. A figure that cannot be computed is None with the reason.

Intervals, by figure:

* fidelity (prevalence, correlation, pairs, codes per patient, demographics), against the whole holdout: normal
  bootstrap interval over the synthetic records, the real split held fixed (each replicate one weighted sparse Gram
  matrix); it says how much the figure would move with another sample of the same size from the same generator.
  Comparisons are fair because every method is scored at the same size. Maxima and counts over the whole set have no
  interval;
* membership inference, distance to closest record and attribute inference (Yan et al. 2022): percentile bootstrap
  over the attacked real records, or over the synthetic records for the distance to closest record; exact-copy
  rates: Wilson;
* dimension-wise prediction (Choi et al. 2017; Yan et al. 2022): t intervals over the evaluated codes for the means,
  a bootstrap over codes for the TSTR/TRTR ratio and a Fisher z interval for the per-code agreement (refitting 100
  models per replicate is not affordable);
* plausibility: Wilson.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import sparse, stats

from ...data.ehr.schema import EHRSchema
from ..stats import (
    bootstrap_interval,
    figure,
    fisher_z_interval,
    mean_interval,
    normal_interval,
    roc_auc,
    tpr_at_fpr,
    two_sample_bootstrap,
    wilson_interval,
)
from .data import RealData
from .fidelity import (
    code_moments,
    codes_per_patient,
    correlation_distance,
    field_categories,
    pair_cooccurrence,
    pair_cooccurrence_all,
    prevalence,
)
from .privacy import attribute_bootstrap, membership_f1


def _lookup(section: Mapping[str, Any], path: tuple[str, ...]) -> tuple[Any, str | None]:
    """The value at ``path`` in a module's section and, when it is None, the nearest stated reason."""
    value: Any = section
    reason = section.get("reason")
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, Mapping) and value.get("reason"):
            reason = value["reason"]
    return value, reason


FIDELITY_FIGURES = (("prevalence_pearson", "prevalence", ("pearson", "value")),
                    ("prevalence_spearman", "prevalence", ("spearman", "value")),
                    ("prevalence_mad_x1000", "prevalence", ("mean_abs_diff_x1000",)),
                    ("cmd_yan", "correlation", ("yan_scaled",)),
                    ("cmd_frobenius", "correlation", ("frobenius",)),
                    ("pairs_pearson", "pairs", ("pearson", "value")),
                    ("pairs_pearson_all", "pairs_all", ("pearson", "value")),
                    ("codes_per_patient_wasserstein", "codes_per_patient", ("wasserstein",)))


def figure_support(key: str) -> tuple[float, float]:
    """The range a figure can take, so that a symmetric interval (normal bootstrap, t over seeds) is cut to it rather
    than claiming, say, a negative total variation."""
    if key.endswith(("_pearson", "_spearman")) or key == "agreement" or key == "aia_difference":
        return -1.0, 1.0
    if key.endswith(("_total_variation", "_auroc", "_f1", "_share", "_fpr", "_rate")) or key.startswith("any_rule") \
            or key == "mia_auc":
        return 0.0, 1.0
    if key.endswith(("_wasserstein", "_x1000", "_mean", "_max", "_ratio")) or key.startswith("cmd_") \
            or key == "codes_never_generated":
        return 0.0, np.inf
    return -np.inf, np.inf


def fidelity_figures(raw: Mapping[str, Any], real: RealData, synthetic: np.ndarray, schema: EHRSchema, reps: int,
                     seed: int) -> dict[str, dict[str, Any]]:
    """The fidelity figures with normal bootstrap intervals over synthetic records: each replicate is one weighted
    sparse Gram matrix (the resample's multiplicities as weights) and 1-D distances for the demographic fields."""
    split = raw["prevalence"]["split"]
    codes = schema.slices["icd10_categories"]
    # sparse once, not per replicate
    real_codes = sparse.csr_matrix(real.holdout[:, codes] >= 0.5, dtype=np.float32)
    synthetic_codes = sparse.csr_matrix(synthetic[:, codes] >= 0.5, dtype=np.float32)
    real_moments = code_moments(real_codes)
    n = len(synthetic)
    fields = {}
    for name, field in raw["demographics"]["fields"].items():
        column = schema.slices[name]
        if "wasserstein" in field:
            fields[name] = ("wasserstein", schema.decode_column(name, real.holdout[:, column.start]),
                            schema.decode_column(name, synthetic[:, column.start]))
        else:
            width = 2 if schema[name].kind == "binary" else schema[name].width + 1  # + none or several
            real_category = field_categories(real.holdout[:, column])
            fields[name] = ("total_variation", np.bincount(real_category, minlength=width) / len(real_category),
                            field_categories(synthetic[:, column]))
    replicates: dict[str, list[float | None]] = {key: [] for key, _, _ in FIDELITY_FIGURES}
    replicates.update({f"{name}_{kind}": [] for name, (kind, _, _) in fields.items()})
    rng = np.random.default_rng(seed)
    for _ in range(reps if n >= 2 else 0):
        indices = rng.integers(0, n, n)
        weights = np.bincount(indices, minlength=n)
        moments = code_moments(synthetic_codes, weights)
        sections = {"prevalence": prevalence(real_moments, moments),
                    "correlation": correlation_distance(real_moments, moments),
                    "pairs": pair_cooccurrence(real_moments, moments, raw["pairs"]["pairs"]),
                    "pairs_all": pair_cooccurrence_all(real_moments, moments, raw["pairs_all"]["min_prevalence"]),
                    "codes_per_patient": codes_per_patient(real_codes, synthetic_codes, weights)}
        for key, section, path in FIDELITY_FIGURES:
            replicates[key].append(_lookup(sections[section], path)[0])
        for name, (kind, real_side, synthetic_side) in fields.items():
            if kind == "wasserstein":
                value = stats.wasserstein_distance(real_side, synthetic_side[indices])
            else:
                shares = np.bincount(synthetic_side[indices], minlength=len(real_side)) / n
                value = 0.5 * np.abs(real_side - shares).sum()
            replicates[f"{name}_{kind}"].append(float(value))
    method = f"normal bootstrap interval over synthetic records ({reps} replicates)"
    out: dict[str, dict[str, Any]] = {}
    for key, section, path in FIDELITY_FIGURES:
        value, reason = _lookup(raw[section], path)
        ci = None if value is None else normal_interval(value, replicates[key], figure_support(key))
        out[key] = figure(value, split, ci, method, reason)
    cpp = raw["codes_per_patient"]
    out["codes_per_patient_real_mean"] = figure(cpp["real_mean"], split, mean_interval(cpp["real_counts"]),
                                                "t interval")
    out["codes_per_patient_synthetic_mean"] = figure(
        cpp["synthetic_mean"], split, mean_interval(cpp["synthetic_counts"]) if n > 1 else None, "t interval")
    out["codes_per_patient_real_max"] = figure(cpp["real_max"], split, reason="a maximum over the whole real split")
    out["codes_per_patient_synthetic_max"] = figure(cpp["synthetic_max"], split,
                                                    reason="a maximum over the whole synthetic set")
    for name, (kind, _, _) in fields.items():
        key, value = f"{name}_{kind}", raw["demographics"]["fields"][name][kind]
        out[key] = figure(value, split, normal_interval(value, replicates[key], figure_support(key)), method)
    never = raw["never_generated"]
    out["codes_never_generated"] = figure(never["count"], split, reason="a count over the whole synthetic set",
                                          of_present=never["of_present"])
    return out


def utility_figures(raw: Mapping[str, Any], reps: int, seed: int) -> dict[str, dict[str, Any]]:
    """The dimension-wise prediction figures (TRTR, TSTR, their ratios and agreement) with intervals over codes."""
    split = raw.get("split")
    if split is None or "means" not in raw:
        reason = raw.get("reason", "not computed")
        return {key: figure(None, None, reason=reason) for key in ("trtr_auroc", "tstr_auroc", "auroc_ratio",
                                                                   "trtr_f1", "tstr_f1", "f1_ratio", "agreement")}
    per_code = [entry for entry in raw["per_code"] if entry["trtr"].get("auroc") is not None]

    def scores(source: str, metric: str) -> np.ndarray:
        values = []
        for entry in per_code:
            result = entry[source]
            values.append(result[metric] if result.get(metric) is not None else result["constant"][metric])
        return np.asarray(values, dtype=np.float64)

    means, out = raw["means"], {}
    method_t = f"t interval over {len(per_code)} codes"
    for metric in ("auroc", "f1"):
        trtr, tstr = scores("trtr", metric), scores("tstr", metric)
        for source, values in (("trtr", trtr), ("tstr", tstr)):
            value = means.get(f"{source}_{metric}")
            ci = mean_interval(values) if len(values) > 1 and value is not None and np.ptp(values) > 0 else None
            out[f"{source}_{metric}"] = figure(value, split[source], ci, method_t, codes=len(values))

        def ratio(indices: np.ndarray, trtr: np.ndarray = trtr, tstr: np.ndarray = tstr) -> float | None:
            denominator = trtr[indices].mean()
            return None if denominator == 0 else tstr[indices].mean() / denominator

        value = means.get(f"{metric}_ratio")
        out[f"{metric}_ratio"] = figure(value, "TSTR / TRTR on holdout",
                                        bootstrap_interval(ratio, len(trtr), reps, seed) if value is not None else None,
                                        f"percentile bootstrap over codes ({reps} replicates)",
                                        "no TRTR model scored" if value is None else None)
    agreement = raw["agreement"]
    r, count = agreement["pearson_auroc"].get("value"), agreement.get("codes", 0)
    out["agreement"] = figure(r, "TSTR vs TRTR on holdout",
                              fisher_z_interval(r, count) if r is not None and count > 3 else None,
                              f"Fisher z over {count} codes", agreement["pearson_auroc"].get("reason"))
    return out


def privacy_figures(raw: Mapping[str, Any], reps: int, seed: int) -> dict[str, dict[str, Any]]:
    """Membership inference, attribute inference and the memorisation audit (distance to closest record, exact
    copies) with percentile bootstrap intervals over the records each one resamples, Wilson for the copy rates."""
    mia, dcr, aia = raw["membership_inference"], raw["distance_to_closest_record"], raw["attribute_inference"]
    split = "train (members) vs holdout_eval (non-members)"
    out: dict[str, dict[str, Any]] = {}
    if mia.get("auc") is None:
        for key in ("mia_auc", "mia_f1", "mia_tpr_at_1pct_fpr"):
            out[key] = figure(None, split, reason=mia.get("reason"))
    else:
        members, nonmembers = mia["member_distances"], mia["nonmember_distances"]
        theta = mia["theta"]
        method = f"percentile bootstrap over members and non-members, each resampled ({reps} replicates)"
        statistics = {
            "mia_auc": (mia["auc"], lambda a, b: roc_auc(-a, -b)),
            "mia_f1": (mia["f1"], lambda a, b: membership_f1(a, b, theta)),
            "mia_tpr_at_1pct_fpr": (mia["tpr_at_1pct_fpr"], lambda a, b: tpr_at_fpr(-a, -b, 0.01)),
        }
        for key, (value, statistic) in statistics.items():
            out[key] = figure(value, split, two_sample_bootstrap(statistic, members, nonmembers, reps, seed), method,
                              members=len(members), nonmembers=len(nonmembers))
    dcr_split = "train sample vs holdout (equal sizes)"
    if dcr.get("share_closer_to_train") is None:
        out["dcr_share"] = figure(None, dcr_split, reason=dcr.get("reason"))
    else:
        closer = dcr["closer_to_train"]
        # resampling the synthetic records only: which real patients happened to land in train moves the share
        # more (0.45-0.55 between random splits of independent data at 3,000 rows), so this interval is too narrow
        out["dcr_share"] = figure(dcr["share_closer_to_train"], dcr_split,
                                  bootstrap_interval(lambda i: closer[i].mean(), len(closer), reps, seed),
                                  f"percentile bootstrap over synthetic records ({reps} replicates); the real "
                                  "train/holdout assignment is held fixed, so it understates the uncertainty",
                                  distance=dcr["distance"], train_rows=dcr["train_rows"],
                                  holdout_rows=dcr["holdout_rows"], synthetic_rows=dcr["synthetic_rows"])
    for key, side, split_name in (("exact_copy_rate", "synthetic", "the set's records vs train"),
                                  ("holdout_copy_rate", "holdout", "holdout records vs train (reference)")):
        copies = raw["exact_copies"][side]
        ci = wilson_interval(copies["copies"], copies["eligible"]) if copies["eligible"] else None
        out[key] = figure(copies["rate"], split_name, ci, "Wilson", copies.get("reason"), copies=copies["copies"],
                          eligible=copies["eligible"], min_codes=copies["min_codes"])
    if aia.get("f1") is None:
        for key in ("aia_f1", "aia_baseline_f1", "aia_difference"):
            out[key] = figure(None, "train victims", reason=aia.get("reason"))
    else:
        replicates = attribute_bootstrap(aia, reps=reps, seed=seed) if reps >= 2 else {"reps": 0}
        method = f"percentile bootstrap over victims ({replicates['reps']} replicates)"
        for key, name, split_name in (("aia_f1", "f1", "train victims, synthetic reference"),
                                      ("aia_baseline_f1", "baseline_f1", "train victims, holdout_eval reference"),
                                      ("aia_difference", "difference", "synthetic minus holdout reference")):
            ci = np.percentile(replicates[name], [2.5, 97.5]) if replicates["reps"] >= 2 else None
            out[key] = figure(aia[name], split_name, ci, method)
    return out


def plausibility_figures(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The share of records violating any rule, real and synthetic, with Wilson intervals."""
    out = {}
    for side in ("real", "synthetic"):
        entry = raw["any_rule"][side]
        split = "holdout" if side == "real" else "the set's own records"
        out[f"any_rule_{side}"] = figure(entry.get("rate"), split, entry.get("ci"), "Wilson", entry.get("reason"),
                                         violations=entry.get("violations"), eligible=entry.get("eligible"))
    return out
