"""One evaluation run: the model's records and the baselines', scored the same way against the same real records,
with a confidence interval on every figure; the report and ``ehr-diffusers evaluate`` render what this returns.

What is scored. Fidelity and privacy use unconditional records (the learned null condition): records prompted with
real patients' summaries would carry those patients into the synthetic set and flatter fidelity against them (and
fake privacy, as the holdout would look like "members"). Prompt faithfulness is measured on its own, on records
prompted with summaries of holdout patients (the evaluation half, :mod:`~ehr_diffusers.evaluation.data`).

Confidence intervals (95%), each figure naming its method:

* fidelity (prevalence, correlation, pairs, codes per patient, demographics), membership inference, distance to
  closest record and attribute inference: percentile bootstrap over the synthetic records, or over the attacked real
  records for the attacks, the real split held fixed. They say how much the figure would move with another sample
  of the same size from the same generator;
* dimension-wise prediction: t intervals over the evaluated codes for the means, a bootstrap over codes for the
  TSTR/TRTR ratio and a Fisher z interval for the per-code agreement (refitting 100 models per replicate is not
  affordable);
* prompt faithfulness: bootstrap over prompts (records of one prompt are not independent); plausibility: Wilson.

Seeds: the benchmark (``benchmarks/fidelity_table.py``) repeats runs over seeds; within a run the intervals above
are the uncertainty.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from scipy import sparse, stats

from .. import __version__
from ..data.ehr.schema import EHRSchema
from .clinical import compare_plausibility
from .conditional import extraction_agreement, prompt_faithfulness
from .data import RealData, check_same_schema
from .fidelity import code_moments, codes_per_patient, correlation_distance, correlation_matrix, field_categories
from .fidelity import fidelity
from .fidelity import pair_cooccurrence, prevalence
from .intervals import fisher_z_interval, mean_interval, percentile_bootstrap
from .privacy import attribute_bootstrap, privacy, roc_auc, tpr_at_fpr
from .privacy import _f1 as membership_f1

logger = logging.getLogger(__name__)

BOOTSTRAP_REPS = 200  # percentile intervals (cheap: per-record arrays)
FIDELITY_BOOTSTRAP_REPS = 50  # normal intervals of the fidelity figures (one sparse Gram matrix each)
HEATMAP_CODES = 40
METHOD_LABELS = {"model": "this model", "bernoulli": "independent marginals", "holdout": "real holdout (ceiling)",
                 "ehrdiff": "EHRDiff-style EDM", "seed_sampler": "seed sampler on this model"}

DEFINITIONS = {
    "prevalence Pearson/Spearman r": "correlation of per-code prevalences (share of patients with the ICD-10 "
                                     "category), real vs synthetic, over all codes of the vocabulary",
    "prevalence |diff| x1000": "mean absolute difference of per-code prevalences, times 1,000",
    "CMD (Yan)": "Frobenius norm of the difference of the code-code Pearson correlation matrices, / d^2 x 10^6 "
                 "(Yan et al. 2022)",
    "pair rate r": "Pearson r of the co-occurrence rates of the 100 most frequent real code pairs",
    "Wasserstein": "1-Wasserstein (earth mover's) distance between the real and synthetic distributions, in the "
                   "field's units (years, codes)",
    "total variation": "half the L1 distance between category shares (0 identical, 1 disjoint)",
    "TRTR / TSTR": "dimension-wise prediction (Choi et al. 2017): per code, a logistic regression trained on real "
                   "train (TRTR) or on synthetic records (TSTR) predicts the code from all other columns; both are "
                   "tested on the real holdout; F1 at the threshold that maximises F1 on the model's own training set",
    "membership inference": "members = real train rows, non-members = real holdout rows (equal numbers); score = "
                            "minus the Hamming/squared distance to the nearest synthetic record; AUC 0.5 is chance; "
                            "F1 at theta = 5 calls records within distance 5 members",
    "attribute inference": "the attacker knows demographics and the 256 most common codes of a train patient, takes "
                           "the nearest synthetic record and predicts the other codes; entropy-weighted F1; the "
                           "baseline does the same with real holdout patients",
    "DCR share": "share of synthetic records whose nearest real record is in train rather than in an equal-size "
                 "holdout sample (0.5: no copying)",
    "plausibility": "share of records that violate a clinical rule (sex- or age-specific ICD-10-CM codes, "
                    "contradictory one-hot fields)",
    "prompt faithfulness": "share of stated facts (sex, age within 5 years, death, admissions within 1, marital "
                           "status, race, each stated diagnosis) that the record generated from the prompt holds",
}


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


def _bootstrap(statistic: Callable[[np.ndarray], float | None], n: int, reps: int, seed: int
               ) -> tuple[float, float] | None:
    """Percentile interval of ``statistic`` over resamples of range(n); None when a resample has no value (e.g. a
    constant side) or there are too few rows to resample."""
    if n < 2 or reps < 2:
        return None

    def finite(indices: np.ndarray) -> float:
        value = statistic(indices)
        return np.nan if value is None else float(value)

    try:
        return percentile_bootstrap(finite, n, reps=reps, seed=seed)
    except ValueError:  # a resample without a value: no interval rather than one over the lucky resamples
        return None


def _two_sample_bootstrap(statistic: Callable[[np.ndarray, np.ndarray], float], first: np.ndarray,
                          second: np.ndarray, reps: int, seed: int) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(first*, second*)`` with both samples resampled independently."""
    if min(len(first), len(second)) < 2 or reps < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(first[rng.integers(0, len(first), len(first))],
                                 second[rng.integers(0, len(second), len(second))]) for _ in range(reps)])
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


@contextmanager
def _timed(timings: dict[str, float] | None, step: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    if timings is not None:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------- one set
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
                    ("codes_per_patient_wasserstein", "codes_per_patient", ("wasserstein",)))


def figure_support(key: str) -> tuple[float, float]:
    """The range a figure can take, so that a symmetric interval (normal bootstrap, t over seeds) is cut to it rather
    than claiming, say, a negative total variation."""
    if key.endswith(("_pearson", "_spearman")) or key == "agreement" or key == "aia_difference":
        return -1.0, 1.0
    if key.endswith(("_total_variation", "_auroc", "_f1", "_share", "_fpr")) or key.startswith("any_rule") \
            or key == "mia_auc":
        return 0.0, 1.0
    if key.endswith(("_wasserstein", "_x1000", "_mean", "_ratio")) or key.startswith("cmd_") \
            or key == "codes_never_generated":
        return 0.0, np.inf
    return -np.inf, np.inf


def _normal_interval(estimate: float, replicates: list[float | None], key: str) -> tuple[float, float] | None:
    """estimate +- 1.96 bootstrap standard errors, cut to the figure's range; None when a replicate had no value or
    there are too few.

    Distances between samples (CMD, Wasserstein, 1 - r) grow with the sampling noise that resampling adds, so their
    percentile intervals sit beside the estimate rather than around it; the normal interval keeps it centred
    (Efron and Tibshirani 1993, ch. 13). Comparisons are fair because every method is scored at the same size."""
    if len(replicates) < 2 or any(value is None for value in replicates):
        return None
    spread = 1.959964 * float(np.std(np.asarray(replicates, dtype=np.float64), ddof=1))
    low, high = figure_support(key)
    return max(estimate - spread, low), min(estimate + spread, high)


def _fidelity_figures(raw: Mapping[str, Any], real: RealData, synthetic: np.ndarray, schema: EHRSchema, reps: int,
                      seed: int) -> dict[str, dict[str, Any]]:
    """The fidelity figures with normal bootstrap intervals over synthetic records: each replicate is one weighted
    sparse Gram matrix (the resample's multiplicities as weights) and 1-D distances for the demographic fields."""
    split = raw["prevalence"]["split"]
    codes = schema.slices["icd10_categories"]
    # sparse once, not per replicate
    real_codes = sparse.csr_matrix(real.holdout_eval[:, codes] >= 0.5, dtype=np.float32)
    synthetic_codes = sparse.csr_matrix(synthetic[:, codes] >= 0.5, dtype=np.float32)
    real_moments = code_moments(real_codes)
    n = len(synthetic)
    fields = {}
    for name, field in raw["demographics"]["fields"].items():
        column = schema.slices[name]
        if "wasserstein" in field:
            fields[name] = ("wasserstein", schema.decode_column(name, real.holdout_eval[:, column.start]),
                            schema.decode_column(name, synthetic[:, column.start]))
        else:
            width = 2 if schema[name].kind == "binary" else schema[name].width + 1  # + none or several
            real_category = field_categories(real.holdout_eval[:, column])
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
        ci = None if value is None else _normal_interval(value, replicates[key], key)
        out[key] = figure(value, split, ci, method, reason)
    cpp = raw["codes_per_patient"]
    out["codes_per_patient_real_mean"] = figure(cpp["real_mean"], split, mean_interval(cpp["real_counts"]),
                                                "t interval")
    out["codes_per_patient_synthetic_mean"] = figure(
        cpp["synthetic_mean"], split, mean_interval(cpp["synthetic_counts"]) if n > 1 else None, "t interval")
    for name, (kind, _, _) in fields.items():
        key, value = f"{name}_{kind}", raw["demographics"]["fields"][name][kind]
        out[key] = figure(value, split, _normal_interval(value, replicates[key], key), method)
    never = raw["never_generated"]
    out["codes_never_generated"] = figure(never["count"], split, reason="a count over the whole synthetic set",
                                          of_present=never["of_present"])
    return out


def _utility_figures(raw: Mapping[str, Any], reps: int, seed: int) -> dict[str, dict[str, Any]]:
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
                                        _bootstrap(ratio, len(trtr), reps, seed) if value is not None else None,
                                        f"percentile bootstrap over codes ({reps} replicates)",
                                        "no TRTR model scored" if value is None else None)
    agreement = raw["agreement"]
    r, count = agreement["pearson_auroc"].get("value"), agreement.get("codes", 0)
    out["agreement"] = figure(r, "TSTR vs TRTR on holdout",
                              fisher_z_interval(r, count) if r is not None and count > 3 else None,
                              f"Fisher z over {count} codes", agreement["pearson_auroc"].get("reason"))
    return out


def _privacy_figures(raw: Mapping[str, Any], reps: int, seed: int) -> dict[str, dict[str, Any]]:
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
            "mia_f1": (mia["f1"], lambda a, b: membership_f1(a <= theta, b <= theta)),
            "mia_tpr_at_1pct_fpr": (mia["tpr_at_1pct_fpr"], lambda a, b: tpr_at_fpr(-a, -b, 0.01)),
        }
        for key, (value, statistic) in statistics.items():
            out[key] = figure(value, split, _two_sample_bootstrap(statistic, members, nonmembers, reps, seed), method,
                              members=len(members), nonmembers=len(nonmembers))
    if dcr.get("share_closer_to_train") is None:
        out["dcr_share"] = figure(None, "train vs holdout_eval", reason=dcr.get("reason"))
    else:
        closer = dcr["closer_to_train"]
        # resampling the synthetic records only: which real patients happened to land in train moves the share
        # more (0.45-0.55 between random splits of independent data at 3,000 rows), so this interval is too narrow
        out["dcr_share"] = figure(dcr["share_closer_to_train"], "train vs holdout_eval",
                                  _bootstrap(lambda i: closer[i].mean(), len(closer), reps, seed),
                                  f"percentile bootstrap over synthetic records ({reps} replicates); the real "
                                  "train/holdout assignment is held fixed, so it understates the uncertainty")
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


def _plausibility_figures(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for side in ("real", "synthetic"):
        entry = raw["any_rule"][side]
        out[f"any_rule_{side}"] = figure(entry.get("rate"), "holdout_eval" if side == "real" else "the set's own records",
                                         entry.get("ci"), "Wilson", entry.get("reason"),
                                         violations=entry.get("violations"), eligible=entry.get("eligible"))
    return out


def score_set(real: RealData, synthetic: np.ndarray, *, seed: int = 0, bootstrap_reps: int = BOOTSTRAP_REPS,
              fidelity_bootstrap_reps: int = FIDELITY_BOOTSTRAP_REPS, known_codes: int = 256,
              timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Every figure for one synthetic set against ``real`` (``raw`` keeps the modules' own output, with arrays)."""
    schema = real.schema
    synthetic = np.asarray(synthetic, dtype=np.float32)
    if synthetic.ndim != 2 or synthetic.shape[1] != schema.dim:
        raise ValueError(f"synthetic vectors must have shape (n, {schema.dim}) (the dataset's schema), got "
                         f"{synthetic.shape}")
    with _timed(timings, "fidelity + dimension-wise"):
        raw_fidelity = fidelity(real.holdout_eval, synthetic, schema, train=real.train, real_split="holdout_eval")
    with _timed(timings, "privacy (MIA, DCR, AIA)"):
        raw_privacy = privacy(real.train, real.holdout_eval, synthetic, schema, known_codes=known_codes, seed=seed)
    with _timed(timings, "plausibility"):
        raw_plausibility = compare_plausibility(real.holdout_eval, synthetic, schema)
    with _timed(timings, "confidence intervals"):
        figures = {
            "fidelity": _fidelity_figures(raw_fidelity, real, synthetic, schema, fidelity_bootstrap_reps, seed),
            "utility": _utility_figures(raw_fidelity["dimension_wise"], bootstrap_reps, seed),
            "privacy": _privacy_figures(raw_privacy, bootstrap_reps, seed),
            "plausibility": _plausibility_figures(raw_plausibility),
        }
    return {"figures": figures, "raw": {"fidelity": raw_fidelity, "privacy": raw_privacy,
                                        "plausibility": raw_plausibility}, "rows": len(synthetic)}


def score_sets(real: RealData, sets: Mapping[str, np.ndarray], *, seed: int = 0,
               bootstrap_reps: int = BOOTSTRAP_REPS, fidelity_bootstrap_reps: int = FIDELITY_BOOTSTRAP_REPS,
               known_codes: int = 256, timings: dict[str, float] | None = None,
               show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """:func:`score_set` for every named set, in order."""
    from tqdm.auto import tqdm

    return {name: score_set(real, vectors, seed=seed, bootstrap_reps=bootstrap_reps,
                            fidelity_bootstrap_reps=fidelity_bootstrap_reps, known_codes=known_codes, timings=timings)
            for name, vectors in tqdm(sets.items(), desc="Scoring", unit="set", disable=not show_progress)}


# ------------------------------------------------------------------------------------------- the run and its report
COMPARISON = (
    ("fidelity", "prevalence_pearson", "Prevalence Pearson r", "higher"),
    ("fidelity", "prevalence_mad_x1000", "Prevalence mean |diff| x1000", "lower"),
    ("fidelity", "cmd_yan", "CMD (Yan, x10^6/d^2)", "lower"),
    ("fidelity", "pairs_pearson", "Top-100 pair rate r", "higher"),
    ("fidelity", "codes_per_patient_wasserstein", "Codes per patient, Wasserstein", "lower"),
    ("fidelity", "age_wasserstein", "Age Wasserstein (years)", "lower"),
    ("utility", "tstr_auroc", "Dimension-wise TSTR AUROC", "higher"),
    ("utility", "auroc_ratio", "TSTR / TRTR AUROC", "higher (1 = real)"),
    ("privacy", "mia_auc", "Membership inference AUC", "0.5"),
    ("privacy", "mia_tpr_at_1pct_fpr", "MIA TPR at 1% FPR", "lower"),
    ("privacy", "aia_f1", "Attribute inference F1 (entropy-weighted)", "lower"),
    ("privacy", "dcr_share", "DCR share closer to train", "0.5"),
    ("plausibility", "any_rule_synthetic", "Records violating a plausibility rule", "lower"),
)
LABELS = {
    "prevalence_pearson": "prevalence Pearson r", "prevalence_spearman": "prevalence Spearman r",
    "prevalence_mad_x1000": "prevalence mean |diff| x1000", "cmd_yan": "CMD, Yan scaling (x10^6/d^2)",
    "cmd_frobenius": "CMD, Frobenius norm", "pairs_pearson": "top-100 code pair rates, Pearson r",
    "codes_per_patient_wasserstein": "codes per patient, Wasserstein",
    "codes_per_patient_real_mean": "codes per patient, real mean",
    "codes_per_patient_synthetic_mean": "codes per patient, synthetic mean",
    "codes_never_generated": "codes of the real split never generated",
    "trtr_auroc": "mean AUROC, trained on real train (TRTR)", "tstr_auroc": "mean AUROC, trained on synthetic (TSTR)",
    "auroc_ratio": "TSTR / TRTR mean AUROC", "trtr_f1": "mean F1, TRTR", "tstr_f1": "mean F1, TSTR",
    "f1_ratio": "TSTR / TRTR mean F1", "agreement": "per-code AUROC agreement (Pearson r, TSTR vs TRTR)",
    "mia_auc": "membership inference ROC AUC", "mia_f1": "membership inference F1 at theta = 5",
    "mia_tpr_at_1pct_fpr": "membership inference TPR at 1% FPR", "dcr_share": "DCR share closer to train",
    "aia_f1": "attribute inference F1 (entropy-weighted), synthetic",
    "aia_baseline_f1": "attribute inference F1, holdout as the attacker's data (baseline)",
    "aia_difference": "attribute inference F1, synthetic minus baseline",
    "any_rule_real": "records violating any rule, real", "any_rule_synthetic": "records violating any rule, synthetic",
}


def _strip_arrays(value: Any) -> Any:
    """The modules' output without per-record arrays and matrices, for metrics.json."""
    if isinstance(value, Mapping):
        return {key: _strip_arrays(item) for key, item in value.items()
                if not (isinstance(item, np.ndarray) and item.size > 64) and not hasattr(item, "tocsr")}
    if isinstance(value, (list, tuple)):
        return [_strip_arrays(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _format_share(shares: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {share:.3f}" for name, share in shares.items())


def _demographics_rows(raw: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, field in raw["fields"].items():
        if "wasserstein" in field:
            rows.append([name, f"Wasserstein {field['wasserstein']:.3f}, KS {field['ks_statistic']:.3f}",
                         f"mean {field['real_mean']:.2f}",
                         f"mean {field['synthetic_mean']:.2f}"])
        else:
            rows.append([name, f"total variation {field['total_variation']:.3f}", _format_share(field["real_shares"]),
                         _format_share(field["synthetic_shares"])])
    return rows


def _per_code_rows(raw: Mapping[str, Any]) -> list[list[str]]:
    def cell(result: Mapping[str, Any], key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    return [[entry["code"], f"{entry['train_prevalence']:.3f}", cell(entry["trtr"], "auroc"), cell(entry["tstr"], "auroc"), cell(entry["trtr"], "f1"),
             cell(entry["tstr"], "f1")] for entry in raw.get("per_code", [])]


def _utility_note(raw: Mapping[str, Any]) -> str:
    if raw.get("split") is None or "means" not in raw:
        return f"Not computed: {raw.get('reason', 'no real train split')}."
    means = raw["means"]
    return (f"The {raw['codes']} codes most prevalent in real train; TRTR = {raw['split']['trtr']}, TSTR = "
            f"{raw['split']['tstr']}. Means over {means.get('codes')} codes the holdout can score; "
            f"{means.get('tstr_untrainable', 0)} codes the synthetic set cannot train (one class) count as the "
            "constant model they imply (AUROC 0.5).")


def _plausibility_rows(raw: Mapping[str, Any]) -> list[list[str]]:
    def cell(side: Mapping[str, Any]) -> str:
        if side.get("rate") is None:
            return f"n/a ({side.get('reason', 'no eligible record')})"
        low, high = side["ci"]
        return f"{side['rate']:.4f} [{low:.4f}, {high:.4f}] ({side['violations']:,}/{side['eligible']:,})"

    return [[rule["description"], rule["source"], cell(rule["real"]), cell(rule["synthetic"])]
            for rule in raw["rules"].values()]


def _prompt_section(raw: Mapping[str, Any] | None, extraction: Mapping[str, Any] | None, reason: str | None,
                    split: str) -> dict[str, Any]:
    if raw is None:
        return {"reason": reason}
    method = "percentile bootstrap over prompts"
    attributes = {}
    for name, entry in raw["attributes"].items():
        ci = entry.get("ci_prompt_bootstrap") or entry.get("ci")
        attributes[name] = figure(entry.get("accuracy"), split, ci, method if entry.get("ci_prompt_bootstrap")
                                  else "Wilson", entry.get("reason"), correct=entry.get("correct"),
                                  total=entry.get("total"))
    overall, every = raw["overall"], raw["all_facts"]
    figures = {
        "overall": figure(overall.get("accuracy"), split, overall.get("ci_prompt_bootstrap") or overall.get("ci"),
                          method, overall.get("reason"), correct=overall.get("correct"), total=overall.get("total")),
        "all_facts": figure(every.get("share"), split, every.get("ci_prompt_bootstrap") or every.get("ci"), method,
                            every.get("reason"), satisfied=every.get("satisfied"), records=every.get("records")),
        **{f"attribute_{name}": value for name, value in attributes.items()},
    }
    if extraction is not None:
        agreement = extraction["agreement"]["overall"]
        figures["extractor_agreement"] = figure(agreement.get("accuracy"), split, agreement.get("ci"), "Wilson",
                                                agreement.get("reason"))
    labels = {"overall": "stated facts held (all attributes)", "all_facts": "records holding every stated fact",
              "extractor_agreement": "extracted facts agreeing with the source patient (checks the extractor)",
              **{f"attribute_{name}": f"accuracy: {name}" for name in attributes}}
    note = (f"{raw['prompts']:,} prompts (summaries of {split} patients), {raw['records']:,} records; "
            f"{raw['prompts_stating_nothing']:,} prompts stated nothing the extractor reads. Age counts within "
            f"{raw['tolerances']['age_years']} years, admissions within {raw['tolerances']['admissions']}.")
    return {"figures": figures, "labels": labels, "attributes": attributes, "note": note,
            "detail": _strip_arrays(raw), "extraction": _strip_arrays(extraction)}


def _correlation_difference(real: np.ndarray, synthetic: np.ndarray, schema: EHRSchema,
                            count: int = HEATMAP_CODES) -> tuple[np.ndarray, list[str]]:
    codes = schema.slices["icd10_categories"]
    real_codes, synthetic_codes = real[:, codes] >= 0.5, synthetic[:, codes] >= 0.5
    top = np.sort(np.argsort(-real_codes.mean(axis=0), kind="stable")[:count])
    difference = correlation_matrix(real_codes[:, top]) - correlation_matrix(synthetic_codes[:, top])
    return difference, [schema.codes[i] for i in top]


def build_metrics(run: Mapping[str, Any], real: RealData, scored: Mapping[str, Mapping[str, Any]],
                  prompts: dict[str, Any], primary: str = "model") -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json's document and the report's plot arrays from :func:`score_sets` and the prompt section."""
    main = scored[primary]
    raw_fidelity, raw_privacy = main["raw"]["fidelity"], main["raw"]["privacy"]
    methods = list(scored)
    comparison_rows = [{"section": section, "key": key, "label": label, "better": better,
                        "split": scored[primary]["figures"][section][key].get("split") or "",
                        "values": {name: scored[name]["figures"][section][key] for name in methods}}
                       for section, key, label, better in COMPARISON]
    dimension_wise = raw_fidelity["dimension_wise"]
    metrics = {
        "run": dict(run),
        "comparison": {"methods": methods, "labels": {name: METHOD_LABELS.get(name, name) for name in methods},
                       "rows": comparison_rows},
        "fidelity": {"figures": main["figures"]["fidelity"], "labels": LABELS,
                     "demographics": _demographics_rows(raw_fidelity["demographics"]),
                     "never_generated": _strip_arrays(raw_fidelity["never_generated"])},
        "utility": {"figures": main["figures"]["utility"], "labels": LABELS,
                    "note": _utility_note(dimension_wise),
                    "per_code": _per_code_rows(dimension_wise)},
        "privacy": {"figures": main["figures"]["privacy"], "labels": LABELS,
                    "note": f"{raw_privacy['membership_inference'].get('members', 0):,} members and non-members; "
                            f"attribute inference on "
                            f"{raw_privacy['attribute_inference'].get('victims', 0):,} train victims with "
                            f"{raw_privacy['attribute_inference'].get('known_columns', 0)} known columns."},
        "prompt_faithfulness": prompts,
        "plausibility": {"rows": _plausibility_rows(main["raw"]["plausibility"]),
                         "figures": main["figures"]["plausibility"],
                         "detail": _strip_arrays({k: v for k, v in main["raw"]["plausibility"].items()
                                                  if k in ("rules", "any_rule")})},
        "methods": {name: {"rows": entry["rows"], "figures": entry["figures"]} for name, entry in scored.items()},
        "definitions": DEFINITIONS,
    }
    codes = real.schema.slices["icd10_categories"]
    synthetic = main["vectors"]
    difference, heat_codes = _correlation_difference(real.holdout_eval, synthetic, real.schema)
    prevalence_section = raw_fidelity["prevalence"]
    plots = {
        "real_prevalence": np.asarray(prevalence_section["real_prevalence"]),
        "synthetic_prevalence": np.asarray(prevalence_section["synthetic_prevalence"]),
        "correlation_difference": difference, "correlation_codes": heat_codes,
        "real_age": real.schema.decode_column("age", real.holdout_eval[:, real.schema.slices["age"].start]),
        "synthetic_age": real.schema.decode_column("age", synthetic[:, real.schema.slices["age"].start]),
        "real_codes_per_patient": (real.holdout_eval[:, codes] >= 0.5).sum(axis=1),
        "synthetic_codes_per_patient": (synthetic[:, codes] >= 0.5).sum(axis=1),
        "member_distances": np.asarray(raw_privacy["membership_inference"].get("member_distances", [])),
        "nonmember_distances": np.asarray(raw_privacy["membership_inference"].get("nonmember_distances", [])),
    }
    return metrics, plots


def baseline_vectors(names: list[str], real: RealData, n: int, seed: int, ehrdiff_steps: int = 4000,
                     device: str = "cpu", show_progress: bool = True) -> dict[str, np.ndarray]:
    """The named baselines' records, ``n`` each, fitted on the whole train split as the model was; the holdout
    reference half is sampled down to ``n`` rows (it cannot grow: a larger ``n`` scores it at its own size, with a
    warning, since CMD, Wasserstein and pair r all depend on the sample size)."""
    from .baselines import BernoulliMarginals, sample_ehrdiff, train_ehrdiff

    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "bernoulli":
            out[name] = BernoulliMarginals().fit(real.train_all, real.schema).sample(n, seed)
        elif name == "holdout":
            reference = real.holdout_reference
            if n < len(reference):
                rows = np.sort(np.random.default_rng(seed).choice(len(reference), n, replace=False))
                reference = reference[rows]
            elif n > len(reference):
                logger.warning("the real holdout baseline has %d rows, fewer than the %d records of the other sets; "
                               "size-dependent figures (CMD, Wasserstein, pair r) are not comparable in its column",
                               len(reference), n)
            out[name] = reference
        elif name == "ehrdiff":
            model = train_ehrdiff(real.train_all, real.schema, steps=ehrdiff_steps, seed=seed, device=device,
                                  show_progress=show_progress)
            out[name] = sample_ehrdiff(model, n, seed=seed, device=device, show_progress=show_progress)
        else:
            raise ValueError(f"--baselines: unknown baseline {name!r}; choose from bernoulli, holdout, ehrdiff")
    return out


def evaluate_pipeline(pipe: Any, real: RealData, *, model_name: str, dataset_name: str, n_records: int | None = None,
                      seed: int = 0, n_prompts: int = 200, records_per_prompt: int = 2,
                      baselines: tuple[str, ...] = ("bernoulli", "holdout"), ehrdiff_steps: int = 4000,
                      bootstrap_reps: int = BOOTSTRAP_REPS, fidelity_bootstrap_reps: int = FIDELITY_BOOTSTRAP_REPS,
                      batch_size: int = 4096,
                      generation: Mapping[str, Any] | None = None, show_progress: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generates the model's records, scores them with the baselines and returns ``(metrics, plots)``."""
    from ..sampling import generate_records

    try:
        model_schema = pipe.schema
    except ValueError as error:
        raise ValueError(f"--model {model_name}: {error}") from None
    check_same_schema(real.schema, model_schema, f"--dataset {dataset_name}", f"--model {model_name}")
    if n_records is not None and n_records < 2:
        raise ValueError(f"--n-records must be at least 2 (fidelity compares distributions), got {n_records}")
    generation = dict(generation or {})
    n = n_records or len(real.holdout_eval)
    unconditional = generate_records(pipe, None, n, batch_size=batch_size, seed=seed, show_progress=show_progress,
                                     **{k: v for k, v in generation.items() if k != "guidance_scale"})
    sets = {"model": unconditional.vectors,
            **baseline_vectors(list(baselines), real, n, seed, ehrdiff_steps, str(pipe._execution_device),
                               show_progress)}
    scored = dict(score_sets(real, sets, seed=seed, bootstrap_reps=bootstrap_reps,
                             fidelity_bootstrap_reps=fidelity_bootstrap_reps, show_progress=show_progress))
    scored["model"]["vectors"] = unconditional.vectors

    prompts_raw = extraction = None
    reason = None
    prompts = (real.eval_summaries or [])[:n_prompts]
    if n_prompts <= 0:
        reason = "--n-prompts 0"
    elif not prompts:
        reason = "the dataset has no summary column (run `ehr-diffusers label`)"
    elif pipe.text_embedder is None:
        reason = "the pipeline has no text embedder (pass --text-embedder)"
    else:
        prompted = generate_records(pipe, prompts, records_per_prompt, batch_size=batch_size, seed=seed + 1,
                                    show_progress=show_progress, **generation)
        prompts_raw = prompt_faithfulness(prompted.prompts, prompted.records, bootstrap_reps=bootstrap_reps,
                                          seed=seed)
        extraction = extraction_agreement(prompts, real.eval_records[:len(prompts)], bootstrap_reps=bootstrap_reps,
                                          seed=seed)
    run = {"model": model_name, "dataset": dataset_name, "seed": seed, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "ehr_diffusers_version": __version__, "synthetic_data": real.synthetic_data,
           "train_rows": real.train_rows, "train_rows_used": len(real.train), "holdout_rows": real.holdout_rows,
           "holdout_eval_rows": len(real.holdout_eval), "holdout_reference_rows": len(real.holdout_reference),
           "synthetic_rows": n, "baselines": list(baselines), "bootstrap_replicates": bootstrap_reps,
           "fidelity_bootstrap_replicates": fidelity_bootstrap_reps,
           "generation": {"unconditional": True, "batch_size": batch_size, **generation,
                          "prompted": {"prompts": len(prompts), "records_per_prompt": records_per_prompt}}}
    section = _prompt_section(prompts_raw, extraction, reason, "holdout_eval")
    return build_metrics(run, real, scored, section)
