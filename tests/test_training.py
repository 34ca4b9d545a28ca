"""The training scripts: in-process runs of both on the labelled demo dataset with tiny models, calibration and
metrics, condition dropout, bad input, one real ``accelerate launch`` run with checkpoints and a resume, mocked push."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import reset_accelerate_state, run_interrupted
from ehr_diffusers.training import checkpointing
from ehr_diffusers.training.common import resolve_report_to
from ehr_diffusers.training.data import record_columns, screen_split
from ehr_diffusers.training.train_ehr_autoencoder import main as train_autoencoder
from ehr_diffusers.training.train_ehr_diffusion import (
    DENOISER_PRESETS,
    apply_condition_dropout,
    denoiser_config,
    parse_args,
)
from ehr_diffusers.training.train_ehr_diffusion import main as train_diffusion

TINY_AUTOENCODER = ["--latent_dim", "16", "--hidden_dim", "32", "--num_layers", "1", "--train_batch_size", "64",
                    "--report_to", "none", "--seed", "0"]
TINY_DENOISER = ["--num_tokens", "2", "--hidden_dim", "16", "--num_layers", "1", "--num_heads", "2",
                 "--train_batch_size", "64", "--report_to", "none", "--seed", "0"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def autoencoder_run(labelled_demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("training") / "autoencoder"
    run = train_autoencoder(["--train_data_dir", str(labelled_demo_dataset), "--output_dir", str(out),
                             "--num_train_epochs", "3", "--use_ema", "--field_loss_weight", "20",
                             *TINY_AUTOENCODER])
    reset_accelerate_state()
    return run


def _diffusion_args(dataset: Path, autoencoder: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_data_dir", str(dataset), "--autoencoder_path", str(autoencoder), "--output_dir", str(out),
            *TINY_DENOISER, *extra]


# ---------------------------------------------------------------------------------------------------- autoencoder
def test_autoencoder_run_saves_a_calibrated_model_with_metrics(autoencoder_run, labelled_demo_dataset) -> None:
    from datasets import load_from_disk

    from ehr_diffusers import EHRAutoencoderModel
    from ehr_diffusers.data.ehr.schema import EHRSchema

    out = autoencoder_run.output_dir
    assert autoencoder_run.global_step == 3 * 13  # 800 rows / 64 = 13 batches per epoch
    assert len(autoencoder_run.losses) == autoencoder_run.global_step
    assert autoencoder_run.losses[-1] < autoencoder_run.losses[0]
    model = EHRAutoencoderModel.from_pretrained(out)
    schema = EHRSchema.load(out)
    model.check_schema(schema)
    assert not torch.all(model.latent_std == 1) and not torch.all(model.latent_mean == 0)
    assert not torch.all(model.thresholds == 0.5)

    metrics = json.loads((out / "autoencoder_metrics.json").read_text())
    assert metrics["holdout"]["split"] == "holdout" and metrics["holdout"]["rows"] == 200
    assert metrics["train"]["split"] == "train" and metrics["train"]["rows"] == 800
    codes = metrics["holdout"]["groups"]["icd10_categories"]
    assert 0.0 <= codes["micro_f1"] <= 1.0 and "mean_prevalence_error" in codes
    assert "mae" in metrics["holdout"]["groups"]["age"] and "accuracy" in metrics["holdout"]["groups"]["sex"]

    # Calibrated thresholds: records decoded from the train split have the train split's code prevalence.
    train = load_from_disk(str(labelled_demo_dataset))["train"]
    vectors = torch.from_numpy(schema.encode(train.select_columns(record_columns(schema))[:]))
    model.eval()
    with torch.no_grad():
        decoded = model.to_vectors(model(vectors).logits)
    codes_slice = schema.slices["icd10_categories"]
    real_prevalence, decoded_prevalence = vectors[:, codes_slice].mean(0), decoded[:, codes_slice].mean(0)
    assert (real_prevalence - decoded_prevalence).abs().max() < 0.01
    assert metrics["train"]["groups"]["icd10_categories"]["mean_prevalence_error"] < 1e-3
    assert not list(out.glob(".merge.*"))


# ---------------------------------------------------------------------------------------------------- diffusion
def test_diffusion_run_saves_a_pipeline_that_generates(autoencoder_run, labelled_demo_dataset, tmp_path) -> None:
    from ehr_diffusers import EHRLatentDiffusionPipeline

    out = tmp_path / "model"
    run = train_diffusion(_diffusion_args(
        labelled_demo_dataset, autoencoder_run.output_dir, out, "--max_train_steps", "4", "--use_ema",
        "--condition_dropout", "0.5", "--judge_threshold", "3", "--validation_prompts", "70 year old man",
        "--validation_steps", "2", "--validation_records_per_prompt", "2", "--validation_inference_steps", "3",
    ))
    assert run.global_step == 4 and run.first_step == 0 and run.resumed_from is None and len(run.losses) == 4
    assert len(run.validation["70 year old man"]) == 2
    pipe = EHRLatentDiffusionPipeline.from_pretrained(out)
    assert pipe.text_embedder is not None and pipe.text_embedder.dim == 384  # minilm, as text_labels.json says
    assert pipe.scheduler.config.solver == "dpmsolver++" and pipe.denoiser.config.condition_dim == 384
    records = pipe("young woman with asthma", num_records_per_prompt=3, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(0)).records
    assert len(records) == 3 and {"sex", "age", "icd10_categories"} <= set(records[0])
    # Half the conditions were the learned null embedding: it was trained (it starts at zero).
    assert pipe.denoiser.null_condition.abs().sum() > 0
    assert (out / "README.md").is_file() and (out / "autoencoder_metrics.json").is_file()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".merge.*"))  # --checkpointing_steps 500


def test_condition_dropout_uses_the_null_embedding() -> None:
    condition = torch.randn(64, 8)
    null = torch.nn.Parameter(torch.randn(8))
    all_null, mask = apply_condition_dropout(condition, null, 1.0)
    assert mask.all() and torch.equal(all_null, null.detach().expand(64, 8))
    unchanged, mask = apply_condition_dropout(condition, null, 0.0)
    assert not mask.any() and torch.equal(unchanged, condition)

    mixed, mask = apply_condition_dropout(condition, null, 0.5, generator=torch.Generator().manual_seed(0))
    assert 0 < int(mask.sum()) < 64
    assert torch.equal(mixed[mask], null.detach().expand(int(mask.sum()), 8))
    assert torch.equal(mixed[~mask], condition[~mask])
    weights = torch.randn(64, 8)
    (mixed * weights).sum().backward()
    torch.testing.assert_close(null.grad, weights[mask].sum(0))  # only the dropped rows train the null embedding

    null.grad = None
    kept, _ = apply_condition_dropout(condition, null, 0.0)
    kept.sum().backward()
    assert null.grad is not None and torch.equal(null.grad, torch.zeros(8))  # in the graph even when unused


def test_denoiser_presets_and_overrides() -> None:
    assert DENOISER_PRESETS["demo"] == {"num_tokens": 4, "hidden_dim": 64, "num_layers": 3, "num_heads": 4,
                                        "mlp_ratio": 2.0}
    base = ["--train_data_dir", "d", "--autoencoder_path", "a", "--output_dir", "o"]
    config = denoiser_config(parse_args([*base, "--denoiser_config", "demo", "--num_layers", "2"]), 1024, 384)
    assert config == {"num_tokens": 4, "hidden_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_ratio": 2.0,
                      "latent_dim": 1024, "condition_dim": 384, "prediction_type": "epsilon"}
    reference = denoiser_config(parse_args([*base, "--denoiser_config", "seed_reference"]), 1024, 384)
    assert reference["hidden_dim"] == 4096 and reference["condition_dim"] == 384
    with pytest.raises(ValueError, match="--num_tokens 5"):
        denoiser_config(parse_args([*base, "--num_tokens", "5"]), 16, 384)
    with pytest.raises(ValueError, match="--num_heads 3"):
        denoiser_config(parse_args([*base, "--hidden_dim", "16", "--num_heads", "3"]), 16, 384)


# ---------------------------------------------------------------------------------------------------- bad input
def _mismatched_autoencoder(dataset: Path, folder: Path) -> Path:
    from ehr_diffusers import EHRAutoencoderModel
    from ehr_diffusers.data.ehr.schema import EHRSchema

    schema = EHRSchema.load(dataset)
    schema.groups = [group for group in schema.groups if group.name != "race"]
    EHRAutoencoderModel.from_schema(schema, latent_dim=16, hidden_dim=32, num_layers=1).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["missing_dataset", "unlabelled", "schema_mismatch", "output_is_file",
                                  "no_autoencoder", "bad_resume", "judge_drops_all", "output_in_dataset"])
def test_bad_input_is_a_value_error_naming_the_argument(case, autoencoder_run, labelled_demo_dataset, demo_dataset,
                                                         tmp_path) -> None:
    dataset, autoencoder, out = labelled_demo_dataset, autoencoder_run.output_dir, tmp_path / "out"
    extra: list[str] = []
    expected = {
        "missing_dataset": "--train_data_dir .*no such folder",
        "unlabelled": "dataset has no 'embedding' column.*label it first with `ehr-diffusers label`",
        "schema_mismatch": "--autoencoder_path .*schema does not match",
        "output_is_file": "--output_dir .*not a folder",
        "no_autoencoder": "--autoencoder_path .*no such folder",
        "bad_resume": "--resume_from_checkpoint checkpoint-7",
        "judge_drops_all": "--judge_threshold 6.0: no training row passes",
        "output_in_dataset": "--output_dir .*inside, the input --train_data_dir",
    }[case]
    if case == "missing_dataset":
        dataset = tmp_path / "nowhere"
    elif case == "unlabelled":
        dataset = demo_dataset
    elif case == "schema_mismatch":
        autoencoder = _mismatched_autoencoder(dataset, tmp_path / "other-autoencoder")
    elif case == "output_is_file":
        out.write_text("not a folder")
    elif case == "no_autoencoder":
        autoencoder = tmp_path / "no-autoencoder"
    elif case == "bad_resume":
        extra = ["--resume_from_checkpoint", "checkpoint-7"]
    elif case == "judge_drops_all":
        extra = ["--judge_threshold", "6"]
    elif case == "output_in_dataset":
        out = dataset / "model"
    with pytest.raises(ValueError, match=expected):
        train_diffusion(_diffusion_args(dataset, autoencoder, out, "--max_train_steps", "1", "--text_embedder",
                                        "none", *extra))
    assert case == "output_is_file" or not out.exists()  # nothing written: the check came before any training


def test_autoencoder_bad_input(tmp_path, labelled_demo_dataset) -> None:
    with pytest.raises(ValueError, match="--train_data_dir .*not a prepared dataset"):
        train_autoencoder(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                           *TINY_AUTOENCODER])
    with pytest.raises(ValueError, match="--latent_dim must be at least 1"):
        train_autoencoder(["--train_data_dir", str(labelled_demo_dataset), "--output_dir", str(tmp_path / "out"),
                           "--latent_dim", "0"])
    assert not (tmp_path / "out").exists()


def test_screen_split_counts_what_it_drops() -> None:
    from datasets import Dataset

    from ehr_diffusers.text.judge import JUDGE_CATEGORIES

    def scores(value):
        return None if value is None else {category: value for category in JUDGE_CATEGORIES}

    split = Dataset.from_dict({"x": [1, 2, 3, 4], "judge_scores": [scores(5), scores(2), scores(4), scores(None)]})
    assert screen_split(split, None) == (split, 0)
    kept, dropped = screen_split(split, 3)
    assert kept["x"] == [1, 3] and dropped == 2
    kept, dropped = screen_split(split, 3, keep_unscored=True)
    assert kept["x"] == [1, 3, 4] and dropped == 1


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_helpers(tmp_path) -> None:
    for step in (10, 2, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-notes").mkdir()
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10",
                                                                           "checkpoint-30"]
    assert checkpointing.resolve_resume_checkpoint(tmp_path, "latest").name == "checkpoint-30"
    assert checkpointing.resolve_resume_checkpoint(tmp_path, "checkpoint-10") == tmp_path / "checkpoint-10"
    assert checkpointing.resolve_resume_checkpoint(tmp_path / "empty", "latest") is None
    assert checkpointing.resolve_resume_checkpoint(tmp_path, None) is None
    with pytest.raises(ValueError, match="--resume_from_checkpoint .*not a checkpoint folder"):
        checkpointing.resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-notes"))
    removed = checkpointing.prune_checkpoints(tmp_path, 2)  # room for one new: keep the newest one
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-10"]
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["checkpoint-30"]
    assert checkpointing.prune_checkpoints(tmp_path, None) == []


def test_report_to_falls_back_without_tensorboard(monkeypatch) -> None:
    import importlib.util

    assert resolve_report_to("none") == (None, None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    log_with, warning = resolve_report_to("tensorboard")
    assert log_with is None and "tensorboard is not installed" in warning
    assert resolve_report_to("wandb") == ("wandb", None)


@pytest.mark.slow
def test_accelerate_launch_checkpoints_then_resume_latest(autoencoder_run, labelled_demo_dataset, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "model"
    args = _diffusion_args(labelled_demo_dataset, autoencoder_run.output_dir, out, "--text_embedder", "none",
                           "--use_ema", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1")
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher) if launcher.exists() else "accelerate", "launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "ehr_diffusers.training.train_ehr_diffusion", *args, "--max_train_steps", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # checkpoint-2 was pruned when checkpoint-4 was saved (--checkpoints_total_limit 1)
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-4"]
    assert {p.name for p in (out / "checkpoint-4").iterdir()} >= {"denoiser", "denoiser_ema", "optimizer.bin"}

    # Resuming at the last step trains nothing: the saved pipeline holds the checkpoint's EMA weights exactly.
    again = train_diffusion([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert again.first_step == 4 and again.global_step == 4 and again.losses == []
    assert again.resumed_from.name == "checkpoint-4"
    saved = load_file(out / "denoiser" / "diffusion_pytorch_model.safetensors")
    ema = load_file(out / "checkpoint-4" / "denoiser_ema" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == ema.keys() and all(torch.equal(saved[key], ema[key]) for key in saved)

    reset_accelerate_state()
    resumed = train_diffusion([*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert resumed.first_step == 4 and resumed.global_step == 6 and len(resumed.losses) == 2
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-6"]


@pytest.mark.parametrize("script", ["autoencoder", "diffusion"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(script, autoencoder_run, labelled_demo_dataset,
                                                                      tmp_path) -> None:
    """Stopped after checkpoint-13 and resumed from it, a run ends with the uninterrupted run's losses and saved
    weights (the EMA's) bit for bit. Step 13 ends the first epoch (800 rows in batches of 64): an epoch's shuffle
    order is drawn when it starts, so a resume in the middle of an epoch goes on in another order."""
    flags = ["--use_ema", "--max_train_steps", "20", "--checkpointing_steps", "13"]

    def run(out: Path, *extra: str):
        if script == "autoencoder":
            return train_autoencoder(["--train_data_dir", str(labelled_demo_dataset), "--output_dir", str(out),
                                      *TINY_AUTOENCODER, *flags, *extra])
        return train_diffusion(_diffusion_args(labelled_demo_dataset, autoencoder_run.output_dir, out,
                                               "--text_embedder", "none", "--condition_dropout", "0.3", *flags, *extra))

    whole, resumed = run_interrupted(run, tmp_path, 13)
    assert resumed.first_step == 13 and resumed.global_step == whole.global_step == 20
    assert resumed.losses == whole.losses[13:]
    weights = Path("denoiser" if script == "diffusion" else ".", "diffusion_pytorch_model.safetensors")
    from safetensors.torch import load_file

    expected, actual = load_file(whole.output_dir / weights), load_file(resumed.output_dir / weights)
    assert actual.keys() == expected.keys() and all(torch.equal(actual[key], expected[key]) for key in expected)


def test_push_to_hub_is_called_with_the_output(autoencoder_run, labelled_demo_dataset, tmp_path, monkeypatch) -> None:
    from ehr_diffusers import hub

    calls = []

    def fake_push(folder, repo_id, **kwargs):
        calls.append((Path(folder), repo_id, kwargs, (Path(folder) / "model_index.json").is_file()))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(hub, "push_to_hub", fake_push)
    out = tmp_path / "model"
    token = "hf_not_a_real_token_0123456789"
    train_diffusion(_diffusion_args(labelled_demo_dataset, autoencoder_run.output_dir, out, "--text_embedder", "none",
                                    "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "someone/ehr-demo",
                                    "--hub_token", token, "--hub_private_repo", "--prediction_type", "v_prediction"))
    assert len(calls) == 1
    folder, repo_id, kwargs, had_model = calls[0]
    assert folder == out and repo_id == "someone/ehr-demo" and had_model
    assert kwargs["token"] == token and kwargs["private"] is True
    card = (out / "README.md").read_text()
    assert "someone/ehr-demo" in card and token not in card
    for component, name in (("denoiser", "config.json"), ("scheduler", "scheduler_config.json")):
        assert json.loads((out / component / name).read_text())["prediction_type"] == "v_prediction"
    shutil.rmtree(out)
