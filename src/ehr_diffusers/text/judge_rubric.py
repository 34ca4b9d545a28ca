"""The five categories every judge scores a summary on, 1-5 with 5 the best, and the screening threshold.

Both judges (``judge.LLMJudge`` and ``rules_judge.RulesJudge``) read them from here, so neither imports the other's
module for them.
"""

JUDGE_CATEGORIES = ("factual_agreement", "completeness", "clinical_coherence", "conciseness", "unsupported_claims")
CATEGORY_RUBRIC = {
    "factual_agreement": "every stated fact agrees with the record (5: no contradiction; 1: several)",
    "completeness": "states sex, age, whether the patient died and the principal diagnoses (5: all; 1: almost none)",
    "clinical_coherence": "reads as one plausible, self-consistent clinical statement (5: fully; 1: incoherent)",
    "conciseness": "one sentence without filler or preamble (5: concise; 1: long or padded)",
    "unsupported_claims": "no diagnosis or fact that the record lacks (5: none; 1: several invented claims)",
}
DEFAULT_SCREENING_THRESHOLD = 3
SCORE_RANGE = (1, 5)
