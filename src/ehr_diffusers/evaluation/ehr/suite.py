"""One EHR evaluation run: the model's records and the baselines', scored the same way against the same real records,
with a confidence interval on every figure (:mod:`.figures`); the report and ``ehr-diffusers evaluate`` render what
this returns.

What is scored. Fidelity and privacy use unconditional records (the learned null condition), 4,000 by default:
records prompted with real patients' summaries would carry those patients into the synthetic set and flatter fidelity
against them (and fake privacy, as the holdout would look like "members"). Every fidelity figure, the dimension-wise
test set and plausibility use the whole holdout (:mod:`~ehr_diffusers.evaluation.ehr.data`); membership inference
keeps equal halves (a train sample as members, half the holdout as non-members); the memorisation audit compares with
the whole train split and the whole holdout. Each set is scored beside the independent-marginals baseline and real
train rows (the reference) of the same size. Prompt faithfulness is measured on its own, on records prompted with
summaries of a seeded sample of train patients (never the holdout, whose patients are scored; prompts a caller passes
are checked against the holdout's summaries), with a bootstrap over prompts (records of one prompt are not
independent).

Seeds: the benchmark (``benchmarks/fidelity_table.py``) repeats runs over seeds; within a run the intervals are the
uncertainty.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ... import __version__
from ...data.ehr.schema import EHRSchema
from ...errors import ArgumentError, DataError, ModelError
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
    REAL_REFERENCES,
    demographics_rows,
    per_code_rows,
    plausibility_rows,
    prompt_section,
    strip_arrays,
    utility_note,
    with_reference,
)
from .privacy import memorisation, privacy

# isort: split
from .figures import FIDELITY_FIGURES, figure, figure_support  # noqa: F401  (re-exported: old import path)

DEFAULT_RECORDS = 4000  # unconditional records scored: enough that pair rates and maxima are not sampling noise
DEFAULT_BASELINES = ("bernoulli", "train")
BOOTSTRAP_REPS = 200  # percentile intervals (cheap: per-record arrays)
FIDELITY_BOOTSTRAP_REPS = 50  # normal intervals of the fidelity figures (one sparse Gram matrix each)
HEATMAP_CODES = 40
# What each part of the run is scored against (metrics.json's run["splits"]).
SPLITS = {
    "fidelity, plausibility": "holdout (every row)",
    "dimension-wise prediction": "trained on real train rows (as many as the set's records) or on the set, tested on "
                                 "the holdout (every row)",
    "membership inference": "a train sample (members) vs holdout_eval, a seeded half of the holdout (non-members)",
    "attribute inference": "victims: the train sample; baseline attacker's data: holdout_eval",
    "memorisation audit": "DCR: a train sample as large as the holdout vs the holdout; exact copies: the whole train "
                          "split",
    "prompts": "train (never the holdout)",
}


@contextmanager
def _timed(timings: dict[str, float] | None, step: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    if timings is not None:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - started


def score_set(real: RealData, synthetic: np.ndarray, *, seed: int = 0, bootstrap_reps: int = BOOTSTRAP_REPS,
              fidelity_bootstrap_reps: int = FIDELITY_BOOTSTRAP_REPS, known_codes: int = 256,
              timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Every figure for one synthetic set against ``real`` (``raw`` keeps the modules' own output, with arrays).
    TRTR trains on ``real.train_sample(len(synthetic), seed)``, as many real train rows as TSTR has records."""
    schema = real.schema
    synthetic = np.asarray(synthetic, dtype=np.float32)
    if synthetic.ndim != 2 or synthetic.shape[1] != schema.dim:
        raise ValueError(f"synthetic vectors must have shape (n, {schema.dim}) (the dataset's schema), got "
                         f"{synthetic.shape}")
    with _timed(timings, "fidelity + dimension-wise"):
        raw_fidelity = fidelity(real.holdout, synthetic, schema, train=real.train_sample(len(synthetic), seed),
                                real_split="holdout")
    with _timed(timings, "privacy (MIA, AIA)"):
        raw_privacy = privacy(real.train, real.holdout_eval, synthetic, schema, known_codes=known_codes, seed=seed)
    with _timed(timings, "memorisation (DCR, copies)"):
        raw_privacy.update(memorisation(real.train_all, real.holdout, synthetic, schema, seed=seed))
    with _timed(timings, "plausibility"):
        raw_plausibility = compare_plausibility(real.holdout, synthetic, schema)
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
                  prompts: dict[str, Any], primary: str = "model",
                  autoencoder: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json's document and the report's plot arrays from :func:`score_sets` and the prompt section."""
    main = scored[primary]
    raw_fidelity, raw_privacy = main["raw"]["fidelity"], main["raw"]["privacy"]
    methods = list(scored)

    def value(name: str, section: str, key: str) -> dict[str, Any]:
        return scored[name]["figures"][section].get(key) or figure(None, None, reason="the schema has no such field")

    comparison_rows = []
    for section, key, label, better in COMPARISON:
        row = {"section": section, "key": key, "label": label, "better": better,
               "split": value(primary, section, key).get("split") or "",
               "values": {name: value(name, section, key) for name in methods}}
        if key in REAL_REFERENCES:
            row["real"] = value(primary, *REAL_REFERENCES[key])
            row["better"] = with_reference(better, row["real"])
        comparison_rows.append(row)
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
                            f"{raw_privacy['attribute_inference'].get('known_columns', 0)} known columns; "
                            f"memorisation audit against all {real.train_rows:,} train and {len(real.holdout):,} "
                            f"holdout patients (DCR: a train sample of "
                            f"{raw_privacy['distance_to_closest_record'].get('train_rows', 0):,})."},
        "prompt_faithfulness": prompts,
        "plausibility": {"rows": plausibility_rows(main["raw"]["plausibility"]),
                         "figures": main["figures"]["plausibility"],
                         "detail": strip_arrays({k: v for k, v in main["raw"]["plausibility"].items()
                                                  if k in ("rules", "any_rule")})},
        "methods": {name: {"rows": entry["rows"], "figures": entry["figures"]} for name, entry in scored.items()},
        "autoencoder_reconstruction": dict(autoencoder) if autoencoder else None,
        "definitions": DEFINITIONS,
    }
    codes = real.schema.slices["icd10_categories"]
    synthetic = main["vectors"]
    difference, heat_codes = _correlation_difference(real.holdout, synthetic, real.schema)
    prevalence_section = raw_fidelity["prevalence"]
    plots = {
        "real_prevalence": np.asarray(prevalence_section["real_prevalence"]),
        "synthetic_prevalence": np.asarray(prevalence_section["synthetic_prevalence"]),
        "correlation_difference": difference, "correlation_codes": heat_codes,
        "real_age": real.schema.decode_column("age", real.holdout[:, real.schema.slices["age"].start]),
        "synthetic_age": real.schema.decode_column("age", synthetic[:, real.schema.slices["age"].start]),
        "real_codes_per_patient": (real.holdout[:, codes] >= 0.5).sum(axis=1),
        "synthetic_codes_per_patient": (synthetic[:, codes] >= 0.5).sum(axis=1),
        "member_distances": np.asarray(raw_privacy["membership_inference"].get("member_distances", [])),
        "nonmember_distances": np.asarray(raw_privacy["membership_inference"].get("nonmember_distances", [])),
    }
    return metrics, plots


def _prompts(real: RealData, prompts: Sequence[str] | None,
             n_prompts: int) -> tuple[list[str], list[dict[str, Any]] | None, str]:
    """The prompts, their source records (for the extractor check; None for a caller's prompts) and their split."""
    if prompts is None:
        chosen = (real.prompts or [])[:max(n_prompts, 0)]
        return chosen, real.prompt_records[:len(chosen)], "train (summaries of a seeded sample of train patients)"
    prompts = list(prompts)
    leaked = [prompt for prompt in prompts if prompt in real.holdout_summaries]
    if leaked:
        raise DataError(f"prompts: {len(leaked)} of the {len(prompts)} prompts are summaries of holdout patients "
                         f"(first: {leaked[0]!r}); prompts must come from the train split, as the holdout is what the "
                         "records are scored against")
    return prompts, None, "given by the caller (checked: none is a holdout summary)"


def evaluate_pipeline(pipe: Any, real: RealData, *, model_name: str, dataset_name: str,
                      n_records: int = DEFAULT_RECORDS, seed: int = 0, n_prompts: int = 200,
                      records_per_prompt: int = 2, prompts: Sequence[str] | None = None,
                      baselines: tuple[str, ...] = DEFAULT_BASELINES, ehrdiff_steps: int = 4000,
                      bootstrap_reps: int = BOOTSTRAP_REPS, fidelity_bootstrap_reps: int = FIDELITY_BOOTSTRAP_REPS,
                      batch_size: int = 4096,
                      generation: Mapping[str, Any] | None = None, show_progress: bool = True,
                      autoencoder_metrics: Mapping[str, Any] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generates the model's records, scores them with the baselines and returns ``(metrics, plots)``.

    ``prompts`` (default: ``n_prompts`` summaries of train patients, ``real.prompts``) are refused with a ValueError
    when any is a holdout patient's summary. ``generation`` goes to the pipeline; its decode mode defaults to the
    pipeline's own (``pipe.config.decode_mode``, "threshold" for pipelines saved without one) and is recorded.
    ``autoencoder_metrics`` (the training's ``autoencoder_metrics.json``) brings the autoencoder's reconstruction of
    holdout records, scored beside independent marginals, into the report."""
    from ...sampling import generate_records

    try:
        model_schema = pipe.schema
    except ValueError as error:
        raise ModelError(f"--model {model_name}: {error}") from None
    check_same_schema(real.schema, model_schema, f"--dataset {dataset_name}", f"--model {model_name}")
    if n_records < 2:
        raise ArgumentError(f"--n-records must be at least 2 (fidelity compares distributions), got {n_records}")
    prompts, source_records, prompt_split = _prompts(real, prompts, n_prompts)
    generation = dict(generation or {})
    if generation.get("decode_mode") is None:
        generation["decode_mode"] = getattr(pipe.config, "decode_mode", "threshold")
    unconditional = generate_records(pipe, None, n_records, batch_size=batch_size, seed=seed,
                                     show_progress=show_progress,
                                     **{k: v for k, v in generation.items() if k != "guidance_scale"})
    sets = {"model": unconditional.vectors,
            **baseline_vectors(list(baselines), real, n_records, seed, ehrdiff_steps, str(pipe._execution_device),
                               show_progress)}
    scored = dict(score_sets(real, sets, seed=seed, bootstrap_reps=bootstrap_reps,
                             fidelity_bootstrap_reps=fidelity_bootstrap_reps, show_progress=show_progress))
    scored["model"]["vectors"] = unconditional.vectors

    prompts_raw = extraction = None
    reason = None
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
        if source_records is not None:
            extraction = extraction_agreement(prompts, source_records, bootstrap_reps=bootstrap_reps, seed=seed)
    run = {"model": model_name, "dataset": dataset_name, "seed": seed, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "ehr_diffusers_version": __version__, "synthetic_data": real.synthetic_data,
           "train_rows": real.train_rows, "train_rows_used": len(real.train), "holdout_rows": real.holdout_rows,
           "holdout_eval_rows": len(real.holdout_eval), "synthetic_rows": n_records, "baselines": list(baselines),
           "splits": SPLITS, "bootstrap_replicates": bootstrap_reps,
           "fidelity_bootstrap_replicates": fidelity_bootstrap_reps,
           "generation": {"unconditional": True, "batch_size": batch_size, **generation,
                          "prompted": {"prompts": len(prompts), "records_per_prompt": records_per_prompt,
                                       "split": prompt_split}}}
    section = prompt_section(prompts_raw, extraction, reason, prompt_split)
    return build_metrics(run, real, scored, section,
                         autoencoder=(autoencoder_metrics or {}).get("holdout_figures"))
