"""What both training scripts share: the diffusers-examples flags, their checks, the ``Accelerator`` set-up with a
tracker fallback, and the step arithmetic. Each script keeps its own training loop, as diffusers' examples do."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ehr_diffusers.errors import EHRDiffusersError
from ehr_diffusers.io import write_text_atomic

DEFAULT_REPORT_TO = "tensorboard"
TOKEN_ARGUMENTS = ("hub_token",)


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    learning_rate: float,
    num_train_epochs: int,
    train_batch_size: int = 256,
    tracker_project_name: str,
) -> None:
    """The flags of diffusers' example scripts (examples/text_to_image/train_text_to_image.py) that both scripts
    take."""
    from diffusers.optimization import SchedulerType

    add = parser.add_argument
    add("--train_data_dir", type=str, default=None, required=True,
        help="A prepared dataset folder (`ehr-diffusers prepare`, then `ehr-diffusers label` for the diffusion model).")
    add("--output_dir", type=str, required=True,
        help="Where the model, checkpoints (checkpoint-N) and logs are written.")
    add("--seed", type=int, default=None, help="A seed for reproducible training.")
    add("--train_batch_size", type=int, default=train_batch_size, help="Batch size (per device) for training.")
    add("--eval_batch_size", type=int, default=1024,
        help="Batch size for encoding whole splits (latents, calibration, metrics); no gradients.")
    add("--num_train_epochs", type=int, default=num_train_epochs)
    add("--max_train_steps", type=int, default=None,
        help="Total number of optimisation steps. If provided, overrides --num_train_epochs.")
    add("--gradient_accumulation_steps", type=int, default=1,
        help="Number of batches to accumulate before an optimisation step.")
    add("--learning_rate", type=float, default=learning_rate, help="Learning rate after the warm-up.")
    add("--lr_scheduler", type=str, default="cosine", choices=[kind.value for kind in SchedulerType],
        help="Learning rate schedule (diffusers.optimization.get_scheduler).")
    add("--lr_warmup_steps", type=int, default=None,
        help="Warm-up steps of the learning rate schedule (default: 5%% of the optimisation steps).")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    add("--use_ema", action="store_true", help="Keep an exponential moving average of the weights and save it.")
    add("--ema_decay", type=float, default=0.9999,
        help="Largest EMA decay; diffusers' EMAModel warms it up as (1 + step) / (10 + step).")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: the accelerate config or the `accelerate launch` flag. fp16 needs a GPU; bf16 "
             "also runs on CPUs.")
    add("--report_to", type=str, default=DEFAULT_REPORT_TO,
        help='Tracker for the logs: "tensorboard" (default; skipped with a warning when tensorboard is not installed), '
             '"wandb", "all" or "none".')
    add("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")
    add("--tracker_project_name", type=str, default=tracker_project_name)
    add("--checkpointing_steps", type=int, default=500,
        help="Save the training state every N optimisation steps (checkpoint-N in --output_dir), for "
             "--resume_from_checkpoint.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help='Resume from a checkpoint folder, or "latest" for the newest in --output_dir (a fresh start when there '
             "is none).")
    add("--dataloader_num_workers", type=int, default=0, help="Data loader worker processes (0: the main process).")


def check_common_arguments(args: argparse.Namespace) -> None:
    """ValueErrors naming the flag for values that can only fail later."""
    positive = ["train_batch_size", "eval_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                "max_train_steps", "checkpointing_steps", "checkpoints_total_limit"]
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    for name in ("learning_rate", "max_grad_norm"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.lr_warmup_steps is not None and args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be 0 or more, got {args.lr_warmup_steps}")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if args.adam_weight_decay < 0:
        raise ValueError(f"--adam_weight_decay must be 0 or more, got {args.adam_weight_decay}")
    if args.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--mixed_precision fp16 needs a CUDA GPU; use bf16 (which CPUs run) or no")


def resolve_report_to(report_to: str | None) -> tuple[str | None, str | None]:
    """The ``log_with`` value for ``Accelerator`` and a warning to log once the accelerator exists: tensorboard is
    skipped, with a warning, when neither tensorboard nor tensorboardX is installed."""
    if report_to is None or report_to.lower() == "none":
        return None, None
    if report_to == "tensorboard" and not any(
        importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX")
    ):
        return None, ("--report_to tensorboard: tensorboard is not installed, so nothing is tracked (pip install "
                      "tensorboard, or pass --report_to none to silence this)")
    return report_to, None


def make_accelerator(args: argparse.Namespace, logger: Any) -> Any:
    """``Accelerator`` with ``ProjectConfiguration(project_dir=--output_dir, logging_dir=--output_dir/--logging_dir)``,
    logging set up as in diffusers' examples (INFO on the main process, library chatter at WARNING)."""
    import datasets
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    output_dir = Path(args.output_dir)
    log_with, warning = resolve_report_to(args.report_to)
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=project_config,
        # each epoch's order comes from (seed, epoch), so that a resumed run can replay it (checkpointing.epoch_batches)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=args.seed is not None, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if warning is not None:
        logger.warning(warning)
    return accelerator


def seed_per_process(accelerator: Any, seed: int | None) -> None:
    """Called once the models are built (alike on every process, from the one seed) and prepared: gives each process
    its own random stream, so that the noise, timesteps and dropout of its batches are not those of every other
    process. Process 0 keeps the stream of a one-process run; a checkpoint restores each process's stream."""
    if seed is not None and accelerator.process_index > 0:
        from accelerate.utils import set_seed

        set_seed(seed, device_specific=True)  # seed + process index


def plan_steps(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int, int]:
    """(update steps per epoch, total optimisation steps, epochs) for a data loader of ``batches_per_epoch``."""
    steps_per_epoch = max(math.ceil(batches_per_epoch / args.gradient_accumulation_steps), 1)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def warmup_steps(args: argparse.Namespace, max_train_steps: int) -> int:
    """--lr_warmup_steps, or 5% of the optimisation steps when it is not given."""
    return args.lr_warmup_steps if args.lr_warmup_steps is not None else round(0.05 * max_train_steps)


def recorded_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON-ready values, without secrets (the Hub token)."""
    return {key: value for key, value in vars(args).items() if key not in TOKEN_ARGUMENTS}


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments in the scalar types trackers accept (TensorBoard's hparams take no lists or None)."""
    config = {}
    for key, value in recorded_arguments(args).items():
        if isinstance(value, (list, tuple)):
            value = " | ".join(map(str, value))
        elif value is None:
            value = "None"
        config[key] = value
    return config


def log_text(accelerator: Any, tag: str, text: str, step: int) -> None:
    """Logs ``text`` to the trackers that take text (TensorBoard); others are skipped."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_text(tag, f"```\n{text}\n```", step)


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON through ``write_text_atomic``: a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def push_output(args: argparse.Namespace, output_dir: Path, repo_id: str, logger: Any) -> None:
    """``--push_to_hub``: uploads the finished ``output_dir`` (``hub.push_to_hub`` leaves the checkpoints out and keeps
    MIMIC-derived models private) with the flags every script takes."""
    from .. import hub

    url = hub.push_to_hub(output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo or None,
                          commit_message="End of training")
    logger.info(f"pushed {output_dir} to {url}")


def run_script(main: Callable[[], Any]) -> None:
    """Runs a training script's ``main`` as a program: a user error (bad data, a missing model, a bad argument) ends
    in one line and exit status 2, as in the ``ehr-diffusers`` commands; anything else keeps its traceback."""
    try:
        main()
    except EHRDiffusersError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
