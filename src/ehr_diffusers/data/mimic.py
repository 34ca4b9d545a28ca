"""Lazy, validated reader for MIMIC-IV ``hosp`` tables laid out as PhysioNet ships them.

A MIMIC-IV release folder (``mimic-iv-3.1/``) holds ``hosp/patients.csv.gz`` and friends; converted copies as
``.csv`` or ``.parquet`` are accepted too. Tables come back as ``polars.LazyFrame`` so that nothing is read before
it is needed; column names, types and value vocabularies follow MIMIC-IV v2.x/v3.x. Every problem is raised as a
``MimicFormatError`` whose message names the file and the column.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..errors import DataError

logger = logging.getLogger(__name__)

SUFFIXES = (".csv.gz", ".csv", ".parquet")


class MimicFormatError(DataError):
    """A MIMIC-IV file is missing, lacks a column, or holds a value of the wrong type."""


@dataclass(frozen=True)
class TableSpec:
    """Required columns of one MIMIC-IV table and the polars type each is read as."""

    module: str
    name: str
    columns: dict[str, pl.DataType]


_DATETIME = pl.Datetime("us")

# Only the columns this project uses are required; other MIMIC columns are ignored if present.
TABLES: dict[str, TableSpec] = {
    "patients": TableSpec(
        "hosp",
        "patients",
        {
            "subject_id": pl.Int64(),
            "gender": pl.String(),
            "anchor_age": pl.Int64(),
            "anchor_year": pl.Int64(),
            "anchor_year_group": pl.String(),
            "dod": pl.Date(),
        },
    ),
    "admissions": TableSpec(
        "hosp",
        "admissions",
        {
            "subject_id": pl.Int64(),
            "hadm_id": pl.Int64(),
            "admittime": _DATETIME,
            "dischtime": _DATETIME,
            "deathtime": _DATETIME,
            "admission_type": pl.String(),
            "marital_status": pl.String(),
            "race": pl.String(),
            "hospital_expire_flag": pl.Int64(),
        },
    ),
    "diagnoses_icd": TableSpec(
        "hosp",
        "diagnoses_icd",
        {
            "subject_id": pl.Int64(),
            "hadm_id": pl.Int64(),
            "seq_num": pl.Int64(),
            "icd_code": pl.String(),
            "icd_version": pl.Int64(),
        },
    ),
    "d_icd_diagnoses": TableSpec(
        "hosp",
        "d_icd_diagnoses",
        {"icd_code": pl.String(), "icd_version": pl.Int64(), "long_title": pl.String()},
    ),
}

# Value vocabularies as in MIMIC-IV v2.x/v3.x; the reader checks the ones a wrong file would break.
GENDERS = ("F", "M")
ICD_VERSIONS = (9, 10)
MARITAL_STATUSES = ("DIVORCED", "MARRIED", "SINGLE", "WIDOWED")
ADMISSION_TYPES = (
    "AMBULATORY OBSERVATION",
    "DIRECT EMER.",
    "DIRECT OBSERVATION",
    "ELECTIVE",
    "EU OBSERVATION",
    "EW EMER.",
    "OBSERVATION ADMIT",
    "SURGICAL SAME DAY ADMISSION",
    "URGENT",
)
# MIMIC-IV v1 called the race column "ethnicity"; it is read under its v2+ name.
_ALIASES = {"admissions": {"ethnicity": "race"}}


def find_table(folders: Iterable[Path], name: str) -> Path | None:
    """The first ``<folder>/<name>.csv.gz`` (or ``.csv``, ``.parquet``) present, folders in order; None when none is."""
    for folder in folders:
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def check_table_file(path: Path) -> None:
    """Fails naming ``path`` when it is empty, or named ``.gz`` without being gzip, or ``.parquet`` without being
    parquet: read as they are, such files fail later with a misleading "missing column"."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise MimicFormatError(f"{path}: the file is empty")
    if path.name.endswith(".gz") and head[:2] != b"\x1f\x8b":
        raise MimicFormatError(f"{path}: not a gzip file, although its name ends in .gz (a damaged or partial "
                               "download?)")
    if path.suffix == ".parquet" and head != b"PAR1":
        raise MimicFormatError(f"{path}: not a parquet file")


def _unreadable(path: Path, error: Exception, problem: str = "cannot be read as a table") -> MimicFormatError:
    """A polars or OS error while reading ``path``, as one line naming the file: not UTF-8, or ``problem``."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if "utf-8" in first_line.lower() or "utf8" in first_line.lower():
        return MimicFormatError(f"{path}: not UTF-8 text ({first_line}); MIMIC-IV files are UTF-8")
    return MimicFormatError(f"{path}: {problem} ({first_line})")


def _open_table(path: Path) -> tuple[pl.LazyFrame, list[str]]:
    """The file as a lazy frame of text columns (parquet: as stored) and its column names; the file is checked and
    its header read now, so that a damaged file is named before any work."""
    check_table_file(path)
    try:
        frame = pl.scan_parquet(path) if path.suffix == ".parquet" else pl.scan_csv(path, infer_schema=False)
        return frame, frame.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as error:
        raise _unreadable(path, error) from error


def scan_table(path: Path, required: Iterable[str], optional: Iterable[str] = ()) -> pl.LazyFrame:
    """The file's ``required`` (and present ``optional``) columns as text (parquet: as stored), nothing parsed yet;
    the header is checked now so that a missing column is named before any work."""
    frame, present = _open_table(path)
    required = list(dict.fromkeys(required))
    missing = [column for column in required if column not in present]
    if missing:
        raise MimicFormatError(f"{path}: missing required column(s) {', '.join(missing)}")
    return frame.select(required + [column for column in optional if column in present and column not in required])


def parse_column(column: str, dtype: pl.DataType) -> pl.Expr:
    """Expression turning a CSV text column (or a typed parquet one) into ``dtype``, failing loudly on a bad
    value."""
    text = pl.col(column).cast(pl.String)
    if dtype == pl.Date():
        # dod is a date in v2+, a timestamp at midnight in some exports: keep the date part.
        return text.str.slice(0, 10).str.to_date("%Y-%m-%d", strict=True).alias(column)
    if isinstance(dtype, pl.Datetime):
        return text.str.to_datetime(time_unit="us", strict=True).alias(column)
    return text.cast(dtype, strict=True).alias(column)


class MimicIVReader:
    """Finds, scans and validates MIMIC-IV tables under a release folder.

    Args:
        root: the release folder (the one holding ``hosp/``), or the ``hosp`` folder itself.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MimicFormatError(f"{self.root}: MIMIC-IV folder not found")

    def path(self, table: str) -> Path:
        """The file holding ``table``: ``<root>/hosp/<table>.csv.gz``, ``.csv`` or ``.parquet``."""
        spec = TABLES[table]
        found = find_table((self.root / spec.module, self.root), spec.name)
        if found is not None:
            return found
        expected = self.root / spec.module / f"{spec.name}.csv.gz"
        raise MimicFormatError(f"{expected}: required MIMIC-IV table '{table}' not found (.csv.gz, .csv or .parquet)")

    def has(self, table: str) -> bool:
        """Whether the release holds ``table`` (in any of the accepted formats)."""
        spec = TABLES[table]
        return find_table((self.root / spec.module, self.root), spec.name) is not None

    def scan(self, table: str) -> pl.LazyFrame:
        """A lazy frame with the required columns of ``table`` in their MIMIC-IV types (header checked now)."""
        spec = TABLES[table]
        path = self.path(table)
        frame, present = _open_table(path)
        renames = {old: new for old, new in _ALIASES.get(table, {}).items() if old in present and new not in present}
        names = [renames.get(name, name) for name in present]
        missing = [column for column in spec.columns if column not in names]
        if missing:
            raise MimicFormatError(f"{path}: missing required column(s) {', '.join(missing)}")
        if renames:
            logger.warning("%s: reading MIMIC-IV v1 column(s) %s under their v2+ names", path, renames)
            frame = frame.rename(renames)
        return frame.select([parse_column(column, dtype) for column, dtype in spec.columns.items()])

    def collect(self, table: str, frame: pl.LazyFrame | None = None) -> pl.DataFrame:
        """Collects ``frame`` (default: the whole table), turning type errors into messages naming the file."""
        path = self.path(table)
        try:
            return (self.scan(table) if frame is None else frame).collect()
        except OSError as error:  # a truncated or damaged compressed file
            raise _unreadable(path, error) from error
        except pl.exceptions.PolarsError as error:
            raise _unreadable(path, error, "a value has the wrong type") from error

    def read(self, table: str) -> pl.DataFrame:
        """Reads and validates one table, including its value vocabularies."""
        data = self.collect(table)
        validate_values(table, data, self.path(table))
        return data


# What ``validate_values`` checks, per table: closed vocabularies, columns that may not be empty, unique keys.
VOCABULARIES: dict[str, dict[str, tuple]] = {
    "patients": {"gender": GENDERS},
    "admissions": {"admission_type": ADMISSION_TYPES, "marital_status": MARITAL_STATUSES},
    "diagnoses_icd": {"icd_version": ICD_VERSIONS},
    "d_icd_diagnoses": {"icd_version": ICD_VERSIONS},
}
NOT_NULL: dict[str, tuple[str, ...]] = {
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year"),
    "admissions": ("subject_id", "hadm_id", "admittime"),
    "diagnoses_icd": ("subject_id", "hadm_id", "icd_code", "icd_version"),
    "d_icd_diagnoses": ("icd_code", "icd_version"),
}
UNIQUE: dict[str, tuple[str, ...]] = {"patients": ("subject_id",), "admissions": ("hadm_id",)}
# Closed ranges of numeric columns: MIMIC-IV's anchor_age is 18-91 (top-coded); anything outside 0-120 is an error.
RANGES: dict[str, dict[str, tuple[int, int]]] = {"patients": {"anchor_age": (0, 120)}}


def _first_row(data: pl.DataFrame, condition: pl.Expr) -> int:
    """The 1-based data row (the header not counted) of the first row where ``condition`` holds."""
    return int(data.select(condition.arg_true().first()).item()) + 1


def validate_values(table: str, data: pl.DataFrame, path: Path | str) -> None:
    """Checks vocabularies, ranges, empty values and unique keys of the columns present in ``data``; a message names
    the file, the column and the first row at fault (data rows counted from 1, the header not counted). The checks
    are vectorised and look for the row only when one fails."""
    for column, allowed in VOCABULARIES.get(table, {}).items():
        if column not in data.columns:
            continue
        unknown = pl.col(column).is_not_null() & ~pl.col(column).is_in(list(allowed))
        bad = data.filter(unknown)[column].unique()
        if len(bad):
            shown = ", ".join(repr(value) for value in bad.sort().head(5).to_list())
            raise MimicFormatError(
                f"{path}: row {_first_row(data, unknown)}: column {column} has unknown value(s) {shown}; expected one "
                f"of {', '.join(map(str, allowed))}"
            )
    for column, (low, high) in RANGES.get(table, {}).items():
        if column not in data.columns:
            continue
        outside = ~pl.col(column).is_between(low, high)
        count = data.select(outside.sum()).item()
        if count:
            row = _first_row(data, outside)
            raise MimicFormatError(f"{path}: row {row}: column {column} is {data[column][row - 1]}, outside {low} to "
                                   f"{high} ({count} row(s) in all)")
    for column in NOT_NULL.get(table, ()):
        if column in data.columns and data[column].null_count():
            row = _first_row(data, pl.col(column).is_null())
            raise MimicFormatError(f"{path}: row {row}: column {column} is empty ({data[column].null_count()} empty "
                                   "value(s) in all)")
    for column in UNIQUE.get(table, ()):
        if column in data.columns and data[column].n_unique() != data.height:
            repeated = ~pl.col(column).is_first_distinct()
            values = data.filter(repeated)[column].unique().sort().head(3).to_list()
            raise MimicFormatError(f"{path}: row {_first_row(data, repeated)}: column {column} must be unique, "
                                   f"repeated value(s) {values}")
