"""``train-ehr`` and ``train-cxr``: each pipeline's models trained in order, each by its script under
``accelerate launch``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ArgumentError, DataError
from .launch import LaunchOptions, TrainingFailedError, accelerate_launch, check_launch, cuda_device_count

__all__ = ["CXR_TRAINING_PRESETS", "TRAINING_PRESETS", "TrainingFailedError", "train_cxr", "train_ehr"]

# Model sizes and run lengths per preset. "demo" trains in a few minutes on 2 CPU cores on the 5,000-patient demo
# cohort; "default" is the scripts' own defaults, sized for MIMIC-IV (latent 1024, about 300k records, a GPU).
# Condition dropout 0.5 (HealthForge: 0.05) trains the learned null condition on half the rows: unconditional records
# come from it, and at 0.05 they lose to independent marginals (BENCHMARKS.md).
# "cpu_threads" is the intra-op threads per process on a CPU: the demo's small models run as fast on one thread as on
# two on a quiet machine and 5.5x faster when other jobs keep the cores busy (BENCHMARKS.md); None leaves accelerate's
# choice (the physical cores).
TRAINING_PRESETS = {
    "demo": {
        "autoencoder": ["--latent_dim", "128", "--hidden_dim", "512", "--num_layers", "2", "--learning_rate", "1e-3",
                        "--train_batch_size", "256", "--num_train_epochs", "60", "--field_loss_weight", "20",
                        "--latent_regularization", "noise", "--latent_noise", "0.7"],
        "diffusion": ["--denoiser_config", "demo", "--learning_rate", "1e-3", "--train_batch_size", "256",
                      "--max_train_steps", "5000", "--use_ema", "--ema_decay", "0.999", "--condition_dropout", "0.5"],
        "cpu_threads": 1,
    },
    "default": {
        "autoencoder": ["--field_loss_weight", "20", "--latent_regularization", "noise", "--latent_noise", "0.7"],
        "diffusion": ["--use_ema", "--condition_dropout", "0.5"],
        "cpu_threads": None,
    },
}

# The X-ray side: the VAE (unless one is given), the event-image CLIP pretraining (unless the preset skips it or one
# is given), then the diffusion model. "demo" is 64 px with small widths, sized for about 10 minutes on 2 CPU cores on
# the demo cohort: a 300-step VAE (validation PSNR about 31 dB), then a UNet that diffuses the change from the
# previous image (--target residual) with the pooled events in its time embedding, its event encoder trained with it
# from scratch and taught by the auxiliary event-change loss: without that loss no event effect showed within 1,000
# steps; with it, one does by step 350 (BENCHMARKS.md). It skips the CLIP pretraining: 300 CLIP steps (2.5 minutes)
# retrieve events from images at chance level on the demo cohort. "paper" is EHRXDiff's sizes (256 px, Cheff's VAE
# 128/256/512, the 505.8M-parameter UNet, lr 5e-5, effective batch 128) for GPUs.
CXR_TRAINING_PRESETS = {
    "demo": {
        "vae": ["--resolution", "64", "--block_out_channels", "16,32,64", "--layers_per_block", "1",
                "--latent_channels", "4", "--train_batch_size", "16", "--max_train_steps", "300",
                "--learning_rate", "2e-3", "--validation_steps", "300"],
        "event_clip": None,
        "diffusion": ["--resolution", "64", "--unet_config", "demo", "--conditioning", "hybrid", "--target",
                      "residual", "--pooled_events", "--adapter_type", "cross_attention", "--train_batch_size", "32",
                      "--max_train_steps", "400", "--learning_rate", "5e-4", "--use_ema", "--ema_decay", "0.995",
                      "--condition_dropout", "0.1", "--event_change_weight", "1.0", "--max_events", "128",
                      "--validation_steps", "400", "--validation_triplets", "1024", "--validation_images", "8"],
        "cpu_threads": 1,
    },
    "paper": {
        "vae": ["--resolution", "256", "--block_out_channels", "128,256,512", "--layers_per_block", "2",
                "--latent_channels", "3", "--in_channels", "3", "--gradient_checkpointing"],
        "event_clip": ["--resolution", "256", "--image_patch_size", "32", "--image_hidden_size", "768",
                       "--image_layers", "12", "--image_heads", "12", "--hidden_dim", "768", "--num_heads", "12",
                       "--ff_dim", "3072", "--context_dim", "768", "--max_events", "1024"],
        "diffusion": ["--resolution", "256", "--unet_config", "paper", "--conditioning", "cross_attention",
                      "--learning_rate", "5e-5", "--train_batch_size", "16", "--gradient_accumulation_steps", "8",
                      "--use_ema", "--condition_dropout", "0.1", "--max_events", "1024", "--gradient_checkpointing"],
        "cpu_threads": None,
    },
}


def _check_run_folder(output_dir: Path, dataset: Path, launch: LaunchOptions, resume: bool,
                      runs: tuple[str, ...]) -> None:
    """The checks of both training commands that need no data: the run folder may hold earlier runs (they are
    resumed) but may not be, or lie inside, the dataset; the launch options must fit this machine; a run resumed at
    another process count is refused here, in one line, before its processes start (the scripts refuse that, and
    another batch or accumulation, too)."""
    from ..io import check_output_dir
    from ..training.checkpointing import check_layout, list_checkpoints

    check_output_dir(output_dir, inputs={"--dataset": dataset}, argument="--output-dir", merge=True)
    check_launch(launch, cuda_device_count())
    if not resume:
        return
    for run in runs:
        found = list_checkpoints(output_dir / run)
        if found:  # the scripts' own rule, on the one part of the layout known before they start
            try:
                check_layout(found[-1], {"num_processes": launch.processes})
            except ArgumentError as error:
                raise ArgumentError(f"--resume-from-checkpoint: {error}") from None


def _checkpoint_arguments(checkpointing_steps: int | None, resume: bool) -> list[str]:
    arguments = ["--checkpointing_steps", str(checkpointing_steps)] if checkpointing_steps is not None else []
    return arguments + (["--resume_from_checkpoint", "latest"] if resume else [])


def train_ehr(dataset: Path, output_dir: Path, preset: str = "default", autoencoder_epochs: int | None = None,
              diffusion_steps: int | None = None, judge_threshold: float | None = None,
              launch: LaunchOptions | None = None, resume: bool = False, seed: int = 0, push_to_hub: str | None = None,
              quiet: bool = False, checkpointing_steps: int | None = None) -> Path:
    """Trains the autoencoder, then the diffusion model, each under ``accelerate launch``; returns the pipeline folder.

    Each run saves a ``checkpoint-N`` every ``checkpointing_steps`` optimisation steps (default: the scripts' 500);
    ``resume`` continues each from its latest one (a finished run is not redone), bit-identical to a run that was never
    stopped. The inputs are checked here first, so that a wrong folder fails in a second rather than after a model
    loads."""
    from ..training.data import condition_dim, load_training_dataset, screen_split

    data, _ = load_training_dataset(dataset, splits=("train", "holdout"), argument="--dataset")
    condition_dim(data["train"], "embedding", dataset)
    screen_split(data["train"], judge_threshold)  # a threshold no row passes fails now, not after the autoencoder
    launch = launch or LaunchOptions()
    _check_run_folder(output_dir, dataset, launch, resume, ("autoencoder-training", "model"))
    autoencoder_dir, model_dir = output_dir / "autoencoder-training", output_dir / "model"
    common = ["--train_data_dir", str(dataset), "--seed", str(seed), *_checkpoint_arguments(checkpointing_steps,
                                                                                            resume)]
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
    threads = TRAINING_PRESETS[preset]["cpu_threads"]
    accelerate_launch("ehr_diffusers.training.train_ehr_autoencoder", autoencoder, launch, quiet, threads)
    accelerate_launch("ehr_diffusers.training.train_ehr_diffusion", diffusion, launch, quiet, threads)
    return model_dir


def train_cxr(dataset: Path, output_dir: Path, preset: str = "demo", vae: str | None = None,
              event_clip: str | None = None, diffusion_steps: int | None = None,
              launch: LaunchOptions | None = None, resume: bool = False, seed: int = 0, push_to_hub: str | None = None,
              quiet: bool = False, checkpointing_steps: int | None = None) -> Path:
    """Trains the chest X-ray VAE (unless ``vae`` names one), the event-image CLIP pretraining (unless ``event_clip``
    names its output) and the EHRXDiff diffusion model, each under ``accelerate launch``; returns the pipeline folder.

    Checkpoints and ``resume`` work as in :func:`train_ehr`. The inputs are checked here first (the dataset must hold
    event embeddings), so that a wrong folder fails at once."""
    from ..data.cxr.latents import cache_record
    from ..data.cxr.split import EMBEDDINGS_COLUMN, load_dataset_dict
    from ..hub.errors import check_model_path

    if not Path(dataset).is_dir():
        raise DataError(f"--dataset {dataset}: no such folder")
    try:
        data = load_dataset_dict(dataset)
    except DataError as error:
        raise DataError(f"--dataset {error}") from None
    if "train" not in data or EMBEDDINGS_COLUMN not in data["train"].column_names:
        raise DataError(f"--dataset {dataset}: needs a train split with {EMBEDDINGS_COLUMN}; prepare it with "
                        "`ehr-diffusers prepare-cxr ... --embedder minilm`")
    for argument, path in (("--vae", vae), ("--event-clip", event_clip)):
        if path is not None:
            check_model_path(path, argument)
    steps = CXR_TRAINING_PRESETS[preset]
    cached = cache_record(dataset)
    if cached is not None:  # the script checks the VAE's weights too; these need nothing loaded
        resolution = int(steps["diffusion"][steps["diffusion"].index("--resolution") + 1])
        if vae is None:
            raise DataError(f"--dataset {dataset}: holds latents cached with the VAE {cached['vae']}; a VAE trained "
                            f"here would not match them: pass --vae {cached['vae']}")
        if cached["resolution"] != resolution:
            raise DataError(f"--dataset {dataset}: its latents are of {cached['resolution']} px images, the {preset} "
                            f"preset trains at {resolution} px: cache them again with `ehr-diffusers cache-latents "
                            f"--dataset {dataset} --vae {vae} --resolution {resolution}`")
    launch = launch or LaunchOptions()
    runs = [*(["vae"] if vae is None else []), *(["event-clip"] if event_clip is None and steps["event_clip"] else []),
            "model"]
    _check_run_folder(output_dir, dataset, launch, resume, tuple(runs))
    common = ["--train_data_dir", str(dataset), "--seed", str(seed), "--report_to", "none",
              *_checkpoint_arguments(checkpointing_steps, resume)]
    threads = steps["cpu_threads"]
    if vae is None:
        vae = str(output_dir / "vae")
        accelerate_launch("ehr_diffusers.training.train_cxr_vae", [*common, *steps["vae"], "--output_dir", vae],
                          launch, quiet, threads)
    if event_clip is None and steps["event_clip"] is not None:
        event_clip = str(output_dir / "event-clip")
        accelerate_launch("ehr_diffusers.training.train_event_clip",
                          [*common, *steps["event_clip"], "--output_dir", event_clip], launch, quiet, threads)
    model_dir = output_dir / "model"
    diffusion = [*common, *steps["diffusion"], "--vae_path", vae, "--output_dir", str(model_dir)]
    if event_clip is not None:
        diffusion += ["--event_clip_path", event_clip]
    if diffusion_steps is not None:
        diffusion += ["--max_train_steps", str(diffusion_steps)]
    if push_to_hub:
        diffusion += ["--push_to_hub", "--hub_model_id", push_to_hub, "--hub_private_repo"]
    accelerate_launch("ehr_diffusers.training.train_ehrxdiff", diffusion, launch, quiet, threads)
    return model_dir


def _resume(args: argparse.Namespace) -> bool:
    return args.resume or args.resume_from == "latest"


def run(args: argparse.Namespace) -> None:
    model_dir = train_ehr(args.dataset, args.output_dir, args.preset, args.autoencoder_epochs, args.diffusion_steps,
                          args.judge_threshold, LaunchOptions.from_args(args), _resume(args),
                          push_to_hub=args.push_to_hub, quiet=args.quiet,
                          checkpointing_steps=args.checkpointing_steps)
    print(f"pipeline written to {model_dir}; generate with: ehr-diffusers generate --model {model_dir} "
          "--prompt \"65 year old woman with heart failure and CKD\" -n 100 --out records.csv")


def run_cxr(args: argparse.Namespace) -> None:
    model_dir = train_cxr(args.dataset, args.output_dir, args.preset, args.vae, args.event_clip, args.diffusion_steps,
                          LaunchOptions.from_args(args), _resume(args), args.seed, args.push_to_hub,
                          args.quiet, args.checkpointing_steps)
    print(f"pipeline written to {model_dir}; predict with: ehr-diffusers predict-cxr --model {model_dir} "
          "--prev PREVIOUS.png --events EVENTS.txt --out NEXT.png")
