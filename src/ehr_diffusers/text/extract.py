"""What a sentence states about a patient: sex, age, death, admissions, marital status, race and diagnoses.

The rules judge checks summaries with it, and the evaluation checks prompts against generated records with it, so
both read text the same way. It matches whole words, never substrings (a substring match counts "female" as "male"),
and it knows what it does not understand: a sentence that states nothing yields empty sets, not guesses.

Diagnoses are found by phrase lookup over word n-grams (longest first), against every ICD-10-CM category title, the
short name ``describe.short_name`` makes of it, ``describe.PREFERRED_NAMES`` and ``SYNONYMS``: the names and
abbreviations clinicians use for common conditions, each mapped to the category ranges it covers ("diabetes" covers
E08-E13). Words are lower-cased and a plural "s" is dropped on both sides. A mention preceded within three words of the
same clause by a negation ("no", "without", "denies", ...) is kept but marked negated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from ..data.ehr.icd import all_categories
from .describe import PREFERRED_NAMES, short_name

# name -> category ranges (inclusive, 3-character ICD-10-CM categories); the ranges follow the chapter and block
# structure of the ICD-10-CM tabular list.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "hypertension": ("I10-I16",), "htn": ("I10-I16",), "high blood pressure": ("I10-I16",),
    "heart failure": ("I50", "I11", "I13"), "chf": ("I50",), "congestive heart failure": ("I50",), "hfref": ("I50",),
    "chronic kidney disease": ("N18",), "ckd": ("N18",), "end-stage renal disease": ("N18",), "esrd": ("N18",),
    "renal failure": ("N17-N19",), "kidney failure": ("N17-N19",),
    "acute kidney injury": ("N17",), "aki": ("N17",),
    "diabetes": ("E08-E13",), "diabetes mellitus": ("E08-E13",), "diabetic": ("E08-E13",),
    "type 2 diabetes": ("E11",), "t2dm": ("E11",), "type 1 diabetes": ("E10",), "t1dm": ("E10",),
    "atrial fibrillation": ("I48",), "afib": ("I48",), "af": ("I48",), "atrial flutter": ("I48",),
    "coronary artery disease": ("I20-I25",), "cad": ("I20-I25",), "ischemic heart disease": ("I20-I25",),
    "myocardial infarction": ("I21-I22", "I25"), "mi": ("I21-I22",), "heart attack": ("I21-I22",),
    "stemi": ("I21",), "nstemi": ("I21",),
    "stroke": ("I60-I64",), "cva": ("I60-I64",), "ischemic stroke": ("I63",),
    "copd": ("J44",), "chronic obstructive pulmonary disease": ("J44",), "emphysema": ("J43",),
    "asthma": ("J45",), "pneumonia": ("J12-J18", "J69"), "aspiration pneumonia": ("J69",),
    "respiratory failure": ("J96",), "pleural effusion": ("J90-J91",),
    "sepsis": ("A40-A41", "R65"), "septic shock": ("R65",), "severe sepsis": ("R65",),
    "urinary tract infection": ("N39",), "uti": ("N39",),
    "hyperlipidemia": ("E78",), "dyslipidemia": ("E78",), "hypercholesterolemia": ("E78",),
    "obesity": ("E66",), "hypothyroidism": ("E03",), "hyperthyroidism": ("E05",),
    "hyponatremia": ("E87",), "hyperkalemia": ("E87",), "hypokalemia": ("E87",), "acidosis": ("E87",),
    "electrolyte imbalance": ("E87",), "fluid overload": ("E87",),
    "anemia": ("D50-D64",), "iron deficiency anemia": ("D50",), "thrombocytopenia": ("D69",),
    "coagulopathy": ("D65-D68",), "malnutrition": ("E40-E46",),
    "depression": ("F32-F33",), "major depressive disorder": ("F32-F33",), "anxiety": ("F40-F41",),
    "alcohol use disorder": ("F10",), "alcohol abuse": ("F10",), "alcohol dependence": ("F10",),
    "nicotine dependence": ("F17",), "tobacco use": ("F17", "Z72", "Z87"), "smoker": ("F17",),
    "dementia": ("F01-F03", "G30"), "alzheimer's disease": ("G30",), "delirium": ("F05",),
    "gerd": ("K21",), "reflux": ("K21",), "gastroesophageal reflux": ("K21",),
    "cirrhosis": ("K70", "K74"), "liver cirrhosis": ("K70", "K74"),
    "obstructive sleep apnea": ("G47",), "sleep apnea": ("G47",), "osa": ("G47",),
    "osteoporosis": ("M80-M81",), "hiv": ("B20",),
    "cancer": ("C00-C96",), "malignancy": ("C00-C96",), "malignant neoplasm": ("C00-C96",),
    "metastatic cancer": ("C77-C80",), "lung cancer": ("C34",), "breast cancer": ("C50",),
    "prostate cancer": ("C61",), "colon cancer": ("C18",), "lymphoma": ("C81-C88",), "leukemia": ("C91-C95",),
    "chest pain": ("R07",), "abdominal pain": ("R10",), "back pain": ("M54",),
    "pulmonary embolism": ("I26",), "deep vein thrombosis": ("I80-I82",), "dvt": ("I80-I82",),
    "do not resuscitate": ("Z66",), "dnr": ("Z66",),
    "pregnancy": ("O00-O9A",), "pregnant": ("O00-O9A",), "delivery": ("O60-O77", "O80-O82"),
    "benign prostatic hyperplasia": ("N40",), "bph": ("N40",),
}
NEGATIONS = {"no", "not", "without", "denies", "denied", "negative", "absent", "free", "never"}
# A negation reaches back to the start of its clause ("no prior history of diabetes or hypertension" negates both)
# but not past a word that starts a new statement ("no sepsis but pneumonia").
_NEGATION_STOPS = {"but", "with", "and", "has", "had", "have", "presenting", "presented", "admitted", "diagnosed"}
# Words that some category titles are made of but that prose uses for other things.
_NOT_DIAGNOSES = {("death",), ("admission",), ("patient",), ("other",)}

_TOKEN = re.compile(r"[a-z0-9]+(?:['/-][a-z0-9]+)*|[,;:.()]")
# Sex words, matched in lower case; titles (Mr, Mrs, Ms) and "he" are matched in the original case, so that "MS"
# (multiple sclerosis) and "HE" (hepatic encephalopathy) are not read as sex.
_FEMALE = re.compile(r"\b(female|woman|women|lady|girl|she|her|hers)\b")
_MALE = re.compile(r"\b(male|man|men|gentleman|boy|his|him)\b")
_FEMALE_CASED = re.compile(r"\b(?:Mrs|Ms)\.?\s+[A-Z]")
_MALE_CASED = re.compile(r"\b(?:he|He)\b|\bMr\.?\s+[A-Z]")
_AGES = (
    re.compile(r"\b(\d{1,3})\s*-?\s*(?:years?|yrs?|y)\s*-?\s*old\b"),
    re.compile(r"\baged\s+(\d{1,3})\b"),  # not "age 45": "MI at age 45" dates an event
    re.compile(r"\b(\d{1,3})\s*(?:yo|y/o|y\.o\.)"),
    re.compile(r"\b(\d{1,3})\s+years?\s+of\s+age\b"),
)
_DECADE = re.compile(r"\bin\s+(?:his|her|their)\s+(?:early\s+|mid\s+|late\s+)?(\d)0s\b")
_SURVIVAL = re.compile(
    r"\b(?:no|without)\s+(?:recorded\s+|documented\s+|known\s+|reported\s+|in-hospital\s+)?(?:death|mortality)\b"
    r"|\b(?:death|mortality)\s+(?:was\s+|is\s+|has\s+been\s+)?(?:not|never)\s+(?:recorded|documented|reported)\b"
    r"|\b(?:did\s+not|didn't|never)\s+die\b|\bnot\s+(?:deceased|dead)\b|\bsurvived\b|\balive\b"
)
# Deaths that are not the patient's, and death as a risk rather than an event.
_OTHER_DEATHS = re.compile(
    r"\b(?:husband|wife|spouse|partner|mother|father|parent|son|daughter|brother|sister|child|children)s?\b"
    r"[^.;,]{0,20}?\b(?:died|dies|deceased|passed\s+away|dead|death)\b"
    r"|\b(?:risk|fear|threat)\s+of\s+death\b|\bdeath\s+risk\b"
)
_DEATH = re.compile(r"\b(?:died|dies|deceased|expired|passed\s+away|dead|death|in-hospital\s+mortality)\b")
_NUMBER_WORDS = {"no": 0, "a single": 1, "one": 1, "once": 1, "single": 1, "two": 2, "twice": 2, "three": 3, "four": 4,
                 "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_ADMISSIONS = re.compile(
    r"\b(\d+|no|a\s+single|one|two|three|four|five|six|seven|eight|nine|ten)\s+(?:prior\s+|previous\s+|hospital\s+)*"
    r"(?:admissions?|hospitali[sz]ations?)\b|\badmitted\s+(once|twice|(\d+|two|three|four|five|six|seven|eight|nine|ten)"
    r"\s+times)\b"
)
_MARITAL = re.compile(
    r"\b(married|widowed|widow|widower|divorced|separated|single)\b(?![\s-]+(?:hospital|admission|vessel|kidney|"
    r"episode|dose|lesion|organ|lung|event|agent|ventricle|fracture|stage|session|visit|nodule|site|center|unit))"
)
_MARITAL_VALUES = {"married": "MARRIED", "widowed": "WIDOWED", "widow": "WIDOWED", "widower": "WIDOWED",
                   "divorced": "DIVORCED", "separated": "DIVORCED", "single": "SINGLE"}
_RACE = re.compile(
    r"\b(white|caucasian|black|african[\s-]american|asian|hispanic|latino|latina|american\s+indian|alaska\s+native|"
    r"native\s+hawaiian|pacific\s+islander)\b"
    r"(?![\s-]+(?:blood|cells?|count|matter|coat|stools?|tarry|lung|out|spots?|patch(?:es)?|plaques?|lesions?))"
)
_RACE_VALUES = {"white": "WHITE", "caucasian": "WHITE", "black": "BLACK", "african american": "BLACK",
                "african-american": "BLACK", "asian": "ASIAN", "hispanic": "HISPANIC/LATINO",
                "latino": "HISPANIC/LATINO", "latina": "HISPANIC/LATINO",
                "american indian": "AMERICAN INDIAN/ALASKA NATIVE", "alaska native": "AMERICAN INDIAN/ALASKA NATIVE",
                "native hawaiian": "NATIVE HAWAIIAN/PACIFIC ISLANDER",
                "pacific islander": "NATIVE HAWAIIAN/PACIFIC ISLANDER"}


def _normal(word: str) -> str:
    return word[:-1] if len(word) > 4 and word.endswith("s") and not word.endswith(("ss", "us", "is")) else word


_NEGATIONS = frozenset(_normal(word) for word in NEGATIONS)  # "denies" is stored as "denie"
_STOPS = frozenset(_normal(word) for word in _NEGATION_STOPS)


def _words(text: str) -> list[str]:
    """The word tokens of ``_tokens``: the normal form phrases are stored and looked up in."""
    return _tokens(text)[0]


def _tokens(text: str) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """Lower-cased word tokens with a plural "s" dropped (``_normal``); for each, the number of its clause (split at
    , ; : . and brackets), which bounds the reach of a negation, and its character span."""
    words, clauses, spans = [], [], []
    clause = 0
    for match in _TOKEN.finditer(text.lower()):
        if match.group() in ",;:.()":
            clause += 1
        else:
            words.append(_normal(match.group()))
            clauses.append(clause)
            spans.append(match.span())
    return words, clauses, spans


def _negated(words: list[str], clauses: list[int], i: int) -> bool:
    """Whether a negation earlier in the clause of word ``i`` reaches it (see ``NEGATIONS``)."""
    for j in range(i - 1, -1, -1):
        if clauses[j] != clauses[i] or words[j] in _STOPS:
            return False
        if words[j] in _NEGATIONS:
            return True
    return False


def _matches(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [match.span() for match in pattern.finditer(text)]


def _blank(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` with the character ``spans`` replaced by spaces, so that character offsets stay valid."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def _bounds(span: str) -> tuple[str, str]:
    """"I10-I16" -> ("I10", "I16"); "N18" -> ("N18", "N18")."""
    low, _, high = span.partition("-")
    return low, high or low


@dataclass(frozen=True)
class Mention:
    """A diagnosis named in a sentence: the words, the category ranges they cover, and whether they were negated."""

    phrase: str
    ranges: tuple[str, ...]
    negated: bool = False
    span: tuple[int, int] = (0, 0)

    def covers(self, code: str) -> bool:
        return len(code) == 3 and any(low <= code <= high for low, high in map(_bounds, self.ranges))

    def overlaps(self, ranges: Iterable[str]) -> bool:
        """Whether any category this mention covers lies in one of ``ranges``."""
        others = [_bounds(span) for span in ranges]
        return any(low <= other_high and other_low <= high
                   for low, high in map(_bounds, self.ranges) for other_low, other_high in others)

    def supported_by(self, codes: Iterable[str]) -> bool:
        return any(self.covers(code) for code in codes)


@dataclass
class StatedFacts:
    """Everything a sentence was found to state; several values for one field mean the sentence contradicts itself."""

    sexes: set[str] = field(default_factory=set)
    ages: list[tuple[int, int]] = field(default_factory=list)
    deaths: set[bool] = field(default_factory=set)
    admissions: set[int] = field(default_factory=set)
    marital_statuses: set[str] = field(default_factory=set)
    races: set[str] = field(default_factory=set)
    diagnoses: list[Mention] = field(default_factory=list)


class DiagnosisLexicon:
    """Phrase -> category ranges, over ICD-10-CM titles, their short names and ``SYNONYMS``."""

    def __init__(self, titles: Mapping[str, str | None] | None = None,
                 synonyms: Mapping[str, tuple[str, ...]] = SYNONYMS):
        phrases: dict[tuple[str, ...], set[str]] = {}
        for code, title in {**all_categories(), **(titles or {})}.items():
            if not title:
                continue
            for name in (title, short_name(title)):
                key = tuple(_words(name))
                if key and key not in _NOT_DIAGNOSES:
                    phrases.setdefault(key, set()).add(code)
        for code, name in PREFERRED_NAMES.items():
            phrases.setdefault(tuple(_words(name)), set()).add(code)
        for name, ranges in synonyms.items():
            phrases.setdefault(tuple(_words(name)), set()).update(ranges)
        self.phrases = {key: tuple(sorted(spans)) for key, spans in phrases.items()}
        self.longest = max(len(key) for key in self.phrases)

    def find(self, text: str) -> list[Mention]:
        """Non-overlapping mentions, longest phrase first at each position, in reading order."""
        words, clauses, spans = _tokens(text)
        mentions = []
        i = 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                key = tuple(words[i:i + n])
                if key in self.phrases:
                    negated = _negated(words, clauses, i)
                    span = (spans[i][0], spans[i + n - 1][1])
                    mentions.append(Mention(" ".join(key), self.phrases[key], negated, span))
                    i += n
                    break
            else:
                i += 1
        return mentions


@lru_cache(maxsize=1)
def default_lexicon() -> DiagnosisLexicon:
    return DiagnosisLexicon()


def extract_facts(text: str, lexicon: DiagnosisLexicon | None = None) -> StatedFacts:
    """Reads the facts a sentence states (see the module docstring for what is understood)."""
    lexicon = lexicon or default_lexicon()
    lower = text.lower()
    stated = StatedFacts()
    # "no recorded death" and "3 hospital admissions" are not diagnoses, and the words inside diagnosis names
    # ("disorders of white blood cells", "gender identity disorders") are not demographics: each is read once.
    if _SURVIVAL.search(lower):
        stated.deaths.add(False)
    for match in _ADMISSIONS.finditer(lower):
        count = re.sub(r"\s+", " ", match.group(1) or match.group(3) or match.group(2))
        stated.admissions.add(int(count) if count.isdigit() else _NUMBER_WORDS[count])
    without_survival = _blank(lower, _matches(_SURVIVAL, lower))
    stated.diagnoses = lexicon.find(_blank(without_survival, _matches(_ADMISSIONS, without_survival)))
    hidden = _matches(_SURVIVAL, lower) + _matches(_OTHER_DEATHS, lower) + [m.span for m in stated.diagnoses]
    rest = _blank(lower, hidden)
    # the original case, for titles and "he"; only when lower-casing kept every offset (it does for ASCII text)
    cased = _blank(text, hidden) if len(text) == len(lower) else ""
    if _FEMALE.search(rest) or _FEMALE_CASED.search(cased):
        stated.sexes.add("F")
    if _MALE.search(rest) or _MALE_CASED.search(cased):
        stated.sexes.add("M")
    for pattern in _AGES:
        stated.ages.extend((int(m.group(1)), int(m.group(1))) for m in pattern.finditer(rest))
    stated.ages.extend((int(m.group(1)) * 10, int(m.group(1)) * 10 + 9) for m in _DECADE.finditer(rest))
    stated.ages = sorted(set(stated.ages))
    if _DEATH.search(rest):
        stated.deaths.add(True)
    stated.marital_statuses = {_MARITAL_VALUES[m.group(1)] for m in _MARITAL.finditer(rest)}
    stated.races = {_RACE_VALUES[re.sub(r"\s+", " ", m.group(1))] for m in _RACE.finditer(rest)}
    return stated
