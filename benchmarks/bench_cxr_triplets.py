"""Triplet building at MIMIC-CXR-JPG size: metadata of 377,110 images of 65,000 patients (227,835 studies) and
their MIMIC-IV admissions, written as PhysioNet ships them (csv.gz), read and paired by ``build_triplets``.

    OMP_NUM_THREADS=2 python benchmarks/bench_cxr_triplets.py [--images 377110] [--subjects 65000]

The metadata are random but shaped like the real release: heavy-tailed studies per patient, 1.66 images per study
(a frontal view and often a lateral), studies clustered inside admissions (ICU stays with daily films) or between
them (outpatients). Image files are not written; their check is timed separately on real JPEG files (``--check``
images), as it is one open per image used.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from ehr_diffusers.data.cxr.triplets import CHEXPERT_LABELS, TripletOptions, build_triplets

EPOCH = datetime(2150, 1, 1)


def make_release(root: Path, n_images: int, n_subjects: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_studies = int(round(n_images / 1.655))
    # studies per subject: heavy-tailed, at least one
    weights = rng.pareto(2.0, n_subjects) + 1
    studies_per_subject = 1 + rng.multinomial(n_studies - n_subjects, weights / weights.sum())
    subjects = 10_000_000 + np.sort(rng.choice(9_000_000, n_subjects, replace=False))
    study_subject = np.repeat(subjects, studies_per_subject)
    # admissions: 1 + Poisson per subject, each 1-30 days long, starting over ten years
    admissions_per_subject = 1 + rng.poisson(1.5, n_subjects)
    adm_subject = np.repeat(subjects, admissions_per_subject)
    adm_start = rng.uniform(0, 3650 * 24, len(adm_subject))  # hours since EPOCH
    adm_length = np.exp(rng.normal(np.log(5 * 24), 0.8, len(adm_subject)))
    # each study: inside a random admission of its subject (75%, clustered by day) or anywhere (outpatient)
    first_admission = np.r_[0, np.cumsum(admissions_per_subject)[:-1]]
    subject_index = np.repeat(np.arange(n_subjects), studies_per_subject)
    pick = first_admission[subject_index] + rng.integers(0, admissions_per_subject[subject_index])
    inside = rng.random(n_studies) < 0.75
    study_hours = np.where(inside, adm_start[pick] + rng.random(n_studies) * adm_length[pick],
                           rng.uniform(0, 3650 * 24, n_studies))
    study_ids = 50_000_000 + rng.choice(9_000_000, n_studies, replace=False)
    # images: one frontal per study (AP in admissions, mostly PA outside), a lateral for 65.5% of studies
    lateral = rng.random(n_studies) < (n_images - n_studies) / n_studies
    frontal_view = np.where(inside, np.where(rng.random(n_studies) < 0.8, "AP", "PA"), "PA")
    image_study = np.r_[np.arange(n_studies), np.flatnonzero(lateral)]
    views = np.r_[frontal_view, np.full(lateral.sum(), "LATERAL")]
    moments = pl.Series([EPOCH]).dt.cast_time_unit("us")[0]
    times = pl.Series(study_hours[image_study] * 3600e6).cast(pl.Int64).cast(pl.Duration("us")) + moments
    metadata = pl.DataFrame({
        "dicom_id": [f"{i:08x}-{j:08x}" for i, j in zip(rng.integers(0, 2**32, len(image_study)),
                                                          rng.integers(0, 2**32, len(image_study)))],
        "subject_id": study_subject[image_study], "study_id": study_ids[image_study], "ViewPosition": views,
        "StudyDate": times.dt.strftime("%Y%m%d").cast(pl.Int64),
        "StudyTime": times.dt.strftime("%H%M%S.%3f").cast(pl.Float64),
    })
    metadata.write_csv(root / "cxr" / "mimic-cxr-2.0.0-metadata.csv.gz", compression="gzip")
    labels = rng.choice(np.array([1.0, 0.0, -1.0, np.nan]), size=(n_studies, len(CHEXPERT_LABELS)),
                        p=[0.15, 0.1, 0.05, 0.7])
    pl.DataFrame({"subject_id": study_subject, "study_id": study_ids,
                  **{label: labels[:, k] for k, label in enumerate(CHEXPERT_LABELS)}}).fill_nan(None).write_csv(
        root / "cxr" / "mimic-cxr-2.0.0-chexpert.csv.gz", compression="gzip")
    hosp = root / "mimic" / "hosp"
    pl.DataFrame({"subject_id": subjects, "gender": rng.choice(["F", "M"], n_subjects),
                  "anchor_age": rng.integers(18, 91, n_subjects), "anchor_year": 2155,
                  "anchor_year_group": "2017 - 2019", "dod": None}).write_csv(hosp / "patients.csv.gz",
                                                                              compression="gzip")
    start = pl.Series(adm_start * 3600e6).cast(pl.Int64).cast(pl.Duration("us")) + moments
    end = pl.Series((adm_start + adm_length) * 3600e6).cast(pl.Int64).cast(pl.Duration("us")) + moments
    pl.DataFrame({"subject_id": adm_subject, "hadm_id": 20_000_000 + np.arange(len(adm_subject)),
                  "admittime": start.dt.strftime("%Y-%m-%d %H:%M:%S"),
                  "dischtime": end.dt.strftime("%Y-%m-%d %H:%M:%S"),
                  "deathtime": None, "admission_type": "URGENT", "marital_status": "MARRIED", "race": "WHITE",
                  "hospital_expire_flag": 0}).write_csv(hosp / "admissions.csv.gz", compression="gzip")


def time_image_check(count: int) -> float:
    """Seconds per image to open and verify ``count`` real 256x256 JPEG files."""
    from PIL import Image

    from ehr_diffusers.data.cxr.triplets import _unusable_images

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        paths = []
        for index in range(count):
            path = Path(folder) / f"{index}.jpg"
            Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(path, quality=90)
            paths.append(path.name)
        started = time.perf_counter()
        _unusable_images(Path(folder), paths, show_progress=False)
        return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=377_110)
    parser.add_argument("--subjects", type=int, default=65_000)
    parser.add_argument("--check", type=int, default=2_000, help="real JPEG files for the image-check timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "cxr").mkdir()
        (root / "mimic" / "hosp").mkdir(parents=True)
        started = time.perf_counter()
        make_release(root, args.images, args.subjects, args.seed)
        made = time.perf_counter() - started
        started = time.perf_counter()
        _, summary = build_triplets(root / "cxr", root / "mimic", TripletOptions(check_images=False),
                                    show_progress=False)
        built = time.perf_counter() - started
    per_image = time_image_check(args.check)
    used = 2 * summary["pairs"]  # an upper bound on distinct images to check
    print(f"release: {summary['images']:,} images, {summary['studies']:,} studies, {summary['subjects']:,} subjects "
          f"(written in {made:.1f} s)")
    print(f"{'step':<52}{'value':>14}")
    print(f"{'frontal images / in admissions / of adults':<52}"
          f"{summary['frontal_images']:>7,} / {summary['frontal_images_in_admissions']:,} / "
          f"{summary['frontal_images_of_adults']:,}")
    print(f"{'triplets (train / validation / test)':<52}{summary['triplets']:>14,}  "
          f"({' / '.join(f'{n:,}' for n in summary['splits'].values())})")
    print(f"{'build_triplets, image check off (goal < 60 s)':<52}{built:>12.1f} s")
    print(f"{'image check per image (PIL open + verify)':<52}{per_image * 1e3:>11.2f} ms")
    print(f"{'image check for the images of these triplets (<=)':<52}{per_image * used:>12.1f} s")


if __name__ == "__main__":
    main()
