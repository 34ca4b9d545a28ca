"""The EHRDiff baseline's network: an MLP denoiser on the record vector itself, with EDM preconditioning.

EHRDiff (Yuan et al. 2023, "EHRDiff: Exploring realistic EHR synthesis with diffusion models", code at
https://github.com/sczzz3/EHRDiff) diffuses the binary patient vector directly, without an autoencoder, using the
preconditioning of EDM (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models"):

* the denoiser is D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)) with
  c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
  c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4, so that F's input and its target have unit
  variance at every noise level;
* the loss weight is lambda(sigma) = 1 / c_out^2 = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, which makes the
  effective target of F unit-weighted.

EHRDiff's MIMIC configuration, :meth:`EHRDiffMLP.ehrdiff_config`: sigma_data 0.14 (about the standard deviation of
a sparse 0/1 vector), sigma in [0.02, 80], a time embedding of width 384 and hidden layers (1024, 384, 384, 384,
1024), 4.7M parameters for 1,079 columns. :meth:`EHRDiffMLP.cpu_config` keeps the noise constants with three hidden
layers of 256, for training on a CPU in a minute or two. Differences from their network, all written here from the
papers:

* the noise level enters as sin/cos features of c_noise at log-spaced frequencies (1 to 100) instead of a
  transformer position embedding as wide as the data;
* each layer adds its projection of the time embedding after the linear map, and the input is not passed through
  an activation first (EHRDiff applies a ReLU to the scaled noisy input plus the time embedding, which clips the
  negative half of the noise); SiLU replaces ReLU; the output layer starts at zero, so that an untrained model is
  D = c_skip x, the exact denoiser of a point mass at 0;
* the model records its own preconditioning constants and which columns are continuous, so a saved model samples
  without its training configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .modeling_utils import SafetensorsModelMixin


@dataclass
class EHRDiffOutput(BaseOutput):
    """``sample``: the denoised record D(x; sigma), shaped like the input. None by default, as diffusers' outputs."""

    sample: torch.Tensor = None


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) at noise level ``sigma`` (Karras et al. 2022, Table 1)."""
    sigma = torch.as_tensor(sigma)
    variance = sigma**2 + sigma_data**2
    return sigma_data**2 / variance, sigma * sigma_data / variance.sqrt(), 1.0 / variance.sqrt(), sigma.log() / 4


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, i.e. 1 / c_out^2."""
    sigma = torch.as_tensor(sigma)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def noise_level_features(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """sin/cos of c_noise at ``dim / 2`` log-spaced angular frequencies from 1 to 100 (c_noise spans about
    [-1.6, 1.1] for sigma in [0.002, 80])."""
    frequencies = torch.exp(torch.linspace(0.0, math.log(100.0), dim // 2, device=c_noise.device))
    angles = c_noise.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class EHRDiffMLP(SafetensorsModelMixin, ModelMixin, ConfigMixin):
    """EDM-preconditioned MLP denoiser over the record vector (see the module docstring).

    Args:
        data_dim: width of the record vector (``EHRSchema.dim``).
        hidden_dims: widths of the hidden layers.
        time_dim: width of the noise-level embedding.
        fourier_dim: sin/cos features of c_noise fed to the embedding (even).
        sigma_data: the data's standard deviation assumed by the preconditioning.
        sigma_min, sigma_max: the noise range the model is sampled over.
        continuous_columns: vector columns holding continuous values in [0, 1] (age, admissions); every other
            column is 0/1 and is thresholded at 0.5 after sampling.
    """

    @register_to_config
    def __init__(
        self,
        data_dim: int,
        hidden_dims: Sequence[int] = (1024, 384, 384, 384, 1024),
        time_dim: int = 384,
        fourier_dim: int = 64,
        sigma_data: float = 0.14,
        sigma_min: float = 0.02,
        sigma_max: float = 80.0,
        continuous_columns: Sequence[int] = (),
    ):
        super().__init__()
        if data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim}")
        if not hidden_dims or min(hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be a non-empty list of positive widths, got {list(hidden_dims)}")
        if fourier_dim < 2 or fourier_dim % 2:
            raise ValueError(f"fourier_dim must be a positive even number, got {fourier_dim}")
        if not 0 < sigma_min < sigma_max or sigma_data <= 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and sigma_data > 0, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, sigma_data={sigma_data}")
        bad = [c for c in continuous_columns if not 0 <= c < data_dim]
        if bad:
            raise ValueError(f"continuous_columns must index the vector [0, {data_dim}), got {bad}")
        self.time_embedding = nn.Sequential(nn.Linear(fourier_dim, time_dim), nn.SiLU(),
                                            nn.Linear(time_dim, time_dim))
        widths = [data_dim, *hidden_dims]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.time_projections = nn.ModuleList(nn.Linear(time_dim, width) for width in hidden_dims)
        self.output = nn.Linear(hidden_dims[-1], data_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @classmethod
    def ehrdiff_config(cls, data_dim: int) -> dict[str, Any]:
        """EHRDiff's MIMIC widths and noise constants (configs/mimic/train_edm.yaml in their repository)."""
        return {"data_dim": data_dim, "hidden_dims": [1024, 384, 384, 384, 1024], "time_dim": 384,
                "sigma_data": 0.14, "sigma_min": 0.02, "sigma_max": 80.0}

    @classmethod
    def cpu_config(cls, data_dim: int) -> dict[str, Any]:
        """EHRDiff's noise constants with three hidden layers of 256 (0.8M parameters for 1,079 columns): trains in
        about a minute on one CPU core (4,000 steps of 256 rows); the wider :meth:`ehrdiff_config` needs about ten
        times longer for the same fidelity."""
        return {**cls.ehrdiff_config(data_dim), "hidden_dims": [256, 256, 256], "time_dim": 128}

    def network(self, scaled: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """F(c_in x, c_noise): the raw network output, before the skip connection."""
        time = self.time_embedding(noise_level_features(c_noise, self.config.fourier_dim).to(scaled.dtype))
        h = scaled
        for index, (layer, projection) in enumerate(zip(self.layers, self.time_projections)):
            h = layer(h if index == 0 else F.silu(h)) + projection(time)
        return self.output(F.silu(h))

    def forward(self, sample: torch.Tensor, sigma: torch.Tensor | float,
                return_dict: bool = True) -> EHRDiffOutput | tuple:
        """D(x; sigma) for ``sample`` (batch, data_dim) at ``sigma``: one value or one per row."""
        if sample.ndim != 2 or sample.shape[1] != self.config.data_dim:
            raise ValueError(f"sample must be (batch, {self.config.data_dim}), got {tuple(sample.shape)}")
        sigma = torch.as_tensor(sigma, dtype=sample.dtype, device=sample.device).reshape(-1)
        if sigma.numel() not in (1, sample.shape[0]):
            raise ValueError(f"sigma must be one value or one per row ({sample.shape[0]}), got {sigma.numel()}")
        if (sigma <= 0).any():
            raise ValueError("sigma must be positive")
        sigma = sigma.expand(sample.shape[0])
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.config.sigma_data)
        denoised = c_skip[:, None] * sample + c_out[:, None] * self.network(c_in[:, None] * sample, c_noise)
        if not return_dict:
            return (denoised,)
        return EHRDiffOutput(sample=denoised)
