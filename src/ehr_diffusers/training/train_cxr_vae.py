#!/usr/bin/env python
"""Trains a grayscale chest X-ray ``AutoencoderKL`` (diffusers) on a ``prepare-cxr`` dataset, diffusers-examples
style, for the latent space of the EHRXDiff pipeline (arXiv 2409.07012, dek924/EHRXDiff) when no pretrained chest
X-ray VAE is given.

    accelerate launch -m ehr_diffusers.training.train_cxr_vae \\
        --train_data_dir demo/cxr-dataset --output_dir demo/cxr-vae --resolution 64 \\
        --block_out_channels 16,32,64 --layers_per_block 1 --learning_rate 2e-3 --max_train_steps 500 --seed 0

(the demo settings; on the 150-subject demo cohort, 874 train images, this reaches a validation PSNR of about 32 dB
against 20.3 dB for the train mean image; on a shared 2-core machine set OMP_NUM_THREADS=1, since two threads
competing with other processes run many times slower).

It fits the distinct images (previous and target) of the train split. The loss is that of Cheff (Weber et al.
2023, a chest X-ray latent diffusion model) and of latent diffusion's KL autoencoder (Rombach et al. 2022) **without
their adversarial (PatchGAN) and perceptual (LPIPS) parts**: the mean absolute error, optionally plus
``--mse_weight`` x the mean squared error, plus ``--kl_weight`` x the KL divergence of the posterior from N(0, I),
the KL summed over the latent of each image and divided by its pixel count (latent diffusion sums both terms over
each image, so ``--kl_weight 1e-6`` is its weighting). Reconstructions are therefore somewhat blurrier than those of
a GAN-trained VAE.

After training (with the EMA weights when ``--use_ema``) ``scaling_factor`` in the config is set to 1 / std of the
posterior samples of up to ``--scale_sample_size`` train images, as latent diffusion's ``scale_by_std`` does, so that
scaled latents have unit variance. ``--output_dir`` then holds the model (``config.json`` +
``diffusion_pytorch_model.safetensors``: ``AutoencoderKL.from_pretrained(output_dir)``), ``metrics.json`` (the
reconstruction MAE and PSNR of the validation split's images beside the train mean image as a reference),
``validation/`` (grids of originals over their reconstructions, at every ``--validation_steps`` and at the end),
``training_args.json``, a model card (README.md) and ``checkpoint-N`` folders for ``--resume_from_checkpoint``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ehr_diffusers.data.cxr.split import CXRImages, from_pixels, load_cxr_images, load_dataset_dict, to_pixels
from ehr_diffusers.io import atomic_file, atomic_merge, check_output_dir
from ehr_diffusers.training import TrainingRun
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
    push_output,
    recorded_arguments,
    run_script,
    seed_per_process,
    tracker_config,
    warmup_steps,
    write_json,
)

logger = get_logger(__name__, log_level="INFO")

SUBFOLDER = "vae"
METRICS_NAME = "metrics.json"
TRAINING_ARGS_NAME = "training_args.json"
VALIDATION_DIR = "validation"
TRAIN_SPLIT, VALIDATION_SPLIT = "train", "validation"


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"16,32,64"`` -> (16, 32, 64); argparse turns the ValueError into a usage error."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive comma-separated integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a chest X-ray AutoencoderKL on a prepare-cxr dataset.")
    add_common_arguments(parser, learning_rate=2e-3, num_train_epochs=10, train_batch_size=16,
                         tracker_project_name="cxr-vae")
    add = parser.add_argument
    add("--resolution", type=int, default=64, help="Images are resized to this many pixels a side.")
    add("--in_channels", type=int, default=1, help="Image channels (1: grayscale, as chest X-rays are; 3 repeats "
                                                     "the gray value for an RGB-shaped VAE).")
    add("--block_out_channels", type=parse_int_list, default=(16, 32, 64),
        help="Channels of each resolution level, comma-separated; each level after the first halves the image "
             "side (16,32,64: 64 px images -> 16x16 latents).")
    add("--layers_per_block", type=int, default=1, help="ResNet layers per level.")
    add("--latent_channels", type=int, default=4)
    add("--norm_num_groups", type=int, default=None,
        help="GroupNorm groups (default: the largest of 32, 16, 8, ... dividing every --block_out_channels).")
    add("--no_mid_block_attention", action="store_true",
        help="Leave out the self-attention of the middle block (diffusers' default keeps it).")
    add("--kl_weight", type=float, default=1e-6,
        help="Weight of the KL term (summed over each latent, per pixel), as latent diffusion's KL autoencoders.")
    add("--mse_weight", type=float, default=0.0,
        help="Weight of an MSE term added to the L1 reconstruction loss (0: L1 only).")
    add("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the encoder and decoder.")
    add("--validation_steps", type=int, default=200,
        help="Write a reconstruction grid of fixed validation images every N optimisation steps.")
    add("--num_validation_images", type=int, default=8, help="Images in each validation grid.")
    add("--scale_sample_size", type=int, default=512,
        help="Train images whose latents set scaling_factor (1 / std, latent diffusion's scale_by_std).")
    add("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints) to the Hub.")
    add("--hub_model_id", type=str, default=None,
        help="Repository id for --push_to_hub (default: the --output_dir folder name).")
    add("--hub_token", type=str, default=None, help="Hub token (default: the one `hf auth login` saved).")
    add("--hub_private_repo", action="store_true",
        help="Make the Hub repository private (required for models trained on MIMIC-derived data).")
    args = parser.parse_args(argv)
    check_common_arguments(args)
    for name in ("resolution", "in_channels", "layers_per_block", "latent_channels", "validation_steps",
                 "num_validation_images", "scale_sample_size", "norm_num_groups"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    for name in ("kl_weight", "mse_weight"):
        if not getattr(args, name) >= 0:  # also refuses nan
            raise ValueError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    factor = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of {factor} (--block_out_channels has "
                         f"{len(args.block_out_channels)} levels)")
    args.norm_num_groups = args.norm_num_groups or default_norm_groups(args.block_out_channels)
    if any(channels % args.norm_num_groups for channels in args.block_out_channels):
        raise ValueError(f"--norm_num_groups {args.norm_num_groups} must divide every --block_out_channels "
                         f"{','.join(map(str, args.block_out_channels))}")
    return args


def default_norm_groups(channels: Sequence[int]) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides every width (diffusers' default, 32, needs widths of 32+)."""
    return next(groups for groups in (32, 16, 8, 4, 2, 1) if all(width % groups == 0 for width in channels))


def vae_config(args: argparse.Namespace) -> dict[str, Any]:
    levels = len(args.block_out_channels)
    return {"in_channels": args.in_channels, "out_channels": args.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(args.block_out_channels), "layers_per_block": args.layers_per_block,
            "latent_channels": args.latent_channels, "norm_num_groups": args.norm_num_groups,
            "sample_size": args.resolution, "mid_block_add_attention": not args.no_mid_block_attention}


# ---------------------------------------------------------------------------------------------------- pieces
class PosteriorMoments:
    """Keeps the posterior moments (mean and log-variance, concatenated on channels) of the VAE's last forward.

    ``AutoencoderKL.forward`` returns only the reconstruction; the KL term needs the posterior too. Reading it from
    a forward hook lets every training forward go through the (possibly DDP-wrapped) model's ``forward``, so that
    gradients are synchronised across processes; calling ``encode``/``decode`` on the unwrapped model would not."""

    def __init__(self, vae: torch.nn.Module):
        module = vae.quant_conv if vae.quant_conv is not None else vae.encoder
        self.moments: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.moments = output

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) summed over each latent: (batch,), as ``DiagonalGaussianDistribution.kl``."""
        mean, logvar = self.moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def vae_loss(reconstruction: torch.Tensor, pixels: torch.Tensor, kl: torch.Tensor, kl_weight: float,
             mse_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 (+ ``mse_weight`` x MSE) per pixel + ``kl_weight`` x the per-image KL sum divided by the pixels of an
    image; returns the loss and its parts."""
    reconstruction, pixels = reconstruction.float(), pixels.float()
    l1 = F.l1_loss(reconstruction, pixels)
    mse = F.mse_loss(reconstruction, pixels)
    kl_per_pixel = kl.mean() / pixels[0].numel()
    loss = l1 + kl_weight * kl_per_pixel
    if mse_weight:
        loss = loss + mse_weight * mse
    return loss, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.mean().detach()}


@torch.no_grad()
def reconstruct(vae: Any, images: torch.Tensor, channels: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """uint8 (n, S, S) -> their reconstructions, uint8 (n, S, S), decoded from the posterior mean."""
    parts = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start:start + batch_size], channels).to(device)
        latents = vae.encode(pixels).latent_dist.mode()
        parts.append(from_pixels(vae.decode(latents).sample))
    return torch.cat(parts) if parts else images.clone()


def reconstruction_figures(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float]:
    """MAE (in [0, 1] units and in gray levels) and PSNR (dB, peak 1, averaged over images) of uint8 images."""
    real, made = originals.double() / 255.0, reconstructions.double() / 255.0
    mse = (real - made).pow(2).flatten(1).mean(dim=1).clamp(min=1e-10)
    mae = float((real - made).abs().mean())
    return {"mae": mae, "mae_gray_levels": mae * 255.0, "psnr": float((10.0 * torch.log10(1.0 / mse)).mean())}


def image_grid(rows: Sequence[torch.Tensor]) -> Any:
    """A PIL image with one row per uint8 (n, S, S) tensor, 2 px gaps."""
    from PIL import Image

    count, size = rows[0].shape[0], rows[0].shape[-1]
    gap = 2
    canvas = torch.full((len(rows) * (size + gap) - gap, count * (size + gap) - gap), 255, dtype=torch.uint8)
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            top, left = row * (size + gap), column * (size + gap)
            canvas[top:top + size, left:left + size] = image
    return Image.fromarray(canvas.numpy(), mode="L")


def write_grid(path: Path, rows: Sequence[torch.Tensor]) -> Any:
    """Writes :func:`image_grid` of ``rows`` as a PNG at ``path``; returns the grid."""
    grid = image_grid(rows)
    with atomic_file(path) as temporary:
        grid.save(temporary, format="PNG")
    return grid


@torch.no_grad()
def latent_scale(vae: Any, images: torch.Tensor, channels: int, batch_size: int, device: torch.device,
                 seed: int) -> dict[str, float]:
    """1 / std of posterior samples of ``images`` (latent diffusion's ``scale_by_std``: the std over every value of
    the sampled latents, seeded), with their mean and std."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start:start + batch_size], channels).to(device)
        posterior = vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device=device, dtype=posterior.mean.dtype)
        samples.append((posterior.mean + posterior.std * noise).float().cpu())
    latents = torch.cat(samples)
    std = float(latents.std())
    return {"scaling_factor": 1.0 / std, "latent_mean": float(latents.mean()), "latent_std": std,
            "images": len(images)}


def fixed_sample(count: int, total: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``range(total)``: the same validation images at every step."""
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, total - 1, min(count, total)).round().long().unique()


def card_config(args: argparse.Namespace, config: dict[str, Any], images: int, global_step: int,
                losses: list[float]) -> dict[str, Any]:
    return {
        **{f"vae {key}": value for key, value in config.items() if key not in ("down_block_types",
                                                                                "up_block_types")},
        "loss": f"L1{f' + {args.mse_weight} MSE' if args.mse_weight else ''} + {args.kl_weight} KL per pixel "
                "(no GAN, no LPIPS)",
        "training images (distinct, train split)": images,
        "optimisation steps": global_step,
        "batch size": args.train_batch_size,
        "gradient accumulation": args.gradient_accumulation_steps,
        "learning rate": f"{args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)",
        "EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
        "mixed precision": args.mixed_precision or "accelerate default",
        "seed": args.seed,
        "final training loss": round(losses[-1], 5) if losses else "n/a",
    }


# ---------------------------------------------------------------------------------------------------- training
def main(argv: Sequence[str] | None = None) -> TrainingRun:
    args = parse_args(argv)
    # Every input is checked before the accelerator starts and before any training.
    dataset = load_dataset_dict(args.train_data_dir)
    if TRAIN_SPLIT not in dataset:
        raise ValueError(f"--train_data_dir {args.train_data_dir}: the dataset has no {TRAIN_SPLIT!r} split")
    output_dir = check_output_dir(args.output_dir, inputs={"--train_data_dir": args.train_data_dir},
                                  argument="--output_dir", merge=True)
    resume_from = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)

    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ehr_diffusers.hub.cxr_cards import save_cxr_model_card

    accelerator = make_accelerator(args, logger)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    show = accelerator.is_local_main_process
    train_images = load_cxr_images(args.train_data_dir, TRAIN_SPLIT, args.resolution, show_progress=show)
    if VALIDATION_SPLIT in dataset:
        validation_images = load_cxr_images(args.train_data_dir, VALIDATION_SPLIT, args.resolution, show_progress=show)
    else:
        logger.warning(f"the dataset has no {VALIDATION_SPLIT!r} split: no reconstruction figures")
        validation_images = CXRImages(torch.zeros(0, args.resolution, args.resolution, dtype=torch.uint8), [])
    grid_index = fixed_sample(args.num_validation_images, len(validation_images))

    config = vae_config(args)
    vae = AutoencoderKL(**config)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    moments = PosteriorMoments(vae)
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(vae.parameters(), decay=args.ema_decay, model_cls=AutoencoderKL, model_config=vae.config)
    register_checkpoint_hooks(accelerator, {SUBFOLDER: vae}, {SUBFOLDER: ema_model} if args.use_ema else None)

    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    train_dataset = torch.utils.data.TensorDataset(train_images.images)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=args.train_batch_size, shuffle=True,
                                                   num_workers=args.dataloader_num_workers)
    _, max_train_steps, _ = plan_steps(args, len(train_dataloader))
    args.lr_warmup_steps = warmup_steps(args, max_train_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    vae, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(vae, optimizer, train_dataloader,
                                                                         lr_scheduler)
    seed_per_process(accelerator, args.seed)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    steps_per_epoch, max_train_steps, num_train_epochs = plan_steps(args, len(train_dataloader))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args))

    unwrapped = accelerator.unwrap_model(vae)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)} distinct train images at {args.resolution} px")
    logger.info(f"  VAE = {sum(p.numel() for p in unwrapped.parameters()):,} parameters "
                f"({','.join(map(str, args.block_out_channels))} channels, {args.latent_channels} latent channels)")
    logger.info(f"  Num Epochs = {num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")

    layout = batch_layout(accelerator, args)
    global_step, first_epoch, batches_to_skip = resume_state(accelerator, resume_from, args.resume_from_checkpoint,
                                                             steps_per_epoch, layout, logger)
    first_step = global_step

    def evaluation_copy() -> Any:
        """A copy holding the EMA weights (when kept), in eval mode: the training model is left untouched, and so is
        the random state (building a model draws initial weights), so that validating does not change training."""
        with torch.random.fork_rng(devices=[]):
            model = AutoencoderKL.from_config(unwrapped.config)
        model.load_state_dict(unwrapped.state_dict())
        if ema_model is not None:
            ema_model.copy_to(model.parameters())
        return model.to(accelerator.device).eval()

    def validate(model: Any, step: int, name: str) -> dict[str, Any]:
        """Reconstructs every validation image: figures over all of them, a grid of the fixed few."""
        if len(validation_images) == 0:
            return {}
        made = reconstruct(model, validation_images.images, args.in_channels, args.eval_batch_size,
                           accelerator.device)
        path = output_dir / VALIDATION_DIR / f"{name}.png"
        grid = write_grid(path, [validation_images.images[grid_index], made[grid_index]])
        figures = {"images": len(made), **reconstruction_figures(validation_images.images, made)}
        logger.info(f"validation at step {step}: PSNR {figures['psnr']:.2f} dB, MAE {figures['mae_gray_levels']:.2f} "
                    f"gray levels over {len(made)} images ({path})")
        accelerator.log({"validation/psnr": figures["psnr"], "validation/mae": figures["mae"]}, step=step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid)[None], step, dataformats="CHW")
        return figures

    losses: list[float] = []
    accumulated = torch.zeros(4, device=accelerator.device)
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not show)
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        vae.train()
        batches = epoch_batches(accelerator, train_dataloader, epoch, first_epoch, batches_to_skip)
        for (images,) in batches:
            with accelerator.accumulate(vae):
                pixels = to_pixels(images, args.in_channels)
                # return_dict=False: a tuple passes accelerate's mixed-precision output conversion as it is.
                (reconstruction,) = vae(pixels, sample_posterior=True, return_dict=False)
                loss, parts = vae_loss(reconstruction, pixels, moments.kl(), args.kl_weight, args.mse_weight)
                figures = torch.stack([loss.detach(), parts["l1"], parts["mse"], parts["kl"]])
                accumulated += accelerator.reduce(figures, reduction="mean") / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
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
                logs = {"train_loss": values[0], "loss/l1": values[1], "loss/mse": values[2], "loss/kl": values[3],
                        "lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{logs['lr']:.2e}")
                accumulated.zero_()
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, layout, logger)
                if accelerator.is_main_process and global_step % args.validation_steps == 0 \
                        and global_step < max_train_steps:
                    validate(evaluation_copy(), global_step, f"step-{global_step:06d}")
            if global_step >= max_train_steps:
                break
    progress_bar.close()
    moments.handle.remove()

    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(vae, keep_fp32_wrapper=False)  # plain fp32 forward from here on
        if ema_model is not None:
            ema_model.copy_to(vae.parameters())
        vae = vae.float().eval()
        device = accelerator.device
        sample = train_images.images[fixed_sample(args.scale_sample_size, len(train_images))]
        scale = latent_scale(vae, sample, args.in_channels, args.eval_batch_size, device,
                             args.seed if args.seed is not None else 0)
        vae.register_to_config(scaling_factor=scale["scaling_factor"])
        logger.info(f"scaling_factor {scale['scaling_factor']:.5f} (latent std {scale['latent_std']:.4f} over "
                    f"{scale['images']} train images)")
        metrics = {"description": "reconstruction (decoded from the posterior mean) of the validation split's "
                                  "distinct images; mean_image_reference: every image predicted by the train split's "
                                  "mean image", "global_step": global_step, "resolution": args.resolution,
                   "latents": scale}
        if len(validation_images):
            mean_image = train_images.images.double().mean(dim=0).round().to(torch.uint8)
            metrics[VALIDATION_SPLIT] = {
                **validate(vae, global_step, "final"),
                "mean_image_reference": reconstruction_figures(
                    validation_images.images, mean_image.expand_as(validation_images.images))}
            logger.info(f"train mean image as every reconstruction: PSNR "
                        f"{metrics[VALIDATION_SPLIT]['mean_image_reference']['psnr']:.2f} dB")
        card_metrics = {"latent scaling_factor": round(scale["scaling_factor"], 5)}
        if VALIDATION_SPLIT in metrics:
            validation = metrics[VALIDATION_SPLIT]
            card_metrics.update({
                "validation images": validation["images"],
                "validation PSNR (dB)": round(validation["psnr"], 3),
                "validation MAE (gray levels, 0-255)": round(validation["mae_gray_levels"], 3),
                "reference: train mean image, validation PSNR (dB)": round(validation["mean_image_reference"]["psnr"],
                                                                            3)})
        repo_id = args.hub_model_id or output_dir.resolve().name
        with atomic_merge(output_dir) as staging:
            vae.to("cpu").save_pretrained(staging, safe_serialization=True)
            write_json(staging / METRICS_NAME, metrics)
            write_json(staging / TRAINING_ARGS_NAME, {**recorded_arguments(args), "global_step": global_step})
            save_cxr_model_card(staging, "vae", dataset_dir=args.train_data_dir, repo_id=repo_id,
                                training_config=card_config(args, config, len(train_images), global_step, losses),
                                metrics=card_metrics, resolution=args.resolution)
        logger.info(f"saved the VAE to {output_dir}")
        if args.push_to_hub:
            push_output(args, output_dir, repo_id, logger)
    accelerator.end_training()
    return TrainingRun(output_dir=Path(output_dir), global_step=global_step, resumed_from=resume_from,
                       first_step=first_step, losses=losses, metrics=metrics)


if __name__ == "__main__":
    run_script(main)
