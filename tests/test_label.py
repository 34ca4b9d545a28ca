"""``label_dataset`` and ``ehr-diffusers label``: columns, metadata, atomic rewrite, resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ehr_diffusers.cli import main
from ehr_diffusers.io import MARKER_NAME
from ehr_diffusers.text.describe import DiagnosisOrder, FactDescriber, fact_text
from ehr_diffusers.text.judge import JUDGE_CATEGORIES, screen
from ehr_diffusers.text.label import CACHE_NAME, LABEL_COLUMNS, LABELS_NAME, label_dataset, load_label_metadata
from ehr_diffusers.text.rules_judge import RulesJudge
from ehr_diffusers.text.summarize import TemplateSummarizer


@pytest.fixture(scope="module")
def embedder():
    from ehr_diffusers.text.embed import load_embedder

    return load_embedder("minilm")


@pytest.fixture
def dataset_copy(demo_dataset, tmp_path):
    target = tmp_path / "dataset"
    shutil.copytree(demo_dataset, target)
    return target


class CountingSummarizer(TemplateSummarizer):
    def __init__(self):
        super().__init__()
        self.rows = 0

    def summarize(self, facts, show_progress=False):
        self.rows += len(facts)
        return super().summarize(facts, show_progress)


class FailingEmbedder:
    """Delegates to a real embedder and raises KeyboardInterrupt on its n-th call, as a user's Ctrl-C would."""

    def __init__(self, embedder, fail_on_call: int):
        self.embedder, self.fail_on_call, self.calls = embedder, fail_on_call, 0
        self.config, self.dim, self.dtype = embedder.config, embedder.dim, embedder.dtype

    def encode(self, texts, batch_size=64, show_progress=False):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        return self.embedder.encode(texts, batch_size=batch_size)


@pytest.mark.slow
def test_label_adds_the_columns_to_every_split_with_metadata(dataset_copy, embedder):
    from datasets import load_from_disk

    result = label_dataset(dataset_copy, TemplateSummarizer(), RulesJudge(), embedder, show_progress=False)
    dataset = load_from_disk(str(dataset_copy))
    for split in ("train", "holdout"):
        table = dataset[split]
        assert set(LABEL_COLUMNS) <= set(table.column_names)
        assert table.features["embedding"].length == 384 and table.features["embedding"].feature.dtype == "float32"
        vectors = table.with_format("numpy")["embedding"][:]
        assert vectors.shape == (len(table), 384)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert set(table.features["judge_scores"]) == set(JUDGE_CATEGORIES)
        assert all(min(row.values()) >= 3 for row in table["judge_scores"])
    train = dataset["train"]
    describer = FactDescriber(DiagnosisOrder.from_code_lists(train["icd10_categories"]))
    assert train[7]["facts_text"] == fact_text(describer.facts(train[7]))
    assert embedder.encode([train[7]["summary"]])[0].numpy() == pytest.approx(np.asarray(train[7]["embedding"]),
                                                                               abs=1e-5)
    metadata = load_label_metadata(dataset_copy)
    assert metadata == result.metadata == json.loads((dataset_copy / LABELS_NAME).read_text())
    assert "all-MiniLM-L6-v2" in metadata["embedder"]["source"] and metadata["embedder"]["dtype"] == "float32"
    assert metadata["embedding_dim"] == 384
    assert metadata["splits"]["train"]["rows"] == len(train)
    assert metadata["splits"]["holdout"]["judge_unscored"] == 0
    for kept in ("schema.json", "cohort_summary.json", MARKER_NAME):
        assert (dataset_copy / kept).is_file()
    assert not (dataset_copy / CACHE_NAME).exists()
    card = (dataset_copy / "README.md").read_text()
    assert card.count("## Text labels") == 1 and "## Cohort" in card


@pytest.mark.slow
def test_relabelling_replaces_the_columns(dataset_copy, embedder):
    from datasets import load_from_disk

    label_dataset(dataset_copy, TemplateSummarizer(), None, embedder, show_progress=False)
    first = load_from_disk(str(dataset_copy))["holdout"]
    assert all(value is None for row in first["judge_scores"] for value in row.values())
    assert len(screen(first, 3)) == 0 and len(screen(first, 3, keep_unscored=True)) == len(first)
    result = label_dataset(dataset_copy, TemplateSummarizer(max_diagnoses=1), RulesJudge(max_diagnoses=1), embedder,
                           show_progress=False)
    second = load_from_disk(str(dataset_copy))["holdout"]
    assert second.column_names.count("summary") == 1
    assert second["summary"] != first["summary"]
    assert result.metadata["splits"]["holdout"]["judge_unscored"] == 0
    assert (dataset_copy / "README.md").read_text().count("## Text labels") == 1


@pytest.mark.slow
def test_an_interrupted_run_leaves_the_dataset_and_resumes(dataset_copy, embedder):
    from datasets import load_from_disk

    before = load_from_disk(str(dataset_copy))
    n_rows = sum(len(split) for split in before.values())
    with pytest.raises(KeyboardInterrupt):
        label_dataset(dataset_copy, TemplateSummarizer(), RulesJudge(), FailingEmbedder(embedder, fail_on_call=3),
                      chunk_size=100, show_progress=False)
    untouched = load_from_disk(str(dataset_copy))
    assert untouched["train"].column_names == before["train"].column_names
    assert len(list((dataset_copy / CACHE_NAME).glob("*/train/chunk-*.parquet"))) == 2

    counting = CountingSummarizer()
    label_dataset(dataset_copy, counting, RulesJudge(), embedder, chunk_size=100, show_progress=False)
    assert counting.rows == n_rows - 200  # the two finished chunks came from the cache
    resumed = load_from_disk(str(dataset_copy))

    clean = dataset_copy.parent / "clean"
    shutil.copytree(dataset_copy, clean)  # already labelled: labelling again recomputes every column from scratch
    label_dataset(clean, TemplateSummarizer(), RulesJudge(), embedder, chunk_size=1000, show_progress=False)
    expected = load_from_disk(str(clean))
    for split in ("train", "holdout"):
        assert resumed[split]["summary"] == expected[split]["summary"]
        assert resumed[split]["judge_scores"] == expected[split]["judge_scores"]
        np.testing.assert_allclose(resumed[split].with_format("numpy")["embedding"][:],
                                   expected[split].with_format("numpy")["embedding"][:], atol=1e-5)


def test_bad_datasets_are_named(dataset_copy, tmp_path, embedder):
    from datasets import load_from_disk

    with pytest.raises(ValueError, match="not a prepared dataset"):
        label_dataset(tmp_path, TemplateSummarizer(), None, embedder, show_progress=False)
    with pytest.raises(FileNotFoundError, match="label the dataset first"):
        load_label_metadata(tmp_path)
    broken = tmp_path / "broken"
    load_from_disk(str(dataset_copy)).remove_columns(["sex", "race"]).save_to_disk(str(broken))
    (broken / MARKER_NAME).write_text("")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sex', 'race'\]"):
        label_dataset(broken, TemplateSummarizer(), None, embedder, show_progress=False)


@pytest.mark.slow
def test_cli_label_and_its_errors(dataset_copy, capsys):
    assert main(["-q", "label", "--dataset", str(dataset_copy)]) == 0
    out = capsys.readouterr().out
    assert json.loads((dataset_copy / LABELS_NAME).read_text())["embedder"]["spec"] == "minilm"
    assert "labelled" in out and "mean judge scores: factual_agreement 5.00" in out and "under threshold 0" in out
    assert main(["label", "-q", "--dataset", str(dataset_copy), "--embedder", "org/no-such-embedder"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be found locally" in err
    assert main(["label", "-q", "--dataset", str(dataset_copy), "--summarizer", "./no/such/model"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_cli_checks_the_dataset_and_device_before_loading_models(tmp_path, capsys, monkeypatch):
    from ehr_diffusers.commands import label as label_command

    def never(*args, **kwargs):
        raise AssertionError("models were loaded before the dataset was checked")

    monkeypatch.setattr(label_command, "_label_models", never)
    assert main(["label", "-q", "--dataset", str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err


def test_cli_rejects_a_device_it_cannot_use(dataset_copy, capsys):
    assert main(["label", "-q", "--dataset", str(dataset_copy), "--device", "nonsense"]) == 2
    assert "--device nonsense: not a torch device" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["label", "-q", "--dataset", str(dataset_copy), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
