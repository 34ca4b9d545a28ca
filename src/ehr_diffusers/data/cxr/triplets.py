"""MIMIC-CXR-JPG as PhysioNet ships it, and the (previous image, target image) pairs that EHRXDiff trains on.

A MIMIC-CXR-JPG release folder (``mimic-cxr-jpg/2.1.0/``) holds:

* ``mimic-cxr-2.0.0-metadata.csv.gz``: one row per image: ``dicom_id``, ``subject_id``, ``study_id``,
  ``ViewPosition`` (PA, AP, LATERAL, LL, ...), ``StudyDate`` (YYYYMMDD, shifted like MIMIC-IV's dates) and
  ``StudyTime`` (HHMMSS.fff as a number, leading zeros dropped: ``4530.5`` is 00:45:30.5);
* ``mimic-cxr-2.0.0-chexpert.csv.gz``: one row per study: ``subject_id``, ``study_id`` and the 14 CheXpert labels
  (1 positive, 0 negative, -1 uncertain, blank not mentioned);
* ``mimic-cxr-2.0.0-split.csv.gz``: ``dicom_id``, ``study_id``, ``subject_id``, ``split`` (train, validate, test;
  assigned by patient);
* ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``, XX the first two digits of the subject id.

Converted copies as ``.csv`` or ``.parquet`` are read too. The image times share MIMIC-IV's date shift per patient,
so they can be placed inside MIMIC-IV admissions.

Pairs follow EHRXDiff (Kyung et al., CHIL 2025): frontal images only (``ViewPosition`` PA or AP); each image is
placed in the admission of the same patient whose ``[admittime, dischtime]`` holds its study time (of several
such, the one that started last; an image between admissions has none and is dropped); the patient is an adult
at that admission (``anchor_age + year(admittime) - anchor_year >= 18``); for every target image, every frontal
image of an *earlier study* of the *same admission* taken *less than* ``window_hours`` (48) before it is a
candidate previous image, and each candidate makes one pair. Two studies at the same time, or exactly 48 h apart,
make no pair. The events between the two images (``window_start`` = previous image, ``window_end`` = target) are
added by :mod:`~ehr_diffusers.data.cxr.events`.

Splits are by patient, so no patient's images sit on both sides: seeded (``split="seeded"``, fractions of
patients) or MIMIC-CXR's own assignment (``split="mimic"``, its ``validate`` named ``validation``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ...errors import ArgumentError
from ..mimic import MimicFormatError, MimicIVReader, find_table, scan_table

logger = logging.getLogger(__name__)

CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
    "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
FRONTAL_VIEWS = ("PA", "AP")
CXR_TABLES = {
    "metadata": ("mimic-cxr-2.0.0-metadata", ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate",
                                              "StudyTime")),
    "chexpert": ("mimic-cxr-2.0.0-chexpert", ("subject_id", "study_id", *CHEXPERT_LABELS)),
    "split": ("mimic-cxr-2.0.0-split", ("dicom_id", "study_id", "subject_id", "split")),
}
MIMIC_SPLITS = {"train": "train", "validate": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")


class MimicCXRReader:
    """Finds and reads the MIMIC-CXR-JPG tables under a release folder, naming the file and column on any problem."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MimicFormatError(f"{self.root}: MIMIC-CXR-JPG folder not found")

    def path(self, table: str) -> Path:
        """``<root>/<mimic-cxr-2.0.0-table>.csv.gz`` (or ``.csv``, ``.parquet``)."""
        stem = CXR_TABLES[table][0]
        found = find_table((self.root,), stem)
        if found is None:
            raise MimicFormatError(f"{self.root / (stem + '.csv.gz')}: required MIMIC-CXR-JPG table '{table}' "
                                   "not found")
        return found

    def _read(self, table: str) -> tuple[pl.DataFrame, Path]:
        """The table's required columns, unparsed (:meth:`_cast` parses them)."""
        path = self.path(table)
        frame = scan_table(path, CXR_TABLES[table][1])
        try:
            return frame.collect(), path
        except (pl.exceptions.PolarsError, OSError) as error:
            raise MimicFormatError(f"{path}: cannot be read as a table ({error})") from error

    @staticmethod
    def _cast(frame: pl.DataFrame, path: Path, columns: dict[str, pl.DataType]) -> pl.DataFrame:
        """Strict casts, one column at a time, so that the error names the column."""
        for column, dtype in columns.items():
            try:
                frame = frame.with_columns(pl.col(column).cast(pl.String).cast(dtype, strict=True))
            except pl.exceptions.PolarsError:
                bad = frame.filter(pl.col(column).cast(pl.String).cast(dtype, strict=False).is_null()
                                   & pl.col(column).is_not_null())[column].head(3).to_list()
                raise MimicFormatError(f"{path}: column {column} has value(s) that are not {dtype}: {bad}") from None
        return frame

    def metadata(self) -> pl.DataFrame:
        """One row per image: ``dicom_id``, ``subject_id``, ``study_id``, ``view`` and ``study_time`` (Datetime; null
        where ``StudyTime`` is blank, as such an image cannot be ordered)."""
        frame, path = self._read("metadata")
        frame = self._cast(frame, path, {"subject_id": pl.Int64(), "study_id": pl.Int64(), "StudyDate": pl.Int64(),
                                         "StudyTime": pl.Float64()})
        for column in ("dicom_id", "subject_id", "study_id", "StudyDate"):
            empty = frame[column].null_count()
            if empty:
                raise MimicFormatError(f"{path}: column {column} is empty in {empty:,} row(s)")
        duplicated = frame.filter(pl.col("dicom_id").is_duplicated())["dicom_id"]
        if len(duplicated):
            raise MimicFormatError(f"{path}: dicom_id {duplicated[0]!r} is listed more than once")
        date = pl.col("StudyDate").cast(pl.String).str.to_date("%Y%m%d", strict=False)
        seconds = pl.col("StudyTime")
        clock = ((seconds // 10000) * 3600 + (seconds // 100 % 100) * 60 + seconds % 100) * 1e6
        frame = frame.with_columns(
            (date.cast(pl.Datetime("us")) + pl.duration(microseconds=clock.round(0).cast(pl.Int64))).alias("study_time")
        )
        clock_bad = frame.filter((pl.col("StudyTime") >= 240000) | (pl.col("StudyTime") // 100 % 100 >= 60)
                                 | (pl.col("StudyTime") % 100 >= 60) | (pl.col("StudyTime") < 0))
        if clock_bad.height:
            raise MimicFormatError(f"{path}: column StudyTime is not HHMMSS.fff in {clock_bad.height:,} row(s), e.g. "
                                   f"{clock_bad['StudyTime'][0]}")
        bad = frame.filter(date.is_null())
        if bad.height:
            raise MimicFormatError(f"{path}: column StudyDate is not a YYYYMMDD date in {bad.height:,} row(s), e.g. "
                                   f"{bad['StudyDate'][0]}")
        return frame.select("dicom_id", "subject_id", "study_id", pl.col("ViewPosition").alias("view"), "study_time")

    def chexpert(self) -> pl.DataFrame:
        """One row per study: ``subject_id``, ``study_id``, ``chexpert`` (14 labels, int8 1/0/-1, null = blank)."""
        frame, path = self._read("chexpert")
        frame = self._cast(frame, path, {"subject_id": pl.Int64(), "study_id": pl.Int64(),
                                         **{label: pl.Float64() for label in CHEXPERT_LABELS}})
        for label in CHEXPERT_LABELS:
            bad = frame.filter(pl.col(label).is_not_null() & ~pl.col(label).is_in([1.0, 0.0, -1.0]))
            if bad.height:
                raise MimicFormatError(f"{path}: column {label} holds {bad[label][0]}; CheXpert labels are 1, 0, -1 "
                                       "or blank")
        return frame.select("subject_id", "study_id",
                            pl.concat_list([pl.col(label).cast(pl.Int8) for label in CHEXPERT_LABELS])
                            .alias("chexpert")).unique("study_id", keep="first")

    def split(self) -> pl.DataFrame:
        """``dicom_id`` -> ``split`` (train, validation, test)."""
        frame, path = self._read("split")
        unknown = sorted(set(frame["split"].drop_nulls().unique().to_list()) - set(MIMIC_SPLITS))
        if unknown or frame["split"].null_count():
            raise MimicFormatError(f"{path}: column split has value(s) {unknown or ['blank']}; expected train, "
                                   "validate or test")
        return frame.select("dicom_id", pl.col("split").replace_strict(MIMIC_SPLITS))


def image_path(subject_id: pl.Expr, study_id: pl.Expr, dicom_id: pl.Expr) -> pl.Expr:
    """``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`` relative to the release folder, as an expression."""
    subject = subject_id.cast(pl.String)
    return pl.concat_str([pl.lit("files/p"), subject.str.slice(0, 2), pl.lit("/p"), subject, pl.lit("/s"),
                          study_id.cast(pl.String), pl.lit("/"), dicom_id, pl.lit(".jpg")])


@dataclass
class TripletOptions:
    """Everything that changes which pairs are made; recorded in the dataset's summary."""

    window_hours: float = 48.0
    min_age: int = 18
    views: tuple[str, ...] = FRONTAL_VIEWS
    split: Literal["seeded", "mimic"] = "seeded"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    check_images: bool = True
    strict: bool = False  # refuse, rather than drop, the pairs of absent or unusable images

    def __post_init__(self) -> None:
        if not 0 < self.window_hours < 24 * 365:
            raise ArgumentError(f"--window-hours must be positive and under a year, got {self.window_hours}")
        if self.split not in ("seeded", "mimic"):
            raise ArgumentError(f"--split must be 'seeded' or 'mimic', got {self.split!r}")
        if not (0 <= self.validation_fraction < 1 and 0 <= self.test_fraction < 1
                and self.validation_fraction + self.test_fraction < 1):
            raise ArgumentError("--validation-fraction and --test-fraction must be in [0, 1) and leave a train split, "
                             f"got {self.validation_fraction} and {self.test_fraction}")
        self.views = tuple(self.views)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "views": list(self.views)}


def _place_in_admissions(images: pl.DataFrame, admissions: pl.DataFrame) -> pl.DataFrame:
    """Each image's admission: of its patient's admissions whose ``[admittime, dischtime]`` holds the study time
    (no discharge: still open), the one that started last, so a short admission nested in a long one takes the
    images taken during it and the long one keeps the rest. Adds ``hadm_id`` and ``admittime`` (null when none)."""
    holding = (images.select("dicom_id", "subject_id", "study_time")
               .join(admissions.select("subject_id", "hadm_id", "admittime", "dischtime"), on="subject_id")
               .filter((pl.col("admittime") <= pl.col("study_time"))
                       & (pl.col("dischtime").is_null() | (pl.col("study_time") <= pl.col("dischtime"))))
               .sort("admittime", "hadm_id", descending=True)
               .unique("dicom_id", keep="first")
               .select("dicom_id", "hadm_id", "admittime"))
    return images.join(holding, on="dicom_id", how="left")


def _pairs(images: pl.DataFrame, window_hours: float) -> pl.DataFrame:
    """Every (previous, target) pair of frontal images of one admission, previous in an earlier study less than
    ``window_hours`` before the target."""
    columns = ["dicom_id", "study_id", "view", "study_time", "image"]
    previous = images.select("hadm_id", *[pl.col(c).alias(f"previous_{c}") for c in columns])
    target = images.select("subject_id", "hadm_id", "age", "gender", "race",
                           *[pl.col(c).alias(f"target_{c}") for c in columns])
    window = pl.duration(microseconds=int(round(window_hours * 3600e6)))
    return (target.join(previous, on="hadm_id")
            .filter((pl.col("previous_study_time") < pl.col("target_study_time"))
                    & (pl.col("target_study_time") - pl.col("previous_study_time") < window)
                    & (pl.col("previous_study_id") != pl.col("target_study_id"))))


def _seeded_split(subjects: pl.Series, validation: float, test: float, seed: int) -> pl.DataFrame:
    """Patients -> split: a seeded permutation of the sorted ids, so the order of the input never matters."""
    subjects = subjects.unique().sort()
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_test, n_validation = int(round(test * len(subjects))), int(round(validation * len(subjects)))
    names = np.full(len(subjects), "train", dtype=object)
    names[order[:n_test]] = "test"
    names[order[n_test:n_test + n_validation]] = "validation"
    return pl.DataFrame({"subject_id": subjects, "split": pl.Series(names.tolist(), dtype=pl.String)})


# An image smaller than this on a side holds no anatomy at all (a placeholder or a damaged export).
MIN_IMAGE_SIDE = 8


def _unusable_images(cxr_dir: Path, paths: list[str], show_progress: bool) -> tuple[set[str], dict[str, str]]:
    """The listed image files that are absent, and those present that are no usable image, each with why: PIL cannot
    identify it, or it is smaller than ``MIN_IMAGE_SIDE`` pixels on a side.

    Only the header is checked (a full decode of MIMIC-CXR's 3,000-pixel JPEGs would take hours); truncated pixel
    data surfaces when the image is loaded for training."""
    from PIL import Image, UnidentifiedImageError

    missing, unreadable = set(), {}
    for relative in tqdm(paths, desc="checking images", unit="image", disable=not show_progress):
        path = cxr_dir / relative
        if not path.is_file():
            missing.add(relative)
            continue
        try:
            with Image.open(path) as image:
                size = image.size
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            unreadable[relative] = f"not a readable image ({error})"
            continue
        if min(size) < MIN_IMAGE_SIDE:
            unreadable[relative] = (f"{size[0]} x {size[1]} pixels, smaller than {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}: "
                                    "not a chest X-ray")
    return missing, unreadable


def _label_changes(triplets: pl.DataFrame) -> dict[str, float | None]:
    """Per CheXpert label, the share of pairs whose positive finding differs, over the pairs whose two studies both
    have a CheXpert row."""
    if triplets.height == 0:
        return {label: None for label in CHEXPERT_LABELS}
    out: dict[str, float | None] = {}
    labelled = triplets.filter(pl.col("previous_chexpert").is_not_null() & pl.col("target_chexpert").is_not_null())
    if labelled.height == 0:
        return {label: None for label in CHEXPERT_LABELS}
    for index, label in enumerate(CHEXPERT_LABELS):
        # positive (1) or not; a blank label (not mentioned) within a labelled study counts as not positive
        before = (labelled["previous_chexpert"].list.get(index) == 1).fill_null(False)
        after = (labelled["target_chexpert"].list.get(index) == 1).fill_null(False)
        out[label] = float((before != after).mean())
    return out


def build_triplets(cxr_dir: str | Path, mimic_dir: str | Path, options: TripletOptions | None = None,
                   show_progress: bool = True) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """The pairs of the module docstring, one frame per split, and a summary of every count on the way.

    Each row: ``triplet_id``, ``subject_id``, ``hadm_id``, ``gender``, ``age`` (at admission), ``race``; per side
    (``previous_``, ``target_``) ``dicom_id``, ``study_id``, ``view``, ``study_time``, ``image`` (path relative to
    ``cxr_dir``), ``chexpert``; ``hours_between``; ``window_start`` and ``window_end`` (the two study times).
    Images listed but absent or unreadable (``check_images``) are dropped with their pairs, counted and logged.
    """
    options = options or TripletOptions()
    cxr_dir = Path(cxr_dir)
    reader, mimic = MimicCXRReader(cxr_dir), MimicIVReader(mimic_dir)
    for table in ("metadata", "chexpert") + (("split",) if options.split == "mimic" else ()):
        reader.path(table)  # fail on a missing file before any work
    for table in ("patients", "admissions"):
        mimic.path(table)
    steps = ["metadata", "admissions", "pairs", "images", "splits"]
    bar = tqdm(steps, desc="prepare-cxr", unit="step", disable=not show_progress)
    summary: dict[str, Any] = {"options": options.to_dict()}

    bar.set_postfix_str(steps[0])
    metadata = reader.metadata()
    summary["images"], summary["studies"] = metadata.height, metadata["study_id"].n_unique()
    summary["subjects"] = metadata["subject_id"].n_unique()
    images = metadata.filter(pl.col("view").is_in(list(options.views)))
    summary["frontal_images"] = images.height
    untimed = images.filter(pl.col("study_time").is_null())
    summary["frontal_images_without_study_time"] = untimed.height
    if untimed.height:
        logger.warning("%s: %d frontal image(s) have no StudyTime and are left out (e.g. dicom_id %s)",
                       reader.path("metadata"), untimed.height, untimed["dicom_id"][0])
        images = images.drop_nulls("study_time")
    bar.update()

    bar.set_postfix_str(steps[1])
    patients = mimic.read("patients").select("subject_id", "gender", "anchor_age", "anchor_year")
    admissions = mimic.read("admissions").select("subject_id", "hadm_id", "admittime", "dischtime", "race")
    unknown = images.filter(~pl.col("subject_id").is_in(patients["subject_id"].implode()))
    summary["images_of_subjects_not_in_patients"] = unknown.height
    if unknown.height:
        logger.warning("%s: %d frontal image(s) of %d subject(s) not in %s are left out (e.g. subject %d)",
                       reader.path("metadata"), unknown.height, unknown["subject_id"].n_unique(),
                       mimic.path("patients"), unknown["subject_id"][0])
    images = _place_in_admissions(images, admissions)
    summary["frontal_images_outside_admissions"] = int(images["hadm_id"].null_count())
    images = (images.drop_nulls("hadm_id")
              .join(patients, on="subject_id", how="inner")
              .join(admissions.select("hadm_id", "race"), on="hadm_id", how="left")
              .with_columns((pl.col("anchor_age") + pl.col("admittime").dt.year() - pl.col("anchor_year"))
                            .cast(pl.Int32).alias("age")))
    summary["frontal_images_in_admissions"] = images.height
    images = images.filter(pl.col("age") >= options.min_age)
    summary["frontal_images_of_adults"] = images.height
    images = images.with_columns(image_path(pl.col("subject_id"), pl.col("study_id"), pl.col("dicom_id"))
                                 .alias("image"))
    bar.update()

    bar.set_postfix_str(steps[2])
    pairs = _pairs(images, options.window_hours)
    summary["pairs"] = pairs.height
    bar.update()

    bar.set_postfix_str(steps[3])
    summary["images_missing"] = summary["images_unreadable"] = 0
    if options.check_images and pairs.height:
        used = pl.concat([pairs["previous_image"], pairs["target_image"]]).unique().sort().to_list()
        missing, unreadable = _unusable_images(cxr_dir, used, show_progress)
        summary["images_missing"], summary["images_unreadable"] = len(missing), len(unreadable)
        bad = missing | set(unreadable)
        if bad and options.strict:
            first = sorted(bad)[0]
            why = unreadable.get(first, "listed in the metadata but absent")
            raise MimicFormatError(f"{cxr_dir / first}: {why}; {len(missing):,} listed image(s) absent and "
                                   f"{len(unreadable):,} unusable in all; leave out --strict to drop their pairs")
        if bad:
            for kind, found in (("absent", missing), ("unusable", set(unreadable))):
                if found:
                    example = sorted(found)[0]
                    logger.warning("%s: %d listed image(s) %s, their pairs left out (e.g. %s%s); --strict refuses "
                                   "them", cxr_dir, len(found), kind, example,
                                   f": {unreadable[example]}" if example in unreadable else "")
            bad_list = pl.Series(sorted(bad), dtype=pl.String).implode()
            pairs = pairs.filter(~pl.col("previous_image").is_in(bad_list) & ~pl.col("target_image").is_in(bad_list))
    summary["pairs_with_images"] = pairs.height
    bar.update()

    bar.set_postfix_str(steps[4])
    chexpert = reader.chexpert().select("study_id", "chexpert")
    pairs = (pairs
             .join(chexpert.rename({"study_id": "previous_study_id", "chexpert": "previous_chexpert"}),
                   on="previous_study_id", how="left")
             .join(chexpert.rename({"study_id": "target_study_id", "chexpert": "target_chexpert"}),
                   on="target_study_id", how="left"))
    summary["studies_without_chexpert_labels"] = int(
        pl.concat([pairs.filter(pl.col(f"{side}_chexpert").is_null())[f"{side}_study_id"]
                   for side in ("previous", "target")]).n_unique())
    pairs = (pairs
             .with_columns(((pl.col("target_study_time") - pl.col("previous_study_time")).dt.total_microseconds()
                            / 3.6e9).cast(pl.Float32).alias("hours_between"),
                           pl.col("previous_study_time").alias("window_start"),
                           pl.col("target_study_time").alias("window_end"))
             .sort("subject_id", "target_study_time", "target_dicom_id", "previous_study_time", "previous_dicom_id")
             .with_row_index("triplet_id").with_columns(pl.col("triplet_id").cast(pl.Int64)))
    if options.split == "mimic":
        assigned = reader.split()
        pairs = pairs.join(assigned.rename({"dicom_id": "target_dicom_id"}), on="target_dicom_id", how="left")
        unassigned = pairs["split"].null_count()
        if unassigned:
            raise MimicFormatError(f"{reader.path('split')}: {unassigned:,} target image(s) have no split, e.g. "
                                   f"{pairs.filter(pl.col('split').is_null())['target_dicom_id'][0]}")
        mixed = pairs.group_by("subject_id").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1)
        if mixed.height:
            raise MimicFormatError(f"{reader.path('split')}: subject {mixed['subject_id'][0]} has images in several "
                                   "splits; MIMIC-CXR assigns splits by patient")
    else:
        # over every patient of the metadata, so a patient's split does not depend on the pair rules
        assignment = _seeded_split(metadata["subject_id"], options.validation_fraction, options.test_fraction,
                                   options.seed)
        pairs = pairs.join(assignment, on="subject_id", how="left")
    splits = {name: pairs.filter(pl.col("split") == name).drop("split") for name in SPLITS}
    bar.update()
    bar.close()

    summary.update({
        "triplets": pairs.height,
        "splits": {name: frame.height for name, frame in splits.items()},
        "triplet_subjects": pairs["subject_id"].n_unique(),
        "triplet_admissions": pairs["hadm_id"].n_unique(),
        "hours_between_median": float(pairs["hours_between"].median()) if pairs.height else None,
        "label_change_rates": _label_changes(pairs),
    })
    return splits, summary
