"""The LLM summariser and judge, end to end on a tiny random Llama built here, plus the judge-answer parser and the
training screen. Everything runs offline on the CPU: the models are folders loaded by path, the same code path as a
Hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ehr_diffusers.hub import ModelNotFoundError
from ehr_diffusers.text.describe import Diagnosis, PatientFacts, fact_text, template_summary
from ehr_diffusers.text.generation import CausalLMGenerator
from ehr_diffusers.text.judge import (
    JUDGE_CATEGORIES,
    JUDGE_PROMPT,
    LLMJudge,
    load_judge,
    parse_judge_output,
    passes_screening,
    screen,
)
from ehr_diffusers.text.summarize import (
    SUMMARY_PROMPT,
    LLMSummarizer,
    TemplateSummarizer,
    clean_summary,
    load_summarizer,
)

CORPUS = [
    "Female patient aged 67 at the last admission, with 3 hospital admissions.",
    "Male patient aged 54 at the last admission, with 1 hospital admission.",
    "Died (a date of death is recorded). No death recorded.",
    "Marital status: married. Race: White. Marital status: single. Race: not recorded.",
    "Diagnoses (2 ICD-10-CM categories): Heart failure (I50); Essential (primary) hypertension (I10).",
    "No diagnoses recorded. Write ONE sentence for a clinician that summarises this patient.",
    "67-year-old married White woman with heart failure and essential hypertension; died.",
    "Score the summary from 1 to 5: factual_agreement, completeness, clinical_coherence, conciseness.",
    '{"factual_agreement": 5, "completeness": 4, "unsupported_claims": 5}',
]
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Like Mistral's older templates: a system turn is an error.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "[INST] {{ message['content'] }} [/INST]{% endfor %}"
)


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.chat_template = chat_template
    return wrapped


def _save_model(folder: Path, chat_template: str | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(chat_template)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,  # spread-out logits: no near ties for greedy decoding to flip on
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 32-wide model gains nothing from threads, and threads fighting other processes slow it tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("chat-llm"), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("plain-llm"), None)


@pytest.fixture(scope="module")
def chat_generator(chat_model) -> CausalLMGenerator:
    return CausalLMGenerator(str(chat_model), device="cpu")


@pytest.fixture(scope="module")
def patients() -> list[PatientFacts]:
    heart = (Diagnosis("I50", "Heart failure"), Diagnosis("I10", "Essential (primary) hypertension"))
    return [
        PatientFacts("F", 67, True, 3, "MARRIED", "WHITE", heart),
        PatientFacts("M", 54, False, 1, None, None, ()),
        PatientFacts("M", 80, False, 2, "SINGLE", "BLACK", heart[1:]),
        PatientFacts("F", 31, False, 0, None, "ASIAN", ()),
    ]


def test_prompts_are_formatted_from_fact_text(patients):
    assert fact_text(patients[0]) in SUMMARY_PROMPT.format(facts=fact_text(patients[0]))
    prompt = JUDGE_PROMPT.format(facts=fact_text(patients[0]), summary="A summary.")
    assert "A summary." in prompt and all(category in prompt for category in JUDGE_CATEGORIES)


def test_batches_are_left_padded_and_use_the_chat_template(chat_generator):
    prompts = [("system text", "a short user turn"), ("system text", "a much longer user turn " * 5)]
    batch = chat_generator.encode(prompts)
    mask = batch["attention_mask"]
    assert mask[:, -1].tolist() == [1, 1]
    assert mask[0, 0] == 0 and mask[1, 0] == 1
    assert (batch["input_ids"][0][mask[0] == 0] == chat_generator.pad_token_id).all()
    text = chat_generator.prompt_text("system text", "user text")
    assert text.startswith("<s><|system|> system text") and text.endswith("<|assistant|>")


def test_plain_prompt_without_template_and_system_turn_fallback(plain_model, chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = CausalLMGenerator(str(plain_model), device="cpu")
    assert plain.prompt_text("system", "user") == "system\n\nuser\n"
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    merged = CausalLMGenerator.from_model(AutoModelForCausalLM.from_pretrained(chat_model), tokenizer, "no-system")
    assert merged.prompt_text("system", "user") == "[INST] system\n\nuser [/INST]"


def test_missing_pad_token_falls_back_to_eos(chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.pad_token = None
    generator = CausalLMGenerator.from_model(AutoModelForCausalLM.from_pretrained(chat_model), tokenizer, "tiny")
    assert generator.pad_token_id == tokenizer.eos_token_id
    assert len(generator.generate([("s", "a"), ("s", "a longer prompt")], max_new_tokens=3)) == 2


@pytest.mark.parametrize("fixture", ["chat_model", "plain_model"])
def test_llm_summarizer_runs_from_a_folder(fixture, patients, request):
    summarizer = load_summarizer(str(request.getfixturevalue(fixture)), batch_size=3, max_new_tokens=12, device="cpu")
    summaries = summarizer.summarize(patients)
    assert len(summaries) == len(patients) and all(isinstance(s, str) and s.strip() for s in summaries)
    assert summarizer.name == str(request.getfixturevalue(fixture))
    record = summarizer.describe()
    assert record["prompt"] == SUMMARY_PROMPT and record["generation"]["max_new_tokens"] == 12


def test_greedy_summaries_are_deterministic_and_independent_of_batch_size(chat_generator, patients):
    one = LLMSummarizer(chat_generator, batch_size=1, max_new_tokens=12).summarize(patients)
    again = LLMSummarizer(chat_generator, batch_size=1, max_new_tokens=12).summarize(patients)
    batched = LLMSummarizer(chat_generator, batch_size=4, max_new_tokens=12).summarize(patients)
    assert one == again == batched
    sampling = {"batch_size": 2, "max_new_tokens": 12, "seed": 7, "do_sample": True}
    sampled = [LLMSummarizer(chat_generator, **sampling).summarize(patients) for _ in range(2)]
    assert sampled[0] == sampled[1]
    # a chunk that starts elsewhere (as after a resume) samples the same answers for the same rows
    assert LLMSummarizer(chat_generator, **sampling).summarize(patients[2:]) == sampled[0][2:]


def test_empty_answers_fall_back_to_the_template_and_are_counted(chat_generator, patients, monkeypatch, caplog):
    summarizer = LLMSummarizer(chat_generator, max_new_tokens=4)
    answers = ["  ", "A man.", "Summary:", "x"]
    monkeypatch.setattr(chat_generator, "generate", lambda prompts, **kwargs: answers[: len(prompts)])
    with caplog.at_level(logging.WARNING):
        summaries = summarizer.summarize(patients)
    assert summaries[0] == template_summary(patients[0]) and summaries[2] == template_summary(patients[2])
    assert summaries[1] == "A man." and summarizer.fallbacks == 2
    summarizer.summarize(patients)
    assert summarizer.fallbacks == 4
    assert "2 of 4 summaries were empty" in caplog.text


def test_template_summarizer(patients):
    summarizer = load_summarizer("template")
    assert isinstance(summarizer, TemplateSummarizer)
    assert summarizer.summarize(patients) == [template_summary(p) for p in patients]
    assert summarizer.describe()["name"] == "template"


@pytest.mark.parametrize(
    ("answer", "summary"),
    [
        ('Summary: "A 67-year-old woman with sepsis died." She had more.', "A 67-year-old woman with sepsis died."),
        (
            "Here is a one-sentence summary for the clinician:\n\n72-year-old man, e.g. with CKD stage 3.5, seen by "
            "Dr. Smith; died. Extra sentence.",
            "72-year-old man, e.g. with CKD stage 3.5, seen by Dr. Smith; died.",
        ),
        ("**Summary:** 50-year-old   woman with hepatitis B. Next one.", "50-year-old woman with hepatitis B."),
        ("40-year-old woman with asthma, no recorded death", "40-year-old woman with asthma, no recorded death"),
        ("  \n ", ""),
        ("Summary:", ""),
        ("A 67-year-old woman with heart failure\nwho died.", "A 67-year-old woman with heart failure who died."),
        ("Sure, here is a one-sentence summary.\n\nA 70-year-old man with COPD.", "A 70-year-old man with COPD."),
        ("Sure! A 70-year-old man with COPD. He died.", "A 70-year-old man with COPD."),
        ("1. A 67-year-old woman with CHF.\n2. She died.", "A 67-year-old woman with CHF."),
        ("1.", ""),
        ("...", ""),
    ],
)
def test_clean_summary(answer, summary):
    assert clean_summary(answer) == summary


def test_llm_judge_never_crashes_on_a_random_model(chat_generator, patients, caplog):
    judge = load_judge(str(chat_generator.name), max_new_tokens=16, batch_size=2, device="cpu")
    assert isinstance(judge, LLMJudge)
    with caplog.at_level(logging.WARNING):
        scores = judge.score(patients, ["A woman."] * len(patients))
    assert scores == [None] * len(patients) and judge.unparseable == len(patients)
    assert "could not be read" in caplog.text
    shared = LLMJudge(chat_generator, max_new_tokens=16)
    assert shared.generator is chat_generator and shared.describe()["prompt"] == JUDGE_PROMPT
    with pytest.raises(ValueError, match="summaries"):
        judge.score(patients, ["one"])


def test_load_judge_specs():
    assert load_judge("none") is None
    assert load_judge("rules").name == "rules"


GOOD = {category: 4 for category in JUDGE_CATEGORIES}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"factual_agreement": 4, "completeness": 4, "clinical_coherence": 4, "conciseness": 4, '
         '"unsupported_claims": 4}', GOOD),
        ("```json\n" + str(GOOD).replace("'", '"') + "\n```", GOOD),
        ("Here are my scores:\n" + str(GOOD).replace("'", '"') + "\nThe summary is fine.", GOOD),
        ("Scores: " + str(GOOD), GOOD),  # single quotes
        ('{"factual_agreement": 4, "completeness": 4, "clinical_coherence": 4, "conciseness": 4, '
         '"unsupported_claims": 4,}', GOOD),
        ('{"factual_agreement": "4", "completeness": 4.0, "clinical_coherence": "4", "conciseness": 4, '
         '"unsupported_claims": 4}', GOOD),
        ('{"Factual agreement": 4, "Completeness": 4, "Clinical Coherence": 4, "conciseness": 4, '
         '"Unsupported-claims": 4}', GOOD),
        ("Factual agreement: 4\nCompleteness: 4/5\nClinical coherence: 4\nConciseness: 4\nUnsupported claims: 4", GOOD),
        ('{"scores": ' + str(GOOD).replace("'", '"') + "}", GOOD),
        ('{"factual_agreement": 0, "completeness": 4, "clinical_coherence": 4, "conciseness": 4, '
         '"unsupported_claims": 4}', None),
        ('{"factual_agreement": 6, "completeness": 4, "clinical_coherence": 4, "conciseness": 4, '
         '"unsupported_claims": 4}', None),
        ('{"factual_agreement": 4.5, "completeness": 4, "clinical_coherence": 4, "conciseness": 4, '
         '"unsupported_claims": 4}', None),
        ('{"factual_agreement": 4, "completeness": 4, "clinical_coherence": 4, "conciseness": 4}', None),
        ('{"factual_agreement": true, "completeness": 4, "clinical_coherence": 4, "conciseness": 4, '
         '"unsupported_claims": 4}', None),
        ("the summary looks { fine ]] to me", None),
        ("", None),
    ],
)
def test_parse_judge_output(answer, expected):
    assert parse_judge_output(answer) == expected


def test_passes_screening():
    low = {**GOOD, "conciseness": 2}
    unscored = {category: None for category in JUDGE_CATEGORIES}
    assert passes_screening(GOOD) and not passes_screening(low)
    assert passes_screening(low, threshold=2) and not passes_screening(GOOD, threshold=4.5)
    for row in (None, unscored):
        assert not passes_screening(row) and passes_screening(row, keep_unscored=True)


def test_screen_filters_a_dataset_with_a_struct_column():
    from datasets import Dataset, Features, Value

    features = Features({"id": Value("int32"), "judge_scores": {c: Value("int8") for c in JUDGE_CATEGORIES}})
    rows = [GOOD, {**GOOD, "completeness": 1}, {c: None for c in JUDGE_CATEGORIES}, {**GOOD, "conciseness": 3}]
    dataset = Dataset.from_dict({"id": [0, 1, 2, 3], "judge_scores": rows}, features=features)
    assert screen(dataset)["id"] == [0, 3]
    assert screen(dataset, threshold=4)["id"] == [0]
    assert screen(dataset, keep_unscored=True)["id"] == [0, 2, 3]
    with pytest.raises(ValueError, match="'scores'"):
        screen(dataset, column="scores")


def test_missing_model_is_one_line():
    with pytest.raises(ModelNotFoundError, match="cannot be found locally") as error:
        load_summarizer("org/no-such-model")
    assert "\n" not in str(error.value)
