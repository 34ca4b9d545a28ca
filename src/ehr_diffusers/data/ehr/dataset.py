"""A prepared EHR dataset folder, read the one way training and evaluation share: its splits, its schema, and the
record vectors encoded from it.

A prepared dataset (``ehr-diffusers prepare``) is a ``datasets.DatasetDict`` saved with ``save_to_disk`` with the
splits ``train`` and ``holdout`` and a ``schema.json``; ``ehr-diffusers label`` adds the text columns and the
``embedding`` the denoiser is conditioned on. The holdout is split off before any training and never trained on.
Record vectors are encoded batch by batch (``EHRSchema.encode`` on an Arrow batch), never for a whole split at once:
a split of 300k patients is ~1.3 GB as dense float32 vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ...errors import ArgumentError, DataError
from .schema import SCHEMA_NAME, EHRSchema

if TYPE_CHECKING:
    import torch

TRAIN_SPLIT = "train"
HOLDOUT_SPLIT = "holdout"


def record_columns(schema: EHRSchema, column_names: list[str] | None = None) -> list[str]:
    """The dataset columns ``schema.encode`` reads: one per group, the codes from ``code_indices`` when the dataset
    has it (vocabulary indices, cheap) and from ``icd10_categories`` otherwise."""
    columns = []
    for group in schema.groups:
        if group.kind == "multi_hot":
            use_indices = column_names is None or "code_indices" in column_names
            columns.append("code_indices" if use_indices else group.name)
        else:
            columns.append(group.name)
    return columns


def load_training_dataset(
    train_data_dir: str | Path | None,
    splits: tuple[str, ...] = (TRAIN_SPLIT,),
    argument: str = "--train_data_dir",
) -> tuple[Any, EHRSchema]:
    """The prepared ``DatasetDict`` and its ``EHRSchema``; a ValueError naming ``argument`` when the folder is missing,
    is not a prepared dataset, lacks one of ``splits``, or when one of ``splits`` or the holdout split lacks a column
    the schema encodes."""
    from datasets import load_from_disk

    if train_data_dir is None:
        raise ArgumentError(f"{argument} is required: a dataset folder written by `ehr-diffusers prepare`")
    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise DataError(f"{argument} {folder}: no such folder")
    if not (folder / "dataset_dict.json").is_file():
        raise DataError(f"{argument} {folder}: not a prepared dataset (no dataset_dict.json); write one with "
                         "`ehr-diffusers prepare`")
    if not (folder / SCHEMA_NAME).is_file():
        raise DataError(f"{argument} {folder}: has no {SCHEMA_NAME}; write the dataset with `ehr-diffusers prepare`")
    schema = EHRSchema.load(folder)
    dataset = load_from_disk(str(folder))
    for split in splits:
        if split not in dataset:
            raise DataError(f"{argument} {folder}: has no {split!r} split (splits: {list(dataset.keys())})")
    for split in dict.fromkeys([*splits, *([HOLDOUT_SPLIT] if HOLDOUT_SPLIT in dataset else [])]):
        names = dataset[split].column_names
        missing = [name for name in record_columns(schema, names) if name not in names]
        if missing:
            raise DataError(f"{argument} {folder}: split {split!r} lacks column(s) {missing} that the schema "
                             f"encodes (columns: {names})")
    return dataset, schema


def vector_dataset(split: Any, schema: EHRSchema) -> Any:
    """``split`` as a map-style dataset of ``{"vectors": float32 tensor (schema.dim,)}`` items, encoded per batch when a
    ``DataLoader`` fetches them (``datasets`` hands the transform the whole batch), never densified in memory."""
    import torch  # here, not at the top: checking a dataset folder should not wait for torch

    columns = record_columns(schema, split.column_names)

    def encode(batch: dict) -> dict:
        return {"vectors": torch.from_numpy(schema.encode({name: batch[name] for name in columns}))}

    return split.select_columns(columns).with_transform(encode)


def iter_vectors(split: Any, schema: EHRSchema, batch_size: int, desc: str | None = None,
                 show_progress: bool = True) -> Iterator[torch.Tensor]:
    """The split's record vectors in order, ``batch_size`` rows at a time, read as Arrow batches."""
    import torch

    columns = record_columns(schema, split.column_names)
    batches = split.select_columns(columns).with_format("arrow").iter(batch_size=batch_size)
    total = -(-len(split) // batch_size)
    for table in tqdm(batches, total=total, desc=desc, disable=not show_progress or desc is None, leave=False):
        yield torch.from_numpy(schema.encode(table))
