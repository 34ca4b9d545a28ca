"""From MIMIC-IV ``hosp`` tables to a split, documented ``datasets.DatasetDict`` of patient records.

One row per patient (``subject_id``):

* ``sex``: MIMIC-IV ``gender`` (F/M). ``death``: a date of death (``dod``) is recorded.
* ``age``: age at the last admission, ``anchor_age + year(last admittime) - anchor_year``, top-coded at 91 as
  MIMIC-IV top-codes ``anchor_age``; ``anchor_age`` for patients without an admission.
* ``num_admissions``: rows in ``admissions``.
* ``marital_status`` / ``race``: the latest informative value over the patient's admissions (``UNKNOWN``-like race
  values only when nothing else was recorded); ``MISSING`` when there is none or no admission. Race is grouped
  into coarse categories by default (``race_grouping="coarse"``) or kept as MIMIC's strings (``"raw"``: the strings
  seen in train; a holdout value never seen in train becomes ``OTHER`` and is counted).
* ``icd10_categories``: the sorted 3-character ICD-10-CM categories over all admissions; ICD-9 codes are mapped
  through the GEMs (``icd.GemMapper``). ``code_indices``: their positions in the vocabulary (int32).

The split into ``train`` and ``holdout`` is made by ``subject_id`` with a seeded permutation before anything is
fitted; the code vocabulary (codes with at least ``min_code_count`` train patients) and the schema's scaling
constants come from ``train`` only, so holdout codes outside it are dropped from ``code_indices`` and counted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ...errors import ArgumentError, DataError
from ...io import atomic_directory, check_output_dir
from ..mimic import MimicIVReader
from .icd import GemMapper, GemOptions, category_title, normalize_codes, unknown_codes
from .schema import MISSING, EHRSchema

logger = logging.getLogger(__name__)

SUMMARY_NAME = "cohort_summary.json"
AGE_TOP_CODE = 91
MARITAL_CATEGORIES = ["DIVORCED", "MARRIED", "SINGLE", "WIDOWED", MISSING]
UNINFORMATIVE_RACE = ["UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER"]
COARSE_RACE_CATEGORIES = [
    "AMERICAN INDIAN/ALASKA NATIVE",
    "ASIAN",
    "BLACK",
    "HISPANIC/LATINO",
    "NATIVE HAWAIIAN/PACIFIC ISLANDER",
    "OTHER",
    "UNKNOWN",
    "WHITE",
    MISSING,
]


def coarse_race(race: pl.Expr) -> pl.Expr:
    """MIMIC-IV race strings -> coarse groups; anything unrecognised is OTHER, null stays null."""
    return (
        pl.when(race.is_null())
        .then(None)
        .when(race.str.starts_with("WHITE") | (race == "PORTUGUESE"))
        .then(pl.lit("WHITE"))
        .when(race.str.starts_with("BLACK"))
        .then(pl.lit("BLACK"))
        .when(race.str.starts_with("HISPANIC") | (race == "SOUTH AMERICAN"))
        .then(pl.lit("HISPANIC/LATINO"))
        .when(race.str.starts_with("ASIAN"))
        .then(pl.lit("ASIAN"))
        .when(race.str.starts_with("AMERICAN INDIAN"))
        .then(pl.lit("AMERICAN INDIAN/ALASKA NATIVE"))
        .when(race.str.starts_with("NATIVE HAWAIIAN"))
        .then(pl.lit("NATIVE HAWAIIAN/PACIFIC ISLANDER"))
        .when(race.is_in(UNINFORMATIVE_RACE))
        .then(pl.lit("UNKNOWN"))
        .otherwise(pl.lit("OTHER"))
    )


@dataclass
class CohortOptions:
    """Everything that changes the prepared dataset; recorded in its card and summary."""

    holdout_fraction: float = 0.2
    seed: int = 0
    min_code_count: int = 1
    include_no_admission: bool = True
    race_grouping: Literal["coarse", "raw"] = "coarse"
    gem: GemOptions = field(default_factory=GemOptions)

    def __post_init__(self):
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ArgumentError(f"--holdout-fraction must be between 0 and 1 (exclusive), got {self.holdout_fraction}")
        if self.min_code_count < 1:
            raise ArgumentError(f"--min-code-count must be at least 1, got {self.min_code_count}")
        if self.race_grouping not in ("coarse", "raw"):
            raise ArgumentError(f"race_grouping must be coarse or raw, got {self.race_grouping!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Cohort:
    """A prepared cohort in memory: the splits, the schema fitted on train, and the summary figures."""

    dataset: Any  # datasets.DatasetDict
    schema: EHRSchema
    summary: dict


def _features():
    from datasets import Features, List, Value

    return Features(
        {
            "subject_id": Value("int64"),
            "sex": Value("string"),
            "age": Value("int32"),
            "death": Value("bool"),
            "num_admissions": Value("int32"),
            "marital_status": Value("string"),
            "race": Value("string"),
            "code_indices": List(Value("int32")),
            "icd10_categories": List(Value("string")),
        }
    )


def _demographics(reader: MimicIVReader, options: CohortOptions) -> tuple[pl.DataFrame, int]:
    """One row per patient with the demographic fields; also the number of admissions of those patients."""
    patients = reader.read("patients")
    admissions = reader.read("admissions").filter(pl.col("subject_id").is_in(patients["subject_id"].implode()))
    informative_race = pl.col("race").filter(pl.col("race").is_not_null() & ~pl.col("race").is_in(UNINFORMATIVE_RACE))
    per_subject = (
        admissions.sort("subject_id", "admittime", "hadm_id")
        .group_by("subject_id")
        .agg(
            pl.len().alias("num_admissions"),
            pl.col("admittime").max().alias("last_admittime"),
            pl.col("marital_status").drop_nulls().last().alias("marital_status"),
            pl.coalesce(informative_race.last(), pl.col("race").drop_nulls().last()).alias("race"),
        )
    )
    race = coarse_race(pl.col("race")) if options.race_grouping == "coarse" else pl.col("race")
    frame = (
        patients.join(per_subject, on="subject_id", how="left")
        .with_columns(
            pl.col("num_admissions").fill_null(0),
            pl.when(pl.col("last_admittime").is_null())
            .then(pl.col("anchor_age"))
            .otherwise(pl.col("anchor_age") + pl.col("last_admittime").dt.year() - pl.col("anchor_year"))
            .clip(upper_bound=AGE_TOP_CODE)
            .alias("age"),
            race.fill_null(MISSING).alias("race"),
            pl.col("marital_status").fill_null(MISSING),
        )
        .select(
            "subject_id",
            pl.col("gender").alias("sex"),
            "age",
            pl.col("dod").is_not_null().alias("death"),
            "num_admissions",
            "marital_status",
            "race",
        )
        .sort("subject_id")
    )
    return frame, admissions.height


def _diagnoses(reader: MimicIVReader, gem: GemOptions, subjects: pl.Series,
               strict: bool = False) -> tuple[pl.DataFrame, dict, GemMapper]:
    """(subject_id, category) pairs, one per patient and category, the mapping statistics and the GEM mapper (built
    after the codes are checked, so that ``strict`` fails without waiting for it).

    A row whose code is no ICD-CM code of its ``icd_version`` (garbage, empty, or a code of the other version) is
    dropped and counted, or refused with ``strict``: slicing its first 3 characters would make a bogus category."""
    path = reader.path("diagnoses_icd")
    diagnoses = reader.read("diagnoses_icd").select(
        "subject_id", normalize_codes("icd_code").alias("code"), "icd_version"
    )
    distinct = diagnoses.group_by("code", "icd_version").agg(pl.len().alias("rows"))
    release = reader.read("d_icd_diagnoses") if reader.has("d_icd_diagnoses") else None
    unknown = unknown_codes(distinct, release)
    unknown_top = []
    if unknown.height:  # the rare case: only now is the first row of each unknown code looked for
        first = (diagnoses.with_row_index("row", offset=1).join(unknown.select("code", "icd_version"),
                                                                on=["code", "icd_version"], how="semi")
                 .group_by("code", "icd_version").agg(pl.col("row").min()))
        unknown = unknown.join(first, on=["code", "icd_version"]).sort("row")
        unknown_top = [
            {"icd_code": code, "icd_version": version, "rows": rows, "first_row": row, "reason": reason}
            for code, version, rows, row, reason in unknown.sort("rows", "row", descending=[True, False]).head(10)
            .select("code", "icd_version", "rows", "row", "reason").iter_rows()
        ]
        row, code, version, reason = unknown.select("row", "code", "icd_version", "reason").row(0)
        where = (f"{path}: row {row}: {code!r} (icd_version {version}) is {reason}; {unknown['rows'].sum():,} row(s) "
                 f"hold {unknown.height:,} unknown code(s)")
        if strict:
            raise DataError(f"{where}; correct them, or leave out --strict to drop them")
        logger.warning("%s; they were dropped (--strict refuses them)", where)
        diagnoses = diagnoses.join(unknown.select("code", "icd_version"), on=["code", "icd_version"], how="anti")
    mapper = GemMapper(gem)
    unknown_subject = diagnoses.filter(~pl.col("subject_id").is_in(subjects.implode()))
    if unknown_subject.height:
        logger.warning("%s: %d rows for subject_ids absent from patients were dropped", path, unknown_subject.height)
        diagnoses = diagnoses.filter(pl.col("subject_id").is_in(subjects.implode()))
    icd9 = diagnoses.filter(pl.col("icd_version") == 9)
    icd10 = diagnoses.filter(pl.col("icd_version") == 10)
    mapped9 = icd9.join(mapper.table, left_on="code", right_on="icd9", how="inner").select("subject_id", "category")
    unmapped = icd9.join(mapper.table.select("icd9").unique(), left_on="code", right_on="icd9", how="anti")
    unmapped_codes = unmapped.group_by("code").len().sort("len", "code", descending=[True, False])
    by_reason: dict[str, dict[str, int]] = {}
    for code, rows in unmapped_codes.iter_rows():
        entry = by_reason.setdefault(mapper.status(code), {"codes": 0, "rows": 0})
        entry["codes"] += 1
        entry["rows"] += rows
    pairs = (
        pl.concat([mapped9, icd10.select("subject_id", pl.col("code").str.slice(0, 3).alias("category"))])
        .unique()
        .sort("subject_id", "category")
    )
    stats = {
        "diagnosis_rows": diagnoses.height,
        "diagnosis_rows_unknown_code": int(unknown["rows"].sum()),
        "unknown_codes": unknown.height,
        "unknown_codes_top": unknown_top,
        "diagnosis_rows_unknown_subject": unknown_subject.height,
        "icd9_rows": icd9.height,
        "icd10_rows": icd10.height,
        "icd9_unmapped_rows": unmapped.height,
        "icd9_unmapped_codes": unmapped_codes.height,
        "icd9_unmapped_by_reason": by_reason,
        "icd9_unmapped_top": [
            {"icd9": code, "rows": rows, "reason": mapper.status(code)}
            for code, rows in unmapped_codes.head(10).iter_rows()
        ],
    }
    for reason, entry in by_reason.items():
        logger.info("ICD-9 codes unmapped (%s): %d codes in %d rows", reason, entry["codes"], entry["rows"])
    return pairs, stats, mapper


def _split(subjects: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of holdout subjects: a seeded permutation of the sorted ids, so order of input never matters."""
    order = np.argsort(subjects, kind="stable")
    n_holdout = int(round(fraction * len(subjects)))
    if n_holdout == 0 or n_holdout == len(subjects):
        raise DataError(
            f"a cohort of {len(subjects)} patients is too small for --holdout-fraction {fraction}: "
            "a split would be empty"
        )
    permutation = np.random.default_rng(seed).permutation(len(subjects))
    holdout = np.zeros(len(subjects), dtype=bool)
    holdout[order[permutation[:n_holdout]]] = True
    return holdout


def build_cohort(mimic_dir: str | Path, options: CohortOptions | None = None, show_progress: bool = True,
                 strict: bool = False) -> Cohort:
    """Reads the MIMIC-IV tables under ``mimic_dir`` and returns the split dataset, its schema and summary.

    Diagnosis rows with unknown ICD codes are dropped and counted, or refused with ``strict``."""
    options = options or CohortOptions()
    reader = MimicIVReader(mimic_dir)
    for table in ("patients", "admissions", "diagnoses_icd"):
        reader.path(table)  # fail on a missing file before any work
    steps = ["patients and admissions", "diagnoses and ICD mapping", "split and vocabulary", "datasets"]
    bar = tqdm(steps, desc="prepare", disable=not show_progress, unit="step")
    bar.set_postfix_str(steps[0])
    people, n_admissions = _demographics(reader, options)
    bar.update()
    bar.set_postfix_str(steps[1])
    pairs, stats, mapper = _diagnoses(reader, options.gem, people["subject_id"], strict)
    if not options.include_no_admission:
        people = people.filter(pl.col("num_admissions") > 0)
        pairs = pairs.filter(pl.col("subject_id").is_in(people["subject_id"].implode()))
    if people.height == 0:
        why = " after --exclude-no-admission" if not options.include_no_admission else ""
        raise DataError(f"{reader.path('patients')}: empty cohort, no patients left{why}")
    bar.update()
    bar.set_postfix_str(steps[2])

    holdout_mask = _split(people["subject_id"].to_numpy(), options.holdout_fraction, options.seed)
    people = people.with_columns(pl.Series("holdout", holdout_mask))
    pairs = pairs.join(people.select("subject_id", "holdout"), on="subject_id", how="inner")
    train_counts = pairs.filter(~pl.col("holdout")).group_by("category").len()
    vocabulary = sorted(train_counts.filter(pl.col("len") >= options.min_code_count)["category"].to_list())
    if not vocabulary:
        raise DataError(
            f"{reader.path('diagnoses_icd')}: no ICD-10 category is held by --min-code-count "
            f"{options.min_code_count} train patient(s); the code vocabulary would be empty"
        )
    index = pl.DataFrame(
        {"category": pl.Series(vocabulary, dtype=pl.String), "index": np.arange(len(vocabulary), dtype=np.int32)}
    )
    pairs = pairs.join(index, on="category", how="left")
    per_patient = pairs.sort("subject_id", "category").group_by("subject_id").agg(
        pl.col("index").drop_nulls().alias("code_indices"), pl.col("category").alias("icd10_categories")
    )
    records = people.join(per_patient, on="subject_id", how="left").with_columns(
        pl.col("code_indices").fill_null(pl.lit([], dtype=pl.List(pl.Int32))),
        pl.col("icd10_categories").fill_null(pl.lit([], dtype=pl.List(pl.String))),
    )
    train = records.filter(~pl.col("holdout")).drop("holdout")
    holdout = records.filter(pl.col("holdout")).drop("holdout")

    if options.race_grouping == "coarse":
        race_categories = COARSE_RACE_CATEGORIES
        holdout_unseen_race = 0
    else:  # MIMIC's own strings, as seen in train; a holdout value never seen in train becomes OTHER
        race_categories = sorted(set(train["race"].unique().to_list()) - {MISSING} | {"OTHER"}) + [MISSING]
        unseen = ~pl.col("race").is_in(race_categories)
        holdout_unseen_race = holdout.filter(unseen).height
        holdout = holdout.with_columns(pl.when(unseen).then(pl.lit("OTHER")).otherwise(pl.col("race")).alias("race"))
    titles = [category_title(code) for code in vocabulary]
    schema = EHRSchema.fit(
        train,
        codes=vocabulary,
        marital_categories=MARITAL_CATEGORIES,
        race_categories=race_categories,
        code_titles=titles,
        metadata={"race_grouping": options.race_grouping, "gem": options.gem.to_dict(), "gem_source": mapper.source},
    )
    bar.update()
    bar.set_postfix_str(steps[3])
    from datasets import Dataset, DatasetDict  # here: an error in the tables comes before this import

    features = _features()
    dataset = DatasetDict(
        {name: Dataset.from_polars(split.select(list(features)), features=features) for name, split in
         (("train", train), ("holdout", holdout))}
    )
    bar.update()
    bar.close()

    codes_per_patient = records["code_indices"].list.len()
    n_oov = pairs.filter(pl.col("holdout") & pl.col("index").is_null()).height
    summary = {
        "patients": records.height,
        "patients_without_admission": int((records["num_admissions"] == 0).sum()),
        "admissions": n_admissions,
        **stats,
        "icd10_categories_in_cohort": pairs["category"].n_unique(),
        "vocabulary_size": len(vocabulary),
        "codes_per_patient_mean": float(codes_per_patient.mean()),
        "density": float(codes_per_patient.mean() / len(vocabulary)),
        "deaths": int(records["death"].sum()),
        "splits": {"train": train.height, "holdout": holdout.height},
        "holdout_codes_outside_vocabulary": n_oov,
        "holdout_race_unseen_in_train": holdout_unseen_race,
        "schema_dim": schema.dim,
        "gem_source": mapper.source,
        "options": options.to_dict(),
    }
    return Cohort(dataset=dataset, schema=schema, summary=summary)


def prepare(
    mimic_dir: str | Path,
    out: str | Path,
    options: CohortOptions | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    synthetic: bool = False,
    source: str | None = None,
    strict: bool = False,
) -> dict:
    """Builds the cohort and saves it (``save_to_disk`` + ``schema.json`` + card) atomically into ``out``.

    ``synthetic`` marks the card as describing the embedded demo data rather than MIMIC-IV; ``source`` is how the
    card names the input (default: ``mimic_dir``); ``strict`` refuses diagnosis rows with unknown ICD codes instead
    of dropping them.
    """
    from ...hub.cards import render_dataset_card

    check_output_dir(out, overwrite, inputs=[mimic_dir])
    cohort = build_cohort(mimic_dir, options, show_progress=show_progress, strict=strict)
    cohort.summary["synthetic"] = synthetic
    with atomic_directory(out, overwrite, inputs=[mimic_dir]) as staging:
        cohort.dataset.save_to_disk(str(staging))
        cohort.schema.save(staging)
        (staging / SUMMARY_NAME).write_text(json.dumps(cohort.summary, indent=2) + "\n")
        (staging / "README.md").write_text(render_dataset_card(cohort.summary, source=source or str(mimic_dir),
                                                               synthetic=synthetic))
    return cohort.summary


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    unmapped = ", ".join(f"{reason} {entry['codes']} codes/{entry['rows']} rows"
                         for reason, entry in summary["icd9_unmapped_by_reason"].items()) or "none"
    return "\n".join(
        [
            f"patients            {summary['patients']:,} ({summary['patients_without_admission']:,} without "
            f"admission, {summary['deaths']:,} deaths)",
            f"admissions          {summary['admissions']:,}",
            f"diagnosis rows      {summary['diagnosis_rows']:,} (ICD-9 {summary['icd9_rows']:,}, "
            f"ICD-10 {summary['icd10_rows']:,})",
            f"unknown ICD codes   {summary.get('unknown_codes', 0):,} codes in "
            f"{summary.get('diagnosis_rows_unknown_code', 0):,} rows, dropped",
            f"unmapped ICD-9      {summary['icd9_unmapped_codes']:,} codes in {summary['icd9_unmapped_rows']:,} rows "
            f"({unmapped})",
            f"ICD-10 categories   {summary['icd10_categories_in_cohort']:,} in cohort, "
            f"vocabulary {summary['vocabulary_size']:,}",
            f"codes per patient   {summary['codes_per_patient_mean']:.2f} (density {summary['density']:.4f})",
            f"split               train {summary['splits']['train']:,} / holdout {summary['splits']['holdout']:,} "
            f"(seed {summary['options']['seed']}, holdout fraction {summary['options']['holdout_fraction']})",
        ]
    )
