"""The X-ray side's training scripts: the split loader shared with the diffusion script, the chest X-ray VAE and the
event-image CLIP pretraining (in-process runs on a tiny synthetic triplet dataset with tiny models), bit-identical
resumes, the loss going down on a fixed batch, clear errors, cards, a mocked push and one real ``accelerate launch``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_interrupted
from ehr_diffusers.data.cxr import split as cxr_split
from ehr_diffusers.data.cxr.split import CHEXPERT_BLANK, from_pixels, load_cxr_images, load_cxr_split, to_pixels
from ehr_diffusers.training import checkpointing
from ehr_diffusers.training.cxr_data import collate_events
from ehr_diffusers.training.train_cxr_vae import main as train_vae
from ehr_diffusers.training.train_event_clip import ContrastiveHead, retrieval_figures, topk_chance
from ehr_diffusers.training.train_event_clip import main as train_clip

TINY_VAE = ["--resolution", "16", "--block_out_channels", "8,16", "--layers_per_block", "1", "--latent_channels", "2",
            "--train_batch_size", "32", "--report_to", "none", "--seed", "0", "--eval_batch_size", "64"]
TINY_CLIP = ["--resolution", "16", "--image_patch_size", "4", "--image_hidden_size", "16", "--image_layers", "1",
             "--image_heads", "2", "--hidden_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ff_dim", "32",
             "--context_dim", "16", "--max_events", "16", "--train_batch_size", "16", "--report_to", "none",
             "--seed", "0", "--eval_batch_size", "64"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> dict[str, Path]:
    """A synthetic demo cohort prepared twice: with MiniLM event embeddings and without (read-only)."""
    from ehr_diffusers.data.cxr.dataset import EventEmbeddingOptions, prepare_cxr
    from ehr_diffusers.data.cxr.demo import SMALL_SUBJECTS, write_demo_cxr
    from ehr_diffusers.text.event_embeddings import EventEmbedder

    root = tmp_path_factory.mktemp("cxr")
    write_demo_cxr(root / "demo", SMALL_SUBJECTS, seed=1, show_progress=False, workers=1)
    cxr, mimic = root / "demo" / "mimic-cxr-jpg", root / "demo" / "mimic-iv"
    prepare_cxr(cxr, mimic, root / "embedded", show_progress=False, synthetic=True,
                embed_events=EventEmbedder(EventEmbeddingOptions("minilm")))
    prepare_cxr(cxr, mimic, root / "plain", show_progress=False, synthetic=True)
    return {"embedded": root / "embedded", "plain": root / "plain"}


def _steps_per_epoch(rows: int, batch: int, drop_last: bool = False) -> int:
    return rows // batch if drop_last else math.ceil(rows / batch)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = [path for path in folder.iterdir() if path.suffix == ".safetensors"]
    return load_file(file)


def _assert_same_weights(expected: Path, actual: Path) -> None:
    first, second = _weights(expected), _weights(actual)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


# ---------------------------------------------------------------------------------------------------- data
def test_a_split_in_memory_reads_each_image_once(triplets, monkeypatch) -> None:
    read = []
    original = cxr_split.read_cxr_images

    def counting(dataset_dir, paths, size, show_progress=True):
        read.append(list(paths))
        return original(dataset_dir, paths, size, show_progress)

    monkeypatch.setattr(cxr_split, "read_cxr_images", counting)
    split = load_cxr_split(triplets["embedded"], "train", 16, show_progress=False)
    n = len(split)
    assert n > 20 and len(read) == 1 and len(read[0]) == len(set(read[0])) == len(split.image_paths)
    assert len(split.image_paths) < 2 * n  # images repeat across triplets: fewer reads than previous + target
    assert split.previous.shape == split.target.shape == (n, 16, 16) and split.previous.dtype == torch.uint8
    assert torch.equal(split.previous, split.images[torch.from_numpy(split.previous_index)])
    assert torch.equal(split.target, split.images[torch.from_numpy(split.target_index)])
    assert len(split.event_embeddings) == len(split.event_hours) == n and split.event_dim == 384
    assert all(e.dtype == np.float16 and e.shape == (len(h), 384) for e, h in zip(split.event_embeddings,
                                                                                   split.event_hours))
    assert all((h <= 0).all() for h in split.event_hours)
    assert split.triplet_id.dtype == np.int64 and len(np.unique(split.triplet_id)) == n
    for labels in (split.chexpert_previous, split.chexpert_target):
        assert labels.dtype == np.int8 and labels.shape == (n, 14)
        assert set(np.unique(labels)) <= {CHEXPERT_BLANK, -1, 0, 1}

    images = load_cxr_images(triplets["plain"], "train", 16, show_progress=False)  # no embeddings needed
    assert images.paths == split.image_paths and torch.equal(images.images, split.images)


def test_pixels_and_events_for_the_models(triplets) -> None:
    split = load_cxr_split(triplets["embedded"], "validation", 8, show_progress=False)
    pixels = to_pixels(split.previous[:3])
    assert pixels.shape == (3, 1, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(to_pixels(torch.tensor([[[0, 255]]], dtype=torch.uint8)), torch.tensor([[[[-1.0, 1.0]]]]))
    rgb = to_pixels(split.previous[:2], channels=3)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert torch.equal(from_pixels(pixels), split.previous[:3])

    rows = [0, 1]
    embeddings, hours, mask = collate_events(split, rows, max_events=4)
    lengths = [min(4, len(split.event_embeddings[row])) for row in rows]
    assert embeddings.shape == (2, max(lengths), 384) and mask.sum(dim=1).tolist() == lengths
    last = split.event_embeddings[0][-lengths[0]:].astype(np.float32)  # the most recent events are kept
    np.testing.assert_array_equal(embeddings[0, :lengths[0]].numpy(), last)
    np.testing.assert_array_equal(hours[0, :lengths[0]].numpy(), split.event_hours[0][-lengths[0]:])


def test_a_dataset_without_event_embeddings_is_a_clear_error(triplets, tmp_path) -> None:
    with pytest.raises(ValueError, match="split 'train' has no 'event_embeddings' column.*prepare it with an "
                                         "embedder") as error:
        load_cxr_split(triplets["plain"], "train", 16, show_progress=False)
    assert str(triplets["plain"]) in str(error.value)
    with pytest.raises(ValueError, match="prepare it with an embedder"):
        train_clip(["--train_data_dir", str(triplets["plain"]), "--output_dir", str(tmp_path / "clip"), *TINY_CLIP])
    assert not (tmp_path / "clip").exists()
    with pytest.raises(ValueError, match="no 'nope' split"):
        load_cxr_split(triplets["embedded"], "nope", 16, show_progress=False)
    with pytest.raises(FileNotFoundError, match="prepare-cxr"):
        load_cxr_split(tmp_path, "train", 16, show_progress=False)


# ---------------------------------------------------------------------------------------------------- VAE
def test_vae_run_saves_a_loadable_scaled_model_grids_metrics_and_card(triplets, tmp_path, monkeypatch) -> None:
    """On the dataset without event embeddings (the VAE needs none), with EMA and a mocked push."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from ehr_diffusers import hub

    calls = []
    monkeypatch.setattr(hub, "push_to_hub", lambda folder, repo_id, **kwargs: calls.append((folder, repo_id, kwargs))
                        or f"https://huggingface.co/{repo_id}")
    out, token = tmp_path / "vae", "hf_not_a_real_token_0123456789"
    run = train_vae(["--train_data_dir", str(triplets["plain"]), "--output_dir", str(out), *TINY_VAE,
                     "--max_train_steps", "4", "--validation_steps", "2", "--use_ema", "--push_to_hub",
                     "--hub_model_id", "someone/cxr-vae", "--hub_token", token, "--hub_private_repo"])
    assert run.global_step == 4 and len(run.losses) == 4
    assert {"config.json", "diffusion_pytorch_model.safetensors", "metrics.json", "README.md",
            "training_args.json"} <= {path.name for path in out.iterdir()}
    assert not list(out.rglob("*.bin")) or all(path.parent.name.startswith("checkpoint") for path in out.rglob("*.bin"))
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.in_channels == 1 and list(vae.config.block_out_channels) == [8, 16]
    metrics = json.loads((out / "metrics.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(metrics["latents"]["scaling_factor"])
    assert vae.config.scaling_factor == pytest.approx(1 / metrics["latents"]["latent_std"])
    validation = metrics["validation"]
    assert validation["images"] > 0 and 0 < validation["psnr"] < 60 and 0 <= validation["mae"] <= 1
    assert "psnr" in validation["mean_image_reference"]
    grids = sorted(path.name for path in (out / "validation").iterdir())
    assert grids == ["final.png", "step-000002.png"]
    with Image.open(out / "validation" / "final.png") as grid:
        assert grid.size[1] == 2 * 16 + 2  # originals over reconstructions
    card = (out / "README.md").read_text()
    assert "license: cc0-1.0" in card and "someone/cxr-vae" in card and "AutoencoderKL" in card
    assert token not in card and "Weber et al." in card
    assert len(calls) == 1 and calls[0][0] == out and calls[0][1] == "someone/cxr-vae"
    assert calls[0][2]["token"] == token and calls[0][2]["private"] is True
    scaled = vae.encode(to_pixels(torch.zeros(1, 16, 16, dtype=torch.uint8))).latent_dist.mode()
    assert scaled.shape == (1, 2, 8, 8)


def test_vae_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(triplets, tmp_path) -> None:
    """N steps straight vs N/2, a checkpoint, and a resume: the same losses and (EMA) weights, bit for bit, and the
    same scaling factor. N/2 ends an epoch: an epoch's shuffle order is drawn when it starts."""
    images = len(load_cxr_images(triplets["plain"], "train", 16, show_progress=False))
    half = _steps_per_epoch(images, 32)
    # The uninterrupted run validates at step N/2, the resumed one does not: validating must not change training.
    flags = ["--use_ema", "--max_train_steps", str(2 * half), "--checkpointing_steps", str(half),
             "--validation_steps", str(half)]

    def run(out: Path, *extra: str):
        return train_vae(["--train_data_dir", str(triplets["plain"]), "--output_dir", str(out), *TINY_VAE, *flags,
                          *extra])

    whole, resumed = run_interrupted(run, tmp_path, half)
    assert resumed.first_step == half and resumed.global_step == whole.global_step == 2 * half
    assert resumed.losses == whole.losses[half:]
    _assert_same_weights(whole.output_dir, resumed.output_dir)
    config = [json.loads((folder / "config.json").read_text()) for folder in (whole.output_dir, resumed.output_dir)]
    assert config[0]["scaling_factor"] == config[1]["scaling_factor"]


def test_vae_loss_goes_down_on_a_fixed_batch(triplets) -> None:
    from diffusers import AutoencoderKL

    from ehr_diffusers.training.train_cxr_vae import PosteriorMoments, parse_args, vae_config, vae_loss

    torch.manual_seed(0)
    args = parse_args(["--train_data_dir", "x", "--output_dir", "y", *TINY_VAE])
    vae = AutoencoderKL(**vae_config(args))
    moments = PosteriorMoments(vae)
    pixels = to_pixels(load_cxr_images(triplets["plain"], "train", 16, show_progress=False).images[:8])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        (reconstruction,) = vae(pixels, sample_posterior=True, return_dict=False)
        loss, parts = vae_loss(reconstruction, pixels, moments.kl(), 1e-6, 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert parts["kl"] > 0 and losses[-1] < 0.6 * losses[0], losses


def test_vae_bad_arguments_name_the_flag(triplets, tmp_path) -> None:
    base = ["--train_data_dir", str(triplets["plain"]), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    for extra, message in ((["--resolution", "18", "--block_out_channels", "8,16,32"], "--resolution 18"),
                           (["--block_out_channels", "8,12", "--norm_num_groups", "8"], "--norm_num_groups 8"),
                           (["--kl_weight", "-1"], "--kl_weight")):
        with pytest.raises(ValueError, match=message):
            train_vae([*base, *extra])
    with pytest.raises(SystemExit):
        train_vae([*base, "--block_out_channels", "8,x"])
    from ehr_diffusers.training.train_cxr_vae import default_norm_groups

    assert default_norm_groups((16, 32, 64)) == 16 and default_norm_groups((128, 256)) == 32
    assert default_norm_groups((12, 24)) == 4


# ---------------------------------------------------------------------------------------------------- event CLIP
def test_event_clip_run_saves_both_encoders_temperature_metrics_and_card(triplets, tmp_path, monkeypatch) -> None:
    from transformers import CLIPVisionModelWithProjection

    from ehr_diffusers import hub
    from ehr_diffusers.models.event_encoder import EventEncoderModel

    calls = []
    monkeypatch.setattr(hub, "push_to_hub", lambda folder, repo_id, **kwargs: calls.append((folder, repo_id, kwargs))
                        or f"https://huggingface.co/{repo_id}")
    out = tmp_path / "clip"
    run = train_clip(["--train_data_dir", str(triplets["embedded"]), "--output_dir", str(out), *TINY_CLIP,
                      "--max_train_steps", "4", "--validation_steps", "2", "--use_ema", "--push_to_hub",
                      "--hub_model_id", "someone/event-clip"])
    assert run.global_step == 4 and len(run.losses) == 4
    events = EventEncoderModel.from_pretrained(out, subfolder="event_encoder")
    images = CLIPVisionModelWithProjection.from_pretrained(out, subfolder="image_encoder")
    assert events.config.event_dim == 384 and events.config.context_dim == images.config.projection_dim == 16
    assert (out / "event_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "image_encoder" / "model.safetensors").is_file()
    clip = json.loads((out / "event_clip.json").read_text())
    assert clip["temperature"] == pytest.approx(1 / clip["logit_scale"]) and clip["embedding_dim"] == 16
    assert clip["image_encoder"]["channels"] == 1 and clip["image_encoder"]["image_size"] == 16

    figures = json.loads((out / "metrics.json").read_text())["validation"]
    split = load_cxr_split(triplets["embedded"], "validation", 16, show_progress=False)
    assert figures["triplets"] == len(split) and figures["images"] == len(np.unique(split.previous_index))
    for direction in ("image_to_events", "events_to_image"):
        for k in (1, 5):
            assert 0 <= figures[f"{direction}_top{k}"] <= 1 and 0 < figures[f"{direction}_top{k}_chance"] <= 1
    assert figures["events_to_image_top1_chance"] == pytest.approx(1 / figures["images"])
    train_figures = json.loads((out / "metrics.json").read_text())["train"]
    assert train_figures["triplets"] == len(load_cxr_split(triplets["embedded"], "train", 16, show_progress=False))

    embeddings, hours, mask = collate_events(split, [0, 1], 16)
    pooled = events(embeddings, mask, hours).pooled
    assert pooled.shape == (2, 16)
    assert images(pixel_values=to_pixels(split.previous[:2])).image_embeds.shape == (2, 16)
    card = (out / "README.md").read_text()
    assert "Radford et al. 2021" in card and "license: cc0-1.0" in card and "(redacted)" not in card
    assert len(calls) == 1 and calls[0][1] == "someone/event-clip"


def test_event_clip_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(triplets, tmp_path) -> None:
    """With EMA on both encoders: the event encoder (diffusers subfolder), the image encoder and the temperature
    (accelerate's own files) all resume exactly."""
    train = load_cxr_split(triplets["embedded"], "train", 16, show_progress=False)
    half = _steps_per_epoch(len(train), 16, drop_last=True)
    # The uninterrupted run validates at step N/2, the resumed one does not: validating must not change training.
    flags = ["--use_ema", "--max_train_steps", str(2 * half), "--checkpointing_steps", str(half),
             "--validation_steps", str(half)]

    def run(out: Path, *extra: str):
        return train_clip(["--train_data_dir", str(triplets["embedded"]), "--output_dir", str(out), *TINY_CLIP,
                           *flags, *extra])

    whole, resumed = run_interrupted(run, tmp_path, half)
    assert resumed.first_step == half and resumed.global_step == whole.global_step == 2 * half
    assert resumed.losses == whole.losses[half:]
    for subfolder in ("event_encoder", "image_encoder"):
        _assert_same_weights(whole.output_dir / subfolder, resumed.output_dir / subfolder)
    scales = [json.loads((run.output_dir / "event_clip.json").read_text())["logit_scale"] for run in (whole, resumed)]
    assert scales[0] == scales[1] and whole.metrics["validation"] == resumed.metrics["validation"]


def test_event_clip_loss_goes_down_on_a_fixed_batch(triplets) -> None:
    from ehr_diffusers.training.train_event_clip import (
        build_event_encoder,
        build_image_encoder,
        image_inputs,
        parse_args,
    )

    torch.manual_seed(0)
    args = parse_args(["--train_data_dir", "x", "--output_dir", "y", *TINY_CLIP])
    split = load_cxr_split(triplets["embedded"], "train", 16, show_progress=False)
    events_model = build_event_encoder(args, split.event_dim)
    images_model, feed = build_image_encoder(args)
    head = ContrastiveHead()
    rows = np.arange(16)
    embeddings, hours, mask = collate_events(split, rows, args.max_events)
    pixels = image_inputs(split.previous[rows], feed, torch.device("cpu"))
    groups = torch.from_numpy(split.previous_index[rows])
    parameters = [*events_model.parameters(), *images_model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    losses = []
    for _ in range(30):
        loss, _ = head(images_model(pixel_values=pixels).image_embeds, events_model(embeddings, mask, hours).pooled,
                       groups)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # from log(16): chance among 16 pairs


def test_contrastive_head_targets_and_clamped_scale() -> None:
    head = ContrastiveHead(init_temperature=0.001, max_logit_scale=100.0)
    assert head.scale().item() == pytest.approx(100.0)
    embeds = torch.eye(4)
    perfect, logits = head(embeds, embeds)
    assert logits.shape == (4, 4) and perfect.item() < 1e-6
    # rows 0 and 1 share their image: pairing 0 with 1's events is no error
    shared, _ = head(torch.stack([embeds[0], embeds[0], embeds[2], embeds[3]]),
                     torch.stack([embeds[0], embeds[0], embeds[2], embeds[3]]), torch.tensor([7, 7, 2, 3]))
    assert shared.item() == pytest.approx(math.log(2) * 2 / 4, abs=1e-4)  # two rows, each split 50/50


def test_retrieval_figures_and_chance_levels() -> None:
    image_of_row = np.array([0, 0, 1, 2])
    images = torch.eye(3)
    perfect = retrieval_figures(images, images[torch.from_numpy(image_of_row)], image_of_row)
    assert perfect["image_to_events_top1"] == perfect["events_to_image_top1"] == 1.0
    assert perfect["triplets"] == 4 and perfect["images"] == 3
    assert perfect["events_to_image_top1_chance"] == pytest.approx(1 / 3)
    assert perfect["events_to_image_top5_chance"] == 1.0
    # image 0 has 2 of the 4 event sets: a random top-1 hits one half the time; images 1 and 2: a quarter
    assert perfect["image_to_events_top1_chance"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    assert topk_chance(10, np.array([1]), 5) == pytest.approx(0.5)
    wrong = retrieval_figures(images, images[torch.tensor([1, 2, 0, 0])], image_of_row)
    assert wrong["events_to_image_top1"] == 0.0 and wrong["image_to_events_top1"] == 0.0


def test_event_clip_bad_arguments_name_the_flag(triplets, tmp_path) -> None:
    base = ["--train_data_dir", str(triplets["embedded"]), "--output_dir", str(tmp_path / "out"), "--report_to",
            "none"]
    for extra, message in ((["--event_dim", "768"], "--event_dim 768: the dataset's event embeddings are 384-d"),
                           (["--train_batch_size", "1"], "--train_batch_size must be at least 2"),
                           (["--resolution", "20", "--image_patch_size", "8"], "--image_patch_size 8"),
                           (["--init_temperature", "0.001"], "--init_temperature"),
                           (["--event_encoder", str(tmp_path / "missing")], "--event_encoder")):
        with pytest.raises(ValueError, match=message):
            train_clip([*base, *extra])


def test_cards_follow_the_data_licence(triplets) -> None:
    from ehr_diffusers.hub.cxr_cards import cxr_training_data_record, render_cxr_model_card

    record = cxr_training_data_record(triplets["embedded"])
    assert record["synthetic"] is True and record["embedding_dim"] == 384
    mimic = render_cxr_model_card("vae", {**record, "synthetic": False, "synthetic_evidence": "test"},
                                  {"hub_token": "secret"}, {"psnr": 30.0})
    assert "license: other" in mimic and "physionet" in mimic and "secret" not in mimic
    with pytest.raises(ValueError, match="component"):
        render_cxr_model_card("unet", record, {})


# ---------------------------------------------------------------------------------------------------- launch
@pytest.mark.slow
def test_accelerate_launch_event_clip_checkpoints_then_resume_latest(triplets, tmp_path) -> None:
    out = tmp_path / "clip"
    args = ["--train_data_dir", str(triplets["embedded"]), "--output_dir", str(out), *TINY_CLIP, "--use_ema",
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--validation_steps", "1000"]
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher) if launcher.exists() else "accelerate", "launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "ehr_diffusers.training.train_event_clip", *args, "--max_train_steps", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-4"]
    assert {p.name for p in (out / "checkpoint-4").iterdir()} >= {"event_encoder", "event_encoder_ema",
                                                                   "model.safetensors", "optimizer.bin"}
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 4

    resumed = train_clip([*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert resumed.first_step == 4 and resumed.global_step == 6 and len(resumed.losses) == 2
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-6"]
