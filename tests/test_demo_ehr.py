"""The synthetic MIMIC-IV demo cohort: readable by the MIMIC-IV reader, reproducible, and clinically plausible."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from ehr_diffusers.data.ehr import demo as demo_ehr
from ehr_diffusers.data.ehr.demo import CONCEPTS, checked_concepts, write_demo_mimic
from ehr_diffusers.data.ehr.icd import GemMapper, icd9_code_titles, icd10_code_titles
from ehr_diffusers.data.mimic import MimicIVReader
from ehr_diffusers.io import OutputExistsError

TABLES = ("patients", "admissions", "diagnoses_icd", "d_icd_diagnoses")
HEADERS = {
    "patients": "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
    "admissions": "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,"
    "admission_location,discharge_location,insurance,language,marital_status,race,edregtime,edouttime,"
    "hospital_expire_flag",
    "diagnoses_icd": "subject_id,hadm_id,seq_num,icd_code,icd_version",
    "d_icd_diagnoses": "icd_code,icd_version,long_title",
}


def _read(root: Path) -> dict[str, pl.DataFrame]:
    reader = MimicIVReader(root)
    return {table: reader.read(table) for table in TABLES}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "mimic-iv-demo"
    write_demo_mimic(root, n_patients=400, seed=0, show_progress=False)
    return root


@pytest.fixture(scope="module")
def large_root(tmp_path_factory) -> Path:
    """Enough patients for statistical checks (prevalence ranks, mortality by age, sex-specific codes)."""
    root = tmp_path_factory.mktemp("demo") / "mimic-iv-demo"
    write_demo_mimic(root, n_patients=4000, seed=1, show_progress=False)
    return root


@pytest.fixture(scope="module")
def large(large_root) -> dict[str, pl.DataFrame]:
    return _read(large_root)


def _with_age(tables: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Diagnoses with the patient's gender and age at the admission, as the cohort build computes it."""
    ages = tables["admissions"].join(tables["patients"], on="subject_id").select(
        "hadm_id", "gender", (pl.col("anchor_age") + pl.col("admittime").dt.year() - pl.col("anchor_year")).alias("age")
    )
    return tables["diagnoses_icd"].join(ages, on="hadm_id")


def test_output_passes_the_mimic_reader_with_mimic_layout(small):
    tables = _read(small)
    assert tables["patients"].height == 400
    for table in TABLES:
        with gzip.open(small / "hosp" / f"{table}.csv.gz", "rt") as handle:
            assert handle.readline().strip() == HEADERS[table]
    admissions = tables["admissions"]
    assert set(admissions["admission_type"]) <= set(demo_ehr.ADMISSION_TYPES)
    assert admissions["admission_type"].mode().to_list() == ["EW EMER."]
    assert set(admissions["marital_status"].drop_nulls()) <= {"DIVORCED", "MARRIED", "SINGLE", "WIDOWED"}
    assert admissions["marital_status"].null_count() > 0
    assert tables["patients"]["subject_id"].is_unique().all() and admissions["hadm_id"].is_unique().all()
    assert tables["patients"]["subject_id"].cast(pl.String).str.len_chars().unique().to_list() == [8]
    assert admissions["hadm_id"].cast(pl.String).str.len_chars().unique().to_list() == [8]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_demo_mimic(tmp_path / name, n_patients=300, seed=seed, show_progress=False)
    for table in TABLES:
        path = Path("hosp") / f"{table}.csv.gz"
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    diagnoses = Path("hosp/diagnoses_icd.csv.gz")
    assert (tmp_path / "a" / diagnoses).read_bytes() != (tmp_path / "c" / diagnoses).read_bytes()


def test_sex_and_age_specific_codes_only_where_they_belong(large):
    rows = _with_age(large)
    code, v9, v10 = pl.col("icd_code"), pl.col("icd_version") == 9, pl.col("icd_version") == 10
    category, number = code.str.slice(0, 3), code.str.slice(0, 3).cast(pl.Int32, strict=False)
    pregnancy = (v10 & code.str.starts_with("O")) | (v9 & number.is_between(630, 679))
    prostate = (v10 & category.is_in(["N40", "N41", "N42", "C61"])) | (
        v9 & (number.is_between(600, 602) | (number == 185))
    )
    female_categories = [f"N{i}" for i in range(70, 99)] + [f"C{i}" for i in range(51, 59)]
    female_genital = (v10 & category.is_in(female_categories)) | (
        v9 & (number.is_between(614, 629) | number.is_between(179, 184))
    )
    perinatal = (v10 & code.str.starts_with("P")) | (v9 & number.is_between(760, 779))

    pregnant = rows.filter(pregnancy)
    assert pregnant.height > 0 and set(pregnant["gender"]) == {"F"}
    assert pregnant["age"].min() >= 18 and pregnant["age"].max() <= 45
    prostatic = rows.filter(prostate)
    assert prostatic.height > 0 and set(prostatic["gender"]) == {"M"}
    assert set(rows.filter(female_genital)["gender"]) == {"F"}
    assert rows.filter(perinatal).height == 0
    dementia = rows.filter(code.is_in(["2900", "F0390", "3310", "G309"]))
    assert dementia.height > 0 and dementia["age"].min() >= 55


def test_icd9_before_icd10_within_each_patient(large):
    versions = large["diagnoses_icd"].join(large["admissions"], on=["subject_id", "hadm_id"])
    assert set(versions["icd_version"]) == {9, 10}
    per_admission = versions.group_by("hadm_id").agg(pl.col("icd_version").n_unique())
    assert per_admission["icd_version"].max() == 1
    bounds = versions.group_by("subject_id").agg(
        pl.col("admittime").filter(pl.col("icd_version") == 9).max().alias("last9"),
        pl.col("admittime").filter(pl.col("icd_version") == 10).min().alias("first10"),
    ).drop_nulls()
    assert bounds.height > 0
    assert (bounds["last9"] < bounds["first10"]).all()
    # The oldest anchor year group is coded mostly in ICD-9, the newest only in ICD-10.
    by_group = versions.join(large["patients"], on="subject_id").group_by("anchor_year_group").agg(
        (pl.col("icd_version") == 9).mean().alias("icd9_share")
    )
    shares = dict(by_group.iter_rows())
    assert shares["2008 - 2010"] > 0.9 and shares["2020 - 2022"] == 0.0


def test_admissions_and_diagnoses_are_consistent(small):
    tables = _read(small)
    patients, admissions, diagnoses = tables["patients"], tables["admissions"], tables["diagnoses_icd"]
    without = patients.join(admissions, on="subject_id", how="anti")
    assert 0.05 < without.height / patients.height < 0.35
    assert without["dod"].null_count() == without.height
    assert diagnoses.join(admissions, on=["subject_id", "hadm_id"], how="anti").height == 0
    assert admissions.join(patients, on="subject_id", how="anti").height == 0
    assert diagnoses.select("hadm_id", "icd_code", "icd_version").is_duplicated().sum() == 0
    seq = diagnoses.group_by("hadm_id").agg(
        pl.col("seq_num").min().alias("low"), pl.col("seq_num").max().alias("high"), pl.len()
    )
    assert (seq["low"] == 1).all() and (seq["high"] == seq["len"]).all()
    assert 7 < diagnoses.height / admissions.height < 15


def test_codes_are_official_and_described(small):
    tables = _read(small)
    titles = {9: icd9_code_titles(), 10: icd10_code_titles()}
    used = tables["diagnoses_icd"].select("icd_code", "icd_version").unique()
    assert all(code in titles[version] for code, version in used.iter_rows())
    described = tables["d_icd_diagnoses"]
    assert used.join(described, on=["icd_code", "icd_version"], how="anti").height == 0
    assert all(title == titles[version][code] for code, version, title in described.iter_rows())


def test_curated_concepts_use_consistent_official_codes():
    mapper = GemMapper()
    assert checked_concepts() == CONCEPTS
    for concept in CONCEPTS:
        assert concept.icd10[:3] in mapper.categories(concept.icd9), concept.name
    assert {"4019": "I10", "25000": "E119", "4280": "I509", "41401": "I2510"}.items() <= {
        concept.icd9: concept.icd10 for concept in CONCEPTS
    }.items()


def test_prevalence_rank_order_and_heavy_tail(large):
    patients_with_admission = large["admissions"]["subject_id"].n_unique()
    names = {code: concept.name for concept in CONCEPTS for code in (concept.icd9, concept.icd10)}
    per_patient = (
        large["diagnoses_icd"]
        .with_columns(pl.col("icd_code").replace_strict(names, default=pl.col("icd_code")).alias("concept"))
        .unique(["subject_id", "concept"])
        .group_by("concept")
        .len()
        .sort("len", "concept", descending=[True, False])
    )
    share = {name: count / patients_with_admission for name, count in per_patient.iter_rows()}
    assert per_patient["concept"][0] == "essential hypertension"
    assert 0.3 < share["essential hypertension"] < 0.46
    assert share["essential hypertension"] > share["coronary atherosclerosis"] > share["aspiration pneumonitis"]
    assert share["atrial fibrillation"] > share["septicemia"] and share["heart failure"] > share["COPD"]
    # A heavy tail: hundreds of codes held by a handful of patients beside the common ones.
    assert per_patient.height > 500 and (per_patient["len"] <= 5).sum() > 100


def test_comorbidity_clusters_co_occur(large):
    by_patient = large["diagnoses_icd"].group_by("subject_id").agg(pl.col("icd_code"))

    def share(condition: pl.Expr, given: pl.Expr | None = None) -> float:
        frame = by_patient if given is None else by_patient.filter(given)
        return frame.select(condition.mean()).item()

    def has(*codes: str) -> pl.Expr:
        return pl.col("icd_code").list.eval(pl.element().is_in(list(codes))).list.any()

    diabetes, hypertension = has("25000", "E119"), has("4019", "I10")
    sepsis, kidney = has("0389", "A419"), has("5849", "N179")
    assert share(hypertension, diabetes) > share(hypertension) + 0.1
    assert share(kidney, sepsis) > share(kidney) + 0.1


def test_times_and_in_hospital_deaths_are_coherent(large, large_root):
    admissions, patients = large["admissions"], large["patients"]
    assert (admissions["dischtime"] > admissions["admittime"]).all()
    raw = pl.read_csv(large_root / "hosp/admissions.csv.gz", try_parse_dates=True)
    ed = raw.filter(pl.col("edregtime").is_not_null())
    assert ed.height > 0 and (ed["edregtime"] < ed["edouttime"]).all() and (ed["edouttime"] < ed["dischtime"]).all()
    assert set(ed["admission_location"]) == {"EMERGENCY ROOM"}
    died = admissions.filter(pl.col("hospital_expire_flag") == 1)
    assert died.height > 0 and (died["deathtime"] == died["dischtime"]).all()
    survived = admissions.filter(pl.col("hospital_expire_flag") == 0)
    assert survived["deathtime"].null_count() == survived.height
    dates = died.join(patients, on="subject_id").select(pl.col("deathtime").dt.date() == pl.col("dod"))
    assert dates.to_series().all()
    last = admissions.group_by("subject_id").agg(pl.col("dischtime").max())
    deaths = patients.join(last, on="subject_id").filter(pl.col("dod").is_not_null())
    assert (deaths["dod"] >= deaths["dischtime"].dt.date()).all()
    assert ((deaths["dod"] - deaths["dischtime"].dt.date()).dt.total_days() <= 366).all()


def test_mortality_rises_with_age(large):
    admitted = large["patients"].join(large["admissions"].select("subject_id").unique(), on="subject_id")
    death_share = admitted["dod"].is_not_null().mean()
    assert 0.08 < death_share < 0.25
    ordered = admitted.sort("anchor_age", "subject_id")
    third = ordered.height // 3
    youngest, oldest = ordered.head(third), ordered.tail(third)
    assert oldest["dod"].is_not_null().mean() > youngest["dod"].is_not_null().mean() + 0.05


def test_existing_output_is_left_untouched(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        write_demo_mimic(out, n_patients=300, show_progress=False)
    assert [path.name for path in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputExistsError, match="not written by ehr-diffusers"):
        write_demo_mimic(out, n_patients=300, overwrite=True, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine", "--overwrite never replaces a folder that is not ours"
    (out / "keep.txt").unlink()
    write_demo_mimic(out, n_patients=300, show_progress=False, overwrite=True)
    (out / "keep.txt").write_text("added later")
    summary = write_demo_mimic(out, n_patients=300, overwrite=True, show_progress=False)
    assert not (out / "keep.txt").exists() and summary["patients"] == 300


def test_a_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(frame, path):
        raise OSError("disk full")

    monkeypatch.setattr(demo_ehr, "write_csv_gz", broken)
    with pytest.raises(OSError, match="disk full"):
        write_demo_mimic(tmp_path / "demo", n_patients=300, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_readme_and_summary(small):
    readme = (small / "README.md").read_text()
    assert "SYNTHETIC" in readme and "seed 0" in readme and "400 patients" in readme
    assert "ehr-diffusers" in readme and "Mortality" in readme
    tables = _read(small)
    summary = write_demo_mimic(small.parent / "again", n_patients=400, seed=0, show_progress=False)
    assert summary["patients"] == 400
    assert summary["admissions"] == tables["admissions"].height
    assert summary["diagnosis_rows"] == tables["diagnoses_icd"].height == summary["icd9_rows"] + summary["icd10_rows"]
    assert summary["deaths"] == tables["patients"]["dod"].is_not_null().sum()
    assert summary["patients_without_admission"] > 0


@pytest.mark.parametrize(
    ("arguments", "name"),
    [({"n_patients": 0}, "n_patients"), ({"n_patients": 2.5}, "n_patients"), ({"n_patients": True}, "n_patients"),
     ({"n_patients": "10"}, "n_patients"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")],
)
def test_invalid_arguments_are_named(tmp_path, arguments, name):
    with pytest.raises(ValueError, match=name):
        write_demo_mimic(tmp_path / "demo", **{"n_patients": 10, **arguments}, show_progress=False)
    assert not (tmp_path / "demo").exists()


def test_icd9_codes_map_to_one_category_or_are_counted_as_unmapped(large):
    mapper = GemMapper()
    codes = large["diagnoses_icd"].filter(pl.col("icd_version") == 9)["icd_code"].unique().to_list()
    statuses = {code: mapper.status(code) for code in codes}
    assert set(statuses.values()) == {"mapped", "no_map"}
    assert all(len(mapper.categories(code)) == 1 for code, status in statuses.items() if status == "mapped")
