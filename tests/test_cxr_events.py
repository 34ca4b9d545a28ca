"""cxr_events on a hand-written MIMIC-IV folder whose every event, window and count is known."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from ehr_diffusers.data.cxr.events import EVENT_TABLES, LIST_COLUMNS, load_item_lists, render_events
from ehr_diffusers.data.mimic import MimicFormatError

S1, S2, S3 = 10000001, 10000002, 10000003  # S3 has events but is not in patients

PATIENTS = f"""subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
{S1},F,60,2150,2008 - 2010,
{S2},M,45,2160,2017 - 2019,
"""
D_LABITEMS = """itemid,label,fluid,category
50820,pH,Blood,Blood Gas
50821,pO2,Blood,Blood Gas
50889,C-Reactive Protein,Blood,Chemistry
50912,Creatinine,Blood,Chemistry
"""
# L2 at T10's start, L3 at T10's end, L4 unlisted, L5 without hadm_id, L6 before every window, L7 of S3,
# L8 of another admission, L9 without time.
LABEVENTS = f"""labevent_id,subject_id,hadm_id,specimen_id,itemid,charttime,storetime,value,valuenum,valueuom,ref_range_lower,ref_range_upper,flag,priority,comments
1,{S1},21,1,50821,2150-01-01 18:30:00,,62,62,mm Hg,85,105,abnormal,STAT,
2,{S1},21,2,50820,2150-01-01 00:00:00,,7.31,7.31,units,7.35,7.45,abnormal,STAT,
3,{S1},21,3,50821,2150-01-02 00:00:00,,70,70,mm Hg,85,105,abnormal,STAT,
4,{S1},21,4,50912,2150-01-01 10:00:00,,1.1,1.1,mg/dL,0.4,1.1,,ROUTINE,
5,{S1},,5,50889,2150-01-01 20:00:00,,12.5,12.5,mg/L,0,5,abnormal,ROUTINE,
6,{S1},21,6,50820,2149-12-31 10:00:00,,7.40,7.4,units,7.35,7.45,,STAT,
7,{S3},23,7,50821,2170-01-01 05:00:00,,80,80,mm Hg,85,105,abnormal,STAT,
8,{S1},99,8,50821,2150-01-01 18:00:00,,90,90,mm Hg,85,105,,STAT,
9,{S1},21,9,50821,,,75,75,mm Hg,85,105,abnormal,STAT,
"""
PRESCRIPTIONS = f"""subject_id,hadm_id,pharmacy_id,poe_id,starttime,stoptime,drug_type,drug,gsn,ndc,prod_strength,dose_val_rx,dose_unit_rx,route
{S1},21,1,p1,2150-01-01 08:00:00,2150-01-01 09:00:00,MAIN,Furosemide,1,1,40mg/4mL Vial,40,mg,IV
{S1},21,2,p2,2150-01-01 09:00:00,2150-01-01 10:00:00,MAIN,Acetaminophen,2,2,325mg Tab,650,mg,PO
{S1},21,3,p3,2150-01-01 09:30:00,2150-01-01 10:00:00,MAIN,Ciprofloxacin 0.3% Ophth Soln,3,3,2.5mL Bottle,1,DROP,BOTH EYES
"""
# M3 has no charttime: its chartdate (midnight, T10's start) is its time; its spec_type_desc is in another case.
MICROBIOLOGY = f"""microevent_id,subject_id,hadm_id,micro_specimen_id,chartdate,charttime,spec_itemid,spec_type_desc,test_name,org_name,ab_name,interpretation
1,{S1},21,1,2150-01-01 00:00:00,2150-01-01 14:30:00,70070,SPUTUM,GRAM STAIN,,,
2,{S1},21,2,2150-01-01 00:00:00,,70079,URINE,URINE CULTURE,,,
3,{S1},21,3,2150-01-01 00:00:00,,70013,bronchoalveolar lavage ,RESPIRATORY CULTURE,STAPH AUREUS COAG +,OXACILLIN,S
"""
D_ITEMS = """itemid,label,abbreviation,linksto,category,unitname,param_type,lownormalvalue,highnormalvalue
220045,Heart Rate,HR,chartevents,Routine Vital Signs,bpm,Numeric,,
220277,O2 saturation pulseoxymetry,SpO2,chartevents,Respiratory,%,Numeric,,
225792,Invasive Ventilation,Invasive Ventilation,procedureevents,2-Ventilation,,Process,,
"""
CHARTEVENTS = f"""subject_id,hadm_id,stay_id,caregiver_id,charttime,storetime,itemid,value,valuenum,valueuom,warning
{S1},21,31,1,2150-01-01 21:00:00,,220277,91,91,%,0
{S1},21,31,1,2150-01-01 21:00:00,,220045,88,88,bpm,0
{S1},21,31,1,2150-01-01 21:00:00,,226999,5,5,,0
"""
PROCEDUREEVENTS = f"""subject_id,hadm_id,stay_id,caregiver_id,starttime,endtime,storetime,itemid,value,valueuom,location,orderid
{S1},21,31,1,2150-01-01 22:00:00,2150-01-02 22:00:00,,225792,1440,min,,1
"""
TABLES = {"hosp/patients": PATIENTS, "hosp/d_labitems": D_LABITEMS, "hosp/labevents": LABEVENTS,
          "hosp/prescriptions": PRESCRIPTIONS, "hosp/microbiologyevents": MICROBIOLOGY, "icu/d_items": D_ITEMS,
          "icu/chartevents": CHARTEVENTS, "icu/procedureevents": PROCEDUREEVENTS}


def write_mimic(root: Path, tables: dict[str, str] = TABLES, suffix: str = ".csv.gz") -> Path:
    """Writes ``tables`` as MIMIC-IV files; parquet copies get typed columns (ints, floats, datetimes) as
    converters make them."""
    for name, text in tables.items():
        path = root / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            pl.read_csv(io.StringIO(text), try_parse_dates=True).write_parquet(path)
        else:
            pl.read_csv(io.StringIO(text), infer_schema=False).write_csv(path, compression="gzip")
    return root


def windows() -> pl.DataFrame:
    return pl.DataFrame({
        "triplet_id": [10, 11, 12, 13],
        "subject_id": [S1, S1, S2, S3],
        "hadm_id": [21, 21, 22, 23],
        "window_start": [datetime(2150, 1, 1), datetime(2150, 1, 1, 12), datetime(2160, 5, 1), datetime(2170, 1, 1)],
        "window_end": [datetime(2150, 1, 2), datetime(2150, 1, 3), datetime(2160, 5, 1, 12), datetime(2170, 1, 1, 10)],
    }, schema_overrides={"window_start": pl.Datetime("us"), "window_end": pl.Datetime("us")})


@pytest.fixture
def mimic(tmp_path: Path) -> Path:
    return write_mimic(tmp_path / "mimic-iv")


def _rows(frame: pl.DataFrame) -> dict[int, dict]:
    return {row["triplet_id"]: row for row in frame.iter_rows(named=True)}


T10 = [
    "labevents, label pH, value 7.31, valueuom units, flag abnormal, time -24.0 h",
    "prescriptions, drug Furosemide, dose_val_rx 40, dose_unit_rx mg, route IV, time -16.0 h",
    "microbiologyevents, spec_type_desc SPUTUM, test_name GRAM STAIN, time -9.5 h",
    "labevents, label pO2, value 62, valueuom mm Hg, flag abnormal, time -5.5 h",
    "labevents, label C-Reactive Protein, value 12.5, valueuom mg/L, flag abnormal, time -4.0 h",
    "chartevents, label Heart Rate, value 88, valueuom bpm, time -3.0 h",
    "chartevents, label O2 saturation pulseoxymetry, value 91, valueuom %, time -3.0 h",
    "procedureevents, label Invasive Ventilation, value 1440, valueuom min, time -2.0 h",
    "microbiologyevents, spec_type_desc bronchoalveolar lavage, test_name RESPIRATORY CULTURE, "
    "org_name STAPH AUREUS COAG +, ab_name OXACILLIN, interpretation S, time -0.0 h",
]


def test_renders_events_per_table_sorted_within_windows(mimic):
    events, summary = render_events(mimic, windows(), show_progress=False)
    assert events.columns == ["triplet_id", "event_texts", "event_hours", "event_tables"]
    assert events["triplet_id"].to_list() == [10, 11, 12, 13]
    assert events.schema["event_hours"] == pl.List(pl.Float32)
    rows = _rows(events)
    # Exact text per table; ties in time by table order, then text; pH at exactly window_start is kept and the
    # microbiology row without charttime sits at the end of its chartdate (it may have followed anything that day);
    # the event without hadm_id (CRP) is placed by subject.
    assert rows[10]["event_texts"] == T10
    assert rows[10]["event_tables"] == ["labevents", "prescriptions", "microbiologyevents", "labevents",
                                        "labevents", "chartevents", "chartevents", "procedureevents",
                                        "microbiologyevents"]
    assert rows[10]["event_hours"] == pytest.approx([-24, -16, -9.5, -5.5, -4, -3, -3, -2, 0], abs=1e-6)
    # pO2 at exactly T10's window_end is left out of T10 but is T11's last event; T11 starts at 12:00, after pH.
    assert rows[11]["event_texts"][-1] == "labevents, label pO2, value 70, valueuom mm Hg, flag abnormal, time -24.0 h"
    assert rows[11]["event_hours"] == pytest.approx([-33.5, -29.5, -28, -27, -27, -26, -24, -24])
    assert rows[12]["event_texts"] == [] and rows[12]["event_hours"] == [] and rows[12]["event_tables"] == []
    assert rows[13]["event_texts"] == ["labevents, label pO2, value 80, valueuom mm Hg, flag abnormal, time -5.0 h"]

    assert summary["tables_used"] == ["labevents", "prescriptions", "microbiologyevents", "chartevents",
                                      "procedureevents"]
    assert summary["tables_missing"] == ["inputevents", "outputevents"]
    # Listed items of the windows' admissions (creatinine, acetaminophen, urine, item 226999 and admission 99 are not).
    assert summary["rows_read"] == {"labevents": 7, "prescriptions": 1, "microbiologyevents": 2, "chartevents": 2,
                                    "procedureevents": 1}
    assert summary["events_without_time"]["labevents"] == 1
    assert summary["events_outside_windows"] == {"labevents": 1, "prescriptions": 0, "microbiologyevents": 0,
                                                 "chartevents": 0, "procedureevents": 0}
    assert summary["events_of_subjects_not_in_patients"]["labevents"] == 1
    assert summary["events_kept"]["labevents"] == 3 + 3 + 1 and sum(summary["events_kept"].values()) == 9 + 8 + 1
    assert summary["events_kept_by_group"]["blood_gas"] == 5 and summary["events_kept_by_group"]["diuretic"] == 1
    assert summary["events_truncated"] == 0 and summary["triplets_without_events"] == 1
    assert summary["events_per_triplet_mean"] == pytest.approx(18 / 4) and summary["events_per_triplet_median"] == 4.5
    # The tiny dictionaries hold few of the listed ids: those absent are reported, no label differs.
    problems = summary["item_list_problems"]
    assert set(problems) == {"labevents", "chartevents", "procedureevents"}
    assert 50821 not in problems["labevents"]["not_in_dictionary"]
    assert 50818 in problems["labevents"]["not_in_dictionary"]
    assert all(not problem["label_differs"] for problem in problems.values())


def test_unlisted_items_are_filtered_out(mimic):
    events, _ = render_events(mimic, windows(), show_progress=False)
    texts = " | ".join(text for row in events["event_texts"].to_list() for text in row)
    for absent in ("Creatinine", "Acetaminophen", "URINE", "226999", "value 5,", "value 90", "Ophth"):
        assert absent not in texts


def test_keeps_the_last_max_events(mimic):
    events, summary = render_events(mimic, windows(), max_events=3, show_progress=False)
    rows = _rows(events)
    assert rows[10]["event_texts"] == T10[-3:]
    assert len(rows[11]["event_texts"]) == 3 and rows[11]["event_hours"] == pytest.approx([-26, -24, -24])
    assert summary["events_truncated"] == (9 - 3) + (8 - 3)
    with pytest.raises(ValueError, match="max_events"):
        render_events(mimic, windows(), max_events=0, show_progress=False)


def test_subject_not_in_patients_is_counted_and_logged(mimic, caplog):
    with caplog.at_level(logging.WARNING, logger="ehr_diffusers.data.cxr.events"):
        events, summary = render_events(mimic, windows(), show_progress=False)
    assert summary["events_of_subjects_not_in_patients"]["labevents"] == 1
    assert len(_rows(events)[13]["event_texts"]) == 1  # kept, not dropped
    assert any("not in" in record.message and str(S3) in record.message for record in caplog.records)


def test_missing_tables_are_skipped_and_no_table_is_an_error(tmp_path):
    only_labs = write_mimic(tmp_path / "labs", {"hosp/labevents": LABEVENTS})
    events, summary = render_events(only_labs, windows(), show_progress=False)
    assert summary["tables_used"] == ["labevents"] and len(summary["tables_missing"]) == len(EVENT_TABLES) - 1
    assert summary["events_of_subjects_not_in_patients"] is None
    assert _rows(events)[10]["event_tables"] == ["labevents"] * 3
    empty = write_mimic(tmp_path / "empty", {"hosp/patients": PATIENTS})
    with pytest.raises(MimicFormatError, match=f"{empty}: none of the MIMIC-IV event tables"):
        render_events(empty, windows(), show_progress=False)


def test_missing_column_and_bad_value_name_file_and_column(tmp_path):
    no_flag = LABEVENTS.replace(",flag,", ",flags,", 1)
    root = write_mimic(tmp_path / "a", {"hosp/labevents": no_flag})
    with pytest.raises(MimicFormatError, match=r"labevents\.csv\.gz: missing required column\(s\) flag"):
        render_events(root, windows(), show_progress=False)
    bad_time = CHARTEVENTS.replace("2150-01-01 21:00:00,,220045", "yesterday,,220045")
    root = write_mimic(tmp_path / "b", {"icu/chartevents": bad_time})
    with pytest.raises(MimicFormatError, match=r"chartevents\.csv\.gz: column charttime"):
        render_events(root, windows(), show_progress=False)


def test_windows_are_checked(mimic):
    with pytest.raises(ValueError, match="missing column.*window_end"):
        render_events(mimic, windows().drop("window_end"), show_progress=False)
    swapped = windows().with_columns(pl.col("window_end").alias("window_start"),
                                     pl.col("window_start").alias("window_end"))
    with pytest.raises(ValueError, match="window_start must be before window_end"):
        render_events(mimic, swapped, show_progress=False)


def test_user_item_lists_override_the_packaged_ones(mimic, tmp_path):
    folder = tmp_path / "items"
    folder.mkdir()
    (folder / "labevents.csv").write_text("# only CRP\nitemid,label,group\n50889,CRP,inflammation\n")
    items = load_item_lists(folder)
    assert items.sources["labevents"] == str(folder / "labevents.csv")
    assert items.sources["chartevents"].endswith("cxr/items/chartevents.csv")
    events, summary = render_events(mimic, windows(), items=items, show_progress=False)
    texts = _rows(events)[10]["event_texts"]
    assert [text for text in texts if text.startswith("labevents")] == [
        "labevents, label CRP, value 12.5, valueuom mg/L, flag abnormal, time -4.0 h"]
    assert summary["item_list_problems"]["labevents"]["label_differs"] == [
        {"itemid": 50889, "label": "CRP", "dictionary_label": "C-Reactive Protein"}]

    (folder / "labevents.csv").write_text("itemid,name,group\n50889,CRP,inflammation\n")
    with pytest.raises(MimicFormatError, match=r"labevents\.csv: missing required column\(s\) label"):
        load_item_lists(folder)
    (folder / "labevents.csv").write_text("itemid,label,group\nCRP,CRP,inflammation\n")
    with pytest.raises(MimicFormatError, match="column itemid has non-integer"):
        load_item_lists(folder)
    (folder / "labevents.csv").unlink()
    (folder / "labevent.csv").write_text("itemid,label,group\n")
    with pytest.raises(MimicFormatError, match="unknown item list file.*labevent.csv"):
        load_item_lists(folder)


def test_packaged_item_lists_are_valid():
    items = load_item_lists()
    assert set(items.lists) == set(EVENT_TABLES)
    for table, frame in items.lists.items():
        assert 5 <= frame.height <= 60, table
        assert frame.columns == list(LIST_COLUMNS[EVENT_TABLES[table].match])
    assert {50818, 50820, 50821, 50802, 50813, 50889} <= set(items.lists["labevents"]["itemid"])
    assert {225792, 225794, 221214, 221216, 224385} <= set(items.lists["procedureevents"]["itemid"])
    assert set(items.lists["prescriptions"]["group"]) == {"antibiotic", "diuretic", "cardiopulmonary"}


def test_parquet_reads_like_csv(mimic, tmp_path):
    parquet = write_mimic(tmp_path / "parquet", suffix=".parquet")
    from_csv, csv_summary = render_events(mimic, windows(), show_progress=False)
    from_parquet, parquet_summary = render_events(parquet, windows(), show_progress=False)
    assert from_parquet.equals(from_csv)
    assert parquet_summary == {**csv_summary, "item_lists": parquet_summary["item_lists"]}


def test_icu_table_without_hadm_id_uses_icustays_or_subject(tmp_path):
    no_hadm = "\n".join(",".join(line.split(",")[:1] + line.split(",")[2:]) for line in CHARTEVENTS.splitlines()) + "\n"
    stays = f"subject_id,hadm_id,stay_id,first_careunit,last_careunit,intime,outtime,los\n{S1},21,31,MICU,MICU,,,1\n"
    with_stays = write_mimic(tmp_path / "a", {"icu/chartevents": no_hadm, "icu/icustays": stays})
    by_subject = write_mimic(tmp_path / "b", {"icu/chartevents": no_hadm})
    for root in (with_stays, by_subject):
        events, summary = render_events(root, windows(), show_progress=False)
        assert _rows(events)[10]["event_texts"] == T10[-4:-2]
        assert summary["events_kept"] == {"chartevents": 4}
        json.dumps(summary)
