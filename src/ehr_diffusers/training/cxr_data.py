"""What the X-ray training scripts share: the frozen VAE they encode with, and the events of a batch of triplets padded
for the event encoder. The split itself is read by :mod:`ehr_diffusers.data.cxr.split`, shared with the evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.cxr.split import CXRSplit
from ..models.event_encoder import pad_events


def collate_events(split: CXRSplit, indices: Sequence[int] | np.ndarray | torch.Tensor,
                   max_events: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The events of triplets ``indices`` as the event encoder's padded input: ``embeddings`` (B, n, dim) float32,
    ``hours`` (B, n) and ``mask`` (B, n), True for a real event; each triplet keeps its most recent ``max_events``
    (:func:`~ehr_diffusers.models.event_encoder.pad_events`)."""
    rows = [int(index) for index in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    embeddings, hours, mask, _ = pad_events([split.event_embeddings[row] for row in rows],
                                            [split.event_hours[row] for row in rows], max_events)
    return embeddings, hours, mask


def load_vae(vae_path: str, subfolder: str | None = None) -> Any:
    """The frozen ``AutoencoderKL`` of ``--vae_path`` (a folder or Hub id), in eval mode; a missing one is one line
    naming the flag."""
    from diffusers import AutoencoderKL

    from ..hub.errors import explain_missing_model

    with explain_missing_model(vae_path, "--vae_path"):
        vae = AutoencoderKL.from_pretrained(vae_path, subfolder=subfolder)
    return vae.eval().requires_grad_(False)
