"""VAE latents cached with a ``prepare-cxr`` dataset: the columns that hold them, the record of the VAE that made them,
and the shards they are computed in.

Encoding every image with the VAE is the costliest data step at MIMIC-CXR size (377k images). ``ehr-diffusers
cache-latents`` (or ``prepare-cxr --cache-latents``) does it once, sharded over processes, and stores each triplet's
previous and target latent as float16 columns; ``train-cxr`` then reads them instead of encoding, when they were made
by its VAE at its resolution, and refuses them otherwise. The latents are the posterior's mode, unscaled (the
training multiplies them by the VAE's ``scaling_factor``), as the training computes them itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from .dataset import SUMMARY_NAME

LATENT_COLUMNS = {"previous_image": "previous_latent", "target_image": "target_latent"}
SUMMARY_KEY = "latents"
# shards in progress: OUT/latent-cache/<key>/<split>-<index>.safetensors, removed once the columns are written
SHARD_FOLDER = "latent-cache"


@dataclass(frozen=True)
class Shard:
    """``paths[start:end]`` of one split's distinct images: the unit of work a process encodes and saves."""

    split: str
    index: int
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"

    @property
    def filename(self) -> str:
        """Its file in the shard folder."""
        return f"{self.name}.safetensors"

    @property
    def digest(self) -> str:
        """The image paths it holds, hashed: a shard file of another split of the dataset is not reused."""
        return hashlib.sha256("\n".join(self.paths).encode()).hexdigest()


def distinct_images(table: Any) -> list[str]:
    """The distinct images of a split, in order of first appearance (previous images, then targets)."""
    return list(dict.fromkeys(path for column in LATENT_COLUMNS for path in table[column]))


def plan_shards(dataset: Any, shard_size: int) -> list[Shard]:
    """Every split's distinct images in shards of ``shard_size``; the shards do not depend on the process count, so
    the latents do not either."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    shards = []
    for split, table in dataset.items():
        paths = distinct_images(table)
        for index, start in enumerate(range(0, len(paths), shard_size)):
            shards.append(Shard(split, index, tuple(paths[start:start + shard_size])))
    return shards


def cache_record(dataset_dir: str | Path) -> dict[str, Any] | None:
    """The summary's record of the cached latents (the VAE, its fingerprint, the resolution, the shape), or None."""
    path = Path(dataset_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(SUMMARY_KEY)


def check_cache_matches(dataset_dir: str | Path, record: dict[str, Any], vae: str, fingerprint: str,
                        resolution: int, argument: str) -> None:
    """A DataError naming both VAEs when the cached latents were made by another VAE, or at another resolution, than
    the one a run uses."""
    if record["vae_sha256"] == fingerprint and record["resolution"] == resolution:
        return
    if record["vae_sha256"] != fingerprint:
        problem = (f"were cached with the VAE {record['vae']} (weights sha256 {record['vae_sha256'][:12]}), "
                   f"not {argument} {vae} (sha256 {fingerprint[:12]})")
        if str(record["vae"]) == str(vae):
            problem += ": its weights or configuration changed since"
    else:
        problem = f"are of {record['resolution']} px images, this run's are {resolution} px"
    raise DataError(f"{dataset_dir}: its latents {problem}; pass that VAE and resolution, or cache them again: "
                    f"`ehr-diffusers cache-latents --dataset {dataset_dir} --vae {vae} --resolution {resolution}`")


def read_cached_latents(table: Any, dataset_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Each triplet's cached (previous, target) latents from a split's columns, float32 (N, C, h, w)."""
    missing = [column for column in LATENT_COLUMNS.values() if column not in table.column_names]
    if missing:
        raise DataError(f"{dataset_dir}: {SUMMARY_NAME} records cached latents, but split {split!r} has no "
                        f"{', '.join(missing)} column; cache them again with `ehr-diffusers cache-latents`")
    view = table.with_format("numpy", columns=list(LATENT_COLUMNS.values()))
    return tuple(np.asarray(view[column], dtype=np.float32) for column in LATENT_COLUMNS.values())
