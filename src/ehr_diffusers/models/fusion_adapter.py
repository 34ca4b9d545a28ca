"""The EHRXDiff fusion adapter: event tokens, image-encoder tokens and VAE tokens of the previous image -> the UNet's
cross-attention context.

Two variants (``adapter_type``):

* ``"token_linear"``, the original's (dek924/EHRXDiff ``MultiModalTransformerAdaptor``): the event tokens, padded to a
  fixed ``num_event_tokens``, the image-encoder tokens and one token per latent channel of the previous image
  (``vae_projector``: each channel's ``h x w`` values -> ``context_dim``) are concatenated along the token axis and
  mixed by one Linear over that axis (1092 -> 1024 tokens in the paper). Kept for faithfulness and for converted
  weights; padded events enter the mix as zeros, so the mask is respected only through them being zero.
* ``"cross_attention"``, the default: a Perceiver resampler (Jaegle et al. 2021; Alayrac et al. 2022, Flamingo).
  ``num_latents`` learned queries attend to the concatenated tokens, with the event padding masked out, over
  ``num_layers`` blocks; the queries themselves are among the keys, so an interval without events still gives a
  well-defined context. It takes any number of events, and a learned embedding per token group tells events, image
  tokens and VAE tokens apart.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .modeling_utils import SafetensorsModelMixin

ADAPTER_TYPES = ("cross_attention", "token_linear")


class _ResamplerBlock(nn.Module):
    """Queries attend to [tokens | queries] (pre-norm), then an MLP; both residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_queries = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.norm_queries(queries)
        keys = torch.cat([self.norm_tokens(tokens), q], dim=1)
        keep = torch.cat([mask, torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)], dim=1)
        queries = queries + self.attention(q, keys, keys, key_padding_mask=~keep, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class FusionAdapterModel(SafetensorsModelMixin, ModelMixin, ConfigMixin):
    """Fuses the conditioning token groups into the UNet's context (module docstring).

    Args:
        adapter_type: ``"cross_attention"`` (default) or ``"token_linear"``.
        context_dim: width of every token and of the output (the UNet's ``cross_attention_dim``).
        image_dim: width of the image encoder's tokens (None: no image tokens); projected when it differs from
            ``context_dim``.
        num_image_tokens: how many image tokens (65 for ViT-B/32 at 256 px; used by ``token_linear``).
        vae_channels: latent channels of the previous image given as tokens (None: no VAE tokens).
        vae_token_dim: ``h x w`` of that latent (4096 for 64 x 64).
        num_latents, num_layers, num_heads, mlp_ratio: the resampler (``cross_attention``).
        num_event_tokens, num_output_tokens: the token-axis Linear (``token_linear``): events are padded or cut to
            ``num_event_tokens`` (1024 in the paper) and the output has ``num_output_tokens`` tokens.
    """

    @register_to_config
    def __init__(
        self,
        adapter_type: str = "cross_attention",
        context_dim: int = 128,
        image_dim: int | None = None,
        num_image_tokens: int = 65,
        vae_channels: int | None = None,
        vae_token_dim: int = 256,
        num_latents: int = 16,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_event_tokens: int = 1024,
        num_output_tokens: int = 1024,
    ):
        super().__init__()
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {adapter_type!r}")
        self.image_projector = (nn.Linear(image_dim, context_dim)
                                if image_dim is not None and image_dim != context_dim else None)
        self.vae_projector = nn.Linear(vae_token_dim, context_dim) if vae_channels is not None else None
        if adapter_type == "token_linear":
            groups = num_event_tokens + (num_image_tokens if image_dim is not None else 0) + (vae_channels or 0)
            self.adaptor = nn.Linear(groups, num_output_tokens)
        else:
            self.latents = nn.Parameter(torch.randn(num_latents, context_dim) * context_dim**-0.5)
            self.group_embedding = nn.Parameter(torch.zeros(3, context_dim))  # events, image, VAE
            self.blocks = nn.ModuleList(_ResamplerBlock(context_dim, num_heads, mlp_ratio) for _ in range(num_layers))
            self.norm_out = nn.LayerNorm(context_dim)

    def forward(
        self,
        event_tokens: torch.Tensor,
        event_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        vae_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``event_tokens`` (batch, events, context_dim) with ``event_mask`` (True: real); ``image_tokens`` (batch,
        tokens, image_dim); ``vae_latents`` (batch, vae_channels, h, w), the unscaled latent of the previous image.
        Returns the context (batch, tokens, context_dim)."""
        config = self.config
        batch = event_tokens.shape[0]
        if event_mask is None:
            event_mask = torch.ones(event_tokens.shape[:2], dtype=torch.bool, device=event_tokens.device)
        groups, masks = [event_tokens], [event_mask.bool()]
        if config.image_dim is not None:
            if image_tokens is None:
                raise ValueError("this fusion adapter takes image-encoder tokens: pass image_tokens")
            if self.image_projector is not None:
                image_tokens = self.image_projector(image_tokens)
            groups.append(image_tokens.to(event_tokens.dtype))
            masks.append(torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=event_tokens.device))
        if config.vae_channels is not None:
            if vae_latents is None:
                raise ValueError("this fusion adapter takes the previous image's VAE latents: pass vae_latents")
            vae_tokens = self.vae_projector(vae_latents.flatten(2).to(event_tokens.dtype))
            groups.append(vae_tokens)
            masks.append(torch.ones(vae_tokens.shape[:2], dtype=torch.bool, device=event_tokens.device))
        if config.adapter_type == "token_linear":
            groups[0] = self._last_event_tokens(groups[0], masks[0])
            tokens = torch.cat(groups, dim=1)
            return self.adaptor(tokens.transpose(1, 2)).transpose(1, 2)
        tokens = torch.cat([group + self.group_embedding[index].to(group.dtype)
                            for index, group in zip(self._group_indices(), groups)], dim=1)
        mask = torch.cat(masks, dim=1)
        queries = self.latents.to(tokens.dtype).expand(batch, -1, -1)
        for block in self.blocks:
            queries = block(queries, tokens, mask)
        return self.norm_out(queries)

    def _last_event_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each row's last ``num_event_tokens`` real tokens (the most recent events; real tokens come first, padding
        after), then zeros: the fixed-length token group the token-axis Linear mixes."""
        count = self.config.num_event_tokens
        lengths = mask.sum(dim=1)
        if tokens.shape[1] < count:
            tokens = nn.functional.pad(tokens, (0, 0, 0, count - tokens.shape[1]))
        positions = (lengths - count).clamp(min=0)[:, None] + torch.arange(count, device=tokens.device)[None]
        real = positions < lengths[:, None]
        picked = tokens.gather(1, positions.clamp(max=tokens.shape[1] - 1)[..., None].expand(-1, -1, tokens.shape[2]))
        return picked * real[..., None].to(tokens.dtype)

    def _group_indices(self) -> list[int]:
        """The group embedding index of each token group present: events 0, image 1, VAE 2."""
        return [0] + ([1] if self.config.image_dim is not None else []) + ([2] if self.config.vae_channels else [])
