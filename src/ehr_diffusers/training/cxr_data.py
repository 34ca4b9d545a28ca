"""Batches of the EHRXDiff training scripts: the events of a batch of triplets padded for the event encoder. The split
itself is read by :mod:`ehr_diffusers.data.cxr.split`, shared with the evaluation."""

from __future__ import annotations

from collections.abc import Sequence

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
