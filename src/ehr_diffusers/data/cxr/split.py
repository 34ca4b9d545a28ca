"""One split of a ``prepare-cxr`` dataset in memory, as the EHRXDiff training scripts (arXiv 2409.07012,
dek924/EHRXDiff) and the X-ray evaluation read it.

A split is held as tensors and arrays: the previous and target images of every triplet (grayscale ``uint8``), the
ragged per-event embeddings and hours, the triplet ids and, when the dataset has them, the 14 CheXpert labels of each
image. Images are read through :func:`ehr_diffusers.data.cxr.dataset.read_cxr_images`, once per distinct path:
consecutive studies chain, so most images are the target of one triplet and the previous image of the next.
Batches become model inputs with :func:`to_pixels` (images in [-1, 1]);
``ehr_diffusers.training.cxr_data.collate_events`` pads their events for the event encoder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import DataError
from .dataset import read_cxr_images

if TYPE_CHECKING:  # torch loads when images become tensors, not when a command checks the dataset
    import torch

IMAGE_COLUMNS = ("previous_image", "target_image")
CHEXPERT_COLUMNS = {"chexpert_previous": "previous_chexpert", "chexpert_target": "target_chexpert"}
EMBEDDINGS_COLUMN = "event_embeddings"
HOURS_COLUMN = "event_hours"
CHEXPERT_LABEL_COUNT = 14
# A CheXpert label left blank by the labeller (and every label of a study without labels): not 1 (positive), 0
# (negative) or -1 (uncertain). ``labels == 1`` selects positive findings whatever the blanks hold.
CHEXPERT_BLANK = -128


@dataclass
class CXRImages:
    """The distinct images of a split: ``images`` uint8 (n, S, S) in the order of ``paths`` (as the dataset names
    them, relative to the MIMIC-CXR-JPG folder)."""

    images: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class CXRSplit:
    """One split of a prepared triplet dataset, in memory, row ``i`` being triplet ``triplet_id[i]``.

    Args:
        previous, target: uint8 (N, S, S), the grayscale previous and target images.
        event_embeddings: per triplet, a float16 (n_i, dim) array, oldest event first (n_i may be 0).
        event_hours: per triplet, a float32 (n_i,) array: hours before the target study (negative).
        triplet_id: int64 (N,).
        subject_id: int64 (N,), the patient of each triplet (the unit a bootstrap resamples), when the dataset has it.
        chexpert_previous, chexpert_target: int8 (N, 14) CheXpert labels (1, 0, -1; ``CHEXPERT_BLANK`` where blank)
            when the dataset has the columns, else None.
        images, image_paths: the distinct images of the split (uint8 (M, S, S)) and their paths.
        previous_index, target_index: int64 (N,), row of ``images`` holding each triplet's previous / target image:
            triplets that share a previous image have the same ``previous_index``.
    """

    previous: torch.Tensor
    target: torch.Tensor
    event_embeddings: list[np.ndarray]
    event_hours: list[np.ndarray]
    triplet_id: np.ndarray
    subject_id: np.ndarray | None = None
    chexpert_previous: np.ndarray | None = None
    chexpert_target: np.ndarray | None = None
    images: torch.Tensor | None = None
    image_paths: list[str] = field(default_factory=list)
    previous_index: np.ndarray | None = None
    target_index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.triplet_id)

    @property
    def event_dim(self) -> int:
        """The width of the event embeddings."""
        return int(self.event_embeddings[0].shape[-1]) if self.event_embeddings else 0


def load_dataset_dict(dataset_dir: str | Path) -> Any:
    """The ``DatasetDict`` of a ``prepare-cxr`` folder; FileNotFoundError / ValueError naming the folder."""
    from datasets import DatasetDict, load_from_disk

    folder = Path(dataset_dir)
    if not (folder / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{folder}: not a prepared triplet dataset (no dataset_dict.json); make one with "
                                "`ehr-diffusers prepare-cxr`")
    dataset = load_from_disk(str(folder))
    if not isinstance(dataset, DatasetDict):
        raise DataError(f"{folder}: expected a DatasetDict with train/validation/test splits")
    missing = [column for column in IMAGE_COLUMNS if column not in next(iter(dataset.values())).column_names]
    if missing:
        raise DataError(f"{folder}: no {', '.join(map(repr, missing))} column; not a `prepare-cxr` dataset")
    return dataset


def _split(dataset: Any, dataset_dir: str | Path, split: str) -> Any:
    if split not in dataset:
        raise DataError(f"{dataset_dir}: the dataset has no {split!r} split (splits: {', '.join(dataset)})")
    return dataset[split]


def load_cxr_images(dataset_dir: str | Path, split: str, image_size: int, show_progress: bool = True,
                    columns: Sequence[str] = IMAGE_COLUMNS) -> CXRImages:
    """The distinct images named by ``columns`` of ``split``, each read once, in order of first appearance (previous
    images of all rows, then the targets not seen yet). No event embeddings are needed: the VAE trains on these."""
    table = _split(load_dataset_dict(dataset_dir), dataset_dir, split)
    paths = list(dict.fromkeys(path for column in columns for path in table[column]))
    return CXRImages(_read(dataset_dir, paths, image_size, show_progress), paths)


def _read(dataset_dir: str | Path, paths: Sequence[str], image_size: int, show_progress: bool) -> torch.Tensor:
    import torch

    if image_size < 1:
        raise ValueError(f"image size must be at least 1, got {image_size}")
    if not paths:
        return torch.zeros(0, image_size, image_size, dtype=torch.uint8)
    images = read_cxr_images(dataset_dir, list(paths), image_size, show_progress)
    return torch.as_tensor(np.ascontiguousarray(images, dtype=np.uint8))


def _chexpert(table: Any, column: str) -> np.ndarray:
    """int8 (N, 14); blanks (null labels, or a study without labels) as ``CHEXPERT_BLANK``."""
    rows = table.data.table.column(column).to_pylist()
    labels = np.full((len(rows), CHEXPERT_LABEL_COUNT), CHEXPERT_BLANK, dtype=np.int8)
    for index, row in enumerate(rows):
        for label, value in enumerate(row or ()):
            if value is not None and label < CHEXPERT_LABEL_COUNT:
                labels[index, label] = value
    return labels


def load_cxr_split(dataset_dir: str | Path, split: str, image_size: int, show_progress: bool = True,
                   images: bool = True) -> CXRSplit:
    """One split of a ``prepare-cxr`` dataset in memory (see :class:`CXRSplit`), images at ``image_size`` pixels;
    with ``images=False`` no image is read (``previous`` and ``target`` are then (N, 0, 0)), for the events and labels.

    Every distinct image path is read once. A dataset prepared without an event embedder has no
    ``event_embeddings`` column: a ValueError naming the folder, the split and the column.
    """
    import torch

    dataset = load_dataset_dict(dataset_dir)
    table = _split(dataset, dataset_dir, split)
    if EMBEDDINGS_COLUMN not in table.column_names:
        raise DataError(f"{dataset_dir}: split {split!r} has no {EMBEDDINGS_COLUMN!r} column (the dataset was "
                         "prepared without event embeddings); prepare it with an embedder: `ehr-diffusers "
                         "prepare-cxr ... --embedder minilm`")
    dim = table.features[EMBEDDINGS_COLUMN].shape[-1]
    numpy_view = table.with_format("numpy", columns=[EMBEDDINGS_COLUMN, HOURS_COLUMN])
    embeddings = [np.asarray(item, dtype=np.float16).reshape(-1, dim) for item in numpy_view[EMBEDDINGS_COLUMN]]
    hours = [np.asarray(item, dtype=np.float32).reshape(-1) for item in numpy_view[HOURS_COLUMN]]
    for row, (vectors, times) in enumerate(zip(embeddings, hours)):
        if len(vectors) != len(times):
            raise DataError(f"{dataset_dir}: split {split!r}, row {row}: {len(vectors)} event embeddings but "
                             f"{len(times)} event hours")
    chexpert = {name: _chexpert(table, column) if column in table.column_names else None
                for name, column in CHEXPERT_COLUMNS.items()}
    ids = {"triplet_id": np.asarray(table["triplet_id"], dtype=np.int64),
           "subject_id": np.asarray(table["subject_id"], dtype=np.int64) if "subject_id" in table.column_names
           else None}
    if not images:
        empty = torch.zeros(len(table), 0, 0, dtype=torch.uint8)
        return CXRSplit(previous=empty, target=empty, event_embeddings=embeddings, event_hours=hours, **ids,
                        **chexpert)
    previous_paths, target_paths = list(table["previous_image"]), list(table["target_image"])
    paths = list(dict.fromkeys(previous_paths + target_paths))
    position = {path: index for index, path in enumerate(paths)}
    pixels = _read(dataset_dir, paths, image_size, show_progress)
    previous_index = np.array([position[path] for path in previous_paths], dtype=np.int64)
    target_index = np.array([position[path] for path in target_paths], dtype=np.int64)
    return CXRSplit(
        previous=pixels[torch.from_numpy(previous_index)], target=pixels[torch.from_numpy(target_index)],
        event_embeddings=embeddings, event_hours=hours, **ids, **chexpert,
        images=pixels, image_paths=paths, previous_index=previous_index, target_index=target_index,
    )


def to_pixels(images_uint8: torch.Tensor, channels: int = 1) -> torch.Tensor:
    """uint8 images (B, S, S) (or (B, 1, S, S)) -> float32 (B, channels, S, S) in [-1, 1], the grayscale value
    repeated over ``channels`` (3 for an RGB-pretrained encoder)."""
    import torch

    images = torch.as_tensor(images_uint8)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"expected grayscale images (batch, size, size), got shape {tuple(images.shape)}")
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    pixels = images.float().div(127.5).sub(1.0).unsqueeze(1)
    return pixels.expand(-1, channels, -1, -1).contiguous() if channels > 1 else pixels


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_pixels`: (B, C, S, S) in [-1, 1] -> uint8 (B, S, S) (channel mean, clamped)."""
    import torch

    values = (pixels.detach().float().mean(dim=1) + 1.0) * 127.5
    return values.round().clamp(0, 255).to(torch.uint8).cpu()


TRAINING_DATA_NAME = "training_data.json"


def training_record(dataset_dir: str | Path, split: str, subjects: np.ndarray) -> dict[str, Any]:
    """What a model folder records of the data it was trained on (``TRAINING_DATA_NAME``): the dataset, the split
    and its subjects, so that an evaluation can refuse a split that shares patients with it."""
    return {"dataset": str(dataset_dir), "split": split, "subjects": sorted({int(s) for s in np.asarray(subjects)})}


def check_subjects_unseen(model_dir: str | Path, subjects: np.ndarray, split: str) -> bool:
    """Raises ValueError when ``subjects`` (an evaluated split's) include patients the model in ``model_dir`` was
    trained on; False when the model records no training data (a converted checkpoint), True when checked."""
    import json

    record = Path(model_dir) / TRAINING_DATA_NAME
    if not record.is_file():
        return False
    try:
        trained = {int(subject) for subject in json.loads(record.read_text())["subjects"]}
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{record}: not a training record (a JSON object with a 'subjects' list): {error}") from None
    refuse_seen_subjects(trained, subjects, split, str(model_dir),
                         f"{record} lists the training subjects; evaluate on a split whose patients it never saw")
    return True


def refuse_seen_subjects(trained: Iterable[int], subjects: np.ndarray, split: str, what: str, remedy: str) -> None:
    """Raises ValueError naming a subject when ``what`` was trained on any of ``subjects``, an evaluated split's."""
    shared = sorted(set(trained).intersection(int(s) for s in np.asarray(subjects)))
    if shared:
        raise DataError(f"{what} was trained on {len(shared)} subject(s) of the {split!r} split being evaluated "
                         f"(e.g. subject_id {shared[0]}): {remedy}")
