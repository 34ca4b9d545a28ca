#!/usr/bin/env python
"""Trains the EHRXDiff denoiser (UNet, fusion adapter and event encoder) on a ``prepare-cxr`` triplet dataset and saves
the whole ``EHRXDiffPipeline``, diffusers-examples style.

    accelerate launch -m ehr_diffusers.training.train_ehrxdiff --train_data_dir DATA --vae_path VAE \\
        --event_clip_path CLIP --output_dir MODEL --unet_config demo --max_train_steps 10000 --use_ema

The VAE is frozen: every previous and target image is encoded once (the latent's mode) and kept in memory, as is the
image encoder's output (it stays frozen). Each step noises the target latent (or, with ``--target residual``, its
change from the previous latent) on the DDPM schedule (scaled-linear betas 0.0015 -> 0.0295, as EHRXDiff, arXiv
2409.07012) and regresses the UNet's epsilon prediction (MSE). The UNet
sees the previous latent concatenated to the noisy one ("hybrid", the default) and the fused context through
cross-attention. With probability ``--condition_dropout`` a triplet's events are dropped: the event encoder then
sees no events, which is the null context that classifier-free guidance steers away from (the original trains none).

Validation (every ``--validation_steps`` and at the end) measures whether the model uses the events at all: the
epsilon loss of validation triplets under fixed noise and timesteps with their true events, with events taken from
another triplet (shuffled, seeded) and with no events. Only a true-events loss clearly below the shuffled one shows
an event effect; ``validation_metrics.json`` holds the figures with a 95% interval of the paired difference, and
``validation/`` image grids (previous | predicted | predicted with shuffled events | target).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ehr_diffusers.data.cxr.latents import cache_record, check_cache_matches, read_cached_latents
from ehr_diffusers.data.cxr.split import TRAINING_DATA_NAME, CXRSplit, load_cxr_split, to_pixels, training_record
from ehr_diffusers.evaluation.cxr.controls import derangement, paired_difference
from ehr_diffusers.io import atomic_merge, check_output_dir
from ehr_diffusers.models.event_encoder import EventEncoderModel
from ehr_diffusers.models.fusion_adapter import ADAPTER_TYPES, FusionAdapterModel
from ehr_diffusers.models.modeling_utils import weights_fingerprint
from ehr_diffusers.pipelines.pipeline_ehrxdiff import image_encoder_pixels
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
    run_script,
    seed_per_process,
    tracker_config,
    warmup_steps,
    write_json,
)
from ehr_diffusers.training.cxr_data import collate_events, load_vae

logger = get_logger(__name__, log_level="INFO")

VALIDATION_METRICS_NAME = "validation_metrics.json"

# The original's DDPM schedule (EHRXDiff.yml): "linear" in sqrt(beta), i.e. diffusers' scaled_linear.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
                    "beta_end": 0.0295, "prediction_type": "epsilon", "clip_sample": False,
                    "set_alpha_to_one": False, "steps_offset": 1}

# Named UNet sizes for --unet_config. "paper" is the original's openaimodel UNet (224/448/896/896, attention at
# levels 1-3, 8 heads, 2 res blocks, context 768: 505.8M parameters); "demo" trains on 2 CPU cores in minutes.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "attention_head_dim": 4,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 16},
    "paper": {"block_out_channels": (224, 448, 896, 896), "layers_per_block": 2, "attention_head_dim": 8,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              "norm_num_groups": 32},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the EHRXDiff denoiser and save the EHRXDiffPipeline.")
    add_common_arguments(parser, learning_rate=1e-4, num_train_epochs=100, train_batch_size=32,
                         tracker_project_name="ehrxdiff")
    add = parser.add_argument
    add("--vae_path", type=str, required=True,
        help="An AutoencoderKL folder or Hub id (train_cxr_vae's --output_dir, or a pretrained chest X-ray VAE).")
    add("--vae_subfolder", type=str, default=None, help="Subfolder of --vae_path holding the VAE (e.g. 'vae').")
    add("--event_clip_path", type=str, default=None,
        help="train_event_clip's --output_dir: its event_encoder (and image_encoder) start the model. Default: a "
             "fresh event encoder and no image encoder.")
    add("--resolution", type=int, default=None, help="Image size (default: the VAE's sample_size).")
    add("--conditioning", type=str, default="hybrid", choices=["hybrid", "cross_attention"],
        help="hybrid: the previous latent is concatenated to the noisy latent (and is in the context); "
             "cross_attention: only through the context, as the released EHRXDiff model.")
    add("--adapter_type", type=str, default="cross_attention", choices=list(ADAPTER_TYPES))
    add("--vae_tokens", action=argparse.BooleanOptionalAction, default=True,
        help="Give the fusion adapter one token per latent channel of the previous image, as the original.")
    add("--unet_config", type=str, default="demo", choices=sorted(UNET_PRESETS))
    add("--block_out_channels", type=str, default=None, help="UNet widths, comma-separated (overrides the preset).")
    add("--context_dim", type=int, default=None,
        help="Context width (default: the event encoder's; 128 for a fresh one).")
    add("--event_hidden_dim", type=int, default=128, help="Width of a fresh event encoder.")
    add("--event_num_heads", type=int, default=4, help="Heads of a fresh event encoder.")
    add("--num_latents", type=int, default=16, help="Resampler queries of the cross_attention adapter.")
    add("--pooled_events", action=argparse.BooleanOptionalAction, default=False,
        help="Also add the event encoder's pooled output to the UNet's time embedding (class_embed_type "
             "'projection'): a global path from the events to every ResNet block, beside cross-attention.")
    add("--max_events", type=int, default=256, help="Most recent events per triplet the model reads.")
    add("--target", type=str, default="image", choices=["image", "residual"],
        help="What is diffused: the target image's latent ('image', as the original) or its change from the previous "
             "image's latent ('residual'), scaled to unit variance on the train split. Most of a follow-up film is "
             "the previous one; diffusing the change leaves the model only what the events explain.")
    add("--event_change_weight", type=float, default=0.0,
        help="Weight of an auxiliary loss: a linear head on the event encoder's pooled output regresses the latent "
             "change from the previous image to the target (discarded after training). It teaches the event "
             "encoder what in the events predicts the change, which the diffusion loss alone conveys slowly.")
    add("--sample_clip_range", type=float, default=3.0,
        help="The saved DDIM sampler clips its estimate of the clean latent to +- this (latents have unit variance; "
             "0 turns it off, as the original). Near the noise end that estimate divides the epsilon error by "
             "sqrt(alpha_bar), up to 250x here: a briefly trained model otherwise drifts off the latent range.")
    add("--timestep_power", type=float, default=1.0,
        help="Training timesteps are drawn as T * u ** p with u uniform: 1 is the usual uniform draw; p > 1 spends "
             "more steps at low noise, where the small changes that events explain decide the loss.")
    add("--condition_dropout", type=float, default=0.1,
        help="Probability per triplet of training with no events (the null context for guidance).")
    add("--freeze_event_encoder", action="store_true", help="Keep the (pretrained) event encoder fixed.")
    add("--augment_previous", action="store_true",
        help="Shift and rescale the intensity of the previous image a little each step (re-encoded by the VAE).")
    add("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet (GPUs).")
    add("--validation_steps", type=int, default=1000, help="Run validation every N optimisation steps.")
    add("--validation_triplets", type=int, default=512, help="Validation triplets of the event-effect check.")
    add("--validation_draws", type=int, default=4, help="Noise/timestep draws per triplet in that check.")
    add("--validation_images", type=int, default=8, help="Triplets in each validation image grid (0: none).")
    add("--validation_inference_steps", type=int, default=25)
    add("--validation_guidance_scale", type=float, default=1.0)
    add("--save_event_embedder", type=str, default=None,
        help="Event text embedder saved with the pipeline ('minilm', a folder or Hub id; 'none' for none). "
             "Default: the one the dataset records, unless it used retrieval.")
    add("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints) to the Hub.")
    add("--hub_model_id", type=str, default=None)
    add("--hub_token", type=str, default=None)
    add("--hub_private_repo", action="store_true",
        help="Make the Hub repository private (required for models trained on MIMIC-derived data).")
    args = parser.parse_args(argv)
    check_common_arguments(args)
    for name in ("validation_steps", "validation_triplets", "validation_draws", "validation_inference_steps",
                 "max_events", "num_latents", "event_hidden_dim", "event_num_heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.validation_images < 0:
        raise ValueError(f"--validation_images must be 0 or more, got {args.validation_images}")
    if args.target == "residual" and args.augment_previous:
        raise ValueError("--augment_previous changes the previous image that --target residual is the change from; "
                         "use one of them")
    if args.target == "residual" and args.conditioning != "hybrid":
        raise ValueError("--target residual needs --conditioning hybrid: the change is added to the previous latent")
    if args.sample_clip_range < 0:
        raise ValueError(f"--sample_clip_range must be 0 or more, got {args.sample_clip_range}")
    if args.event_change_weight < 0:
        raise ValueError(f"--event_change_weight must be 0 or more, got {args.event_change_weight}")
    if not args.timestep_power > 0:
        raise ValueError(f"--timestep_power must be positive, got {args.timestep_power}")
    if not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}")
    if args.resolution is not None and args.resolution < 8:
        raise ValueError(f"--resolution must be at least 8, got {args.resolution}")
    return args


# ---------------------------------------------------------------------------------------------------- pieces
def load_event_clip(args: argparse.Namespace, event_dim: int) -> tuple[EventEncoderModel, Any]:
    """The pretrained event encoder and image encoder of ``--event_clip_path``, or a fresh event encoder (no image
    encoder); its ``event_dim`` must be the dataset's."""
    if args.event_clip_path is None:
        encoder = EventEncoderModel(event_dim=event_dim, hidden_dim=args.event_hidden_dim,
                                    num_heads=args.event_num_heads, ff_dim=4 * args.event_hidden_dim,
                                    context_dim=args.context_dim or args.event_hidden_dim, max_events=args.max_events)
        return encoder, None
    from transformers import CLIPVisionModel

    folder = Path(args.event_clip_path)
    if not (folder / "event_encoder" / "config.json").is_file():
        raise ValueError(f"--event_clip_path {folder}: no event_encoder/config.json; pass train_event_clip's "
                         "--output_dir")
    encoder = EventEncoderModel.from_pretrained(folder, subfolder="event_encoder")
    if encoder.config.event_dim != event_dim:
        raise ValueError(f"--event_clip_path {folder}: its event encoder takes {encoder.config.event_dim}-d events, "
                         f"the dataset holds {event_dim}-d embeddings")
    if args.max_events > encoder.config.max_events:
        raise ValueError(f"--max_events {args.max_events}: the pretrained event encoder takes at most "
                         f"{encoder.config.max_events}")
    encoder.register_to_config(max_events=args.max_events)  # the pipeline keeps as many as training read
    if args.context_dim is not None and args.context_dim != encoder.config.context_dim:
        raise ValueError(f"--context_dim {args.context_dim}: the pretrained event encoder's is "
                         f"{encoder.config.context_dim}")
    image_encoder = None
    if (folder / "image_encoder" / "config.json").is_file():
        image_encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder")
    return encoder, image_encoder


def unet_config(args: argparse.Namespace, latent_channels: int, latent_size: int, context_dim: int) -> dict[str, Any]:
    config = dict(UNET_PRESETS[args.unet_config])
    if args.block_out_channels is not None:
        widths = tuple(int(value) for value in args.block_out_channels.split(","))
        if len(widths) != len(config["block_out_channels"]):
            raise ValueError(f"--block_out_channels needs {len(config['block_out_channels'])} widths for "
                             f"--unet_config {args.unet_config}, got {args.block_out_channels}")
        config["block_out_channels"] = widths
    if latent_size % 2 ** (len(config["block_out_channels"]) - 1):
        raise ValueError(f"a {latent_size} x {latent_size} latent cannot be halved "
                         f"{len(config['block_out_channels']) - 1} times (--unet_config {args.unet_config})")
    in_channels = 2 * latent_channels if args.conditioning == "hybrid" else latent_channels
    if args.pooled_events:
        config.update(class_embed_type="projection", projection_class_embeddings_input_dim=context_dim)
    return {**config, "sample_size": latent_size, "in_channels": in_channels, "out_channels": latent_channels,
            "cross_attention_dim": context_dim}


@torch.no_grad()
def encode_split(vae: Any, split: CXRSplit, batch_size: int, device: torch.device, show_progress: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(previous, target) latent modes, unscaled, float32 on the CPU. Each distinct image is encoded once:
    consecutive studies chain, so most images are one triplet's target and the next one's previous image."""
    chunks = []
    for start in tqdm(range(0, len(split.images), batch_size), desc="encoding images", disable=not show_progress):
        pixels = to_pixels(split.images[start:start + batch_size], vae.config.in_channels).to(device, vae.dtype)
        chunks.append(vae.encode(pixels).latent_dist.mode().float().cpu())
    latents = torch.cat(chunks)
    return latents[torch.from_numpy(split.previous_index)], latents[torch.from_numpy(split.target_index)]


def split_latents(vae: Any, split: CXRSplit, table: Any, name: str, cache: dict[str, Any] | None,
                  args: argparse.Namespace, device: torch.device, show_progress: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(previous, target) latents of a split: read from the dataset's cached columns when it has them (checked to be
    this VAE's), else encoded here."""
    if cache is None:
        return encode_split(vae, split, args.eval_batch_size, device, show_progress)
    previous, target = read_cached_latents(table, args.train_data_dir, name)
    return torch.from_numpy(previous), torch.from_numpy(target)


@torch.no_grad()
def encode_images(image_encoder: Any, images: torch.Tensor, batch_size: int, device: torch.device,
                  show_progress: bool) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="image tokens", disable=not show_progress):
        pixels = image_encoder_pixels(to_pixels(images[start:start + batch_size]), image_encoder).to(device)
        chunks.append(image_encoder(pixel_values=pixels).last_hidden_state.float().cpu())
    return torch.cat(chunks)


def sample_timesteps(batch: int, num_timesteps: int, power: float, device: torch.device) -> torch.Tensor:
    """Training timesteps ``floor(T u^power)``, u ~ U[0, 1): uniform for power 1 (DDPM), denser at low noise above."""
    if power == 1.0:
        return torch.randint(0, num_timesteps, (batch,), device=device)
    return (torch.rand(batch) ** power * num_timesteps).long().clamp(max=num_timesteps - 1).to(device)


def augment(pixels: torch.Tensor) -> torch.Tensor:
    """Small shifts (up to 1/16 of the side) and intensity changes (x0.9-1.1, +-0.05) of the previous image: the
    same patient imaged again, not a new finding. Drawn from torch's global generator, which checkpoints hold."""
    batch = pixels.shape[0]
    shift = (torch.rand(batch, 2) - 0.5) * (2 / 16)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    moved = F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)
    gain = 0.9 + 0.2 * torch.rand(batch, 1, 1, 1)
    bias = (torch.rand(batch, 1, 1, 1) - 0.5) * 0.1
    return (moved * gain.to(pixels) + bias.to(pixels)).clamp(-1, 1)


class ConditionedBatch:
    """What one step needs for a batch of triplet indices: the cached latents and image tokens, and the events."""

    def __init__(self, split: CXRSplit, previous: torch.Tensor, target: torch.Tensor, image_tokens: torch.Tensor | None,
                 scaling_factor: float, max_events: int, residual_scale: float | None = None,
                 subjects: np.ndarray | None = None):
        self.split, self.previous, self.target, self.subjects = split, previous, target, subjects
        self.image_tokens, self.scaling_factor, self.max_events = image_tokens, scaling_factor, max_events
        self.residual_scale = residual_scale

    def __call__(self, indices: np.ndarray, events_from: np.ndarray | None = None) -> dict[str, Any]:
        sources = indices if events_from is None else events_from
        embeddings, hours, mask = collate_events(self.split, sources, self.max_events)
        target = self.target[indices] * self.scaling_factor
        if self.residual_scale is not None:  # the change from the previous latent, at unit variance
            target = (target - self.previous[indices] * self.scaling_factor) * self.residual_scale
        return {"target": target, "previous": self.previous[indices],
                "image_tokens": None if self.image_tokens is None else self.image_tokens[indices],
                "embeddings": embeddings, "hours": hours, "mask": mask}


def predict_noise(models: dict[str, Any], batch: dict[str, Any], noisy: torch.Tensor, timesteps: torch.Tensor,
                  conditioning: str, scaling_factor: float, use_vae_tokens: bool, drop: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's epsilon prediction for ``noisy`` at ``timesteps`` and the event encoder's pooled output; rows where
    ``drop`` is True get no events."""
    device = noisy.device
    mask = batch["mask"].to(device)
    if drop is not None:
        mask = mask & ~drop[:, None]
    events = models["event_encoder"](batch["embeddings"].to(device), mask, batch["hours"].to(device))
    image_tokens = batch["image_tokens"]
    previous = batch["previous"].to(device)
    context = models["fusion_adapter"](events.tokens, events.mask,
                                       None if image_tokens is None else image_tokens.to(device),
                                       previous if use_vae_tokens else None)
    model_input = torch.cat([noisy, previous * scaling_factor], dim=1) if conditioning == "hybrid" else noisy
    pooled = events.pooled if unwrap_config(models["unet"]).class_embed_type == "projection" else None
    return (models["unet"](model_input, timesteps, encoder_hidden_states=context, class_labels=pooled).sample,
            events.pooled)


def unwrap_config(model: Any) -> Any:
    """The diffusers config of a model, through DDP's wrapper."""
    return getattr(model, "module", model).config


@torch.no_grad()
def event_effect(models: dict[str, Any], batches: ConditionedBatch, scheduler: Any, args: argparse.Namespace,
                 use_vae_tokens: bool, device: torch.device) -> dict[str, Any]:
    """Validation epsilon loss per triplet with true, shuffled and no events, under the same noise and timesteps
    (seeded, ``--validation_draws`` per triplet, timesteps stratified over the schedule); the paired differences
    carry Student t 95% intervals over subjects (a patient's triplets are not independent), over all triplets and
    over those whose findings changed."""
    n = min(args.validation_triplets, len(batches.split))
    indices = np.arange(n)
    shuffled = derangement(n, seed=0)
    generator = torch.Generator().manual_seed(0)
    losses = {name: np.zeros(n) for name in ("true", "shuffled", "none")}
    for start in range(0, n, args.eval_batch_size):
        rows = indices[start:start + args.eval_batch_size]
        batch = batches(rows)  # the events are padded once per batch of rows, not once per draw
        conditions = (("true", batch, None), ("shuffled", batches(rows, shuffled[rows]), None),
                      ("none", batch, torch.ones(len(rows), dtype=torch.bool, device=device)))
        clean = batch["target"].to(device)
        for draw in range(args.validation_draws):
            noise = torch.randn(clean.shape, generator=generator).to(device)
            strata = (torch.from_numpy(rows) * args.validation_draws + draw) / (n * args.validation_draws)
            timesteps = (strata * scheduler.config.num_train_timesteps).long().to(device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            for name, conditioned, drop in conditions:
                prediction, _ = predict_noise(models, conditioned, noisy, timesteps, args.conditioning,
                                              batches.scaling_factor, use_vae_tokens, drop)
                error = ((prediction.float() - noise) ** 2).flatten(1).mean(dim=1).cpu().numpy()
                losses[name][rows] += error / args.validation_draws
    subjects = None if batches.subjects is None else batches.subjects[:n]
    result: dict[str, Any] = {"triplets": n, "draws_per_triplet": args.validation_draws}
    for name, values in losses.items():
        result[f"loss_{name}_events"] = float(values.mean())
    for name in ("shuffled", "none"):
        result[f"{name}_minus_true"] = paired_difference(losses[name] - losses["true"], losses["true"], subjects)
    result["event_effect"] = bool(result["shuffled_minus_true"]["ci95"][0] > 0)
    split = batches.split
    if split.chexpert_previous is not None and split.chexpert_target is not None:
        # the "Diff" triplets: a CheXpert finding present (1) in one study and not in the other
        changed = ((split.chexpert_previous[:n] == 1) != (split.chexpert_target[:n] == 1)).any(axis=1)
        units = changed.sum() if subjects is None else len(np.unique(subjects[changed]))
        if units >= 2:  # an interval needs two subjects: a few triplets may all be one patient's
            result["changed_findings"] = {
                "triplets": int(changed.sum()),
                "shuffled_minus_true": paired_difference(losses["shuffled"][changed] - losses["true"][changed],
                                                         losses["true"][changed],
                                                         None if subjects is None else subjects[changed])}
    return result


def build_pipeline(models: dict[str, Any], vae: Any, event_embedder: Any, conditioning: str,
                   residual_scale: float | None = None, clip_range: float = 0.0) -> Any:
    from diffusers import DDIMScheduler

    from ehr_diffusers.pipelines.pipeline_ehrxdiff import EHRXDiffPipeline

    clip = {"clip_sample": True, "clip_sample_range": clip_range} if clip_range > 0 else {}
    return EHRXDiffPipeline(vae=vae, unet=models["unet"], scheduler=DDIMScheduler(**{**SCHEDULER_CONFIG, **clip}),
                            event_encoder=models["event_encoder"], fusion_adapter=models["fusion_adapter"],
                            image_encoder=models.get("image_encoder"), event_embedder=event_embedder,
                            conditioning=conditioning, residual_scale=residual_scale)


@torch.no_grad()
def validation_grid(pipeline: Any, split: CXRSplit, args: argparse.Namespace, path: Path) -> None:
    """previous | predicted | predicted with shuffled events | target, one row per validation triplet."""
    from PIL import Image

    n = min(args.validation_images, len(split))
    if n == 0:
        return
    shuffled = derangement(len(split), seed=0)
    pipeline.set_progress_bar_config(disable=True)
    size = split.previous.shape[-1]
    columns = [split.previous[:n].numpy()]
    keep = pipeline.event_encoder.config.max_events  # the most recent events, as training reads them
    for sources in (np.arange(n), shuffled[:n]):
        images = pipeline([Image.fromarray(image) for image in split.previous[:n].numpy()],
                          event_embeddings=[split.event_embeddings[i][-keep:] for i in sources],
                          event_hours=[split.event_hours[i][-keep:] for i in sources],
                          num_inference_steps=args.validation_inference_steps,
                          guidance_scale=args.validation_guidance_scale,
                          generator=[torch.Generator().manual_seed(i) for i in range(n)], output_type="np").images
        columns.append((images[..., 0] * 255).round().astype(np.uint8))
    columns.append(split.target[:n].numpy())
    grid = np.concatenate([np.concatenate(list(column), axis=0) for column in columns], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.reshape(n * size, len(columns) * size)).save(path)


def resolve_event_embedder(spec: str | None, summary: dict[str, Any], event_dim: int) -> Any:
    """The text embedder saved with the pipeline, so that ``predict-cxr --events FILE`` can embed text: by default
    the one that made the dataset's embeddings, unless they were retrieval-augmented (the pipeline cannot repeat
    that), then none."""
    from ehr_diffusers.text.embed import load_embedder

    info = summary.get("embeddings") or {}
    if spec is not None and spec.lower() == "none":
        return None
    if spec is None:
        if info.get("retrieval"):
            logger.warning("the dataset's event embeddings are retrieval-augmented: the pipeline is saved without an "
                           "event embedder; pass event embeddings made the same way")
            return None
        spec = (summary.get("options") or {}).get("embedder")
        if spec is None:
            return None
    embedder = load_embedder(spec)
    if embedder.dim != event_dim:
        raise ValueError(f"--save_event_embedder {spec}: makes {embedder.dim}-d embeddings, the dataset holds "
                         f"{event_dim}-d ones")
    return embedder.eval().requires_grad_(False)


def render_card(args: argparse.Namespace, training: dict[str, Any], validation: dict[str, Any] | None,
                repo_id: str, resolution: int) -> str:
    """The model card (``templates/model_card_ehrxdiff.md``) with the validation's event-effect figures in words."""
    from ehr_diffusers.hub.cxr_cards import cxr_training_data_record, render_ehrxdiff_model_card

    effect = "Not measured: the dataset has no validation split."
    if validation:
        gap = validation["shuffled_minus_true"]
        effect = (f"Validation epsilon loss over {validation['triplets']} triplets ({validation['draws_per_triplet']} "
                  f"noise draws each): {validation['loss_true_events']:.5f} with the true events, "
                  f"{validation['loss_shuffled_events']:.5f} with shuffled events, "
                  f"{validation['loss_none_events']:.5f} with none; shuffled - true = {gap['mean']:.5f} (95% CI "
                  f"{gap['ci95'][0]:.5f} to {gap['ci95'][1]:.5f}, over {gap['units']} subjects).")
        changed = validation.get("changed_findings")
        if changed:
            sub = changed["shuffled_minus_true"]
            effect += (f" On the {changed['triplets']} triplets whose CheXpert findings changed: {sub['mean']:.5f} "
                       f"(95% CI {sub['ci95'][0]:.5f} to {sub['ci95'][1]:.5f}).")
    return render_ehrxdiff_model_card(cxr_training_data_record(args.train_data_dir), training, effect, model_id=repo_id,
                                      adapter=args.adapter_type, conditioning=args.conditioning,
                                      resolution=resolution)


# ---------------------------------------------------------------------------------------------------- training
def main(argv: Sequence[str] | None = None) -> TrainingRun:
    args = parse_args(argv)
    from datasets import load_from_disk

    from ehr_diffusers.data.cxr.dataset import SUMMARY_NAME

    data_dir = Path(args.train_data_dir)
    if not (data_dir / SUMMARY_NAME).is_file():
        raise ValueError(f"--train_data_dir {data_dir}: not a prepare-cxr dataset ({SUMMARY_NAME} missing)")
    summary = json.loads((data_dir / SUMMARY_NAME).read_text())
    info = summary.get("embeddings") or {}
    if not info.get("dim"):
        raise ValueError(f"--train_data_dir {data_dir}: no event_embeddings; prepare it with an embedder "
                         "(prepare-cxr --embedder minilm)")
    event_dim = int(info["dim"])
    splits = load_from_disk(str(data_dir))
    if "train" not in splits:
        raise ValueError(f"--train_data_dir {data_dir}: no train split")
    output_dir = check_output_dir(args.output_dir, inputs={"--train_data_dir": args.train_data_dir},
                                  argument="--output_dir", merge=True)
    resume_from = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    vae = load_vae(args.vae_path, args.vae_subfolder)
    resolution = args.resolution or vae.config.sample_size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % scale:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {scale}")
    cache = cache_record(data_dir)
    if cache is not None:  # encoded once by cache-latents: used only when made by this VAE at this resolution
        check_cache_matches(data_dir, cache, args.vae_path, weights_fingerprint(vae), resolution, "--vae_path")
    if args.resolution is not None and args.resolution != vae.config.sample_size:
        vae.register_to_config(sample_size=args.resolution)
    event_encoder, image_encoder = load_event_clip(args, event_dim)
    event_embedder = resolve_event_embedder(args.save_event_embedder, summary, event_dim)
    context_dim = event_encoder.config.context_dim
    latent_channels, latent_size = vae.config.latent_channels, resolution // scale
    config = unet_config(args, latent_channels, latent_size, context_dim)

    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    accelerator = make_accelerator(args, logger)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    device = accelerator.device
    show = accelerator.is_local_main_process

    # with cached latents the train images are read only when something else needs their pixels
    train_pixels = cache is None or image_encoder is not None or args.augment_previous
    train = load_cxr_split(data_dir, "train", resolution, show_progress=show, images=train_pixels)
    validation_split = load_cxr_split(data_dir, "validation", resolution, show_progress=show) \
        if "validation" in splits else None
    vae.to(device)
    train_previous, train_target = split_latents(vae, train, splits["train"], "train", cache, args, device, show)
    train_tokens = None
    if image_encoder is not None:  # frozen (its CLIP pretraining trained it): its tokens are computed once
        image_encoder.to(device).eval().requires_grad_(False)
        train_tokens = encode_images(image_encoder, train.images, args.eval_batch_size, device, show
                                         )[torch.from_numpy(train.previous_index)]
    residual_scale = None
    if args.target == "residual":
        change = (train_target - train_previous) * vae.config.scaling_factor
        residual_scale = float(1.0 / change.std().clamp(min=1e-6))
        logger.info(f"residual target: the change from the previous latent has std {1 / residual_scale:.4f} "
                    f"(scaled latents); residual_scale {residual_scale:.4f}")
    batches = ConditionedBatch(train, train_previous, train_target, train_tokens, vae.config.scaling_factor,
                               args.max_events, residual_scale)
    validation_batches = None
    if validation_split is not None:
        previous, target = split_latents(vae, validation_split, splits["validation"], "validation",
                                         cache, args, device, show)
        tokens = None if image_encoder is None else encode_images(
            image_encoder, validation_split.images, args.eval_batch_size, device, show
        )[torch.from_numpy(validation_split.previous_index)]
        validation_batches = ConditionedBatch(validation_split, previous, target, tokens,
                                              vae.config.scaling_factor, args.max_events, residual_scale,
                                              np.asarray(splits["validation"]["subject_id"]))

    noise_scheduler = DDPMScheduler(**{key: value for key, value in SCHEDULER_CONFIG.items()
                                       if key != "set_alpha_to_one"})
    unet = UNet2DConditionModel(**config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    image_dim = None if image_encoder is None else image_encoder.config.hidden_size
    image_tokens_count = None if image_encoder is None else \
        (image_encoder.config.image_size // image_encoder.config.patch_size) ** 2 + 1
    fusion_adapter = FusionAdapterModel(adapter_type=args.adapter_type, context_dim=context_dim, image_dim=image_dim,
                                        num_image_tokens=image_tokens_count or 65,
                                        vae_channels=latent_channels if args.vae_tokens else None,
                                        vae_token_dim=latent_size * latent_size, num_latents=args.num_latents,
                                        num_heads=max(1, context_dim // 32), num_event_tokens=args.max_events,
                                        num_output_tokens=args.num_latents)
    models: dict[str, Any] = {"unet": unet, "fusion_adapter": fusion_adapter, "event_encoder": event_encoder}
    trained = ["unet", "fusion_adapter"] + ([] if args.freeze_event_encoder else ["event_encoder"])
    if image_encoder is not None:
        models["image_encoder"] = image_encoder
    event_encoder.to(device).requires_grad_(not args.freeze_event_encoder)
    ema: dict[str, Any] = {}
    if args.use_ema:
        ema = {name: EMAModel(models[name].parameters(), decay=args.ema_decay, model_cls=type(models[name]),
                              model_config=models[name].config) for name in trained}
    register_checkpoint_hooks(accelerator, {name: models[name] for name in trained}, ema or None)

    change_head = None
    if args.event_change_weight > 0:
        if args.freeze_event_encoder:
            raise ValueError("--event_change_weight trains the event encoder: leave out --freeze_event_encoder")
        change_head = torch.nn.Linear(context_dim, latent_channels * latent_size * latent_size)
    parameters = [parameter for name in trained for parameter in models[name].parameters()]
    if change_head is not None:
        parameters += list(change_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    indices = torch.utils.data.TensorDataset(torch.arange(len(train)))
    train_dataloader = torch.utils.data.DataLoader(indices, batch_size=args.train_batch_size, shuffle=True,
                                                   num_workers=args.dataloader_num_workers)
    _, max_train_steps, _ = plan_steps(args, len(train_dataloader))
    args.lr_warmup_steps = warmup_steps(args, max_train_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    extra = [] if change_head is None else [change_head]  # checkpointed by accelerate itself, never saved
    prepared = accelerator.prepare(*[models[name] for name in trained], *extra, optimizer, train_dataloader,
                                   lr_scheduler)
    seed_per_process(accelerator, args.seed)
    for name, model in zip(trained, prepared):
        models[name] = model
    if change_head is not None:
        change_head = prepared[len(trained)]
    optimizer, train_dataloader, lr_scheduler = prepared[len(trained) + len(extra):]
    for model in ema.values():
        model.to(device)
    steps_per_epoch, max_train_steps, num_train_epochs = plan_steps(args, len(train_dataloader))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args))

    unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num triplets = {len(train)} ({resolution} px, {latent_channels}x{latent_size}x{latent_size} "
                f"latents, {event_dim}-d events, {args.conditioning} conditioning)")
    for name in models:
        count = sum(p.numel() for p in unwrapped[name].parameters())
        logger.info(f"  {name} = {count:,} parameters ({'trained' if name in trained else 'frozen'})")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {max_train_steps}")

    layout = batch_layout(accelerator, args)
    global_step, first_epoch, batches_to_skip = resume_state(accelerator, resume_from, args.resume_from_checkpoint,
                                                             steps_per_epoch, layout, logger)
    first_step = global_step
    use_vae_tokens = args.vae_tokens

    def eval_models() -> dict[str, Any]:
        """Copies of the models holding the EMA weights (when kept), in eval mode; training weights stay as they
        are."""
        copies = {}
        for name, model in unwrapped.items():
            if name not in trained:
                copies[name] = model
                continue
            copy = deepcopy(model)  # not from_config: a fresh init would draw from the RNG training goes on with
            if name in ema:
                ema[name].copy_to(copy.parameters())
            copies[name] = copy.to(device).eval()
        return copies

    def validate(step: int) -> dict[str, Any] | None:
        if validation_batches is None:
            return None
        copies = eval_models()
        result = event_effect(copies, validation_batches, noise_scheduler, args, use_vae_tokens, device)
        gap = result["shuffled_minus_true"]
        changed = result.get("changed_findings")
        logger.info(f"validation at step {step}: epsilon loss true {result['loss_true_events']:.5f}, shuffled "
                    f"{result['loss_shuffled_events']:.5f}, none {result['loss_none_events']:.5f}; shuffled - true "
                    f"{gap['mean']:.5f} (95% CI {gap['ci95'][0]:.5f} to {gap['ci95'][1]:.5f})"
                    + ("" if changed is None else f"; on the {changed['triplets']} triplets whose findings changed "
                       f"{changed['shuffled_minus_true']['mean']:.5f} (95% CI "
                       f"{changed['shuffled_minus_true']['ci95'][0]:.5f} to "
                       f"{changed['shuffled_minus_true']['ci95'][1]:.5f})"))
        accelerator.log({"validation/loss_true": result["loss_true_events"],
                         "validation/loss_shuffled": result["loss_shuffled_events"],
                         "validation/loss_none": result["loss_none_events"]}, step=step)
        if args.validation_images:
            pipeline = build_pipeline(copies, vae, None, args.conditioning, residual_scale, args.sample_clip_range)
            validation_grid(pipeline, validation_batches.split, args, output_dir / "validation" / f"step-{step}.png")
        return result

    losses: list[float] = []
    history: list[dict[str, Any]] = []
    train_loss = 0.0
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not show)
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        for name in trained:
            models[name].train()
        loader = epoch_batches(accelerator, train_dataloader, epoch, first_epoch, batches_to_skip)
        for (rows,) in loader:
            with accelerator.accumulate(*[models[name] for name in trained]):
                batch = batches(rows.cpu().numpy())
                clean = batch["target"].to(device)
                if args.augment_previous:
                    pixels = augment(to_pixels(train.previous[rows.cpu()], vae.config.in_channels).to(device))
                    with torch.no_grad():
                        batch["previous"] = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
                noise = torch.randn_like(clean)
                timesteps = sample_timesteps(clean.shape[0], noise_scheduler.config.num_train_timesteps,
                                             args.timestep_power, device)
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                drop = torch.rand(clean.shape[0], device=device) < args.condition_dropout
                prediction, pooled = predict_noise(models, batch, noisy, timesteps, args.conditioning,
                                                   vae.config.scaling_factor, use_vae_tokens, drop)
                loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
                if change_head is not None:  # on every row, weighted by the rows that kept their events
                    change = clean if residual_scale is not None else \
                        clean - batch["previous"].to(device) * vae.config.scaling_factor
                    error = ((change_head(pooled).view_as(change).float() - change.float()) ** 2).flatten(1).mean(1)
                    kept = (~drop).float()
                    loss = loss + args.event_change_weight * (error * kept).sum() / kept.sum().clamp(min=1.0)
                train_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / \
                    args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                for name, model in ema.items():
                    model.step(unwrapped[name].parameters())
                global_step += 1
                progress_bar.update(1)
                losses.append(train_loss)
                logs = {"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{logs['lr']:.2e}")
                train_loss = 0.0
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, layout, logger)
                if accelerator.is_main_process and global_step % args.validation_steps == 0 \
                        and global_step < max_train_steps:
                    result = validate(global_step)
                    if result is not None:
                        history.append({"step": global_step, **result})
            if global_step >= max_train_steps:
                break
    progress_bar.close()

    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        final = validate(global_step)
        copies = eval_models()
        pipeline = build_pipeline({name: model.to("cpu").float() for name, model in copies.items()}, vae.to("cpu"),
                                  event_embedder, args.conditioning, residual_scale, args.sample_clip_range)
        training = {"UNet preset": args.unet_config, **{f"UNet {key}": value for key, value in config.items()
                                                        if key in ("block_out_channels", "layers_per_block",
                                                                   "cross_attention_dim", "in_channels")},
                    "conditioning": args.conditioning, "fusion adapter": args.adapter_type,
                    "pooled events in the time embedding": args.pooled_events,
                    "event-change auxiliary loss weight": args.event_change_weight,
                    "sampler x0 clipping": f"+-{args.sample_clip_range:g}" if args.sample_clip_range else "off",
                    "diffused": "the change from the previous latent" if residual_scale else "the target latent",
                    "timesteps": "uniform" if args.timestep_power == 1 else f"T u^{args.timestep_power:g}",
                    "VAE tokens in the context": args.vae_tokens, "resolution": resolution,
                    "VAE": args.vae_path, "event encoder": args.event_clip_path or "fresh",
                    "latents": "encoded by the VAE here" if cache is None else
                    f"read from the dataset (cache-latents, VAE sha256 {cache['vae_sha256'][:12]})",
                    "processes": accelerator.num_processes,
                    "trained": ", ".join(trained), "condition dropout": args.condition_dropout,
                    "previous-image augmentation": args.augment_previous, "max events": args.max_events,
                    "training triplets": len(train), "optimisation steps": global_step,
                    "batch size": total_batch_size, "learning rate": f"{args.learning_rate} ({args.lr_scheduler})",
                    "EMA": f"decay {args.ema_decay}" if args.use_ema else "no", "seed": args.seed,
                    "final training loss": round(losses[-1], 5) if losses else "n/a"}
        metrics = {"final": final, "history": history}
        repo_id = args.hub_model_id or output_dir.resolve().name
        with atomic_merge(output_dir) as staging:
            pipeline.save_pretrained(str(staging))
            write_json(staging / VALIDATION_METRICS_NAME, metrics)
            if train.subject_id is not None:
                write_json(staging / TRAINING_DATA_NAME, training_record(args.train_data_dir, "train",
                                                                         train.subject_id))
            (staging / "README.md").write_text(render_card(args, training, final, repo_id, resolution))
        logger.info(f"saved the pipeline to {output_dir}")
        if args.push_to_hub:
            push_output(args, output_dir, repo_id, logger)
    accelerator.end_training()
    return TrainingRun(output_dir=Path(output_dir), global_step=global_step, resumed_from=resume_from,
                       first_step=first_step, losses=losses, metrics=metrics)


if __name__ == "__main__":
    run_script(main)
