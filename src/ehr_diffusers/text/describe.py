"""From a patient record to structured facts and to deterministic text.

Everything that turns a record into words goes through here, so that the facts a summary is checked against
(``rules_judge``), the prompts made from held-out patients (evaluation) and the training text all agree. The seed
system wrote "male" for female patients; here the sex word comes from one table keyed by MIMIC-IV's ``gender``
value, and a test checks every demo record.

Diagnoses are ordered once, by ``DiagnosisOrder``: categories from ICD-10-CM chapters R (symptoms and signs) and Z
(factors influencing health status) come last, the rest by descending prevalence in the training split, ties by
code. A summary names the first few, so the order decides what "the principal diagnoses" are; it is saved with the
labels (``text_labels.json``) so that prompts made later use the same one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import polars as pl

from ..data.ehr.cohort import coarse_race
from ..data.ehr.icd import category_title
from ..data.ehr.schema import MISSING

SEX_NOUNS = {"F": "woman", "M": "man"}
SEX_ADJECTIVES = {"F": "female", "M": "male"}
MARITAL_WORDS = {"MARRIED": "married", "SINGLE": "single", "WIDOWED": "widowed", "DIVORCED": "divorced"}
RACE_WORDS = {
    "WHITE": "White",
    "BLACK": "Black",
    "ASIAN": "Asian",
    "HISPANIC/LATINO": "Hispanic/Latino",
    "AMERICAN INDIAN/ALASKA NATIVE": "American Indian/Alaska Native",
    "NATIVE HAWAIIAN/PACIFIC ISLANDER": "Native Hawaiian/Pacific Islander",
}
# The names clinicians use for common categories (the most prevalent in MIMIC), in place of the official titles:
# "hypertension", not "Essential (primary) hypertension". Summaries are shorter and read like the prompts users type.
# A category is listed only where its name fits the codes it mostly holds; the others keep ``short_name`` of the title.
PREFERRED_NAMES = {
    "A41": "sepsis", "C18": "colon cancer", "C34": "lung cancer", "C50": "breast cancer", "C61": "prostate cancer",
    "D50": "iron deficiency anemia", "D62": "acute blood loss anemia", "D64": "anemia", "D68": "coagulopathy",
    "E03": "hypothyroidism", "E10": "type 1 diabetes", "E11": "type 2 diabetes", "E43": "severe malnutrition",
    "E46": "malnutrition", "E66": "obesity", "E78": "hyperlipidemia", "E86": "volume depletion",
    "E87": "fluid and electrolyte disorder", "F03": "dementia", "F10": "alcohol use disorder",
    "F17": "nicotine dependence", "F32": "depression", "F41": "anxiety", "G47": "sleep disorder", "I10": "hypertension",
    "I21": "myocardial infarction", "I25": "coronary artery disease", "I26": "pulmonary embolism",
    "I34": "mitral valve disease", "I48": "atrial fibrillation", "I50": "heart failure", "I63": "ischemic stroke",
    "J18": "pneumonia", "J44": "COPD", "J45": "asthma", "J69": "aspiration pneumonitis", "J90": "pleural effusion",
    "J91": "pleural effusion", "J96": "respiratory failure", "K21": "GERD", "K74": "liver cirrhosis",
    "M81": "osteoporosis", "N17": "acute kidney injury", "N18": "chronic kidney disease", "N19": "kidney failure",
    "N40": "benign prostatic hyperplasia", "Z66": "do not resuscitate status",
}
RECORD_FIELDS = ("sex", "age", "death", "num_admissions", "marital_status", "race", "icd10_categories")
DEFAULT_SUMMARY_DIAGNOSES = 3

_PARENTHETICAL = re.compile(r"\s*(\([^)]*\)|\[[^\]]*\])")
_QUALIFIER = re.compile(r",\s*(unspecified|not elsewhere classified|not otherwise specified)\b.*$", re.IGNORECASE)
_LEADING_OTHER = re.compile(r"^(other and unspecified|other specified|other|unspecified)\s+", re.IGNORECASE)


def _lower_first(text: str) -> str:
    """Lower-cases the first letter unless the first word is an acronym ("HIV", "CKD")."""
    first = text.split(" ", 1)[0]
    return text if len(first) > 1 and first[:2].isupper() else text[:1].lower() + text[1:]


def short_name(title: str) -> str:
    """A category title as prose names it: "Other sepsis" -> "sepsis", "Essential (primary) hypertension" ->
    "essential hypertension", "Pneumonia, unspecified organism" -> "pneumonia"."""
    name = _PARENTHETICAL.sub("", title)
    name = _QUALIFIER.sub("", name)
    stripped = _LEADING_OTHER.sub("", name)
    name = stripped if stripped else name
    return _lower_first(name.strip(" ,"))


@dataclass(frozen=True)
class Diagnosis:
    """One ICD-10-CM category of a patient, with its official title (None for a code the tabular list lacks)."""

    code: str
    title: str | None

    @property
    def name(self) -> str:
        """What a summary calls it: the clinician's name when there is one, else the title's short name."""
        if self.code in PREFERRED_NAMES:
            return PREFERRED_NAMES[self.code]
        return short_name(self.title) if self.title else self.code


@dataclass(frozen=True)
class PatientFacts:
    """What a record says about a patient, in the words the text layer uses; ``diagnoses`` are in summary order."""

    sex: str
    age: int
    death: bool
    num_admissions: int
    marital_status: str | None
    race: str | None
    diagnoses: tuple[Diagnosis, ...] = field(default_factory=tuple)

    @property
    def codes(self) -> list[str]:
        return [diagnosis.code for diagnosis in self.diagnoses]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiagnosisOrder:
    """The order in which a patient's diagnoses are listed and summarised (see the module docstring)."""

    def __init__(self, ranked_codes: Sequence[str] = ()):
        self.ranked_codes = list(ranked_codes)
        self._rank = {code: i for i, code in enumerate(self.ranked_codes)}

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> DiagnosisOrder:
        """Ranks categories by ``counts`` (patients per category in the training split), R and Z chapters last."""
        return cls(sorted(counts, key=lambda code: (code[:1] in "RZ", -counts[code], code)))

    @classmethod
    def from_code_lists(cls, code_lists: Iterable[Sequence[str]]) -> DiagnosisOrder:
        counts: dict[str, int] = {}
        for codes in code_lists:
            for code in set(codes):
                counts[code] = counts.get(code, 0) + 1
        return cls.from_counts(counts)

    def key(self, code: str) -> tuple:
        """Sort key: known categories by rank; unknown ones after them (R/Z still last), by code."""
        return (code[:1] in "RZ", code not in self._rank, self._rank.get(code, 0), code)

    def sort(self, codes: Iterable[str]) -> list[str]:
        return sorted(set(codes), key=self.key)


class FactDescriber:
    """Records -> ``PatientFacts`` -> fact text and template summary.

    ``titles`` maps categories to official titles (a schema's ``icd10_categories`` titles); categories outside it are
    looked up in the ICD-10-CM tabular list.
    """

    def __init__(self, order: DiagnosisOrder | None = None, titles: Mapping[str, str | None] | None = None):
        self.order = order or DiagnosisOrder()
        self.titles = dict(titles or {})

    def title(self, code: str) -> str | None:
        if code not in self.titles:
            self.titles[code] = category_title(code)
        return self.titles[code]

    def facts(self, record: Mapping[str, Any]) -> PatientFacts:
        """One record (a dataset row or a decoded record) -> facts."""
        missing = [name for name in RECORD_FIELDS if name not in record]
        if missing:
            raise ValueError(f"record lacks field(s) {missing}; a record needs {list(RECORD_FIELDS)}")
        sex = record["sex"]
        if sex not in SEX_NOUNS:
            raise ValueError(f"sex must be 'F' or 'M' (MIMIC-IV gender), got {sex!r}")
        marital = record["marital_status"]
        race = record["race"]
        codes = self.order.sort(record["icd10_categories"] or ())
        return PatientFacts(
            sex=sex,
            age=int(record["age"]),
            death=bool(record["death"]),
            num_admissions=int(record["num_admissions"]),
            marital_status=None if marital in (None, MISSING) else str(marital),
            race=None if race in (None, MISSING) else str(race),
            diagnoses=tuple(Diagnosis(code, self.title(code)) for code in codes),
        )

    def facts_batch(self, batch: Mapping[str, Sequence[Any]]) -> list[PatientFacts]:
        """A ``datasets`` batch (a mapping of columns) -> one ``PatientFacts`` per row."""
        missing = [name for name in RECORD_FIELDS if name not in batch]
        if missing:
            raise ValueError(f"dataset lacks column(s) {missing}; labelling needs {list(RECORD_FIELDS)}")
        n = len(batch["sex"])
        return [self.facts({name: batch[name][i] for name in RECORD_FIELDS}) for i in range(n)]


@cache
def coarse_race_group(race: str | None) -> str | None:
    """A MIMIC-IV race string, coarse or raw ("WHITE - RUSSIAN"), -> its coarse group by the cohort's own rules
    (``data.ehr.cohort.coarse_race``); None when it says nothing a sentence can state (unknown, other, missing)."""
    if race is None or race == MISSING:
        return None
    group = pl.select(coarse_race(pl.lit(race, dtype=pl.String))).item()
    return None if group in ("OTHER", "UNKNOWN") else group


def race_word(race: str | None) -> str | None:
    """The coarse group's usual name ("White" for "WHITE - RUSSIAN"); None when the record states no race group."""
    group = coarse_race_group(race)
    return RACE_WORDS[group] if group else None


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _admissions(n: int, noun: str = "hospital admission") -> str:
    return f"no {noun}" if n == 0 else f"{n} {noun}{'s' if n != 1 else ''}"


def _race_fact(race: str | None) -> str:
    """Race as the fact text states it: the group's name, with MIMIC-IV's own string when it says more."""
    if race is None:
        return "not recorded"
    word = race_word(race)
    if word is None:
        return race.lower()
    return word if word.upper() == race else f"{word} ({race.lower()})"


def fact_text(facts: PatientFacts) -> str:
    """Every fact, in fixed clinical prose; the input the LLM summariser and judge see."""
    marital = MARITAL_WORDS.get(facts.marital_status or "", (facts.marital_status or "").lower()) or "not recorded"
    race = _race_fact(facts.race)
    death = "Died (a date of death is recorded)." if facts.death else "No death recorded."
    sex = SEX_ADJECTIVES[facts.sex].capitalize()
    parts = [
        f"{sex} patient aged {facts.age} at the last admission, with {_admissions(facts.num_admissions)}."
        if facts.num_admissions else f"{sex} patient aged {facts.age}, with no hospital admission recorded.",
        death,
        f"Marital status: {marital}. Race: {race}.",
    ]
    if facts.diagnoses:
        listed = "; ".join(f"{d.title or 'untitled category'} ({d.code})" for d in facts.diagnoses)
        parts.append(f"Diagnoses ({len(facts.diagnoses)} ICD-10-CM categories): {listed}.")
    else:
        parts.append("No diagnoses recorded.")
    return " ".join(parts)


def template_summary(facts: PatientFacts, max_diagnoses: int = DEFAULT_SUMMARY_DIAGNOSES) -> str:
    """One deterministic sentence: age, marital status, race, sex, the first ``max_diagnoses`` diagnoses,
    admissions and death, e.g. "67-year-old married White woman with heart failure, chronic kidney disease and
    hypertension; 3 admissions; died." It is written to read like the prompts users type."""
    words = [f"{facts.age}-year-old"]
    if facts.marital_status in MARITAL_WORDS:
        words.append(MARITAL_WORDS[facts.marital_status])
    if race_word(facts.race):
        words.append(race_word(facts.race))
    words.append(SEX_NOUNS[facts.sex])
    names = list(dict.fromkeys(d.name for d in facts.diagnoses[:max_diagnoses]))
    subject = " ".join(words) + (f" with {_join(names)}" if names else " with no recorded diagnoses")
    outcome = "died" if facts.death else "no recorded death"
    return f"{subject}; {_admissions(facts.num_admissions, 'admission')}; {outcome}."
