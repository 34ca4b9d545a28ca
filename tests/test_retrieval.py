"""Retrieval augmentation: exact search against brute force, self exclusion, the documented augmentation formula,
a pickle-free save/load round trip, knowledge lists, argument checks, and an event index built with MiniLM."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from ehr_diffusers.text.retrieval import (
    CONFIG_FILE,
    INDEX_FILE,
    TEXTS_FILE,
    RetrievalIndex,
    augment,
    build_event_index,
    load_knowledge,
)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, dim)))


def _index(vectors: np.ndarray, source: str = "test") -> RetrievalIndex:
    return RetrievalIndex.build([f"text {i}" for i in range(len(vectors))], vectors, source=source)


def _brute_top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ corpus.T.astype(np.float64)
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def test_search_matches_brute_force() -> None:
    corpus, queries = _random_unit(50, 8, seed=0), _random_unit(7, 8, seed=1)
    scores, indices = _index(corpus).search(queries, 5)
    expected_scores, expected_indices = _brute_top_k(queries, corpus, 5)
    assert scores.dtype == np.float32 and indices.dtype == np.int64 and scores.shape == indices.shape == (7, 5)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


def test_exclude_self_drops_own_row_and_fills_up() -> None:
    corpus = _random_unit(20, 6, seed=2)
    index = _index(corpus)
    scores, indices = index.search(corpus, 3, exclude_self=True)
    assert not (indices == np.arange(20)[:, None]).any()
    brute_scores = corpus.astype(np.float64) @ corpus.T.astype(np.float64)
    np.fill_diagonal(brute_scores, -np.inf)
    np.testing.assert_array_equal(indices, np.argsort(-brute_scores, axis=1)[:, :3])
    # Without the flag the query finds itself first.
    np.testing.assert_array_equal(index.search(corpus, 1)[1][:, 0], np.arange(20))


def test_exclude_self_skips_every_duplicate_copy() -> None:
    base = _random_unit(6, 5, seed=3)
    corpus = np.concatenate([base, base[:1], base[:1]])  # row 0 stored three times
    scores, indices = _index(corpus).search(base[:1], 5, exclude_self=True)
    assert set(indices[0].tolist()) == {1, 2, 3, 4, 5}
    assert (scores < 1 - 1e-5).all()


def test_fewer_than_k_pads_with_minus_one() -> None:
    corpus = _random_unit(3, 4, seed=4)
    scores, indices = _index(corpus).search(corpus[:1], 5)
    assert (indices[0, :3] >= 0).all() and (indices[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    scores, indices = _index(corpus[:1]).search(corpus[:1], 2, exclude_self=True)
    assert (indices == -1).all() and np.isneginf(scores).all()


def test_augment_weight_zero_is_identity() -> None:
    corpus = _random_unit(30, 8, seed=5)
    events = corpus[:10].copy()
    out = augment(events, _index(corpus), weight=0.0)
    assert out.dtype == np.float32 and out is not events
    np.testing.assert_array_equal(out, events)


def test_augment_weight_one_k_one_is_nearest_other_vector() -> None:
    corpus = _random_unit(30, 8, seed=6)
    out = augment(corpus, _index(corpus), k=1, weight=1.0, exclude_self=True)
    brute = corpus.astype(np.float64) @ corpus.T.astype(np.float64)
    np.fill_diagonal(brute, -np.inf)
    np.testing.assert_allclose(out, corpus[brute.argmax(axis=1)], atol=1e-6)


def test_augment_softmax_weights_hand_computed() -> None:
    # Query e = x; neighbours at cosine 0.8 and 0.6 (its own copy in the corpus is excluded).
    corpus = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.0, 0.8]], dtype=np.float32)
    event = corpus[:1]
    w1 = math.exp(0.8 / 0.1) / (math.exp(0.8 / 0.1) + math.exp(0.6 / 0.1))  # = 1 / (1 + e^-2) = 0.8808
    w2 = 1.0 - w1
    context = w1 * np.array([0.8, 0.6, 0.0]) + w2 * np.array([0.6, 0.0, 0.8])
    mixed = 0.7 * np.array([1.0, 0.0, 0.0]) + 0.3 * context
    out = augment(event, _index(corpus), k=2, weight=0.3, temperature=0.1, exclude_self=True)
    np.testing.assert_allclose(out[0], mixed / np.linalg.norm(mixed), atol=1e-6)


def test_augment_output_unit_norm_float32_shape_and_batching() -> None:
    corpus, events = _random_unit(40, 8, seed=7), _random_unit(13, 8, seed=8).astype(np.float64)
    index = _index(corpus)
    out = augment(events, index, k=4, weight=0.5, exclude_self=False)
    assert out.shape == (13, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(out, events, atol=1e-3)
    batched = augment(events, index, k=4, weight=0.5, exclude_self=False, batch_size=4)
    np.testing.assert_allclose(batched, out, atol=1e-7)
    numpy_scalars = augment(events, index, k=np.int64(4), weight=np.float32(0.5), exclude_self=False)
    np.testing.assert_array_equal(numpy_scalars, out)


def test_augment_without_neighbours_keeps_event() -> None:
    corpus = _random_unit(1, 4, seed=9)
    out = augment(corpus, _index(corpus), k=3, weight=1.0, exclude_self=True)
    np.testing.assert_array_equal(out, corpus)


def test_save_load_round_trip_without_pickle(tmp_path) -> None:
    corpus, queries = _random_unit(25, 8, seed=10), _random_unit(5, 8, seed=11)
    texts = [f"event {i}" for i in range(24)] + ['pO2 "low"\nsecond line, µg/dL']
    index = RetrievalIndex.build(texts, corpus, source="events:train")
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, INDEX_FILE, TEXTS_FILE])
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"
    assert (tmp_path / INDEX_FILE).read_bytes()[:4] == b"IxFI"  # faiss' own IndexFlatIP format
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (config["dim"], config["count"], config["source"]) == (8, 25, "events:train")

    loaded = RetrievalIndex.load(tmp_path)
    assert loaded.texts == tuple(texts) and loaded.source == "events:train" and len(loaded) == 25
    for exclude_self in (False, True):
        expected, got = index.search(queries, 4, exclude_self), loaded.search(queries, 4, exclude_self)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(loaded.vectors(np.arange(25)), corpus)


@pytest.mark.parametrize(
    ("key", "value", "named"), [("dim", 9, INDEX_FILE), ("count", 26, INDEX_FILE), ("metric", "l2", CONFIG_FILE)]
)
def test_load_mismatched_config_names_the_file(tmp_path, key: str, value: object, named: str) -> None:
    _index(_random_unit(4, 8, seed=12)).save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config[key] = value
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        RetrievalIndex.load(tmp_path)


def test_load_texts_mismatch_and_missing_file(tmp_path) -> None:
    _index(_random_unit(4, 8, seed=13)).save(tmp_path)
    lines = (tmp_path / TEXTS_FILE).read_text().splitlines()
    (tmp_path / TEXTS_FILE).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=TEXTS_FILE):
        RetrievalIndex.load(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=INDEX_FILE):
        RetrievalIndex.load(tmp_path)


def test_load_knowledge_text_and_jsonl(tmp_path) -> None:
    text_file = tmp_path / "knowledge.txt"
    text_file.write_text("# lab reference ranges\n\npO2 normal 75-100 mm Hg\n  lactate above 2 mmol/L  \n# end\n")
    assert load_knowledge(text_file) == ["pO2 normal 75-100 mm Hg", "lactate above 2 mmol/L"]
    jsonl = tmp_path / "knowledge.jsonl"
    jsonl.write_text('{"text": "pO2 normal 75-100 mm Hg", "id": 1}\n\n{"text": "# not a comment here"}\n')
    assert load_knowledge(jsonl) == ["pO2 normal 75-100 mm Hg", "# not a comment here"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n\n{"label": "no text"}\n', r'bad\.jsonl:3: expected an object with a string "text"'),
        ("\n", r"bad\.jsonl: no entries"),
    ],
)
def test_load_knowledge_names_the_bad_line(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_knowledge(path)


def test_load_knowledge_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="--knowledge .*absent.txt: no such file"):
        load_knowledge(tmp_path / "absent.txt")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"k": 0}, "k"),
        ({"k": 2.0}, "k"),
        ({"k": True}, "k"),
        ({"weight": -0.1}, "weight"),
        ({"weight": 1.5}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_augment_rejects_bad_arguments(kwargs: dict, argument: str) -> None:
    corpus = _random_unit(5, 4, seed=14)
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        augment(corpus, _index(corpus), **kwargs)


def test_bad_vectors_and_texts_name_the_argument() -> None:
    corpus = _random_unit(5, 4, seed=15)
    index = _index(corpus)
    with pytest.raises(ValueError, match="queries has dimension 3"):
        index.search(corpus[:, :3], 2)
    with pytest.raises(ValueError, match="queries row 1 has norm"):
        index.search(corpus * np.array([[1.0], [2.0], [1.0], [1.0], [1.0]], dtype=np.float32), 2)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(corpus, -1)
    with pytest.raises(ValueError, match="embeddings has 5 rows but texts has 4"):
        RetrievalIndex.build(["a", "b", "c", "d"], corpus, source="test")
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        RetrievalIndex.build(["a"], corpus[0], source="test")
    with pytest.raises(ValueError, match="texts is empty"):
        RetrievalIndex.build([], np.zeros((0, 4), dtype=np.float32), source="test")
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        RetrievalIndex.build(["a", 2, "c", "d", "e"], corpus, source="test")
    with pytest.raises(ValueError, match="indices must lie in"):
        index.vectors(np.array([5]))


def test_missing_faiss_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install 'ehr-diffusers\[retrieval\]'"):
        _index(_random_unit(2, 4, seed=16))


EVENTS = [
    "labevents, label pO2, value 62, valueuom mm Hg, time -5.5 h",
    "labevents, label Glucose, value 140, valueuom mg/dL, time -3.0 h",
    "labevents, label pO2, value 58, valueuom mm Hg, time -2.0 h",
    "prescriptions, drug Furosemide, dose 40 mg, route IV, time -12.0 h",
    "labevents, label pO2, value 62, valueuom mm Hg, time -5.5 h",
    "chartevents, label Heart Rate, value 112, valueuom bpm, time -1.0 h",
    "labevents, label Glucose, value 140, valueuom mg/dL, time -3.0 h",
    "labevents, label Creatinine, value 1.8, valueuom mg/dL, time -20.0 h",
    "procedureevents, label Chest X-Ray, time -30.0 h",
    "labevents, label pO2, value 71, valueuom mm Hg, time -0.5 h",
]


def test_build_event_index_with_minilm_deduplicates_and_retrieves(monkeypatch) -> None:
    from ehr_diffusers.text.embed import load_embedder

    embedder = load_embedder("minilm")
    calls = []
    encode = embedder.encode

    def counting_encode(texts, **kwargs):
        calls.append(list(texts))
        return encode(texts, **kwargs)

    monkeypatch.setattr(embedder, "encode", counting_encode)
    index = build_event_index(EVENTS, embedder, show_progress=False, source="events:train")
    unique = list(dict.fromkeys(EVENTS))
    assert calls == [unique] and index.texts == tuple(unique) and len(index) == 8 and index.dim == 384

    query = encode(["labevents, label pO2, value 60"]).numpy()
    _, indices = index.search(query, 3)
    assert {index.texts[i] for i in indices[0]} == {text for text in unique if "label pO2" in text}

    # Each event's own text is excluded; augmented vectors stay unit-norm.
    events = encode(unique).numpy()
    _, neighbours = index.search(events, 1, exclude_self=True)
    assert (neighbours[:, 0] != np.arange(len(unique))).all()
    out = augment(events, index, k=2, weight=0.5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
