"""How an EHR evaluation is presented: the method and figure labels, the definitions, the rows of the comparison
table, and the table rows and notes that ``metrics.json`` carries for the report (formatting only: every number
comes from the scoring modules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .figures import figure

METHOD_LABELS = {"model": "this model", "bernoulli": "independent marginals", "train": "real train rows (reference)",
                 "ehrdiff": "EHRDiff-style EDM", "seed_sampler": "seed sampler on this model"}

DEFINITIONS = {
    "real split": "every fidelity and plausibility figure compares a set with the whole real holdout (patients no "
                  "model saw); every method is scored against the same holdout at the same size",
    "real train rows (reference)": "a seeded sample of the real train split, as many rows as the other sets: what "
                                   "real patients reach against the holdout (fidelity), and what a generator that "
                                   "copies its training patients shows (memorisation)",
    "pair rate r": "Pearson r of the co-occurrence rates P(code i and code j) of the holdout's 100 most frequent "
                   "code pairs, holdout vs the set",
    "pair rate r, all frequent pairs": "the same over every pair of codes with holdout prevalence >= 0.5%; most of "
                                       "those rates are a few patients, so sampling noise caps it well below 1 even "
                                       "for real rows (see the real train rows column)",
    "codes per patient": "1-Wasserstein distance between the holdout's and the set's distributions of ICD-10 "
                         "categories per record, the set's mean and its maximum (the holdout's in the 'better' "
                         "column)",
    "prevalence Pearson/Spearman r": "correlation of per-code prevalences (share of patients with the ICD-10 "
                                     "category), holdout vs the set, over all codes of the vocabulary",
    "Wasserstein": "1-Wasserstein (earth mover's) distance between the real and synthetic distributions, in the "
                   "field's units (years, admissions, codes)",
    "prevalence |diff| x1000": "mean absolute difference of per-code prevalences, times 1,000",
    "CMD (Yan)": "Frobenius norm of the difference of the code-code Pearson correlation matrices, / d^2 x 10^6 "
                 "(Yan et al. 2022)",
    "total variation": "half the L1 distance between category shares (0 identical, 1 disjoint)",
    "TRTR / TSTR": "dimension-wise prediction (Choi et al. 2017): per code, a logistic regression trained on real "
                   "train rows (TRTR; a seeded train sample as large as the synthetic set) or on synthetic records "
                   "(TSTR) predicts the code from all other columns; both are tested on the real holdout; F1 at the "
                   "threshold that maximises F1 on the model's own training set",
    "membership inference": "members = real train rows, non-members = real holdout rows (equal numbers: a train "
                            "sample and half the holdout); score = minus the Hamming/squared distance to the nearest "
                            "synthetic record; AUC 0.5 is chance; F1 at theta = 5 calls records within distance 5 "
                            "members",
    "attribute inference": "the attacker knows demographics and the 256 most common codes of a train patient, takes "
                           "the nearest synthetic record and predicts the other codes; entropy-weighted F1; the "
                           "baseline does the same with real holdout patients",
    "DCR share": "memorisation audit: for each synthetic record, the Jaccard distance of its code set to the nearest "
                 "record of a train sample as large as the holdout and to the nearest holdout record; the share "
                 "closer to train, ties counted half (0.5: no closer to training patients than to unseen ones; 1: "
                 "copies of the sampled patients; a copy of a train patient outside the sample looks fresh, which the "
                 "exact-copy rate catches). It replaces the earlier DCR over squared distances of whole vectors to "
                 "half-holdout-size samples",
    "exact-copy rate": "memorisation audit: among the set's records with at least 2 codes, the share whose exact set "
                       "of codes is some train patient's; the holdout's own rate (its records with at least 2 codes "
                       "whose set occurs in train) is the chance level shown beside it",
    "plausibility": "share of records that violate a clinical rule (sex- or age-specific ICD-10-CM codes, "
                    "contradictory one-hot fields)",
    "prompt faithfulness": "share of stated facts (sex, age within 5 years, death, admissions within 1, marital "
                           "status, race, each stated diagnosis) that the record generated from the prompt holds; "
                           "prompts are summaries of a seeded sample of train patients, never of the holdout",
}


# The comparison table, headline figures first: (section, figure key, label, better).
COMPARISON = (
    ("fidelity", "pairs_pearson", "Pair rate r (holdout's top-100 pairs)", "higher"),
    ("fidelity", "pairs_pearson_all", "Pair rate r (all pairs of codes >= 0.5%)", "higher (noise caps it < 1)"),
    ("fidelity", "codes_per_patient_wasserstein", "Codes per patient, Wasserstein", "lower"),
    ("fidelity", "codes_per_patient_synthetic_mean", "Codes per patient, mean", "close to real"),
    ("fidelity", "codes_per_patient_synthetic_max", "Codes per patient, max", "close to real"),
    ("fidelity", "prevalence_pearson", "Prevalence Pearson r", "higher"),
    ("fidelity", "prevalence_spearman", "Prevalence Spearman rho", "higher"),
    ("fidelity", "age_wasserstein", "Age Wasserstein (years)", "lower"),
    ("fidelity", "num_admissions_wasserstein", "Admissions Wasserstein (count)", "lower"),
    ("utility", "tstr_auroc", "Dimension-wise TSTR AUROC", "higher"),
    ("utility", "auroc_ratio", "TSTR / TRTR AUROC", "higher (1 = real)"),
    ("fidelity", "cmd_yan", "CMD (Yan, x10^6/d^2)", "lower"),
    ("fidelity", "prevalence_mad_x1000", "Prevalence mean |diff| x1000", "lower"),
    ("privacy", "mia_auc", "Membership inference AUC", "0.5"),
    ("privacy", "mia_tpr_at_1pct_fpr", "MIA TPR at 1% FPR", "lower"),
    ("privacy", "aia_f1", "Attribute inference F1 (entropy-weighted)", "lower"),
    ("privacy", "dcr_share", "DCR share closer to train (Jaccard, code sets)", "0.5"),
    ("privacy", "exact_copy_rate", "Exact copies of a train code set (>= 2 codes)", "at most the holdout's"),
    ("plausibility", "any_rule_synthetic", "Records violating a plausibility rule", "lower"),
)
# Rows whose "better" names a real value: the figure holding it, in the primary method's figures.
REAL_REFERENCES = {"codes_per_patient_synthetic_mean": ("fidelity", "codes_per_patient_real_mean"),
                   "codes_per_patient_synthetic_max": ("fidelity", "codes_per_patient_real_max"),
                   "exact_copy_rate": ("privacy", "holdout_copy_rate"),
                   "any_rule_synthetic": ("plausibility", "any_rule_real")}
LABELS = {
    "prevalence_pearson": "prevalence Pearson r", "prevalence_spearman": "prevalence Spearman rho",
    "prevalence_mad_x1000": "prevalence mean |diff| x1000", "cmd_yan": "CMD, Yan scaling (x10^6/d^2)",
    "cmd_frobenius": "CMD, Frobenius norm", "pairs_pearson": "holdout's top-100 code pair rates, Pearson r",
    "pairs_pearson_all": "rates of all pairs of codes with holdout prevalence >= 0.5%, Pearson r",
    "codes_per_patient_wasserstein": "codes per patient, Wasserstein",
    "codes_per_patient_real_mean": "codes per patient, real mean",
    "codes_per_patient_synthetic_mean": "codes per patient, synthetic mean",
    "codes_per_patient_real_max": "codes per patient, real max",
    "codes_per_patient_synthetic_max": "codes per patient, synthetic max",
    "codes_never_generated": "codes of the real split never generated",
    "trtr_auroc": "mean AUROC, trained on real train (TRTR)", "tstr_auroc": "mean AUROC, trained on synthetic (TSTR)",
    "auroc_ratio": "TSTR / TRTR mean AUROC", "trtr_f1": "mean F1, TRTR", "tstr_f1": "mean F1, TSTR",
    "f1_ratio": "TSTR / TRTR mean F1", "agreement": "per-code AUROC agreement (Pearson r, TSTR vs TRTR)",
    "mia_auc": "membership inference ROC AUC", "mia_f1": "membership inference F1 at theta = 5",
    "mia_tpr_at_1pct_fpr": "membership inference TPR at 1% FPR",
    "dcr_share": "DCR share closer to train (Jaccard over code sets)",
    "exact_copy_rate": "exact copies of a train code set, among records with >= 2 codes",
    "holdout_copy_rate": "holdout records with >= 2 codes whose code set occurs in train (reference)",
    "aia_f1": "attribute inference F1 (entropy-weighted), synthetic",
    "aia_baseline_f1": "attribute inference F1, holdout as the attacker's data (baseline)",
    "aia_difference": "attribute inference F1, synthetic minus baseline",
    "any_rule_real": "records violating any rule, real", "any_rule_synthetic": "records violating any rule, synthetic",
}


def with_reference(better: str, real: Mapping[str, Any]) -> str:
    """The "better" cell of a row whose target is a real value: "close to real; holdout 9.87"."""
    value = real.get("value")
    if value is None:
        return better
    text = f"{value:,}" if isinstance(value, int) else f"{value:.3f}" if abs(value) < 1 else f"{value:,.2f}"
    return f"{better}; holdout {text}"


def strip_arrays(value: Any) -> Any:
    """The modules' output without per-record arrays and matrices, for metrics.json."""
    if isinstance(value, Mapping):
        return {key: strip_arrays(item) for key, item in value.items()
                if not (isinstance(item, np.ndarray) and item.size > 64) and not hasattr(item, "tocsr")}
    if isinstance(value, (list, tuple)):
        return [strip_arrays(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _format_share(shares: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {share:.3f}" for name, share in shares.items())


def demographics_rows(raw: Mapping[str, Any]) -> list[list[str]]:
    """Per demographic field: the distance, and the real and synthetic means or category shares."""
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


def per_code_rows(raw: Mapping[str, Any]) -> list[list[str]]:
    """Per code of dimension-wise prediction: train prevalence, AUROC and F1 of TRTR and TSTR."""
    def cell(result: Mapping[str, Any], key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    return [[entry["code"], f"{entry['train_prevalence']:.3f}", cell(entry["trtr"], "auroc"),
             cell(entry["tstr"], "auroc"), cell(entry["trtr"], "f1"), cell(entry["tstr"], "f1")]
            for entry in raw.get("per_code", [])]


def utility_note(raw: Mapping[str, Any]) -> str:
    """What the dimension-wise means are taken over, or why they were not computed."""
    if raw.get("split") is None or "means" not in raw:
        return f"Not computed: {raw.get('reason', 'no real train split')}."
    means, model = raw["means"], raw["model"]
    return (f"The {raw['codes']} codes most prevalent in real train; TRTR = {raw['split']['trtr']} (trained on "
            f"{model['trtr']['rows']:,} real train rows), TSTR = {raw['split']['tstr']} (trained on "
            f"{model['tstr']['rows']:,} records). Means over {means.get('codes')} codes the holdout can score; "
            f"{means.get('tstr_untrainable', 0)} codes the synthetic set cannot train (one class) count as the "
            "constant model they imply (AUROC 0.5).")


def plausibility_rows(raw: Mapping[str, Any]) -> list[list[str]]:
    """Per clinical rule: its source and the real and synthetic violation rates with their Wilson intervals."""
    def cell(side: Mapping[str, Any]) -> str:
        if side.get("rate") is None:
            return f"n/a ({side.get('reason', 'no eligible record')})"
        low, high = side["ci"]
        return f"{side['rate']:.4f} [{low:.4f}, {high:.4f}] ({side['violations']:,}/{side['eligible']:,})"

    return [[rule["description"], rule["source"], cell(rule["real"]), cell(rule["synthetic"])]
            for rule in raw["rules"].values()]


def prompt_section(raw: Mapping[str, Any] | None, extraction: Mapping[str, Any] | None, reason: str | None,
                   split: str) -> dict[str, Any]:
    """The prompt faithfulness section of metrics.json: figures with their intervals, labels and a note; the reason
    alone when prompts were not measured."""
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
    note = (f"{raw['prompts']:,} distinct prompts from {split}; {raw['records']:,} records; "
            f"{raw['prompts_stating_nothing']:,} prompts stated nothing the extractor reads. Age counts within "
            f"{raw['tolerances']['age_years']} years, admissions within {raw['tolerances']['admissions']}.")
    return {"figures": figures, "labels": labels, "attributes": attributes, "note": note,
            "detail": strip_arrays(raw), "extraction": strip_arrays(extraction)}
