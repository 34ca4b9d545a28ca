"""From MIMIC-CXR-JPG + MIMIC-IV to the split ``datasets.DatasetDict`` that EHRXDiff trains on.

One row per triplet (previous image, events between the two images, target image): the pair columns of
:func:`~ehr_diffusers.data.cxr.triplets.build_triplets`, the events of :func:`~ehr_diffusers.data.cxr.events.render_events`
(``event_texts``, ``event_hours``, ``event_tables``, oldest first) and, with an embedder, ``event_embeddings``: one
float16 vector per event, ``(n_events, dim)``, by the named sentence embedder (the offline MiniLM by default; the
reproduction's ``thomas-sounack/BioClinical-ModernBERT-base``, mean pooled, by its id or folder). What is embedded
is the event's text without its relative time (:func:`~ehr_diffusers.data.cxr.events.event_content`; the time is
``event_hours``), and each distinct such text once: with the time in it nearly every event would be distinct, and
at MIMIC's size (up to 1,024 events for each of ~150,000 triplets) embedding them all is out of reach on a CPU.
With ``retrieval``, each event vector is enriched with its nearest neighbours among the *train* split's event
contents (or a supplied knowledge list), as :mod:`~ehr_diffusers.text.retrieval` defines; the neighbours never come
from validation or test events.

Images are not copied: ``previous_image`` and ``target_image`` are paths relative to the MIMIC-CXR-JPG folder,
recorded in the summary, so the dataset is small and the credentialed images stay where they are.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ...io import atomic_directory, check_output_dir
from .triplets import SPLITS, TripletOptions, build_triplets
from .events import event_content, load_item_lists, render_events

logger = logging.getLogger(__name__)

SUMMARY_NAME = "cxr_summary.json"


@dataclass
class CXRDatasetOptions:
    """Everything that changes the prepared dataset beyond the pair rules; recorded in its summary and card."""

    triplets: TripletOptions = field(default_factory=TripletOptions)
    max_events: int = 1024
    item_lists: str | None = None
    embedder: str | None = "minilm"
    batch_size: int = 256
    retrieval: bool = False
    retrieval_k: int = 4
    retrieval_weight: float = 0.5
    knowledge: str | None = None

    def __post_init__(self) -> None:
        if self.max_events < 1:
            raise ValueError(f"--max-events must be at least 1, got {self.max_events}")
        if self.retrieval and self.embedder is None:
            raise ValueError("--retrieval needs event embeddings: give --embedder")
        if self.knowledge is not None and not self.retrieval:
            raise ValueError("--knowledge is the retrieval corpus: it needs --retrieval")
        if self.retrieval:  # checked now, not after hours of events and embeddings
            if self.retrieval_k < 1:
                raise ValueError(f"--retrieval-k must be at least 1, got {self.retrieval_k}")
            if not 0 <= self.retrieval_weight <= 1:
                raise ValueError(f"--retrieval-weight must be in [0, 1], got {self.retrieval_weight}")
            if self.knowledge is not None and not Path(self.knowledge).is_file():
                raise ValueError(f"--knowledge {self.knowledge}: no such file")
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise ValueError("--retrieval needs faiss: pip install 'ehr-diffusers[retrieval]'") from None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "triplets"}, "triplets": self.triplets.to_dict()}


def _features(dim: int | None):
    from datasets import Array2D, Features, List, Value

    side = {f"{side}_{name}": dtype for side in ("previous", "target") for name, dtype in (
        ("dicom_id", Value("string")), ("study_id", Value("int64")), ("view", Value("string")),
        ("study_time", Value("timestamp[us]")), ("image", Value("string")), ("chexpert", List(Value("int8"))))}
    columns = {"triplet_id": Value("int64"), "subject_id": Value("int64"), "hadm_id": Value("int64"),
               "gender": Value("string"), "age": Value("int32"), "race": Value("string"), **side,
               "hours_between": Value("float32"), "window_start": Value("timestamp[us]"),
               "window_end": Value("timestamp[us]"), "event_texts": List(Value("string")),
               "event_hours": List(Value("float32")), "event_tables": List(Value("string"))}
    if dim is not None:
        columns["event_embeddings"] = Array2D(shape=(None, dim), dtype="float16")
    return Features(columns)


def _embed_events(splits: dict[str, pl.DataFrame], options: CXRDatasetOptions, show_progress: bool
                  ) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """Per split, one float16 ``(n_events, dim)`` array per triplet; each distinct text embedded once."""
    from ...text.embed import load_embedder

    embedder = load_embedder(options.embedder)
    contents = {name: frame.select("triplet_id", pl.col("event_texts").list.eval(event_content(pl.element()))
                                   .alias("text")) for name, frame in splits.items()}
    texts = pl.concat([frame["text"].explode().drop_nulls() for frame in contents.values()]).unique().sort()
    vectors = embedder.encode(texts.to_list(), batch_size=options.batch_size, show_progress=show_progress)
    vectors = vectors.float().cpu().numpy()
    info: dict[str, Any] = {"model": embedder.config.source, "dim": embedder.dim, "distinct_texts": len(texts),
                            "pooling": embedder.config.pooling, "retrieval": None}
    lookup = pl.DataFrame({"text": texts, "row": np.arange(len(texts), dtype=np.int64)})
    if options.retrieval:
        from ...text.retrieval import RetrievalIndex, augment, build_event_index, load_knowledge

        if options.knowledge is not None:
            index = build_event_index(load_knowledge(options.knowledge), embedder, batch_size=options.batch_size,
                                      show_progress=show_progress, source=str(options.knowledge))
        elif "train" not in contents:
            raise ValueError("--retrieval over events needs a train split with triplets (or give --knowledge)")
        else:  # train events only, so no validation or test event informs another
            train = contents["train"]["text"].explode().drop_nulls().unique().sort()
            rows = lookup.join(pl.DataFrame({"text": train}), on="text", maintain_order="right")["row"].to_numpy()
            index = RetrievalIndex.build(train.to_list(), vectors[rows], source="events:train")
        # an event of the corpus itself is not its own neighbour; a knowledge entry equal to an event may be
        vectors = augment(vectors, index, k=options.retrieval_k, weight=options.retrieval_weight,
                          exclude_self=options.knowledge is None)
        info["retrieval"] = {"source": index.source, "corpus": len(index), "k": options.retrieval_k,
                             "weight": options.retrieval_weight}
    vectors = vectors.astype(np.float16)
    out: dict[str, list[np.ndarray]] = {}
    for name, frame in contents.items():
        rows = frame.explode("text").join(lookup, on="text", how="left", maintain_order="left")
        counts = frame["text"].list.len().to_numpy()
        flat = rows.drop_nulls("row")["row"].to_numpy()
        out[name] = np.split(vectors[flat], np.cumsum(counts)[:-1]) if len(counts) else []
    return out, info


def build_cxr_dataset(cxr_dir: str | Path, mimic_dir: str | Path, options: CXRDatasetOptions | None = None,
                      show_progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """The triplets with their events (and embeddings), as a DatasetDict (train, validation, test) and a summary."""
    from datasets import Dataset, DatasetDict

    options = options or CXRDatasetOptions()
    splits, summary = build_triplets(cxr_dir, mimic_dir, options.triplets, show_progress=show_progress)
    if summary["triplets"] == 0:
        raise ValueError(f"{cxr_dir}: no triplets ({summary['frontal_images']:,} frontal images, "
                         f"{summary['frontal_images_of_adults']:,} of adults inside an admission, "
                         f"{summary['pairs']:,} pairs less than {options.triplets.window_hours:g} h apart, "
                         f"{summary['pairs_with_images']:,} with both images usable)")
    empty = [name for name in SPLITS if splits[name].height == 0]
    if empty:  # datasets cannot load an empty split back from disk
        logger.warning("split(s) %s hold no triplet and are left out", ", ".join(empty))
        splits = {name: frame for name, frame in splits.items() if name not in empty}
    windows = pl.concat(list(splits.values())).select("triplet_id", "subject_id", "hadm_id", "window_start",
                                                      "window_end")
    items = load_item_lists(options.item_lists)
    events, event_summary = render_events(mimic_dir, windows, max_events=options.max_events, items=items,
                                          show_progress=show_progress)
    empty = {"event_texts": pl.String, "event_hours": pl.Float32, "event_tables": pl.String}
    splits = {name: frame.join(events, on="triplet_id", how="left", maintain_order="left").with_columns(
                  [pl.col(column).fill_null(pl.lit([], dtype=pl.List(dtype))) for column, dtype in empty.items()])
              for name, frame in splits.items()}
    embeddings, embedding_info = ({}, None)
    if options.embedder is not None:
        embeddings, embedding_info = _embed_events(splits, options, show_progress)
    features = _features(None if embedding_info is None else embedding_info["dim"])
    datasets = {}
    for name in tqdm(list(splits), desc="datasets", unit="split", disable=not show_progress):
        frame = splits[name]
        table = frame.select([column for column in features if column != "event_embeddings"]).to_dict(as_series=False)
        if embedding_info is not None:
            table["event_embeddings"] = embeddings[name]
        datasets[name] = Dataset.from_dict(table, features=features)
    summary.update({"events": event_summary, "embeddings": embedding_info, "options": options.to_dict(),
                    "cxr_dir": str(cxr_dir)})
    return DatasetDict(datasets), summary


def prepare_cxr(cxr_dir: str | Path, mimic_dir: str | Path, out: str | Path, options: CXRDatasetOptions | None = None,
                overwrite: bool = False, show_progress: bool = True, synthetic: bool = False) -> dict[str, Any]:
    """Builds the dataset and saves it (``save_to_disk`` + ``cxr_summary.json`` + card) atomically into ``out``."""
    from ...hub.cards import render_cxr_dataset_card

    check_output_dir(out, overwrite, inputs=[cxr_dir, mimic_dir])
    dataset, summary = build_cxr_dataset(cxr_dir, mimic_dir, options, show_progress=show_progress)
    summary["synthetic"] = synthetic
    with atomic_directory(out, overwrite, inputs=[cxr_dir, mimic_dir]) as staging:
        dataset.save_to_disk(str(staging))
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (staging / "README.md").write_text(render_cxr_dataset_card(summary, synthetic=synthetic))
    return summary


def format_cxr_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    events = summary["events"]
    changes = ", ".join(f"{label} {rate:.2f}" for label, rate in summary["label_change_rates"].items()
                        if rate is not None and label in ("Pleural Effusion", "Edema", "Consolidation",
                                                          "Pneumothorax", "Cardiomegaly", "Support Devices"))
    lines = [
        f"images              {summary['images']:,} ({summary['frontal_images']:,} frontal, "
        f"{summary['frontal_images_of_adults']:,} of adults inside an admission), {summary['studies']:,} studies",
        f"images unusable     {summary['images_missing']:,} absent, {summary['images_unreadable']:,} unreadable",
        f"triplets            {summary['triplets']:,} ("
        + ", ".join(f"{name} {count:,}" for name, count in summary["splits"].items()) + ")",
        f"events per triplet  mean {events['events_per_triplet_mean']:.1f}, median "
        f"{events['events_per_triplet_median']:.0f}; {events['triplets_without_events']:,} triplets without events",
        f"label change rates  {changes or 'n/a'}",
    ]
    if summary.get("embeddings"):
        info = summary["embeddings"]
        found = info["retrieval"]
        retrieval = "off" if found is None else f"k {found['k']} over {found['source']}"
        lines.append(f"embeddings          {info['model']} ({info['dim']}-d, float16), {info['distinct_texts']:,} "
                     f"distinct event texts; retrieval {retrieval}")
    return "\n".join(lines)
