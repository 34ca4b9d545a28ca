"""``demo-data`` and ``prepare``: the synthetic MIMIC-IV-shaped cohort, and MIMIC-IV hosp tables -> split dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def cohort_options(args: argparse.Namespace):
    """The ``CohortOptions`` of the cohort flags that ``cli`` adds to ``prepare``."""
    from ..data.ehr.cohort import CohortOptions
    from ..data.ehr.icd import GemOptions

    return CohortOptions(
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        min_code_count=args.min_code_count,
        include_no_admission=not args.exclude_no_admission,
        race_grouping=args.race_grouping,
        gem=GemOptions(
            include_approximate=not args.gem_exact_only,
            combination=args.gem_combination,
            alternatives=args.gem_alternatives,
        ),
    )


def print_demo_summary(summary: dict, out: Path) -> None:
    """The table counts of a written demo cohort, stated as synthetic (also printed by ``demo``)."""
    print(f"synthetic MIMIC-IV-shaped cohort written to {out} (synthetic data, not MIMIC-IV)")
    for key, value in summary.items():
        print(f"  {key:<28}{value:,}")


def run_demo_data(args: argparse.Namespace) -> None:
    from ..data.ehr.demo import write_demo_mimic

    summary = write_demo_mimic(args.out, n_patients=args.patients, seed=args.seed, overwrite=args.overwrite,
                               show_progress=not args.quiet)
    print_demo_summary(summary, args.out)


def run_prepare(args: argparse.Namespace) -> None:
    from ..data.ehr.cohort import format_summary, prepare
    from ..data.ehr.demo import is_demo_cohort
    from ..io import check_output_dir

    options = cohort_options(args)
    check_output_dir(args.out, args.overwrite, {"--mimic-dir": args.mimic_dir}, argument="--out")
    synthetic = is_demo_cohort(args.mimic_dir)
    summary = prepare(args.mimic_dir, args.out, options, overwrite=args.overwrite, show_progress=not args.quiet,
                      synthetic=synthetic, strict=args.strict)
    print(f"prepared dataset written to {args.out}" + (" (from the synthetic demo cohort)" if synthetic else ""))
    print(format_summary(summary))
