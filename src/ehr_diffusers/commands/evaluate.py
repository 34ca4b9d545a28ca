"""``evaluate`` and ``evaluate-cxr``: a trained pipeline scored against held-out real data, its controls and the
baselines; the report and the model card's metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, DataError, ModelError
from ..training import AUTOENCODER_METRICS_NAME
from .common import load_pipeline, local_folder, torch_device


def _baseline_names(text: str) -> tuple[str, ...]:
    from ..evaluation.ehr.baselines import BASELINES, HOLDOUT_DROPPED

    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if names in ((), ("none",)):
        return ()
    if "holdout" in names:
        raise ArgumentError(HOLDOUT_DROPPED)
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ArgumentError(f"--baselines: unknown baseline(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(BASELINES)}, or none")
    return names


def _saved_schema(model: Path | None):
    """The record schema a local pipeline folder records in its ``model_index.json`` (None when there is none), read
    without loading the model; it is checked against its sha256 like a dataset's."""
    from ..data.ehr.schema import EHRSchema

    index = model / "model_index.json" if model is not None else None
    if index is None or not index.is_file():
        return None
    try:
        schema = json.loads(index.read_text(encoding="utf-8")).get("schema")
    except (ValueError, AttributeError) as error:
        raise ModelError(f"--model {model}: model_index.json is not a JSON object ({error})") from None
    if not schema:
        return None
    try:
        return EHRSchema.from_dict(schema)
    except DataError as error:
        raise ModelError(f"--model {model}: model_index.json: {error}") from None


def run_evaluation(model: str, dataset: Path, out: Path, *, overwrite: bool = False, model_card: bool = True,
                   quiet: bool = False, text_embedder: str | None = None, device: str | None = None,
                   names: tuple[str, str] | None = None, **options) -> tuple[dict, Path]:
    """``ehr-diffusers evaluate``: the report folder written whole (or not at all), then the model card's metrics.
    ``names`` are the model and dataset as the report states them (default: the paths given)."""
    from ..data.ehr.dataset import load_training_dataset
    from ..evaluation.ehr.data import check_same_schema
    from ..hub.errors import check_model_path
    from ..io import atomic_directory, check_output_dir

    # everything a user can get wrong is checked here, before the records are read and the model loads
    local_model = local_folder(model)
    check_output_dir(out, overwrite, {"--model": local_model, "--dataset": dataset}, argument="--out")
    check_model_path(model, "--model")
    if device is not None:  # the default needs no check (and no torch yet)
        torch_device(device)
    if options.get("n_records", 2) < 2:
        raise ArgumentError(f"--n-records must be at least 2 (fidelity compares distributions), got "
                            f"{options['n_records']}")
    dataset_schema = load_training_dataset(dataset, splits=("train", "holdout"), argument="--dataset")[1]
    model_schema = _saved_schema(local_model)
    if model_schema is not None:
        check_same_schema(dataset_schema, model_schema, f"--dataset {dataset}", f"--model {model}")

    # the checks passed: now the modules that load the records, diffusers and the model
    from ..evaluation.ehr.data import PROMPT_ROWS, load_real_data
    from ..evaluation.ehr.suite import evaluate_pipeline
    from ..evaluation.report import REPORT_NAME, model_card_markdown, write_report
    from ..hub.cards import update_model_card_metrics

    real = load_real_data(dataset, seed=options.get("seed", 0), show_progress=not quiet,
                          prompt_rows=max(options.get("n_prompts", PROMPT_ROWS), 0))
    pipe = load_pipeline(model, text_embedder, device)
    model_name, dataset_name = names or (model, str(dataset))
    reconstruction = Path(model) / AUTOENCODER_METRICS_NAME
    autoencoder_metrics = json.loads(reconstruction.read_text()) if reconstruction.is_file() else None
    metrics, plots = evaluate_pipeline(pipe, real, model_name=model_name, dataset_name=dataset_name,
                                       show_progress=not quiet, autoencoder_metrics=autoencoder_metrics, **options)
    with atomic_directory(out, overwrite) as work:
        write_report(metrics, plots, work)
    card = Path(model) / "README.md"
    if model_card and card.is_file():
        update_model_card_metrics(card, model_card_markdown(metrics))
    return metrics, out / REPORT_NAME


def run(args: argparse.Namespace) -> None:
    generation = {}
    if args.decode_mode is not None:
        generation["decode_mode"] = args.decode_mode
    if args.steps is not None:
        generation["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        generation["guidance_scale"] = args.guidance_scale
    metrics, report = run_evaluation(
        args.model, args.dataset, args.out, overwrite=args.overwrite, model_card=not args.no_model_card,
        quiet=args.quiet, text_embedder=args.text_embedder, device=args.device, n_records=args.n_records,
        seed=args.seed, n_prompts=args.n_prompts, records_per_prompt=args.records_per_prompt,
        baselines=_baseline_names(args.baselines), ehrdiff_steps=args.ehrdiff_steps, bootstrap_reps=args.bootstrap,
        fidelity_bootstrap_reps=args.fidelity_bootstrap,
        batch_size=args.batch_size, generation=generation)
    from ..evaluation.report import model_card_markdown

    print(model_card_markdown(metrics))
    print(f"report written to {report} (figures with their splits and CIs in {args.out / 'metrics.json'})")


def run_cxr_evaluation(model: str, dataset: Path, out: Path, *, split: str = "test", extractor: Any = "classifier",
                       steps: int = 25, guidance_scale: float = 1.0, eta: float = 1.0, seed: int = 0,
                       bootstrap: int = 200, batch_size: int = 64, overwrite: bool = False, model_card: bool = True,
                       quiet: bool = False, device: str | None = None, names: tuple[str, str] | None = None
                       ) -> tuple[dict, Path]:
    """``ehr-diffusers evaluate-cxr``: an EHRXDiff pipeline scored on one split of a triplet dataset against its
    event controls and the baselines; the report folder written whole (or not at all), then the model card.
    ``extractor`` is a scorer's name (see :func:`~ehr_diffusers.evaluation.cxr.extractors.load_scorer`) or a loaded
    scorer."""
    import logging

    from ..data.cxr.split import check_subjects_unseen, load_cxr_split, load_dataset_dict
    from ..evaluation.cxr.extractors import check_extractor_name, check_scorer_unseen, load_scorer
    from ..hub.errors import check_model_path, explain_missing_model
    from ..io import atomic_directory, check_output_dir, write_text_atomic
    from .common import torch_device

    if steps < 1 or bootstrap < 2 or batch_size < 1:
        raise ArgumentError(f"--steps, --batch-size must be at least 1 and --bootstrap at least 2; got {steps}, "
                         f"{batch_size}, {bootstrap}")
    if seed < 0:
        raise ArgumentError(f"--seed must be a non-negative integer, got {seed}")
    if isinstance(extractor, str):
        check_extractor_name(extractor)
    if not (guidance_scale >= 0 and guidance_scale != float("inf")):
        raise ArgumentError(f"--guidance-scale must be a finite number >= 0, got {guidance_scale}")
    if not (eta >= 0 and eta != float("inf")):
        raise ArgumentError(f"--eta must be a finite number >= 0, got {eta}")
    local_model = local_folder(model)
    check_output_dir(out, overwrite, {"--model": local_model, "--dataset": dataset}, argument="--out")
    tables = load_dataset_dict(dataset)
    if split not in tables:
        raise ArgumentError(f"--split {split}: {dataset} has no such split (splits: {', '.join(tables)})")
    if split == "train":
        raise ArgumentError("--split train: the model was trained on it; evaluate on a held-out split")
    for name, needed in ((split, ("previous_chexpert", "target_chexpert", "subject_id", "event_texts",
                                  "event_tables")), ("train", ("target_chexpert",))):
        missing = [column for column in needed if column not in tables[name].column_names]
        if missing:
            raise DataError(f"--dataset {dataset}: split {name!r} has no {', '.join(missing)} column(s): findings "
                             "cannot be scored")
    if tables[split].num_rows < 2:
        raise ArgumentError(f"--split {split}: {tables[split].num_rows} triplet(s); the shuffled control needs 2")
    check_model_path(model, "--model")
    target_device = torch_device(device)

    # the checks passed: now the modules that load diffusers and the model
    import torch

    from .. import __version__
    from ..data.cxr.dataset import SUMMARY_NAME
    from ..evaluation.cxr.report import cxr_model_card_markdown, grid_entries, select_grid_rows, write_cxr_report
    from ..evaluation.cxr.suite import evaluate_ehrxdiff
    from ..evaluation.report import REPORT_NAME
    from ..hub.cards import METRICS_END, METRICS_START, update_model_card_metrics
    from ..pipelines.pipeline_ehrxdiff import EHRXDiffPipeline

    with explain_missing_model(model, "--model"):
        pipe = EHRXDiffPipeline.from_pretrained(model)
    pipe.to(target_device)
    pipe.set_progress_bar_config(disable=True)
    size = int(pipe.vae.config.sample_size)
    evaluated = load_cxr_split(dataset, split, size, show_progress=not quiet)
    if evaluated.subject_id is None:
        raise DataError(f"--dataset {dataset}: split {split!r} has no subject_id column")
    checked = local_model is not None and check_subjects_unseen(local_model, evaluated.subject_id, split)
    if not checked:
        logging.getLogger(__name__).warning("%s records no training subjects (training_data.json): cannot check that "
                                            "the %s split is unseen", model, split)
    if evaluated.event_dim != pipe.event_encoder.config.event_dim:
        raise ModelError(f"--dataset {dataset}: {evaluated.event_dim}-d event embeddings, but --model {model} takes "
                         f"{pipe.event_encoder.config.event_dim}-d ones")
    scorer = (load_scorer(extractor, dataset, size, seed=seed, show_progress=not quiet)
              if isinstance(extractor, str) else extractor)
    scorer_checked = check_scorer_unseen(scorer, evaluated.subject_id, split)
    train = load_cxr_split(dataset, "train", size, show_progress=False, images=False)  # for the events-only baseline
    with torch.inference_mode():
        metrics, arrays = evaluate_ehrxdiff(pipe, evaluated, train, scorer, num_inference_steps=steps,
                                            guidance_scale=guidance_scale, eta=eta, seed=seed, reps=bootstrap,
                                            batch_size=batch_size, split_name=split, show_progress=not quiet)
    summary_path = Path(dataset) / SUMMARY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    model_name, dataset_name = names or (model, str(dataset))
    metrics["run"] = {"model": model_name, "dataset": dataset_name, "split": split, "scorer": scorer.description,
                      "scorer_name": scorer.name, "scorer_source": getattr(scorer, "source", ""),
                      "synthetic_data": bool(summary.get("synthetic")), "training_subjects_checked": checked,
                      "scorer_training_subjects_checked": scorer_checked, "ehr_diffusers_version": __version__}
    previous, target = arrays["labels"]
    rows = select_grid_rows(previous, target, evaluated.subject_id, seed=seed)
    texts = tables[split].select(rows)
    entries = grid_entries(rows, evaluated, arrays["predictions"]["model"].numpy(), previous, target,
                           metrics["findings"], texts["event_texts"], texts["event_tables"])
    with atomic_directory(out, overwrite) as work:
        write_cxr_report(metrics, entries, work)
    card = Path(model) / "README.md"
    if model_card and local_model is not None and card.is_file():
        text = card.read_text(encoding="utf-8")
        if METRICS_START not in text:
            write_text_atomic(card, text.rstrip() + f"\n\n## Evaluation\n\n{METRICS_START}\n{METRICS_END}\n")
        update_model_card_metrics(card, cxr_model_card_markdown(metrics))
    return metrics, out / REPORT_NAME


def run_cxr(args: argparse.Namespace) -> None:
    metrics, report = run_cxr_evaluation(
        args.model, args.dataset, args.out, split=args.split, extractor=args.extractor, steps=args.steps,
        guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed, bootstrap=args.bootstrap,
        batch_size=args.batch_size, overwrite=args.overwrite, model_card=not args.no_model_card, quiet=args.quiet,
        device=args.device)
    from ..evaluation.cxr.report import cxr_model_card_markdown

    print(cxr_model_card_markdown(metrics))
    print(f"report written to {report} (figures with their splits and CIs in {args.out / 'metrics.json'})")
