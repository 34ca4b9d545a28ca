"""Judging summaries against the record they summarise, and screening training rows by the scores.

A judge scores every summary 1-5 on five categories, with 5 the best on every scale:

==================  =============================================================================================
category            what a 5 means
==================  =============================================================================================
factual_agreement   everything the summary states agrees with the record
completeness        it states the key facts: sex, age, whether the patient died and the principal diagnoses
clinical_coherence  it reads as one plausible clinical statement, with nothing contradicting itself
conciseness         one sentence, no filler, no preamble
unsupported_claims  it claims nothing the record lacks (no invented diagnoses, findings or history); a 5 means none
==================  =============================================================================================

Two kinds of judge share this interface: ``rules_judge.RulesJudge`` checks the facts deterministically, offline;
``LLMJudge`` asks a causal LM (the prompt is ``JUDGE_SYSTEM_PROMPT`` and ``JUDGE_PROMPT``) for a JSON object and reads
it with ``parse_judge_output``, which never raises: an answer it cannot read gives ``None`` for that row, counted in
``LLMJudge.unparseable``.

Training keeps a row only when every score reaches the threshold (``passes_screening``, ``screen``); rows the judge did
not score are dropped unless ``keep_unscored`` is set, because an unchecked summary is not known to be right.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .describe import PatientFacts, fact_text
from .generation import CausalLMGenerator
from .judge_rubric import CATEGORY_RUBRIC, DEFAULT_SCREENING_THRESHOLD, JUDGE_CATEGORIES, SCORE_RANGE
from .rules_judge import RulesJudge

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_ID = "Qwen/Qwen2.5-14B-Instruct"

JUDGE_SYSTEM_PROMPT = (
    "You are a meticulous clinical reviewer. You check a one-sentence patient summary against the patient's record "
    "and answer with JSON only."
)
JUDGE_PROMPT = (
    "Patient record:\n{facts}\n\n"
    "Summary:\n{summary}\n\n"
    "Score the summary from 1 (worst) to 5 (best) on each category:\n"
    + "".join(f"- {category}: {rubric}\n" for category, rubric in CATEGORY_RUBRIC.items())
    + "\nAnswer with ONLY a JSON object with exactly these five keys, each an integer from 1 to 5:\n"
    + "{{" + ", ".join(f'"{category}": <integer>' for category in JUDGE_CATEGORIES) + "}}"
)

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SCORE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*")


def _key(name: str) -> str:
    """ "Factual agreement", "Factual-Agreement" -> "factual_agreement"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _objects(text: str) -> list[str]:
    """The outermost balanced {...} spans of ``text``, in order; braces inside quoted strings are skipped."""
    spans, depth, start, quote = [], 0, 0, None
    for i, char in enumerate(text):
        if quote:
            if char == quote and text[i - 1] != "\\":
                quote = None
        elif char in "\"'" and depth:
            quote = char
        elif char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    return spans


def _load_object(span: str) -> Any:
    """JSON, or its usual slips: trailing commas, single quotes (read as a Python literal, which never runs code)."""
    for candidate in (span, _TRAILING_COMMA.sub(r"\1", span)):
        for loads in (json.loads, ast.literal_eval):
            try:
                return loads(candidate)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    return None


def _score(value: Any) -> int | None:
    """4, 4.0, "4", "4/5" and {"score": 4} -> 4; anything else (4.5, True, "good") -> None."""
    if isinstance(value, Mapping):
        value = value.get("score")
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        match = _SCORE.fullmatch(value)
        value = float(match.group(1)) if match else None
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    return None


def _validated(raw: Mapping[str, Any]) -> dict[str, int] | None:
    scores = {category: _score(raw[category]) if category in raw else None for category in JUDGE_CATEGORIES}
    low, high = SCORE_RANGE
    if any(score is None or not low <= score <= high for score in scores.values()):
        return None
    return scores


def _from_json(text: str) -> Mapping[str, Any] | None:
    """The first JSON-like object that names a category, with normalised keys (also one nested a level deep)."""
    for span in _objects(text):
        loaded = _load_object(span)
        if not isinstance(loaded, Mapping):
            continue
        candidates = [loaded, *(value for value in loaded.values() if isinstance(value, Mapping))]
        for candidate in candidates:
            normalised = {_key(str(name)): value for name, value in candidate.items()}
            if any(category in normalised for category in JUDGE_CATEGORIES):
                return normalised
    return None


def _from_pattern(text: str) -> dict[str, Any]:
    """"Factual agreement: 4" style lines, one search per category."""
    found = {}
    for category in JUDGE_CATEGORIES:
        name = r"[\s_-]*".join(category.split("_"))
        match = re.search(rf"{name}\W{{0,3}}\s*[:=]\s*\W{{0,2}}\s*(\d+(?:\.\d+)?)(?!\d)", text, re.IGNORECASE)
        if match:
            found[category] = match.group(1)
    return found


def parse_judge_output(text: str) -> dict[str, int] | None:
    """A judge's answer -> its five scores, or None when it does not hold all five as integers in 1-5.

    Reads JSON inside ```json fences or prose, with single quotes, trailing commas, scores as strings ("4") or integral
    floats (4.0), and keys in any case or spacing ("Factual agreement"); when no object names a category, it looks for
    "category: score" pairs instead. It never raises.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    fenced = _FENCE.findall(text)
    raw = None
    for part in (*fenced, text):
        raw = _from_json(part)
        if raw is not None:
            break
    return _validated(raw if raw is not None else _from_pattern(text))


def passes_screening(
    scores: Mapping[str, int | None] | None,
    threshold: float = DEFAULT_SCREENING_THRESHOLD,
    keep_unscored: bool = False,
) -> bool:
    """Whether a row is kept for training: every category scores at least ``threshold``. A row without all five
    scores (no judge, an unreadable answer: None, or a struct of Nones in a dataset) is kept only with
    ``keep_unscored``."""
    if scores is None or any(scores.get(category) is None for category in JUDGE_CATEGORIES):
        return keep_unscored
    return all(scores[category] >= threshold for category in JUDGE_CATEGORIES)


def screen(
    dataset: Any,
    threshold: float = DEFAULT_SCREENING_THRESHOLD,
    keep_unscored: bool = False,
    column: str = "judge_scores",
) -> Any:
    """The rows of a ``datasets.Dataset`` that pass ``passes_screening`` on ``column``."""
    if column not in dataset.column_names:
        raise ValueError(
            f"dataset has no {column!r} column to screen on (columns: {dataset.column_names}); label it first with "
            "`ehr-diffusers label`"
        )

    def keep(batch: Sequence[Mapping[str, int | None] | None]) -> list[bool]:
        return [passes_screening(scores, threshold, keep_unscored) for scores in batch]

    return dataset.filter(keep, input_columns=column, batched=True, batch_size=10_000, desc="screen")


class LLMJudge:
    """Scores summaries with a causal LM asked for a JSON object (see the module docstring).

    Args:
        model: a Hub id, a local folder, or a ``CausalLMGenerator`` (e.g. the one the summariser uses).
        batch_size: prompts per ``generate`` call.
        max_new_tokens: answer length limit; the JSON object takes about 50 tokens.
        seed: base seed (see ``generation``); only sampling uses it.
        **model_kwargs: ``CausalLMGenerator`` options (``dtype``, ``device``, ``trust_remote_code``, ``revision``)
            when ``model`` is a name.
    """

    def __init__(
        self,
        model: str | CausalLMGenerator = DEFAULT_JUDGE_ID,
        batch_size: int = 8,
        max_new_tokens: int = 96,
        seed: int = 0,
        **model_kwargs,
    ):
        self.generator = model if isinstance(model, CausalLMGenerator) else CausalLMGenerator(model, **model_kwargs)
        self.name = self.generator.name
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.unparseable = 0

    def score(
        self, facts: Sequence[PatientFacts], summaries: Sequence[str], show_progress: bool = False
    ) -> list[dict[str, int] | None]:
        """Five scores per summary, or None where the answer could not be read."""
        if len(facts) != len(summaries):
            raise ValueError(f"{len(facts)} patients but {len(summaries)} summaries")
        prompts = [
            (JUDGE_SYSTEM_PROMPT, JUDGE_PROMPT.format(facts=fact_text(patient), summary=summary))
            for patient, summary in zip(facts, summaries)
        ]
        answers = self.generator.generate(
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            show_progress=show_progress,
            desc="judge",
        )
        scores = [parse_judge_output(answer) for answer in answers]
        failed = [answer for answer, row in zip(answers, scores) if row is None]
        if failed:
            logger.warning("%s: %d of %d judge answers could not be read as five 1-5 scores; first: %r", self.name,
                           len(failed), len(answers), failed[0][:200])
        self.unparseable += len(failed)
        return scores

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dtype": str(self.generator.dtype).removeprefix("torch."),
            "system_prompt": JUDGE_SYSTEM_PROMPT,
            "prompt": JUDGE_PROMPT,
            "categories": list(JUDGE_CATEGORIES),
            "generation": {
                "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "do_sample": False,
            },
        }


def load_judge(spec: str = "rules", **kwargs) -> RulesJudge | LLMJudge | None:
    """"rules" -> ``RulesJudge`` (offline), "none" -> None (no judging), anything else is a Hub id or folder ->
    ``LLMJudge``."""
    if spec == "rules":
        return RulesJudge(**kwargs)
    if spec == "none":
        return None
    return LLMJudge(spec, **kwargs)
