"""Training data for the scripts: the prepared dataset (read with :mod:`ehr_diffusers.data.ehr.dataset`, which
evaluation shares), judge screening, the condition vectors, and the autoencoder latents made from the records.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.ehr.dataset import iter_vectors
from ..data.ehr.schema import EHRSchema
from ..errors import ArgumentError, DataError

if TYPE_CHECKING:  # torch loads when tensors are made, not when train-ehr checks its dataset
    import torch

# isort: split
from ..data.ehr.dataset import (  # noqa: F401  (re-exported: old import path)
    HOLDOUT_SPLIT,
    TRAIN_SPLIT,
    load_training_dataset,
    record_columns,
    vector_dataset,
)


def condition_dim(split: Any, column: str, folder: str | Path) -> int:
    """The width of the fixed-length float ``column``; a DataError naming the argument when the column is missing
    (an unlabelled dataset) or is not a fixed-length float vector."""
    from datasets import List, Value

    if column not in split.column_names:
        raise DataError(f"--train_data_dir {folder}: dataset has no {column!r} column (--condition_column); label it "
                         "first with `ehr-diffusers label`")
    feature = split.features[column]
    length = getattr(feature, "length", -1)
    inner = getattr(feature, "feature", None)
    if not isinstance(feature, List) or length is None or length < 1 or not isinstance(inner, Value) \
            or not inner.dtype.startswith("float"):
        raise DataError(f"--condition_column {column}: expected a fixed-length float vector column, as "
                         f"`ehr-diffusers label` writes, got {feature}")
    return int(length)


def condition_tensor(split: Any, column: str) -> torch.Tensor:
    """The ``column`` vectors of the split as one float32 tensor (n, dim)."""
    import torch

    values = split.with_format("numpy", columns=[column])[column]
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def screen_split(split: Any, threshold: float | None, keep_unscored: bool = False) -> tuple[Any, int]:
    """The rows passing the judge screen (``text.judge.screen``) and how many were dropped; the split as it is when
    ``threshold`` is None. A ValueError naming ``--judge_threshold`` when no row is left."""
    if threshold is None:
        return split, 0
    if not math.isfinite(threshold):  # NaN would pass no row and say so, hiding the real mistake
        raise ArgumentError(f"--judge_threshold must be a finite number, got {threshold}")
    from ..text.judge import screen

    try:
        kept = screen(split, threshold=threshold, keep_unscored=keep_unscored)
    except ValueError as error:
        raise ArgumentError(f"--judge_threshold {threshold}: {error}") from None
    if len(kept) == 0:
        raise DataError(f"--judge_threshold {threshold}: no training row passes the judge screen (scores range "
                         "1-5; every category must reach the threshold); lower it or leave it out")
    return kept, len(split) - len(kept)


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
    import torch

    was_training = autoencoder.training
    autoencoder.eval()
    parts = []
    try:
        with torch.no_grad():
            for vectors in iter_vectors(split, schema, batch_size, desc="encoding latents",
                                        show_progress=show_progress):
                latent = autoencoder.encode(vectors.to(device))
                parts.append(autoencoder.normalize_latent(latent).float().cpu())
    finally:
        autoencoder.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, autoencoder.config.latent_dim)
