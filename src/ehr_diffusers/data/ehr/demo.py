"""A seeded generator of a synthetic MIMIC-IV ``hosp/`` folder: realistic in shape, describing no real person.

``write_demo_mimic(out, n_patients, seed)`` writes ``hosp/patients.csv.gz``, ``hosp/admissions.csv.gz``,
``hosp/diagnoses_icd.csv.gz`` and ``hosp/d_icd_diagnoses.csv.gz`` with the column names, order, formats and
vocabularies of MIMIC-IV v2.x/v3.x, so that the MIMIC-IV reader cannot tell them from a PhysioNet release, plus a
``README.md`` that says the data is synthetic. Everything is drawn from ``numpy.random.default_rng(seed)``: the
same seed gives byte-identical files. The process is vectorised with numpy: 300,000 patients (about 5 million
diagnosis rows) take about 15 seconds and 1.2 GB of memory on two CPU cores.

## Generative process

1. **Patients.** Sex is male with probability 0.48. ``anchor_age`` follows an adult inpatient skew
   (18 + 80 x Beta(1.8, 1.7), mean about 59); ages above 89 are top-coded to 91 as in MIMIC-IV. Each patient gets
   an ``anchor_year_group`` (2008 - 2010 ... 2020 - 2022), a real anchor year inside it and a shifted
   ``anchor_year`` between 2110 and 2210; every date of the patient is shifted by the same number of years.
2. **Admissions.** 17.5% of patients have no admission (they appear in ``patients`` only). The others have
   1 + Poisson(0.9 x G) admissions with a Gamma frailty G of shape 0.35 (a negative binomial: most patients have one
   or two, a long tail has dozens). The first admission falls in the real anchor year; the next ones follow after
   log-normal gaps that shorten for frequent visitors. Admissions whose *real* date is before 2015-10-01 are coded
   in ICD-9-CM, later ones in ICD-10-CM, as in MIMIC-IV, so the older anchor year groups are mostly ICD-9.
   Admission type, locations, insurance (by age), language, marital status (by age; about 6% missing) and race
   (kept per patient, sometimes recorded as unknown) follow MIMIC-IV's vocabularies and rough frequencies. The
   length of stay is log-normal by admission type and longer when the admission carries a severe diagnosis;
   emergency-room admissions get ``edregtime``/``edouttime``.
3. **Clinical concepts.** A curated table (``CONCEPTS``) of about 70 conditions, each with a real ICD-9-CM code and
   a real ICD-10-CM code of the ICD-10 category that the CMS GEM maps it to (checked against the official code
   lists and the GEM). A patient carries concept k with probability
   ``sigmoid(a_k + age_k x (age - 60) / 15 + male_k x male + sum_c loading_kc x z_c + acute_k x 0.6 x log(admissions))``
   where the ``z_c`` are standard normal latent clusters: *cardiometabolic* (hypertension, diabetes,
   hyperlipidemia, CAD, heart failure, CKD, obesity), *respiratory* (COPD, tobacco use, respiratory failure,
   pneumonia), *sepsis* (septicemia, severe sepsis, AKI, acidosis, respiratory failure), *cancer* and
   *obstetric*. The intercepts ``a_k`` are solved so that the share of eligible patients with the concept matches
   published MIMIC-III figures (hypertension 38%, coronary atherosclerosis 23%, atrial fibrillation 22%, heart
   failure 21%, AKI 16.5%, ... aspiration pneumonitis 7.3%). Sex- and age-specific concepts are only drawn where
   they belong: pregnancy and delivery codes in women aged 18-45, prostate codes in men (more with age), female
   genital codes in women, dementia and hip fracture in older patients; there are no perinatal codes.
4. **The long tail.** 1,000 further ICD-9-CM codes are drawn (seeded) from the official list among codes that the
   GEM maps to a single category, one code per category, excluding V/E codes, pregnancy, perinatal and genital
   chapters, sex-specific titles and the categories of the curated concepts; each is paired with its GEM target
   in the 2024 ICD-10-CM list. A patient draws a Poisson number of them (more when older, sicker or admitted more
   often) from a Zipf-Mandelbrot law, so that below the curated concepts (38% down to about 1.5%) the tail falls
   from about 3% to 0.3%: code prevalence is heavy-tailed overall.
5. **Codes per admission.** Each of a patient's concepts and tail codes starts at one admission (acute codes of
   one cluster at the same admission, chronic ones usually at the first) and is coded again at later admissions
   with probability 0.75 if chronic or 0.12 if acute. ``seq_num`` tends to put the acute concepts first (the
   principal diagnosis), then the chronic concepts and tail codes in a noisy order. That gives about 10-11 codes
   per admission and 16-17 diagnosis rows per patient. About 0.2% of ICD-9 rows carry an official code that the GEM
   flags "no map" (real MIMIC-IV has such codes), so that the cohort build has unmapped codes to count.
6. **Mortality.** About 15% of patients with an admission die, with log-odds rising with age and with severe
   concepts (sepsis, respiratory failure, heart failure, cancer, do-not-resuscitate status). 45% of deaths happen
   in hospital at the last admission (``deathtime = dischtime``, ``hospital_expire_flag = 1``, discharge to
   ``DIED``, ``dod`` that day); the others get a ``dod`` within a year of the last discharge. Patients without an
   admission have no ``dod``.

The data is for demos and tests only: it is not suitable for any clinical conclusion.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl
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
from ..mimic import ADMISSION_TYPES
from .icd import GemMapper, icd9_code_titles, icd10_code_titles, read_gem

logger = logging.getLogger(__name__)

MAX_PATIENTS = 2_000_000  # keeps subject_id and hadm_id 8-digit, as in MIMIC-IV
NO_ADMISSION_SHARE = 0.175
MALE_SHARE = 0.48
EXTRA_ADMISSIONS_MEAN = 0.9
FRAILTY_SHAPE = 0.35
ACUTE_ADMISSION_EFFECT = 0.6  # log-odds of an acute concept per log(number of admissions)
CHRONIC_RECUR = 0.75
ACUTE_RECUR = 0.12
CHRONIC_FROM_FIRST = 0.6
TAIL_SIZE = 1000
TAIL_CODES_PER_CATEGORY = 1  # else categories with many codes (M26, K08, ...) pile up tail draws
TAIL_ZIPF_EXPONENT = 1.0
TAIL_ZIPF_OFFSET = 150
TAIL_CHRONIC_SHARE = 0.4
TAIL_CODES_PER_PATIENT = 9.4
DEATH_SHARE = 0.15
IN_HOSPITAL_DEATH_SHARE = 0.45
MARITAL_MISSING = 0.06
RACE_UNRECORDED = 0.04
NO_MAP_SHARE = 0.002  # ICD-9 rows whose code the GEM flags "no map"
# Real dates before this are coded in ICD-9-CM, as in MIMIC-IV (the US switch to ICD-10-CM).
ICD10_START = np.datetime64("2015-10-01T00:00", "m")
# First line of the README.md beside the tables: how `prepare` knows that it is reading the demo cohort.
README_TITLE = "# SYNTHETIC DATA: not MIMIC-IV, describes no real person"
TABLE_ORDER = ("patients", "admissions", "diagnoses_icd", "d_icd_diagnoses")
GENERATION_STEPS = ("patients", "conditions", "admissions", "diagnoses")  # the progress bar's first steps

# Shares of MIMIC-IV's admission types, in the reader's (alphabetical) order.
ADMISSION_TYPE_WEIGHTS = dict(zip(ADMISSION_TYPES, (0.017, 0.044, 0.045, 0.024, 0.219, 0.346, 0.121, 0.08, 0.11)))
ED_ADMISSION_TYPES = ("EW EMER.", "EU OBSERVATION", "OBSERVATION ADMIT")
MEDIAN_STAY_DAYS = {
    "AMBULATORY OBSERVATION": 0.4,
    "DIRECT EMER.": 3.5,
    "DIRECT OBSERVATION": 1.0,
    "ELECTIVE": 2.5,
    "EU OBSERVATION": 1.0,
    "EW EMER.": 3.8,
    "OBSERVATION ADMIT": 2.0,
    "SURGICAL SAME DAY ADMISSION": 3.0,
    "URGENT": 4.0,
}
ED_LOCATIONS = {
    "EMERGENCY ROOM": 0.88,
    "WALK-IN/SELF REFERRAL": 0.05,
    "TRANSFER FROM HOSPITAL": 0.05,
    "INFORMATION NOT AVAILABLE": 0.02,
}
OTHER_LOCATIONS = {
    "PHYSICIAN REFERRAL": 0.5,
    "TRANSFER FROM HOSPITAL": 0.2,
    "CLINIC REFERRAL": 0.12,
    "PROCEDURE SITE": 0.08,
    "PACU": 0.04,
    "TRANSFER FROM SKILLED NURSING FACILITY": 0.04,
    "AMBULATORY SURGERY TRANSFER": 0.02,
}
# Discharge locations of survivors under 75 and from 75 on; MIMIC-IV leaves many observation stays empty (None).
DISCHARGE_LOCATIONS = {
    "HOME": (0.42, 0.22),
    "HOME HEALTH CARE": (0.2, 0.25),
    "SKILLED NURSING FACILITY": (0.06, 0.2),
    "REHAB": (0.03, 0.05),
    "CHRONIC/LONG TERM ACUTE CARE": (0.01, 0.03),
    "HOSPICE": (0.005, 0.02),
    "AGAINST ADVICE": (0.015, 0.003),
    "ACUTE HOSPITAL": (0.01, 0.01),
    "PSYCH FACILITY": (0.01, 0.002),
    "OTHER FACILITY": (0.005, 0.01),
    "ASSISTED LIVING": (0.002, 0.015),
    None: (0.233, 0.185),
}
INSURANCE = {"Medicare": (0.13, 0.85), "Medicaid": (0.25, 0.05), "Private": (0.42, 0.07), "Other": (0.2, 0.03)}
UNRECORDED_RACES = ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER")

CM, RESP, SEPSIS, CANCER, OBSTETRIC = "cardiometabolic", "respiratory", "sepsis", "cancer", "obstetric"
CLUSTERS = (CM, RESP, SEPSIS, CANCER, OBSTETRIC)


@dataclass(frozen=True)
class Concept:
    """A clinical condition, its ICD-9-CM and ICD-10-CM codes (no dots) and the terms of its logistic model.

    ``prevalence`` is the share of eligible patients with an admission (right sex, ``min_age`` <= anchor_age <=
    ``max_age``) who carry the concept; ``age`` is in log-odds per 15 years, ``death`` adds to the log-odds of
    dying, ``stay`` to the log length of stay of the admissions that carry it.
    """

    name: str
    icd9: str
    icd10: str
    prevalence: float
    chronic: bool
    clusters: Mapping[str, float] = field(default_factory=dict)
    age: float = 0.0
    male: float = 0.0
    sex: str | None = None
    min_age: int = 0
    max_age: int = 200
    death: float = 0.0
    stay: float = 0.0


C, A = True, False  # chronic, acute
CHILDBEARING = {"sex": "F", "min_age": 18, "max_age": 45}
CONCEPTS: tuple[Concept, ...] = (
    # cardiometabolic
    Concept("essential hypertension", "4019", "I10", 0.38, C, {CM: 1.2}, age=0.8),
    Concept("coronary atherosclerosis", "41401", "I2510", 0.23, C, {CM: 1.2}, age=0.9, male=0.6, death=0.2),
    Concept("atrial fibrillation", "42731", "I4891", 0.22, C, {CM: 0.5}, age=1.2, death=0.2),
    Concept("heart failure", "4280", "I509", 0.21, C, {CM: 1.0, SEPSIS: 0.2}, age=1.0, death=0.6, stay=0.2),
    Concept("hyperlipidemia", "2724", "E785", 0.16, C, {CM: 1.2}, age=0.5),
    Concept("type 2 diabetes", "25000", "E119", 0.16, C, {CM: 1.3}, age=0.4),
    Concept("pure hypercholesterolemia", "2720", "E7800", 0.115, C, {CM: 1.0}, age=0.4),
    Concept("chronic kidney disease", "5859", "N189", 0.09, C, {CM: 1.2}, age=0.8, death=0.3),
    Concept("obesity", "27800", "E669", 0.07, C, {CM: 1.0}, age=-0.3),
    Concept("long-term insulin use", "V5867", "Z794", 0.05, C, {CM: 1.3}),
    Concept("long-term anticoagulant use", "V5861", "Z7901", 0.07, C, {CM: 0.4}, age=1.0),
    Concept("obstructive sleep apnea", "32723", "G4733", 0.05, C, {CM: 0.8}, male=0.5),
    Concept("mitral valve insufficiency", "4240", "I340", 0.04, C, {CM: 0.3}, age=1.0),
    Concept("NSTEMI", "41071", "I214", 0.04, A, {CM: 0.8}, age=0.6, male=0.4, death=0.5, stay=0.3),
    Concept("cerebral infarction", "43491", "I6350", 0.035, A, {CM: 0.6}, age=0.8, death=0.6, stay=0.4),
    # respiratory
    Concept("COPD", "496", "J449", 0.077, C, {RESP: 1.5}, age=0.7, death=0.3),
    Concept("tobacco use", "3051", "F17210", 0.1, C, {RESP: 1.3}, age=-0.3, male=0.3),
    Concept("history of tobacco use", "V1582", "Z87891", 0.08, C, {RESP: 1.0}, age=0.4),
    Concept(
        "acute respiratory failure", "51881", "J9600", 0.144, A, {RESP: 0.9, SEPSIS: 1.0}, age=0.3, death=1.0, stay=0.5
    ),
    Concept("pneumonia", "486", "J189", 0.095, A, {RESP: 1.0, SEPSIS: 0.5}, age=0.5, death=0.4, stay=0.3),
    Concept("aspiration pneumonitis", "5070", "J690", 0.073, A, {RESP: 0.6, SEPSIS: 0.6}, age=0.9, death=0.5, stay=0.3),
    Concept("asthma", "49390", "J45909", 0.05, C, {RESP: 0.8}, age=-0.6, male=-0.4),
    Concept("pleural effusion", "5119", "J918", 0.05, A, {RESP: 0.6, CM: 0.4}, age=0.5, death=0.3),
    Concept("hypoxemia", "79902", "R0902", 0.04, A, {RESP: 1.0}),
    # sepsis and acute illness
    Concept("septicemia", "0389", "A419", 0.074, A, {SEPSIS: 1.6}, age=0.4, death=0.8, stay=0.5),
    Concept("severe sepsis", "99592", "R6520", 0.077, A, {SEPSIS: 1.8}, age=0.4, death=0.9, stay=0.5),
    Concept("septic shock", "78552", "R6521", 0.04, A, {SEPSIS: 2.0}, age=0.4, death=1.2, stay=0.6),
    Concept("acute kidney failure", "5849", "N179", 0.165, A, {SEPSIS: 1.0, CM: 0.6}, age=0.7, death=0.5, stay=0.3),
    Concept("acidosis", "2762", "E8720", 0.09, A, {SEPSIS: 1.2}, death=0.4),
    Concept("urinary tract infection", "5990", "N390", 0.124, A, {SEPSIS: 0.6}, age=0.8, male=-0.8),
    Concept("bacteremia", "7907", "R7881", 0.03, A, {SEPSIS: 1.2}),
    Concept("hyponatremia", "2761", "E871", 0.08, A, {SEPSIS: 0.5}, age=0.6),
    Concept("hypokalemia", "2768", "E876", 0.07, A, {SEPSIS: 0.4}),
    Concept("hyperkalemia", "2767", "E875", 0.05, A, {SEPSIS: 0.5, CM: 0.5}),
    Concept("thrombocytopenia", "2875", "D696", 0.05, A, {SEPSIS: 0.8}, death=0.3),
    Concept("leukocytosis", "28860", "D72829", 0.03, A, {SEPSIS: 0.6}),
    Concept("acute posthemorrhagic anemia", "2851", "D62", 0.091, A, {}, age=0.4, stay=0.2),
    Concept("anemia, unspecified", "2859", "D649", 0.107, A, {}, age=0.4),
    Concept("iron deficiency anemia", "2809", "D509", 0.04, C, {}, male=-0.4),
    Concept("protein-calorie malnutrition", "2639", "E46", 0.03, A, {SEPSIS: 0.6, CANCER: 0.5}, age=0.5, death=0.5),
    Concept("altered mental status", "78097", "R4182", 0.04, A, {SEPSIS: 0.4}, age=0.8),
    Concept("constipation", "56400", "K5900", 0.03, A, {}, age=0.5),
    Concept("do not resuscitate status", "V4986", "Z66", 0.05, A, {CANCER: 0.5}, age=1.5, death=1.5),
    # other chronic conditions
    Concept("esophageal reflux", "53081", "K219", 0.113, C, {}, age=0.3),
    Concept("hypothyroidism", "2449", "E039", 0.082, C, {}, age=0.6, male=-1.0),
    Concept("depression", "311", "F329", 0.08, C, {}, age=-0.2, male=-0.5),
    Concept("anxiety", "30000", "F419", 0.06, C, {}, age=-0.4, male=-0.5),
    Concept("chronic pain", "33829", "G8929", 0.03, C, {}),
    Concept("alcohol abuse", "30500", "F1010", 0.04, C, {}, age=-0.3, male=0.9),
    Concept("alcohol withdrawal", "29181", "F10239", 0.02, A, {}, age=-0.3, male=0.9),
    Concept("cirrhosis of liver", "5715", "K7469", 0.025, C, {}, male=0.4, death=0.6),
    Concept("history of venous thrombosis", "V1251", "Z86718", 0.03, C, {}, age=0.5),
    Concept("osteoporosis", "73300", "M810", 0.05, C, {}, age=1.5, male=-1.5, min_age=40),
    Concept("senile dementia", "2900", "F0390", 0.04, C, {}, age=2.0, min_age=55, death=0.5),
    Concept("Alzheimer's disease", "3310", "G309", 0.02, C, {}, age=2.0, min_age=55, death=0.3),
    Concept("hip fracture", "82000", "S72001A", 0.015, A, {}, age=2.0, male=-0.6, min_age=50, stay=0.4),
    # cancer
    Concept("lung cancer", "1629", "C3490", 0.02, C, {CANCER: 1.0, RESP: 0.6}, age=0.6, death=1.2),
    Concept("colon cancer", "1539", "C189", 0.01, C, {CANCER: 1.0}, age=0.6, death=1.0),
    Concept("secondary neoplasm of liver", "1977", "C787", 0.012, C, {CANCER: 1.5}, death=1.5),
    Concept("breast cancer", "1749", "C50919", 0.03, C, {CANCER: 1.0}, age=0.5, sex="F", death=0.6),
    Concept("prostate cancer", "185", "C61", 0.03, C, {CANCER: 1.0}, age=1.0, sex="M", min_age=40, death=0.5),
    # sex-specific
    Concept("benign prostatic hyperplasia", "60000", "N400", 0.1, C, {}, age=1.6, sex="M", min_age=40),
    Concept("excessive menstruation", "6262", "N920", 0.03, A, {}, sex="F", min_age=18, max_age=55),
    Concept("ovarian cyst", "6202", "N83209", 0.02, A, {}, sex="F", max_age=60),
    # obstetric: women of 18-45 only
    Concept("normal delivery", "650", "O80", 0.15, A, {OBSTETRIC: 2.0}, **CHILDBEARING),
    Concept("single liveborn", "V270", "Z370", 0.17, A, {OBSTETRIC: 2.5}, **CHILDBEARING),
    Concept("first-degree perineal laceration", "66401", "O700", 0.04, A, {OBSTETRIC: 1.5}, **CHILDBEARING),
    Concept("abnormal glucose in pregnancy", "64880", "O99810", 0.02, A, {OBSTETRIC: 1.5}, **CHILDBEARING),
)
del C, A, CHILDBEARING


@lru_cache(maxsize=1)
def checked_concepts() -> tuple[Concept, ...]:
    """``CONCEPTS`` after checking every code against the official lists and the GEM (fails loudly otherwise)."""
    titles9, titles10, mapper = icd9_code_titles(), icd10_code_titles(), GemMapper()
    for concept in CONCEPTS:
        if concept.icd9 not in titles9 or concept.icd10 not in titles10:
            raise AssertionError(f"{concept.name}: {concept.icd9}/{concept.icd10} not in the official ICD code lists")
        if mapper.categories(concept.icd9) != (concept.icd10[:3],):
            raise AssertionError(f"{concept.name}: the GEM does not map {concept.icd9} to {concept.icd10[:3]} alone")
        if set(concept.clusters) - set(CLUSTERS):
            raise AssertionError(f"{concept.name}: unknown cluster in {dict(concept.clusters)}")
    for version in ("icd9", "icd10"):
        codes = [getattr(concept, version) for concept in CONCEPTS]
        if len(set(codes)) != len(codes):
            raise AssertionError(f"CONCEPTS repeat an {version} code")
    return CONCEPTS


def _excluded_icd10(category: pl.Expr) -> pl.Expr:
    """Pregnancy (O), perinatal (P), male genital (N40-N53, C61-C63) and female genital (N70-N98, C51-C58)."""
    return (
        category.str.slice(0, 1).is_in(["O", "P"])
        | category.is_between(pl.lit("N40"), pl.lit("N53"))
        | category.is_between(pl.lit("C61"), pl.lit("C63"))
        | category.is_between(pl.lit("N70"), pl.lit("N98"))
        | category.is_between(pl.lit("C51"), pl.lit("C58"))
    )


def _excluded_icd9(code: pl.Expr) -> pl.Expr:
    """V/E codes and the ICD-9 counterparts of ``_excluded_icd10``: 630-679, 760-779, 179-187, 600-608, 614-629."""
    number = code.str.slice(0, 3).cast(pl.Int32, strict=False)
    return (
        code.str.slice(0, 1).is_in(["V", "E"])
        | number.is_between(630, 679)
        | number.is_between(760, 779)
        | number.is_between(179, 187)
        | number.is_between(600, 608)
        | number.is_between(614, 629)
    )


# Titles that mark a code as sex- or pregnancy-specific, on top of the chapter exclusions.
_SPECIFIC_TITLE = (
    r"(?i)\b(?:(?:fe)?male\b|pregnan|puerper|childbirth|newborn|neonat|fetus|fetal|perinatal|prostat|testi|scrot|penis"
    r"|penile|uter|ovar|vagin|vulv|cervix|menstru|menopaus|breast)"
)


# How likely a tail code of each ICD-9 chapter is to rank high (first code of the chapter, weight): common inpatient
# chapters (circulatory, endocrine, respiratory, symptoms, complications) ahead of rare infections and anomalies.
_CHAPTER_WEIGHTS = (
    (1, 0.3), (140, 0.6), (240, 3.0), (280, 3.0), (290, 2.0), (320, 1.0), (390, 3.0), (460, 3.0), (520, 2.0),
    (580, 2.0), (680, 1.0), (710, 1.0), (740, 0.2), (780, 4.0), (800, 0.5), (996, 2.0),
)


@lru_cache(maxsize=1)
def _tail_pool() -> pl.DataFrame:
    """Candidate (icd9, icd10) pairs for the random tail, sorted by icd9; the seeded draw happens later.

    The ICD-9 code must be mapped by the GEM to exactly one category (so that both eras code the same category and no
    ICD-9 code fans out into unrelated ones); its ICD-10 code is the first GEM target of that category in the 2024
    ICD-10-CM list. Codes in the excluded chapters, with sex-specific titles or in the categories of a curated concept
    are left out, and each ICD-10 code is used once, so that no admission ever holds the same code twice. At most
    ``TAIL_CODES_PER_CATEGORY`` code of one ICD-10 category enters the pool, so that a category's prevalence comes from
    its rank, not from how many codes it happens to have. ``weight`` (``_CHAPTER_WEIGHTS``, x1.5 for "unspecified"
    titles) biases which codes are drawn and how high they rank.
    """
    titles9, titles10, mapper = icd9_code_titles(), icd10_code_titles(), GemMapper()
    concept_categories = sorted({concept.icd10[:3] for concept in checked_concepts()})
    blocked9 = mapper.table.filter(
        _excluded_icd10(pl.col("category")) | pl.col("category").is_in(concept_categories)
    ).select("icd9")
    titles = pl.DataFrame({"icd9": list(titles9), "title9": list(titles9.values())})
    titles10_frame = pl.DataFrame({"icd10": list(titles10), "title10": list(titles10.values())})
    gem = read_gem().filter(~pl.col("no_map") & (~pl.col("combination") | (pl.col("scenario") == 1)))
    one_category = mapper.table.filter(pl.len().over("icd9") == 1)  # no fan-out: both eras code one category
    pool = (
        gem.with_columns(pl.col("icd10").str.slice(0, 3).alias("category"))
        .join(one_category, on=["icd9", "category"], how="semi")
        .join(titles, on="icd9", how="inner")
        .join(titles10_frame, on="icd10", how="inner")
        .join(blocked9, on="icd9", how="anti")
        .filter(
            ~_excluded_icd9(pl.col("icd9"))
            & ~pl.col("title9").str.contains(_SPECIFIC_TITLE)
            & ~pl.col("title10").str.contains(_SPECIFIC_TITLE)
        )
        .sort("order")
        .unique("icd9", keep="first", maintain_order=True)
        .sort("icd9")
        .unique("icd10", keep="first", maintain_order=True)
        .filter(pl.int_range(pl.len()).over("category") < TAIL_CODES_PER_CATEGORY)
    )
    starts, weights = zip(*_CHAPTER_WEIGHTS)
    chapter = np.searchsorted(starts, pool["icd9"].str.slice(0, 3).cast(pl.Int32).to_numpy(), side="right") - 1
    unspecified = pool["title9"].str.contains("(?i)unspecified").to_numpy()
    weight = np.array(weights)[chapter] * np.where(unspecified, 1.5, 1.0)
    return pool.select("icd9", "icd10").with_columns(weight=weight)


@dataclass
class _Items:
    """Everything codable: the curated concepts first, then the drawn tail codes."""

    icd9: np.ndarray
    icd10: np.ndarray
    chronic: np.ndarray
    min_age: np.ndarray
    max_age: np.ndarray
    stay: np.ndarray
    first: np.ndarray  # seq_num sort priority: 0 puts a code near the top of the admission
    cluster: np.ndarray  # main latent cluster of a concept, -1 for none (acute codes of one cluster share admissions)

    @classmethod
    def build(cls, concepts: tuple[Concept, ...], tail: pl.DataFrame, rng: np.random.Generator) -> _Items:
        size = tail.height
        loadings = np.array([[concept.clusters.get(name, 0.0) for name in CLUSTERS] for concept in concepts])
        return cls(
            icd9=np.array([concept.icd9 for concept in concepts] + tail["icd9"].to_list(), dtype=object),
            icd10=np.array([concept.icd10 for concept in concepts] + tail["icd10"].to_list(), dtype=object),
            chronic=np.concatenate([[concept.chronic for concept in concepts], rng.random(size) < TAIL_CHRONIC_SHARE]),
            min_age=np.array([concept.min_age for concept in concepts] + [0] * size),
            max_age=np.array([concept.max_age for concept in concepts] + [200] * size),
            stay=np.array([concept.stay for concept in concepts] + [0.0] * size),
            first=np.concatenate([[float(concept.chronic) for concept in concepts], rng.uniform(0.5, 1.5, size)]),
            cluster=np.concatenate([np.where(loadings.max(1) > 0, loadings.argmax(1), -1), np.full(size, -1)]),
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_intercepts(linear: np.ndarray, eligible: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Intercepts (one per column) so that the mean probability over eligible rows equals ``targets``.

    Solving on the drawn covariates rather than fixing intercepts by hand keeps the published prevalences true
    whatever the latent clusters and age slopes add.
    """
    low, high = np.full(len(targets), -25.0), np.full(len(targets), 10.0)
    counts = np.maximum(eligible.sum(0), 1)
    for _ in range(36):
        middle = (low + high) / 2
        share = (_sigmoid(linear + middle.astype(np.float32)) * eligible).sum(0) / counts
        above = share > targets
        high, low = np.where(above, middle, high), np.where(above, low, middle)
    return ((low + high) / 2).astype(np.float32)


def _within_group(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., n-1 for each group of ``counts`` rows laid out one group after the other."""
    starts = np.cumsum(counts) - counts
    return np.arange(counts.sum()) - np.repeat(starts, counts)


@dataclass
class _Patients:
    subject_id: np.ndarray
    male: np.ndarray
    anchor_age: np.ndarray
    anchor_year: np.ndarray
    year_group: np.ndarray
    real_anchor_year: np.ndarray
    n_admissions: np.ndarray


def _draw_patients(rng: np.random.Generator, n: int) -> _Patients:
    """Demographics, shifted anchor years and the number of admissions of every patient."""
    age = np.floor(18 + 80 * rng.beta(1.8, 1.7, n)).astype(np.int64)
    anchor_age = np.where(age > 89, 91, age)
    year_group = categorical(rng, np.array(list(ANCHOR_YEAR_GROUPS.values())), n)
    real_anchor_year = 2008 + 3 * year_group + rng.integers(0, 3, n)
    frailty = rng.gamma(FRAILTY_SHAPE, 1.0 / FRAILTY_SHAPE, n)
    admitted = rng.random(n) >= NO_ADMISSION_SHARE
    return _Patients(
        subject_id=10_000_000 + np.sort(rng.choice(10_000_000, n, replace=False)),
        male=rng.random(n) < MALE_SHARE,
        anchor_age=anchor_age,
        anchor_year=rng.integers(2110, 2211, n),
        year_group=year_group,
        real_anchor_year=real_anchor_year,
        n_admissions=np.where(admitted, 1 + rng.poisson(EXTRA_ADMISSIONS_MEAN * frailty), 0),
    )


def _draw_conditions(
    rng: np.random.Generator, people: _Patients, concepts: tuple[Concept, ...], items: _Items
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patient concepts and tail codes of the admitted patients.

    Returns (patient, item) pairs (patient = position among the admitted) and the concept matrix, whose rows feed
    the mortality model.
    """
    admitted = np.flatnonzero(people.n_admissions)
    n_adm = people.n_admissions[admitted]
    age = ((people.anchor_age[admitted] - 60) / 15).astype(np.float32)
    male = people.male[admitted]
    latent = rng.standard_normal((len(admitted), len(CLUSTERS)), dtype=np.float32)
    loadings = np.array([[c.clusters.get(name, 0.0) for name in CLUSTERS] for c in concepts], dtype=np.float32)
    acute = np.array([0.0 if c.chronic else ACUTE_ADMISSION_EFFECT for c in concepts], dtype=np.float32)
    linear = (
        latent @ loadings.T
        + np.outer(age, [c.age for c in concepts]).astype(np.float32)
        + np.outer(male, [c.male for c in concepts]).astype(np.float32)
        + np.outer(np.log(n_adm), acute).astype(np.float32)
    )
    anchor_age = people.anchor_age[admitted][:, None]
    sex = np.array([{None: 0, "M": 1, "F": 2}[c.sex] for c in concepts])
    eligible = (
        ((sex == 0) | ((sex == 1) & male[:, None]) | ((sex == 2) & ~male[:, None]))
        & (anchor_age >= np.array([c.min_age for c in concepts]))
        & (anchor_age <= np.array([c.max_age for c in concepts]))
    )
    sample = slice(0, 50_000)  # the solve needs a large sample, not everyone
    intercepts = _solve_intercepts(linear[sample], eligible[sample], np.array([c.prevalence for c in concepts]))
    has = (rng.random(linear.shape, dtype=np.float32) < _sigmoid(linear + intercepts)) & eligible
    concept_patient, concept_item = np.nonzero(has)

    # The tail: a Poisson number of Zipf-Mandelbrot draws, more for older, sicker and more often admitted patients.
    n_tail = len(items.icd9) - len(concepts)
    sickness = latent[:, [CLUSTERS.index(CM), CLUSTERS.index(RESP), CLUSTERS.index(SEPSIS)]].sum(1) / np.sqrt(3)
    weight = np.exp(0.2 * age + 0.3 * sickness) * np.sqrt(n_adm)
    draws = rng.poisson(TAIL_CODES_PER_PATIENT * weight * (len(weight) / max(weight.sum(), 1e-9)))
    zipf = (np.arange(1, n_tail + 1) + TAIL_ZIPF_OFFSET) ** -TAIL_ZIPF_EXPONENT
    codes = np.searchsorted(np.cumsum(zipf) / zipf.sum(), rng.random(draws.sum()), side="right").clip(max=n_tail - 1)
    keys = np.unique(np.repeat(np.arange(len(admitted), dtype=np.int64), draws) * n_tail + codes)
    patient = np.concatenate([concept_patient, keys // n_tail])
    item = np.concatenate([concept_item, len(concepts) + keys % n_tail])
    return patient, item, has


def _expand_to_admissions(
    rng: np.random.Generator, patient: np.ndarray, item: np.ndarray, n_adm: np.ndarray, items: _Items
) -> tuple[np.ndarray, np.ndarray]:
    """(admission, item) rows: each pair is coded at its onset admission and recurs at others.

    Acute codes of one latent cluster share their onset admission (sepsis, AKI and acidosis arrive together);
    chronic codes usually start at the first admission and then recur at later ones only.
    """
    n_clusters = len(CLUSTERS)
    shared = rng.random((len(n_adm), n_clusters), dtype=np.float32)
    cluster = items.cluster[item]
    own = rng.random(len(item), dtype=np.float32)
    onset_draw = np.where(cluster >= 0, shared[patient, np.maximum(cluster, 0)], own)
    counts = n_adm[patient]
    chronic = items.chronic[item]
    onset = np.minimum((onset_draw * counts).astype(np.int64), counts - 1)
    onset = np.where(chronic & (rng.random(len(item)) < CHRONIC_FROM_FIRST), 0, onset)

    pair = np.repeat(np.arange(len(item)), counts)
    position = _within_group(counts)
    recur = np.where(chronic, CHRONIC_RECUR, ACUTE_RECUR).astype(np.float32)[pair]
    pair_onset, pair_chronic = onset[pair], chronic[pair]
    keep = (position == pair_onset) | (
        ((position > pair_onset) | ~pair_chronic) & (rng.random(len(pair), dtype=np.float32) < recur)
    )
    first_admission = np.cumsum(n_adm) - n_adm
    return first_admission[patient[pair[keep]]] + position[keep], item[pair[keep]]


def _minutes(year: np.ndarray) -> np.ndarray:
    """Minutes since 1970 at 1 January of ``year``."""
    return (np.asarray(year) - 1970).astype("datetime64[Y]").astype("datetime64[m]").astype(np.int64)


def _as_datetime(minutes: np.ndarray, valid: np.ndarray | None = None) -> pl.Series:
    values = minutes.astype("datetime64[m]")
    if valid is not None:
        values = np.where(valid, values, np.datetime64("NaT"))
    return pl.Series(values.astype("datetime64[us]"))


def _gather(vocabulary: list, index: np.ndarray) -> pl.Series:
    return pl.Series(vocabulary, dtype=pl.String).gather(index)


@dataclass
class _Schedule:
    """Admission times in minutes since 1970 (shifted, as written) and what depends on the real calendar."""

    admit: np.ndarray
    discharge: np.ndarray
    icd10: np.ndarray  # the real admission date is on or after 2015-10-01
    age: np.ndarray  # anchor_age + year(admittime) - anchor_year


def _schedule(rng: np.random.Generator, people: _Patients, person: np.ndarray, stay: np.ndarray) -> _Schedule:
    """Dates of the admissions of each patient, laid out one patient after the other in time order.

    The first admission falls in the real anchor year; each next one follows the previous discharge after a
    log-normal gap that is shorter for patients with many admissions. Real dates pick the ICD version; written
    dates are shifted by the patient's ``anchor_year - real anchor year``.
    """
    n_adm = people.n_admissions[people.n_admissions > 0]
    first = np.cumsum(n_adm) - n_adm
    gap_days = rng.lognormal(np.log(180) - 0.6 * np.log(np.repeat(n_adm, n_adm)), 1.0)
    step = stay + np.round(gap_days * 1440).astype(np.int64)
    since_first = np.cumsum(step) - step
    since_first -= np.repeat(since_first[first], n_adm)
    first_admit = _minutes(people.real_anchor_year[person]) + np.repeat(rng.integers(0, 365 * 1440, len(n_adm)), n_adm)
    real_admit = first_admit + since_first
    shift = _minutes(people.anchor_year[person]) - _minutes(people.real_anchor_year[person])
    admit = real_admit + shift
    year = admit.astype("datetime64[m]").astype("datetime64[Y]").astype(np.int64) + 1970
    return _Schedule(
        admit=admit,
        discharge=admit + stay,
        icd10=real_admit >= ICD10_START.astype(np.int64),
        age=people.anchor_age[person] + year - people.anchor_year[person],
    )


def _mortality(
    rng: np.random.Generator,
    people: _Patients,
    has: np.ndarray,
    concepts: tuple[Concept, ...],
    discharge_of_last: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Who dies (a logistic model in age and severe concepts, calibrated to ``DEATH_SHARE``), where and when.

    Returns, per admitted patient, died, died-in-hospital and the minute of death.
    """
    admitted = people.n_admissions > 0
    risk = ((people.anchor_age[admitted] - 60) / 15 + has @ np.array([c.death for c in concepts])).astype(np.float32)
    intercept = _solve_intercepts(risk[:, None], np.ones((len(risk), 1), dtype=bool), np.array([DEATH_SHARE]))
    died = rng.random(len(risk)) < _sigmoid(risk + intercept[0])
    in_hospital = died & (rng.random(len(risk)) < IN_HOSPITAL_DEATH_SHARE)
    after_discharge = np.where(in_hospital, 0, rng.integers(1, 366, len(risk)) * 1440)
    return died, in_hospital, discharge_of_last + after_discharge


def _admissions_frame(
    rng: np.random.Generator,
    people: _Patients,
    person: np.ndarray,
    hadm_id: np.ndarray,
    admission_type: np.ndarray,
    times: _Schedule,
    expire: np.ndarray,
) -> pl.DataFrame:
    """The admissions table; race, language and marital status are drawn per patient and kept across stays."""
    n, n_people = len(person), len(people.subject_id)
    type_names = list(ADMISSION_TYPE_WEIGHTS)
    from_ed = np.isin(admission_type, [type_names.index(name) for name in ED_ADMISSION_TYPES])
    ed_location = categorical(rng, np.array(list(ED_LOCATIONS.values())), n)
    other_location = categorical(rng, np.array(list(OTHER_LOCATIONS.values())), n)
    location = np.where(from_ed, ed_location, len(ED_LOCATIONS) + other_location)
    in_emergency_room = from_ed & (ed_location == 0)

    elderly = (times.age >= 75).astype(np.int64)
    discharge_location = categorical(rng, np.array(list(DISCHARGE_LOCATIONS.values())).T, elderly)
    discharge_location = np.where(expire, len(DISCHARGE_LOCATIONS), discharge_location)
    insurance = categorical(rng, np.array(list(INSURANCE.values())).T, (times.age >= 65).astype(np.int64))

    race_names = list(RACES)
    race = categorical(rng, np.array([share for share, _, _ in RACES.values()]), n_people)
    languages = ["ENGLISH"] + sorted({language for _, language, _ in RACES.values() if language})
    second = np.array([languages.index(language) if language else 0 for _, language, _ in RACES.values()])
    speaks_second = rng.random(n_people) < np.array([share for _, _, share in RACES.values()])[race]
    language = np.where(speaks_second, second[race], 0)[person]
    unrecorded = rng.random(n) < RACE_UNRECORDED
    unrecorded_race = np.array([race_names.index(name) for name in UNRECORDED_RACES])[rng.integers(0, 3, n)]
    race = np.where(unrecorded, unrecorded_race, race[person])

    band = np.searchsorted(MARITAL_AGE_BANDS, people.anchor_age, side="right")
    marital = categorical(rng, np.array(list(MARITAL.values())).T, band)[person]
    marital = np.where(rng.random(n) < MARITAL_MISSING, len(MARITAL), marital)
    providers = provider_ids(rng, 1500)

    return pl.DataFrame(
        {
            "subject_id": people.subject_id[person],
            "hadm_id": hadm_id,
            "admittime": _as_datetime(times.admit),
            "dischtime": _as_datetime(times.discharge),
            "deathtime": _as_datetime(times.discharge, expire),
            "admission_type": _gather(type_names, admission_type),
            "admit_provider_id": _gather(providers, rng.integers(0, len(providers), n)),
            "admission_location": _gather(list(ED_LOCATIONS) + list(OTHER_LOCATIONS), location),
            "discharge_location": _gather(list(DISCHARGE_LOCATIONS) + ["DIED"], discharge_location),
            "insurance": _gather(list(INSURANCE), insurance),
            "language": _gather(languages, language),
            "marital_status": _gather(list(MARITAL) + [None], marital),
            "race": _gather(race_names, race),
            "edregtime": _as_datetime(times.admit - rng.integers(60, 12 * 60, n), in_emergency_room),
            "edouttime": _as_datetime(times.admit + rng.integers(0, 90, n), in_emergency_room),
            "hospital_expire_flag": expire.astype(np.int64),
        }
    ).sort("subject_id", "hadm_id")


@lru_cache(maxsize=1)
def _no_map_codes() -> tuple[str, ...]:
    """Official ICD-9-CM codes that the GEM flags "no map" (mostly E codes, as in MIMIC-IV), outside the sex-,
    pregnancy- and perinatal-specific chapters and titles."""
    titles = icd9_code_titles()
    codes = pl.DataFrame({"icd9": list(titles), "title": list(titles.values())}).join(
        read_gem().filter(pl.col("no_map")).select("icd9").unique(), on="icd9", how="semi"
    )
    supplementary = pl.col("icd9").str.slice(0, 1).is_in(["V", "E"])
    kept = codes.filter(
        (supplementary | ~_excluded_icd9(pl.col("icd9"))) & ~pl.col("title").str.contains(_SPECIFIC_TITLE)
    )
    return tuple(sorted(kept["icd9"].to_list()))


def _diagnoses_frames(
    rng: np.random.Generator,
    items: _Items,
    row_admission: np.ndarray,
    row_item: np.ndarray,
    subject_of_admission: np.ndarray,
    hadm_id: np.ndarray,
    icd10: np.ndarray,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """diagnoses_icd (acute codes first in seq_num, the rest shuffled) and d_icd_diagnoses for the codes used.

    A small share of ICD-9 rows (``NO_MAP_SHARE``) carries a code that the GEM cannot map, as real MIMIC-IV does,
    so that the cohort build's count of unmapped codes has something to count.
    """
    order = np.argsort(row_admission * 4.0 + items.first[row_item] + rng.random(len(row_item)))
    row_admission, row_item = row_admission[order], row_item[order]
    seq_num = _within_group(np.bincount(row_admission, minlength=len(hadm_id))) + 1
    version10 = icd10[row_admission]
    no_map = list(_no_map_codes())
    vocabulary = np.concatenate([items.icd9, items.icd10, no_map]).tolist()
    version_of = np.concatenate([np.full(len(items.icd9), 9), np.full(len(items.icd10), 10), np.full(len(no_map), 9)])
    code_index = row_item + version10 * len(items.icd9)
    unmappable = ~version10 & (rng.random(len(row_item)) < NO_MAP_SHARE)
    code_index[unmappable] = 2 * len(items.icd9) + rng.integers(0, len(no_map), int(unmappable.sum()))
    diagnoses = pl.DataFrame(
        {
            "subject_id": subject_of_admission[row_admission],
            "hadm_id": hadm_id[row_admission],
            "seq_num": seq_num,
            "icd_code": _gather(vocabulary, code_index),
            "icd_version": version_of[code_index],
        }
    ).sort("subject_id", "hadm_id", "seq_num")

    used = np.unique(code_index)
    titles = {9: icd9_code_titles(), 10: icd10_code_titles()}
    versions = version_of[used]
    codes = [vocabulary[index] for index in used]
    d_icd = pl.DataFrame(
        {
            "icd_code": codes,
            "icd_version": versions,
            "long_title": [titles[version][code] for code, version in zip(codes, versions.tolist())],
        }
    ).sort("icd_code", "icd_version")
    return diagnoses, d_icd


def generate_tables(n_patients: int, seed: int, bar: tqdm | None = None) -> dict[str, pl.DataFrame]:
    """The four MIMIC-IV ``hosp`` tables as polars frames, in MIMIC-IV's column order (see the module docstring)."""
    bar = bar if bar is not None else tqdm(disable=True)
    bar.set_postfix_str("patients")
    rng = np.random.default_rng(seed)
    concepts = checked_concepts()
    pool = _tail_pool()
    # Weighted sampling without replacement (smallest exponential keys over weights); the order is the Zipf rank.
    keys = rng.exponential(size=pool.height) / pool["weight"].to_numpy()
    items = _Items.build(concepts, pool[np.argsort(keys)[:TAIL_SIZE]], rng)
    people = _draw_patients(rng, n_patients)
    bar.update()
    bar.set_postfix_str("conditions")

    patient, item, has = _draw_conditions(rng, people, concepts, items)
    admitted = np.flatnonzero(people.n_admissions)
    n_adm = people.n_admissions[admitted]
    row_admission, row_item = _expand_to_admissions(rng, patient, item, n_adm, items)
    bar.update()
    bar.set_postfix_str("admissions")

    n_total = int(n_adm.sum())
    person = np.repeat(admitted, n_adm)
    last = np.cumsum(n_adm) - 1
    admission_type = categorical(rng, np.array(list(ADMISSION_TYPE_WEIGHTS.values())), n_total)
    median_days = np.array([MEDIAN_STAY_DAYS[name] for name in ADMISSION_TYPE_WEIGHTS])[admission_type]
    severity = np.minimum(np.bincount(row_admission, weights=items.stay[row_item], minlength=n_total), 1.2)
    stay_minutes = median_days * np.exp(rng.normal(0.0, 0.75, n_total) + severity) * 1440
    stay = np.maximum(np.round(stay_minutes), 90).astype(np.int64)
    times = _schedule(rng, people, person, stay)
    died, in_hospital, death_minute = _mortality(rng, people, has, concepts, times.discharge[last])
    expire = np.zeros(n_total, dtype=bool)
    expire[last[in_hospital]] = True
    dod = np.full(n_patients, np.datetime64("NaT"), dtype="datetime64[D]")
    dod[admitted[died]] = death_minute[died].astype("datetime64[m]").astype("datetime64[D]")
    hadm_id = 20_000_000 + rng.choice(10_000_000, n_total, replace=False)
    admissions = _admissions_frame(rng, people, person, hadm_id, admission_type, times, expire)
    bar.update()
    bar.set_postfix_str("diagnoses")

    # Codes outside their age window at this admission (pregnancy after 45, ...) are dropped.
    row_age = times.age[row_admission]
    fits = (row_age >= items.min_age[row_item]) & (row_age <= items.max_age[row_item])
    diagnoses, d_icd = _diagnoses_frames(
        rng, items, row_admission[fits], row_item[fits], people.subject_id[person], hadm_id, times.icd10
    )
    patients = pl.DataFrame(
        {
            "subject_id": people.subject_id,
            "gender": _gather(["F", "M"], people.male.astype(np.int64)),
            "anchor_age": people.anchor_age,
            "anchor_year": people.anchor_year,
            "anchor_year_group": _gather(list(ANCHOR_YEAR_GROUPS), people.year_group),
            "dod": pl.Series(dod),
        }
    )
    bar.update()
    return {"patients": patients, "admissions": admissions, "diagnoses_icd": diagnoses, "d_icd_diagnoses": d_icd}


def _summary(tables: dict[str, pl.DataFrame]) -> dict:
    """The figures ``write_demo_mimic`` returns and the README reports."""
    admissions, diagnoses = tables["admissions"], tables["diagnoses_icd"]
    versions = diagnoses["icd_version"]
    return {
        "patients": tables["patients"].height,
        "admissions": admissions.height,
        "diagnosis_rows": diagnoses.height,
        "patients_without_admission": tables["patients"].height - admissions["subject_id"].n_unique(),
        "icd9_rows": int((versions == 9).sum()),
        "icd10_rows": int((versions == 10).sum()),
        "distinct_codes": tables["d_icd_diagnoses"].height,
        "deaths": tables["patients"]["dod"].is_not_null().sum(),
        "in_hospital_deaths": int(admissions["hospital_expire_flag"].sum()),
    }


def _readme(n_patients: int, seed: int, summary: dict) -> str:
    figures = "\n".join(f"| {key.replace('_', ' ')} | {value:,} |" for key, value in summary.items())
    return f"""{README_TITLE}

> **Every record in this folder is synthetic.** It was generated by `ehr-diffusers` {__version__}
> (`ehr_diffusers.data.ehr.demo.write_demo_mimic`) with **seed {seed}** for **{n_patients:,} patients**. It has
> the layout, column names and vocabularies of the MIMIC-IV `hosp` module so that the tools can be demonstrated
> and tested without credentials, but it is not MIMIC-IV data, it is not derived from any patient, and it must not
> be used for any clinical or scientific conclusion.

Files: `hosp/patients.csv.gz`, `hosp/admissions.csv.gz`, `hosp/diagnoses_icd.csv.gz`,
`hosp/d_icd_diagnoses.csv.gz`. The same seed and patient count give byte-identical files.

| figure | value |
|---|---|
{figures}

## How the data was generated
{__doc__.split("## Generative process", 1)[1].rstrip()}
"""


def is_demo_cohort(folder: str | Path) -> bool:
    """True when ``folder`` was written by ``write_demo_mimic`` (its README.md opens with ``README_TITLE``)."""
    return readme_opens_with(folder, README_TITLE)


def write_demo_mimic(
    out: str | Path, n_patients: int = 5000, seed: int = 0, overwrite: bool = False, show_progress: bool = True
) -> dict:
    """Writes a synthetic MIMIC-IV ``hosp/`` folder (and a README saying so) to ``out``; returns its summary.

    The folder is written whole or not at all: an existing ``out`` raises ``OutputExistsError`` before any work
    unless ``overwrite``, and an error leaves nothing half-written.
    """
    if not is_integer(n_patients) or not 1 <= n_patients <= MAX_PATIENTS:
        raise ArgumentError(f"n_patients must be an integer between 1 and {MAX_PATIENTS:,}, got {n_patients!r}")
    if not is_integer(seed) or seed < 0:
        raise ArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    steps = len(GENERATION_STEPS) + len(TABLE_ORDER) + 1  # + README.md
    logger.info("generating %d synthetic patients with seed %d", n_patients, seed)
    with atomic_directory(out, overwrite) as staging:
        bar = tqdm(total=steps, desc="demo-data", unit="step", disable=not show_progress)
        with bar:
            tables = generate_tables(int(n_patients), int(seed), bar)
            hosp = staging / "hosp"
            hosp.mkdir()
            for name in TABLE_ORDER:
                bar.set_postfix_str(f"{name}.csv.gz")
                write_csv_gz(tables[name], hosp / f"{name}.csv.gz")
                bar.update()
            bar.set_postfix_str("README.md")
            summary = _summary(tables)
            (staging / "README.md").write_text(_readme(int(n_patients), int(seed), summary), encoding="utf-8")
            bar.update()
    logger.info("synthetic MIMIC-IV-shaped cohort written to %s: %s", out, summary)
    return summary

