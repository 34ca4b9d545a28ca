"""The benchmark's peers (benchmarks/peers.py): schema vectors <-> SDV's table, and the GaussianCopula peer (skipped
without SDV, which only the ``bench`` extra installs)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("peers")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def schema() -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", categories=["M", "F"]),
        ColumnGroup("age", "continuous", minimum=18.0, maximum=90.0),
        ColumnGroup("death", "binary", categories=[False, True]),
        ColumnGroup("num_admissions", "count", minimum=0.0, maximum=10.0),
        ColumnGroup("marital_status", "one_hot", categories=["MARRIED", "MISSING", "SINGLE"]),
        ColumnGroup("race", "one_hot", categories=["MISSING", "WHITE"]),
        ColumnGroup("icd10_categories", "multi_hot", categories=["A01", "E11", "I10", "I50", "Z99"]),
    ])


def make_vectors(schema: EHRSchema, n: int, seed: int = 0) -> np.ndarray:
    """Records with whole-number ages (as MIMIC-IV's) and I10 following E11 nine times in ten; Z99 never occurs."""
    rng = np.random.default_rng(seed)
    e11 = rng.random(n) < 0.4
    i10 = np.where(rng.random(n) < 0.9, e11, ~e11)
    codes = [[code for code, hit in zip(["A01", "E11", "I10", "I50"], row) if hit]
             for row in zip(rng.random(n) < 0.2, e11, i10, rng.random(n) < 0.05)]
    return schema.encode({
        "sex": rng.choice(["M", "F"], size=n).tolist(),
        "age": rng.integers(18, 91, size=n).tolist(),
        "death": (rng.random(n) < 0.2).tolist(),
        "num_admissions": rng.integers(0, 11, size=n).tolist(),
        "marital_status": rng.choice(["MARRIED", "MISSING", "SINGLE"], size=n).tolist(),
        "race": rng.choice(["MISSING", "WHITE"], size=n, p=[0.3, 0.7]).tolist(),
        "icd10_categories": codes,
    })


def test_records_frame_round_trip(peers, schema):
    vectors = make_vectors(schema, 50)
    frame = peers.records_frame(vectors, schema)
    assert list(frame.columns) == ["sex", "age", "death", "num_admissions", "marital_status", "race",
                                   "A01", "E11", "I10", "I50", "Z99"]
    assert set(frame["sex"]) <= {"M", "F"} and set(frame["death"]) <= {False, True}
    assert frame["age"].between(18, 90).all() and frame["Z99"].eq(0).all()
    np.testing.assert_array_equal(peers.frame_vectors(frame, schema), vectors)


def test_gaussian_copula_peer(peers, schema):
    pytest.importorskip("sdv")
    train = make_vectors(schema, 300)
    model = peers.GaussianCopulaPeer().fit(train, schema)
    records = model.sample(400, seed=1)
    np.testing.assert_array_equal(records, model.sample(400, seed=1))
    assert not np.array_equal(records, model.sample(400, seed=2))
    assert records.shape == (400, schema.dim) and records.dtype == np.float32
    for group in ("marital_status", "race"):
        assert (records[:, schema.slices[group]].sum(axis=1) == 1).all()
    codes = records[:, schema.slices["icd10_categories"]]
    assert set(np.unique(codes)) <= {0.0, 1.0} and codes[:, 4].sum() == 0
    real_codes = train[:, schema.slices["icd10_categories"]]
    np.testing.assert_allclose(codes.mean(axis=0), real_codes.mean(axis=0), atol=0.08)
    # E11 -> I10 (phi 0.8 in train) survives, weakened by SDV's jitter of 0/1 columns; independent marginals give 0
    assert np.corrcoef(codes[:, 1], codes[:, 2])[0, 1] > 0.2
    ages = schema.decode_column("age", records[:, schema.slices["age"].start])
    assert ages.min() >= 18 and ages.max() <= 90


def test_gaussian_copula_peer_needs_fit(peers):
    with pytest.raises(ValueError, match="fit"):
        peers.GaussianCopulaPeer().sample(3)
