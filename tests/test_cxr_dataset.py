"""prepare-cxr end to end on a hand-made cohort: triplets with their events, event embeddings (one per distinct
event content, float16) from the text layer's EventEmbedder, retrieval on and off, the card and summary, small image
copies and reading them back, the command and its errors."""

from __future__ import annotations

import json
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from datasets import load_from_disk
from PIL import Image

from ehr_diffusers.cli import main
from ehr_diffusers.data.cxr.dataset import (
    SUMMARY_NAME,
    CXRDatasetOptions,
    EventEmbeddingOptions,
    build_cxr_dataset,
    format_cxr_summary,
    image_copy_path,
    prepare_cxr,
    read_cxr_images,
)
from ehr_diffusers.data.cxr.events import event_content
from ehr_diffusers.data.cxr.triplets import TripletOptions
from ehr_diffusers.text.event_embeddings import EventEmbedder
from test_cxr import T0, cohort  # noqa: F401  (the fixture)


def _stamp(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S")


def _add_events(mimic: Path) -> None:
    """Admission 201 has images at 0 h, 10 h and 48 h: furosemide at 5 h (first window), the same dose at 20 h and
    a pO2 at 30 h (second window), a pO2 at 60 h (after every window)."""
    columns = ["subject_id", "hadm_id", "pharmacy_id", "starttime", "stoptime", "drug_type", "drug", "dose_val_rx",
               "dose_unit_rx", "route"]
    pl.DataFrame([(10000001, 201, 1, _stamp(5), _stamp(6), "MAIN", "Furosemide", "40", "mg", "IV"),
                  (10000001, 201, 2, _stamp(20), _stamp(21), "MAIN", "Furosemide", "40", "mg", "IV")],
                 schema=columns, orient="row").write_csv(mimic / "hosp" / "prescriptions.csv.gz", compression="gzip")
    columns = ["labevent_id", "subject_id", "hadm_id", "itemid", "charttime", "value", "valuenum", "valueuom", "flag"]
    pl.DataFrame([(1, 10000001, 201, 50821, _stamp(30), "62", 62.0, "mm Hg", "abnormal"),
                  (2, 10000001, 201, 50821, _stamp(60), "90", 90.0, "mm Hg", None)],
                 schema=columns, orient="row").write_csv(mimic / "hosp" / "labevents.csv.gz", compression="gzip")


def _options() -> CXRDatasetOptions:
    return CXRDatasetOptions(triplets=TripletOptions(validation_fraction=0.0, test_fraction=0.0))


def _embedder(embedder: str = "minilm", **kwargs) -> EventEmbedder:
    return EventEmbedder(EventEmbeddingOptions(embedder, **kwargs))


def test_triplets_carry_their_events_and_one_vector_per_event(cohort) -> None:  # noqa: F811
    cxr, mimic = cohort
    _add_events(mimic)
    dataset, summary = build_cxr_dataset(cxr, mimic, _options(), show_progress=False, embed_events=_embedder())
    train = dataset["train"]
    assert train.num_rows == 2 and list(dataset) == ["train"]  # empty splits are left out
    assert train[0]["event_texts"] == ["prescriptions, drug Furosemide, dose_val_rx 40, dose_unit_rx mg, route IV, "
                                       "time -5.0 h"]
    assert train[1]["event_tables"] == ["prescriptions", "labevents"]
    assert train[1]["event_hours"] == pytest.approx([-28.0, -18.0])
    assert summary["events"]["events_kept"] == {"labevents": 1, "prescriptions": 2}
    info = summary["embeddings"]
    assert info["dim"] == 384 and info["distinct_texts"] == 2  # the two furosemide events share one content
    assert train.features["event_embeddings"].dtype == "float16"
    vectors = [np.asarray(row["event_embeddings"], dtype=np.float32) for row in train]
    assert [v.shape for v in vectors] == [(1, 384), (2, 384)]
    np.testing.assert_allclose(vectors[0][0], vectors[1][0], atol=1e-3)  # same content, same vector
    np.testing.assert_allclose(np.linalg.norm(vectors[1], axis=1), 1.0, atol=2e-3)
    assert pl.select(event_content(pl.lit(train[1]["event_texts"][1]))).item() == (
        "labevents, label pO2, value 62, valueuom mm Hg, flag abnormal")


def test_retrieval_changes_the_vectors_not_their_shape(cohort) -> None:  # noqa: F811
    cxr, mimic = cohort
    _add_events(mimic)
    plain, _ = build_cxr_dataset(cxr, mimic, _options(), show_progress=False, embed_events=_embedder())
    enriched, summary = build_cxr_dataset(cxr, mimic, _options(), show_progress=False,
                                          embed_events=_embedder(retrieval=True, retrieval_k=1, retrieval_weight=0.5))
    assert summary["embeddings"]["retrieval"] == {"source": "events:train", "corpus": 2, "k": 1, "weight": 0.5}
    assert summary["options"]["retrieval"] is True and summary["options"]["retrieval_k"] == 1
    before = np.asarray(plain["train"][1]["event_embeddings"], dtype=np.float32)
    after = np.asarray(enriched["train"][1]["event_embeddings"], dtype=np.float32)
    assert before.shape == after.shape
    # with one neighbour and weight 0.5 each event moves halfway towards the other distinct event
    expected = before + before[::-1]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(after, expected, atol=3e-3)


def test_prepare_cxr_writes_the_dataset_summary_and_card(cohort, tmp_path: Path) -> None:  # noqa: F811
    cxr, mimic = cohort
    _add_events(mimic)
    out = tmp_path / "triplets"
    summary = prepare_cxr(cxr, mimic, out, _options(), show_progress=False)
    assert summary["embeddings"] is None
    # the embedding settings are recorded under the same keys with or without an embedder
    assert list(summary["options"]) == ["max_events", "item_lists", "embedder", "batch_size", "retrieval",
                                        "retrieval_k", "retrieval_weight", "knowledge", "triplets"]
    assert summary["options"]["embedder"] is None
    loaded = load_from_disk(str(out))
    assert "event_embeddings" not in loaded["train"].column_names
    assert json.loads((out / "cxr_summary.json").read_text())["triplets"] == 2
    card = (out / "README.md").read_text()
    assert "# Chest X-ray triplets for EHRXDiff" in card and "less than 48 h" in card
    assert "physionet-credentialed-health-data-license" in card and "$" not in card


def test_prepare_cxr_command(cohort, tmp_path: Path, capsys) -> None:  # noqa: F811
    cxr, mimic = cohort
    _add_events(mimic)
    out = tmp_path / "triplets"
    code = main(["prepare-cxr", "--mimic-dir", str(mimic), "--cxr-dir", str(cxr), "--out", str(out), "-q",
                 "--validation-fraction", "0", "--test-fraction", "0", "--embedder", "none"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "triplets            2 (train 2, validation 0, test 0)" in printed
    assert load_from_disk(str(out))["train"].num_rows == 2


@pytest.mark.parametrize("extra, message", [
    (["--window-hours", "0"], "--window-hours: must be a finite number > 0"),
    (["--window-hours", "1"], "no triplets (8 frontal images, 5 of adults inside an admission, 0 pairs"),
    (["--knowledge", "k.txt"], "--knowledge is the retrieval corpus: it needs --retrieval"),
    (["--retrieval", "--embedder", "none"], "--retrieval needs event embeddings"),
    (["--retrieval", "--retrieval-weight", "1.5"], "--retrieval-weight must be in [0, 1]"),
    (["--retrieval", "--knowledge", "/nonexistent.txt"], "--knowledge /nonexistent.txt: no such file"),
    (["--window-hours", "inf"], "--window-hours: must be a finite number"),
    (["--image-size", "8"], "--image-size must be an integer from 16 to 1024 (pixels per side), got 8"),
    (["--image-size", "2048"], "--image-size must be an integer from 16 to 1024"),
])
def test_prepare_cxr_errors_name_the_option(cohort, tmp_path: Path, capsys, extra, message) -> None:  # noqa: F811
    cxr, mimic = cohort
    out = tmp_path / "triplets"
    assert main(["prepare-cxr", "--mimic-dir", str(mimic), "--cxr-dir", str(cxr), "--out", str(out), "-q",
                 *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def _random_originals(cxr: Path) -> list[Path]:
    """Replaces the fixture's flat 8 x 8 images by noisy RGB ones of another shape, so that the conversion to
    grayscale and the resize show in the pixels."""
    paths = sorted((cxr / "files").rglob("*.jpg"))
    rng = np.random.default_rng(0)
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path, format="JPEG")
    return paths


def _resized(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size), Image.BILINEAR))


def test_image_copies_are_written_recorded_and_read_without_the_originals(cohort, tmp_path: Path) -> None:  # noqa: F811
    cxr, mimic = cohort
    _add_events(mimic)
    _random_originals(cxr)
    out = tmp_path / "triplets"
    summary = prepare_cxr(cxr, mimic, out, _options(), show_progress=False, image_size=16)
    train = load_from_disk(str(out))["train"]
    paths = sorted(set(train["previous_image"]) | set(train["target_image"]))
    expected = {"size": 16, "folder": "images", "format": "png", "count": len(paths)}
    assert summary["image_copies"] == expected == json.loads((out / SUMMARY_NAME).read_text())["image_copies"]
    written = sorted(str(path.relative_to(out)) for path in (out / "images").rglob("*") if path.is_file())
    assert written == sorted(str(image_copy_path(path)) for path in paths)
    assert all(name.endswith(".png") for name in written)
    for path in paths:
        with Image.open(out / image_copy_path(path)) as copy:
            assert copy.mode == "L" and copy.size == (16, 16) and copy.format == "PNG"
    assert f"16 x 16 grayscale PNG copy of each of the {len(paths)} images" in (out / "README.md").read_text()
    assert f"image copies        {len(paths)} PNG, 16 x 16 grayscale, in images/" in format_cxr_summary(summary)

    wanted = [paths[1], paths[0], paths[1]]  # any order, repeats allowed
    copies = read_cxr_images(out, wanted, 16, show_progress=False)
    assert copies.dtype == np.uint8 and copies.shape == (3, 16, 16)
    np.testing.assert_array_equal(copies, np.stack([_resized(cxr / path, 16) for path in wanted]))
    assert copies.std() > 0
    other_size = read_cxr_images(out, wanted, 12, show_progress=False)  # no copies of 12 px: the originals
    np.testing.assert_array_equal(other_size, np.stack([_resized(cxr / path, 12) for path in wanted]))

    shutil.rmtree(cxr)
    np.testing.assert_array_equal(read_cxr_images(out, wanted, 16, show_progress=False), copies)
    with pytest.raises(FileNotFoundError, match="original images are gone"):
        read_cxr_images(out, wanted, 12, show_progress=False)


def test_no_image_copies_by_default_and_bad_sizes_write_nothing(cohort, tmp_path: Path, capsys) -> None:  # noqa: F811
    cxr, mimic = cohort
    _add_events(mimic)
    out = tmp_path / "triplets"
    assert prepare_cxr(cxr, mimic, out, _options(), show_progress=False)["image_copies"] is None
    assert not (out / "images").exists() and "Images are not included" in (out / "README.md").read_text()
    np.testing.assert_array_equal(read_cxr_images(out, ["files/p10/p10000001/s502/b-ap.jpg"], 8, show_progress=False),
                                  np.full((1, 8, 8), 128, dtype=np.uint8))
    for size in (15, 1025, 64.0, True, "64"):
        with pytest.raises(ValueError, match="--image-size must be an integer from 16 to 1024"):
            prepare_cxr(cxr, mimic, tmp_path / "bad", _options(), show_progress=False, image_size=size)
    assert main(["prepare-cxr", "--mimic-dir", str(mimic), "--cxr-dir", str(cxr), "--out", str(tmp_path / "bad"),
                 "--image-size", "big"]) == 2
    assert "--image-size: invalid int value" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_embedding_options_are_checked_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """The checks that need no model run in the data layer, faiss is checked when the embedder is built."""
    with pytest.raises(ValueError, match="--retrieval-k must be at least 1"):
        EventEmbeddingOptions("minilm", retrieval=True, retrieval_k=0)
    with pytest.raises(ValueError, match="needs options.embedder"):
        EventEmbedder(EventEmbeddingOptions())
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ValueError, match="--retrieval needs faiss"):
        _embedder(retrieval=True)
    _embedder()  # no retrieval, no faiss needed


def test_the_old_embedding_keywords_point_to_the_embedder() -> None:
    """CXRDatasetOptions still takes its former embedding keywords; asking for embeddings there says where they went."""
    CXRDatasetOptions(embedder=None, batch_size=256, retrieval=False, retrieval_k=4, retrieval_weight=0.5)
    for kwargs in ({"embedder": "minilm"}, {"retrieval": True}, {"knowledge": "k.txt"}):
        with pytest.raises(ValueError, match="EventEmbedder"):
            CXRDatasetOptions(**kwargs)


def test_retrieval_over_a_knowledge_list(cohort, tmp_path: Path) -> None:  # noqa: F811
    cxr, mimic = cohort
    _add_events(mimic)
    knowledge = tmp_path / "knowledge.txt"
    knowledge.write_text("# loop diuretics\nFurosemide treats fluid overload\nLow pO2 means hypoxaemia\n")
    dataset, summary = build_cxr_dataset(cxr, mimic, _options(), show_progress=False,
                                         embed_events=_embedder(retrieval=True, knowledge=str(knowledge)))
    assert summary["embeddings"]["retrieval"] == {"source": str(knowledge), "corpus": 2, "k": 4, "weight": 0.5}
    vectors = np.asarray(dataset["train"][1]["event_embeddings"], dtype=np.float32)
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)


def test_missing_cxr_table_leaves_no_output(cohort, tmp_path: Path, capsys) -> None:  # noqa: F811
    cxr, mimic = cohort
    (cxr / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    out = tmp_path / "triplets"
    assert main(["prepare-cxr", "--mimic-dir", str(mimic), "--cxr-dir", str(cxr), "--out", str(out), "-q"]) == 2
    assert "required MIMIC-CXR-JPG table 'chexpert' not found" in capsys.readouterr().err
    assert not out.exists()


def test_prepare_cxr_on_the_demo_cohort(tmp_path: Path, capsys) -> None:
    """The synthetic cohort through both commands: its label changes come with the events that explain them."""
    from ehr_diffusers.data.cxr.demo import SMALL_SUBJECTS

    demo, out = tmp_path / "demo", tmp_path / "triplets"
    assert main(["demo-cxr-data", "--subjects", str(SMALL_SUBJECTS), "--seed", "1", "--out", str(demo), "-q"]) == 0
    assert main(["prepare-cxr", "--cxr-dir", str(demo / "mimic-cxr-jpg"), "--mimic-dir", str(demo / "mimic-iv"),
                 "--out", str(out), "-q", "--retrieval", "--image-size", "32"]) == 0, capsys.readouterr().err
    assert "(from the synthetic demo cohort)" in capsys.readouterr().out
    summary = json.loads((out / "cxr_summary.json").read_text())
    assert summary["images_missing"] == summary["images_unreadable"] == 0 and summary["triplets"] > 20
    assert "Synthetic data." in (out / "README.md").read_text()
    rows = [row for split in load_from_disk(str(out)).values() for row in split]
    # every image of every split's triplets has its copy
    named = sorted({row[column] for row in rows for column in ("previous_image", "target_image")})
    assert len({row["subject_id"] for row in rows}) > 1 and summary["image_copies"]["count"] == len(named)
    assert all((out / image_copy_path(path)).is_file() for path in named)
    np.testing.assert_array_equal(read_cxr_images(out, named[:3], 32, show_progress=False),
                                  np.stack([_resized(demo / "mimic-cxr-jpg" / path, 32) for path in named[:3]]))
    changed = [row for row in rows if row["previous_chexpert"] != row["target_chexpert"]]
    assert changed and all(row["event_texts"] for row in changed)
    assert all(np.asarray(row["event_embeddings"]).shape == (len(row["event_texts"]), 384) for row in rows)


def _tiny_modernbert(folder: Path) -> Path:
    """A random 2-layer ModernBERT with a word-level tokenizer, saved as a plain transformers folder (no
    sentence-transformers files), as BioClinical ModernBERT is on the Hub."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for word in "prescriptions drug furosemide dose_val_rx 40 dose_unit_rx mg route iv labevents label po2 value 62 " \
                "valueuom mm hg flag abnormal ,".split():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = ModernBertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, pad_token_id=0, cls_token_id=2, sep_token_id=3,
                              bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    ModernBertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_a_plain_modernbert_folder_embeds_events_mean_pooled(cohort, tmp_path: Path) -> None:  # noqa: F811
    """The reproduction's encoder kind (a plain ModernBERT, mean pooled) goes through the same loading code."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    cxr, mimic = cohort
    _add_events(mimic)
    folder = _tiny_modernbert(tmp_path / "modernbert")
    dataset, summary = build_cxr_dataset(cxr, mimic, _options(), show_progress=False,
                                         embed_events=_embedder(str(folder)))
    assert summary["embeddings"]["dim"] == 32 and summary["embeddings"]["pooling"] == "mean"
    text = pl.select(event_content(pl.lit(dataset["train"][0]["event_texts"][0]))).item()
    tokens = AutoTokenizer.from_pretrained(folder)([text], return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(folder)(input_ids=tokens["input_ids"],
                                                   attention_mask=tokens["attention_mask"]).last_hidden_state
    expected = torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)[0].numpy()
    np.testing.assert_allclose(np.asarray(dataset["train"][0]["event_embeddings"][0], dtype=np.float32), expected,
                               atol=2e-3)
