import gzip
import json

import numpy as np
import polars as pl
import pytest
from datasets import load_from_disk

from conftest import ADMISSIONS, DIAGNOSES, PATIENTS, write_tiny_mimic
from ehr_diffusers.data.ehr.cohort import CohortOptions, build_cohort, prepare
from ehr_diffusers.data.ehr.schema import EHRSchema
from ehr_diffusers.data.mimic import MimicFormatError, MimicIVReader
from ehr_diffusers.io import OutputExistsError


def _rows(cohort) -> dict[int, dict]:
    rows = {}
    for split in cohort.dataset.values():
        rows.update({row["subject_id"]: row for row in split})
    return rows


def test_records_follow_mimic_tables(tiny_mimic):
    cohort = build_cohort(tiny_mimic, CohortOptions(holdout_fraction=0.3), show_progress=False)
    rows = _rows(cohort)
    first = rows[10000001]
    assert first["sex"] == "F" and first["death"] is True and first["num_admissions"] == 2
    assert first["age"] == 62  # 60 + (2152 - 2150)
    assert first["marital_status"] == "WIDOWED"  # the latest value
    assert first["race"] == "WHITE"  # UNKNOWN on the latest admission does not hide an earlier answer
    assert first["icd10_categories"] == ["E11", "I10", "I50", "N17"]  # 36570 (no map) yields nothing
    assert rows[10000003]["age"] == 91  # top-coded
    assert rows[10000004]["race"] == "MISSING" and rows[10000004]["marital_status"] == "MISSING"
    assert rows[10000004]["icd10_categories"] == [] and rows[10000004]["num_admissions"] == 0
    assert rows[10000006]["race"] == "UNKNOWN"
    summary = cohort.summary
    assert summary["patients"] == 10 and summary["admissions"] == 9 and summary["diagnosis_rows"] == 16
    assert summary["icd9_unmapped_rows"] == 1
    assert summary["icd9_unmapped_by_reason"] == {"no_map": {"codes": 1, "rows": 1}}
    schema = cohort.schema
    for row in rows.values():
        assert ([schema.codes[i] for i in row["code_indices"]]
                == [c for c in row["icd10_categories"] if c in schema.codes])


def test_split_is_disjoint_by_subject_and_reproducible(tiny_mimic):
    a = build_cohort(tiny_mimic, CohortOptions(holdout_fraction=0.3, seed=1), show_progress=False)
    b = build_cohort(tiny_mimic, CohortOptions(holdout_fraction=0.3, seed=1), show_progress=False)
    train, holdout = set(a.dataset["train"]["subject_id"]), set(a.dataset["holdout"]["subject_id"])
    assert not train & holdout and len(train | holdout) == 10 and len(holdout) == 3
    assert holdout == set(b.dataset["holdout"]["subject_id"])
    other = {frozenset(build_cohort(tiny_mimic, CohortOptions(holdout_fraction=0.3, seed=s), show_progress=False)
                       .dataset["holdout"]["subject_id"]) for s in range(2, 8)}
    assert len(other) > 1, "the seed changes the split"


def test_split_ignores_row_order(tmp_path):
    lines = PATIENTS.strip().splitlines()
    shuffled = "\n".join([lines[0]] + lines[1:][::-1]) + "\n"
    a = build_cohort(write_tiny_mimic(tmp_path / "a"), show_progress=False)
    b = build_cohort(write_tiny_mimic(tmp_path / "b", patients=shuffled), show_progress=False)
    assert a.dataset["holdout"]["subject_id"] == b.dataset["holdout"]["subject_id"]
    assert a.schema.to_dict() == b.schema.to_dict()


def test_vocabulary_from_train_and_options(tiny_mimic):
    cohort = build_cohort(tiny_mimic, CohortOptions(holdout_fraction=0.3, min_code_count=2), show_progress=False)
    train_codes = [c for row in cohort.dataset["train"]["icd10_categories"] for c in row]
    assert cohort.schema.codes == sorted(c for c in set(train_codes) if train_codes.count(c) >= 2)
    without = build_cohort(tiny_mimic, CohortOptions(include_no_admission=False), show_progress=False)
    assert without.summary["patients"] == 8 and without.summary["patients_without_admission"] == 0


def test_prepare_writes_dataset_schema_and_card(tiny_mimic, tmp_path):
    out = tmp_path / "prepared"
    summary = prepare(tiny_mimic, out, CohortOptions(holdout_fraction=0.3), show_progress=False)
    dataset = load_from_disk(str(out))
    assert set(dataset) == {"train", "holdout"}
    assert dataset["train"].features["code_indices"].feature.dtype == "int32"
    schema = EHRSchema.load(out)
    vectors = schema.encode(dataset["train"][:])
    assert vectors.shape == (summary["splits"]["train"], schema.dim)
    card = (out / "README.md").read_text()
    assert "holdout fraction 0.3" in card and "vocabulary" in card and "first_scenario" in card
    assert json.loads((out / "cohort_summary.json").read_text())["patients"] == 10
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare(tiny_mimic, out, show_progress=False)
    prepare(tiny_mimic, out, overwrite=True, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mimic-iv", "prepared"], "no temporary folders left"


def test_reader_accepts_gzip_and_parquet(tmp_path, tiny_mimic):
    hosp = tiny_mimic / "hosp"
    for name in ("patients", "admissions"):
        text = (hosp / f"{name}.csv").read_bytes()
        (hosp / f"{name}.csv").unlink()
        with gzip.open(hosp / f"{name}.csv.gz", "wb") as handle:
            handle.write(text)
    pl.read_csv(hosp / "diagnoses_icd.csv",
                schema_overrides={"icd_code": pl.String}).write_parquet(hosp / "diagnoses_icd.parquet")
    (hosp / "diagnoses_icd.csv").unlink()
    reader = MimicIVReader(tiny_mimic)
    assert reader.path("patients").name == "patients.csv.gz"
    assert reader.read("diagnoses_icd")["icd_code"].to_list()[:2] == ["25000", "4019"]
    cohort = build_cohort(tiny_mimic, show_progress=False)
    assert cohort.summary["patients"] == 10


# ---------------------------------------------------------------- bad input: one clear error, no partial output
def _fails(tmp_path, match, **tables):
    root = write_tiny_mimic(tmp_path / "bad", **tables)
    out = tmp_path / "out"
    with pytest.raises((MimicFormatError, ValueError), match=match):
        prepare(root, out, show_progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_missing_file(tmp_path):
    root = write_tiny_mimic(tmp_path / "bad")
    (root / "hosp" / "diagnoses_icd.csv").unlink()
    with pytest.raises(MimicFormatError, match=r"diagnoses_icd\.csv\.gz: required MIMIC-IV table"):
        prepare(root, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_column(tmp_path):
    _fails(tmp_path, r"admissions\.csv: missing required column\(s\) race",
           admissions=ADMISSIONS.replace(",race,", ",skin,"))


def test_wrong_type(tmp_path):
    _fails(tmp_path, r"patients\.csv: a value has the wrong type.*anchor_age",
           patients=PATIENTS.replace("10000002,M,45", "10000002,M,forty-five"))


def test_unknown_icd_version(tmp_path):
    _fails(tmp_path, r"diagnoses_icd\.csv: row 6: column icd_version has unknown value\(s\) 11",
           diagnoses_icd=DIAGNOSES.replace("I10,10\n", "I10,11\n", 1))


def test_unknown_gender(tmp_path):
    _fails(tmp_path, r"patients\.csv: row 2: column gender has unknown value",
           patients=PATIENTS.replace(",M,45,", ",X,45,"))


def test_empty_cohort(tmp_path):
    _fails(tmp_path, "empty cohort", patients=PATIENTS.splitlines()[0] + "\n",
           admissions=ADMISSIONS.splitlines()[0] + "\n", diagnoses_icd=DIAGNOSES.splitlines()[0] + "\n")


def test_bad_options():
    with pytest.raises(ValueError, match="--holdout-fraction"):
        CohortOptions(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="--min-code-count"):
        CohortOptions(min_code_count=0)


def test_mimic_v1_ethnicity_column_is_read_as_race(tmp_path):
    root = write_tiny_mimic(tmp_path / "v1", admissions=ADMISSIONS.replace(",race,", ",ethnicity,"))
    assert _rows(build_cohort(root, show_progress=False))[10000002]["race"] == "BLACK"


def test_encode_matches_dataset_density(tiny_mimic):
    cohort = build_cohort(tiny_mimic, show_progress=False)
    vectors = cohort.schema.encode(cohort.dataset["train"][:])
    codes = vectors[:, cohort.schema.slices["icd10_categories"]]
    assert codes.sum() == sum(len(r) for r in cohort.dataset["train"]["code_indices"])
    assert np.isin(codes, [0.0, 1.0]).all()


def test_overwrite_never_replaces_the_input_or_foreign_folders(tiny_mimic, tmp_path):
    with pytest.raises(OutputExistsError, match="would replace the input"):
        prepare(tiny_mimic, tiny_mimic, overwrite=True, show_progress=False)
    with pytest.raises(OutputExistsError, match="would replace the input"):
        prepare(tiny_mimic, tiny_mimic.parent, overwrite=True, show_progress=False)
    assert (tiny_mimic / "hosp" / "patients.csv").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not written by ehr-diffusers"):
        prepare(tiny_mimic, foreign, overwrite=True, show_progress=False)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_a_failure_while_writing_keeps_the_earlier_output(tiny_mimic, tmp_path, monkeypatch):
    import ehr_diffusers.hub.cards

    out = tmp_path / "prepared"
    prepare(tiny_mimic, out, show_progress=False)
    before = sorted(p.name for p in out.iterdir())

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ehr_diffusers.hub.cards, "render_dataset_card", broken)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_mimic, out, overwrite=True, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mimic-iv", "prepared"]


def test_duplicate_subject_ids(tmp_path):
    _fails(tmp_path, r"patients\.csv: row 11: column subject_id must be unique, repeated value\(s\) \[10000002\]",
           patients=PATIENTS + "10000002,M,45,2160,2017 - 2019,\n")


def test_empty_required_value(tmp_path):
    _fails(tmp_path, r"patients\.csv: row 2: column anchor_age is empty \(1 empty value",
           patients=PATIENTS.replace(",M,45,", ",M,,"))


def test_wrong_type_in_a_column_the_records_do_not_use(tmp_path):
    _fails(tmp_path, r"admissions\.csv: a value has the wrong type.*dischtime",
           admissions=ADMISSIONS.replace("2161-05-06 10:00:00", "tomorrow"))


def test_unknown_admission_vocabulary(tmp_path):
    _fails(tmp_path, r"admissions\.csv: row 1: column marital_status has unknown value\(s\) 'ENGAGED'",
           admissions=ADMISSIONS.replace("MARRIED,WHITE", "ENGAGED,WHITE", 1))


def test_empty_vocabulary_is_an_error_naming_the_option(tiny_mimic, tmp_path):
    with pytest.raises(ValueError, match="--min-code-count 100"):
        prepare(tiny_mimic, tmp_path / "out", CohortOptions(min_code_count=100), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_raw_race_categories_come_from_train_only(tiny_mimic):
    cohort = build_cohort(tiny_mimic, CohortOptions(holdout_fraction=0.3, race_grouping="raw"), show_progress=False)
    train_races = set(cohort.dataset["train"]["race"])
    categories = cohort.schema["race"].categories
    assert set(categories) == train_races | {"OTHER", "MISSING"}
    assert set(cohort.dataset["holdout"]["race"]) <= set(categories)
    assert cohort.summary["holdout_race_unseen_in_train"] == 3  # ASIAN - CHINESE, PUERTO RICAN, RUSSIAN: holdout only
    cohort.schema.encode(cohort.dataset["holdout"][:])


def test_typed_parquet_tables_read_like_csv(tiny_mimic, tmp_path):
    csv_cohort = build_cohort(tiny_mimic, show_progress=False)
    hosp = tiny_mimic / "hosp"
    admissions = pl.read_csv(hosp / "admissions.csv", try_parse_dates=True)
    assert admissions.schema["admittime"] == pl.Datetime("us")  # a typed table, as a parquet export holds it
    admissions.write_parquet(hosp / "admissions.parquet")
    pl.read_csv(hosp / "patients.csv", try_parse_dates=True).write_parquet(hosp / "patients.parquet")
    (hosp / "admissions.csv").unlink()
    (hosp / "patients.csv").unlink()
    parquet_cohort = build_cohort(tiny_mimic, show_progress=False)
    for split in ("train", "holdout"):
        assert parquet_cohort.dataset[split].to_dict() == csv_cohort.dataset[split].to_dict()


@pytest.mark.parametrize("format_type", ["python", "numpy", "torch", "arrow"])
def test_schema_encodes_every_datasets_format(tiny_mimic, format_type):
    cohort = build_cohort(tiny_mimic, show_progress=False)
    train = cohort.dataset["train"]
    expected = cohort.schema.encode(train[:])
    assert expected[:, cohort.schema.slices["icd10_categories"]].sum() > 0
    batch = train.with_format(None if format_type == "python" else format_type)[:]
    np.testing.assert_array_equal(cohort.schema.encode(batch), expected)
    strings_only = train.remove_columns("code_indices").with_format(None if format_type == "python" else format_type)[:]
    np.testing.assert_array_equal(cohort.schema.encode(strings_only), expected)
