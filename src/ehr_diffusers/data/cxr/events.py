"""Chest and cardiopulmonary MIMIC-IV events between two chest X-rays, written as text for EHRXDiff triplets.

Input: a MIMIC-IV release folder as PhysioNet ships it (``<root>/hosp/<table>.csv.gz``, ``<root>/icu/<table>.csv.gz``;
``.csv`` and ``.parquet`` copies are read too, as are tables directly under ``<root>``) and the triplets' windows
(``triplet_id``, ``subject_id``, ``hadm_id``, ``window_start`` = previous image, ``window_end`` = target image; see
:mod:`~ehr_diffusers.data.cxr.triplets`). Every event table present is read, any absent one skipped (at least one is
needed):

==================  ======  ==========================  ===========================================================
table               folder  event time                  text after ``table, ``
==================  ======  ==========================  ===========================================================
labevents           hosp    charttime                   label, value, valueuom, flag
prescriptions       hosp    starttime                   drug, dose_val_rx, dose_unit_rx, route
microbiologyevents  hosp    charttime, else chartdate   spec_type_desc, test_name, org_name, ab_name, interpretation
chartevents         icu     charttime                   label, value, valueuom
inputevents         icu     starttime                   label, amount, amountuom, rate, rateuom
outputevents        icu     charttime                   label, value, valueuom
procedureevents     icu     starttime                   label, value, valueuom
==================  ======  ==========================  ===========================================================

A date-only ``chartdate`` stands for the last microsecond of that day, so a specimen of unknown hour is never
placed before an image of the same day that it may have followed.

Required columns: the ones above, ``subject_id``, ``itemid`` where a label is written, and ``hadm_id`` (an icu table
without it gets it from ``icu/icustays`` through ``stay_id``, or is matched by subject alone). Ids and times are
parsed strictly; problems raise :class:`~ehr_diffusers.data.mimic.MimicFormatError` naming the file and the column.

Only listed items are kept (:func:`load_item_lists`, packaged lists in ``items/``), and of prescriptions only
those given by a route that reaches the body as a whole (``LOCAL_ROUTES``, eye drops and the like, are left out).
Each event becomes one string in the GenHPF style, e.g.
``labevents, label pO2, value 62, valueuom mm Hg, flag abnormal, time -5.5 h``: the table, then ``column value`` for
every non-empty column in the order above (item ids replaced by the list's label, values as written in the file
with surrounding spaces removed, parquet floats without a trailing ``.0``), then the time relative to
``window_end`` in hours with one decimal.

An event belongs to a triplet when it is of the triplet's admission (same ``hadm_id``; an event without ``hadm_id``:
same ``subject_id``) and ``window_start <= time < window_end``: charted at the previous image or later, and strictly
before the target image, whose own time is not known beforehand. A triplet's events are sorted by time (ties: table
order above, then text) and the last ``max_events``, those closest to the target image, are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ..mimic import MimicFormatError, find_table, parse_column, scan_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventTable:
    """One event table: its folder, the column its item list filters, its time and the columns written."""

    module: str
    match: str
    times: tuple[str, ...]
    shown: tuple[str, ...]
    dictionary: str | None = None


EVENT_TABLES: dict[str, EventTable] = {
    "labevents": EventTable("hosp", "itemid", ("charttime",), ("value", "valueuom", "flag"), "d_labitems"),
    "prescriptions": EventTable("hosp", "drug", ("starttime",), ("dose_val_rx", "dose_unit_rx", "route")),
    "microbiologyevents": EventTable("hosp", "spec_type_desc", ("charttime", "chartdate"),
                                     ("test_name", "org_name", "ab_name", "interpretation")),
    "chartevents": EventTable("icu", "itemid", ("charttime",), ("value", "valueuom"), "d_items"),
    "inputevents": EventTable("icu", "itemid", ("starttime",), ("amount", "amountuom", "rate", "rateuom"), "d_items"),
    "outputevents": EventTable("icu", "itemid", ("charttime",), ("value", "valueuom"), "d_items"),
    "procedureevents": EventTable("icu", "itemid", ("starttime",), ("value", "valueuom"), "d_items"),
}
DICTIONARY_MODULES = {"d_labitems": "hosp", "d_items": "icu"}
# Prescription routes that act locally (eye, ear, skin, vagina, irrigation): ciprofloxacin eye drops or a lidocaine-
# epinephrine skin injection say nothing about the chest. MIMIC-IV route codes as recalled, not checked against data.
LOCAL_ROUTES = frozenset({"TP", "OU", "OS", "OD", "BOTH EYES", "LEFT EYE", "RIGHT EYE", "AU", "AS", "AD", "BOTH EARS",
                          "LEFT EAR", "RIGHT EAR", "VG", "IRR", "ID", "EX"})
TIME_SUFFIX = r", time -?[0-9]+(\.[0-9]+)? h$"
# Columns of each item list file, by the event column it filters; a "note" column is allowed and ignored.
LIST_COLUMNS = {"itemid": ("itemid", "label", "group"), "drug": ("pattern", "group"),
                "spec_type_desc": ("spec_type_desc", "group")}
WINDOW_COLUMNS: dict[str, pl.DataType] = {"triplet_id": pl.Int64(), "subject_id": pl.Int64(), "hadm_id": pl.Int64(),
                                          "window_start": pl.Datetime("us"), "window_end": pl.Datetime("us")}
PACKAGED_ITEMS = "data/cxr/items"


@dataclass(frozen=True)
class ItemLists:
    """Per event table, the listed items (columns of ``LIST_COLUMNS``) and the file they were read from."""

    lists: dict[str, pl.DataFrame]
    sources: dict[str, str]


def _read_list(table: str, data: bytes, source: str) -> pl.DataFrame:
    """One item list file, checked: required columns present and non-empty, ids integers, no entry listed twice."""
    columns = LIST_COLUMNS[EVENT_TABLES[table].match]
    try:
        frame = pl.read_csv(data, comment_prefix="#", infer_schema=False)
    except pl.exceptions.PolarsError as error:
        raise MimicFormatError(f"{source}: cannot be read as a CSV item list ({error})") from error
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise MimicFormatError(f"{source}: missing required column(s) {', '.join(missing)}")
    frame = frame.select([pl.col(column).str.strip_chars() for column in columns])
    for column in columns:
        empty = frame.filter(pl.col(column).is_null() | (pl.col(column) == ""))
        if empty.height:
            raise MimicFormatError(f"{source}: column {column} is empty in {empty.height} row(s)")
    if columns[0] == "itemid":
        bad = frame.filter(pl.col("itemid").cast(pl.Int64, strict=False).is_null())
        if bad.height:
            shown = bad["itemid"].head(3).to_list()
            raise MimicFormatError(f"{source}: column itemid has non-integer value(s) {shown}")
        frame = frame.with_columns(pl.col("itemid").cast(pl.Int64))
    key = pl.col(columns[0]).cast(pl.String).str.to_lowercase()
    repeated = frame.filter(key.is_duplicated())[columns[0]].unique().head(3).to_list()
    if repeated:
        raise MimicFormatError(f"{source}: column {columns[0]} lists {repeated} more than once")
    return frame


def load_item_lists(folder: str | Path | None = None) -> ItemLists:
    """The packaged item lists, each replaced by the file of the same name in ``folder`` when there is one.

    A per-file override lets a user change one list without copying the others; an unknown file name in ``folder``
    is an error, because a misspelt override would otherwise be ignored silently.
    """
    user = Path(folder) if folder is not None else None
    if user is not None:
        if not user.is_dir():
            raise MimicFormatError(f"{user}: item list folder not found")
        unknown = sorted(path.name for path in user.glob("*.csv") if path.stem not in EVENT_TABLES)
        if unknown:
            raise MimicFormatError(f"{user}: unknown item list file(s) {', '.join(unknown)}; expected "
                                   f"{', '.join(f'{table}.csv' for table in EVENT_TABLES)}")
    packaged = resources.files("ehr_diffusers").joinpath(PACKAGED_ITEMS)
    lists, sources = {}, {}
    for table in EVENT_TABLES:
        if user is not None and (user / f"{table}.csv").is_file():
            path = user / f"{table}.csv"
            data, source = path.read_bytes(), str(path)
            logger.info("%s: item list from %s", table, path)
        else:
            data, source = packaged.joinpath(f"{table}.csv").read_bytes(), f"ehr_diffusers/{PACKAGED_ITEMS}/{table}.csv"
        lists[table], sources[table] = _read_list(table, data, source), source
    return ItemLists(lists, sources)


def _text(column: str, dtype: pl.DataType) -> pl.Expr:
    """``column value`` as written in the text, or null when the value is empty (then the pair is left out)."""
    text = pl.col(column).cast(pl.String)
    if dtype.is_float():
        text = text.str.replace(r"\.0$", "")  # parquet copies hold numbers: 40.0 is written 40, as in the CSV
    text = text.str.strip_chars()
    return pl.when(text != "").then(pl.concat_str([pl.lit(f"{column} "), text]))


def _collect(frame: pl.LazyFrame, path: Path, raw: pl.LazyFrame, typed: dict[str, pl.DataType]) -> pl.DataFrame:
    """Collects ``frame``; on a type error, parses each column of ``raw`` alone to name the one at fault."""
    try:
        return frame.collect(engine="streaming")
    except pl.exceptions.PolarsError as error:
        for column, dtype in typed.items():
            try:
                raw.select(parse_column(column, dtype)).collect()
            except pl.exceptions.PolarsError as column_error:
                first_line = str(column_error).strip().splitlines()[0]
                raise MimicFormatError(f"{path}: column {column} has a value that is not {dtype} ({first_line})"
                                       ) from error
        raise MimicFormatError(f"{path}: cannot be read ({str(error).strip().splitlines()[0]})") from error


def _check_windows(windows: pl.DataFrame) -> pl.DataFrame:
    """The windows in the types used here, refusing missing columns, repeated triplets and empty windows."""
    missing = [column for column in WINDOW_COLUMNS if column not in windows.columns]
    if missing:
        raise ValueError(f"windows: missing column(s) {', '.join(missing)}")
    for column in ("window_start", "window_end"):
        dtype = windows.schema[column]
        if not isinstance(dtype, pl.Datetime) or dtype.time_zone is not None:
            raise ValueError(f"windows: column {column} must be a Datetime without time zone (MIMIC time), got {dtype}")
    try:
        windows = windows.select([pl.col(column).cast(dtype) for column, dtype in WINDOW_COLUMNS.items()])
    except pl.exceptions.PolarsError as error:
        raise ValueError(f"windows: an id column is not an integer ({error})") from error
    for column in ("triplet_id", "subject_id", "window_start", "window_end"):
        if windows[column].null_count():
            raise ValueError(f"windows: column {column} is empty in {windows[column].null_count()} row(s)")
    if windows["triplet_id"].is_duplicated().any():
        raise ValueError(f"windows: triplet_id {windows.filter(pl.col('triplet_id').is_duplicated())['triplet_id'][0]} "
                         "is listed more than once")
    empty = windows.filter(pl.col("window_start") >= pl.col("window_end"))
    if empty.height:
        raise ValueError(f"windows: window_start must be before window_end; triplet {empty['triplet_id'][0]} and "
                         f"{empty.height - 1} other(s) are not")
    return windows


def _stays(root: Path) -> pl.LazyFrame | None:
    """``icu/icustays`` as stay_id -> hadm_id, or None when absent."""
    path = find_table((root / "icu", root), "icustays")
    if path is None:
        return None
    return scan_table(path, ("stay_id", "hadm_id")).select(parse_column("stay_id", pl.Int64()),
                                                            parse_column("hadm_id", pl.Int64()))


def _read_table(root: Path, table: str, path: Path, items: pl.DataFrame, windows: pl.DataFrame,
                spans: pl.DataFrame) -> pl.DataFrame:
    """The listed events of ``table`` that can fall in a window: of the windows' admissions, or without hadm_id and
    within the span of their subject's windows. Filtered lazily before anything is collected.

    Returns ``subject_id``, ``hadm_id``, ``time`` (null when the file has none), ``group``, ``text`` (without time).
    """
    spec = EVENT_TABLES[table]
    label = "label" if spec.match == "itemid" else spec.match
    required = ["subject_id", spec.match, *spec.times, *spec.shown] + (["hadm_id"] if spec.module == "hosp" else [])
    raw = scan_table(path, required, ("hadm_id", "stay_id"))
    schema = raw.collect_schema()
    typed: dict[str, pl.DataType] = {column: pl.Int64() for column in ("subject_id", "hadm_id") if column in schema}
    frame = raw.with_columns([parse_column(column, dtype) for column, dtype in typed.items()])
    if "hadm_id" not in schema:
        stays = _stays(root) if "stay_id" in schema else None
        if stays is None:
            logger.warning("%s: no hadm_id column (nor stay_id with icu/icustays): events placed by subject and time",
                           path)
            frame = frame.with_columns(pl.lit(None, dtype=pl.Int64).alias("hadm_id"))
        else:
            logger.info("%s: hadm_id taken from icu/icustays through stay_id", path)
            typed["stay_id"] = pl.Int64()
            frame = frame.with_columns(parse_column("stay_id", pl.Int64())).join(stays, on="stay_id", how="left")

    if spec.match == "itemid":
        typed["itemid"] = pl.Int64()
        frame = frame.with_columns(parse_column("itemid", pl.Int64())).join(
            items.select("itemid", "label", "group").lazy(), on="itemid", how="inner")
    elif spec.match == "drug":
        drug = pl.col("drug").cast(pl.String).str.to_lowercase()
        groups = [pl.when(drug.str.contains(pattern.lower(), literal=True)).then(pl.lit(group))
                  for pattern, group in items.select("pattern", "group").iter_rows()]
        group = pl.coalesce(groups) if groups else pl.lit(None, dtype=pl.String)
        route = pl.col("route").cast(pl.String).str.strip_chars().str.to_uppercase()
        frame = frame.with_columns(group.alias("group")).filter(
            pl.col("group").is_not_null() & (route.is_null() | ~route.is_in(list(LOCAL_ROUTES))))
    else:
        wanted = items.select(pl.col("spec_type_desc").str.to_uppercase().alias("_spec"), "group")
        frame = (frame.with_columns(pl.col("spec_type_desc").cast(pl.String).str.strip_chars().str.to_uppercase()
                                    .alias("_spec"))
                 .join(wanted.lazy(), on="_spec", how="inner"))

    hadm_ids = windows["hadm_id"].drop_nulls().unique().implode()
    subjects = windows["subject_id"].unique().implode()
    frame = frame.filter(pl.col("hadm_id").is_in(hadm_ids)
                         | (pl.col("hadm_id").is_null() & pl.col("subject_id").is_in(subjects)))
    for column in spec.times:
        typed[column] = pl.Datetime("us")
    # a date-only fallback (microbiology's chartdate) stands for the end of that day: the specimen may have been
    # taken after an image of the same day, and placing it at midnight would let it precede that image
    times = [parse_column(column, pl.Datetime("us")) + (pl.duration(days=1) - pl.duration(microseconds=1)
                                                   if column == "chartdate" else pl.duration(microseconds=0))
             for column in spec.times]
    time = pl.coalesce(times).alias("time")
    frame = (frame.with_columns(time)
             .join(spans.lazy(), on="subject_id", how="left")
             .filter(pl.col("hadm_id").is_not_null() | pl.col("time").is_null()  # timeless: counted, then dropped
                     | ((pl.col("time") >= pl.col("span_start")) & (pl.col("time") < pl.col("span_end")))))
    parts = [pl.lit(table)] + [_text(column, pl.String() if column == "label" else schema[column])
                               for column in (label, *spec.shown)]
    frame = frame.select("subject_id", "hadm_id", "time", pl.col("group").cast(pl.String),
                         pl.concat_str(parts, separator=", ", ignore_nulls=True).alias("text"))
    return _collect(frame, path, raw, typed)


def _check_item_lists(root: Path, tables: list[str], items: ItemLists) -> dict[str, dict[str, list]]:
    """Listed ids absent from ``d_labitems`` / ``d_items``, and labels that differ there: how a wrong id shows up."""
    problems: dict[str, dict[str, list]] = {}
    for dictionary, module in DICTIONARY_MODULES.items():
        checked = [table for table in tables if EVENT_TABLES[table].dictionary == dictionary]
        path = find_table((root / module, root), dictionary)
        if not checked or path is None:
            continue
        raw = scan_table(path, ("itemid", "label"))
        labels = _collect(raw.select(parse_column("itemid", pl.Int64()),
                                     pl.col("label").cast(pl.String).str.strip_chars().alias("dictionary_label")),
                          path, raw, {"itemid": pl.Int64()})
        for table in checked:
            listed = items.lists[table].join(labels.unique("itemid"), on="itemid", how="left")
            absent = listed.filter(pl.col("dictionary_label").is_null())["itemid"].to_list()
            same = pl.col("label").str.to_lowercase() == pl.col("dictionary_label").str.to_lowercase()
            differs = listed.filter(pl.col("dictionary_label").is_not_null() & ~same)
            if absent or differs.height:
                logger.warning("%s: %d listed id(s) not in %s %s, %d with another label there %s; check the list",
                               items.sources[table], len(absent), path, absent[:5], differs.height,
                               differs.select("itemid", "dictionary_label").head(5).rows())
                problems[table] = {"not_in_dictionary": absent,
                                   "label_differs": differs.select("itemid", "label", "dictionary_label").to_dicts()}
    return problems


def _assign(events: pl.DataFrame, windows: pl.DataFrame, max_events: int) -> tuple[pl.DataFrame, pl.DataFrame,
                                                                                    np.ndarray]:
    """Which events each window holds, without a cross join: ``events`` are sorted by ``key`` then time with row
    index ``idx``, so the events of a window are the index range [lo, hi) found by two as-of joins.

    Each window is looked up twice, under ``key`` = its hadm_id (events with one) and ``key`` = -subject_id (events
    without: their key is -subject_id, and ids are positive so the two never collide). Returns the (triplet_id, idx)
    pairs of the last ``max_events`` events of each range, the events in each triplet's window before truncation,
    and whether any window holds each event.
    """
    keyed = pl.concat([windows.select("triplet_id", "window_start", "window_end", key=pl.col("hadm_id")),
                       windows.select("triplet_id", "window_start", "window_end", key=-pl.col("subject_id"))]
                      ).drop_nulls("key")
    first = events.group_by("key").agg(first=pl.col("idx").min())
    by_time = events.select("key", "time", "idx").sort("time", "idx")
    for bound, name in (("window_start", "lo"), ("window_end", "hi")):
        # The last event strictly before the bound (ties: the highest idx), so the range starts or ends just after.
        keyed = (keyed.sort(bound)
                 .join_asof(by_time.rename({"idx": name}), left_on=bound, right_on="time", by="key",
                            strategy="backward", allow_exact_matches=False, check_sortedness=False)
                 .drop("time"))
    keyed = (keyed.join(first, on="key", how="left")
             .with_columns([pl.coalesce(pl.col(name) + 1, pl.col("first"), pl.lit(0)).cast(pl.Int64).alias(name)
                            for name in ("lo", "hi")])
             .with_columns((pl.col("hi") - pl.col("lo")).alias("n")))
    counted = keyed.filter(pl.col("n") > 0)
    change = np.zeros(events.height + 1, dtype=np.int64)
    np.add.at(change, counted["lo"].to_numpy(), 1)
    np.add.at(change, counted["hi"].to_numpy(), -1)
    held = np.cumsum(change)[:-1] > 0
    start = pl.max_horizontal("lo", pl.col("hi") - max_events)
    picked = counted.select("triplet_id", pl.int_ranges(start, "hi").alias("idx")).explode("idx")
    in_window = counted.group_by("triplet_id").agg(pl.col("n").sum().alias("in_window"))
    return picked, in_window, held


def _per_table(frame: pl.DataFrame, tables: list[str]) -> dict[str, int]:
    """Row counts of ``frame`` by its ``table`` column, every table listed (zero when absent)."""
    counts = dict(frame.group_by("table").len().iter_rows()) if frame.height else {}
    return {table: int(counts.get(table, 0)) for table in tables}


def event_content(texts: pl.Expr) -> pl.Expr:
    """Event texts without their relative time: what gets embedded, so the same event at another time shares one
    vector (the time is kept in ``event_hours``)."""
    return texts.str.replace(TIME_SUFFIX, "")


def render_events(mimic_dir: str | Path, windows: pl.DataFrame, *, max_events: int = 1024,
                  items: ItemLists | None = None, show_progress: bool = True) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The listed events of each triplet's window as text (module docstring), and a summary of every count.

    Returns one row per triplet, in the order of ``windows``: ``triplet_id``, ``event_texts`` (list of str, oldest
    first), ``event_hours`` (list of float32, hours before ``window_end``, so negative) and ``event_tables`` (list of
    str); a triplet without events has empty lists. Summary: ``tables_used``, ``tables_missing``, ``item_lists``
    (file per table), ``item_list_problems``, per table ``rows_read`` (after filtering to listed items and the
    windows' admissions), ``events_without_time``, ``events_outside_windows`` (events held by no window),
    ``events_of_subjects_not_in_patients`` (None without ``hosp/patients``; kept, reported) and ``events_kept``
    ((triplet, event) pairs); ``events_kept_by_group``, ``events_truncated`` (dropped by ``max_events``),
    ``triplets``, ``triplets_without_events``, ``events_per_triplet_mean`` and ``_median``, ``max_events``.
    """
    if max_events < 1:
        raise ValueError(f"max_events must be at least 1, got {max_events}")
    root = Path(mimic_dir)
    if not root.is_dir():
        raise MimicFormatError(f"{root}: MIMIC-IV folder not found")
    windows = _check_windows(windows)
    items = items or load_item_lists()
    paths = {table: find_table((root / spec.module, root), table) for table, spec in EVENT_TABLES.items()}
    used = [table for table, path in paths.items() if path is not None]
    missing = [table for table, path in paths.items() if path is None]
    if not used:
        raise MimicFormatError(f"{root}: none of the MIMIC-IV event tables {', '.join(EVENT_TABLES)} found under "
                               "hosp/ or icu/ (.csv.gz, .csv or .parquet)")
    logger.info("%s: events from %s; absent, skipped: %s", root, ", ".join(used), ", ".join(missing) or "none")
    summary: dict[str, Any] = {"tables_used": used, "tables_missing": missing, "max_events": max_events,
                               "item_lists": {table: items.sources[table] for table in used},
                               "item_list_problems": _check_item_lists(root, used, items)}

    spans = windows.group_by("subject_id").agg(pl.col("window_start").min().alias("span_start"),
                                                pl.col("window_end").max().alias("span_end"))
    frames = []
    bar = tqdm(used, desc="cxr events", unit="table", disable=not show_progress)
    for rank, table in enumerate(bar):
        bar.set_postfix_str(table)
        frame = _read_table(root, table, paths[table], items.lists[table], windows, spans)
        logger.info("%s: %d row(s) of listed items in the windows' admissions", paths[table], frame.height)
        frames.append(frame.with_columns(pl.lit(table).alias("table"), pl.lit(rank, dtype=pl.Int8).alias("rank")))
    bar.close()
    events = pl.concat(frames)
    summary["rows_read"] = _per_table(events, used)

    timeless = events.filter(pl.col("time").is_null())
    summary["events_without_time"] = _per_table(timeless, used)
    if timeless.height:
        logger.warning("%d event(s) of the windows' admissions have no time and are left out: %s", timeless.height,
                       {table: n for table, n in summary["events_without_time"].items() if n})
    events = events.drop_nulls("time")

    patients_path = find_table((root / "hosp", root), "patients")
    if patients_path is None:
        logger.info("%s: hosp/patients not found, events' subjects not checked", root)
        summary["events_of_subjects_not_in_patients"] = None
    else:
        raw = scan_table(patients_path, ("subject_id",))
        patients = _collect(raw.select(parse_column("subject_id", pl.Int64())), patients_path, raw,
                            {"subject_id": pl.Int64()})["subject_id"]
        unknown = events.filter(~pl.col("subject_id").is_in(patients.implode()))
        summary["events_of_subjects_not_in_patients"] = _per_table(unknown, used)
        if unknown.height:
            logger.warning("%d event(s) of %d subject(s) not in %s (e.g. subject %d) are kept; check the extract",
                           unknown.height, unknown["subject_id"].n_unique(), patients_path, unknown["subject_id"][0])

    events = (events.with_columns(pl.coalesce("hadm_id", -pl.col("subject_id")).alias("key"))
              .sort("key", "time", "rank", "text", maintain_order=True)
              .with_row_index("idx")
              .with_columns(pl.col("idx").cast(pl.Int64)))
    picked, in_window, held = _assign(events, windows, max_events)
    summary["events_outside_windows"] = _per_table(events.filter(pl.Series(~held)), used)

    # Each key's range holds at most max_events; a triplet with events under both keys is cut again here.
    last = pl.int_range(pl.len()).over("triplet_id") >= pl.len().over("triplet_id").cast(pl.Int64) - max_events
    kept = (picked.join(events.select("idx", "time", "rank", "table", "group", "text"), on="idx")
            .join(windows.select("triplet_id", "window_end"), on="triplet_id")
            .sort("triplet_id", "time", "rank", "text")
            .filter(last)
            .with_columns(((pl.col("time") - pl.col("window_end")).dt.total_microseconds() / 3.6e9).alias("hours")))
    kept = kept.with_columns(pl.format("{}, time {} h", "text", pl.col("hours").round(1)).alias("text"),
                             pl.col("hours").cast(pl.Float32))
    summary["events_kept"] = _per_table(kept, used)
    summary["events_kept_by_group"] = dict(sorted(kept.group_by("group").len().iter_rows())) if kept.height else {}
    summary["events_truncated"] = int(in_window["in_window"].sum()) - kept.height

    lists = kept.group_by("triplet_id", maintain_order=True).agg(pl.col("text").alias("event_texts"),
                                                                 pl.col("hours").alias("event_hours"),
                                                                 pl.col("table").alias("event_tables"))
    empty = {"event_texts": pl.String(), "event_hours": pl.Float32(), "event_tables": pl.String()}
    out = (windows.select("triplet_id").join(lists, on="triplet_id", how="left", maintain_order="left")
           .with_columns([pl.col(name).fill_null(pl.lit([], dtype=pl.List(dtype))) for name, dtype in empty.items()]))
    counts = out["event_texts"].list.len()
    summary.update({
        "triplets": out.height,
        "triplets_without_events": int((counts == 0).sum()),
        "events_per_triplet_mean": float(counts.mean()) if out.height else None,
        "events_per_triplet_median": float(counts.median()) if out.height else None,
    })
    logger.info("%d triplet(s), %d without events; %d event(s) kept, %d truncated by max_events=%d", out.height,
                summary["triplets_without_events"], kept.height, summary["events_truncated"], max_events)
    return out, summary
