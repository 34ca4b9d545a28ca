"""MIMIC-CXR-JPG reading and EHRXDiff's pair rules on hand-made metadata: views, windows (exactly 48 h), studies,
admissions, ages, splits by patient, absent and unreadable images."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ehr_diffusers.data.cxr.triplets import CHEXPERT_LABELS, MimicCXRReader, TripletOptions, build_triplets
from ehr_diffusers.data.mimic import MimicFormatError

T0 = datetime(2150, 3, 1, 8, 0, 0)


def _stamp(moment: datetime) -> tuple[int, float]:
    """StudyDate and StudyTime as MIMIC-CXR writes them (HHMMSS.fff without leading zeros)."""
    return int(moment.strftime("%Y%m%d")), float(moment.strftime("%H%M%S")) + moment.microsecond / 1e6


def _write_mimic(root: Path, patients: list[tuple], admissions: list[tuple]) -> Path:
    hosp = root / "mimic" / "hosp"
    hosp.mkdir(parents=True)
    pl.DataFrame(patients, schema=["subject_id", "gender", "anchor_age", "anchor_year"], orient="row").with_columns(
        pl.lit("2017 - 2019").alias("anchor_year_group"), pl.lit(None, dtype=pl.String).alias("dod")
    ).write_csv(hosp / "patients.csv.gz", compression="gzip")
    rows = [(s, h, a.strftime("%Y-%m-%d %H:%M:%S"), d.strftime("%Y-%m-%d %H:%M:%S")) for s, h, a, d in admissions]
    pl.DataFrame(rows, schema=["subject_id", "hadm_id", "admittime", "dischtime"], orient="row").with_columns(
        pl.lit(None, dtype=pl.String).alias("deathtime"), pl.lit("URGENT").alias("admission_type"),
        pl.lit("MARRIED").alias("marital_status"), pl.lit("WHITE").alias("race"),
        pl.lit(0).alias("hospital_expire_flag"),
    ).write_csv(hosp / "admissions.csv.gz", compression="gzip")
    return root / "mimic"


def _write_cxr(root: Path, images: list[tuple], labels: dict[int, list] | None = None, write_images: bool = True,
               split: dict[int, str] | None = None) -> Path:
    """images: (dicom_id, subject_id, study_id, view, time)."""
    cxr = root / "cxr"
    cxr.mkdir(parents=True)
    rows = [(d, s, st, v, *_stamp(t)) for d, s, st, v, t in images]
    pl.DataFrame(rows, schema=["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"],
                 orient="row").write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", compression="gzip")
    studies = sorted({(s, st) for _, s, st, _, _ in images})
    labels = labels or {}
    chexpert = {"subject_id": [s for s, _ in studies], "study_id": [st for _, st in studies]}
    for index, label in enumerate(CHEXPERT_LABELS):
        chexpert[label] = [labels.get(st, [None] * 14)[index] for _, st in studies]
    pl.DataFrame(chexpert, schema_overrides={label: pl.Float64 for label in CHEXPERT_LABELS}).write_csv(
        cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", compression="gzip")
    split = split or {}
    pl.DataFrame([(d, st, s, split.get(s, "train")) for d, s, st, _, _ in images],
                 schema=["dicom_id", "study_id", "subject_id", "split"], orient="row").write_csv(
        cxr / "mimic-cxr-2.0.0-split.csv.gz", compression="gzip")
    if write_images:
        for dicom, subject, study, _, _ in images:
            path = cxr / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path)
    return cxr


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[Path, Path]:
    """Subject 10000001 (adult): admission 1 with studies at 0 h (PA + LATERAL), 10 h (AP), 48 h exactly after the
    first (PA) and one outside any admission; subject 10000002 is 16 at admission; subject 10000003 has two studies
    10 h apart but in different admissions."""
    a1 = (10000001, 201, T0 - timedelta(hours=2), T0 + timedelta(days=5))
    a2 = (10000002, 202, T0 - timedelta(hours=2), T0 + timedelta(days=5))
    a3 = (10000003, 203, T0 - timedelta(days=3), T0 + timedelta(hours=1))
    a4 = (10000003, 204, T0 + timedelta(hours=5), T0 + timedelta(days=2))
    mimic = _write_mimic(tmp_path, [(10000001, "F", 60, 2150), (10000002, "M", 16, 2150), (10000003, "M", 70, 2150)],
                         [a1, a2, a3, a4])
    images = [
        ("a-pa", 10000001, 501, "PA", T0), ("a-lat", 10000001, 501, "LATERAL", T0),
        ("b-ap", 10000001, 502, "AP", T0 + timedelta(hours=10)),
        ("c-pa", 10000001, 503, "PA", T0 + timedelta(hours=48)),
        ("d-pa", 10000001, 504, "PA", T0 + timedelta(days=30)),  # after discharge: no admission
        ("e-pa", 10000002, 505, "PA", T0), ("f-pa", 10000002, 506, "PA", T0 + timedelta(hours=3)),
        ("g-pa", 10000003, 507, "PA", T0), ("h-pa", 10000003, 508, "PA", T0 + timedelta(hours=10)),
    ]
    positive, negative = [1.0] + [0.0] * 13, [0.0] * 14
    cxr = _write_cxr(tmp_path, images, labels={501: positive, 502: negative, 503: positive})
    return cxr, mimic


def _all(splits: dict[str, pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(list(splits.values())).sort("triplet_id")


def test_pair_rules_on_hand_made_metadata(cohort) -> None:
    cxr, mimic = cohort
    splits, summary = build_triplets(cxr, mimic, TripletOptions(validation_fraction=0.0, test_fraction=0.0),
                                     show_progress=False)
    pairs = _all(splits)
    # a-pa -> b-ap (10 h) and b-ap -> c-pa (38 h); a-pa -> c-pa is exactly 48 h: not less than the window
    assert sorted(zip(pairs["previous_dicom_id"], pairs["target_dicom_id"])) == [("a-pa", "b-ap"), ("b-ap", "c-pa")]
    assert summary["frontal_images"] == 8 and summary["frontal_images_outside_admissions"] == 1
    assert summary["frontal_images_of_adults"] == 5  # 10000002 is 16
    first = pairs.row(0, named=True)
    assert first["hadm_id"] == 201 and first["age"] == 60 and first["gender"] == "F"
    assert first["hours_between"] == pytest.approx(10.0)
    assert first["window_start"] == T0 and first["window_end"] == T0 + timedelta(hours=10)
    assert first["previous_image"] == "files/p10/p10000001/s501/a-pa.jpg"
    assert first["previous_chexpert"] == [1] + [0] * 13 and first["target_chexpert"] == [0] * 14
    assert summary["label_change_rates"]["Atelectasis"] == 1.0 and summary["label_change_rates"]["Edema"] == 0.0
    assert pairs["triplet_id"].to_list() == [0, 1]


def test_window_is_configurable_and_strict(cohort) -> None:
    cxr, mimic = cohort
    wide = _all(build_triplets(cxr, mimic, TripletOptions(window_hours=48.001, validation_fraction=0,
                                                          test_fraction=0), show_progress=False)[0])
    assert ("a-pa", "c-pa") in set(zip(wide["previous_dicom_id"], wide["target_dicom_id"]))
    narrow = _all(build_triplets(cxr, mimic, TripletOptions(window_hours=10, validation_fraction=0,
                                                            test_fraction=0), show_progress=False)[0])
    assert narrow.height == 0  # 10 h is not less than 10 h; 38 h is out


def test_same_study_and_other_admission_make_no_pair(tmp_path: Path) -> None:
    mimic = _write_mimic(tmp_path, [(10000009, "F", 50, 2150)],
                         [(10000009, 301, T0 - timedelta(hours=1), T0 + timedelta(hours=2)),
                          (10000009, 302, T0 + timedelta(hours=3), T0 + timedelta(days=1))])
    images = [("x1", 10000009, 601, "PA", T0), ("x2", 10000009, 601, "AP", T0),  # one study, two frontal images
              ("y1", 10000009, 602, "PA", T0 + timedelta(hours=4))]           # next admission
    cxr = _write_cxr(tmp_path, images)
    splits, summary = build_triplets(cxr, mimic, show_progress=False)
    assert summary["triplets"] == 0 and summary["pairs"] == 0


def test_every_frontal_image_of_each_study_pairs(tmp_path: Path) -> None:
    mimic = _write_mimic(tmp_path, [(10000009, "F", 50, 2150)],
                         [(10000009, 301, T0 - timedelta(hours=1), T0 + timedelta(days=2))])
    images = [("x1", 10000009, 601, "PA", T0), ("x2", 10000009, 601, "AP", T0),
              ("y1", 10000009, 602, "AP", T0 + timedelta(hours=4)),
              ("y2", 10000009, 602, "PA", T0 + timedelta(hours=4))]
    splits, _ = build_triplets(_write_cxr(tmp_path, images), mimic, TripletOptions(validation_fraction=0,
                                                                                   test_fraction=0),
                               show_progress=False)
    assert _all(splits).height == 4


def test_absent_and_unreadable_images_are_dropped_and_counted(cohort, caplog) -> None:
    cxr, mimic = cohort
    (cxr / "files/p10/p10000001/s502/b-ap.jpg").write_bytes(b"not a jpeg")
    (cxr / "files/p10/p10000001/s503/c-pa.jpg").unlink()
    with caplog.at_level("WARNING"):
        splits, summary = build_triplets(cxr, mimic, show_progress=False)
    assert summary["images_missing"] == 1 and summary["images_unreadable"] == 1
    assert summary["pairs"] == 2 and summary["triplets"] == 0
    assert "absent" in caplog.text and "unreadable" in caplog.text and "c-pa.jpg" in caplog.text
    unchecked = build_triplets(cxr, mimic, TripletOptions(check_images=False), show_progress=False)[1]
    assert unchecked["triplets"] == 2


def test_splits_are_by_patient_seeded_or_mimic(tmp_path: Path) -> None:
    subjects = list(range(10000100, 10000140))
    mimic = _write_mimic(tmp_path, [(s, "M", 50, 2150) for s in subjects],
                         [(s, s, T0 - timedelta(hours=1), T0 + timedelta(days=2)) for s in subjects])
    images = [(f"{s}-{k}", s, s * 10 + k, "PA", T0 + timedelta(hours=6 * k)) for s in subjects for k in range(3)]
    assignment = {s: ("test" if i < 4 else "validate" if i < 8 else "train") for i, s in enumerate(subjects)}
    cxr = _write_cxr(tmp_path, images, write_images=False, split=assignment)
    options = TripletOptions(validation_fraction=0.25, test_fraction=0.25, seed=3, check_images=False)
    first, summary = build_triplets(cxr, mimic, options, show_progress=False)
    again, _ = build_triplets(cxr, mimic, options, show_progress=False)
    assert all(first[name].equals(again[name]) for name in first)
    by_split = {name: set(frame["subject_id"].to_list()) for name, frame in first.items()}
    assert {name: len(ids) for name, ids in by_split.items()} == {"train": 20, "validation": 10, "test": 10}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["validation"])
    assert summary["splits"] == {"train": 60, "validation": 30, "test": 30}  # 3 pairs per patient
    mimic_split, _ = build_triplets(cxr, mimic, TripletOptions(split="mimic", check_images=False),
                                    show_progress=False)
    assert set(mimic_split["test"]["subject_id"].to_list()) == set(subjects[:4])
    assert set(mimic_split["validation"]["subject_id"].to_list()) == set(subjects[4:8])


def test_study_time_without_leading_zeros_and_bad_tables(tmp_path: Path) -> None:
    cxr = tmp_path / "cxr"
    cxr.mkdir()
    frame = pl.DataFrame({"dicom_id": ["a"], "subject_id": [10000001], "study_id": [1], "ViewPosition": ["PA"],
                          "StudyDate": [21500301], "StudyTime": [4530.5]})
    frame.write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv")
    assert MimicCXRReader(cxr).metadata()["study_time"][0] == datetime(2150, 3, 1, 0, 45, 30, 500000)
    frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("StudyTime")).write_csv(
        cxr / "mimic-cxr-2.0.0-metadata.csv")
    assert MimicCXRReader(cxr).metadata()["study_time"][0] is None  # not midnight: it cannot be ordered
    frame.drop("StudyTime").write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv")
    with pytest.raises(MimicFormatError, match=r"metadata.csv: missing required column\(s\) StudyTime"):
        MimicCXRReader(cxr).metadata()
    frame.with_columns(pl.lit("x").alias("subject_id")).write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv")
    with pytest.raises(MimicFormatError, match="column subject_id has value"):
        MimicCXRReader(cxr).metadata()
    with pytest.raises(MimicFormatError, match="required MIMIC-CXR-JPG table 'chexpert' not found"):
        MimicCXRReader(cxr).chexpert()
    with pytest.raises(ValueError, match="--window-hours must be positive"):
        TripletOptions(window_hours=0)


def test_nested_admission_takes_its_images_and_the_long_one_keeps_the_rest(tmp_path: Path) -> None:
    """A 10-day admission with a 1-day admission inside it (day 2 to 3): images of day 5 and 5.5 belong to the long
    one, which started before, not to nothing."""
    mimic = _write_mimic(tmp_path, [(10000009, "F", 50, 2150)],
                         [(10000009, 401, T0, T0 + timedelta(days=10)),
                          (10000009, 402, T0 + timedelta(days=2), T0 + timedelta(days=3))])
    images = [("n1", 10000009, 701, "PA", T0 + timedelta(days=2, hours=1)),
              ("n2", 10000009, 702, "PA", T0 + timedelta(days=2, hours=6)),
              ("l1", 10000009, 703, "PA", T0 + timedelta(days=5)),
              ("l2", 10000009, 704, "PA", T0 + timedelta(days=5, hours=12))]
    splits, summary = build_triplets(_write_cxr(tmp_path, images), mimic, TripletOptions(validation_fraction=0,
                                                                                         test_fraction=0),
                                     show_progress=False)
    pairs = _all(splits)
    assert summary["frontal_images_outside_admissions"] == 0
    assert dict(zip(pairs["target_dicom_id"], pairs["hadm_id"])) == {"n2": 402, "l2": 401}


def test_label_change_rates_count_only_pairs_with_both_studies_labelled(cohort) -> None:
    cxr, mimic = cohort
    chexpert = pl.read_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz").filter(pl.col("study_id") != 503)
    chexpert.write_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", compression="gzip")
    _, summary = build_triplets(cxr, mimic, show_progress=False)
    # b-ap -> c-pa has no labels for c-pa now: only a-pa -> b-ap (Atelectasis 1 -> 0) counts
    assert summary["studies_without_chexpert_labels"] == 1
    assert summary["label_change_rates"]["Atelectasis"] == 1.0 and summary["label_change_rates"]["Edema"] == 0.0


def test_study_time_out_of_range_is_named(tmp_path: Path) -> None:
    cxr = tmp_path / "cxr"
    cxr.mkdir()
    pl.DataFrame({"dicom_id": ["a"], "subject_id": [10000001], "study_id": [1], "ViewPosition": ["PA"],
                  "StudyDate": [21500301], "StudyTime": [246100.0]}).write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv")
    with pytest.raises(MimicFormatError, match="column StudyTime is not HHMMSS.fff in 1 row"):
        MimicCXRReader(cxr).metadata()
