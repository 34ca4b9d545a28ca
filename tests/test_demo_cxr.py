"""The synthetic chest X-ray cohort: readable by the MIMIC readers, reproducible, every label change explained by
an event written between the two studies, and a phantom whose pixels respond to its findings."""

from __future__ import annotations

import csv
import hashlib
import inspect
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ehr_diffusers.data.cxr import demo as demo_cxr
from ehr_diffusers.data.cxr.demo import SMALL_SUBJECTS, is_demo_cxr, write_demo_cxr
from ehr_diffusers.data.cxr.phantom import PhantomParams, render
from ehr_diffusers.data.cxr.triplets import CHEXPERT_LABELS, MimicCXRReader, TripletOptions, build_triplets
from ehr_diffusers.data.mimic import MimicIVReader
from ehr_diffusers.io import OutputExistsError

N_SUBJECTS = SMALL_SUBJECTS + 4
# The share of pairs without any explaining event must be the generator's stable share within this tolerance
# (about 2.5 binomial standard deviations for the ~90 pairs of the small cohort).
STABLE_TOLERANCE = 0.15

# Which written events explain a change of a finding, read straight from the tables (not from the generator).
FLUIDS = {225158, 225828, 225168}  # NaCl 0.9%, LR, packed red cells
DIURETICS = {"Furosemide", "Bumetanide"}
ANTIBIOTICS = {"Vancomycin", "Piperacillin-Tazobactam", "Ceftriaxone", "Cefepime", "Azithromycin", "Levofloxacin"}
UP = {"effusion": {"fluid"}, "cardiomegaly": {"fluid"}, "edema": {"fluid"}, "consolidation": {"culture"},
      "pneumothorax": {"line", "intubation", "thoracentesis"}, "devices": {"intubation", "line", "chest_tube"}}
DOWN = {"effusion": {"diuretic", "thoracentesis", "chest_tube"}, "cardiomegaly": {"diuretic"},
        "edema": {"diuretic"}, "consolidation": {"antibiotic"}, "pneumothorax": {"chest_tube"},
        "devices": {"extubation"}}
LABEL_FINDINGS = {"Pleural Effusion": ("effusion",), "Cardiomegaly": ("cardiomegaly",), "Edema": ("edema",),
                  "Consolidation": ("consolidation",), "Pneumonia": ("consolidation",),
                  "Pneumothorax": ("pneumothorax",), "Support Devices": ("devices",),
                  "Lung Opacity": ("edema", "consolidation")}
PATHOLOGIES = ("effusion", "cardiomegaly", "edema", "consolidation", "pneumothorax")
RANK = {None: 0, 0.0: 0, -1.0: 1, 1.0: 2}  # absent or not mentioned < uncertain < present


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo-cxr") / "demo"
    summary = write_demo_cxr(out, n_subjects=N_SUBJECTS, seed=0, show_progress=False)
    return out, summary


def _kinds(mimic: Path) -> pl.DataFrame:
    """Every explaining event as (hadm_id, time, kind), read from the written MIMIC-IV tables."""
    def read(module: str, table: str) -> pl.DataFrame:
        return pl.read_csv(mimic / module / f"{table}.csv.gz", try_parse_dates=True)

    inputs, scripts = read("icu", "inputevents"), read("hosp", "prescriptions")
    micro, procedures = read("hosp", "microbiologyevents"), read("icu", "procedureevents")
    parts = [
        inputs.filter(pl.col("itemid").is_in(list(FLUIDS))).select("hadm_id", "starttime", kind=pl.lit("fluid")),
        inputs.filter(pl.col("itemid") == 221794).select("hadm_id", "starttime", kind=pl.lit("diuretic")),
        scripts.filter(pl.col("drug").is_in(list(DIURETICS))).select("hadm_id", "starttime", kind=pl.lit("diuretic")),
        scripts.filter(pl.col("drug").is_in(list(ANTIBIOTICS))).select("hadm_id", "starttime",
                                                                        kind=pl.lit("antibiotic")),
        micro.filter(pl.col("spec_type_desc").is_in(["SPUTUM", "BRONCHOALVEOLAR LAVAGE"])
                     & pl.col("org_name").is_not_null()).select("hadm_id", starttime="charttime",
                                                                 kind=pl.lit("culture")),
        micro.filter(pl.col("spec_type_desc") == "PLEURAL FLUID").select("hadm_id", starttime="charttime",
                                                                          kind=pl.lit("thoracentesis")),
    ]
    for itemid, kind in ((225433, "chest_tube"), (224385, "intubation"), (227194, "extubation"),
                         (224560, "line")):
        parts.append(procedures.filter(pl.col("itemid") == itemid).select("hadm_id", "starttime",
                                                                            kind=pl.lit(kind)))
    return pl.concat(parts).rename({"starttime": "time"})


def _consecutive_pairs(out: Path) -> list[tuple[int, object, object, list, list]]:
    """(hadm_id, earlier time, later time, earlier labels, later labels) of consecutive studies of an admission."""
    reader = MimicCXRReader(out / "mimic-cxr-jpg")
    studies = (reader.metadata().group_by("study_id").agg(pl.col("subject_id").first(), pl.col("study_time").min())
               .join(reader.chexpert().select("study_id", "chexpert"), on="study_id").sort("study_time"))
    admissions = MimicIVReader(out / "mimic-iv").read("admissions").sort("admittime")
    placed = (studies.join_asof(admissions.select("subject_id", "hadm_id", "admittime", "dischtime"),
                                left_on="study_time", right_on="admittime", by="subject_id",
                                check_sortedness=False)
              .filter(pl.col("study_time") <= pl.col("dischtime")).sort("hadm_id", "study_time"))
    pairs = []
    rows = placed.select("hadm_id", "study_time", "chexpert").rows()
    for (hadm, t0, labels0), (hadm1, t1, labels1) in zip(rows[:-1], rows[1:]):
        if hadm == hadm1:
            pairs.append((hadm, t0, t1, labels0, labels1))
    return pairs


def test_reads_back_through_the_mimic_readers(cohort):
    out, summary = cohort
    reader = MimicCXRReader(out / "mimic-cxr-jpg")
    metadata, chexpert, split = reader.metadata(), reader.chexpert(), reader.split()
    assert metadata.height == summary["images"] and chexpert.height == summary["studies"]
    assert set(split["split"]) <= {"train", "validation", "test"}
    assert metadata["subject_id"].is_between(10_000_000, 19_999_999).all()
    assert metadata["study_id"].is_between(50_000_000, 59_999_999).all()
    assert metadata["dicom_id"].str.contains(r"^([0-9a-f]{8}-){4}[0-9a-f]{8}$").all()
    assert set(metadata["view"]) >= {"AP", "PA"} and set(metadata["view"]) & {"LATERAL", "LL"}
    mimic = MimicIVReader(out / "mimic-iv")
    patients, admissions = mimic.read("patients"), mimic.read("admissions")
    assert patients.height == summary["subjects"] == N_SUBJECTS
    assert admissions["hadm_id"].is_between(20_000_000, 29_999_999).all()
    assert set(metadata["subject_id"]) == set(patients["subject_id"])
    for module, table in (("hosp", "labevents"), ("hosp", "prescriptions"), ("hosp", "microbiologyevents"),
                          ("icu", "icustays"), ("icu", "chartevents"), ("icu", "inputevents"),
                          ("icu", "outputevents"), ("icu", "procedureevents"), ("hosp", "d_labitems"),
                          ("icu", "d_items")):
        frame = pl.read_csv(out / "mimic-iv" / module / f"{table}.csv.gz", infer_schema=False)
        assert frame.height > 0, table
        assert set(frame["hadm_id"]) <= set(admissions["hadm_id"].cast(pl.String)) if "hadm_id" in frame.columns \
            else True
    for folder in (out, out / "mimic-cxr-jpg", out / "mimic-iv"):
        assert is_demo_cxr(folder)
    assert not is_demo_cxr(out / "mimic-iv" / "hosp")


def test_builds_triplets_with_every_image_readable(cohort):
    out, _ = cohort
    splits, summary = build_triplets(out / "mimic-cxr-jpg", out / "mimic-iv", TripletOptions(check_images=True),
                                     show_progress=False)
    assert summary["triplets"] > 50
    assert summary["images_missing"] == summary["images_unreadable"] == 0
    assert summary["frontal_images_outside_admissions"] >= 0 and summary["pairs_with_images"] == summary["pairs"]
    first = splits["train"].row(0, named=True)
    with Image.open(out / "mimic-cxr-jpg" / first["target_image"]) as image:
        assert image.size == (256, 256) and image.mode == "L"


def test_every_label_change_is_explained_by_an_event_between_the_studies(cohort):
    out, _ = cohort
    kinds = _kinds(out / "mimic-iv")
    checked = 0
    for hadm, t0, t1, before, after in _consecutive_pairs(out):
        between = set(kinds.filter((pl.col("hadm_id") == hadm) & (pl.col("time") > t0)
                                   & (pl.col("time") < t1))["kind"])
        for index, label in enumerate(CHEXPERT_LABELS):
            old, new = before[index], after[index]
            if RANK[old] == RANK[new]:
                continue
            findings = LABEL_FINDINGS.get(label, PATHOLOGIES)
            rising = RANK[new] > RANK[old]
            if label == "No Finding":  # No Finding appears when findings resolve, and goes when one appears
                rising = not rising
            allowed = set().union(*((UP if rising else DOWN)[finding] for finding in findings))
            assert between & allowed, f"{label} {old} -> {new} in admission {hadm} between {t0} and {t1}: " \
                                      f"events {sorted(between)}"
            checked += 1
    assert checked > 30


def test_share_of_unchanged_pairs(cohort):
    out, summary = cohort
    kinds = _kinds(out / "mimic-iv")
    pairs = _consecutive_pairs(out)
    quiet = 0
    for hadm, t0, t1, before, after in pairs:
        explained = kinds.filter((pl.col("hadm_id") == hadm) & (pl.col("time") > t0) & (pl.col("time") < t1))
        if explained.height == 0:
            quiet += 1
            assert before == after, f"labels change without any event in admission {hadm}"
    assert len(pairs) == summary["consecutive_pairs"]
    assert abs(quiet / len(pairs) - summary["stable_share"]) < STABLE_TOLERANCE
    assert 0.3 < summary["pairs_with_label_change"] < 0.95


def _files(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_whatever_the_worker_count_and_another_seed_differs(cohort, tmp_path, monkeypatch):
    """The fixture rendered its images in this process (too few to start workers); here two worker processes
    render them in chunks of 8: every file is the same."""
    out, _ = cohort
    again = tmp_path / "again"
    monkeypatch.setattr(demo_cxr, "MIN_IMAGES_PER_WORKER", 1)
    monkeypatch.setattr(demo_cxr, "CHUNK_IMAGES", 8)
    write_demo_cxr(again, n_subjects=N_SUBJECTS, seed=0, show_progress=False, workers=2)
    written = _files(out)
    assert sum(name.endswith(".jpg") for name in written) == (
        pl.read_csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz").height)
    assert _files(again) == written
    other = tmp_path / "other"
    write_demo_cxr(other, n_subjects=3, seed=1, show_progress=False)
    assert (other / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz").read_bytes() != \
        (out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()


def test_default_cohort_size_and_workers_on_the_command_line():
    """The default cohort is large enough for a test split of about 100 patients; tests pass small counts."""
    from ehr_diffusers.cli import build_parser

    args = build_parser().parse_args(["demo-cxr-data", "--out", "demo"])
    assert args.subjects == demo_cxr.DEFAULT_SUBJECTS >= 1000
    assert inspect.signature(write_demo_cxr).parameters["n_subjects"].default == demo_cxr.DEFAULT_SUBJECTS
    assert args.workers is None and 1 <= demo_cxr.default_workers() <= 2
    assert build_parser().parse_args(["demo-cxr-data", "--out", "demo", "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo-cxr-data", "--out", "demo", "--workers", "0"])


def test_fallback_without_real_data_files(tmp_path):
    summary = write_demo_cxr(tmp_path / "fallback", n_subjects=3, seed=2, show_progress=False, real_data=False)
    assert summary["statistics_source"] == "fallback" and summary["real_lung_masks"] == 0
    assert MimicIVReader(tmp_path / "fallback" / "mimic-iv").read("patients").height == 3


def test_explaining_items_are_kept_by_the_chest_item_lists():
    folder = Path(demo_cxr.__file__).parent / "items"
    if not folder.is_dir():
        pytest.skip("no packaged chest item lists")

    def column(name: str, key: str) -> set[str]:
        with open(folder / f"{name}.csv", encoding="utf-8") as handle:
            return {row[key].strip().lower() for row in csv.DictReader(line for line in handle
                                                                       if not line.startswith("#"))}

    icu = set().union(*(column(name, "itemid") for name in ("chartevents", "inputevents", "outputevents",
                                                            "procedureevents")))
    assert {str(item) for item in FLUIDS | {221794, 225433, 224385, 227194, 224560}} <= icu
    assert "220621" not in icu and "225797" not in icu  # noise
    patterns = column("prescriptions", "pattern")
    assert all(any(pattern in drug.lower() for pattern in patterns) for drug in DIURETICS | ANTIBIOTICS)
    assert not any(pattern in "heparin pantoprazole acetaminophen" for pattern in patterns)
    specimens = column("microbiologyevents", "spec_type_desc")
    assert {"sputum", "bronchoalveolar lavage", "pleural fluid"} <= specimens
    assert not {"blood culture", "urine"} & specimens
    labs = column("labevents", "itemid")
    assert {"50821", "50818", "50820", "50813", "50889"} <= labs and "50912" not in labs


def test_bad_arguments_name_the_argument_and_leave_nothing(tmp_path):
    out = tmp_path / "bad"
    for kwargs, name in (({"n_subjects": 0}, "n_subjects"), ({"n_subjects": 2.5}, "n_subjects"),
                         ({"seed": -1}, "seed"), ({"real_data": "yes"}, "real_data"), ({"workers": 0}, "workers"),
                         ({"workers": 1.5}, "workers")):
        with pytest.raises(ValueError, match=name):
            write_demo_cxr(out, show_progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods() or sys.platform == "darwin",
    reason="spawned workers do not see the patched render"))])
def test_no_partial_output_when_rendering_fails(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(demo_cxr, "MIN_IMAGES_PER_WORKER", 1)
    monkeypatch.setattr(demo_cxr, "CHUNK_IMAGES", 2)
    calls = []

    def failing(params):
        calls.append(params)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return render(params)

    monkeypatch.setattr(demo_cxr, "render", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_cxr(tmp_path / "partial", n_subjects=2, show_progress=False, workers=workers)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(cohort):
    out, _ = cohort
    with pytest.raises(OutputExistsError):
        write_demo_cxr(out, n_subjects=1, show_progress=False)


# --- the phantom ---

def _mean(image: np.ndarray, rows: slice, columns: slice) -> float:
    return float(image[rows, columns].astype(np.float64).mean())


@pytest.mark.parametrize("lung_mask", [None, 0])
def test_effusion_brightens_the_lower_zone_of_its_side(lung_mask):
    plain = render(PhantomParams(lung_mask=lung_mask, noise_seed=3))
    effusion = render(PhantomParams(lung_mask=lung_mask, effusion_right=1.0, noise_seed=3))
    right_base, left_base = (slice(150, 185), slice(50, 100)), (slice(150, 185), slice(160, 210))
    assert _mean(effusion, *right_base) > _mean(plain, *right_base) + 20  # the patient's right: the image's left
    assert abs(_mean(effusion, *left_base) - _mean(plain, *left_base)) < 3


def test_cardiomegaly_widens_the_heart():
    def heart_width(ctr: float) -> int:
        image = render(PhantomParams(ctr=ctr, noise_seed=4)).astype(np.float64)
        profile = image[135:160].mean(0)
        lung = np.median(profile[60:90])
        return int((profile[60:220] > lung + 0.6 * (profile[128] - lung)).sum())

    assert heart_width(0.62) > heart_width(0.42) + 25


def test_tubes_and_lines_add_bright_lines():
    plain = render(PhantomParams(noise_seed=5)).astype(np.int16)
    for device in ({"endotracheal_tube": True}, {"central_line": True}, {"chest_tube": "left"}):
        with_device = render(PhantomParams(noise_seed=5, **device)).astype(np.int16)
        brighter = (with_device - plain) > 25
        assert 150 < brighter.sum() < 3000, device  # a line, not a patch


def test_pneumothorax_darkens_the_lateral_lung_and_oedema_hazes_both_sides():
    plain = render(PhantomParams(noise_seed=6))
    pneumothorax = render(PhantomParams(pneumothorax=1.0, pneumothorax_side="left", noise_seed=6))
    assert _mean(pneumothorax, slice(60, 110), slice(195, 210)) < _mean(plain, slice(60, 110), slice(195, 210))
    edema = render(PhantomParams(edema=1.0, noise_seed=6))
    for columns in (slice(60, 100), slice(160, 200)):
        assert _mean(edema, slice(80, 130), columns) > _mean(plain, slice(80, 130), columns) + 10


def test_phantom_is_deterministic_and_validates_its_parameters():
    params = PhantomParams(view="AP", edema=0.5, ecg_leads=True, noise_seed=7)
    assert np.array_equal(render(params), render(params))
    assert not np.array_equal(render(params), render(PhantomParams(view="AP", edema=0.5, ecg_leads=True,
                                                                    noise_seed=8)))
    lateral = render(PhantomParams(view="LATERAL", effusion_left=0.6))
    assert lateral.shape == (256, 256) and lateral.dtype == np.uint8
    for kwargs, name in (({"edema": 1.5}, "edema"), ({"view": "OBLIQUE"}, "view"), ({"ctr": 0.1}, "ctr"),
                         ({"chest_tube": "middle"}, "chest_tube"), ({"consolidation_zone": "apex"},
                                                                     "consolidation_zone")):
        with pytest.raises(ValueError, match=name):
            PhantomParams(**kwargs)
