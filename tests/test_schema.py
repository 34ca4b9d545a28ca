import json

import numpy as np
import polars as pl
import pytest

from ehr_diffusers.data.ehr.cohort import COARSE_RACE_CATEGORIES, MARITAL_CATEGORIES
from ehr_diffusers.data.ehr.schema import MISSING, EHRSchema


def _records() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sex": ["F", "M", "F", "M"],
            "age": [18, 91, 50, 40],
            "death": [True, False, False, True],
            "num_admissions": [0, 238, 3, 1],
            "marital_status": [MISSING, "MARRIED", "WIDOWED", "SINGLE"],
            "race": [MISSING, "WHITE", "BLACK", "UNKNOWN"],
            "icd10_categories": [[], ["E11", "I10"], ["I50"], ["I10", "N17", "ZZZ"]],
        }
    )


def _schema(train: pl.DataFrame | None = None) -> EHRSchema:
    return EHRSchema.fit(
        train if train is not None else _records(),
        codes=["E11", "I10", "I50", "N17"],
        marital_categories=MARITAL_CATEGORIES,
        race_categories=COARSE_RACE_CATEGORIES,
    )


def test_round_trip_and_scaling_constants_come_from_data():
    schema = _schema()
    assert schema["age"].minimum == 18 and schema["age"].maximum == 91
    assert schema["num_admissions"].maximum == 238
    vectors = schema.encode(_records())
    assert vectors.shape == (4, schema.dim) and vectors.dtype == np.float32
    records = schema.decode(vectors)
    expected = _records().to_dicts()
    for got, want in zip(records, expected):
        want["icd10_categories"] = [c for c in want["icd10_categories"] if c in schema.codes]
        assert got == want


def test_sex_means_female_in_the_vector_and_the_record():
    schema = _schema()
    vectors = schema.encode(_records())
    sex = vectors[:, schema.slices["sex"]][:, 0]
    assert sex.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert [r["sex"] for r in schema.decode(vectors)] == ["F", "M", "F", "M"]


def test_missing_is_an_explicit_category_not_the_first_race():
    schema = _schema()
    vectors = schema.encode(_records())
    race = vectors[0, schema.slices["race"]]
    assert race[COARSE_RACE_CATEGORIES.index(MISSING)] == 1.0 and race.sum() == 1.0
    assert race[0] == 0.0


def test_code_indices_and_code_strings_encode_the_same():
    schema = _schema()
    by_strings = schema.encode(_records())
    indices = [[schema.codes.index(c) for c in row if c in schema.codes] for row in _records()["icd10_categories"]]
    by_indices = schema.encode(_records().drop("icd10_categories").with_columns(pl.Series("code_indices", indices)))
    np.testing.assert_array_equal(by_strings, by_indices)


def test_schema_does_not_depend_on_row_order():
    shuffled = _records().sample(fraction=1.0, shuffle=True, seed=3)
    assert _schema(shuffled).to_dict() == _schema().to_dict()
    with pytest.raises(ValueError, match="sorted"):
        EHRSchema.fit(_records(), codes=["I10", "E11"], marital_categories=MARITAL_CATEGORIES,
                      race_categories=COARSE_RACE_CATEGORIES)


def test_decode_logits_clips_rounds_and_thresholds():
    schema = _schema()
    logits = np.zeros((2, schema.dim), dtype=np.float32)
    logits[:, schema.slices["age"]] = [[1.7], [-0.4]]  # outside [0, 1]: clipped to the data range
    logits[:, schema.slices["num_admissions"]] = [[-2.0], [0.3]]
    logits[0, schema.slices["icd10_categories"]] = [3.0, -3.0, 0.2, -0.2]
    logits[1, schema.slices["race"].start + 7] = 5.0
    first, second = schema.decode(logits, from_logits=True)
    assert first["age"] == 91 and second["age"] == 18
    assert first["num_admissions"] == 0 and second["num_admissions"] == round(np.expm1(0.3 * np.log1p(238)))
    assert first["icd10_categories"] == ["E11", "I50"]
    assert second["race"] == COARSE_RACE_CATEGORIES[7]
    per_code = schema.decode(logits, from_logits=True, code_threshold=np.array([0.99, 0.5, 0.5, 0.4]))
    assert per_code[0]["icd10_categories"] == ["I50", "N17"]


def test_save_load_and_bad_input(tmp_path):
    schema = _schema()
    schema.save(tmp_path)
    loaded = EHRSchema.load(tmp_path)
    assert loaded.to_dict() == schema.to_dict() and loaded.dim == schema.dim
    assert json.loads((tmp_path / "schema.json").read_text())["groups"][0]["categories"] == ["M", "F"]
    with pytest.raises(ValueError, match="column race"):
        schema.encode(_records().with_columns(pl.lit("MARTIAN").alias("race")))
    with pytest.raises(ValueError, match="lack column"):
        schema.encode(_records().drop("sex"))
    with pytest.raises(ValueError, match="shape"):
        schema.decode(np.zeros((2, 3)))
    with pytest.raises(FileNotFoundError, match="schema.json"):
        EHRSchema.load(tmp_path / "nowhere")


def test_encode_accepts_decoded_records_batches_and_empty_codes():
    schema = _schema()
    vectors = schema.encode(_records())
    np.testing.assert_array_equal(schema.encode(schema.decode(vectors)), vectors)
    no_codes = _records().with_columns(pl.Series("icd10_categories", [[], [], [], []], dtype=pl.List(pl.String)))
    assert schema.encode(no_codes)[:, schema.slices["icd10_categories"]].sum() == 0
    assert schema.encode([{**row, "icd10_categories": []} for row in _records().to_dicts()]).shape == (4, schema.dim)
    as_numpy = {name: np.array(values, dtype=object) if name == "icd10_categories" else np.array(values)
                for name, values in _records().to_dict(as_series=False).items()}
    np.testing.assert_array_equal(schema.encode(as_numpy), vectors)
    as_ints = _records().with_columns(pl.col("death").cast(pl.Int64))
    np.testing.assert_array_equal(schema.encode(as_ints), vectors)


def test_decode_refuses_non_finite_values():
    schema = _schema()
    vectors = schema.encode(_records())
    vectors[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        schema.decode(vectors)


def test_decode_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    schema = _schema()
    vectors = schema.encode(_records())
    tensor = torch.from_numpy(vectors).to(torch.bfloat16).requires_grad_()
    assert schema.decode(tensor) == schema.decode(vectors)
