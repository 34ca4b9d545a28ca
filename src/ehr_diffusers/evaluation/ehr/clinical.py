"""Clinical plausibility: how often records break coding rules that real records follow, on synthetic vs real.

Each rule names a set of ICD-10-CM categories and the records it applies to (its *eligible* records: men, women,
adults, everyone); a *violation* is an eligible record that holds one of the categories. Reported per rule: the
eligible count, the violations, the rate violations / eligible with a 95% Wilson interval (None with a reason when
no record is eligible, or when none of the rule's categories is in the schema's vocabulary, so the rule cannot fire),
and the violating records per category. ``any_rule`` counts the records that break at least one rule.

The sex rules follow edit 5 ("Sex conflict") of the CMS Medicare Code Editor (MCE; "Definitions of Medicare Code
Edits", lists "Diagnoses for females only" and "Diagnoses for males only"), and the age rules its edit 4 ("Age
conflict": newborn diagnoses age 0; maternity diagnoses age 9-64 in recent definitions, 12-55 in v31 of 2013). The
MCE lists single codes; the rules here take whole ICD-10-CM chapters, blocks and categories whose tabular titles or
notes tie them to one sex or to newborns. The MCE flags such a pair because "either the diagnosis or the age is
presumed to be incorrect"; so do these rules, but real records do hold some (transgender patients, recorded sex
differing from anatomy, perinatal conditions that persist), and recent MCE releases no longer apply the sex lists.
The comparison with the real split is therefore what tells a model's errors apart, not a rate of zero.

Records are read from schema vectors (``EHRSchema`` layout): sex from the binary ``sex`` group, the record's age from
the ``age`` group in years (``schema.decode_column``; in MIMIC-IV cohorts the age at the last admission, and every
patient is an adult, >= 18), codes and binary fields as ``value >= 0.5``. One-hot groups must hold exactly one value
>= 0.5 per row; a model that samples the binary vector directly (e.g. an EHRDiff-style baseline) can produce rows
with none or several, which decoding would silently resolve by argmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...data.ehr.schema import EHRSchema
from ..stats import wilson_interval

ADULT_AGE = 18
MATERNITY_MAX_AGE = 64


@dataclass(frozen=True)
class CodeRule:
    """Records in ``eligible`` must not hold a category in ``ranges`` (inclusive 3-character category ranges)."""

    name: str
    description: str
    source: str
    ranges: tuple[str, ...]
    eligible: str  # "male", "female", "adult" (age >= 18), "above_maternity_age" (age > 64)


# Sources: the ICD-10-CM Tabular List (CMS/NCHS, FY2024 release; chapter and block titles and notes) and the CMS
# Medicare Code Editor, "Definitions of Medicare Code Edits" (MCE), edits 4 (age conflict) and 5 (sex conflict).
RULES: tuple[CodeRule, ...] = (
    # Chapter 15 "Pregnancy, childbirth and the puerperium (O00-O9A)"; its chapter note: "for use only on maternal
    # records, never on newborn records". MCE edit 5, "Diagnoses for females only", lists the chapter's codes.
    CodeRule("pregnancy_in_male", "pregnancy, childbirth or puerperium codes in a male record",
             "ICD-10-CM Tabular List, chapter 15 (O00-O9A); MCE edit 5 (sex conflict), diagnoses for females only",
             ("O00-O9A",), "male"),
    # Chapter 14 block "Diseases of male genital organs (N40-N53)"; chapter 2 block "Malignant neoplasms of male
    # genital organs (C60-C63)" (C60 penis, C61 prostate, C62 testis, C63 other male genital organs). MCE edit 5,
    # "Diagnoses for males only".
    CodeRule("male_genital_in_female", "prostate or other male genital organ codes in a female record",
             "ICD-10-CM Tabular List, blocks N40-N53 and C60-C63; MCE edit 5 (sex conflict), diagnoses for males only",
             ("N40-N53", "C60-C63"), "female"),
    # Chapter 14 blocks "Inflammatory diseases of female pelvic organs (N70-N77)" and "Noninflammatory disorders of
    # female genital tract (N80-N98)"; chapter 2 block "Malignant neoplasms of female genital organs (C51-C58)".
    # MCE edit 5, "Diagnoses for females only".
    CodeRule("female_genital_in_male", "female genital organ codes in a male record",
             "ICD-10-CM Tabular List, blocks N70-N77, N80-N98 and C51-C58; MCE edit 5 (sex conflict), diagnoses for "
             "females only", ("N70-N98", "C51-C58"), "male"),
    # Chapter 16 "Certain conditions originating in the perinatal period (P00-P96)"; chapter note: "for use on
    # newborn records only". MCE edit 4 lists perinatal codes under "Newborn diagnoses" (age 0). Official Guidelines
    # I.C.16.a.4 allow a perinatal condition that persists to be coded at any age, so this rule flags, it does not
    # prove, an error; the real split's rate shows how often such codes persist in adults.
    CodeRule("perinatal_in_adult", f"perinatal codes in a record aged {ADULT_AGE} or over",
             "ICD-10-CM Tabular List, chapter 16 (P00-P96) note; MCE edit 4 (age conflict), newborn diagnoses; "
             "cf. ICD-10-CM Official Guidelines I.C.16.a.4", ("P00-P96",), "adult"),
    # Categories outside the blocks above whose titles name organs of one sex or the maternal record: D06 carcinoma
    # in situ of cervix uteri, D25-D28 benign neoplasms of uterus, ovary and other female genital organs, D39
    # neoplasm of uncertain behavior of female genital organs, Q50-Q52 congenital malformations of female genital
    # organs, R87 abnormal findings in specimens from female genital organs, and the pregnancy encounters Z33
    # (pregnant state), Z34 (supervision of normal pregnancy), Z36 (antenatal screening of mother), Z37 (outcome of
    # delivery; tabular note: "on the mother's record"), Z39 (maternal postpartum care), Z3A (weeks of gestation;
    # tabular note: "only on the maternal record"). They are the kind of code MCE edit 5 lists for females only.
    CodeRule("other_female_specific_in_male", "other female-specific codes (female genital neoplasms and "
             "malformations, pregnancy encounters) in a male record",
             "ICD-10-CM Tabular List category titles and notes (D06, D25-D28, D39, Q50-Q52, R87, Z33, Z34, Z36, Z37, "
             "Z39, Z3A); cf. MCE edit 5 (sex conflict)",
             ("D06", "D25-D28", "D39", "Q50-Q52", "R87", "Z33-Z34", "Z36-Z37", "Z39", "Z3A"), "male"),
    # D29 benign neoplasm of male genital organs, D40 neoplasm of uncertain behavior of male genital organs, Q53-Q55
    # undescended testicle, hypospadias and other congenital malformations of male genital organs, R86 abnormal
    # findings in specimens from male genital organs. They are the kind of code MCE edit 5 lists for males only.
    CodeRule("other_male_specific_in_female", "other male-specific codes (male genital neoplasms and malformations) "
             "in a female record",
             "ICD-10-CM Tabular List category titles (D29, D40, Q53-Q55, R86); cf. MCE edit 5 (sex conflict)",
             ("D29", "D40", "Q53-Q55", "R86"), "female"),
    # MCE edit 4, "Maternity diagnoses", age 9-64 inclusive in recent definitions (v31 of 2013 had 12-55). MIMIC-IV
    # patients are adults, so only the upper bound can be broken. The record's age is its age at the last admission,
    # which may follow a pregnancy by some years, so the wider of the two ranges is used.
    CodeRule("pregnancy_above_maternity_age", f"pregnancy, childbirth or puerperium codes in a record aged over "
             f"{MATERNITY_MAX_AGE}", "ICD-10-CM Tabular List, chapter 15 (O00-O9A); MCE edit 4 (age conflict), "
             "maternity diagnoses, age 9-64", ("O00-O9A",), "above_maternity_age"),
    # Z38 "Liveborn infants according to place of birth and type of delivery"; tabular note: "for use as the principal
    # code on the initial record of a newborn baby".
    CodeRule("liveborn_infant_in_adult", f"liveborn infant codes (Z38) in a record aged {ADULT_AGE} or over",
             "ICD-10-CM Tabular List, category Z38 note (initial record of a newborn)", ("Z38",), "adult"),
)


def _bounds(span: str) -> tuple[str, str]:
    low, _, high = span.partition("-")
    return low, high or low


def rule_columns(ranges: tuple[str, ...], vocabulary: list[str]) -> np.ndarray:
    """Positions of the vocabulary's 3-character categories that fall in ``ranges`` (string order, as the tabular
    list orders categories: "O99" < "O9A")."""
    codes = np.asarray(vocabulary, dtype=str)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    inside = np.zeros(len(codes), dtype=bool)
    for low, high in map(_bounds, ranges):
        inside |= (codes >= low) & (codes <= high)
    inside &= np.char.str_len(codes) == 3
    return np.flatnonzero(inside)


def _check(vectors: np.ndarray, schema: EHRSchema, name: str) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[1] != schema.dim:
        raise ValueError(f"{name} must have shape (n, {schema.dim}) (the schema's layout), got {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise ValueError(f"{name} must hold finite numbers")
    return array


def _group(schema: EHRSchema, name: str, kind: str):
    return next((group for group in schema.groups if group.name == name and group.kind == kind), None)


def _eligibility(array: np.ndarray, schema: EHRSchema) -> dict[str, Callable[[], tuple[np.ndarray | None, str]]]:
    """Rule eligibility -> a function giving the eligible mask, or None and the reason it cannot be computed."""

    def sex(value: str) -> tuple[np.ndarray | None, str]:
        group = _group(schema, "sex", "binary")
        if group is None or value not in group.categories:
            return None, f"the schema has no binary sex group with the value {value!r}"
        on = array[:, schema.slices["sex"].start] >= 0.5
        return (on if group.categories[1] == value else ~on), ""

    def age(test: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray | None, str]:
        if _group(schema, "age", "continuous") is None:
            return None, "the schema has no continuous age group"
        return test(schema.decode_column("age", array[:, schema.slices["age"].start])), ""

    return {
        "male": lambda: sex("M"),
        "female": lambda: sex("F"),
        "adult": lambda: age(lambda years: years >= ADULT_AGE),
        "above_maternity_age": lambda: age(lambda years: years > MATERNITY_MAX_AGE),
    }


def _rate(violations: int, eligible: int) -> dict[str, Any]:
    if eligible == 0:
        return {"rate": None, "ci": None, "reason": "no eligible records"}
    return {"rate": violations / eligible, "ci": list(wilson_interval(violations, eligible))}


def _code_rule(rule: CodeRule, array: np.ndarray, schema: EHRSchema, masks: dict) -> tuple[dict[str, Any], np.ndarray]:
    entry: dict[str, Any] = {"name": rule.name, "description": rule.description, "source": rule.source,
                             "ranges": list(rule.ranges)}
    vocabulary = schema.codes if _group(schema, "icd10_categories", "multi_hot") else []
    columns = rule_columns(rule.ranges, vocabulary)
    entry["codes_in_vocabulary"] = [vocabulary[i] for i in columns]
    eligible, reason = masks[rule.eligible]()
    violating = np.zeros(len(array), dtype=bool)
    if eligible is None:
        entry.update(eligible=None, violations=None, rate=None, ci=None, reason=reason, violations_by_code={})
        return entry, violating
    held = array[:, schema.slices["icd10_categories"].start + columns] >= 0.5 if len(columns) else None
    if held is not None:
        violating = held.any(axis=1) & eligible
    entry.update(eligible=int(eligible.sum()), violations=int(violating.sum()))
    if held is None:
        entry.update(rate=None, ci=None, reason=f"none of the rule's categories ({', '.join(rule.ranges)}) is in the "
                                                "schema's vocabulary, so it cannot fire")
    else:
        entry.update(_rate(entry["violations"], entry["eligible"]))
    by_code = held[eligible].sum(axis=0) if held is not None else np.zeros(0, dtype=np.int64)
    entry["violations_by_code"] = {vocabulary[i]: int(count) for i, count in zip(columns, by_code) if count}
    return entry, violating


def _one_hot_rule(group_name: str, array: np.ndarray, schema: EHRSchema) -> tuple[dict[str, Any], np.ndarray]:
    counts = (array[:, schema.slices[group_name]] >= 0.5).sum(axis=1)
    violating = counts != 1
    entry: dict[str, Any] = {
        "name": f"one_hot_{group_name}",
        "description": f"the one-hot group {group_name!r} does not hold exactly one value >= 0.5",
        "source": "the schema's encoding (data/schema.py): a one-hot field has exactly one category",
        "eligible": len(array),
        "violations": int(violating.sum()),
        "none_set": int((counts == 0).sum()),
        "several_set": int((counts > 1).sum()),
    }
    entry.update(_rate(entry["violations"], entry["eligible"]))
    return entry, violating


def _plausibility(array: np.ndarray, schema: EHRSchema) -> dict[str, Any]:
    masks = _eligibility(array, schema)
    rules: dict[str, dict[str, Any]] = {}
    any_violation = np.zeros(len(array), dtype=bool)
    for rule in RULES:
        rules[rule.name], violating = _code_rule(rule, array, schema, masks)
        any_violation |= violating
    for group in schema.groups:
        if group.kind == "one_hot":
            entry, violating = _one_hot_rule(group.name, array, schema)
            rules[entry["name"]] = entry
            any_violation |= violating
    summary = {"eligible": len(array), "violations": int(any_violation.sum())}
    summary.update(_rate(summary["violations"], summary["eligible"]))
    return {"records": len(array), "rules": rules, "any_rule": summary}


def plausibility(vectors: np.ndarray, schema: EHRSchema) -> dict[str, Any]:
    """Every rule of ``RULES`` and every one-hot group's check on ``vectors`` (schema layout), vectorised."""
    return _plausibility(_check(vectors, schema, "vectors"), schema)


def compare_plausibility(real: np.ndarray, synthetic: np.ndarray, schema: EHRSchema) -> dict[str, Any]:
    """``plausibility`` of a real split and of synthetic records, rule by rule side by side."""
    real_result = _plausibility(_check(real, schema, "real"), schema)
    synthetic_result = _plausibility(_check(synthetic, schema, "synthetic"), schema)
    fields = ("eligible", "violations", "rate", "ci", "reason")
    rows = {}
    for name, real_entry in real_result["rules"].items():
        synthetic_entry = synthetic_result["rules"][name]
        rows[name] = {
            "name": name,
            "description": real_entry["description"],
            "source": real_entry["source"],
            "real": {key: real_entry[key] for key in fields if key in real_entry},
            "synthetic": {key: synthetic_entry[key] for key in fields if key in synthetic_entry},
        }
    return {
        "real_records": real_result["records"],
        "synthetic_records": synthetic_result["records"],
        "rules": rows,
        "any_rule": {"real": real_result["any_rule"], "synthetic": synthetic_result["any_rule"]},
        "real_detail": real_result,
        "synthetic_detail": synthetic_result,
    }
