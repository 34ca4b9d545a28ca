"""``evaluate``: a trained pipeline scored against the holdout and the baselines; the report and the card's metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training import AUTOENCODER_METRICS_NAME
from .common import load_pipeline


def _baseline_names(text: str) -> tuple[str, ...]:
    from ..evaluation.ehr.baselines import BASELINES, HOLDOUT_DROPPED

    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if names in ((), ("none",)):
        return ()
    if "holdout" in names:
        raise ValueError(HOLDOUT_DROPPED)
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown baseline(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(BASELINES)}, or none")
    return names


def run_evaluation(model: str, dataset: Path, out: Path, *, overwrite: bool = False, model_card: bool = True,
                   quiet: bool = False, text_embedder: str | None = None, device: str | None = None,
                   names: tuple[str, str] | None = None, **options) -> tuple[dict, Path]:
    """``ehr-diffusers evaluate``: the report folder written whole (or not at all), then the model card's metrics.
    ``names`` are the model and dataset as the report states them (default: the paths given)."""
    from ..evaluation.ehr.data import PROMPT_ROWS, load_real_data
    from ..evaluation.ehr.suite import evaluate_pipeline
    from ..evaluation.report import REPORT_NAME, model_card_markdown, write_report
    from ..hub.cards import update_model_card_metrics
    from ..io import atomic_directory, check_output_dir

    check_output_dir(out, overwrite)
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
    from ..evaluation.report import model_card_markdown

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
    print(model_card_markdown(metrics))
    print(f"report written to {report} (figures with their splits and CIs in {args.out / 'metrics.json'})")
