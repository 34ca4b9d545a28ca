"""Many records from one pipeline: batches of bounded size, and a generator per record so that record i is the same
whatever the batch size.

The pipeline's ``__call__`` makes one batch; a hundred thousand records need batches (memory), the prompts embedded
once, and seeds that do not depend on how the work was cut. ``ehr-diffusers generate``, the benchmarks and the
evaluation all generate through :func:`generate_records`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class GeneratedRecords:
    """``records`` (dicts), the ``prompts`` they were generated from (None: unconditional) and the decoder's
    ``vectors`` (float32, one row per record)."""

    records: list[dict[str, Any]]
    prompts: list[str | None]
    vectors: np.ndarray


_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One step of the SplitMix64 mixer (Steele et al. 2014): nearby inputs give unrelated 64-bit outputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def record_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of record ``index`` of a run with ``seed``, seeded by mixing both (SplitMix64), so that nearby
    (seed, index) pairs give unrelated streams."""
    state = _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))
    return torch.Generator(device=device).manual_seed(state & 0x7FFF_FFFF_FFFF_FFFF)


def generate_records(
    pipe: Any,
    prompts: Sequence[str] | None,
    num_records_per_prompt: int,
    *,
    batch_size: int = 4096,
    seed: int = 0,
    show_progress: bool = True,
    **call_kwargs: Any,
) -> GeneratedRecords:
    """``num_records_per_prompt`` records per prompt (or in all, unconditionally, when ``prompts`` is None), in
    batches of at most ``batch_size`` records; ``call_kwargs`` go to the pipeline (steps, guidance, decode mode)."""
    reserved = sorted({"prompt", "prompt_embeds", "num_records_per_prompt", "generator", "latents", "output_type",
                       "return_dict"} & set(call_kwargs))
    if reserved:
        raise ValueError(f"generate_records sets {', '.join(reserved)} itself; leave them out of the pipeline options")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if num_records_per_prompt < 1:
        raise ValueError(f"num_records_per_prompt must be a positive integer, got {num_records_per_prompt}")
    if prompts is not None and (isinstance(prompts, str) or not prompts):
        raise ValueError("prompts must be a non-empty list of strings, or None for unconditional records")
    device = pipe._execution_device
    embeds = None
    if prompts is not None:
        embeds, _, _ = pipe.encode_prompt(list(prompts), device)
    total = num_records_per_prompt * (1 if prompts is None else len(prompts))
    records: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        with tqdm(total=total, desc="Generating records", unit="record", disable=not show_progress) as bar:
            for start in range(0, total, batch_size):
                rows = range(start, min(start + batch_size, total))
                generators = [record_generator(seed, index, device) for index in rows]
                if embeds is None:
                    out = pipe(num_records_per_prompt=len(rows), generator=generators, **call_kwargs)
                else:
                    chunk = embeds[torch.tensor([index // num_records_per_prompt for index in rows], device=device)]
                    out = pipe(prompt_embeds=chunk, generator=generators, **call_kwargs)
                records += out.records
                vectors.append(out.vectors)
                bar.update(len(rows))
    finally:
        pipe.set_progress_bar_config(disable=was_disabled)
    record_prompts = [None if prompts is None else prompts[index // num_records_per_prompt] for index in range(total)]
    return GeneratedRecords(records=records, prompts=record_prompts, vectors=np.concatenate(vectors))
