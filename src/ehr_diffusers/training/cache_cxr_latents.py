"""Encodes every image of a ``prepare-cxr`` dataset once with a VAE, sharded over the processes of ``accelerate
launch``, and stores the latents with the dataset (:mod:`ehr_diffusers.data.cxr.latents`)::

    accelerate launch -m ehr_diffusers.training.cache_cxr_latents --train_data_dir DATA --vae_path VAE

Each split's distinct images are cut into shards of ``--shard_size``; shard k goes to process k mod N, and each is
saved as soon as it is encoded (``DATA/latent-cache/``), so a run stopped midway encodes, when run again, only the
shards it had not finished. The shards do not depend on the process count, so neither do the latents. Once every
shard is there, the main process writes each triplet's ``previous_latent`` and ``target_latent`` (float16) into the
dataset, in place, with the VAE's path and the SHA-256 of its weights in ``cxr_summary.json``, and removes the shards.
``ehr-diffusers cache-latents`` (or ``prepare-cxr --cache-latents``) runs this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ehr_diffusers.data.cxr.dataset import SUMMARY_NAME, read_cxr_images
from ehr_diffusers.data.cxr.latents import (
    LATENT_COLUMNS,
    SHARD_FOLDER,
    SUMMARY_KEY,
    Shard,
    distinct_images,
    plan_shards,
)
from ehr_diffusers.data.cxr.split import load_dataset_dict, to_pixels
from ehr_diffusers.errors import DataError
from ehr_diffusers.models.modeling_utils import weights_fingerprint
from ehr_diffusers.training.common import run_script
from ehr_diffusers.training.cxr_data import load_vae

logger = logging.getLogger(__name__)
LATENTS_KEY = "latents"
DIGEST_KEY = "paths_sha256"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--train_data_dir", type=str, required=True, help="A prepare-cxr dataset folder; the latents are added to it.")
    add("--vae_path", type=str, required=True, help="An AutoencoderKL folder or Hub id (train-cxr's --vae).")
    add("--vae_subfolder", type=str, default=None, help="Subfolder of --vae_path holding the VAE (e.g. 'vae').")
    add("--resolution", type=int, default=None,
        help="Image size the VAE encodes (default: its sample_size); train-cxr uses the latents only at the same.")
    add("--batch_size", type=int, default=64, help="Images per VAE call, per process.")
    add("--shard_size", type=int, default=1024, help="Images per shard, the unit of work saved and resumed.")
    args = parser.parse_args(argv)
    for name in ("resolution", "batch_size", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    return args


def shard_done(path: Path, shard: Shard) -> bool:
    """Whether ``path`` holds this shard's latents (a file of another plan, or a torn one, is encoded again)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(DIGEST_KEY) == shard.digest
    except Exception:  # a torn file: encode the shard again
        return False


@torch.no_grad()
def encode_shard(vae: Any, data_dir: Path, shard: Shard, resolution: int, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """The posterior modes of the shard's images, unscaled, float16 (n, C, h, w) on the CPU."""
    images = torch.as_tensor(read_cxr_images(data_dir, list(shard.paths), resolution, show_progress=False))
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start:start + batch_size], vae.config.in_channels).to(device, vae.dtype)
        chunks.append(vae.encode(pixels).latent_dist.mode().to("cpu", torch.float16))
    return torch.cat(chunks)


def save_shard(latents: torch.Tensor, path: Path, shard: Shard) -> None:
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({LATENTS_KEY: latents.contiguous()}, str(temporary), metadata={DIGEST_KEY: shard.digest})
    os.replace(temporary, path)


def write_columns(data_dir: Path, shard_dir: Path, shards: list[Shard], record: dict[str, Any]) -> dict[str, int]:
    """Adds the latent columns to every split, in place (the split folders, ``dataset_dict.json`` and the summary are
    each replaced by a rename, ``io.atomic_merge``); returns the triplets per split."""
    from datasets import Array3D, Dataset, DatasetDict, Features, concatenate_datasets
    from safetensors.torch import load_file

    from ehr_diffusers.io import atomic_merge

    dataset = load_dataset_dict(data_dir)
    written, counts = {}, {}
    for split, table in dataset.items():
        parts = [load_file(str(shard_dir / shard.filename))[LATENTS_KEY].numpy()
                 for shard in shards if shard.split == split]
        paths = distinct_images(table)
        latents = np.concatenate(parts) if parts else np.zeros((0, *record["shape"]), dtype=np.float16)
        row = {path: index for index, path in enumerate(paths)}
        table = table.remove_columns([name for name in LATENT_COLUMNS.values() if name in table.column_names])
        feature = Array3D(shape=tuple(record["shape"]), dtype="float16")
        columns = {latent_column: latents[[row[path] for path in table[image_column]]]
                   for image_column, latent_column in LATENT_COLUMNS.items()}
        added = Dataset.from_dict(columns, features=Features(dict.fromkeys(columns, feature)))
        written[split] = concatenate_datasets([table, added], axis=1)
        counts[split] = len(table)
    summary = json.loads((data_dir / SUMMARY_NAME).read_text())
    summary.pop(SUMMARY_KEY, None)
    with atomic_merge(data_dir) as staging:  # the record goes last: an interrupted rewrite claims no latents
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_merge(data_dir) as staging:
        DatasetDict(written).save_to_disk(str(staging))
    summary[SUMMARY_KEY] = record
    with atomic_merge(data_dir) as staging:
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    data_dir = Path(args.train_data_dir)
    dataset = load_dataset_dict(data_dir)
    vae = load_vae(args.vae_path, args.vae_subfolder)
    resolution = args.resolution or vae.config.sample_size
    fingerprint = weights_fingerprint(vae)
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    device = accelerator.device
    vae.to(device)
    shards = plan_shards(dataset, args.shard_size)
    if not shards:
        raise DataError(f"--train_data_dir {data_dir}: no images to encode")
    shard_dir = data_dir / SHARD_FOLDER / f"{fingerprint[:16]}-{resolution}px"
    shard_dir.mkdir(parents=True, exist_ok=True)  # on every machine: the folder must be shared by all of them
    mine = [shard for shard in shards[accelerator.process_index::accelerator.num_processes]
            if not shard_done(shard_dir / shard.filename, shard)]
    if accelerator.is_main_process:
        logger.info(f"{sum(len(s.paths) for s in shards):,} images in {len(shards)} shard(s) over "
                    f"{accelerator.num_processes} process(es); {len(mine)} of the main process's to encode")
    bar = tqdm(total=sum(len(shard.paths) for shard in mine), desc="encode latents", unit="image",
               disable=not accelerator.is_local_main_process)
    for shard in mine:
        save_shard(encode_shard(vae, data_dir, shard, resolution, args.batch_size, device),
                   shard_dir / shard.filename, shard)
        bar.update(len(shard.paths))
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # the main process writes the columns; nobody waits for it at a barrier
        return {"counts": {}, "vae_sha256": fingerprint, "shards": len(shards)}
    absent = [shard.name for shard in shards if not shard_done(shard_dir / shard.filename, shard)]
    if absent:
        raise DataError(f"{shard_dir}: shard(s) {', '.join(absent[:3])} missing after every process finished; over "
                        "several machines the dataset folder must be one shared by all of them")
    from safetensors import safe_open

    with safe_open(str(shard_dir / shards[0].filename), framework="pt") as handle:
        shape = list(handle.get_slice(LATENTS_KEY).get_shape()[1:])
    record = {"vae": args.vae_path if args.vae_subfolder is None else f"{args.vae_path}/{args.vae_subfolder}",
              "vae_sha256": fingerprint, "resolution": resolution, "shape": shape, "dtype": "float16",
              "columns": list(LATENT_COLUMNS.values()),
              "what": "the VAE posterior's mode, unscaled (multiply by the VAE's scaling_factor)",
              "images": sum(len(shard.paths) for shard in shards), "shard_size": args.shard_size}
    counts = write_columns(data_dir, shard_dir, shards, record)
    shutil.rmtree(shard_dir)
    if not any((data_dir / SHARD_FOLDER).iterdir()):
        (data_dir / SHARD_FOLDER).rmdir()
    logger.info(f"latents written into {data_dir}: {counts}")
    return {"counts": counts, "vae_sha256": fingerprint, "shards": len(shards)}


if __name__ == "__main__":
    run_script(main)
