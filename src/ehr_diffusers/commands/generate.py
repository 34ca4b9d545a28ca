"""``generate``: synthetic patient records from a trained pipeline, as csv, parquet or MIMIC-IV tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import load_pipeline


def _read_prompts(args: argparse.Namespace) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
        prompts += [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file}: holds no prompt")
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("--prompt: an empty prompt; leave --prompt out for unconditional records")
    return prompts or None


def _output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return args.format
    suffixes = {".csv": "csv", ".parquet": "parquet"}
    if args.out.suffix in suffixes:
        return suffixes[args.out.suffix]
    raise ValueError(f"--out {args.out}: cannot tell the format from the suffix; pass --format csv|parquet|mimic")


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
    from ..io import check_output_dir
    from ..sampling import generate_records

    file_format = _output_format(args)
    prompts = _read_prompts(args)
    if file_format == "mimic":
        check_output_dir(args.out, args.overwrite)
    elif args.out.exists() and (args.out.is_dir() or not args.overwrite):
        raise ValueError(f"--out {args.out}: exists; pass --overwrite to replace the file")
    pipe = load_pipeline(args.model, args.text_embedder, args.device)
    if prompts is not None and pipe.text_embedder is None:
        raise ValueError(f"--model {args.model} was saved without its text embedder; pass --text-embedder with the "
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
