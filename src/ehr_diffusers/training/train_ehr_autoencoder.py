#!/usr/bin/env python
"""Trains the EHR autoencoder (``EHRAutoencoderModel``) on a prepared dataset, diffusers-examples style.

    accelerate launch -m ehr_diffusers.training.train_ehr_autoencoder \\
        --train_data_dir demo/dataset --output_dir demo/autoencoder --num_train_epochs 20 --use_ema

Record vectors are encoded from the dataset batch by batch. The loss is ``EHRAutoencoderModel.loss`` (the sum of the
per-group losses, each logged as ``loss/<group>``), with the non-code groups weighted by ``--field_loss_weight``. After
training (with the EMA weights when ``--use_ema``)
the script fits the latent normalisation statistics and the per-column decoding thresholds on the train split (so that
decoded code prevalence matches the data), reports reconstruction figures on the train and holdout splits, and writes
``--output_dir``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``EHRAutoencoderModel.from_pretrained``),
``schema.json``, ``autoencoder_metrics.json`` and ``training_args.json``; ``checkpoint-N`` folders hold the training
state for ``--resume_from_checkpoint``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ehr_diffusers.data.ehr.schema import EHRSchema
from ehr_diffusers.io import atomic_merge, check_output_dir
from ehr_diffusers.models.ehr_autoencoder import EHRAutoencoderModel
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
    make_accelerator,
    plan_steps,
    recorded_arguments,
    run_script,
    seed_per_process,
    tracker_config,
    warmup_steps,
    write_json,
)
from ehr_diffusers.training.data import HOLDOUT_SPLIT, TRAIN_SPLIT, iter_vectors, load_training_dataset, vector_dataset

logger = get_logger(__name__, log_level="INFO")

METRICS_NAME = AUTOENCODER_METRICS_NAME
TRAINING_ARGS_NAME = "training_args.json"
SUBFOLDER = "autoencoder"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the EHR autoencoder of ehr-diffusers on a prepared dataset.")
    add_common_arguments(parser, learning_rate=1e-3, num_train_epochs=50, tracker_project_name="ehr-autoencoder")
    parser.add_argument("--latent_dim", type=int, default=1024, help="Size of the latent (HealthForge uses 1024).")
    parser.add_argument("--hidden_dim", type=int, default=2048, help="Width of the hidden layers.")
    parser.add_argument("--num_layers", type=int, default=2, help="Hidden layers of the encoder and of the decoder.")
    parser.add_argument("--dropout", type=float, default=0.1, help="Dropout between hidden layers.")
    parser.add_argument("--field_loss_weight", type=float, default=20.0,
                        help="Weight of every non-code group's loss (sex, age, death, admissions, marital status, "
                             "race) against the codes' (weight 1). The codes' summed binary cross-entropy is ~50 "
                             "nats per record against ~0.7 for sex, so with 1 (the plain model.loss) the demographics "
                             "are barely learned; 20 makes them near exact on the demo cohort.")
    parser.add_argument("--latent_regularization", type=str, default="noise", choices=["none", "noise", "kl"],
                        help="How the decoder is kept from reading exact training latents (saved in the model's "
                             "config): 'noise' trains it on the latent plus Gaussian noise at --latent_noise x each "
                             "dimension's std, 'kl' makes the encoder a Gaussian posterior with a --kl_weight KL term; "
                             "'none' memorises training records and under-decodes new ones (BENCHMARKS.md).")
    parser.add_argument("--latent_noise", type=float, default=0.7,
                        help="With --latent_regularization noise: the noise in units of each latent dimension's std.")
    parser.add_argument("--kl_weight", type=float, default=0.02,
                        help="With --latent_regularization kl: the KL term's weight against the reconstruction loss.")
    args = parser.parse_args(argv)
    check_common_arguments(args)
    for name in ("latent_dim", "hidden_dim", "num_layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("field_loss_weight", "latent_noise", "kl_weight"):
        if not getattr(args, name) >= 0:  # also refuses nan
            raise ValueError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def reconstruct_split(model: EHRAutoencoderModel, split: Any, schema: EHRSchema, batch_size: int,
                      device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, logits, vectors) of every row of ``split``, in order, on the CPU; ``model`` in eval mode."""
    latents, logits, vectors = [], [], []
    for batch in iter_vectors(split, schema, batch_size, desc=desc):
        out = model(batch.to(device))
        latents.append(out.latent.float().cpu())
        logits.append(out.logits.float().cpu())
        vectors.append(batch)
    return torch.cat(latents), torch.cat(logits), torch.cat(vectors)


@torch.no_grad()
def reconstruction_metrics(model: EHRAutoencoderModel, schema: EHRSchema, logits: torch.Tensor,
                           vectors: torch.Tensor, split: str) -> dict[str, Any]:
    """Reconstruction figures of decoded records (calibrated thresholds) against the real ones, per schema group:
    accuracy for binary and one-hot groups; mean absolute error in the field's own unit (years, admissions) for
    continuous and count fields; micro precision/recall/F1 over all code cells, the mean absolute difference of
    per-code prevalence and the mean number of codes per record for the multi-hot codes."""
    model = model.to("cpu")
    total, per_group = model.loss(logits, vectors)
    decoded = model.to_vectors(logits)
    groups: dict[str, dict[str, Any]] = {}
    for group in schema.groups:
        where = schema.slices[group.name]
        real, made = vectors[:, where].double(), decoded[:, where].double()
        figures: dict[str, Any] = {"kind": group.kind, "loss": float(per_group[group.name])}
        if group.kind == "binary":
            figures["accuracy"] = float((real.round() == made.round()).double().mean())
        elif group.kind == "one_hot":
            figures["accuracy"] = float((real.argmax(dim=1) == made.argmax(dim=1)).double().mean())
        elif group.kind == "continuous":
            span = (group.maximum - group.minimum) or 1.0
            figures["mae"] = float(((real - made).abs() * span).mean())
        elif group.kind == "count":
            scale = torch.log1p(torch.tensor(float(group.maximum), dtype=torch.float64))
            counts_real = torch.expm1(real.clamp(min=0) * scale).round()
            counts_made = torch.expm1(made.clamp(min=0) * scale).round()
            figures["mae"] = float((counts_real - counts_made).abs().mean())
        else:
            true_positive = float((real * made).sum())
            predicted, actual = float(made.sum()), float(real.sum())
            precision = true_positive / predicted if predicted else 0.0
            recall = true_positive / actual if actual else 0.0
            figures["micro_precision"] = precision
            figures["micro_recall"] = recall
            figures["micro_f1"] = 2 * true_positive / (predicted + actual) if predicted + actual else 1.0
            figures["mean_prevalence_error"] = float((real.mean(dim=0) - made.mean(dim=0)).abs().mean())
            figures["codes_per_record_real"] = float(real.sum(dim=1).mean())
            figures["codes_per_record_decoded"] = float(made.sum(dim=1).mean())
        groups[group.name] = figures
    return {"split": split, "rows": int(vectors.shape[0]), "loss": float(total), "groups": groups}


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for name, figures in metrics["groups"].items():
        if "accuracy" in figures:
            parts.append(f"{name} acc {figures['accuracy']:.3f}")
        elif "mae" in figures:
            parts.append(f"{name} MAE {figures['mae']:.2f}")
        else:
            parts.append(f"{name} F1 {figures['micro_f1']:.3f} prevalence error {figures['mean_prevalence_error']:.4f}")
    return f"{metrics['split']} ({metrics['rows']} rows, loss {metrics['loss']:.3f}): " + ", ".join(parts)


# The figures that separate real records from independent marginals, and which way is better.
HIGHER_IS_BETTER = ("pairs_pearson", "prevalence_pearson", "prevalence_spearman")
LOWER_IS_BETTER = ("codes_per_patient_wasserstein", "age_wasserstein")


def holdout_reconstruction_figures(model: EHRAutoencoderModel, schema: EHRSchema, train_vectors: torch.Tensor,
                                   holdout_logits: torch.Tensor, holdout_vectors: torch.Tensor,
                                   seed: int) -> dict[str, Any]:
    """The holdout's reconstruction, decoded as the pipeline decodes by default (Bernoulli and categorical draws),
    scored with the evaluation's headline figures against the holdout itself, beside independent marginals of the
    train split scored the same way. An autoencoder whose reconstruction of real records is behind the marginals
    cannot give generated records that beat them: ``behind_marginals`` names those figures."""
    from ehr_diffusers.evaluation.ehr.baselines import BernoulliMarginals
    from ehr_diffusers.evaluation.ehr.fidelity import headline_figures

    generator = torch.Generator().manual_seed(seed)
    decoded = model.to("cpu").to_vectors(holdout_logits, sample=True, generator=generator).numpy()
    real, train = holdout_vectors.numpy(), train_vectors.numpy()
    marginals = BernoulliMarginals().fit(train, schema).sample(len(real), seed=seed)
    reconstruction = headline_figures(real, decoded, schema, train=train)
    reference = headline_figures(real, marginals, schema, train=train)
    behind = [key for key in HIGHER_IS_BETTER if reconstruction.get(key, 0.0) < reference.get(key, 0.0)]
    behind += [key for key in LOWER_IS_BETTER if key in reconstruction
               and reconstruction[key] > reference.get(key, float("inf"))]
    return {"split": HOLDOUT_SPLIT, "decode_mode": "sample", "seed": seed, "reconstruction": reconstruction,
            "independent_marginals": reference, "behind_marginals": behind}


def format_headline(headline: dict[str, Any]) -> str:
    mine, reference = headline["reconstruction"], headline["independent_marginals"]
    parts = [f"{key} {mine[key]:.3f} (marginals {reference[key]:.3f})" for key in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER)
             if key in mine]
    return "holdout reconstruction, sampled: " + ", ".join(parts)


def finalize(model: EHRAutoencoderModel, dataset: Any, schema: EHRSchema, batch_size: int,
             device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Fits the latent statistics, decoding thresholds and residual spreads on the train split and returns the
    reconstruction metrics of the train and (when the dataset has one) holdout splits, with the holdout's headline
    figures (:func:`holdout_reconstruction_figures`)."""
    model.eval()
    latents, logits, vectors = reconstruct_split(model, dataset[TRAIN_SPLIT], schema, batch_size, device,
                                                 "calibrating on train")
    model.fit_latent_statistics(latents.to(device))
    probabilities, on_device = model.probabilities(logits.to(device)), vectors.to(device)
    model.calibrate_thresholds(probabilities, on_device)
    model.calibrate_residuals(probabilities, on_device)
    del probabilities, on_device
    del latents
    metrics = {TRAIN_SPLIT: reconstruction_metrics(model, schema, logits, vectors, TRAIN_SPLIT)}
    train_vectors = vectors
    del logits
    if HOLDOUT_SPLIT in dataset:
        model.to(device)
        _, logits, vectors = reconstruct_split(model, dataset[HOLDOUT_SPLIT], schema, batch_size, device,
                                               "evaluating on holdout")
        metrics[HOLDOUT_SPLIT] = reconstruction_metrics(model, schema, logits, vectors, HOLDOUT_SPLIT)
        if len(vectors) >= 2:
            metrics["holdout_figures"] = holdout_reconstruction_figures(model, schema, train_vectors, logits, vectors,
                                                                        seed)
    else:
        logger.warning(f"the dataset has no {HOLDOUT_SPLIT!r} split: reconstruction figures are on train only")
    return metrics


# ---------------------------------------------------------------------------------------------------- training
def main(argv: Sequence[str] | None = None) -> TrainingRun:
    args = parse_args(argv)
    # Every input is checked before the accelerator starts and before any training.
    dataset, schema = load_training_dataset(args.train_data_dir)
    output_dir = check_output_dir(args.output_dir, inputs={"--train_data_dir": args.train_data_dir},
                                  argument="--output_dir", merge=True)
    resume_from = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)

    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    accelerator = make_accelerator(args, logger)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    model = EHRAutoencoderModel.from_schema(schema, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim,
                                            num_layers=args.num_layers, dropout=args.dropout,
                                            latent_regularization=args.latent_regularization,
                                            latent_noise=args.latent_noise, kl_weight=args.kl_weight)
    model.train()
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=EHRAutoencoderModel,
                             model_config=model.config)
    register_checkpoint_hooks(accelerator, {SUBFOLDER: model}, {SUBFOLDER: ema_model} if args.use_ema else None)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    train_dataset = vector_dataset(dataset[TRAIN_SPLIT], schema)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=args.train_batch_size, shuffle=True,
                                                   num_workers=args.dataloader_num_workers)
    _, max_train_steps, _ = plan_steps(args, len(train_dataloader))
    args.lr_warmup_steps = warmup_steps(args, max_train_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    seed_per_process(accelerator, args.seed)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    # The data loader may be sharded across processes: recompute the steps.
    steps_per_epoch, max_train_steps, num_train_epochs = plan_steps(args, len(train_dataloader))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)} ({schema.dim}-d record vectors)")
    logger.info(f"  Num Epochs = {num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")

    layout = batch_layout(accelerator, args)
    global_step, first_epoch, batches_to_skip = resume_state(accelerator, resume_from, args.resume_from_checkpoint,
                                                             steps_per_epoch, layout, logger)
    first_step = global_step

    unwrapped = accelerator.unwrap_model(model)
    group_names = [group.name for group in schema.groups]
    weights = {group.name: 1.0 if group.kind == "multi_hot" else args.field_loss_weight for group in schema.groups}
    losses: list[float] = []
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    accumulated = torch.zeros(len(group_names) + 1, device=accelerator.device)
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        model.train()
        batches = epoch_batches(accelerator, train_dataloader, epoch, first_epoch, batches_to_skip)
        for batch in batches:
            with accelerator.accumulate(model):
                vectors = batch["vectors"]
                # return_dict=False: a tuple passes accelerate's mixed-precision output conversion as it is.
                _, logits, kl = model(vectors, return_dict=False)
                loss, per_group = unwrapped.loss(logits.float(), vectors)
                if args.field_loss_weight != 1.0:
                    loss = sum(weights[name] * per_group[name] for name in group_names)
                if kl is not None:
                    loss = loss + unwrapped.regularization_loss(kl.float())
                figures = torch.stack([loss.detach(), *(per_group[name].detach() for name in group_names)])
                accumulated += accelerator.reduce(figures, reduction="mean") / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(unwrapped.parameters())
                global_step += 1
                progress_bar.update(1)
                values = accumulated.tolist()
                losses.append(values[0])
                logs = {"train_loss": values[0], "lr": lr_scheduler.get_last_lr()[0]}
                logs.update({f"loss/{name}": value for name, value in zip(group_names, values[1:])})
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{logs['lr']:.2e}")
                accumulated.zero_()
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, layout, logger)
            if global_step >= max_train_steps:
                break
    progress_bar.close()

    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # plain fp32 forward from here on
        if ema_model is not None:
            ema_model.copy_to(model.parameters())
        model = model.float()
        metrics = finalize(model, dataset, schema, args.eval_batch_size, accelerator.device,
                           seed=args.seed if args.seed is not None else 0)
        splits = {split: split_metrics for split, split_metrics in metrics.items() if "groups" in split_metrics}
        for split_metrics in splits.values():
            logger.info(format_metrics(split_metrics))
        summary = {f"{split}/{name}/{key}": value for split, split_metrics in splits.items()
                   for name, figures in split_metrics["groups"].items()
                   for key, value in figures.items() if isinstance(value, float)}
        if "holdout_figures" in metrics:
            headline = metrics["holdout_figures"]
            logger.info(format_headline(headline))
            summary.update({f"holdout_reconstruction/{key}": value
                            for key, value in headline["reconstruction"].items()})
            if headline["behind_marginals"]:
                logger.warning("the reconstruction of holdout records is behind independent marginals on "
                               f"{', '.join(headline['behind_marginals'])}: generated records will be too (see "
                               f"{METRICS_NAME})")
        accelerator.log(summary, step=global_step)
        metrics_file = {"description": "reconstruction of real records by the trained autoencoder: per split, the "
                                       "groups decoded with the thresholds calibrated on the train split; "
                                       "holdout_figures, the holdout decoded by sampling and scored with the "
                                       "evaluation's headline figures beside independent marginals",
                        "global_step": global_step, **metrics}
        with atomic_merge(output_dir) as staging:
            model.to("cpu").save_pretrained(staging)
            schema.save(staging)
            write_json(staging / METRICS_NAME, metrics_file)
            write_json(staging / TRAINING_ARGS_NAME, {**recorded_arguments(args), "global_step": global_step})
        logger.info(f"saved the autoencoder to {output_dir}")
    accelerator.end_training()
    return TrainingRun(output_dir=Path(output_dir), global_step=global_step, resumed_from=resume_from,
                       first_step=first_step, losses=losses, metrics=metrics)


if __name__ == "__main__":
    run_script(main)
