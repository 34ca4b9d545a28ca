"""The offline judge: checks every fact a summary states against the patient's record, deterministically.

It scores the same five categories as the LLM judge (``judge.JUDGE_CATEGORIES``, 1-5, 5 best), from findings that can
be read and tested one by one (``RulesJudge.check``):

==================  ===========================================================================================
category            how it is scored
==================  ===========================================================================================
factual_agreement   5 - 3 per contradiction: a stated sex, age (more than a year off), death, admission count,
                    marital status or race group that differs from the record; a present diagnosis stated absent
completeness        1 + 4 x the share of the key facts stated: sex, age, death and the principal diagnoses (the first
                    ``max_diagnoses`` in ``describe.DiagnosisOrder``)
clinical_coherence  5 - 3 per incoherence: two sexes, ages, outcomes or admission counts in one sentence; pregnancy or
                    female genital diagnoses for a man, prostate or male genital diagnoses for a woman; 1 for no words
conciseness         5 up to ``max_words`` words in one sentence, one less at 1.5x, 2x and 3x that length and for
                    each extra sentence
unsupported_claims  5 - 3 per diagnosis named (not negated) that the record does not hold, or a marital status or
                    race stated where the record has none
==================  ===========================================================================================

All scores are clipped to 1-5.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .describe import DEFAULT_SUMMARY_DIAGNOSES, PatientFacts, coarse_race_group
from .extract import DiagnosisLexicon, default_lexicon, extract_facts
from .judge_rubric import JUDGE_CATEGORIES

# ICD-10-CM ranges that belong to one sex; the sex edits of the CMS Medicare Code Editor list these chapters' codes
# (pregnancy O00-O9A and female genital organs N70-N98, C51-C58 for women; male genital organs N40-N53, C60-C63).
FEMALE_ONLY = ("O00-O9A", "N70-N98", "C51-C58")
MALE_ONLY = ("N40-N53", "C60-C63")
DEFAULT_MAX_WORDS = 40
# Points one contradiction, incoherence or unsupported claim costs: one is enough to fall under the default
# screening threshold of 3, since a summary that gets one fact wrong teaches the model a wrong condition.
PENALTY = 3
_SENTENCE_END = re.compile(r"[.!?](?:\s+|$)")


@dataclass
class RuleFindings:
    """What the verifier found in one summary; the scores are a function of these lists."""

    contradictions: list[str] = field(default_factory=list)
    omissions: list[str] = field(default_factory=list)
    key_facts: int = 0
    incoherences: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    words: int = 0
    sentences: int = 0


def _clip(score: float) -> int:
    return int(min(5, max(1, round(score))))


class RulesJudge:
    """Scores summaries against their records by rules (see the module docstring); needs no model."""

    name = "rules"

    def __init__(
        self,
        max_diagnoses: int = DEFAULT_SUMMARY_DIAGNOSES,
        max_words: int = DEFAULT_MAX_WORDS,
        lexicon: DiagnosisLexicon | None = None,
    ):
        self.max_diagnoses = max_diagnoses
        self.max_words = max_words
        self.lexicon = lexicon or default_lexicon()

    def describe(self) -> dict:
        return {"name": self.name, "max_diagnoses": self.max_diagnoses, "max_words": self.max_words}

    def check(self, facts: PatientFacts, summary: str) -> RuleFindings:
        """Every finding about one summary of one patient."""
        stated = extract_facts(summary, self.lexicon)
        found = RuleFindings()
        found.words = len(summary.split())
        found.sentences = max(1, len(_SENTENCE_END.findall(summary.strip()))) if found.words else 0
        codes = facts.codes

        if stated.sexes and facts.sex not in stated.sexes:
            found.contradictions.append(f"sex: states {sorted(stated.sexes)}, record {facts.sex}")
        for low, high in stated.ages:
            if not low - 1 <= facts.age <= high + 1:
                found.contradictions.append(f"age: states {low if low == high else f'{low}-{high}'}, "
                                            f"record {facts.age}")
        if stated.deaths and facts.death not in stated.deaths:
            found.contradictions.append(f"death: states {'died' if True in stated.deaths else 'no death'}, "
                                        f"record {'died' if facts.death else 'no death'}")
        for count in sorted(stated.admissions - {facts.num_admissions}):
            found.contradictions.append(f"admissions: states {count}, record {facts.num_admissions}")
        if stated.marital_statuses:
            if facts.marital_status is None:
                found.unsupported.append(f"marital status {sorted(stated.marital_statuses)} (record has none)")
            elif facts.marital_status not in stated.marital_statuses:
                found.contradictions.append(f"marital status: states {sorted(stated.marital_statuses)}, "
                                            f"record {facts.marital_status}")
        if stated.races:
            group = coarse_race_group(facts.race)
            if group is None:
                found.unsupported.append(f"race {sorted(stated.races)} (record has {facts.race or 'none'})")
            elif group not in stated.races:
                found.contradictions.append(f"race: states {sorted(stated.races)}, record {facts.race}")
        for mention in stated.diagnoses:
            if mention.negated and mention.supported_by(codes):
                found.contradictions.append(f"diagnosis: states no {mention.phrase}, record has it")
            elif not mention.negated and not mention.supported_by(codes):
                found.unsupported.append(f"diagnosis: {mention.phrase}")

        key_facts = {"sex": bool(stated.sexes), "age": bool(stated.ages), "death": bool(stated.deaths)}
        named = [m for m in stated.diagnoses if not m.negated]
        for diagnosis in facts.diagnoses[: self.max_diagnoses]:
            key_facts[f"diagnosis {diagnosis.code}"] = any(m.covers(diagnosis.code) for m in named)
        found.key_facts = len(key_facts)
        found.omissions = [name for name, stated_it in key_facts.items() if not stated_it]

        if not found.words or not re.search(r"[A-Za-z]", summary):
            found.incoherences.append("no words")
        for name, values in (("sexes", stated.sexes), ("outcomes", stated.deaths),
                             ("admission counts", stated.admissions)):
            if len(values) > 1:
                found.incoherences.append(f"several {name} stated")
        if stated.ages and max(low for low, _ in stated.ages) > min(high for _, high in stated.ages) + 1:
            found.incoherences.append("several ages stated")
        sex = next(iter(stated.sexes)) if len(stated.sexes) == 1 else facts.sex
        wrong_for_sex = MALE_ONLY if sex == "F" else FEMALE_ONLY
        for mention in named:
            if mention.overlaps(wrong_for_sex):
                found.incoherences.append(f"{mention.phrase} in a {'woman' if sex == 'F' else 'man'}")
        return found

    def scores(self, found: RuleFindings) -> dict[str, int]:
        extra_sentences = max(0, found.sentences - 1)
        length = found.words / self.max_words
        concise = 5 - sum(length > limit for limit in (1.0, 1.5, 2.0, 3.0)) - extra_sentences if found.words else 1
        covered = found.key_facts - len(found.omissions)
        values = {
            "factual_agreement": 5 - PENALTY * len(found.contradictions),
            "completeness": 1 + 4 * covered / found.key_facts,
            "clinical_coherence": 5 - PENALTY * len(found.incoherences) if found.words else 1,
            "conciseness": concise,
            "unsupported_claims": 5 - PENALTY * len(found.unsupported),
        }
        return {category: _clip(values[category]) for category in JUDGE_CATEGORIES}

    def score(
        self, facts: Sequence[PatientFacts], summaries: Sequence[str], show_progress: bool = False
    ) -> list[dict[str, int]]:
        """One score dict per (facts, summary) pair; never None, since the rules always reach a verdict."""
        if len(facts) != len(summaries):
            raise ValueError(f"got {len(facts)} records but {len(summaries)} summaries")
        pairs = tqdm(zip(facts, summaries), total=len(facts), desc="rules judge", disable=not show_progress)
        return [self.scores(self.check(patient, summary)) for patient, summary in pairs]

