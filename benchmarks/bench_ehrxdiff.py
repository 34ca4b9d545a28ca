"""EHRXDiff speed and memory on the CPU: demo-size training steps, demo-size sampling, paper-size memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_ehrxdiff.py --mode train [--batch-size 32 --steps 20]
    OMP_NUM_THREADS=1 python benchmarks/bench_ehrxdiff.py --mode sample [--batch-size 8 --inference-steps 25 50 100]
    OMP_NUM_THREADS=1 python benchmarks/bench_ehrxdiff.py --mode memory [--dtypes float32 bfloat16 float16]
    python benchmarks/bench_ehrxdiff.py --render mem-float32.json mem-bfloat16.json  # one table of several runs

All weights are random: speed and memory do not depend on their values. ``--threads`` (default 1) sets torch's
intra-op threads: the demo's small models run as fast on one thread as on two on a quiet machine, and much faster
when other jobs hold the cores.

* ``train``: one optimisation step of the demo preset (``train-cxr --preset demo``, 64 px images, 4x16x16 latents),
  built by the training scripts' own parsers and builders from the preset's arguments: the event encoder of
  ``train_event_clip`` (384-d MiniLM events, width 128, 2 layers) over a padded batch of events (Poisson around
  ``--events`` per triplet, the demo cohort's ~49), the fusion adapter (16 latents or 256 event tokens; the frozen
  tiny CLIP's 65 image tokens and the 4 VAE tokens precomputed, as training caches them), the UNet forward and
  backward (``predict_noise`` of ``train_ehrxdiff``), gradient clipping and AdamW. The four combinations of
  conditioning (hybrid, cross_attention) and fusion adapter (cross_attention, token_linear) run interleaved, one step
  of each in turn, so that a change of load on a shared machine touches all of them alike; the ratios compare columns
  of the same run.
* ``sample``: ``EHRXDiffPipeline`` images/s at demo size (the demo UNet, a 64 px AutoencoderKL 16/32/64 with one
  layer per block and 4 latent channels as ``train_cxr_vae``'s defaults build, the tiny CLIP image encoder) at each
  of ``--inference-steps`` DDIM steps and each guidance scale (a scale above 1 doubles the UNet batch).
* ``memory``: the paper-size pipeline (the 505.8M-parameter UNet "paper" preset with cross-attention conditioning
  and context 768, Cheff's AutoencoderKL 128/256/512, the 1536-d event encoder, the token_linear adapter, CLIP
  ViT-B/32 at 256 px): parameters per component, then, in a fresh process per dtype, the peak resident memory and
  the time of predicting one 256 px image with one DDIM step. Models are built directly in the dtype (as
  ``from_pretrained(..., torch_dtype=...)`` loads them), so a float32 copy never inflates a half-precision peak.
  It waits while the 1-minute load average is above ``--max-load`` (``--load-retries`` times ``--load-wait``
  seconds), then runs anyway and records the load; a dtype whose estimate (weights + 1 GB) exceeds
  ``--max-memory-gb`` or the available memory is skipped. ``--render`` joins the ``--json`` files of several
  memory runs (one dtype each, say) into one table.

Each mode prints a side-by-side table; ``--json PATH`` writes the figures. Times are ``time.perf_counter`` medians
after warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Widths of the event embeddings: MiniLM (what the demo's prepare-cxr embeds with); the released EHRXDiff weights'.
EVENT_DIM = {"demo": 384, "paper": 1536}
EXPECTED_PARAMETERS = {"unet": 505.8e6, "vae": 55.3e6}
TRAIN_CONFIGS = (("cross_attention", "cross_attention"), ("hybrid", "cross_attention"),
                 ("cross_attention", "token_linear"), ("hybrid", "token_linear"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- machine
def load_average() -> tuple[float, float, float]:
    return tuple(round(value, 2) for value in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def available_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def wait_for_quiet(max_load: float, retries: int, wait: float) -> dict[str, Any]:
    """Waits while the 1-minute load average is above ``max_load``, at most ``retries`` times ``wait`` seconds."""
    tries = 0
    while os.getloadavg()[0] > max_load and tries < retries:
        print(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting {wait:.0f} s "
              f"({tries + 1}/{retries})", flush=True)
        time.sleep(wait)
        tries += 1
    load = load_average()
    return {"load_average": load, "waited_s": tries * wait, "quiet": load[0] <= max_load}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ForwardTimer:
    """Wall time of each forward of ``module`` (pre- and post-forward hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.times: list[float] = []
        self._start = 0.0
        self.handles = [module.register_forward_pre_hook(self._begin), module.register_forward_hook(self._end)]

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.times.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------------------------------------------- components
@functools.cache
def preset_args(size: str) -> dict[str, argparse.Namespace]:
    """The arguments of the three training scripts under ``train-cxr --preset SIZE``, parsed by the scripts' own
    parsers (with their defaults; the paths are placeholders, nothing is read)."""
    from ehr_diffusers.commands.train import CXR_TRAINING_PRESETS
    from ehr_diffusers.training import train_cxr_vae, train_ehrxdiff, train_event_clip

    preset = CXR_TRAINING_PRESETS[size]
    paths = ["--train_data_dir", "unused", "--output_dir", "unused"]
    return {"vae": train_cxr_vae.parse_args(paths + preset["vae"]),
            # a preset that skips the CLIP pretraining ("event_clip": None) builds the encoders with the defaults
            "event_clip": train_event_clip.parse_args(paths + (preset["event_clip"] or [])),
            "diffusion": train_ehrxdiff.parse_args(paths + ["--vae_path", "unused"] + preset["diffusion"])}


def latent_shape(size: str) -> tuple[int, int]:
    """(latent channels, latent side) of the preset's VAE."""
    vae = preset_args(size)["vae"]
    return vae.latent_channels, vae.resolution // 2 ** (len(vae.block_out_channels) - 1)


def _fusion_adapter(args: argparse.Namespace, context_dim: int, image_dim: int | None, num_image_tokens: int | None,
                    latent_channels: int, latent_size: int):
    """As ``train_ehrxdiff`` builds it (``--num_latents`` output tokens for both adapter types)."""
    from ehr_diffusers.models.fusion_adapter import FusionAdapterModel

    return FusionAdapterModel(adapter_type=args.adapter_type, context_dim=context_dim, image_dim=image_dim,
                              num_image_tokens=num_image_tokens or 65,
                              vae_channels=latent_channels if args.vae_tokens else None,
                              vae_token_dim=latent_size * latent_size, num_latents=args.num_latents,
                              num_heads=max(1, context_dim // 32), num_event_tokens=args.max_events,
                              num_output_tokens=args.num_latents)


def demo_components(conditioning: str = "hybrid", adapter_type: str = "cross_attention",
                    image_encoder: bool = True) -> dict[str, Any]:
    """The demo preset's models as the scripts build them: the event encoder (and, when ``image_encoder``, the tiny
    CLIP image encoder, frozen in the diffusion training) of ``train_event_clip``, the UNet and fusion adapter of
    ``train_ehrxdiff``, with the given conditioning and adapter type."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModel

    from ehr_diffusers.training import train_ehrxdiff, train_event_clip

    args = preset_args("demo")
    diffusion = argparse.Namespace(**{**vars(args["diffusion"]), "conditioning": conditioning,
                                      "adapter_type": adapter_type})
    channels, size = latent_shape("demo")
    event_encoder = train_event_clip.build_event_encoder(args["event_clip"], EVENT_DIM["demo"])
    context = event_encoder.config.context_dim
    models: dict[str, Any] = {
        "unet": UNet2DConditionModel(**train_ehrxdiff.unet_config(diffusion, channels, size, context)),
        "event_encoder": event_encoder}
    image_dim = tokens = None
    if image_encoder:  # saved by train_event_clip, reloaded by train_ehrxdiff as a CLIPVisionModel
        config = train_event_clip.build_image_encoder(args["event_clip"])[0].config
        models["image_encoder"] = CLIPVisionModel(config).eval().requires_grad_(False)
        image_dim, tokens = config.hidden_size, (config.image_size // config.patch_size) ** 2 + 1
    models["fusion_adapter"] = _fusion_adapter(diffusion, context, image_dim, tokens, channels, size)
    return models


def preset_vae(size: str):
    """The preset's AutoencoderKL as ``train_cxr_vae`` builds it: "demo" is its defaults (64 px, grayscale, 16/32/64,
    one layer per block, 4 latent channels); "paper" is Cheff's (256 px, 3 channels, 128/256/512, two layers per
    block, 3 latent channels, attention only in the mid block)."""
    from diffusers import AutoencoderKL

    from ehr_diffusers.training.train_cxr_vae import vae_config

    return AutoencoderKL(**vae_config(preset_args(size)["vae"]))


def paper_components() -> dict[str, Any]:
    """EHRXDiff's released sizes: the UNet "paper" preset and Cheff's VAE as ``train-cxr --preset paper`` builds them
    (cross-attention conditioning, 3 input channels, context 768), and, as ``convert-ehrxdiff`` builds them from the
    released weights, CLIP ViT-B/32 at 256 px (65 tokens), the 1536-d event encoder (24 heads, 6144 FFN, no start
    token or time encoding) and the token_linear adapter (1024 event + 65 image + 3 VAE tokens -> 1024). Built in the
    current default dtype and device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ehr_diffusers.models.event_encoder import EventEncoderModel
    from ehr_diffusers.models.fusion_adapter import FusionAdapterModel
    from ehr_diffusers.training.train_ehrxdiff import unet_config

    diffusion = preset_args("paper")["diffusion"]
    channels, size = latent_shape("paper")
    context, max_events = 768, diffusion.max_events
    vit = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=preset_args("paper")["vae"].resolution, patch_size=32, num_channels=3,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
    image_tokens = (vit.image_size // vit.patch_size) ** 2 + 1
    return {
        "unet": UNet2DConditionModel(**unet_config(diffusion, channels, size, context)),
        "vae": preset_vae("paper"),
        "image_encoder": CLIPVisionModel(vit),
        "event_encoder": EventEncoderModel(event_dim=EVENT_DIM["paper"], hidden_dim=EVENT_DIM["paper"], num_layers=2,
                                           num_heads=24, ff_dim=6144, context_dim=context, max_events=max_events,
                                           time_encoding=False, start_token=False),
        "fusion_adapter": FusionAdapterModel(adapter_type="token_linear", context_dim=context,
                                             image_dim=vit.hidden_size, num_image_tokens=image_tokens,
                                             vae_channels=channels, vae_token_dim=size * size,
                                             num_event_tokens=max_events, num_output_tokens=1024),
    }


def paper_parameter_counts() -> dict[str, int]:
    """Parameters per component of the paper-size pipeline, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        models = paper_components()
    return {name: count_parameters(model) for name, model in models.items()}


def check_paper_counts(counts: dict[str, int], tolerance: float = 0.01) -> None:
    for name, expected in EXPECTED_PARAMETERS.items():
        if abs(counts[name] - expected) > tolerance * expected:
            raise AssertionError(f"the paper-size {name} has {counts[name] / 1e6:.1f}M parameters, expected "
                                 f"{expected / 1e6:.1f}M within {tolerance:.0%}")


def build_pipeline(models: dict[str, Any], vae: Any, conditioning: str):
    from ehr_diffusers.training.train_ehrxdiff import build_pipeline as build

    pipe = build({name: model.eval() for name, model in models.items()}, vae.eval(), None, conditioning)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_events(rng: np.random.Generator, count: int, mean_events: float, dim: int
                  ) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """``count`` intervals of Poisson(``mean_events``) events (at least one), float16-rounded as datasets hold
    them, with hours in the 48 h before the target study, oldest first."""
    lengths = np.maximum(1, rng.poisson(mean_events, count))
    embeddings = [torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float16).astype(np.float32))
                  for n in lengths]
    hours = [np.sort(-rng.uniform(0, 48, n)).astype(np.float32) for n in lengths]
    return embeddings, hours


# ---------------------------------------------------------------------------------------------------- train
def bench_train(batch_size: int = 32, steps: int = 20, warmup: int = 3, mean_events: float = 49.0,
                configs: Sequence[tuple[str, str]] = TRAIN_CONFIGS, image_tokens: bool = True,
                seed: int = 0) -> list[dict[str, Any]]:
    """Seconds per optimisation step (median of ``steps`` after ``warmup``) of each (conditioning, adapter type)
    configuration, one step of each in turn, with the median split of a step: conditioning forward (event encoder
    and fusion adapter), UNet forward, loss and backward, clipping and AdamW. Condition dropout, learning rate, AdamW
    settings and clipping norm are the demo preset's."""
    from diffusers import DDPMScheduler

    from ehr_diffusers.models.event_encoder import pad_events
    from ehr_diffusers.training.train_cxr_vae import vae_config
    from ehr_diffusers.training.train_ehrxdiff import SCHEDULER_CONFIG, predict_noise

    args = preset_args("demo")["diffusion"]
    channels, size = latent_shape("demo")
    scaling_factor = vae_config(preset_args("demo")["vae"]).get("scaling_factor", 0.18215)
    scheduler = DDPMScheduler(**{key: value for key, value in SCHEDULER_CONFIG.items() if key != "set_alpha_to_one"})
    runs = []
    for conditioning, adapter_type in configs:
        torch.manual_seed(seed)
        models = demo_components(conditioning, adapter_type, image_encoder=image_tokens)
        models.pop("image_encoder", None)  # frozen: its tokens are cached before training
        trained = [models[name].train() for name in ("unet", "fusion_adapter", "event_encoder")]
        parameters = [parameter for model in trained for parameter in model.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        runs.append({"conditioning": conditioning, "adapter_type": adapter_type, "models": models,
                     "parameters": parameters, "optimizer": optimizer, "timer": ForwardTimer(models["unet"]),
                     "parameter_count": sum(parameter.numel() for parameter in parameters),
                     "times": {key: [] for key in ("step", "conditioning", "unet_forward", "backward", "optimizer")}})
    adapter = runs[0]["models"]["fusion_adapter"].config
    event_dim = runs[0]["models"]["event_encoder"].config.event_dim
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    batches = []
    for _ in range(warmup + steps):  # the same batches for every configuration
        batches.append({
            "events": random_events(rng, batch_size, mean_events, event_dim),
            "target": normal(batch_size, channels, size, size), "previous": normal(batch_size, channels, size, size),
            "image_tokens": None if adapter.image_dim is None else normal(batch_size, adapter.num_image_tokens,
                                                                          adapter.image_dim),
            "noise": normal(batch_size, channels, size, size),
            "timesteps": torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, batch_size)),
            "drop": torch.from_numpy(rng.random(batch_size) < args.condition_dropout)})
    for index, batch in enumerate(batches):
        for run in runs:
            started = time.perf_counter()
            padded, times, mask, _ = pad_events(*batch["events"], max_events=args.max_events)
            step_batch = {"target": batch["target"] * scaling_factor, "previous": batch["previous"],
                          "image_tokens": batch["image_tokens"], "embeddings": padded, "hours": times, "mask": mask}
            noisy = scheduler.add_noise(step_batch["target"], batch["noise"], batch["timesteps"])
            forward_start = time.perf_counter()
            prediction, _ = predict_noise(run["models"], step_batch, noisy, batch["timesteps"], run["conditioning"],
                                          scaling_factor, args.vae_tokens, batch["drop"])
            forward_end = time.perf_counter()
            loss = torch.nn.functional.mse_loss(prediction.float(), batch["noise"], reduction="mean")
            loss.item()
            loss.backward()
            backward_end = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(run["parameters"], args.max_grad_norm)
            run["optimizer"].step()
            run["optimizer"].zero_grad()
            ended = time.perf_counter()
            if index >= warmup:
                unet_forward = run["timer"].times[-1]
                run["times"]["step"].append(ended - started)
                run["times"]["conditioning"].append(forward_end - forward_start - unet_forward)
                run["times"]["unet_forward"].append(unet_forward)
                run["times"]["backward"].append(backward_end - forward_end)
                run["times"]["optimizer"].append(ended - backward_end)
    results = []
    for run in runs:
        run["timer"].remove()
        seconds = median(run["times"]["step"])
        results.append({"conditioning": run["conditioning"], "adapter_type": run["adapter_type"],
                        "batch_size": batch_size, "steps": steps, "warmup": warmup,
                        "trained_parameters": run["parameter_count"], "seconds_per_step": seconds,
                        "triplets_per_s": batch_size / seconds,
                        "median_seconds": {key: median(values) for key, values in run["times"].items()},
                        "step_seconds": run["times"]["step"]})
    for result in results:
        for key, other in (("vs_cross_attention_conditioning", "conditioning"),
                           ("vs_cross_attention_adapter", "adapter_type")):
            base = next((item for item in results if item[other] == "cross_attention"
                         and all(item[k] == result[k] for k in ("conditioning", "adapter_type") if k != other)), None)
            result[key] = None if base is None else result["seconds_per_step"] / base["seconds_per_step"]
    return results


def train_table(results: list[dict[str, Any]], header: str) -> str:
    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    names = [f"{item['conditioning']} cond., {item['adapter_type']} adapter" for item in results]
    rows = [
        ("trained parameters", [f"{item['trained_parameters'] / 1e6:.2f}M" for item in results]),
        ("event encoder + fusion adapter forward (s)",
         [f"{item['median_seconds']['conditioning']:.3f}" for item in results]),
        ("UNet forward (s)", [f"{item['median_seconds']['unet_forward']:.3f}" for item in results]),
        ("loss + backward (s)", [f"{item['median_seconds']['backward']:.3f}" for item in results]),
        ("clip + AdamW (s)", [f"{item['median_seconds']['optimizer']:.3f}" for item in results]),
        ("**seconds per step**", [f"**{item['seconds_per_step']:.3f}**" for item in results]),
        ("**triplets/s**", [f"**{item['triplets_per_s']:.1f}**" for item in results]),
        ("step time vs cross_attention conditioning (same adapter)",
         [ratio(item["vs_cross_attention_conditioning"]) for item in results]),
        ("step time vs cross_attention adapter (same conditioning)",
         [ratio(item["vs_cross_attention_adapter"]) for item in results]),
    ]
    lines = [f"| {header} | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- sample
def bench_sample(batch_size: int = 8, inference_steps: Sequence[int] = (25, 50, 100),
                 guidance_scales: Sequence[float] = (1.0, 2.0), repeats: int = 3, warmup: int = 1,
                 mean_events: float = 49.0, seed: int = 0) -> list[dict[str, Any]]:
    """Seconds per pipeline call of ``batch_size`` previous images (median of ``repeats`` after ``warmup`` calls of
    each configuration, configurations in turn) at each number of DDIM steps and guidance scale; output "np"."""
    import PIL.Image

    torch.manual_seed(seed)
    conditioning = preset_args("demo")["diffusion"].conditioning
    pipe = build_pipeline(demo_components(conditioning, preset_args("demo")["diffusion"].adapter_type),
                          preset_vae("demo"), conditioning)
    rng = np.random.default_rng(seed)
    side = pipe.vae.config.sample_size
    images = [PIL.Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)) for _ in range(batch_size)]
    embeddings, hours = random_events(rng, batch_size, mean_events, pipe.event_encoder.config.event_dim)
    timer = ForwardTimer(pipe.unet)
    configs = [(steps, scale) for scale in guidance_scales for steps in inference_steps]
    times: dict[tuple[int, float], list[float]] = {config: [] for config in configs}
    unet_times: dict[tuple[int, float], list[float]] = {config: [] for config in configs}
    for round_ in range(warmup + repeats):
        for steps, scale in configs:
            timer.times.clear()
            started = time.perf_counter()
            pipe(images, event_embeddings=embeddings, event_hours=hours, num_inference_steps=steps,
                 guidance_scale=scale, generator=torch.Generator().manual_seed(round_), output_type="np")
            if round_ >= warmup:
                times[(steps, scale)].append(time.perf_counter() - started)
                unet_times[(steps, scale)].append(median(timer.times))
    timer.remove()
    results = []
    for steps, scale in configs:
        seconds = median(times[(steps, scale)])
        results.append({"inference_steps": steps, "guidance_scale": scale, "batch_size": batch_size,
                        "repeats": repeats, "seconds_per_call": seconds, "images_per_s": batch_size / seconds,
                        "unet_forward_s": median(unet_times[(steps, scale)]), "call_seconds": times[(steps, scale)]})
    for result in results:
        base = [item for item in results if item["guidance_scale"] == result["guidance_scale"]]
        fewest = min(base, key=lambda item: item["inference_steps"])
        result["time_vs_fewest_steps"] = result["seconds_per_call"] / fewest["seconds_per_call"]
        unguided = next((item for item in results if item["inference_steps"] == result["inference_steps"]
                         and item["guidance_scale"] <= 1.0), None)
        result["time_vs_unguided"] = None if unguided is None else \
            result["seconds_per_call"] / unguided["seconds_per_call"]
    return results


def sample_table(results: list[dict[str, Any]], header: str) -> str:
    scales = sorted({item["guidance_scale"] for item in results})
    steps = sorted({item["inference_steps"] for item in results})
    by_key = {(item["inference_steps"], item["guidance_scale"]): item for item in results}
    columns = []
    for scale in scales:
        columns += [f"guidance {scale:g}: s/call", f"guidance {scale:g}: images/s",
                    f"guidance {scale:g}: time vs {steps[0]} steps"]
    if len(scales) > 1:
        columns.append(f"guidance {scales[-1]:g} vs {scales[0]:g}: time")
    lines = [f"| {header} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for count in steps:
        cells = []
        for scale in scales:
            item = by_key[(count, scale)]
            cells += [f"{item['seconds_per_call']:.2f}", f"**{item['images_per_s']:.2f}**",
                      f"{item['time_vs_fewest_steps']:.2f}x"]
        if len(scales) > 1:
            guided, unguided = by_key[(count, scales[-1])], by_key[(count, scales[0])]
            cells.append(f"{guided['seconds_per_call'] / unguided['seconds_per_call']:.2f}x")
        lines.append(f"| {count} DDIM steps | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- memory
def predict_once(size: str = "paper", dtype: str = "float32", repeats: int = 2, mean_events: int = 49,
                 threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """In this process: builds the pipeline of ``size`` ("paper" or "demo") directly in ``dtype`` and predicts one
    image with one DDIM step ``repeats`` times (the first is the cold call). Returns the peak RSS after the imports,
    after the build and after predicting, and the call and UNet-forward times."""
    if threads:
        torch.set_num_threads(threads)
    # everything the build and the call import, before the first reading: the baseline of every configuration
    import PIL.Image  # noqa: F401
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPVisionModel  # noqa: F401

    import ehr_diffusers.pipelines.pipeline_ehrxdiff  # noqa: F401
    import ehr_diffusers.training.train_cxr_vae  # noqa: F401
    import ehr_diffusers.training.train_ehrxdiff  # noqa: F401

    result: dict[str, Any] = {"size": size, "dtype": dtype, "threads": torch.get_num_threads(),
                              "rss_after_imports_mb": peak_rss_mb()}
    torch.manual_seed(seed)
    started = time.perf_counter()
    with default_dtype(DTYPES[dtype]):
        if size == "paper":
            models, conditioning = paper_components(), "cross_attention"
        else:
            conditioning = preset_args("demo")["diffusion"].conditioning
            models = demo_components(conditioning, preset_args("demo")["diffusion"].adapter_type)
            models["vae"] = preset_vae("demo")
    result["build_s"] = time.perf_counter() - started
    vae = models.pop("vae")
    for model in [vae, *models.values()]:
        model.requires_grad_(False)
    pipe = build_pipeline(models, vae, conditioning)
    result["parameters"] = sum(count_parameters(model) for model in [vae, *models.values()])
    result["rss_after_build_mb"] = peak_rss_mb()
    rng = np.random.default_rng(seed)
    resolution = vae.config.sample_size
    image = rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)
    embeddings = [torch.from_numpy(rng.standard_normal((mean_events, pipe.event_encoder.config.event_dim))
                                   .astype(np.float32))]
    timer = ForwardTimer(pipe.unet)
    calls = []
    with torch.inference_mode():
        for index in range(repeats):
            started = time.perf_counter()
            output = pipe(image, event_embeddings=embeddings, num_inference_steps=1, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(index), output_type="pt").images
            calls.append(time.perf_counter() - started)
    timer.remove()
    result.update({"call_seconds": calls, "unet_forward_seconds": timer.times,
                   "finite": bool(torch.isfinite(output).all()), "output_shape": list(output.shape),
                   "peak_rss_mb": peak_rss_mb()})
    return result


def run_child(dtype: str, size: str, repeats: int, mean_events: int, threads: int, timeout: float) -> dict[str, Any]:
    """``predict_once`` in a fresh Python process, so that each peak RSS is that configuration's alone."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", dtype, "--size", size, "--repeats",
               str(repeats), "--events", str(mean_events), "--threads", str(threads)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"dtype": dtype, "size": size, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"dtype": dtype, "size": size, "error": f"exit {done.returncode}: " + " / ".join(tail)}
    result = json.loads(lines[-1])
    result["process_wall_s"] = wall
    return result


def bench_memory(dtypes: Sequence[str] = ("float32", "bfloat16", "float16"), size: str = "paper", repeats: int = 2,
                 mean_events: int = 49, threads: int = 2, timeout: float = 900.0,
                 max_memory_gb: float = 8.0) -> dict[str, Any]:
    counts = paper_parameter_counts()
    if size == "paper":
        check_paper_counts(counts)
        total = sum(counts.values())
    else:
        with torch.device("meta"):
            models = demo_components()
            total = sum(count_parameters(model) for model in models.values()) + count_parameters(preset_vae("demo"))
    available = available_memory_gb()
    runs = []
    for dtype in dtypes:
        # weights plus ~1 GB for the interpreter, torch and activations of one 256 px image
        estimate = total * DTYPES[dtype].itemsize / 1e9 + 1.0
        limit = min(max_memory_gb, available) if available else max_memory_gb
        if estimate > limit:
            runs.append({"dtype": dtype, "size": size, "estimate_gb": estimate,
                         "error": f"skipped: estimated {estimate:.1f} GB > {limit:.1f} GB allowed/available"})
            continue
        load = load_average()
        result = run_child(dtype, size, repeats, mean_events, threads, timeout)
        result.update({"estimate_gb": estimate, "load_average": load})
        runs.append(result)
    return {"parameters": counts if size == "paper" else {"total": total}, "runs": runs}


def parameter_table(counts: dict[str, int]) -> str:
    lines = ["| component | parameters | float32 (GB) | bfloat16 / float16 (GB) |", "|---|---:|---:|---:|"]
    for name, count in [*counts.items(), ("total", sum(counts.values()))]:
        lines.append(f"| {name} | {count / 1e6:,.2f}M | {count * 4 / 1e9:.2f} | {count * 2 / 1e9:.2f} |")
    return "\n".join(lines)


def memory_table(runs: list[dict[str, Any]], header: str) -> str:
    lines = [f"| {header} | " + " | ".join(run["dtype"] for run in runs) + " |", "|---|" + "---:|" * len(runs)]
    base = next((run for run in runs if run["dtype"] == "float32" and "error" not in run), None)

    def cells(function) -> str:
        return " | ".join("" if "error" in run else function(run) for run in runs)

    def warm(run: dict[str, Any], key: str) -> float:
        """The median of the calls after the first (cold) one; the one call when there was only one."""
        return median(run[key][1:] or run[key])

    lines.append("| load average (1 min) at the start | "
                 + " | ".join(f"{run['load_average'][0]:.2f}" if "load_average" in run else "" for run in runs) + " |")
    lines.append("| estimate: weights + 1 GB (GB) | " + " | ".join(f"{run['estimate_gb']:.2f}" for run in runs) + " |")
    lines.append("| peak RSS after imports (MB) | " + cells(lambda run: f"{run['rss_after_imports_mb']:,.0f}") + " |")
    lines.append("| peak RSS after building the pipeline (MB) | "
                 + cells(lambda run: f"{run['rss_after_build_mb']:,.0f}") + " |")
    lines.append("| **peak RSS, predicting one image (MB)** | "
                 + cells(lambda run: f"**{run['peak_rss_mb']:,.0f}**") + " |")
    if base is not None:
        lines.append("| peak RSS vs float32 | " + cells(lambda run: f"{run['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")
                     + " |")
    lines.append("| build, random init (s) | " + cells(lambda run: f"{run['build_s']:.1f}") + " |")
    lines.append("| first call, 1 DDIM step (s) | " + cells(lambda run: f"{run['call_seconds'][0]:.2f}") + " |")
    lines.append("| **call, 1 DDIM step, warm (s)** | "
                 + cells(lambda run: f"**{warm(run, 'call_seconds'):.2f}**") + " |")
    lines.append("| **UNet forward, the one step, warm (s)** | "
                 + cells(lambda run: f"**{warm(run, 'unet_forward_seconds'):.2f}**") + " |")
    if base is not None:
        lines.append("| warm call time vs float32 | "
                     + cells(lambda run: f"{warm(run, 'call_seconds') / warm(base, 'call_seconds'):.2f}x") + " |")
    lines.append("| output finite | " + " | ".join(run.get("error", "yes" if run.get("finite") else "NO")
                                                    for run in runs) + " |")
    return "\n".join(lines)


def render_memory_reports(paths: Sequence[Path]) -> dict[str, Any]:
    """One side-by-side memory table of the runs of several ``--mode memory --json`` files, in their order."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    if any(report.get("mode") != "memory" for report in reports):
        raise ValueError("--render takes the --json files of --mode memory runs")
    runs = [run for report in reports for run in report["runs"]]
    first = reports[0]
    if "unet" in first["parameters"]:
        print(parameter_table(first["parameters"]))
        print()
    sizes = sorted({run["size"] for run in runs})
    pixels = "/".join(str(preset_args(size)["vae"].resolution) for size in sizes)
    print(memory_table(runs, f"{first['date']}, {'/'.join(sizes)} pipeline, one {pixels} px image, "
                             f"{first['threads']} threads"))
    for path, report in zip(paths, reports):
        print(f"\n{Path(path).name}: load average {report['load_average_start']} at the start, "
              f"{report['load_average_end']} at the end; {report['wall_s']:.0f} s")
        for run in report["runs"]:
            if "error" in run:
                print(f"{run['dtype']}: {run['error']}")
    return {"mode": "memory", "runs": runs, "parameters": first["parameters"]}


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("train", "sample", "memory"), default="train")
    parser.add_argument("--batch-size", type=int, default=None, help="train: 32; sample: 8")
    parser.add_argument("--steps", type=int, default=20, help="train: timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (train: 3) or calls (sample: 1) first")
    parser.add_argument("--events", type=int, default=49, help="mean events per triplet (the demo cohort: ~49)")
    parser.add_argument("--no-image-tokens", action="store_true",
                        help="train/sample without the tiny CLIP image encoder's tokens")
    parser.add_argument("--inference-steps", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--repeats", type=int, default=None, help="sample: timed calls (3); memory: calls (2)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", choices=("paper", "demo"), default="paper", help="memory: the pipeline's size")
    parser.add_argument("--max-load", type=float, default=3.0, help="memory: wait while the load average is above")
    parser.add_argument("--load-retries", type=int, default=5)
    parser.add_argument("--load-wait", type=float, default=60.0, help="seconds between load checks")
    parser.add_argument("--max-memory-gb", type=float, default=8.0, help="memory: skip a dtype estimated above")
    parser.add_argument("--timeout", type=float, default=900.0, help="memory: seconds per child process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads ran 2-4x slower per step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument("--render", type=Path, nargs="+", default=None,
                        help="memory: print one table of the runs of these --json files (one invocation per dtype)")
    parser.add_argument("--child", choices=sorted(DTYPES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        result = predict_once(args.size, args.child, args.repeats or 2, args.events, args.threads, args.seed)
        print(json.dumps(result))
        return result
    if args.render is not None:
        return render_memory_reports(args.render)

    torch.set_num_threads(args.threads)
    date = time.strftime("%Y-%m-%d")
    report: dict[str, Any] = {"mode": args.mode, "date": date, "cpu": cpu_model(), "cores": os.cpu_count(),
                              "threads": args.threads, "torch": torch.__version__,
                              "load_average_start": load_average()}
    started = time.perf_counter()
    if args.mode == "train":
        batch = args.batch_size or 32
        results = bench_train(batch, args.steps, 3 if args.warmup is None else args.warmup, args.events,
                              image_tokens=not args.no_image_tokens, seed=args.seed)
        report["results"] = results
        print(train_table(results, f"{date}, demo preset, batch {batch}, median of {args.steps} steps, "
                                   f"{args.threads} threads"))
    elif args.mode == "sample":
        batch = args.batch_size or 8
        repeats = args.repeats or 3
        results = bench_sample(batch, args.inference_steps, args.guidance_scales, repeats,
                               1 if args.warmup is None else args.warmup, args.events, args.seed)
        report["results"] = results
        print(sample_table(results, f"{date}, demo pipeline, batch {batch}, median of {repeats} calls, "
                                    f"{args.threads} threads"))
    else:
        report["load_check"] = wait_for_quiet(args.max_load, args.load_retries, args.load_wait)
        report["memory_available_gb"] = available_memory_gb()
        memory = bench_memory(args.dtypes, args.size, args.repeats or 2, args.events, args.threads, args.timeout,
                              args.max_memory_gb)
        report.update(memory)
        if args.size == "paper":
            print(parameter_table(memory["parameters"]))
            print()
        pixels = preset_args(args.size)["vae"].resolution
        print(memory_table(memory["runs"], f"{date}, {args.size} pipeline, one {pixels} px image, "
                                           f"{args.threads} threads"))
        for run in memory["runs"]:
            if "error" in run:
                print(f"\n{run['dtype']}: {run['error']}")
    report["wall_s"] = time.perf_counter() - started
    report["load_average_end"] = load_average()
    print(f"\nload average (1, 5, 15 min): {report['load_average_start']} at the start, "
          f"{report['load_average_end']} at the end; {report['cpu']}, {args.threads} threads; "
          f"{report['wall_s']:.0f} s in all")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
