"""``generate``: synthetic patient records from a trained pipeline, as csv, parquet or MIMIC-IV tables."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ArgumentError, DataError, ModelError
from .common import load_pipeline, local_folder

logger = logging.getLogger(__name__)


# Records per second of the demo model on 2 CPU cores (BENCHMARKS.md, sampling): a run estimated longer than
# LONG_RUN_SECONDS at that pace is announced with its estimate before any work.
RECORDS_PER_SECOND = 2000
LONG_RUN_SECONDS = 3600


def _read_prompts(args: argparse.Namespace) -> list[str] | None:
    from ..io import read_user_text

    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        text = read_user_text(args.prompts_file, "--prompts-file")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"--prompts-file {args.prompts_file}: holds no prompt")
    if any(not prompt.strip() for prompt in prompts):
        raise ArgumentError("--prompt: an empty prompt; leave --prompt out for unconditional records")
    return prompts or None


def _output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return args.format
    suffixes = {".csv": "csv", ".parquet": "parquet"}
    if args.out.suffix in suffixes:
        return suffixes[args.out.suffix]
    raise ArgumentError(f"--out {args.out}: cannot tell the format from the suffix; pass --format csv|parquet|mimic")


def write_records(records: list[dict], prompts: list[str | None], out: Path, file_format: str) -> None:
    """Records with their prompt as one csv or parquet file, written to a temporary name and then renamed."""
    import polars as pl

    from ..io import atomic_file

    # the codes' type is stated: with no code in any record polars would infer a list of nulls
    frame = pl.DataFrame(records, schema_overrides={"icd10_categories": pl.List(pl.String)}).with_columns(
        pl.Series("prompt", prompts, dtype=pl.String)
    ).select(["prompt", *records[0].keys()])
    with atomic_file(out) as temporary:
        if file_format == "parquet":
            frame.write_parquet(temporary)
        else:  # codes joined by ";" so that each record stays one csv row
            frame.with_columns(pl.col("icd10_categories").list.join(";")).write_csv(temporary)


def run(args: argparse.Namespace) -> None:
    from ..hub.errors import check_model_path
    from ..io import check_output_dir, check_output_file
    from ..sampling import generate_records

    # everything a user can get wrong is checked here, before the model loads
    file_format = _output_format(args)
    prompts = _read_prompts(args)
    records = args.num_records * max(len(prompts or []), 1)
    if records / RECORDS_PER_SECOND > LONG_RUN_SECONDS:
        logger.warning("--num-records %s: %s records will take about %.0f hours at the demo model's %s records per "
                       "second on 2 CPU cores (a larger model or --steps takes longer)", f"{args.num_records:,}",
                       f"{records:,}", records / RECORDS_PER_SECOND / 3600, f"{RECORDS_PER_SECOND:,}")
    local_model = local_folder(args.model)
    if file_format == "mimic":
        check_output_dir(args.out, args.overwrite, {"--model": local_model}, argument="--out")
    else:
        if args.out.exists() and (args.out.is_dir() or not args.overwrite):
            raise ArgumentError(f"--out {args.out}: exists; pass --overwrite to replace the file")
        check_output_file(args.out, {"--model": local_model, "--prompts-file": args.prompts_file})
    check_model_path(args.model, "--model")
    if args.text_embedder not in (None, "minilm"):
        check_model_path(args.text_embedder, "--text-embedder")
    pipe = load_pipeline(args.model, args.text_embedder, args.device)
    if prompts is not None and pipe.text_embedder is None:
        raise ModelError(f"--model {args.model} was saved without its text embedder; pass --text-embedder with the "
                         "one it was trained with (e.g. minilm)")
    options = {"decode_mode": args.decode}
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    result = generate_records(pipe, prompts, args.num_records, batch_size=args.batch_size, seed=args.seed,
                              show_progress=not args.quiet, **options)
    if file_format == "mimic":
        summary = pipe.to_mimic_tables(result.records, args.out, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {summary['patients']:,} synthetic patients as MIMIC-IV tables to {args.out}/hosp "
              f"({summary['admissions']:,} admissions, {summary['diagnoses_icd']:,} diagnoses)")
    else:
        write_records(result.records, result.prompts, args.out, file_format)
        print(f"wrote {len(result.records):,} synthetic records to {args.out}")
