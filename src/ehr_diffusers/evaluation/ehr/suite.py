"""One EHR evaluation run: the model's records and the baselines', scored the same way against the same real records,
with a confidence interval on every figure (:mod:`.figures`); the report and ``ehr-diffusers evaluate`` render what
this returns.

What is scored. Fidelity and privacy use unconditional records (the learned null condition): records prompted with
real patients' summaries would carry those patients into the synthetic set and flatter fidelity against them (and
fake privacy, as the holdout would look like "members"). Prompt faithfulness is measured on its own, on records
prompted with summaries of holdout patients (the evaluation half, :mod:`~ehr_diffusers.evaluation.ehr.data`), with
a bootstrap over prompts (records of one prompt are not independent).

Seeds: the benchmark (``benchmarks/fidelity_table.py``) repeats runs over seeds; within a run the intervals are the
uncertainty.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from ... import __version__
from ...data.ehr.schema import EHRSchema
from .baselines import baseline_vectors
from .clinical import compare_plausibility
from .conditional import extraction_agreement, prompt_faithfulness
from .data import RealData, check_same_schema
from .fidelity import correlation_matrix, fidelity
from .figures import fidelity_figures, plausibility_figures, privacy_figures, utility_figures
from .presentation import (
    COMPARISON,
    DEFINITIONS,
    LABELS,
    METHOD_LABELS,
    demographics_rows,
    per_code_rows,
    plausibility_rows,
    prompt_section,
    strip_arrays,
    utility_note,
)
from .privacy import privacy

# isort: split
from .figures import FIDELITY_FIGURES, figure, figure_support  # noqa: F401  (re-exported: old import path)

BOOTSTRAP_REPS = 200  # percentile intervals (cheap: per-record arrays)
FIDELITY_BOOTSTRAP_REPS = 50  # normal intervals of the fidelity figures (one sparse Gram matrix each)
HEATMAP_CODES = 40


@contextmanager
def _timed(timings: dict[str, float] | None, step: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    if timings is not None:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - started


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
            "fidelity": fidelity_figures(raw_fidelity, real, synthetic, schema, fidelity_bootstrap_reps, seed),
            "utility": utility_figures(raw_fidelity["dimension_wise"], bootstrap_reps, seed),
            "privacy": privacy_figures(raw_privacy, bootstrap_reps, seed),
            "plausibility": plausibility_figures(raw_plausibility),
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
                     "demographics": demographics_rows(raw_fidelity["demographics"]),
                     "never_generated": strip_arrays(raw_fidelity["never_generated"])},
        "utility": {"figures": main["figures"]["utility"], "labels": LABELS,
                    "note": utility_note(dimension_wise),
                    "per_code": per_code_rows(dimension_wise)},
        "privacy": {"figures": main["figures"]["privacy"], "labels": LABELS,
                    "note": f"{raw_privacy['membership_inference'].get('members', 0):,} members and non-members; "
                            f"attribute inference on "
                            f"{raw_privacy['attribute_inference'].get('victims', 0):,} train victims with "
                            f"{raw_privacy['attribute_inference'].get('known_columns', 0)} known columns."},
        "prompt_faithfulness": prompts,
        "plausibility": {"rows": plausibility_rows(main["raw"]["plausibility"]),
                         "figures": main["figures"]["plausibility"],
                         "detail": strip_arrays({k: v for k, v in main["raw"]["plausibility"].items()
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


def evaluate_pipeline(pipe: Any, real: RealData, *, model_name: str, dataset_name: str, n_records: int | None = None,
                      seed: int = 0, n_prompts: int = 200, records_per_prompt: int = 2,
                      baselines: tuple[str, ...] = ("bernoulli", "holdout"), ehrdiff_steps: int = 4000,
                      bootstrap_reps: int = BOOTSTRAP_REPS, fidelity_bootstrap_reps: int = FIDELITY_BOOTSTRAP_REPS,
                      batch_size: int = 4096,
                      generation: Mapping[str, Any] | None = None, show_progress: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generates the model's records, scores them with the baselines and returns ``(metrics, plots)``."""
    from ...sampling import generate_records

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
    section = prompt_section(prompts_raw, extraction, reason, "holdout_eval")
    return build_metrics(run, real, scored, section)
