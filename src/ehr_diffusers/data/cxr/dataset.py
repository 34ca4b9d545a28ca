"""From MIMIC-CXR-JPG + MIMIC-IV to the split ``datasets.DatasetDict`` that EHRXDiff trains on.

One row per triplet (previous image, events between the two images, target image): the pair columns of
:func:`~ehr_diffusers.data.cxr.triplets.build_triplets`, the events of
:func:`~ehr_diffusers.data.cxr.events.render_events` (``event_texts``, ``event_hours``, ``event_tables``, oldest
first) and, given an event embedder, ``event_embeddings``: one float16 vector per event, ``(n_events, dim)``. What is
embedded is the event's text without its relative time (:func:`~ehr_diffusers.data.cxr.events.event_content`; the
time is ``event_hours``). The embedder itself belongs to the text layer
(:class:`~ehr_diffusers.text.event_embeddings.EventEmbedder`: a sentence embedder, optionally with retrieval
augmentation); this module only defines what it must do (:class:`EmbedEvents`) and how its settings are recorded
(:class:`EventEmbeddingOptions`), so that the data layer never imports the text layer.

Images are not copied by default: ``previous_image`` and ``target_image`` are paths relative to the MIMIC-CXR-JPG
folder, recorded in the summary, so the dataset is small and the credentialed images stay where they are. With
``image_size`` (``prepare-cxr --image-size N``) every image a triplet names is also written as an N x N grayscale PNG
under ``images/`` (the same relative path, ``.png``), so that a model of small images trains from the dataset folder
alone; :func:`read_cxr_images` reads those copies when they have the size asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ...errors import ArgumentError, DataError
from ...io import atomic_directory, check_output_dir
from .events import event_content, load_item_lists, render_events
from .triplets import SPLITS, TripletOptions, build_triplets

logger = logging.getLogger(__name__)

SUMMARY_NAME = "cxr_summary.json"
IMAGE_COPIES_FOLDER = "images"
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


@dataclass(frozen=True)
class EventEmbeddingOptions:
    """How the event vectors are made (``embedder`` None: not at all), recorded in the summary.

    Checked on construction, so that a bad combination fails before hours of events and embeddings; what needs the
    text layer (faiss, the model) is checked by the embedder built from these options.
    """

    embedder: str | None = None
    batch_size: int = 256
    retrieval: bool = False
    retrieval_k: int = 4
    retrieval_weight: float = 0.5
    knowledge: str | None = None

    def __post_init__(self) -> None:
        if self.retrieval and self.embedder is None:
            raise ArgumentError("--retrieval needs event embeddings: give --embedder")
        if self.knowledge is not None and not self.retrieval:
            raise ArgumentError("--knowledge is the retrieval corpus: it needs --retrieval")
        if self.retrieval:
            if self.retrieval_k < 1:
                raise ArgumentError(f"--retrieval-k must be at least 1, got {self.retrieval_k}")
            if not 0 <= self.retrieval_weight <= 1:
                raise ArgumentError(f"--retrieval-weight must be in [0, 1], got {self.retrieval_weight}")
            if self.knowledge is not None and not Path(self.knowledge).is_file():
                raise ArgumentError(f"--knowledge {self.knowledge}: no such file")


class EmbedEvents(Protocol):
    """What :func:`build_cxr_dataset` needs to add ``event_embeddings``; the text layer's ``EventEmbedder`` is one."""

    options: EventEmbeddingOptions

    def __call__(self, contents: Mapping[str, pl.Series], show_progress: bool = True
                 ) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
        """Per split, the event contents of each triplet (a list of strings per row) -> one float16
        ``(n_events, dim)`` array per triplet, and the facts recorded as the summary's ``embeddings``."""
        ...


@dataclass
class CXRDatasetOptions:
    """Everything that changes the prepared dataset beyond the pair rules and the event embeddings; recorded in its
    summary and card.

    The embedding keywords of earlier versions (``embedder``, ``batch_size``, ``retrieval``, ``retrieval_k``,
    ``retrieval_weight``, ``knowledge``) are still accepted; asking for embeddings through them is an error that says
    where they went, since the data layer cannot build an embedder.
    """

    triplets: TripletOptions = field(default_factory=TripletOptions)
    max_events: int = 1024
    item_lists: str | None = None
    embedder: InitVar[str | None] = None
    batch_size: InitVar[int | None] = None
    retrieval: InitVar[bool | None] = None
    retrieval_k: InitVar[int | None] = None
    retrieval_weight: InitVar[float | None] = None
    knowledge: InitVar[str | None] = None

    def __post_init__(self, embedder: str | None, batch_size: int | None, retrieval: bool | None,
                      retrieval_k: int | None, retrieval_weight: float | None, knowledge: str | None) -> None:
        if self.max_events < 1:
            raise ArgumentError(f"--max-events must be at least 1, got {self.max_events}")
        if embedder is not None or retrieval or knowledge is not None:
            raise ValueError("event embeddings are made by ehr_diffusers.text.event_embeddings.EventEmbedder: pass "
                             "embed_events=EventEmbedder(EventEmbeddingOptions(...)) instead of CXRDatasetOptions("
                             "embedder=..., retrieval=..., knowledge=...)")

    def to_dict(self, embeddings: EventEmbeddingOptions | None = None) -> dict[str, Any]:
        """The summary's ``options``: these and the embedding options (the defaults when there is no embedder)."""
        return {"max_events": self.max_events, "item_lists": self.item_lists,
                **asdict(embeddings or EventEmbeddingOptions()), "triplets": self.triplets.to_dict()}


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


def build_cxr_dataset(cxr_dir: str | Path, mimic_dir: str | Path, options: CXRDatasetOptions | None = None,
                      show_progress: bool = True, *, embed_events: EmbedEvents | None = None
                      ) -> tuple[Any, dict[str, Any]]:
    """The triplets with their events (and, with ``embed_events``, their embeddings), as a DatasetDict (train,
    validation, test) and a summary."""
    from datasets import Dataset, DatasetDict

    options = options or CXRDatasetOptions()
    splits, summary = build_triplets(cxr_dir, mimic_dir, options.triplets, show_progress=show_progress)
    if summary["triplets"] == 0:
        raise DataError(f"{cxr_dir}: no triplets ({summary['frontal_images']:,} frontal images, "
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
    if embed_events is not None:  # without the relative time (event_hours has it) most events repeat a few texts
        contents = {name: frame.select(pl.col("event_texts").list.eval(event_content(pl.element()))).to_series()
                    for name, frame in splits.items()}
        embeddings, embedding_info = embed_events(contents, show_progress=show_progress)
    features = _features(None if embedding_info is None else embedding_info["dim"])
    datasets = {}
    for name in tqdm(list(splits), desc="datasets", unit="split", disable=not show_progress):
        frame = splits[name]
        table = frame.select([column for column in features if column != "event_embeddings"]).to_dict(as_series=False)
        if embedding_info is not None:
            table["event_embeddings"] = embeddings[name]
        datasets[name] = Dataset.from_dict(table, features=features)
    recorded = options.to_dict(None if embed_events is None else embed_events.options)
    summary.update({"events": event_summary, "embeddings": embedding_info, "options": recorded,
                    "cxr_dir": str(cxr_dir)})
    return DatasetDict(datasets), summary


def check_image_size(image_size: int | None) -> None:
    """Fails before any work on an image size the copies cannot have (None: no copies)."""
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not (
            MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise ArgumentError(f"--image-size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (pixels per "
                         f"side), got {image_size!r}")


def image_copy_path(relative: str) -> Path:
    """Where the PNG copy of the image at ``relative`` (a ``previous_image`` / ``target_image`` path) lies inside the
    dataset folder."""
    return Path(IMAGE_COPIES_FOLDER) / Path(relative).with_suffix(".png")


def _relative_image_path(relative: str, source: str) -> Path:
    """``relative`` as a path that stays inside the folder it is relative to; an error naming ``source`` otherwise."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DataError(f"{source}: image path {relative!r} is not relative to the MIMIC-CXR-JPG folder")
    return path


def _load_gray(path: Path, size: int, source: str) -> Image.Image:
    """One image as grayscale, resized to ``size`` x ``size`` (bilinear, the whole image) unless it has that size."""
    try:
        with Image.open(path) as image:
            image = image.convert("L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return image
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image named by {source} not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from None


def write_image_copies(dataset: Any, cxr_dir: str | Path, out: str | Path, size: int,
                       show_progress: bool = True) -> dict[str, Any]:
    """Writes a ``size`` x ``size`` grayscale PNG of every image any split's triplets name into ``out/images/``;
    returns the summary's ``image_copies``.

    Each image is converted to one channel and resized whole with bilinear filtering, as :func:`read_cxr_images`
    does with the originals, so that a model reads the same pixels from either.
    """
    check_image_size(size)
    paths = sorted({path for split in dataset.values() for column in ("previous_image", "target_image")
                    for path in split.unique(column)})
    root, out = Path(cxr_dir), Path(out)
    for relative in paths:
        _relative_image_path(relative, "the triplets")
    for folder in sorted({(out / image_copy_path(relative)).parent for relative in paths}):
        folder.mkdir(parents=True, exist_ok=True)
    for relative in tqdm(paths, desc="image copies", unit="image", disable=not show_progress):
        _load_gray(root / relative, size, "the triplets").save(out / image_copy_path(relative), format="PNG")
    logger.info("%d image copies of %d x %d written to %s", len(paths), size, size, out / IMAGE_COPIES_FOLDER)
    return {"size": int(size), "folder": IMAGE_COPIES_FOLDER, "format": "png", "count": len(paths)}


def prepare_cxr(cxr_dir: str | Path, mimic_dir: str | Path, out: str | Path, options: CXRDatasetOptions | None = None,
                overwrite: bool = False, show_progress: bool = True, synthetic: bool = False, *,
                embed_events: EmbedEvents | None = None, image_size: int | None = None) -> dict[str, Any]:
    """Builds the dataset and saves it (``save_to_disk`` + ``cxr_summary.json`` + card) atomically into ``out``;
    with ``image_size``, also the PNG copies of its images (:func:`write_image_copies`)."""
    from ...hub.cards import render_cxr_dataset_card

    check_image_size(image_size)
    check_output_dir(out, overwrite, inputs=[cxr_dir, mimic_dir])
    dataset, summary = build_cxr_dataset(cxr_dir, mimic_dir, options, show_progress=show_progress,
                                         embed_events=embed_events)
    summary["synthetic"] = synthetic
    with atomic_directory(out, overwrite, inputs=[cxr_dir, mimic_dir]) as staging:
        dataset.save_to_disk(str(staging))
        summary["image_copies"] = (None if image_size is None else
                                   write_image_copies(dataset, cxr_dir, staging, image_size, show_progress))
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (staging / "README.md").write_text(render_cxr_dataset_card(summary, synthetic=synthetic))
    return summary


def read_cxr_images(dataset_dir: str | Path, paths: Sequence[str], size: int, show_progress: bool = True
                    ) -> np.ndarray:
    """The images named by a prepared dataset's ``previous_image`` / ``target_image`` paths, as grayscale ``uint8``
    ``(len(paths), size, size)``.

    When the dataset holds image copies of this ``size`` (``prepare-cxr --image-size``), they are read from its own
    folder, so it works without the original images; otherwise the originals are read from the MIMIC-CXR-JPG folder
    recorded in its summary (``cxr_dir``). Chest X-rays are grayscale: every image is converted to one channel; one
    of another size is resized (bilinear, the whole image: MIMIC-CXR-JPG frontal films are near-square, and the
    models were trained on the same resize), exactly as the copies were made. An unreadable file is an error naming
    it.
    """
    folder = Path(dataset_dir)
    summary_path = folder / SUMMARY_NAME
    if not summary_path.is_file():
        raise FileNotFoundError(f"{folder}: not a prepare-cxr dataset ({SUMMARY_NAME} missing)")
    summary = json.loads(summary_path.read_text())
    copies = summary.get("image_copies")
    from_copies = bool(copies) and copies.get("size") == size
    if from_copies:
        root = folder / copies.get("folder", IMAGE_COPIES_FOLDER)
    else:
        root = Path(summary["cxr_dir"])
        if copies and not root.is_dir():
            raise FileNotFoundError(f"{root}: the original images are gone, and the copies in {folder} are "
                                    f"{copies['size']} x {copies['size']}, not {size} x {size}")
    images = np.empty((len(paths), size, size), dtype=np.uint8)
    source = str(summary_path)
    first: dict[str, int] = {}  # an image is the previous one of a triplet and the target of another: decode it once
    for index, relative in enumerate(tqdm(paths, desc="images", unit="image", disable=not show_progress)):
        if relative in first:
            images[index] = images[first[relative]]
            continue
        first[relative] = index
        if from_copies:
            path = root / _relative_image_path(relative, source).with_suffix(".png")
            try:
                with Image.open(path) as image:
                    if image.mode == "L" and image.size == (size, size):  # the copies: decode only
                        images[index] = np.asarray(image)
                        continue
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: image copy named by {source} not found") from None
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"{path}: not a readable image ({error})") from None
        else:
            path = root / relative
        images[index] = np.asarray(_load_gray(path, size, source))
    return images


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
    copies = summary.get("image_copies")
    if copies:
        lines.append(f"image copies        {copies['count']:,} {copies['format'].upper()}, {copies['size']} x "
                     f"{copies['size']} grayscale, in {copies['folder']}/")
    if summary.get("embeddings"):
        info = summary["embeddings"]
        found = info["retrieval"]
        retrieval = "off" if found is None else f"k {found['k']} over {found['source']}"
        lines.append(f"embeddings          {info['model']} ({info['dim']}-d, float16), {info['distinct_texts']:,} "
                     f"distinct event texts; retrieval {retrieval}")
    return "\n".join(lines)
