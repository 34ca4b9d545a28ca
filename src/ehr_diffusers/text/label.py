"""Labelling a prepared dataset with text: ``facts_text``, ``summary``, ``judge_scores`` and ``embedding`` columns.

The dataset folder (written by ``ehr-diffusers prepare``) is replaced as a whole at the end, so a failure leaves it as
it was. Work is done in chunks of rows; each finished chunk is written to ``.label-cache/<key>/`` inside the
folder before the next starts, so an interrupted run (a 7B summariser over 300k patients takes hours) resumes where
it stopped. The cache key hashes everything that changes the labels: the summariser, the judge, the embedder, the
diagnosis order and this format's version; a run with other models never reuses it.

What was used is recorded in ``text_labels.json`` beside ``schema.json`` (models, prompts, embedding dimension,
screening threshold, diagnosis order, per-split counts) and in a section of the dataset card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..data.ehr.schema import SCHEMA_NAME, EHRSchema
from ..errors import DataError
from ..io import MARKER_NAME, atomic_directory, atomic_file
from .describe import RECORD_FIELDS, DiagnosisOrder, FactDescriber, PatientFacts, fact_text
from .judge_rubric import DEFAULT_SCREENING_THRESHOLD, JUDGE_CATEGORIES

if TYPE_CHECKING:  # the models load only when labelling starts: the dataset checks before them take a second
    from .embed import SentenceEmbedder

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("facts_text", "summary", "judge_scores", "embedding")
LABELS_NAME = "text_labels.json"
CACHE_NAME = ".label-cache"
LABELS_VERSION = 1
CARD_SECTION = "## Text labels"


class Summarizer(Protocol):
    name: str

    def summarize(self, facts: Sequence[PatientFacts], show_progress: bool = False) -> list[str]: ...

    def describe(self) -> dict: ...


class Judge(Protocol):
    name: str

    def score(
        self, facts: Sequence[PatientFacts], summaries: Sequence[str], show_progress: bool = False
    ) -> list[dict[str, int] | None]: ...

    def describe(self) -> dict: ...


@dataclass
class LabelResult:
    """What ``label_dataset`` did, per split; also written to ``text_labels.json``."""

    metadata: dict

    def format(self) -> str:
        lines = []
        for split, figures in self.metadata["splits"].items():
            scores = figures["mean_judge_scores"]
            mean = ", ".join(f"{name} {value:.2f}" for name, value in scores.items()) if scores else "not judged"
            lines.append(
                f"{split:<10}{figures['rows']:>8,} rows; summary fallbacks {figures['summary_fallbacks']:,}; "
                f"unscored {figures['judge_unscored']:,}; under threshold {figures['rows_under_threshold']:,}"
            )
            lines.append(f"{'':<10}mean judge scores: {mean}")
        return "\n".join(lines)


def _label_features(dim: int):
    from datasets import Features, List, Value

    return Features(
        {
            "facts_text": Value("string"),
            "summary": Value("string"),
            "judge_scores": {category: Value("int8") for category in JUDGE_CATEGORIES},
            "embedding": List(Value("float32"), length=dim),
        }
    )


def _embedder_record(embedder: SentenceEmbedder, spec: str | None = None) -> dict:
    """What identifies the embedder; ``spec`` is what ``embed.load_embedder`` takes to load it again in training."""
    config = embedder.config
    return {"spec": spec, "source": config.source, "dim": embedder.dim,
            "dtype": str(embedder.dtype).removeprefix("torch."), "pooling": config.pooling, "prompt": config.prompt,
            "max_length": config.max_length}


def check_dataset(dataset_dir: str | Path) -> Any:
    """Loads the prepared dataset to label, or fails naming what is wrong; cheap, so callers run it before loading
    models that take minutes."""
    from datasets import load_from_disk

    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise DataError(f"--dataset {folder}: no such folder")
    if not (folder / "dataset_dict.json").is_file():
        raise DataError(f"--dataset {folder}: not a prepared dataset (no dataset_dict.json); run `ehr-diffusers "
                        "prepare`")
    if not (folder / MARKER_NAME).is_file():
        raise DataError(f"--dataset {folder}: labelling rewrites the folder in place, which is only done for folders "
                        "written by `ehr-diffusers prepare`; prepare the dataset again or copy it into one")
    dataset = load_from_disk(str(folder))
    for split, table in dataset.items():
        missing = [name for name in RECORD_FIELDS if name not in table.column_names]
        if missing:
            raise DataError(
                f"{folder}: split {split!r} lacks column(s) {missing}; labelling needs {list(RECORD_FIELDS)} "
                "(a dataset written by `ehr-diffusers prepare`)"
            )
    EHRSchema.load(folder)  # the schema recorded at prepare time, checked against its sha256
    return dataset


def _chunk_table(
    rows: dict, describer: FactDescriber, summarizer: Summarizer, judge: Judge | None, embedder: SentenceEmbedder,
    batch_size: int, dim: int,
) -> pa.Table:
    facts = describer.facts_batch(rows)
    texts = [fact_text(patient) for patient in facts]
    before = getattr(summarizer, "fallbacks", 0)
    summaries = summarizer.summarize(facts)
    fallbacks = getattr(summarizer, "fallbacks", 0) - before
    scores = judge.score(facts, summaries) if judge is not None else [None] * len(facts)
    vectors = embedder.encode(summaries, batch_size=batch_size).float().cpu().numpy().astype(np.float32)
    score_type = pa.struct([(category, pa.int8()) for category in JUDGE_CATEGORIES])
    table = pa.table(
        {
            "facts_text": pa.array(texts, pa.string()),
            "summary": pa.array(summaries, pa.string()),
            "judge_scores": pa.array(
                [{c: (row or {}).get(c) for c in JUDGE_CATEGORIES} for row in scores], score_type
            ),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        }
    )
    return table.replace_schema_metadata({"summary_fallbacks": str(fallbacks)})


def _with_labels(table: Any, labels: pa.Table, features: Any) -> Any:
    """The split with the label columns appended (replacing earlier ones), as one Arrow table."""
    from datasets import Dataset, Features

    base = table.remove_columns([name for name in LABEL_COLUMNS if name in table.column_names]).flatten_indices()
    merged = base.data.table
    labels = labels.cast(features.arrow_schema)
    for name in LABEL_COLUMNS:
        merged = merged.append_column(name, labels.column(name))
    return Dataset(merged).cast(Features({**base.features, **features}))


def _cache_key(summarizer: Summarizer, judge: Judge | None, embedder: SentenceEmbedder, order: DiagnosisOrder) -> str:
    """Everything that changes the labels; LABELS_VERSION is raised whenever the code that writes them changes."""
    identity = {
        "version": LABELS_VERSION,
        "summarizer": summarizer.describe(),
        "judge": judge.describe() if judge is not None else None,
        "embedder": _embedder_record(embedder),
        "order": order.ranked_codes,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Writes a cache chunk so that it exists whole or not at all, also after a power cut."""
    with atomic_file(path, durable=True) as temporary:
        pq.write_table(table, temporary)


def _split_figures(labels: pa.Table, fallbacks: int, threshold: float) -> dict:
    from .judge import passes_screening  # here: the judge module imports torch, which checking a dataset needs not

    scores = labels.column("judge_scores").to_pylist()
    scored = [row for row in scores if all(row[c] is not None for c in JUDGE_CATEGORIES)]
    return {
        "rows": labels.num_rows,
        "summary_fallbacks": fallbacks,
        "judge_unscored": len(scores) - len(scored),
        "mean_judge_scores": ({c: float(np.mean([row[c] for row in scored])) for c in JUDGE_CATEGORIES}
                              if scored else {}),
        "rows_under_threshold": sum(not passes_screening(row, threshold) for row in scored),
    }


def _card_section(metadata: dict) -> str:
    judge = metadata["judge"]
    lines = [
        CARD_SECTION,
        "",
        f"Added by `ehr-diffusers label` (see `{LABELS_NAME}` for every setting).",
        "",
        "- `facts_text`: every fact of the record in fixed prose (`ehr_diffusers.text.describe.fact_text`).",
        f"- `summary`: one sentence by `{metadata['summarizer']['name']}`.",
        f"- `judge_scores`: 1-5 on {', '.join(JUDGE_CATEGORIES)} by "
        + (f"`{judge['name']}`; rows with any score under {metadata['screening_threshold']} are screened out in "
           "training." if judge else "no judge: all null, so screening keeps rows only with `keep_unscored=True`."),
        f"- `embedding`: {metadata['embedder']['dim']}-d L2-normalised embedding of `summary` by "
        f"`{metadata['embedder']['source']}`.",
        "",
        "| split | rows | summary fallbacks | unscored | under threshold |",
        "|---|---|---|---|---|",
    ]
    for split, figures in metadata["splits"].items():
        lines.append(f"| {split} | {figures['rows']:,} | {figures['summary_fallbacks']:,} | "
                     f"{figures['judge_unscored']:,} | {figures['rows_under_threshold']:,} |")
    return "\n".join(lines) + "\n"


def _updated_card(card: str, metadata: dict) -> str:
    if CARD_SECTION in card:  # labelled before: replace the section, keep the rest
        head, _, tail = card.partition(CARD_SECTION)
        rest = tail.split("\n## ", 1)
        card = head.rstrip("\n") + "\n\n" + ("## " + rest[1] if len(rest) > 1 else "")
    return card.rstrip("\n") + "\n\n" + _card_section(metadata)


def label_dataset(
    dataset_dir: str | Path,
    summarizer: Summarizer,
    judge: Judge | None,
    embedder: SentenceEmbedder,
    batch_size: int = 64,
    chunk_size: int = 1024,
    threshold: float = DEFAULT_SCREENING_THRESHOLD,
    show_progress: bool = True,
    embedder_spec: str | None = None,
) -> LabelResult:
    """Adds the label columns to every split of the dataset in ``dataset_dir``, in place and atomically.

    ``embedder_spec`` (e.g. "minilm", a Hub id or a folder) is recorded so that training loads the same embedder.
    """
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"--batch-size and the chunk size must be positive, got {batch_size} and {chunk_size}")
    folder = Path(dataset_dir)
    dataset = check_dataset(folder)
    titles = {}
    if (folder / SCHEMA_NAME).is_file():
        group = EHRSchema.load(folder)["icd10_categories"]
        titles = dict(zip(group.categories, group.titles or [None] * group.width))
    reference = dataset["train"] if "train" in dataset else concatenate_datasets(list(dataset.values()))
    order = DiagnosisOrder.from_code_lists(reference["icd10_categories"])
    describer = FactDescriber(order, titles)
    dim = embedder.dim
    cache = folder / CACHE_NAME / _cache_key(summarizer, judge, embedder, order)

    labelled, figures = {}, {}
    for split, table in dataset.items():
        (cache / split).mkdir(parents=True, exist_ok=True)
        chunks = []
        bar = tqdm(total=len(table), desc=f"label {split}", unit="patient", disable=not show_progress)
        for index, start in enumerate(range(0, len(table), chunk_size)):
            end = min(start + chunk_size, len(table))
            path = cache / split / f"chunk-{index:06d}-{start}-{end}.parquet"
            if path.is_file():
                chunk = pq.read_table(path)
            else:
                chunk = _chunk_table(table[start:end], describer, summarizer, judge, embedder, batch_size, dim)
                _write_atomically(chunk, path)
            chunks.append(chunk)
            bar.update(end - start)
        bar.close()
        fallbacks = sum(int((chunk.schema.metadata or {}).get(b"summary_fallbacks", b"0")) for chunk in chunks)
        labels = pa.concat_tables([chunk.replace_schema_metadata(None) for chunk in chunks])
        figures[split] = _split_figures(labels, fallbacks, threshold)
        labelled[split] = _with_labels(table, labels, _label_features(dim))

    metadata = {
        "labels_version": LABELS_VERSION,
        "columns": list(LABEL_COLUMNS),
        "summarizer": summarizer.describe(),
        "judge": judge.describe() if judge is not None else None,
        "embedder": _embedder_record(embedder, embedder_spec),
        "embedding_column": "embedding",
        "embedding_dim": dim,
        "screening_threshold": threshold,
        "diagnosis_order": {"rule": "R and Z chapters last, then train prevalence descending, then code",
                            "ranked_codes": order.ranked_codes},
        "splits": figures,
    }
    with atomic_directory(folder, overwrite=True) as staging:
        DatasetDict(labelled).save_to_disk(str(staging))
        written = load_from_disk(str(staging))  # check what will replace the dataset before it does
        for split, table in labelled.items():
            if len(written[split]) != len(table) or not set(LABEL_COLUMNS) <= set(written[split].column_names):
                raise RuntimeError(f"{folder}: split {split!r} was not written completely; the dataset is unchanged")
        dataset_files = {"dataset_dict.json", CACHE_NAME, MARKER_NAME, LABELS_NAME, *dataset.keys()}
        for item in folder.iterdir():
            if item.name not in dataset_files and not item.name.startswith("."):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        (staging / LABELS_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
        card = folder / "README.md"
        if card.is_file():
            (staging / "README.md").write_text(_updated_card(card.read_text(), metadata))
    return LabelResult(metadata)


def load_label_metadata(dataset_dir: str | Path) -> dict:
    """``text_labels.json`` of a labelled dataset; a clear error when the dataset was never labelled."""
    path = Path(dataset_dir) / LABELS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; label the dataset first with `ehr-diffusers label`")
    return json.loads(path.read_text())
