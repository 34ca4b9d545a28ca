"""The EHR denoiser: a transformer over latent tokens whose every block is conditioned on the noise level and the text.

A denoiser over one latent token has nothing to attend to, and one that sees the noise level only at its input loses
it in the deeper layers. Here:

* the latent (e.g. 1024 values) is cut into ``num_tokens`` tokens, so self-attention relates parts of the latent;
* the noise level enters as a Fourier embedding of logSNR (the scheduler's lambda), and together with the pooled
  condition (and optional structured conditions: sex, age, ...) it modulates every block (adaLN-Zero, Peebles & Xie
  2023: shift, scale and a gate per sub-layer, initialised so that each block starts as the identity);
* a condition given as a token sequence (batch, tokens, dim) is also read by cross-attention in every block;
* the "no condition" input used for classifier-free guidance is a learned embedding (``null_condition``) that the
  training dropout substitutes, so the pipeline's unconditional pass uses exactly what the model learned;
* the network itself predicts v = alpha eps - sigma x (unit variance at every noise level) and ``forward`` converts it
  to what the scheduler expects (``prediction_type``): eps = sigma z + alpha v, x = alpha z - sigma v, or v. Trained
  with the epsilon loss, a bare epsilon network fails at the noise end of the logSNR range: at lambda = -20,
  x_hat = (z - sigma eps_hat) / alpha multiplies its error by 1 / alpha = e^10, and few-step samplers turn that into
  garbage records. Through v, eps_hat = sigma z + alpha v is exact there and x_hat = alpha z - sigma v stays bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .modeling_utils import SafetensorsModelMixin

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class EHRDenoiserOutput(BaseOutput):
    """``sample``: the model's prediction (epsilon, v or x, as the scheduler was trained), shaped like the latent.
    It defaults to None, as diffusers' outputs do, so that accelerate's mixed-precision wrapper can rebuild it."""

    sample: torch.Tensor = None


def fourier_logsnr_embedding(logsnr: torch.Tensor, dim: int, logsnr_scale: float = 20.0) -> torch.Tensor:
    """sin/cos features of logSNR / logsnr_scale at ``dim / 2`` log-spaced frequencies from 1 to 1000."""
    half = dim // 2
    frequencies = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=logsnr.device))
    angles = (logsnr.float() / logsnr_scale)[:, None] * frequencies[None, :] * math.pi
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _Block(nn.Module):
    """Self-attention, optional cross-attention and an MLP, each modulated by the conditioning vector."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_ratio: float, cross_attention_dim: int | None,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attention = None
        if cross_attention_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_dim, eps=1e-6)
            self.cross_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True,
                                                         kdim=cross_attention_dim, vdim=cross_attention_dim)
        self.norm2 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        inner = int(hidden_dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, inner), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(inner, hidden_dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 6 * hidden_dim))
        nn.init.zeros_(self.modulation[1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.modulation[1].bias)

    def _self_attention(self, h: torch.Tensor) -> torch.Tensor:
        """``self.attention`` computed with scaled_dot_product_attention: the same weights and result, without the
        overhead that nn.MultiheadAttention has on sequences of a few tokens (1.7x faster here)."""
        attention = self.attention
        batch, tokens, width = h.shape
        heads = attention.num_heads
        qkv = F.linear(h, attention.in_proj_weight, attention.in_proj_bias)
        query, key, value = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        dropout = attention.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        return attention.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))

    def _single_key_attention(self, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention over a pooled condition, computed without the queries it does not depend on."""
        attention, width = self.cross_attention, self.cross_attention.embed_dim
        weight = attention.in_proj_weight[2 * width:] if attention._qkv_same_embed_dim else attention.v_proj_weight
        bias = None if attention.in_proj_bias is None else attention.in_proj_bias[2 * width:]
        return attention.out_proj(F.linear(context, weight, bias))

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor, context: torch.Tensor | None,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(conditioning).chunk(6, dim=1)
        x = x + gate1[:, None, :] * self._self_attention(_modulate(self.norm1(x), shift1, scale1))
        if self.cross_attention is not None and context is not None:
            # One unmasked key at inference: softmax is 1, so attention is exactly out_proj(v_proj(context)). In
            # training the full path runs, so that every parameter is in the graph (DDP) and dropout applies.
            if context.shape[1] == 1 and context_mask is None and not self.training:
                x = x + self._single_key_attention(context[:, 0])[:, None, :]
            else:
                padding = None if context_mask is None else ~context_mask.bool()
                x = x + self.cross_attention(self.norm_cross(x), context, context, key_padding_mask=padding,
                                             need_weights=False)[0]
        return x + gate2[:, None, :] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class EHRDenoiserModel(SafetensorsModelMixin, ModelMixin, ConfigMixin):
    """Transformer denoiser over latent tokens with adaLN conditioning and cross-attention (see the module docstring).

    Args:
        latent_dim: size of the latent (a multiple of ``num_tokens``).
        num_tokens: tokens the latent is cut into.
        hidden_dim: transformer width.
        num_layers: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width / hidden_dim.
        condition_dim: size of the condition embedding (the text embedder's dimension).
        structured_dim: size of optional structured conditions (0: none).
        fourier_dim: Fourier features of logSNR.
        logsnr_scale: logSNR is divided by this before the Fourier features (the schedule's largest |lambda|).
        dropout: dropout in attention and MLPs.
        prediction_type: what ``forward`` returns: "epsilon", "v_prediction" or "sample" (the scheduler's setting);
            the network predicts v and is converted exactly.
    """

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 1024,
        num_tokens: int = 16,
        hidden_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        condition_dim: int = 384,
        structured_dim: int = 0,
        fourier_dim: int = 256,
        logsnr_scale: float = 20.0,
        dropout: float = 0.0,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if latent_dim % num_tokens:
            raise ValueError(f"latent_dim ({latent_dim}) must be a multiple of num_tokens ({num_tokens})")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a multiple of num_heads ({num_heads})")
        token_dim = latent_dim // num_tokens
        self.input_projection = nn.Linear(token_dim, hidden_dim)
        self.position_embedding = nn.Parameter(torch.randn(1, num_tokens, hidden_dim) * 0.02)
        self.time_embedding = nn.Sequential(nn.Linear(fourier_dim, hidden_dim), nn.SiLU(),
                                            nn.Linear(hidden_dim, hidden_dim))
        self.condition_embedding = nn.Sequential(nn.Linear(condition_dim, hidden_dim), nn.SiLU(),
                                                 nn.Linear(hidden_dim, hidden_dim))
        self.structured_embedding = nn.Linear(structured_dim, hidden_dim) if structured_dim else None
        self.null_condition = nn.Parameter(torch.zeros(condition_dim))
        self.blocks = nn.ModuleList(
            [_Block(hidden_dim, num_heads, mlp_ratio, condition_dim, dropout) for _ in range(num_layers)]
        )
        self.final_norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.output_projection = nn.Linear(hidden_dim, token_dim)
        for layer in (self.final_modulation[1], self.output_projection):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def seed_reference_config(cls) -> dict[str, Any]:
        """The width, depth and heads of HealthForge's reference denoiser (hidden 4096, 8 layers, 8 heads; about 1.96B
        parameters there), for comparisons only. With adaLN and cross-attention in every block it has 2.8B here."""
        return {"latent_dim": 1024, "num_tokens": 1, "hidden_dim": 4096, "num_layers": 8, "num_heads": 8,
                "mlp_ratio": 4.0, "condition_dim": 768}

    def null_condition_embeds(self, batch_size: int, num_tokens: int | None = None) -> torch.Tensor:
        """The learned "no condition" input, as a pooled (batch, dim) or token (batch, tokens, dim) condition."""
        null = self.null_condition.expand(batch_size, -1)
        return null if num_tokens is None else null[:, None, :].expand(-1, num_tokens, -1)

    def _from_velocity(self, velocity: torch.Tensor, sample: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """The network's v -> the configured prediction, with alpha, sigma from logSNR, computed and returned in float32
        under half precision: at logSNR -20, alpha v is 4.5e-5 of sigma z, below bfloat16's resolution."""
        if self.config.prediction_type == "v_prediction":
            return velocity
        alpha = torch.sigmoid(logsnr.float()).sqrt()[:, None]
        sigma = torch.sigmoid(-logsnr.float()).sqrt()[:, None]
        if self.config.prediction_type == "epsilon":
            out = sigma * sample.float() + alpha * velocity.float()
        else:
            out = alpha * sample.float() - sigma * velocity.float()
        return out if sample.dtype in (torch.float16, torch.bfloat16) else out.to(sample.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        logsnr: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        structured_conditions: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> EHRDenoiserOutput | tuple:
        """``sample`` (batch, latent_dim) at noise level ``logsnr`` (batch,) or (); ``encoder_hidden_states`` is a
        pooled condition (batch, condition_dim) or a token sequence (batch, tokens, condition_dim)."""
        batch = sample.shape[0]
        if sample.ndim != 2 or sample.shape[1] != self.config.latent_dim:
            raise ValueError(f"sample must be (batch, {self.config.latent_dim}), got {tuple(sample.shape)}")
        if encoder_hidden_states.shape[-1] != self.config.condition_dim:
            raise ValueError(f"encoder_hidden_states has dimension {encoder_hidden_states.shape[-1]}, the model "
                             f"expects condition_dim {self.config.condition_dim}")
        levels = torch.as_tensor(logsnr, device=sample.device).reshape(-1)
        if levels.numel() not in (1, batch):
            raise ValueError(f"logsnr must be one value or one per item ({batch}), got {levels.numel()}")
        logsnr = levels.expand(batch)
        context = encoder_hidden_states if encoder_hidden_states.ndim == 3 else encoder_hidden_states[:, None, :]
        context = context.to(sample.dtype)
        if encoder_attention_mask is None:
            pooled = context.mean(dim=1)
        else:
            weights = encoder_attention_mask.to(sample.dtype)[:, :, None]
            pooled = (context * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        # one noise level for the whole batch (as in sampling) is embedded once and broadcast
        conditioning = self.time_embedding(
            fourier_logsnr_embedding(levels, self.config.fourier_dim, self.config.logsnr_scale).to(sample.dtype)
        ) + self.condition_embedding(pooled)
        if self.structured_embedding is not None and structured_conditions is not None:
            conditioning = conditioning + self.structured_embedding(structured_conditions.to(sample.dtype))
        tokens = sample.reshape(batch, self.config.num_tokens, -1)
        x = self.input_projection(tokens) + self.position_embedding
        for block in self.blocks:
            x = block(x, conditioning, context, encoder_attention_mask)
        shift, scale = self.final_modulation(conditioning).chunk(2, dim=1)
        velocity = self.output_projection(_modulate(self.final_norm(x), shift, scale)).reshape(batch, -1)
        out = self._from_velocity(velocity, sample, logsnr)
        if not return_dict:
            return (out,)
        return EHRDenoiserOutput(sample=out)
