"""train_ehrxdiff: a few steps on a tiny triplet dataset give a loadable EHRXDiffPipeline with its event-effect check,
a checkpointed run resumed ends bit-identical to an uninterrupted one, one real ``accelerate launch`` run, bad input,
and the helpers the check rests on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import prepare_demo_cxr, run_interrupted
from ehr_diffusers.evaluation.cxr.controls import derangement, paired_difference
from ehr_diffusers.training import train_ehrxdiff
from ehr_diffusers.training.train_ehrxdiff import main


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    """A 20-subject synthetic cohort prepared with MiniLM event embeddings."""
    return prepare_demo_cxr(tmp_path_factory.mktemp("cxr"), 20)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder


def _args(data: Path, vae: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_data_dir", str(data), "--vae_path", str(vae), "--output_dir", str(out), "--resolution", "32",
            "--block_out_channels", "16,16,32", "--event_hidden_dim", "32", "--num_latents", "4",
            "--train_batch_size", "8", "--eval_batch_size", "32", "--validation_triplets", "16",
            "--validation_draws", "1", "--validation_images", "2", "--validation_inference_steps", "2",
            "--report_to", "none", "--seed", "0", "--max_events", "64", *extra]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_a_short_run_saves_a_pipeline_with_its_event_effect_check(triplets, tiny_vae, tmp_path) -> None:
    from ehr_diffusers import EHRXDiffPipeline

    out = tmp_path / "model"
    run = main(_args(triplets, tiny_vae, out, "--max_train_steps", "4", "--validation_steps", "2", "--use_ema"))
    assert run.global_step == 4 and len(run.losses) == 4 and all(np.isfinite(run.losses))
    metrics = json.loads((out / "validation_metrics.json").read_text())
    final = metrics["final"]
    assert 2 <= final["triplets"] <= 16
    assert {"loss_true_events", "loss_shuffled_events", "loss_none_events"} <= set(final)
    low, high = final["shuffled_minus_true"]["ci95"]
    assert low <= final["shuffled_minus_true"]["mean"] <= high
    assert [entry["step"] for entry in metrics["history"]] == [2]
    assert (out / "validation" / "step-2.png").is_file() and (out / "validation" / "step-4.png").is_file()
    card = (out / "README.md").read_text()
    assert "EHRXDiffPipeline" in card and "shuffled" in card
    pipe = EHRXDiffPipeline.from_pretrained(out)
    assert pipe.config.conditioning == "hybrid" and pipe.unet.config.in_channels == 8
    assert pipe.event_embedder is not None and pipe.event_embedder.dim == 384
    pipe.set_progress_bar_config(disable=True)
    image = pipe(np.zeros((32, 32), np.uint8), events=["Furosemide 40 mg IV, time -3.0 h"], num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 1)


def test_residual_target_with_pooled_events(triplets, tiny_vae, tmp_path) -> None:
    from ehr_diffusers import EHRXDiffPipeline

    out = tmp_path / "model"
    run = main(_args(triplets, tiny_vae, out, "--max_train_steps", "2", "--target", "residual", "--pooled_events",
                     "--event_change_weight", "1.0", "--validation_images", "1"))
    assert run.global_step == 2 and all(np.isfinite(run.losses))
    pipe = EHRXDiffPipeline.from_pretrained(out)
    assert pipe.config.residual_scale > 0 and pipe.unet.config.class_embed_type == "projection"
    assert not any("change_head" in path.name for path in out.rglob("*") if path.is_dir())
    with pytest.raises(ValueError, match="--augment_previous"):
        main(_args(triplets, tiny_vae, tmp_path / "bad", "--target", "residual", "--augment_previous"))


def test_cross_attention_conditioning_and_the_token_linear_adapter(triplets, tiny_vae, tmp_path) -> None:
    from ehr_diffusers import EHRXDiffPipeline

    out = tmp_path / "model"
    main(_args(triplets, tiny_vae, out, "--max_train_steps", "1", "--conditioning", "cross_attention",
               "--adapter_type", "token_linear", "--no-vae_tokens", "--validation_images", "0",
               "--save_event_embedder", "none"))
    pipe = EHRXDiffPipeline.from_pretrained(out)
    assert pipe.config.conditioning == "cross_attention" and pipe.unet.config.in_channels == 4
    assert pipe.fusion_adapter.config.adapter_type == "token_linear" and pipe.event_embedder is None


@pytest.mark.parametrize("variant", [["--augment_previous"],
                                     ["--target", "residual", "--pooled_events", "--event_change_weight", "0.5"]],
                         ids=["augmented", "residual"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(variant, triplets, tiny_vae, tmp_path) -> None:
    """Stopped after checkpoint-3 and resumed, the run ends with the uninterrupted run's losses and EMA weights bit
    for bit (with condition dropout and previous-image augmentation drawing random numbers at every step, or with the
    residual target and the auxiliary event-change head, which only the checkpoint holds). Step 3 ends the first
    epoch (135 triplets in batches of 45): an epoch's shuffle order is drawn when it starts."""
    from safetensors.torch import load_file

    # validation at step 2 and 4 in the whole run, only at 4 in the resumed one: it must not touch the training RNG
    flags = ["--use_ema", "--max_train_steps", "6", "--checkpointing_steps", "3", "--validation_steps", "2",
             "--train_batch_size", "45", "--validation_images", "0", "--condition_dropout", "0.3", *variant]
    whole, resumed = run_interrupted(lambda out, *extra: main(_args(triplets, tiny_vae, out, *flags, *extra)),
                                     tmp_path, 3)
    assert resumed.first_step == 3 and resumed.global_step == 6
    assert resumed.losses == whole.losses[3:]
    for name in ("unet", "fusion_adapter", "event_encoder"):
        path = Path(name, "diffusion_pytorch_model.safetensors")
        expected, actual = load_file(whole.output_dir / path), load_file(resumed.output_dir / path)
        assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_accelerate_launch_trains_and_checkpoints(triplets, tiny_vae, tmp_path) -> None:
    out = tmp_path / "model"
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher) if launcher.exists() else "accelerate", "launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "ehr_diffusers.training.train_ehrxdiff",
               *_args(triplets, tiny_vae, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                      "--validation_images", "0", "--use_ema")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"checkpoint-2", "checkpoint-4", "model_index.json", "unet", "vae"}
    assert {p.name for p in (out / "checkpoint-4").iterdir()} >= {"unet", "unet_ema", "event_encoder",
                                                                  "fusion_adapter", "optimizer.bin"}


@pytest.mark.parametrize("case", ["no_embeddings", "no_vae", "bad_dropout", "bad_widths", "dim_mismatch"])
def test_bad_input_names_the_argument(case, triplets, tiny_vae, tmp_path) -> None:
    data, vae, extra = triplets, tiny_vae, []
    if case == "no_embeddings":
        data = tmp_path / "data"
        shutil.copytree(triplets, data)
        summary = json.loads((data / "cxr_summary.json").read_text())
        summary["embeddings"] = None
        (data / "cxr_summary.json").write_text(json.dumps(summary))
        match = "prepare it with an embedder"
    elif case == "no_vae":
        vae, match = tmp_path / "missing-vae", "--vae_path"
    elif case == "bad_dropout":
        extra, match = ["--condition_dropout", "1.5"], "--condition_dropout"
    elif case == "bad_widths":
        extra, match = ["--block_out_channels", "16,32"], "--block_out_channels"
    else:
        clip = tmp_path / "clip"
        from ehr_diffusers.models.event_encoder import EventEncoderModel

        EventEncoderModel(event_dim=12, hidden_dim=16, num_heads=2, context_dim=16).save_pretrained(
            clip / "event_encoder")
        extra, match = ["--event_clip_path", str(clip)], "--event_clip_path .*12-d"
    with pytest.raises((ValueError, OSError), match=match):
        main(_args(data, vae, tmp_path / "out", "--max_train_steps", "1", *extra))
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_derangement_moves_every_triplet() -> None:
    for n in (2, 3, 17, 500):
        order = derangement(n, seed=1)
        assert sorted(order) == list(range(n)) and not np.any(order == np.arange(n))
    assert np.array_equal(derangement(50, seed=3), derangement(50, seed=3))
    with pytest.raises(ValueError, match="at least 2 triplets"):
        derangement(1, seed=0)


def test_paired_difference_intervals_are_over_subjects() -> None:
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(20), 5)  # 5 triplets per patient, sharing the patient's offset
    difference = np.repeat(rng.normal(0.0, 1.0, 20), 5) + rng.normal(0.0, 0.01, 100)
    per_triplet = paired_difference(difference, np.ones(100))
    per_subject = paired_difference(difference, np.ones(100), subjects)
    assert per_subject["units"] == 20 and per_triplet["units"] == 100
    assert per_subject["mean_per_triplet"] == pytest.approx(per_triplet["mean"])  # equal-sized clusters: one mean
    assert per_subject["ci95"][0] <= per_subject["mean"] <= per_subject["ci95"][1]
    width = lambda result: result["ci95"][1] - result["ci95"][0]  # noqa: E731
    assert width(per_subject) > 1.8 * width(per_triplet)  # correlated triplets no longer narrow the interval


def test_augmentation_keeps_shape_and_range() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(4, 1, 16, 16) * 2 - 1
    moved = train_ehrxdiff.augment(pixels)
    assert moved.shape == pixels.shape and moved.min() >= -1 and moved.max() <= 1
    assert not torch.equal(moved, pixels)
