"""Prompt faithfulness: hand-counted cases, tolerances, contradictions, and the substring bug ("female"
contains "male")."""

from __future__ import annotations

import numpy as np
import pytest

from ehr_diffusers.data.ehr.icd import all_categories
from ehr_diffusers.evaluation.ehr import conditional
from ehr_diffusers.evaluation.ehr.conditional import extraction_agreement, prompt_faithfulness
from ehr_diffusers.evaluation.stats import wilson_interval
from ehr_diffusers.text.describe import FactDescriber, template_summary
from ehr_diffusers.text.extract import extract_facts


def _record(sex: str = "F", age: int = 60, death: bool = False, admissions: int = 1, marital: str = "MISSING",
            race: str = "MISSING", codes: tuple[str, ...] = ()) -> dict:
    return {"sex": sex, "age": age, "death": death, "num_admissions": admissions, "marital_status": marital,
            "race": race, "icd10_categories": list(codes)}


def _attribute(result: dict, name: str) -> tuple[int, int]:
    entry = result["attributes"][name]
    return entry["correct"], entry["total"]


def test_female_prompt_and_male_record_is_wrong_and_vice_versa() -> None:
    # a substring match finds "male" inside "female" and counts these as right
    prompts = ["A 72-year-old female with hypertension.", "A 72-year-old male with hypertension.",
               "A 72-year-old female with hypertension.", "A 72-year-old male with hypertension."]
    records = [_record("M", 72, codes=("I10",)), _record("F", 72, codes=("I10",)),
               _record("F", 72, codes=("I10",)), _record("M", 72, codes=("I10",))]
    result = prompt_faithfulness(prompts, records)
    assert _attribute(result, "sex") == (2, 4)
    assert result["attributes"]["sex"]["accuracy"] == 0.5
    wrong = prompt_faithfulness(prompts[:2], records[:2])
    assert _attribute(wrong, "sex") == (0, 2)
    assert wrong["all_facts"]["satisfied"] == 0 and wrong["all_facts"]["records"] == 2


def test_negated_diagnosis_is_not_a_stated_diagnosis() -> None:
    prompts = ["Elderly patient without diabetes.", "Elderly patient without diabetes.", "Patient with diabetes."]
    records = [_record(codes=("E11", "I10")), _record(codes=("I10",)), _record(codes=("E11",))]
    result = prompt_faithfulness(prompts, records)
    diagnoses = result["attributes"]["diagnoses"]
    assert (diagnoses["correct"], diagnoses["total"]) == (2, 3)
    assert (diagnoses["stated_absent"]["correct"], diagnoses["stated_absent"]["total"]) == (1, 2)
    assert (diagnoses["stated_present"]["correct"], diagnoses["stated_present"]["total"]) == (1, 1)
    assert diagnoses["records"] == 3
    # the record with diabetes fails the negated prompt, the one without passes it
    assert result["all_facts"]["satisfied"] == 2


def test_tolerances_at_their_boundaries() -> None:
    prompts = ["A 67-year-old woman; 3 admissions."] * 4 + ["Woman in her 60s."] * 4
    records = [_record(age=62, admissions=2), _record(age=72, admissions=4),
               _record(age=61, admissions=1), _record(age=73, admissions=5),
               _record(age=55), _record(age=74), _record(age=54), _record(age=75)]
    result = prompt_faithfulness(prompts, records)
    assert _attribute(result, "age") == (4, 8)
    assert _attribute(result, "num_admissions") == (2, 4)
    strict = prompt_faithfulness(prompts, records, age_tolerance=0, admission_tolerance=0)
    assert _attribute(strict, "age") == (0, 8) and _attribute(strict, "num_admissions") == (0, 4)
    assert result["tolerances"] == {"age_years": 5, "admissions": 1}


def test_every_attribute_counted_by_hand() -> None:
    prompt = "67-year-old married White woman with heart failure and hypertension; 3 admissions; died."
    records = [
        # all right: race given as a raw MIMIC-IV string of the stated group
        _record("F", 70, True, 3, "MARRIED", "WHITE - RUSSIAN", ("I50", "I10")),
        # wrong: sex, marital status (none recorded), race group, death; right: age, admissions, both diagnoses
        # (I11, hypertensive heart disease, is in both the hypertension and the heart failure ranges)
        _record("M", 65, False, 2, "MISSING", "OTHER", ("I50", "I11")),
        # wrong: age, heart failure; right: the rest
        _record("F", 80, True, 4, "MARRIED", "WHITE", ("I10",)),
    ]
    result = prompt_faithfulness([prompt] * 3, records)
    expected = {"sex": (2, 3), "age": (2, 3), "death": (2, 3), "num_admissions": (3, 3), "marital_status": (2, 3),
                "race": (2, 3), "diagnoses": (5, 6)}
    assert {name: _attribute(result, name) for name in expected} == expected
    assert result["attributes"]["race"]["ci"] == list(wilson_interval(2, 3))
    overall = result["overall"]
    assert (overall["correct"], overall["total"]) == (18, 24)
    assert overall["accuracy"] == pytest.approx(18 / 24) and overall["ci"] == list(wilson_interval(18, 24))
    assert result["all_facts"]["satisfied"] == 1 and result["all_facts"]["records"] == 3
    assert result["records"] == 3 and result["prompts"] == 1
    assert result["attributes"]["sex"]["prompts"] == 1


def test_facts_are_extracted_once_per_distinct_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(text, lexicon=None):
        calls.append(text)
        return extract_facts(text, lexicon)

    monkeypatch.setattr(conditional, "extract_facts", counting)
    prompts = ["A man with COPD.", "A woman with asthma."] * 50
    records = [_record("M", codes=("J44",)), _record("F", codes=("J45",))] * 50
    result = prompt_faithfulness(prompts, records)
    assert sorted(calls) == ["A man with COPD.", "A woman with asthma."]
    assert result["overall"]["accuracy"] == 1.0 and result["prompts"] == 2


def test_contradictory_and_empty_prompts_are_counted_and_excluded() -> None:
    prompts = ["A 50-year-old man and a woman.", "Patient with diabetes and without diabetes.",
               "40-year-old and 70-year-old", "The weather is nice.", "A man."]
    records = [_record("M", 50), _record(codes=("E11",)), _record(age=40), _record(), _record("M")]
    result = prompt_faithfulness(prompts, records)
    sex = result["attributes"]["sex"]
    assert (sex["correct"], sex["total"], sex["contradictory_prompts"], sex["excluded_records"]) == (1, 1, 1, 1)
    assert _attribute(result, "age") == (1, 1)  # the first prompt's age still counts
    assert result["attributes"]["age"]["contradictory_prompts"] == 1
    diagnoses = result["attributes"]["diagnoses"]
    assert diagnoses["total"] == 0 and diagnoses["accuracy"] is None and diagnoses["contradictory_prompts"] == 1
    assert diagnoses["reason"] == "every prompt that states it contradicts itself"
    assert result["attributes"]["race"] == {**result["attributes"]["race"], "accuracy": None,
                                            "reason": "no prompt states it"}
    assert result["prompts_stating_nothing"] == 1
    # records 2, 3 and 4 have no fact left to judge
    assert result["records_without_stated_facts"] == 3 and result["all_facts"]["records"] == 2


def test_prompt_bootstrap_keeps_records_of_one_prompt_together() -> None:
    # ten records per prompt, all right for one prompt and all wrong for the other: the Wilson interval over 20
    # records is narrow, the bootstrap over the 2 prompts spans the whole range
    prompts = ["A man."] * 10 + ["A woman."] * 10
    records = [_record("M")] * 10 + [_record("M")] * 10
    result = prompt_faithfulness(prompts, records, bootstrap_reps=500)
    sex = result["attributes"]["sex"]
    assert sex["accuracy"] == 0.5
    assert sex["ci"] == list(wilson_interval(10, 20))
    assert sex["ci_prompt_bootstrap"] == [0.0, 1.0]
    assert result["attributes"]["death"]["ci_prompt_bootstrap"] is None  # no prompt states it


def test_vectorised_diagnoses_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    phrases = ["diabetes", "hypertension", "heart failure", "COPD", "pneumonia", "sepsis", "chronic kidney disease",
               "atrial fibrillation", "anemia", "depression"]
    codes = ["E11", "E10", "I10", "I12", "I50", "J44", "J18", "A41", "N18", "I48", "D64", "F32", "K21", "Z66"]
    distinct = [
        "Patient with " + " and ".join(rng.choice(phrases, 2, replace=False)) + ("; no " + str(rng.choice(phrases))
                                                                             if rng.random() < 0.5 else "")
        for _ in range(40)
    ]
    prompts = [distinct[i] for i in rng.integers(0, 40, 600)]
    records = [_record(codes=tuple(rng.choice(codes, rng.integers(0, 5), replace=False))) for _ in prompts]
    result = prompt_faithfulness(prompts, records)
    correct = total = 0
    for prompt, record in zip(prompts, records):
        mentions = {(m.ranges, m.negated): m for m in extract_facts(prompt).diagnoses}
        if any((ranges, not negated) in mentions for ranges, negated in mentions):
            continue  # contradictory
        for mention in mentions.values():
            total += 1
            correct += mention.supported_by(record["icd10_categories"]) != mention.negated
    assert _attribute(result, "diagnoses") == (correct, total) and total > 500


def test_extraction_agrees_with_the_patients_of_template_summaries() -> None:
    rng = np.random.default_rng(1)
    categories = sorted(all_categories())
    marital = ["MARRIED", "SINGLE", "WIDOWED", "DIVORCED", "MISSING"]
    sources = [_record(str(rng.choice(["F", "M"])), int(rng.integers(18, 92)), bool(rng.random() < 0.3),
                       int(rng.integers(0, 6)), str(rng.choice(marital)),
                       str(rng.choice(["WHITE", "BLACK - HAITIAN", "ASIAN", "OTHER", "MISSING"])),
                       tuple(rng.choice(categories, rng.integers(0, 6), replace=False)))
               for _ in range(150)]
    describer = FactDescriber()
    prompts = [template_summary(describer.facts(record)) for record in sources]
    result = extraction_agreement(prompts, sources)
    assert result["agreement"]["overall"]["accuracy"] == 1.0
    assert result["agreement"]["all_facts"]["share"] == 1.0
    coverage = result["coverage"]
    assert coverage["sex"]["share"] == 1.0 and coverage["age"]["share"] == 1.0 and coverage["death"]["share"] == 1.0
    with_marital = sum(record["marital_status"] != "MISSING" for record in sources)
    assert (coverage["marital_status"]["stated"], coverage["marital_status"]["applicable"]) == (with_marital,) * 2
    with_race = sum(record["race"] not in ("OTHER", "MISSING") for record in sources)
    assert coverage["race"]["applicable"] == with_race and coverage["race"]["stated_without_value"] == 0
    # a summary with the wrong sex: the extractor reads it, so agreement drops
    swapped = [prompt.replace(" woman", " XX").replace(" man", " woman").replace(" XX", " man") for prompt in prompts]
    assert extraction_agreement(swapped, sources)["agreement"]["attributes"]["sex"]["accuracy"] == 0.0


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 records"):
        prompt_faithfulness(["A man.", "A woman."], [_record()])
    with pytest.raises(ValueError, match="records is empty"):
        prompt_faithfulness([], [])
    with pytest.raises(ValueError, match="not one string"):
        prompt_faithfulness("A man.", [_record()])
    with pytest.raises(ValueError, match=r"records\[0\] lacks field\(s\) \['age'\]"):
        prompt_faithfulness(["A man."], [{k: v for k, v in _record().items() if k != "age"}])
    with pytest.raises(ValueError, match="'F' or 'M'"):
        prompt_faithfulness(["A man."], [_record("X")])
    with pytest.raises(ValueError, match=r"prompts\[0\] is int"):
        prompt_faithfulness([3], [_record()])
    with pytest.raises(ValueError, match="source_records"):
        extraction_agreement(["A man."], [])
