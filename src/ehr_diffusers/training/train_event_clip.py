#!/usr/bin/env python
"""Pretrains the EHRXDiff event encoder (arXiv 2409.07012, dek924/EHRXDiff) against a chest X-ray image encoder with
the symmetric InfoNCE loss of CLIP (Radford et al. 2021), diffusers-examples style.

    accelerate launch -m ehr_diffusers.training.train_event_clip \\
        --train_data_dir demo/cxr-dataset --output_dir demo/event-clip --max_train_steps 300 --seed 0

On the 150-subject demo cohort the events say little about the previous image (a logistic probe on mean event
embeddings predicts its CheXpert findings at validation AUROC 0.50-0.76), and retrieval within the validation split
stays near chance after 300-800 steps while train-split retrieval climbs far above it: the encoders memorise
training pairs. Learning rates of 2e-3 and above collapsed every embedding to one point (loss stuck at log(batch)).

Each train triplet gives a positive pair: its previous image and the events recorded after it (the event encoder's
``pooled`` output, :class:`~ehr_diffusers.models.event_encoder.EventEncoderModel`). The other pairs of the batch are
the negatives; triplets of the batch that share their previous image are positives of each other (soft targets),
not false negatives. Both embeddings are L2-normalised and compared at a learnable temperature: ``logit_scale``
(initially log(1 / ``--init_temperature``), the logits' scale clamped at ``--max_logit_scale``, 100 as in CLIP).
Under several processes each contrasts its own batch: embeddings are not gathered across processes as CLIP does, so
the negatives per pair are those of ``--train_batch_size``.

The image encoder is a transformers ``CLIPVisionModelWithProjection``: ``--image_encoder`` (a folder or Hub id of a
CLIP vision model; a model without a projection, or one projecting to another width, gets a new
``visual_projection`` to ``--context_dim``), or, by default, a tiny one built from a config (``--image_*`` flags;
grayscale, ``--resolution`` px). Its projection is where the image side is mapped into the shared space, so the
event side needs none: the event encoder's ``context_dim`` is that space's width.

``--output_dir`` then holds ``event_encoder/`` (``EventEncoderModel.from_pretrained(out, subfolder="event_encoder")``),
``image_encoder/`` (``CLIPVisionModelWithProjection.from_pretrained(out, subfolder="image_encoder")``, the projection
included), ``event_clip.json`` (the learned ``logit_scale`` and temperature, which belong to the pair rather than to
either encoder, and how images are normalised), ``metrics.json`` (retrieval within the validation split: top-1/top-5
accuracy image -> events and events -> image with their chance levels; the same on the train split, a memorisation
check), ``training_args.json``, a model card (README.md) and
``checkpoint-N`` folders for ``--resume_from_checkpoint`` (the event encoder as a diffusers subfolder; the image
encoder, the logit scale and, with ``--use_ema``, the image encoder's EMA in accelerate's own files).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torch import nn
from tqdm.auto import tqdm

from ehr_diffusers.data.cxr.split import EMBEDDINGS_COLUMN, CXRSplit, load_cxr_split, load_dataset_dict, to_pixels
from ehr_diffusers.io import atomic_merge, check_output_dir
from ehr_diffusers.models.event_encoder import EventEncoderModel
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
from ehr_diffusers.training.cxr_data import collate_events

logger = get_logger(__name__, log_level="INFO")

EVENT_SUBFOLDER = "event_encoder"
IMAGE_SUBFOLDER = "image_encoder"
CLIP_CONFIG_NAME = "event_clip.json"
METRICS_NAME = "metrics.json"
TRAINING_ARGS_NAME = "training_args.json"
TRAIN_SPLIT, VALIDATION_SPLIT = "train", "validation"
# OpenAI CLIP's image normalisation, for a pretrained --image_encoder without a preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOP_K = (1, 5)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain the EHRXDiff event encoder and a chest X-ray image "
                                                 "encoder with CLIP's contrastive loss.")
    add_common_arguments(parser, learning_rate=1e-3, num_train_epochs=30, train_batch_size=32,
                         tracker_project_name="event-clip")
    add = parser.add_argument
    add("--resolution", type=int, default=64, help="Images are read at this many pixels a side.")
    add("--image_encoder", type=str, default=None,
        help="A CLIP vision model (folder or Hub id) to fine-tune; default: a tiny one built from the --image_* "
             "flags.")
    add("--image_patch_size", type=int, default=8, help="Tiny image encoder: ViT patch size.")
    add("--image_hidden_size", type=int, default=64, help="Tiny image encoder: width.")
    add("--image_layers", type=int, default=2, help="Tiny image encoder: transformer layers.")
    add("--image_heads", type=int, default=2, help="Tiny image encoder: attention heads.")
    add("--image_intermediate_size", type=int, default=None, help="Tiny image encoder: MLP width (default 4 x width).")
    add("--event_encoder", type=str, default=None,
        help="An EventEncoderModel folder to start from (e.g. converted EHRXDiff weights); default: a new one from "
             "the flags below.")
    add("--event_dim", type=int, default=None,
        help="Width of the event embeddings; read from the dataset (a different value is an error).")
    add("--hidden_dim", type=int, default=128, help="Event encoder: transformer width.")
    add("--num_layers", type=int, default=2, help="Event encoder: transformer layers.")
    add("--num_heads", type=int, default=4, help="Event encoder: attention heads.")
    add("--ff_dim", type=int, default=512, help="Event encoder: feed-forward width.")
    add("--dropout", type=float, default=0.0, help="Event encoder: dropout.")
    add("--context_dim", type=int, default=128,
        help="Event encoder output width, which is also the shared embedding width (the image projection's).")
    add("--max_events", type=int, default=256, help="Most recent events kept per triplet.")
    add("--max_hours", type=float, default=48.0, help="Event encoder: time scale of the event-time encoding.")
    add("--init_temperature", type=float, default=0.07, help="Initial softmax temperature (CLIP: 0.07).")
    add("--max_logit_scale", type=float, default=100.0, help="Largest logit scale, 1 / temperature (CLIP: 100).")
    add("--validation_steps", type=int, default=200,
        help="Score validation retrieval every N optimisation steps (and at the end).")
    add("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints) to the Hub.")
    add("--hub_model_id", type=str, default=None,
        help="Repository id for --push_to_hub (default: the --output_dir folder name).")
    add("--hub_token", type=str, default=None, help="Hub token (default: the one `hf auth login` saved).")
    add("--hub_private_repo", action="store_true",
        help="Make the Hub repository private (required for models trained on MIMIC-derived data).")
    args = parser.parse_args(argv)
    check_common_arguments(args)
    for name in ("resolution", "image_patch_size", "image_hidden_size", "image_layers", "image_heads",
                 "image_intermediate_size", "event_dim", "hidden_dim", "num_layers", "num_heads", "ff_dim",
                 "context_dim", "max_events", "validation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if args.image_encoder is None:
        if args.resolution % args.image_patch_size:
            raise ValueError(f"--image_patch_size {args.image_patch_size} must divide --resolution {args.resolution}")
        if args.image_hidden_size % args.image_heads:
            raise ValueError(f"--image_heads {args.image_heads} must divide --image_hidden_size "
                             f"{args.image_hidden_size}")
    if args.event_encoder is None and args.hidden_dim % args.num_heads:
        raise ValueError(f"--num_heads {args.num_heads} must divide --hidden_dim {args.hidden_dim}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (args.init_temperature > 0.0 and 1.0 / args.init_temperature <= args.max_logit_scale):
        raise ValueError(f"--init_temperature must be positive and 1 / it at most --max_logit_scale "
                         f"({args.max_logit_scale}), got {args.init_temperature}")
    if not args.max_hours > 0:
        raise ValueError(f"--max_hours must be positive, got {args.max_hours}")
    if args.train_batch_size < 2:
        raise ValueError("--train_batch_size must be at least 2: the other pairs of a batch are the negatives")
    return args


# ---------------------------------------------------------------------------------------------------- pieces
class ContrastiveHead(nn.Module):
    """CLIP's symmetric InfoNCE loss with a learnable logit scale (Radford et al. 2021).

    ``forward(image_embeds, event_embeds, groups)`` L2-normalises both, scores every image against every event set
    at ``exp(logit_scale)`` (clamped at ``max_logit_scale``) and returns the mean of the image -> events and events
    -> image cross-entropies and the logits. ``groups`` (batch,) marks rows that share their image: their pairs are
    all positives (a soft target spread over them), not negatives of each other."""

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, image_embeds: torch.Tensor, event_embeds: torch.Tensor,
                groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images = F.normalize(image_embeds.float(), dim=-1)
        events = F.normalize(event_embeds.float(), dim=-1)
        logits = self.scale() * images @ events.T
        if groups is None:
            targets = torch.eye(len(logits), device=logits.device)
        else:
            targets = (groups[:, None] == groups[None, :]).float()
        targets = targets / targets.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        return loss, logits


def build_image_encoder(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The image encoder and how to feed it (channels, image size, normalisation), recorded in event_clip.json."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if args.image_encoder is None:
        config = CLIPVisionConfig(image_size=args.resolution, patch_size=args.image_patch_size,
                                  hidden_size=args.image_hidden_size,
                                  intermediate_size=args.image_intermediate_size or 4 * args.image_hidden_size,
                                  num_hidden_layers=args.image_layers, num_attention_heads=args.image_heads,
                                  num_channels=1, projection_dim=args.context_dim)
        return CLIPVisionModelWithProjection(config), {
            "source": "tiny CLIP vision config", "channels": 1, "image_size": args.resolution,
            "normalization": "[-1, 1]: pixel / 127.5 - 1"}
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(args.image_encoder)
    except (OSError, ValueError) as error:
        raise ValueError(f"--image_encoder {args.image_encoder}: cannot load a CLIP vision model ({error})") from None
    if encoder.config.projection_dim != args.context_dim:
        logger.warning(f"--image_encoder {args.image_encoder}: projects to {encoder.config.projection_dim}, not "
                       f"--context_dim {args.context_dim}; its visual_projection is replaced by a new one")
        encoder.visual_projection = nn.Linear(encoder.config.hidden_size, args.context_dim, bias=False)
        encoder.config.projection_dim = args.context_dim
    mean, std = CLIP_MEAN, CLIP_STD
    preprocessor = Path(args.image_encoder) / "preprocessor_config.json"
    if preprocessor.is_file():
        recorded = json.loads(preprocessor.read_text())
        mean, std = recorded.get("image_mean", mean), recorded.get("image_std", std)
    channels = encoder.config.num_channels
    return encoder, {"source": args.image_encoder, "channels": channels, "image_size": encoder.config.image_size,
                     "normalization": {"mean": list(mean)[:channels], "std": list(std)[:channels]}}


def image_inputs(images: torch.Tensor, feed: dict[str, Any], device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S) -> the image encoder's ``pixel_values`` as ``feed`` (from :func:`build_image_encoder`) says."""
    pixels = to_pixels(images, feed["channels"]).to(device)
    if pixels.shape[-1] != feed["image_size"]:
        pixels = F.interpolate(pixels, size=(feed["image_size"],) * 2, mode="bilinear", align_corners=False)
    normalization = feed["normalization"]
    if isinstance(normalization, dict):
        mean = torch.tensor(normalization["mean"], device=device).view(1, -1, 1, 1)
        std = torch.tensor(normalization["std"], device=device).view(1, -1, 1, 1)
        pixels = ((pixels + 1.0) / 2.0 - mean) / std
    return pixels


def build_event_encoder(args: argparse.Namespace, event_dim: int) -> EventEncoderModel:
    if args.event_encoder is not None:
        try:
            encoder = EventEncoderModel.from_pretrained(args.event_encoder)
        except (OSError, ValueError) as error:
            raise ValueError(f"--event_encoder {args.event_encoder}: cannot load an EventEncoderModel ({error})") \
                from None
        if encoder.config.event_dim != event_dim:
            raise ValueError(f"--event_encoder {args.event_encoder}: takes {encoder.config.event_dim}-d events, the "
                             f"dataset holds {event_dim}-d ones")
        if encoder.config.context_dim != args.context_dim:
            raise ValueError(f"--event_encoder {args.event_encoder}: outputs {encoder.config.context_dim}-d tokens; "
                             f"pass --context_dim {encoder.config.context_dim}")
        if encoder.config.max_events < args.max_events:
            raise ValueError(f"--max_events {args.max_events}: the event encoder takes at most "
                             f"{encoder.config.max_events}")
        return encoder
    return EventEncoderModel(event_dim=event_dim, hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                             num_heads=args.num_heads, ff_dim=args.ff_dim, dropout=args.dropout,
                             context_dim=args.context_dim, max_events=args.max_events, max_hours=args.max_hours)


def dataset_event_dim(dataset: Any, dataset_dir: str, requested: int | None) -> int:
    """The width of the dataset's event embeddings; a ValueError naming the folder when there are none, or naming
    ``--event_dim`` when it disagrees."""
    split = dataset[TRAIN_SPLIT]
    if EMBEDDINGS_COLUMN not in split.column_names:
        raise ValueError(f"--train_data_dir {dataset_dir}: split 'train' has no {EMBEDDINGS_COLUMN!r} column (the "
                         "dataset was prepared without event embeddings); prepare it with an embedder: "
                         "`ehr-diffusers prepare-cxr ... --embedder minilm`")
    dim = int(split.features[EMBEDDINGS_COLUMN].shape[-1])
    if requested is not None and requested != dim:
        raise ValueError(f"--event_dim {requested}: the dataset's event embeddings are {dim}-d")
    return dim


def topk_chance(candidates: int, positives: np.ndarray, k: int) -> float:
    """Mean probability that ``k`` candidates drawn at random among ``candidates`` include one of ``positives``
    (per query) correct ones: 1 - C(n - m, k) / C(n, k)."""
    k = min(k, candidates)
    return float(np.mean([1.0 - math.comb(candidates - m, k) / math.comb(candidates, k) for m in positives]))


def retrieval_figures(image_embeds: torch.Tensor, event_embeds: torch.Tensor, image_of_row: np.ndarray
                      ) -> dict[str, Any]:
    """Top-k retrieval between ``image_embeds`` (U distinct images) and ``event_embeds`` (N triplets, triplet i's
    previous image being ``image_of_row[i]``), cosine similarity.

    events -> image: for each triplet, is its image among the k nearest of the U images? image -> events: for each
    image, is one of its triplets among the k nearest of the N event sets? A rank counts the candidates scored
    strictly higher than the best correct one. Chance levels are exact for a random ranking."""
    images = F.normalize(image_embeds.double(), dim=-1)
    events = F.normalize(event_embeds.double(), dim=-1)
    scores = events @ images.T  # (N, U)
    rows = torch.arange(len(events))
    owner = torch.as_tensor(image_of_row, dtype=torch.long)
    correct = scores[rows, owner]
    rank_events_to_image = (scores > correct[:, None]).sum(dim=1)
    positive = owner[:, None] == torch.arange(len(images))[None, :]  # (N, U)
    best = torch.where(positive, scores, torch.full_like(scores, -math.inf)).max(dim=0).values
    rank_image_to_events = (scores > best[None, :]).sum(dim=0)
    counts = positive.sum(dim=0).numpy()
    figures: dict[str, Any] = {"triplets": len(events), "images": len(images)}
    for k in TOP_K:
        figures[f"image_to_events_top{k}"] = float((rank_image_to_events < k).double().mean())
        figures[f"image_to_events_top{k}_chance"] = topk_chance(len(events), counts, k)
        figures[f"events_to_image_top{k}"] = float((rank_events_to_image < k).double().mean())
        figures[f"events_to_image_top{k}_chance"] = min(k, len(images)) / len(images)
    return figures


@torch.no_grad()
def embed_split(event_encoder: Any, image_encoder: Any, split: CXRSplit, feed: dict[str, Any], max_events: int,
                batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(image embeddings of the split's distinct previous images, event embeddings of every triplet, the row of the
    first per triplet), in eval mode; the models' modes are restored."""
    modes = event_encoder.training, image_encoder.training
    event_encoder.eval()
    image_encoder.eval()
    unique, image_of_row = np.unique(split.previous_index, return_inverse=True)
    image_parts, event_parts = [], []
    for start in range(0, len(unique), batch_size):
        pixels = image_inputs(split.images[torch.from_numpy(unique[start:start + batch_size])], feed, device)
        image_parts.append(image_encoder(pixel_values=pixels).image_embeds.float().cpu())
    for start in range(0, len(split), batch_size):
        embeddings, hours, mask = collate_events(split, range(start, min(start + batch_size, len(split))), max_events)
        out = event_encoder(embeddings.to(device), mask.to(device), hours.to(device))
        event_parts.append(out.pooled.float().cpu())
    event_encoder.train(modes[0])
    image_encoder.train(modes[1])
    return torch.cat(image_parts), torch.cat(event_parts), image_of_row


def format_retrieval(figures: dict[str, Any]) -> str:
    parts = [f"{direction} top-{k} {figures[f'{key}_top{k}']:.3f} (chance {figures[f'{key}_top{k}_chance']:.3f})"
             for key, direction in (("image_to_events", "image->events"), ("events_to_image", "events->image"))
             for k in TOP_K]
    return f"{figures['triplets']} triplets, {figures['images']} images: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- training
def main(argv: Sequence[str] | None = None) -> TrainingRun:
    args = parse_args(argv)
    # Every input is checked before the accelerator starts and before any training.
    dataset = load_dataset_dict(args.train_data_dir)
    if TRAIN_SPLIT not in dataset:
        raise ValueError(f"--train_data_dir {args.train_data_dir}: the dataset has no {TRAIN_SPLIT!r} split")
    event_dim = dataset_event_dim(dataset, args.train_data_dir, args.event_dim)
    output_dir = check_output_dir(args.output_dir, inputs={"--train_data_dir": args.train_data_dir,
                                                           "--image_encoder": args.image_encoder,
                                                           "--event_encoder": args.event_encoder},
                                  argument="--output_dir", merge=True)
    resume_from = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    # Given encoders are loaded (and checked) now; new ones are built once the seed is set.
    event_encoder = build_event_encoder(args, event_dim) if args.event_encoder is not None else None
    image_encoder, feed = build_image_encoder(args) if args.image_encoder is not None else (None, None)

    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ehr_diffusers.hub.cxr_cards import save_cxr_model_card

    accelerator = make_accelerator(args, logger)
    if args.seed is not None:
        set_seed(args.seed)
    if event_encoder is None:
        event_encoder = build_event_encoder(args, event_dim)
    if image_encoder is None:
        image_encoder, feed = build_image_encoder(args)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    show = accelerator.is_local_main_process
    train = load_cxr_split(args.train_data_dir, TRAIN_SPLIT, args.resolution, show_progress=show)
    validation = None
    if VALIDATION_SPLIT in dataset:
        validation = load_cxr_split(args.train_data_dir, VALIDATION_SPLIT, args.resolution, show_progress=show)
    else:
        logger.warning(f"the dataset has no {VALIDATION_SPLIT!r} split: no retrieval figures")
    if len(train) < args.train_batch_size:
        raise ValueError(f"--train_batch_size {args.train_batch_size}: the train split has only {len(train)} "
                         "triplets (the last incomplete batch of each epoch is dropped)")

    head = ContrastiveHead(args.init_temperature, args.max_logit_scale)
    event_encoder.train()
    image_encoder.train()
    event_ema = image_ema = None
    if args.use_ema:
        event_ema = EMAModel(event_encoder.parameters(), decay=args.ema_decay, model_cls=EventEncoderModel,
                             model_config=event_encoder.config)
        image_ema = EMAModel(image_encoder.parameters(), decay=args.ema_decay)
        accelerator.register_for_checkpointing(image_ema)
    # The event encoder is saved in diffusers' format in checkpoints; the image encoder and the logit scale are
    # left to accelerate (model_1.safetensors, ...).
    register_checkpoint_hooks(accelerator, {EVENT_SUBFOLDER: event_encoder},
                              {EVENT_SUBFOLDER: event_ema} if args.use_ema else None)

    parameters = [
        {"params": [*event_encoder.parameters(), *image_encoder.parameters()]},
        {"params": list(head.parameters()), "weight_decay": 0.0},  # CLIP leaves the temperature undecayed
    ]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    train_dataset = torch.utils.data.TensorDataset(torch.arange(len(train)))
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=args.train_batch_size, shuffle=True,
                                                   drop_last=True, num_workers=args.dataloader_num_workers)
    _, max_train_steps, _ = plan_steps(args, len(train_dataloader))
    args.lr_warmup_steps = warmup_steps(args, max_train_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    event_encoder, image_encoder, head, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        event_encoder, image_encoder, head, optimizer, train_dataloader, lr_scheduler)
    seed_per_process(accelerator, args.seed)
    for ema in (event_ema, image_ema):
        if ema is not None:
            ema.to(accelerator.device)
    steps_per_epoch, max_train_steps, num_train_epochs = plan_steps(args, len(train_dataloader))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args))

    unwrapped_events = accelerator.unwrap_model(event_encoder)
    unwrapped_images = accelerator.unwrap_model(image_encoder)
    unwrapped_head = accelerator.unwrap_model(head)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train)} triplets ({len(np.unique(train.previous_index))} distinct previous "
                f"images at {args.resolution} px, {event_dim}-d events)")
    logger.info(f"  Event encoder = {sum(p.numel() for p in unwrapped_events.parameters()):,} parameters, image "
                f"encoder = {sum(p.numel() for p in unwrapped_images.parameters()):,} ({feed['source']})")
    logger.info(f"  Num Epochs = {num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")

    layout = batch_layout(accelerator, args)
    global_step, first_epoch, batches_to_skip = resume_state(accelerator, resume_from, args.resume_from_checkpoint,
                                                             steps_per_epoch, layout, logger)
    first_step = global_step

    def validate(events_model: Any, images_model: Any, step: int) -> dict[str, Any]:
        figures = retrieval_figures(*embed_split(events_model, images_model, validation, feed, args.max_events,
                                                 args.eval_batch_size, accelerator.device))
        logger.info(f"validation retrieval at step {step}: {format_retrieval(figures)}")
        accelerator.log({f"validation/{key}": value for key, value in figures.items() if "chance" not in key},
                        step=step)
        return figures

    def evaluation_copies() -> tuple[Any, Any]:
        """Copies holding the EMA weights (when kept): the training models are left untouched, and so is the random
        state (building a model draws initial weights), so that validating does not change training."""
        with torch.random.fork_rng(devices=[]):
            events_model = EventEncoderModel.from_config(unwrapped_events.config)
            images_model = type(unwrapped_images)(unwrapped_images.config)
        events_model.load_state_dict(unwrapped_events.state_dict())
        images_model.load_state_dict(unwrapped_images.state_dict())
        if event_ema is not None:
            event_ema.copy_to(events_model.parameters())
            image_ema.copy_to(images_model.parameters())
        return events_model.to(accelerator.device), images_model.to(accelerator.device)

    losses: list[float] = []
    accumulated = torch.zeros(2, device=accelerator.device)
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not show)
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        event_encoder.train()
        image_encoder.train()
        batches = epoch_batches(accelerator, train_dataloader, epoch, first_epoch, batches_to_skip)
        for (indices,) in batches:
            with accelerator.accumulate(event_encoder, image_encoder, head):
                rows = indices.cpu()
                embeddings, hours, mask = collate_events(train, rows, args.max_events)
                device = accelerator.device
                pixels = image_inputs(train.previous[rows], feed, device)
                groups = torch.from_numpy(train.previous_index[rows.numpy()]).to(device)
                image_embeds = image_encoder(pixel_values=pixels).image_embeds
                # return_dict=False: a tuple passes accelerate's mixed-precision output conversion as it is.
                _, _, pooled = event_encoder(embeddings.to(device), mask.to(device), hours.to(device),
                                             return_dict=False)
                loss, logits = head(image_embeds, pooled, groups)
                accuracy = (logits.argmax(dim=1) == torch.arange(len(logits), device=device)).float().mean()
                figures = torch.stack([loss.detach(), accuracy.detach()])
                accumulated += accelerator.reduce(figures, reduction="mean") / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    params = [*event_encoder.parameters(), *image_encoder.parameters(), *head.parameters()]
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if event_ema is not None:
                    event_ema.step(unwrapped_events.parameters())
                    image_ema.step(unwrapped_images.parameters())
                global_step += 1
                progress_bar.update(1)
                values = accumulated.tolist()
                losses.append(values[0])
                logs = {"train_loss": values[0], "train_batch_top1": values[1],
                        "logit_scale": float(unwrapped_head.scale().detach()), "lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(loss=f"{values[0]:.4f}", scale=f"{logs['logit_scale']:.1f}")
                accumulated.zero_()
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, layout, logger)
                if (validation is not None and accelerator.is_main_process and global_step % args.validation_steps == 0
                        and global_step < max_train_steps):
                    validate(*evaluation_copies(), global_step)
            if global_step >= max_train_steps:
                break
    progress_bar.close()

    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        event_encoder = accelerator.unwrap_model(event_encoder, keep_fp32_wrapper=False)
        image_encoder = accelerator.unwrap_model(image_encoder, keep_fp32_wrapper=False)
        if event_ema is not None:
            event_ema.copy_to(event_encoder.parameters())
            image_ema.copy_to(image_encoder.parameters())
        event_encoder, image_encoder = event_encoder.float().eval(), image_encoder.float().eval()
        logit_scale = float(unwrapped_head.scale().detach())
        metrics = {"description": "retrieval between each split's previous images and their events (cosine "
                                  "similarity of the L2-normalised embeddings), within the split; a rank counts the "
                                  "candidates scored above the best correct one; chance: the same figure for a "
                                  "random ranking",
                   "global_step": global_step, "logit_scale": logit_scale}
        if validation is not None:
            metrics[VALIDATION_SPLIT] = validate(event_encoder, image_encoder, global_step)
        # The same figures on the train split (a larger pool: compare each with its own chance level): far above
        # the validation figures, the encoders memorised pairs rather than learned what links events to images.
        metrics[TRAIN_SPLIT] = retrieval_figures(*embed_split(event_encoder, image_encoder, train, feed,
                                                              args.max_events, args.eval_batch_size,
                                                              accelerator.device))
        logger.info(f"train retrieval: {format_retrieval(metrics[TRAIN_SPLIT])}")
        clip_config = {"logit_scale": logit_scale, "temperature": 1.0 / logit_scale,
                       "logit_scale_parameter": float(unwrapped_head.logit_scale.detach()),
                       "max_logit_scale": args.max_logit_scale, "embedding_dim": args.context_dim,
                       "event_dim": event_dim, "max_events": args.max_events, "image_encoder": feed,
                       "resolution": args.resolution,
                       "shared_space": "event_encoder(...).pooled and image_encoder(pixel_values).image_embeds, "
                                       "each L2-normalised; logits = logit_scale * cosine similarity"}
        card_metrics = {"learned temperature": round(1.0 / logit_scale, 5)}
        if VALIDATION_SPLIT in metrics:
            for key, value in metrics[VALIDATION_SPLIT].items():
                card_metrics[f"validation {key.replace('_', ' ')}"] = round(value, 4) if isinstance(value, float) \
                    else value
        training_config = {
            **{f"event encoder {key.replace('_', ' ')}": value for key, value in event_encoder.config.items()
               if not key.startswith("_")},
            "image encoder": feed["source"],
            **{f"image encoder {key.replace('_', ' ')}": getattr(image_encoder.config, key) for key in
               ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_channels", "projection_dim")},
            "loss": "symmetric InfoNCE (CLIP), learnable temperature, shared-image pairs as positives",
            "training triplets": len(train), "optimisation steps": global_step,
            "batch size": args.train_batch_size,
            "learning rate": f"{args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)",
            "EMA": f"decay {args.ema_decay}" if args.use_ema else "no", "seed": args.seed,
            "final training loss": round(losses[-1], 5) if losses else "n/a",
        }
        repo_id = args.hub_model_id or output_dir.resolve().name
        with atomic_merge(output_dir) as staging:
            event_encoder.to("cpu").save_pretrained(staging / EVENT_SUBFOLDER)
            image_encoder.to("cpu").save_pretrained(staging / IMAGE_SUBFOLDER, safe_serialization=True)
            write_json(staging / CLIP_CONFIG_NAME, clip_config)
            write_json(staging / METRICS_NAME, metrics)
            write_json(staging / TRAINING_ARGS_NAME, {**recorded_arguments(args), "global_step": global_step})
            save_cxr_model_card(staging, "event_clip", dataset_dir=args.train_data_dir, repo_id=repo_id,
                                training_config=training_config, metrics=card_metrics, resolution=args.resolution)
        logger.info(f"saved the event and image encoders to {output_dir}")
        if args.push_to_hub:
            push_output(args, output_dir, repo_id, logger)
    accelerator.end_training()
    return TrainingRun(output_dir=Path(output_dir), global_step=global_step, resumed_from=resume_from,
                       first_step=first_step, losses=losses, metrics=metrics)


if __name__ == "__main__":
    run_script(main)
