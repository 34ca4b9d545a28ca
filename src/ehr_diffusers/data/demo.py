"""What the two synthetic cohorts share: MIMIC-IV's demographic vocabularies and rough shares, the seeded draws
made from them, and the way the tables and the "this is synthetic" README are written and recognised.

The EHR cohort (:mod:`~ehr_diffusers.data.ehr.demo`) and the chest X-ray cohort (:mod:`~ehr_diffusers.data.cxr.demo`)
both write MIMIC-IV ``patients`` and ``admissions`` tables; drawing them from one table of shares and writing them
one way keeps the two cohorts alike, and keeps each byte-identical for a given seed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import polars as pl

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

ANCHOR_YEAR_GROUPS = {
    "2008 - 2010": 0.24, "2011 - 2013": 0.23, "2014 - 2016": 0.22, "2017 - 2019": 0.20, "2020 - 2022": 0.11
}
# Marital status by age band (18-29, 30-49, 50-69, 70+).
MARITAL_AGE_BANDS = (30, 50, 70)
MARITAL = {
    "SINGLE": (0.8, 0.4, 0.25, 0.15),
    "MARRIED": (0.15, 0.45, 0.5, 0.42),
    "DIVORCED": (0.04, 0.13, 0.17, 0.1),
    "WIDOWED": (0.01, 0.02, 0.08, 0.33),
}
# Race as MIMIC-IV writes it, with a rough share and the language spoken by some of that group.
RACES: dict[str, tuple[float, str | None, float]] = {
    "WHITE": (0.63, None, 0.0),
    "BLACK/AFRICAN AMERICAN": (0.135, None, 0.0),
    "OTHER": (0.035, "SPANISH", 0.1),
    "WHITE - OTHER EUROPEAN": (0.018, None, 0.0),
    "HISPANIC/LATINO - PUERTO RICAN": (0.018, "SPANISH", 0.35),
    "ASIAN": (0.014, "CHINESE", 0.2),
    "ASIAN - CHINESE": (0.013, "CHINESE", 0.45),
    "BLACK/CAPE VERDEAN": (0.012, "PORTUGUESE", 0.3),
    "WHITE - RUSSIAN": (0.011, "RUSSIAN", 0.45),
    "HISPANIC/LATINO - DOMINICAN": (0.01, "SPANISH", 0.4),
    "HISPANIC OR LATINO": (0.01, "SPANISH", 0.35),
    "BLACK/CARIBBEAN ISLAND": (0.008, "HAITIAN", 0.35),
    "UNKNOWN": (0.02, None, 0.0),
    "UNABLE TO OBTAIN": (0.006, None, 0.0),
    "PATIENT DECLINED TO ANSWER": (0.004, None, 0.0),
    "ASIAN - SOUTH EAST ASIAN": (0.005, "VIETNAMESE", 0.35),
    "PORTUGUESE": (0.005, "PORTUGUESE", 0.4),
    "WHITE - EASTERN EUROPEAN": (0.004, "RUSSIAN", 0.1),
    "ASIAN - ASIAN INDIAN": (0.004, None, 0.0),
    "HISPANIC/LATINO - GUATEMALAN": (0.003, "SPANISH", 0.5),
    "HISPANIC/LATINO - SALVADORAN": (0.003, "SPANISH", 0.5),
    "WHITE - BRAZILIAN": (0.003, "PORTUGUESE", 0.4),
    "BLACK/AFRICAN": (0.003, None, 0.0),
    "MULTIPLE RACE/ETHNICITY": (0.002, None, 0.0),
    "AMERICAN INDIAN/ALASKA NATIVE": (0.002, None, 0.0),
    "SOUTH AMERICAN": (0.001, "SPANISH", 0.4),
    "HISPANIC/LATINO - MEXICAN": (0.001, "SPANISH", 0.5),
    "ASIAN - KOREAN": (0.001, None, 0.0),
    "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER": (0.001, None, 0.0),
}


def categorical(rng: np.random.Generator, weights: np.ndarray, group: np.ndarray | int) -> np.ndarray:
    """Draws value indices; ``weights`` is (groups, values) and ``group`` picks each draw's row (or is a size)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    cumulative = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)
    group = np.zeros(group, dtype=np.int64) if np.isscalar(group) else group
    draws = rng.random(len(group))
    index = np.zeros(len(group), dtype=np.int64)
    for column in range(weights.shape[1] - 1):  # a loop over values, not rows
        index += draws >= cumulative[group, column]
    return index


def provider_ids(rng: np.random.Generator, size: int) -> list[str]:
    """MIMIC-IV-like admitting provider ids: ``P`` and five base-36 characters."""
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    letters = alphabet[rng.integers(0, 36, (size, 5))]
    return sorted({"P" + "".join(row) for row in letters})


def is_integer(value: object) -> bool:
    """An int or numpy integer, not a bool: the check of the writers' patient counts and seeds."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def write_csv_gz(frame: pl.DataFrame, path: Path) -> None:
    """gzip with mtime 0 and no file name in the header, so that the same frame always gives the same bytes."""
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as stream:
            frame.write_csv(stream, datetime_format=TIME_FORMAT, date_format="%Y-%m-%d")


def readme_opens_with(folder: str | Path, title: str) -> bool:
    """Whether ``folder/README.md`` exists and its first line is ``title``: how the demo writers mark their output."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return False
    with open(readme, encoding="utf-8") as handle:
        return handle.readline().rstrip("\n") == title
