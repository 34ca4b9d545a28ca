"""Prompt faithfulness: whether records generated from a prompt hold the facts the prompt states.

Prompts are read with the text layer's extractor (``text.extract.extract_facts``), once per distinct prompt, into
structured facts; they are never matched as substrings (a substring match reads "female" as
"male"). Callers pass one prompt per generated record (a prompt repeated for each record made from it). A record, as
``schema.decode`` returns it, holds ``sex``, ``age``, ``death``, ``num_admissions``, ``marital_status``, ``race`` and
``icd10_categories``.

A stated fact is judged against the record as follows:

==================  ==============================================================================================
attribute           the record is right when
==================  ==============================================================================================
sex                 its sex is the stated one
age                 its age is within ``age_tolerance`` (5) years of the stated age or range ("in her 60s")
death               its death flag is the stated outcome
num_admissions      its admission count is within ``admission_tolerance`` (1) of the stated count
marital_status      its marital status is the stated one (a record without one is wrong)
race                its race's coarse group (``describe.coarse_race_group``) is the stated one
diagnoses           per mention: a stated diagnosis has a category the mention covers, a negated one
                    ("without diabetes") has none
==================  ==============================================================================================

Per attribute: correct / total with total the records whose prompt states the attribute (for diagnoses, the
(record, mention) pairs), the accuracy, and its 95% Wilson interval; an attribute no prompt states has accuracy None
and a reason. A prompt that states several values for one field (two sexes, non-overlapping ages, a diagnosis both
stated and negated) contradicts itself: it is counted and left out of that attribute only. ``overall`` pools every
(record, stated fact) pair; ``all_facts`` is the share of records that hold every fact their prompt states, over the
records whose prompt states at least one.

Records made from one prompt share its facts, so they are not independent: the Wilson interval treats them as if
they were and is narrower than it should be when prompts repeat. Every figure therefore also carries
``ci_prompt_bootstrap``, a percentile bootstrap over distinct prompts (each resample keeps a prompt's records
together), None when fewer than two prompts state the attribute.

``extraction_agreement`` runs the same comparison between prompts and the patients they were written from, with no
tolerance, and adds how often each attribute the patient has was stated: it measures the extractor (and the
summaries), so that the faithfulness figures can be trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import sparse

from ...data.ehr.schema import MISSING
from ...text.describe import RECORD_FIELDS, coarse_race_group
from ...text.extract import DiagnosisLexicon, StatedFacts, extract_facts
from ..stats import percentile_bootstrap, wilson_interval

logger = logging.getLogger(__name__)

AGE_TOLERANCE = 5
ADMISSION_TOLERANCE = 1
SCALAR_ATTRIBUTES = ("sex", "age", "death", "num_admissions", "marital_status", "race")
ATTRIBUTES = SCALAR_ATTRIBUTES + ("diagnoses",)
# The StatedFacts field holding each single-valued attribute.
_STATED_FIELD = {"sex": "sexes", "death": "deaths", "num_admissions": "admissions",
                 "marital_status": "marital_statuses", "race": "races"}


def _ratio_entry(correct: int, total: int, reason: str, keys: tuple[str, str] = ("correct", "total"),
                 value_key: str = "accuracy") -> dict[str, Any]:
    """correct / total with its Wilson interval, or None with ``reason`` when total is 0."""
    entry: dict[str, Any] = {keys[0]: int(correct), keys[1]: int(total)}
    if total == 0:
        entry.update({value_key: None, "ci": None, "reason": reason})
    else:
        entry.update({value_key: correct / total, "ci": list(wilson_interval(int(correct), int(total)))})
    return entry


def _prompt_bootstrap(correct_by_prompt: np.ndarray, total_by_prompt: np.ndarray, reps: int,
                      seed: int) -> list[float] | None:
    """Percentile interval of sum(correct) / sum(total) over resamples of the prompts that state something."""
    used = total_by_prompt > 0
    if used.sum() < 2:
        return None
    correct, total = correct_by_prompt[used], total_by_prompt[used]
    return list(percentile_bootstrap(lambda idx: correct[idx].sum(axis=-1) / total[idx].sum(axis=-1),
                                     len(correct), reps=reps, seed=seed, vectorized=True))


class _Prompts:
    """The facts of each distinct prompt, as arrays indexed by prompt: per attribute, ``single`` (the prompt states
    one value; for diagnoses, at least one mention and no contradiction), ``contradictory`` and ``value``."""

    def __init__(self, stated: list[StatedFacts]):
        count = len(stated)
        self.count = count
        self.value: dict[str, np.ndarray] = {}
        self.single: dict[str, np.ndarray] = {}
        self.contradictory: dict[str, np.ndarray] = {}
        for name, attribute in _STATED_FIELD.items():
            values = [getattr(facts, attribute) for facts in stated]
            sizes = np.fromiter((len(v) for v in values), dtype=np.int64, count=count)
            self.single[name], self.contradictory[name] = sizes == 1, sizes > 1
            self.value[name] = np.array([next(iter(v)) if len(v) == 1 else None for v in values], dtype=object)
        lows = np.array([max((low for low, _ in f.ages), default=-1) for f in stated], dtype=np.float64)
        highs = np.array([min((high for _, high in f.ages), default=-1) for f in stated], dtype=np.float64)
        has_age = np.fromiter((bool(f.ages) for f in stated), dtype=bool, count=count)
        # ranges that do not meet within a year contradict each other (as the rules judge reads them)
        self.contradictory["age"] = has_age & (lows > highs + 1)
        self.single["age"] = has_age & ~self.contradictory["age"]
        self.age_low, self.age_high = lows, highs
        # diagnoses: distinct (ranges, negated) per prompt; the same ranges both stated and negated contradict
        self.mentions: list[list[tuple[tuple[str, ...], bool]]] = []
        contradictory = np.zeros(count, dtype=bool)
        for i, facts in enumerate(stated):
            distinct = list(dict.fromkeys((mention.ranges, mention.negated) for mention in facts.diagnoses))
            present = {ranges for ranges, negated in distinct if not negated}
            contradictory[i] = any(negated and ranges in present for ranges, negated in distinct)
            self.mentions.append([] if contradictory[i] else distinct)
        self.contradictory["diagnoses"] = contradictory
        self.single["diagnoses"] = np.fromiter((bool(m) for m in self.mentions), dtype=bool, count=count)
        self.states_nothing = ~np.any([self.single[name] | self.contradictory[name] for name in ATTRIBUTES], axis=0)


def _field(records: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    return [record[name] for record in records]


def _check_records(records: Sequence[Mapping[str, Any]], name: str) -> None:
    for i, record in enumerate(records):
        missing = [field for field in RECORD_FIELDS if field not in record]
        if missing:
            raise ValueError(f"{name}[{i}] lacks field(s) {missing}; a record needs {list(RECORD_FIELDS)}")
        if record["sex"] not in ("F", "M"):
            raise ValueError(f"{name}[{i}]['sex'] must be 'F' or 'M' (MIMIC-IV gender), got {record['sex']!r}")


def _covers(mention_ranges: list[tuple[str, ...]], codes: np.ndarray) -> sparse.csr_matrix:
    """(mentions x codes) 0/1: which of the sorted distinct ``codes`` each mention's ranges cover. Categories in a
    range are contiguous in string order, so each range is one ``searchsorted`` slice."""
    three = np.char.str_len(codes) == 3 if len(codes) else np.zeros(0, dtype=bool)
    rows, cols = [], []
    for row, ranges in enumerate(mention_ranges):
        for span in ranges:
            low, _, high = span.partition("-")
            start, stop = np.searchsorted(codes, low, "left"), np.searchsorted(codes, high or low, "right")
            hit = np.arange(start, stop)[three[start:stop]]
            rows.append(np.full(len(hit), row))
            cols.append(hit)
    rows_flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols_flat = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    matrix = sparse.csr_matrix((np.ones(len(rows_flat)), (rows_flat, cols_flat)),
                               shape=(len(mention_ranges), len(codes)))
    matrix.data[:] = 1.0  # a code covered by two ranges of one mention counts once
    return matrix


def _diagnosis_pairs(prompts: _Prompts, inverse: np.ndarray,
                     records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (record, mention of its prompt) pair: record index, whether the mention is negated, and whether the
    record holds a category it covers; from one sparse product, not a loop over records."""
    keys: dict[tuple[str, ...], int] = {}
    per_prompt_ids = [np.array([keys.setdefault(ranges, len(keys)) for ranges, _ in m], dtype=np.int64)
                      for m in prompts.mentions]
    per_prompt_negated = [np.array([negated for _, negated in m], dtype=bool) for m in prompts.mentions]
    sizes = np.array([len(ids) for ids in per_prompt_ids], dtype=np.int64)
    if sizes.sum() == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.astype(bool), empty.astype(bool)
    flat_ids, flat_negated = np.concatenate(per_prompt_ids), np.concatenate(per_prompt_negated)
    offsets = np.cumsum(sizes) - sizes
    per_record = sizes[inverse]
    pair_record = np.repeat(np.arange(len(inverse)), per_record)
    within = np.arange(per_record.sum()) - np.repeat(np.cumsum(per_record) - per_record, per_record)
    position = offsets[inverse][pair_record] + within
    mention, negated = flat_ids[position], flat_negated[position]

    code_lists = [() if codes is None else list(codes) for codes in _field(records, "icd10_categories")]
    lengths = np.fromiter((len(codes) for codes in code_lists), dtype=np.int64, count=len(code_lists))
    flat_codes = np.array([code for codes in code_lists for code in codes], dtype=str)
    codes, code_index = np.unique(flat_codes, return_inverse=True)
    held = sparse.csr_matrix((np.ones(len(flat_codes)), (np.repeat(np.arange(len(code_lists)), lengths), code_index)),
                             shape=(len(code_lists), len(codes)))
    hits = (held @ _covers(list(keys), codes).T).tocsr()
    has = np.asarray(hits[pair_record, mention]).ravel() > 0
    return pair_record, negated, has


def _assess(prompts: Sequence[str], records: Sequence[Mapping[str, Any]], lexicon: DiagnosisLexicon | None,
            age_tolerance: float, admission_tolerance: float, records_name: str):
    """Per attribute and record: whether the prompt states it (once), whether the record agrees, and the prompts."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, one per record, not one string")
    if len(prompts) != len(records):
        raise ValueError(f"got {len(prompts)} prompts but {len(records)} {records_name}; pass one prompt per record")
    if len(records) == 0:
        raise ValueError(f"{records_name} is empty")
    bad = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if bad:
        raise ValueError(f"prompts must be strings; prompts[{bad[0]}] is {type(prompts[bad[0]]).__name__}")
    _check_records(records, records_name)
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(prompt, len(index)) for prompt in prompts), dtype=np.int64,
                          count=len(prompts))
    facts = _Prompts([extract_facts(prompt, lexicon) for prompt in index])
    logger.info("read facts from %d distinct prompts for %d records", facts.count, len(records))

    races = {race: coarse_race_group(race) for race in set(_field(records, "race"))}
    marital = np.array([None if value in (None, MISSING) else value for value in _field(records, "marital_status")],
                       dtype=object)
    ages = np.asarray(_field(records, "age"), dtype=np.float64)
    admissions = np.asarray(_field(records, "num_admissions"), dtype=np.float64)
    agrees = {
        "sex": np.array(_field(records, "sex"), dtype=object) == facts.value["sex"][inverse],
        "age": (ages >= facts.age_low[inverse] - age_tolerance) & (ages <= facts.age_high[inverse] + age_tolerance),
        "death": np.array([bool(v) for v in _field(records, "death")], dtype=object) == facts.value["death"][inverse],
        "num_admissions": np.abs(admissions - np.array(
            [np.nan if v is None else v for v in facts.value["num_admissions"]], dtype=np.float64)[inverse])
        <= admission_tolerance,
        "marital_status": marital == facts.value["marital_status"][inverse],
        "race": np.array([races[race] for race in _field(records, "race")], dtype=object)
        == facts.value["race"][inverse],
    }
    stated = {name: facts.single[name][inverse] for name in ATTRIBUTES}
    agrees = {name: stated[name] & np.asarray(agrees[name], dtype=bool) for name in SCALAR_ATTRIBUTES}
    pairs = _diagnosis_pairs(facts, inverse, records)
    return facts, inverse, stated, agrees, pairs


def _summarise(facts: _Prompts, inverse: np.ndarray, stated: dict, agrees: dict, pairs: tuple,
               bootstrap_reps: int, seed: int) -> dict[str, Any]:
    n = len(inverse)
    n_prompts = facts.count
    correct_by_prompt = np.zeros(n_prompts)
    total_by_prompt = np.zeros(n_prompts)
    wrong_per_record = np.zeros(n, dtype=np.int64)
    facts_per_record = np.zeros(n, dtype=np.int64)
    attributes: dict[str, Any] = {}

    def reason(name: str) -> str:
        return ("every prompt that states it contradicts itself" if facts.contradictory[name].any()
                else "no prompt states it")

    def add(name: str, correct: np.ndarray, counted: np.ndarray, records: np.ndarray, extra: dict | None = None):
        """``correct`` and ``counted`` are per unit (record or pair); ``records`` maps units to records."""
        c_prompt = np.bincount(inverse[records], weights=correct, minlength=n_prompts)
        t_prompt = np.bincount(inverse[records], weights=counted, minlength=n_prompts)
        entry = _ratio_entry(int(correct.sum()), int(counted.sum()), reason(name))
        entry["ci_prompt_bootstrap"] = _prompt_bootstrap(c_prompt, t_prompt, bootstrap_reps, seed)
        entry["prompts"] = int(facts.single[name].sum())
        entry["contradictory_prompts"] = int(facts.contradictory[name].sum())
        entry["excluded_records"] = int(facts.contradictory[name][inverse].sum())
        entry.update(extra or {})
        attributes[name] = entry
        correct_by_prompt[:] += c_prompt
        total_by_prompt[:] += t_prompt
        np.add.at(wrong_per_record, records, (counted > 0) & ~(correct > 0))
        np.add.at(facts_per_record, records, counted > 0)

    every = np.arange(n)
    for name in SCALAR_ATTRIBUTES:
        add(name, agrees[name].astype(np.float64), stated[name].astype(np.float64), every)

    pair_record, negated, has = pairs
    right = has != negated
    split = {
        "stated_present": _ratio_entry(int(right[~negated].sum()), int((~negated).sum()), "no stated diagnosis"),
        "stated_absent": _ratio_entry(int(right[negated].sum()), int(negated.sum()), "no negated diagnosis"),
        "records": int(stated["diagnoses"].sum()),
    }
    add("diagnoses", right.astype(np.float64), np.ones(len(right)), pair_record, split)

    overall = _ratio_entry(int(correct_by_prompt.sum()), int(total_by_prompt.sum()), "no prompt states any fact")
    overall["ci_prompt_bootstrap"] = _prompt_bootstrap(correct_by_prompt, total_by_prompt, bootstrap_reps, seed)
    judged = facts_per_record > 0
    satisfied = judged & (wrong_per_record == 0)
    all_facts = _ratio_entry(int(satisfied.sum()), int(judged.sum()), "no record's prompt states a fact",
                             keys=("satisfied", "records"), value_key="share")
    all_facts["ci_prompt_bootstrap"] = _prompt_bootstrap(
        np.bincount(inverse, weights=satisfied, minlength=n_prompts),
        np.bincount(inverse, weights=judged, minlength=n_prompts), bootstrap_reps, seed)
    return {
        "records": n,
        "prompts": n_prompts,
        "prompts_stating_nothing": int(facts.states_nothing.sum()),
        "records_without_stated_facts": int((~judged).sum()),
        "attributes": attributes,
        "overall": overall,
        "all_facts": all_facts,
    }


def prompt_faithfulness(
    prompts: Sequence[str],
    records: Sequence[Mapping[str, Any]],
    lexicon: DiagnosisLexicon | None = None,
    age_tolerance: float = AGE_TOLERANCE,
    admission_tolerance: float = ADMISSION_TOLERANCE,
    bootstrap_reps: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """How well ``records[i]``, generated from ``prompts[i]``, holds the facts the prompt states (module docstring).

    Returns ``records``, ``prompts`` (distinct), ``prompts_stating_nothing``, ``records_without_stated_facts``,
    ``tolerances``, ``attributes`` (per attribute: correct, total, accuracy, ci, ci_prompt_bootstrap, prompts,
    contradictory_prompts, excluded_records, reason when accuracy is None; diagnoses also stated_present,
    stated_absent and records), ``overall`` (the same fields over every pair) and ``all_facts`` (satisfied, records,
    share, ci, ci_prompt_bootstrap).
    """
    facts, inverse, stated, agrees, pairs = _assess(prompts, records, lexicon, age_tolerance, admission_tolerance,
                                                    "records")
    result = _summarise(facts, inverse, stated, agrees, pairs, bootstrap_reps, seed)
    result["tolerances"] = {"age_years": age_tolerance, "admissions": admission_tolerance}
    return result


def extraction_agreement(
    prompts: Sequence[str],
    source_records: Sequence[Mapping[str, Any]],
    lexicon: DiagnosisLexicon | None = None,
    bootstrap_reps: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """How well the facts read from each prompt match the patient it was written from (``source_records[i]``).

    ``agreement`` is ``prompt_faithfulness`` of the source patients themselves with no tolerance (a stated age or
    admission count must be exact). ``coverage`` says, per attribute, how often the prompt states it where the
    patient has it (``stated``, ``applicable``, ``share``, ``ci``), and ``stated_without_value`` how often it is
    stated where the patient has none (a marital status or race group the record lacks, a diagnosis for a patient
    without codes): a summary or extractor that invents facts shows there.
    """
    facts, inverse, stated, agrees, pairs = _assess(prompts, source_records, lexicon, 0, 0, "source_records")
    agreement = _summarise(facts, inverse, stated, agrees, pairs, bootstrap_reps, seed)
    mentioned = {name: (facts.single[name] | facts.contradictory[name])[inverse] for name in ATTRIBUTES}
    n = len(source_records)
    applicable = {name: np.ones(n, dtype=bool) for name in ("sex", "age", "death", "num_admissions")}
    applicable["marital_status"] = np.array([value not in (None, MISSING)
                                             for value in _field(source_records, "marital_status")], dtype=bool)
    applicable["race"] = np.array([coarse_race_group(race) is not None
                                   for race in _field(source_records, "race")], dtype=bool)
    applicable["diagnoses"] = np.array([codes is not None and len(codes) > 0
                                        for codes in _field(source_records, "icd10_categories")], dtype=bool)
    coverage = {}
    for name in ATTRIBUTES:
        entry = _ratio_entry(int((mentioned[name] & applicable[name]).sum()), int(applicable[name].sum()),
                             "no source record has a value", keys=("stated", "applicable"), value_key="share")
        entry["stated_without_value"] = int((mentioned[name] & ~applicable[name]).sum())
        coverage[name] = entry
    return {"agreement": agreement, "coverage": coverage}
