"""Training data for the scripts: a prepared (and labelled) dataset folder, its checks, judge screening, and the
record vectors and autoencoder latents made from it.

A prepared dataset (``ehr-diffusers prepare``) is a ``datasets.DatasetDict`` saved with ``save_to_disk`` with the
splits ``train`` and ``holdout`` and a ``schema.json``; ``ehr-diffusers label`` adds the text columns and the
``embedding`` the denoiser is conditioned on. Record vectors are encoded batch by batch (``EHRSchema.encode`` on an
Arrow batch), never for a whole split at once: a split of 300k patients is ~1.3 GB as dense float32 vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.ehr.schema import SCHEMA_NAME, EHRSchema

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
        raise ValueError(f"{argument} is required: a dataset folder written by `ehr-diffusers prepare`")
    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise ValueError(f"{argument} {folder}: no such folder")
    if not (folder / "dataset_dict.json").is_file():
        raise ValueError(f"{argument} {folder}: not a prepared dataset (no dataset_dict.json); write one with "
                         "`ehr-diffusers prepare`")
    if not (folder / SCHEMA_NAME).is_file():
        raise ValueError(f"{argument} {folder}: has no {SCHEMA_NAME}; write the dataset with `ehr-diffusers prepare`")
    schema = EHRSchema.load(folder)
    dataset = load_from_disk(str(folder))
    for split in splits:
        if split not in dataset:
            raise ValueError(f"{argument} {folder}: has no {split!r} split (splits: {list(dataset.keys())})")
    for split in dict.fromkeys([*splits, *([HOLDOUT_SPLIT] if HOLDOUT_SPLIT in dataset else [])]):
        names = dataset[split].column_names
        missing = [name for name in record_columns(schema, names) if name not in names]
        if missing:
            raise ValueError(f"{argument} {folder}: split {split!r} lacks column(s) {missing} that the schema "
                             f"encodes (columns: {names})")
    return dataset, schema


def vector_dataset(split: Any, schema: EHRSchema) -> Any:
    """``split`` as a map-style dataset of ``{"vectors": float32 tensor (schema.dim,)}`` items, encoded per batch when a
    ``DataLoader`` fetches them (``datasets`` hands the transform the whole batch), never densified in memory."""
    columns = record_columns(schema, split.column_names)

    def encode(batch: dict) -> dict:
        return {"vectors": torch.from_numpy(schema.encode({name: batch[name] for name in columns}))}

    return split.select_columns(columns).with_transform(encode)


def iter_vectors(split: Any, schema: EHRSchema, batch_size: int, desc: str | None = None,
                 show_progress: bool = True) -> Iterator[torch.Tensor]:
    """The split's record vectors in order, ``batch_size`` rows at a time, read as Arrow batches."""
    columns = record_columns(schema, split.column_names)
    batches = split.select_columns(columns).with_format("arrow").iter(batch_size=batch_size)
    total = -(-len(split) // batch_size)
    for table in tqdm(batches, total=total, desc=desc, disable=not show_progress or desc is None, leave=False):
        yield torch.from_numpy(schema.encode(table))


def condition_dim(split: Any, column: str, folder: str | Path) -> int:
    """The width of the fixed-length float ``column``; a ValueError naming the argument when the column is missing
    (an unlabelled dataset) or is not a fixed-length float vector."""
    from datasets import List, Value

    if column not in split.column_names:
        raise ValueError(f"--train_data_dir {folder}: dataset has no {column!r} column (--condition_column); label it "
                         "first with `ehr-diffusers label`")
    feature = split.features[column]
    length = getattr(feature, "length", -1)
    inner = getattr(feature, "feature", None)
    if not isinstance(feature, List) or length is None or length < 1 or not isinstance(inner, Value) \
            or not inner.dtype.startswith("float"):
        raise ValueError(f"--condition_column {column}: expected a fixed-length float vector column, as "
                         f"`ehr-diffusers label` writes, got {feature}")
    return int(length)


def condition_tensor(split: Any, column: str) -> torch.Tensor:
    """The ``column`` vectors of the split as one float32 tensor (n, dim)."""
    values = split.with_format("numpy", columns=[column])[column]
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def screen_split(split: Any, threshold: float | None, keep_unscored: bool = False) -> tuple[Any, int]:
    """The rows passing the judge screen (``text.judge.screen``) and how many were dropped; the split as it is when
    ``threshold`` is None. A ValueError naming ``--judge_threshold`` when no row is left."""
    if threshold is None:
        return split, 0
    from ..text.judge import screen

    try:
        kept = screen(split, threshold=threshold, keep_unscored=keep_unscored)
    except ValueError as error:
        raise ValueError(f"--judge_threshold {threshold}: {error}") from None
    if len(kept) == 0:
        raise ValueError(f"--judge_threshold {threshold}: no training row passes the judge screen (scores range "
                         "1-5; every category must reach the threshold); lower it or leave it out")
    return kept, len(split) - len(kept)


@torch.no_grad()
def encode_latents(
    autoencoder: Any,
    split: Any,
    schema: EHRSchema,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> torch.Tensor:
    """Normalised latents ``autoencoder.normalize_latent(autoencoder.encode(vectors))`` of every row of ``split``, in
    order, as one float32 tensor on the CPU (eval mode; the autoencoder's own mode is restored afterwards)."""
    was_training = autoencoder.training
    autoencoder.eval()
    parts = []
    try:
        for vectors in iter_vectors(split, schema, batch_size, desc="encoding latents", show_progress=show_progress):
            latent = autoencoder.encode(vectors.to(device))
            parts.append(autoencoder.normalize_latent(latent).float().cpu())
    finally:
        autoencoder.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, autoencoder.config.latent_dim)
