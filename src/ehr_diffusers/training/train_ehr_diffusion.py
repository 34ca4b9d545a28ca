#!/usr/bin/env python
"""Trains the text-conditioned EHR denoiser in the latent space of a trained autoencoder and saves the whole
``EHRLatentDiffusionPipeline``, diffusers-examples style.

    accelerate launch -m ehr_diffusers.training.train_ehr_diffusion \\
        --train_data_dir demo/dataset --autoencoder_path demo/autoencoder --output_dir demo/model \\
        --denoiser_config demo --max_train_steps 2000 --use_ema \\
        --validation_prompts "70 year old man with heart failure"

The (optionally judge-screened) train split is encoded once by the frozen autoencoder into normalised latents, kept
in memory beside the text embeddings (``--condition_column``). Each step draws u ~ U[0, 1) per record (stratified),
noises the latent on the logSNR-cosine schedule and regresses the denoiser's output on the scheduler's training target
(MSE); with probability ``--condition_dropout`` a record's condition is replaced by the denoiser's learned null
condition, which is what the pipeline's classifier-free guidance uses as "no condition". The output folder holds the
pipeline (``EHRLatentDiffusionPipeline.from_pretrained(--output_dir)``), its model card (README.md), the autoencoder's
metrics, and ``checkpoint-N`` folders for ``--resume_from_checkpoint``.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ehr_diffusers.data.ehr.schema import EHRSchema
from ehr_diffusers.io import atomic_merge, check_output_dir
from ehr_diffusers.models.ehr_autoencoder import EHRAutoencoderModel
from ehr_diffusers.models.ehr_denoiser import EHRDenoiserModel
from ehr_diffusers.schedulers.scheduling_logsnr_cosine import LogSNRCosineScheduler
from ehr_diffusers.training import AUTOENCODER_METRICS_NAME, TrainingRun
from ehr_diffusers.training.checkpointing import (
    batch_layout,
    epoch_batches,
    register_checkpoint_hooks,
    resolve_resume_checkpoint,
    resume_state,
    save_checkpoint,
)
from ehr_diffusers.training.common import (
    add_common_arguments,
    check_common_arguments,
    log_text,
    make_accelerator,
    plan_steps,
    push_output,
    run_script,
    seed_per_process,
    tracker_config,
    warmup_steps,
)
from ehr_diffusers.training.data import (
    TRAIN_SPLIT,
    condition_dim,
    condition_tensor,
    encode_latents,
    load_training_dataset,
    screen_split,
)

logger = get_logger(__name__, log_level="INFO")

SUBFOLDER = "denoiser"
AUTOENCODER_ARGS_NAME = "training_args.json"
INFERENCE_SOLVER = "dpmsolver++"

# Named denoiser sizes for --denoiser_config; latent_dim comes from the autoencoder and condition_dim from the
# embedding column, so a preset never sets them. "demo" is sized for the 5,000-patient demo cohort on 2 CPU cores:
# it trains in minutes and samples 100,000 records in under a minute (BENCHMARKS.md).
DENOISER_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "demo": {"num_tokens": 4, "hidden_dim": 64, "num_layers": 3, "num_heads": 4, "mlp_ratio": 2.0},
    "seed_reference": {key: value for key, value in EHRDenoiserModel.seed_reference_config().items()
                       if key not in ("latent_dim", "condition_dim")},
}
SIZE_FLAGS = ("num_tokens", "hidden_dim", "num_layers", "num_heads")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the text-conditioned EHR denoiser and save the "
                                                 "EHRLatentDiffusionPipeline.")
    add_common_arguments(parser, learning_rate=3e-4, num_train_epochs=100, tracker_project_name="ehr-latent-diffusion")
    add = parser.add_argument
    add("--autoencoder_path", type=str, required=True,
        help="Folder written by train_ehr_autoencoder (config.json, weights, schema.json).")
    add("--denoiser_config", type=str, default="default", choices=sorted(DENOISER_PRESETS),
        help="Named denoiser size: default (the class defaults), demo (small, for the demo cohort on a CPU) or "
             "seed_reference (HealthForge's width, depth and heads); the flags below override it.")
    add("--num_tokens", type=int, default=None, help="Tokens the latent is cut into (a divisor of the latent size).")
    add("--hidden_dim", type=int, default=None, help="Transformer width.")
    add("--num_layers", type=int, default=None, help="Transformer blocks.")
    add("--num_heads", type=int, default=None, help="Attention heads (a divisor of the width).")
    add("--logsnr_min", type=float, default=-20.0, help="logSNR at the noise end of the schedule.")
    add("--logsnr_max", type=float, default=20.0, help="logSNR at the data end of the schedule.")
    add("--prediction_type", type=str, default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    add("--condition_dropout", type=float, default=0.05,
        help="Probability per record of training on the learned null condition instead of its text, for "
             "classifier-free guidance (HealthForge uses 0.05).")
    add("--decode_mode", type=str, default="sample", choices=["sample", "threshold"],
        help="The pipeline's default decoding, saved in its config: 'sample' draws codes from their Bernoulli and "
             "one-hot fields from their softmax probabilities; 'threshold' uses the calibrated per-code thresholds.")
    add("--condition_column", type=str, default="embedding",
        help="Dataset column of fixed-length text embeddings to condition on (written by `ehr-diffusers label`).")
    add("--judge_threshold", type=float, default=None,
        help="Train only on rows whose judge scores all reach this value (1-5); default: every row.")
    add("--judge_keep_unscored", action="store_true", help="With --judge_threshold, keep rows the judge did not score.")
    add("--text_embedder", type=str, default=None,
        help="Text embedder saved with the pipeline: 'minilm', a folder or a Hub id; 'none' saves the pipeline "
             "without one. Default: the embedder the dataset's text_labels.json records.")
    add("--validation_prompts", type=str, default=None, nargs="+",
        help="Prompts to generate a few records for every --validation_steps and at the end, logged as text.")
    add("--validation_steps", type=int, default=500, help="Run validation every N optimisation steps.")
    add("--validation_records_per_prompt", type=int, default=4)
    add("--validation_inference_steps", type=int, default=25)
    add("--validation_guidance_scale", type=float, default=2.0)
    add("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints) to the Hub.")
    add("--hub_model_id", type=str, default=None,
        help="Repository id for --push_to_hub (default: the --output_dir folder name).")
    add("--hub_token", type=str, default=None, help="Hub token (default: the one `hf auth login` saved).")
    add("--hub_private_repo", action="store_true",
        help="Make the Hub repository private (required for models trained on MIMIC-derived data).")
    args = parser.parse_args(argv)
    check_common_arguments(args)
    for name in SIZE_FLAGS + ("validation_steps", "validation_records_per_prompt", "validation_inference_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}")
    if not args.logsnr_min < args.logsnr_max:
        raise ValueError(f"--logsnr_min ({args.logsnr_min}) must be below --logsnr_max ({args.logsnr_max})")
    return args


# ---------------------------------------------------------------------------------------------------- pieces
def apply_condition_dropout(condition: torch.Tensor, null_condition: torch.Tensor, probability: float,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces each row of ``condition`` (batch, dim) by ``null_condition`` (dim,) or (batch, dim) with
    ``probability``; returns the conditions and the boolean mask of replaced rows.

    The null condition stays in the autograd graph for every batch (a zero gradient when no row was dropped), so the
    learned null embedding is trained by exactly the rows that use it and distributed training sees the same
    parameters used at every step."""
    drop = torch.rand(condition.shape[0], generator=generator, device=condition.device) < probability
    null = null_condition.to(condition.dtype).expand_as(condition)
    return torch.where(drop[:, None], null, condition), drop


def denoiser_config(args: argparse.Namespace, latent_dim: int, embedding_dim: int) -> dict[str, Any]:
    """The denoiser's constructor arguments: the preset, the size flags over it, the dimensions the autoencoder and
    the embeddings impose, and --prediction_type; a ValueError naming the flag for sizes that do not divide."""
    config = dict(DENOISER_PRESETS[args.denoiser_config])
    config.update({name: getattr(args, name) for name in SIZE_FLAGS if getattr(args, name) is not None})
    # The denoiser converts its internal v prediction to what the scheduler trains and samples with.
    config.update(latent_dim=latent_dim, condition_dim=embedding_dim, prediction_type=args.prediction_type)
    signature = inspect.signature(EHRDenoiserModel.__init__).parameters
    num_tokens, hidden_dim, num_heads = (config.get(name, signature[name].default)
                                         for name in ("num_tokens", "hidden_dim", "num_heads"))
    if latent_dim % num_tokens:
        raise ValueError(f"--num_tokens {num_tokens} (--denoiser_config {args.denoiser_config}) must divide the "
                         f"autoencoder's latent_dim {latent_dim}")
    if hidden_dim % num_heads:
        raise ValueError(f"--num_heads {num_heads} must divide --hidden_dim {hidden_dim} (--denoiser_config "
                         f"{args.denoiser_config})")
    return config


def load_autoencoder(path: str | Path, schema: EHRSchema) -> EHRAutoencoderModel:
    """The trained autoencoder, checked against the dataset's schema; ValueErrors name ``--autoencoder_path``."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--autoencoder_path {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--autoencoder_path {folder}: no config.json; pass the --output_dir of train_ehr_autoencoder")
    try:
        autoencoder = EHRAutoencoderModel.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"--autoencoder_path {folder}: cannot load an EHRAutoencoderModel ({error})") from None
    try:
        autoencoder.check_schema(schema)
    except ValueError as error:
        raise ValueError(f"--autoencoder_path {folder}: {error}; train the autoencoder on this --train_data_dir") \
            from None
    return autoencoder


def resolve_text_embedder(spec: str | None, dataset_dir: str | Path, embedding_dim: int,
                          column: str) -> tuple[Any, str | None]:
    """The ``SentenceEmbedder`` to save with the pipeline (None for ``--text_embedder none``) and a warning to log, if
    any. By default it is the embedder the dataset's ``text_labels.json`` records for its embeddings. Its dimension
    must equal the embedding column's; ValueErrors name ``--text_embedder``."""
    from ehr_diffusers.text.embed import load_embedder
    from ehr_diffusers.text.label import LABELS_NAME, load_label_metadata

    recorded: dict[str, Any] = {}
    if (Path(dataset_dir) / LABELS_NAME).is_file():
        metadata = load_label_metadata(dataset_dir)
        if metadata.get("embedding_column", column) == column:
            recorded = metadata.get("embedder") or {}
    if spec is not None and spec.lower() == "none":
        return None, None
    if spec is None:
        spec = recorded.get("spec")
        if spec is None:
            raise ValueError(f"--text_embedder: the dataset does not record which embedder made its {column!r} column; "
                             "pass the embedder (e.g. minilm, a folder) or 'none' to save the pipeline without one")
    try:
        embedder = load_embedder(spec)
    except (OSError, ValueError) as error:
        raise ValueError(f"--text_embedder {spec}: {error}") from None
    if embedder.dim != embedding_dim:
        raise ValueError(f"--text_embedder {spec}: makes {embedder.dim}-d embeddings, the {column!r} column holds "
                         f"{embedding_dim}-d ones; pass the embedder that labelled the dataset")
    warning = None
    if recorded.get("source") and recorded["source"] != embedder.config.source:
        warning = (f"--text_embedder {spec} ({embedder.config.source}) is not the embedder that made the {column!r} "
                   f"column ({recorded['source']}); prompts will be embedded differently from the training conditions")
    embedder.requires_grad_(False)
    return embedder.eval(), warning


def build_pipeline(autoencoder: EHRAutoencoderModel, denoiser: EHRDenoiserModel, train_scheduler: Any,
                   text_embedder: Any, schema: EHRSchema, decode_mode: str = "sample") -> Any:
    from ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline

    scheduler = LogSNRCosineScheduler.from_config(train_scheduler.config, solver=INFERENCE_SOLVER)
    return EHRLatentDiffusionPipeline(autoencoder=autoencoder, denoiser=denoiser, scheduler=scheduler,
                                      text_embedder=text_embedder, schema=schema.to_dict(), decode_mode=decode_mode)


def describe_record(record: dict[str, Any], max_codes: int = 12) -> str:
    """One line per generated record for the logs: demographics and the first ``max_codes`` codes."""
    codes = list(record.get("icd10_categories") or [])
    shown = ", ".join(codes[:max_codes]) + (f", ... ({len(codes)} codes)" if len(codes) > max_codes else "")
    return (f"{record.get('sex')} {record.get('age')}y, died={record.get('death')}, "
            f"{record.get('num_admissions')} admission(s), {record.get('marital_status')}, {record.get('race')}; "
            f"codes: {shown or 'none'}")


@torch.no_grad()
def log_validation(pipeline: Any, args: argparse.Namespace, accelerator: Any, step: int) -> dict[str, list[str]]:
    """Generates ``--validation_records_per_prompt`` records per prompt and logs them as text; returns them."""
    logger.info(f"validation at step {step}: {len(args.validation_prompts)} prompt(s)")
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed if args.seed is not None else 0)
    output = pipeline(list(args.validation_prompts), num_records_per_prompt=args.validation_records_per_prompt,
                      num_inference_steps=args.validation_inference_steps,
                      guidance_scale=args.validation_guidance_scale, generator=generator)
    generated: dict[str, list[str]] = {prompt: [] for prompt in args.validation_prompts}
    for prompt, record in zip(output.prompts, output.records):
        generated[prompt].append(describe_record(record))
    for index, prompt in enumerate(args.validation_prompts):
        text = "\n".join(f"  {line}" for line in generated[prompt])
        logger.info(f"prompt {prompt!r}:\n{text}")
        log_text(accelerator, f"validation/{index}", f"{prompt}\n{text}", step)
    return generated


def card_configs(args: argparse.Namespace, config: dict[str, Any], rows: int, dropped: int, global_step: int,
                 losses: list[float], autoencoder: EHRAutoencoderModel) -> tuple[dict, dict]:
    """(training_config, autoencoder_config) for the model card: flat tables of what produced the model."""
    import json

    training = {
        "denoiser preset": args.denoiser_config,
        **{f"denoiser {key}": value for key, value in config.items()},
        "schedule": f"logSNR cosine [{args.logsnr_min}, {args.logsnr_max}], {args.prediction_type} prediction",
        "condition column": args.condition_column,
        "condition dropout": args.condition_dropout,
        "decoding": {"sample": "Bernoulli / categorical draws (decode_mode 'sample')",
                     "threshold": "calibrated per-code thresholds (decode_mode 'threshold')"}[args.decode_mode],
        "judge threshold": args.judge_threshold if args.judge_threshold is not None else "none (every row)",
        "training rows": rows,
        "rows dropped by the judge screen": dropped,
        "optimisation steps": global_step,
        "batch size": args.train_batch_size,
        "gradient accumulation": args.gradient_accumulation_steps,
        "learning rate": f"{args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)",
        "EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
        "mixed precision": args.mixed_precision or "accelerate default",
        "seed": args.seed,
        "final training loss": round(losses[-1], 5) if losses else "n/a",
    }
    autoencoder_config = {key: value for key, value in autoencoder.config.items()
                          if key in ("latent_dim", "hidden_dim", "num_layers", "dropout", "latent_regularization",
                                     "latent_noise", "kl_weight")}
    args_file = Path(args.autoencoder_path) / AUTOENCODER_ARGS_NAME
    if args_file.is_file():
        recorded = json.loads(args_file.read_text())
        for key in ("num_train_epochs", "global_step", "train_batch_size", "learning_rate", "field_loss_weight",
                    "use_ema", "seed"):
            if key in recorded:
                autoencoder_config[key] = recorded[key]
    metrics_file = Path(args.autoencoder_path) / AUTOENCODER_METRICS_NAME
    if metrics_file.is_file():
        recorded_metrics = json.loads(metrics_file.read_text())
        holdout = recorded_metrics.get("holdout") or {}
        codes = (holdout.get("groups") or {}).get("icd10_categories") or {}
        if "micro_f1" in codes:
            autoencoder_config["holdout code F1 (reconstruction)"] = round(codes["micro_f1"], 4)
        figures = (recorded_metrics.get("holdout_figures") or {}).get("reconstruction") or {}
        for key, label in (("pairs_pearson", "pair r"), ("codes_per_patient_wasserstein", "codes-per-patient W"),
                           ("age_wasserstein", "age W (years)")):
            if key in figures:
                autoencoder_config[f"holdout reconstruction {label} (sampled)"] = round(figures[key], 4)
    return training, autoencoder_config


# ---------------------------------------------------------------------------------------------------- training
def main(argv: Sequence[str] | None = None) -> TrainingRun:
    args = parse_args(argv)
    # Every input is checked before the accelerator starts and before any training.
    dataset, schema = load_training_dataset(args.train_data_dir)
    embedding_dim = condition_dim(dataset[TRAIN_SPLIT], args.condition_column, args.train_data_dir)
    output_dir = check_output_dir(args.output_dir, inputs={"--train_data_dir": args.train_data_dir,
                                                           "--autoencoder_path": args.autoencoder_path},
                                  argument="--output_dir", merge=True)
    autoencoder = load_autoencoder(args.autoencoder_path, schema)
    config = denoiser_config(args, autoencoder.config.latent_dim, embedding_dim)
    resume_from = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    if args.validation_prompts and args.text_embedder is not None and args.text_embedder.lower() == "none":
        raise ValueError("--validation_prompts needs a text embedder to embed them; leave out --text_embedder none")
    text_embedder, embedder_warning = resolve_text_embedder(args.text_embedder, args.train_data_dir, embedding_dim,
                                                            args.condition_column)
    train_split, dropped = screen_split(dataset[TRAIN_SPLIT], args.judge_threshold, args.judge_keep_unscored)

    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ehr_diffusers import hub

    accelerator = make_accelerator(args, logger)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if embedder_warning is not None:
        logger.warning(embedder_warning)

    if args.judge_threshold is not None:
        logger.info(f"--judge_threshold {args.judge_threshold}: kept {len(train_split)} of {len(dataset[TRAIN_SPLIT])} "
                    f"training rows, dropped {dropped}")
    if bool((autoencoder.latent_std == 1).all() and (autoencoder.latent_mean == 0).all()):
        logger.warning(f"--autoencoder_path {args.autoencoder_path}: its latent statistics were never fitted; the "
                       "denoiser will see unnormalised latents")
    autoencoder.requires_grad_(False)
    autoencoder.to(accelerator.device)
    latents = encode_latents(autoencoder, train_split, schema, args.eval_batch_size, accelerator.device,
                             show_progress=accelerator.is_local_main_process)
    conditions = condition_tensor(train_split, args.condition_column)
    train_dataset = torch.utils.data.TensorDataset(latents, conditions)

    noise_scheduler = LogSNRCosineScheduler(logsnr_min=args.logsnr_min, logsnr_max=args.logsnr_max,
                                            prediction_type=args.prediction_type)
    denoiser = EHRDenoiserModel(**config)
    denoiser.train()
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(denoiser.parameters(), decay=args.ema_decay, model_cls=EHRDenoiserModel,
                             model_config=denoiser.config)
    register_checkpoint_hooks(accelerator, {SUBFOLDER: denoiser}, {SUBFOLDER: ema_model} if args.use_ema else None)

    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=args.train_batch_size, shuffle=True,
                                                   num_workers=args.dataloader_num_workers)
    _, max_train_steps, _ = plan_steps(args, len(train_dataloader))
    args.lr_warmup_steps = warmup_steps(args, max_train_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    denoiser, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        denoiser, optimizer, train_dataloader, lr_scheduler
    )
    seed_per_process(accelerator, args.seed)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    steps_per_epoch, max_train_steps, num_train_epochs = plan_steps(args, len(train_dataloader))
    if text_embedder is not None:
        text_embedder.to(accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args))

    unwrapped = accelerator.unwrap_model(denoiser)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)} ({latents.shape[1]}-d latents, {embedding_dim}-d conditions)")
    logger.info(f"  Denoiser = {sum(p.numel() for p in unwrapped.parameters()):,} parameters ({config})")
    logger.info(f"  Num Epochs = {num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")

    layout = batch_layout(accelerator, args)
    global_step, first_epoch, batches_to_skip = resume_state(accelerator, resume_from, args.resume_from_checkpoint,
                                                             steps_per_epoch, layout, logger)
    first_step = global_step

    def validate(step: int) -> None:
        """Generates with a copy of the denoiser holding the EMA weights (when kept): the training model keeps its
        weights and its mixed-precision forward untouched."""
        model = EHRDenoiserModel.from_config(unwrapped.config)
        model.load_state_dict(unwrapped.state_dict())
        if ema_model is not None:
            ema_model.copy_to(model.parameters())
        model.to(accelerator.device).eval()
        log_validation(build_pipeline(autoencoder, model, noise_scheduler, text_embedder, schema, args.decode_mode),
                       args, accelerator, step)
        del model

    losses: list[float] = []
    train_loss = 0.0
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        denoiser.train()
        batches = epoch_batches(accelerator, train_dataloader, epoch, first_epoch, batches_to_skip)
        for clean, condition in batches:
            with accelerator.accumulate(denoiser):
                noise = torch.randn_like(clean)
                u = noise_scheduler.sample_timesteps(clean.shape[0], device=clean.device)
                noisy = noise_scheduler.add_noise(clean, noise, u)
                logsnr = noise_scheduler.logsnr(u).float().to(clean.device)
                condition, _ = apply_condition_dropout(condition, unwrapped.null_condition_embeds(clean.shape[0]),
                                                       args.condition_dropout)
                # return_dict=False: a tuple passes accelerate's mixed-precision output conversion as it is.
                (prediction,) = denoiser(noisy, logsnr, condition, return_dict=False)
                target = noise_scheduler.training_target(clean, noise, u)
                loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
                train_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / \
                    args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(unwrapped.parameters())
                global_step += 1
                progress_bar.update(1)
                losses.append(train_loss)
                logs = {"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{logs['lr']:.2e}")
                train_loss = 0.0
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, layout, logger)
                if (args.validation_prompts and accelerator.is_main_process and global_step % args.validation_steps == 0
                        and global_step < max_train_steps):
                    validate(global_step)
            if global_step >= max_train_steps:
                break
    progress_bar.close()

    accelerator.wait_for_everyone()
    validation: dict[str, list[str]] = {}
    if accelerator.is_main_process:
        denoiser = accelerator.unwrap_model(denoiser, keep_fp32_wrapper=False)  # plain fp32 forward from here on
        if ema_model is not None:
            ema_model.copy_to(denoiser.parameters())
        denoiser = denoiser.float().eval()
        pipeline = build_pipeline(autoencoder.to("cpu"), denoiser.to("cpu"), noise_scheduler,
                                  text_embedder.to("cpu") if text_embedder is not None else None, schema,
                                  args.decode_mode)
        training_config, autoencoder_config = card_configs(args, config, len(train_dataset), dropped, global_step,
                                                           losses, autoencoder)
        repo_id = args.hub_model_id or output_dir.resolve().name
        with atomic_merge(output_dir) as staging:
            pipeline.save_pretrained(str(staging))
            metrics_file = Path(args.autoencoder_path) / AUTOENCODER_METRICS_NAME
            if metrics_file.is_file():
                shutil.copy2(metrics_file, staging / AUTOENCODER_METRICS_NAME)
            hub.save_model_card(staging, dataset_dir=args.train_data_dir, training_config=training_config,
                                autoencoder_config=autoencoder_config, repo_id=repo_id)
        logger.info(f"saved the pipeline to {output_dir}")
        if args.validation_prompts:
            validation = log_validation(pipeline.to(accelerator.device), args, accelerator, global_step)
        if args.push_to_hub:
            push_output(args, output_dir, repo_id, logger)
    accelerator.end_training()
    return TrainingRun(output_dir=Path(output_dir), global_step=global_step, resumed_from=resume_from,
                       first_step=first_step, losses=losses, validation=validation)


if __name__ == "__main__":
    run_script(main)
