"""One-sentence patient summaries: from a template (offline, deterministic) or from any causal LM.

The summary is the text a record is conditioned on in training, and the kind of text users will type, so it must be
one sentence and state only what the record holds. The LLM prompt is written once, here (``SUMMARY_SYSTEM_PROMPT``,
``SUMMARY_PROMPT``); the model sees ``describe.fact_text`` of the patient. LLM answers are cleaned (``clean_summary``)
and an answer that is empty after cleaning is replaced by the template summary, and counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from .describe import DEFAULT_SUMMARY_DIAGNOSES, PatientFacts, fact_text, template_summary
from .generation import CausalLMGenerator

logger = logging.getLogger(__name__)

DEFAULT_SUMMARIZER_ID = "BioMistral/BioMistral-7B"

SUMMARY_SYSTEM_PROMPT = (
    "You are a clinical documentation assistant. You write accurate, concise patient summaries for clinicians, "
    "using only the facts you are given."
)
SUMMARY_PROMPT = (
    "Patient record:\n{facts}\n\n"
    "Write ONE sentence for a clinician that summarises this patient. State the sex, the age, whether the patient "
    "died, and the most important diagnoses. Use only the facts above and add nothing else. Answer with the sentence "
    "only, without a preamble."
)

# A leading label: "Summary:", "One-sentence summary:", "Here is a summary for the clinician:", "Answer:".
_LABEL = re.compile(
    r"^(?:here\s+is|here's)?\s*(?:(?:a|the|my)\s+)?(?:[\w-]+\s+){0,2}?(?:summary|answer|response|sentence)\b"
    r"[^:\n.]{0,40}:\s*",
    re.IGNORECASE,
)
_WRAPPERS = "\"'`*_\u201c\u201d\u2018\u2019 \t"
# Words ending in a full stop that do not end a sentence (lower-cased, without their final full stop).
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf approx dr mr mrs ms prof st no nos pt pts hx dx tx yr yrs y.o mo mos wk wks"
    " jr sr inc fig al".split()
)
# A sentence end: ".", "!" or "?" (closing quotes/brackets may follow) then whitespace or the end of the text.
_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*(?=\s|$)")


def first_sentence(text: str) -> str:
    """The text up to its first sentence end. A full stop inside a number ("3.5") or a word ("e.g") is never one;
    one after an abbreviation ("Dr.", "e.g.") or followed by a lower-case word does not end a sentence either."""
    for match in _END.finditer(text):
        end = match.end()
        if text[match.start()] == ".":
            before = text[: match.start()].split()
            word = before[-1].lstrip("(\"'").lower() if before else ""
            if word in _ABBREVIATIONS or text[end:].lstrip()[:1].islower():
                continue
        return text[:end]
    return text


_PREAMBLE = re.compile(r"^(?:sure|certainly|of course|okay|ok|here\s+is|here's)\b.*[:.!]$", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+")


def clean_summary(text: str) -> str:
    """An LLM answer -> the summary sentence: drops a preamble ("Sure, here is a summary:"), a leading label
    ("Summary:") or list marker, quotes and markdown emphasis; joins a sentence wrapped over lines; keeps the first
    sentence and collapses whitespace. An answer without a letter gives "" (and so the template fallback)."""
    paragraphs = [" ".join(line.strip() for line in block.splitlines() if line.strip())
                  for block in re.split(r"\n\s*\n", text.strip())]
    paragraphs = [paragraph for paragraph in paragraphs if paragraph]
    while len(paragraphs) > 1 and (paragraphs[0].endswith(":") or _PREAMBLE.match(paragraphs[0])):
        paragraphs.pop(0)
    body = _LIST_MARKER.sub("", paragraphs[0] if paragraphs else "").strip(_WRAPPERS)
    body = _LABEL.sub("", body, count=1).strip(_WRAPPERS)
    sentence = first_sentence(body)
    rest = body[len(sentence):].strip()
    if rest and _PREAMBLE.match(sentence.strip()):  # "Sure! A 70-year-old man ..."
        sentence = first_sentence(_LIST_MARKER.sub("", rest).strip(_WRAPPERS))
    sentence = " ".join(sentence.split()).strip(_WRAPPERS)
    return sentence if re.search(r"[A-Za-z]", sentence) else ""


class TemplateSummarizer:
    """``describe.template_summary`` for every patient: no model, the same sentence on every machine."""

    name = "template"

    def __init__(self, max_diagnoses: int = DEFAULT_SUMMARY_DIAGNOSES):
        self.max_diagnoses = max_diagnoses

    def summarize(self, facts: Sequence[PatientFacts], show_progress: bool = False) -> list[str]:
        return [template_summary(patient, self.max_diagnoses) for patient in facts]

    def describe(self) -> dict:
        return {"name": self.name, "max_diagnoses": self.max_diagnoses}


class LLMSummarizer:
    """Summaries written by a causal LM from the fact text of each patient.

    Args:
        model: a Hub id, a local folder, or a ``CausalLMGenerator`` (to share one loaded model with the judge).
        batch_size: prompts per ``generate`` call.
        max_new_tokens: answer length limit; one sentence needs far fewer than the default 64.
        seed: base seed (see ``generation``); only sampling uses it.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (the model's default when None).
        max_diagnoses: diagnoses named by the template summary that replaces an empty answer.
        **model_kwargs: ``CausalLMGenerator`` options (``dtype``, ``device``, ``trust_remote_code``, ``revision``)
            when ``model`` is a name.
    """

    def __init__(
        self,
        model: str | CausalLMGenerator = DEFAULT_SUMMARIZER_ID,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        seed: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        max_diagnoses: int = DEFAULT_SUMMARY_DIAGNOSES,
        **model_kwargs,
    ):
        self.generator = model if isinstance(model, CausalLMGenerator) else CausalLMGenerator(model, **model_kwargs)
        self.name = self.generator.name
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.do_sample = do_sample
        self.temperature = temperature
        self.max_diagnoses = max_diagnoses
        self.fallbacks = 0

    def summarize(self, facts: Sequence[PatientFacts], show_progress: bool = False) -> list[str]:
        prompts = [(SUMMARY_SYSTEM_PROMPT, SUMMARY_PROMPT.format(facts=fact_text(patient))) for patient in facts]
        answers = self.generator.generate(
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            do_sample=self.do_sample,
            temperature=self.temperature,
            show_progress=show_progress,
            desc="summarise",
        )
        summaries = [clean_summary(answer) for answer in answers]
        empty = [i for i, summary in enumerate(summaries) if not summary]
        for i in empty:
            summaries[i] = template_summary(facts[i], self.max_diagnoses)
        if empty:
            logger.warning("%s: %d of %d summaries were empty and replaced by the template", self.name, len(empty),
                           len(facts))
        self.fallbacks += len(empty)
        return summaries

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dtype": str(self.generator.dtype).removeprefix("torch."),
            "system_prompt": SUMMARY_SYSTEM_PROMPT,
            "prompt": SUMMARY_PROMPT,
            "generation": {
                "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "do_sample": self.do_sample,
                "temperature": self.temperature,
            },
            "fallback": TemplateSummarizer(self.max_diagnoses).describe(),
        }


def load_summarizer(spec: str = "template", **kwargs) -> TemplateSummarizer | LLMSummarizer:
    """"template" -> ``TemplateSummarizer``; anything else is a Hub id or folder -> ``LLMSummarizer``."""
    if spec == "template":
        return TemplateSummarizer(**kwargs)
    return LLMSummarizer(spec, **kwargs)
