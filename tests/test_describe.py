"""Facts, fact text, template summaries, the sentence reader and the rules judge, checked against records."""

from __future__ import annotations

import re

import pytest

from ehr_diffusers.text.describe import (
    Diagnosis,
    DiagnosisOrder,
    FactDescriber,
    PatientFacts,
    fact_text,
    short_name,
    template_summary,
)
from ehr_diffusers.text.extract import extract_facts
from ehr_diffusers.text.judge import JUDGE_CATEGORIES, passes_screening
from ehr_diffusers.text.rules_judge import RulesJudge


@pytest.fixture(scope="module")
def demo_records(demo_dataset):
    from datasets import load_from_disk

    dataset = load_from_disk(str(demo_dataset))
    order = DiagnosisOrder.from_code_lists(dataset["train"]["icd10_categories"])
    describer = FactDescriber(order)
    records = [row for split in dataset.values() for row in split]
    return records, [describer.facts(row) for row in records]


@pytest.fixture(scope="module")
def judge():
    return RulesJudge()


def woman(**changes) -> PatientFacts:
    fields = dict(sex="F", age=67, death=False, num_admissions=3, marital_status="MARRIED", race="WHITE",
                  diagnoses=(Diagnosis("I50", "Heart failure"), Diagnosis("N18", "Chronic kidney disease (CKD)"),
                             Diagnosis("I10", "Essential (primary) hypertension"),
                             Diagnosis("Z66", "Do not resuscitate")))
    fields.update(changes)
    return PatientFacts(**fields)


def test_facts_and_text_agree_with_every_demo_record(demo_records):
    records, facts = demo_records
    assert {f.sex for f in facts} == {"F", "M"}
    for record, patient in zip(records, facts):
        assert patient.sex == record["sex"]
        assert ((patient.age, patient.death, patient.num_admissions)
                == (record["age"], record["death"], record["num_admissions"]))
        assert patient.marital_status == (None if record["marital_status"] == "MISSING" else record["marital_status"])
        assert patient.race == (None if record["race"] == "MISSING" else record["race"])
        assert sorted(patient.codes) == sorted(record["icd10_categories"])
        text = fact_text(patient)
        wrong = r"\bmale\b" if record["sex"] == "F" else r"\bfemale\b"
        assert text.startswith("Female patient" if record["sex"] == "F" else "Male patient")
        demographics = text.split("Diagnoses (")[0]  # titles may name a sex ("... of male genital organs")
        assert not re.search(wrong, demographics, re.IGNORECASE)
        assert re.search(rf"aged {record['age']}\b", text)
        assert ("at the last admission" in text) == (record["num_admissions"] > 0)
        assert ("Died" in text) == record["death"]
        assert all(f"({code})" in text for code in record["icd10_categories"])
        assert not any(f"({i})" in text for i in record["code_indices"] if str(i) not in record["icd10_categories"])


def test_template_summaries_state_the_record_and_pass_the_rules_judge(demo_records, judge):
    records, facts = demo_records
    summaries = [template_summary(patient) for patient in facts]
    for patient, summary in zip(facts, summaries):
        stated = extract_facts(summary)
        assert stated.sexes == {patient.sex}, summary
        assert stated.ages == [(patient.age, patient.age)], summary
        assert stated.deaths == {patient.death}, summary
        assert stated.admissions == {patient.num_admissions}, summary
        assert summary.count(".") == 1 and summary.endswith(".")
    scores = judge.score(facts, summaries)
    assert all(passes_screening(row, 3) for row in scores)
    for category in ("factual_agreement", "completeness", "clinical_coherence", "unsupported_claims"):
        assert all(row[category] == 5 for row in scores), category


@pytest.mark.parametrize(
    ("edit", "category", "finding"),
    [
        (lambda s: s.replace("woman", "man"), "factual_agreement", "sex"),
        (lambda s: s.replace("67-year-old", "45-year-old"), "factual_agreement", "age"),
        (lambda s: s.replace("no recorded death", "died"), "factual_agreement", "death"),
        (lambda s: s.replace("3 admissions", "one hospital admission"), "factual_agreement", "admissions"),
        (lambda s: s.replace("heart failure", "heart failure, prostate cancer"), "unsupported_claims",
         "prostate cancer"),
        (lambda s: s.replace("heart failure", "COPD"), "unsupported_claims", "copd"),
    ],
)
def test_rules_judge_catches_injected_errors(judge, edit, category, finding):
    facts = woman()
    summary = template_summary(facts)
    assert judge.score([facts], [summary]) == [{c: 5 for c in JUDGE_CATEGORIES}]
    wrong = edit(summary)
    assert wrong != summary
    found = judge.check(facts, wrong)
    listed = found.contradictions if category == "factual_agreement" else found.unsupported
    assert any(finding in item for item in listed), (wrong, found)
    assert judge.score([facts], [wrong])[0][category] <= 2
    assert not passes_screening(judge.score([facts], [wrong])[0], 3)  # one wrong fact is enough to screen it out


def test_rules_judge_scores_omissions_incoherence_and_length(judge):
    facts = woman()
    assert judge.score([facts], ["A woman."])[0]["completeness"] == 2  # sex only: 1 of 6 key facts
    assert judge.check(facts, "67-year-old woman and man with heart failure.").incoherences == ["several sexes stated"]
    assert "pregnancy in a man" in judge.check(woman(sex="M"), "67-year-old man, pregnancy.").incoherences
    assert judge.score([facts], ["  "])[0] == {c: 1 if c in ("clinical_coherence", "conciseness", "completeness") else 5
                                                for c in JUDGE_CATEGORIES}
    long = template_summary(facts) + " " + "Further words follow here. " * 10
    assert judge.score([facts], [long])[0]["conciseness"] <= 2
    negated = "67-year-old woman without heart failure; no recorded death."
    assert any("states no heart failure" in c for c in judge.check(facts, negated).contradictions)


def test_extract_reads_whole_words_and_common_clinical_names():
    assert extract_facts("A female patient.").sexes == {"F"}  # "female" contains "male"
    assert extract_facts("A 72 yo male with CHF, AKI and T2DM; admitted twice; survived.").sexes == {"M"}
    stated = extract_facts("A 72 yo male with CHF, AKI and T2DM; admitted twice; survived.")
    assert stated.ages == [(72, 72)] and stated.admissions == {2} and stated.deaths == {False}
    assert [m.ranges for m in stated.diagnoses] == [("I50",), ("N17",), ("E11",)]
    assert extract_facts("Woman in her late 70s.").ages == [(70, 79)]
    blood = extract_facts("Man with disorders of white blood cells and ill-defined and unknown cause of mortality.")
    assert blood.races == set() and blood.deaths == set()  # words inside diagnosis names are not demographics
    assert extract_facts("She has no pneumonia, but pregnancy.").diagnoses[1].negated is False


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("A 45-year-old with MS.", "sexes", set()),  # multiple sclerosis, not "Ms"
        ("HE and cirrhosis in a 60-year-old", "sexes", set()),  # hepatic encephalopathy, not "he"
        ("Mrs. Smith, 70 yo", "sexes", {"F"}),
        ("He was admitted twice.", "sexes", {"M"}),
        ("death not recorded", "deaths", {False}),
        ("not deceased", "deaths", {False}),
        ("woman whose husband died", "deaths", set()),
        ("high mortality risk", "deaths", set()),
        ("assisted living", "deaths", set()),
        ("white blood cell count high; black tarry stools", "races", set()),
        ("single-vessel CAD and a single kidney", "marital_statuses", set()),
        ("died during a hospitalization", "admissions", set()),
        ("a single admission", "admissions", {1}),
        ("MI at age 45", "ages", []),
    ],
)
def test_extract_ignores_look_alikes(text, field, expected):
    assert getattr(extract_facts(text), field) == expected


@pytest.mark.parametrize(
    ("text", "negated"),
    [
        ("Man who denies diabetes.", {"diabete": True}),
        ("No prior history of diabetes or hypertension.", {"diabete": True, "hypertension": True}),
        ("without a known history of stroke", {"stroke": True}),
        ("no sepsis but pneumonia", {"sepsis": True, "pneumonia": False}),
        ("no sepsis, with pneumonia", {"sepsis": True, "pneumonia": False}),
    ],
)
def test_negation_reaches_its_clause(text, negated):
    assert {m.phrase: m.negated for m in extract_facts(text).diagnoses} == negated


def test_raw_race_strings_are_stated_as_their_group():
    from ehr_diffusers.text.describe import coarse_race_group, race_word

    assert coarse_race_group("WHITE - RUSSIAN") == "WHITE" and coarse_race_group("PORTUGUESE") == "WHITE"
    assert race_word("ASIAN - ASIAN INDIAN") == "Asian" and race_word("UNKNOWN") is None
    facts = woman(race="WHITE - EASTERN EUROPEAN")
    assert "White woman" in template_summary(facts) and "Race: White (white - eastern european)" in fact_text(facts)


def test_short_names_and_order():
    assert short_name("Other sepsis") == "sepsis"
    assert short_name("Essential (primary) hypertension") == "essential hypertension"
    assert short_name("Pneumonia, unspecified organism") == "pneumonia"
    assert short_name("HIV disease") == "HIV disease"
    order = DiagnosisOrder.from_counts({"I10": 50, "Z66": 90, "R65": 80, "N18": 10, "A41": 10})
    assert order.ranked_codes == ["I10", "A41", "N18", "Z66", "R65"]  # R and Z last, by count
    assert order.sort(["Z66", "Q99", "N18", "I10"]) == ["I10", "N18", "Q99", "Z66"]


def test_facts_name_what_is_missing():
    describer = FactDescriber()
    with pytest.raises(ValueError, match="icd10_categories"):
        describer.facts({"sex": "F", "age": 1, "death": False, "num_admissions": 0, "marital_status": None,
                         "race": None})
    with pytest.raises(ValueError, match="sex must be"):
        describer.facts({"sex": "female", "age": 1, "death": False, "num_admissions": 0, "marital_status": None,
                         "race": None, "icd10_categories": []})
