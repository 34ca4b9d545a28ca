"""Plausibility rules: constructed violations, clean records, counts by hand, one-hot checks, missing codes."""

from __future__ import annotations

import numpy as np
import pytest

from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema
from ehr_diffusers.evaluation.ehr.clinical import RULES, compare_plausibility, plausibility, rule_columns
from ehr_diffusers.evaluation.stats import wilson_interval

CODES = ["C53", "C60", "C61", "D25", "D29", "I10", "N40", "N80", "O80", "O99", "O9A", "P07", "Z38", "Z3A"]


def _schema(codes: list[str] = CODES) -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=18, maximum=91),
        ColumnGroup("death", "binary", [False, True]),
        ColumnGroup("marital_status", "one_hot", ["MARRIED", "SINGLE", "MISSING"]),
        ColumnGroup("race", "one_hot", ["WHITE", "BLACK", "MISSING"]),
        ColumnGroup("icd10_categories", "multi_hot", codes),
    ])


def _record(sex: str, age: int, *codes: str) -> dict:
    return {"sex": sex, "age": age, "death": False, "marital_status": "MARRIED", "race": "WHITE",
            "icd10_categories": list(codes)}


CLEAN = [
    _record("F", 30, "O80", "Z3A", "O99"),   # a delivery at 30
    _record("F", 64, "O9A"),                 # the oldest maternity age
    _record("M", 70, "N40", "C61", "C60"),   # prostate and penis codes in a man
    _record("F", 50, "N80", "C53", "D25"),   # female genital codes in a woman
    _record("M", 18, "D29", "I10"),
    _record("F", 91, "I10"),
]


def _rates(result: dict) -> dict[str, tuple]:
    return {name: (rule["eligible"], rule["violations"]) for name, rule in result["rules"].items()}


def test_clean_records_break_no_rule() -> None:
    schema = _schema()
    result = plausibility(schema.encode(CLEAN), schema)
    assert result["records"] == 6
    assert all(rule["violations"] == 0 for rule in result["rules"].values())
    assert result["any_rule"] == {"eligible": 6, "violations": 0, "rate": 0.0, "ci": list(wilson_interval(0, 6))}
    rules = result["rules"]
    assert rules["pregnancy_in_male"]["eligible"] == 2 and rules["male_genital_in_female"]["eligible"] == 4
    assert rules["perinatal_in_adult"]["eligible"] == 6 and rules["pregnancy_above_maternity_age"]["eligible"] == 2
    assert rules["pregnancy_in_male"]["rate"] == 0.0
    assert rules["pregnancy_in_male"]["ci"] == [0.0, pytest.approx(0.6576, abs=1e-4)]  # Wilson 0/2 by hand


def test_each_rule_fires_on_its_constructed_violation() -> None:
    schema = _schema()
    violations = {
        "pregnancy_in_male": _record("M", 40, "O80"),
        "male_genital_in_female": _record("F", 60, "N40"),
        "female_genital_in_male": _record("M", 50, "C53"),
        "perinatal_in_adult": _record("F", 33, "P07"),
        "other_female_specific_in_male": _record("M", 70, "D25"),
        "other_male_specific_in_female": _record("F", 45, "D29"),
        "pregnancy_above_maternity_age": _record("F", 65, "O99"),
        "liveborn_infant_in_adult": _record("M", 20, "Z38"),
    }
    assert set(violations) == {rule.name for rule in RULES}
    for name, record in violations.items():
        result = plausibility(schema.encode(CLEAN + [record]), schema)
        fired = {rule: entry["violations"] for rule, entry in result["rules"].items() if entry["violations"]}
        assert fired == {name: 1}, name
        assert result["any_rule"]["violations"] == 1


def test_counts_rates_and_codes_by_hand() -> None:
    schema = _schema()
    records = CLEAN + [
        _record("M", 40, "O80", "P07"),          # pregnancy in a man, perinatal in an adult
        _record("M", 80, "O80", "O9A", "N80"),   # pregnancy in a man (two codes), over 64, female genital in a man
        _record("F", 55, "N40", "C61"),          # male genital in a woman (two codes)
        _record("F", 25, "O80"),                 # clean
    ]
    result = plausibility(schema.encode(records), schema)
    rules = result["rules"]
    # men: CLEAN has 2, plus 2 -> 4; women: CLEAN has 4, plus 2 -> 6; over 64: CLEAN has 2 (70, 91), plus the man of 80
    assert _rates(result)["pregnancy_in_male"] == (4, 2)
    assert rules["pregnancy_in_male"]["rate"] == 0.5 and rules["pregnancy_in_male"]["ci"] == list(wilson_interval(2, 4))
    assert rules["pregnancy_in_male"]["violations_by_code"] == {"O80": 2, "O9A": 1}
    assert rules["pregnancy_in_male"]["codes_in_vocabulary"] == ["O80", "O99", "O9A"]
    assert _rates(result)["male_genital_in_female"] == (6, 1)
    assert rules["male_genital_in_female"]["violations_by_code"] == {"C61": 1, "N40": 1}
    assert _rates(result)["female_genital_in_male"] == (4, 1)
    assert _rates(result)["perinatal_in_adult"] == (10, 1)
    assert _rates(result)["pregnancy_above_maternity_age"] == (3, 1)
    assert result["any_rule"]["violations"] == 3 and result["any_rule"]["rate"] == pytest.approx(0.3)


def test_rule_ranges_follow_tabular_order() -> None:
    vocabulary = ["N39", "N40", "N53", "N70", "N98", "N99", "O00", "O99", "O9A", "P00", "P96", "Z37", "Z38", "Z3A"]
    pick = lambda ranges: [vocabulary[i] for i in rule_columns(ranges, vocabulary)]  # noqa: E731
    assert pick(("O00-O9A",)) == ["O00", "O99", "O9A"]
    assert pick(("N40-N53",)) == ["N40", "N53"]
    assert pick(("N70-N98",)) == ["N70", "N98"]
    assert pick(("Z33-Z34", "Z36-Z37", "Z39", "Z3A")) == ["Z37", "Z3A"]  # never Z38, the newborn's own code
    assert pick(("P00-P96",)) == ["P00", "P96"]
    assert pick(("C51-C58",)) == []


def test_rule_without_vocabulary_codes_says_so() -> None:
    schema = _schema(["I10", "N40"])
    result = plausibility(schema.encode([_record("M", 40, "I10"), _record("F", 40, "N40")]), schema)
    pregnancy = result["rules"]["pregnancy_in_male"]
    assert pregnancy["codes_in_vocabulary"] == [] and pregnancy["violations"] == 0 and pregnancy["rate"] is None
    assert "none of the rule's categories (O00-O9A)" in pregnancy["reason"]
    assert result["rules"]["male_genital_in_female"]["violations"] == 1


def test_rule_without_eligible_records_is_none_with_reason() -> None:
    schema = _schema()
    result = plausibility(schema.encode([_record("F", 30, "O80"), _record("F", 40)]), schema)
    assert result["rules"]["pregnancy_in_male"]["eligible"] == 0
    assert result["rules"]["pregnancy_in_male"]["rate"] is None
    assert result["rules"]["pregnancy_in_male"]["reason"] == "no eligible records"


def test_contradictory_one_hot_groups() -> None:
    schema = _schema()
    vectors = schema.encode(CLEAN)
    marital, race = schema.slices["marital_status"], schema.slices["race"]
    vectors[0, marital] = [1.0, 1.0, 0.0]   # married and single
    vectors[1, marital] = 0.0               # no status at all
    vectors[2, race] = [0.6, 0.55, 0.0]     # two values above 0.5
    vectors[3, race] = [0.4, 0.3, 0.3]      # none at 0.5 (argmax decoding would hide it)
    result = plausibility(vectors, schema)
    one_hot = result["rules"]["one_hot_marital_status"]
    assert (one_hot["eligible"], one_hot["violations"], one_hot["none_set"], one_hot["several_set"]) == (6, 2, 1, 1)
    assert one_hot["rate"] == pytest.approx(2 / 6)
    assert result["rules"]["one_hot_race"]["violations"] == 2
    assert result["any_rule"]["violations"] == 4
    assert plausibility(schema.encode(CLEAN), schema)["rules"]["one_hot_race"]["violations"] == 0


def test_vectorised_counts_match_a_loop_over_decoded_records() -> None:
    schema = _schema()
    rng = np.random.default_rng(0)
    vectors = (rng.random((3000, schema.dim)) < 0.15).astype(np.float32)
    vectors[:, schema.slices["age"]] = rng.random((3000, 1))
    result = plausibility(vectors, schema)
    records = schema.decode(vectors)
    sexes = {"male": "M", "female": "F"}
    for rule in RULES:
        inside = [schema.codes[i] for i in rule_columns(rule.ranges, schema.codes)]
        if rule.eligible in sexes:
            eligible = [r for r in records if r["sex"] == sexes[rule.eligible]]
        elif rule.eligible == "adult":
            eligible = [r for r in records if r["age"] >= 18]
        else:
            eligible = [r for r in records if r["age"] > 64]
        violations = sum(any(code in inside for code in r["icd10_categories"]) for r in eligible)
        assert (result["rules"][rule.name]["eligible"], result["rules"][rule.name]["violations"]) == (
            len(eligible), violations), rule.name
    marital = (vectors[:, schema.slices["marital_status"]] >= 0.5).sum(axis=1)
    assert result["rules"]["one_hot_marital_status"]["violations"] == int((marital != 1).sum())


def test_compare_plausibility_side_by_side() -> None:
    schema = _schema()
    real = schema.encode(CLEAN)
    synthetic = schema.encode(CLEAN + [_record("M", 40, "O80"), _record("M", 41, "O80")])
    result = compare_plausibility(real, synthetic, schema)
    assert result["real_records"] == 6 and result["synthetic_records"] == 8
    row = result["rules"]["pregnancy_in_male"]
    assert row["real"] == {"eligible": 2, "violations": 0, "rate": 0.0, "ci": list(wilson_interval(0, 2))}
    assert row["synthetic"] == {"eligible": 4, "violations": 2, "rate": 0.5, "ci": list(wilson_interval(2, 4))}
    assert row["source"].startswith("ICD-10-CM Tabular List, chapter 15")
    assert result["any_rule"]["synthetic"]["violations"] == 2
    small = _schema(CODES[:1])  # C53 only: encoding drops the records' other codes
    no_codes = compare_plausibility(small.encode(CLEAN), small.encode(CLEAN + [_record("M", 40, "O80")]), small)
    assert no_codes["rules"]["pregnancy_in_male"]["synthetic"]["rate"] is None
    assert "cannot fire" in no_codes["rules"]["pregnancy_in_male"]["synthetic"]["reason"]
    with pytest.raises(ValueError, match="synthetic must have shape"):
        compare_plausibility(real, synthetic[:, :-1], schema)


def test_bad_vectors_are_rejected() -> None:
    schema = _schema()
    vectors = schema.encode(CLEAN)
    with pytest.raises(ValueError, match="vectors must have shape"):
        plausibility(vectors[0], schema)
    vectors[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        plausibility(vectors, schema)
