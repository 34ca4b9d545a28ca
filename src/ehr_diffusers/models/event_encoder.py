"""The EHRXDiff event encoder: per-event embeddings -> per-event context tokens.

EHRXDiff (arXiv 2409.07012, dek924/EHRXDiff ``TabTransformerEmbedder``) reads the events between two chest X-rays as
a sequence: one embedding per event (a sentence embedding of its text), a 2-layer ``nn.TransformerEncoder`` with a
key-padding mask, and a linear projection to the UNet's context width. Nothing is pooled: the UNet (through the
fusion adapter) attends to every event. This module keeps that layout (so the released weights load 1:1) and adds
what the original lacks:

* an encoding of each event's time (``event_hours``, hours before the target study), added to its embedding, since
  "diuretic 40 h ago" and "diuretic 1 h ago" explain different images;
* a learned start token, always present: a triplet without events (and the "no events" context that
  classifier-free guidance steers away from) is the start token alone, so the encoder never sees an all-padding
  row, whose attention would be undefined;
* ``pooled``: the masked mean of the tokens, which the event-image CLIP pretraining contrasts with the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .modeling_utils import SafetensorsModelMixin


@dataclass
class EventEncoderOutput(BaseOutput):
    """``tokens`` (batch, tokens, context_dim): the start token (when the config has one) then one token per event;
    ``mask`` (batch, tokens), True where a token is real; ``pooled`` (batch, context_dim): their masked mean."""

    tokens: torch.Tensor = None
    mask: torch.Tensor = None
    pooled: torch.Tensor = None


def time_features(hours: torch.Tensor, dim: int, max_hours: float) -> torch.Tensor:
    """sin/cos features of ``hours / max_hours`` at ``dim / 2`` log-spaced frequencies (periods from ``2 max_hours``
    down to ``0.2 h``): the transformer's usual position encoding, on a clock instead of an index."""
    half = dim // 2
    frequencies = torch.exp(torch.linspace(0.0, math.log(10.0 * max_hours), half, device=hours.device))
    angles = (hours.float() / max_hours)[..., None] * frequencies * math.pi
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def pad_events(
    embeddings: Sequence[np.ndarray | torch.Tensor],
    hours: Sequence[np.ndarray | torch.Tensor | None] | None = None,
    max_events: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Ragged per-interval events (each ``(n_i, dim)``, oldest first) -> the encoder's padded input.

    Returns ``embeddings`` (batch, n, dim) float32, ``hours`` (batch, n) (NaN, "time unknown", for an interval given
    no hours), ``mask``
    (batch, n) True for a real event, and how many events were dropped: an interval longer than ``max_events``
    keeps its most recent ``max_events``, as the dataset does. ``n`` is the longest interval kept (at least 0).
    """
    if not embeddings:
        raise ValueError("pad_events needs at least one interval")
    arrays = [torch.as_tensor(np.asarray(item, dtype=np.float32) if not torch.is_tensor(item) else item).float()
              for item in embeddings]
    dims = {array.shape[-1] for array in arrays if array.ndim == 2}
    if any(array.ndim != 2 for array in arrays) or len(dims) > 1:
        shapes = [tuple(array.shape) for array in arrays]
        raise ValueError(f"event embeddings must be (n_events, dim) arrays of one dim, got shapes {shapes}")
    dim = dims.pop()
    limit = max_events if max_events is not None else max(len(array) for array in arrays)
    dropped = sum(max(0, len(array) - limit) for array in arrays)
    length = min(limit, max(len(array) for array in arrays))
    padded = torch.zeros(len(arrays), length, dim)
    times = torch.zeros(len(arrays), length)
    mask = torch.zeros(len(arrays), length, dtype=torch.bool)
    for row, array in enumerate(arrays):
        kept = array[max(0, len(array) - limit):]
        padded[row, :len(kept)] = kept
        mask[row, :len(kept)] = True
        if hours is None or hours[row] is None:
            times[row] = float("nan")
        else:
            given = torch.as_tensor(np.asarray(hours[row], dtype=np.float32)).reshape(-1)
            if len(given) != len(array):
                raise ValueError(f"interval {row}: {len(array)} event embeddings but {len(given)} event hours")
            times[row, :len(kept)] = given[max(0, len(array) - limit):]
    return padded, times, mask, dropped


class EventEncoderModel(SafetensorsModelMixin, ModelMixin, ConfigMixin):
    """A transformer over the events of one interval, with a key-padding mask.

    Args:
        event_dim: width of the input event embeddings (384 for MiniLM, 768 for BioClinical ModernBERT; 1536 in the
            released EHRXDiff weights). Checked against the pipeline's event embedder at load.
        hidden_dim: transformer width; an input projection is added only when it differs from ``event_dim``.
        num_layers, num_heads, ff_dim, dropout, norm_first: the ``nn.TransformerEncoderLayer`` settings (the
            original: 2 layers, 24 heads, 6144, post-norm).
        context_dim: width of the output tokens (the UNet's cross-attention width).
        max_events: the most events one interval may hold; the pipeline keeps the most recent ones.
        time_encoding: add an encoding of ``event_hours`` (False in converted original weights, which have none).
        time_features_dim, max_hours: size and scale of that encoding.
        start_token: prepend a learned token to every sequence (False in converted original weights).
    """

    @register_to_config
    def __init__(
        self,
        event_dim: int = 384,
        hidden_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ff_dim: int = 512,
        dropout: float = 0.0,
        norm_first: bool = False,
        context_dim: int = 128,
        max_events: int = 1024,
        time_encoding: bool = True,
        time_features_dim: int = 32,
        max_hours: float = 48.0,
        start_token: bool = True,
    ):
        super().__init__()
        self.input_proj = nn.Linear(event_dim, hidden_dim) if event_dim != hidden_dim else nn.Identity()
        self.time_proj = nn.Linear(time_features_dim, hidden_dim) if time_encoding else None
        if self.time_proj is not None:  # starts as "no time": the event embeddings alone, as in the original
            nn.init.zeros_(self.time_proj.weight)
            nn.init.zeros_(self.time_proj.bias)
        self.start = nn.Parameter(torch.randn(hidden_dim) * 0.02) if start_token else None
        layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, ff_dim, dropout, batch_first=True,
                                           norm_first=norm_first)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.fc = nn.Linear(hidden_dim, context_dim)

    def forward(
        self,
        event_embeddings: torch.Tensor,
        event_mask: torch.Tensor | None = None,
        event_hours: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> EventEncoderOutput | tuple:
        """``event_embeddings`` (batch, events, event_dim), padded; ``event_mask`` (batch, events), True for a real
        event (None: all real); ``event_hours`` (batch, events), hours before the target study (None or NaN: time
        unknown)."""
        batch, length, dim = event_embeddings.shape
        if dim != self.config.event_dim:
            raise ValueError(f"event embeddings are {dim}-d but the event encoder takes {self.config.event_dim}-d "
                             "ones: embed the events with the model the encoder was trained on")
        if length > self.config.max_events:
            raise ValueError(f"{length} events per interval but the event encoder takes at most "
                             f"{self.config.max_events}: keep the most recent ones")
        device = event_embeddings.device
        mask = (torch.ones(batch, length, dtype=torch.bool, device=device) if event_mask is None
                else event_mask.to(device=device, dtype=torch.bool))
        h = self.input_proj(event_embeddings.to(self.fc.weight.dtype))
        if self.time_proj is not None and event_hours is not None:
            hours = event_hours.to(device)
            known = torch.isfinite(hours)  # NaN: an event whose time is unknown gets no time encoding
            features = time_features(hours.nan_to_num(0.0), self.config.time_features_dim, self.config.max_hours)
            h = h + self.time_proj(features.to(h.dtype)) * known[..., None].to(h.dtype)
        if self.start is not None:
            h = torch.cat([self.start.to(h.dtype).expand(batch, 1, -1), h], dim=1)
            mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), mask], dim=1)
        elif h.shape[1] == 0:  # no start token and no events: one zero event, the original's "zero table"
            h = h.new_zeros(batch, 1, h.shape[-1])
            mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
        else:  # a row without events attends to its first slot, zeroed, instead of to nothing
            h = h * mask[..., None].to(h.dtype)
            mask = mask.clone()
            mask[~mask.any(dim=1), 0] = True
        h = h * mask[..., None].to(h.dtype)
        h = self.transformer(h, src_key_padding_mask=~mask)
        tokens = self.fc(h)
        weights = mask[..., None].to(tokens.dtype)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        if not return_dict:
            return tokens, mask, pooled
        return EventEncoderOutput(tokens=tokens, mask=mask, pooled=pooled)
