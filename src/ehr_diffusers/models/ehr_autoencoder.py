"""The EHR autoencoder: a patient vector (``data.ehr.schema.EHRSchema``) to a continuous latent and back to logits.

The diffusion model works in the latent space; the decoder turns generated latents back into records. Three things
that a plain autoencoder lacks are part of the model and saved with it:

* a loss per schema group that fits the group's kind: binary cross-entropy for binary fields and codes (summed over
  a group's columns), cross-entropy for one-hot groups, squared error for scaled continuous and count fields;
* latent normalisation statistics (``latent_mean``, ``latent_std``), fitted on the training split, so that the
  diffusion model sees unit-scale latents;
* a latent regulariser (``latent_regularization``): without one the decoder learns to read exact training latents,
  memorises training records and is nearly constant per code away from them, which is where generated latents land.
  "noise" trains the decoder on the latent plus Gaussian noise at ``latent_noise`` times each dimension's batch
  standard deviation; "kl" makes the encoder a Gaussian posterior with a ``kl_weight`` KL term to N(0, I) (a VAE,
  Kingma & Welling 2014). Either way the encoder's mean is the latent the diffusion model learns;
* per-column decision thresholds (``thresholds``) for binary fields and codes, calibrated on the training split so
  that decoded prevalence matches the data; the default decoding samples each code from its Bernoulli probability
  and each one-hot group from its softmax instead, which keeps the spread of codes per record (thresholds let a
  record in a dense latent region pass hundreds of them at once), and adds each continuous or count field's residual
  spread (``residual_std``, calibrated on the training split) to the decoder's prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from ..data.ehr.schema import SCHEMA_VERSION, EHRSchema
from .modeling_utils import SafetensorsModelMixin

GROUP_KINDS = ("binary", "continuous", "count", "one_hot", "multi_hot")
LATENT_REGULARIZATIONS = ("none", "noise", "kl")


@dataclass
class EHRAutoencoderOutput(BaseOutput):
    """``latent``: the encoder's (unnormalised) latent, its mean with ``latent_regularization="kl"``; ``logits``: the
    reconstruction, one column per vector column; ``kl``: the batch-mean KL term in training with "kl", else None.
    Fields default to None, as diffusers' outputs do, so that accelerate's mixed-precision wrapper can rebuild it."""

    latent: torch.Tensor = None
    logits: torch.Tensor = None
    kl: torch.Tensor = None


def _mlp(sizes: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear layers with LayerNorm, SiLU and dropout between them; the last layer is a bare Linear."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(sizes) - 2:
            layers += [nn.LayerNorm(width_out), nn.SiLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _uniform(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Uniform draws shaped like ``like``; with a list of generators, row i comes from generator i."""
    if isinstance(generator, list):
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {like.shape[0]} rows")
        return torch.stack([torch.rand(like.shape[1:], generator=g, device=g.device) for g in generator]).to(like)
    device = generator.device if generator is not None else like.device
    return torch.rand(like.shape, generator=generator, device=device).to(like)


def _categorical(probabilities: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One category per row, drawn by inverting the cumulative probabilities at the row's uniform draw ``(n, 1)``."""
    cumulative = probabilities.cumsum(dim=1)
    return (cumulative < uniform * cumulative[:, -1:]).sum(dim=1).clamp(max=probabilities.shape[1] - 1)


class EHRAutoencoderModel(SafetensorsModelMixin, ModelMixin, ConfigMixin):
    """MLP autoencoder over an ``EHRSchema`` vector.

    Args:
        groups: the schema's groups as ``{"name", "kind", "width"}`` dicts, in vector order (``from_schema`` fills it).
        latent_dim: size of the latent (HealthForge uses 1024).
        hidden_dim: width of the hidden layers.
        num_layers: hidden layers of the encoder and of the decoder.
        dropout: dropout between hidden layers.
        latent_regularization: "none", "noise" or "kl" (see the module docstring).
        latent_noise: with "noise", the decoder's input noise in units of each latent dimension's batch std.
        kl_weight: with "kl", the weight of the KL term against the reconstruction loss (summed nats per record).
    """

    @register_to_config
    def __init__(
        self,
        groups: list[dict[str, Any]] | None = None,
        latent_dim: int = 1024,
        hidden_dim: int = 2048,
        num_layers: int = 2,
        dropout: float = 0.1,
        latent_regularization: str = "none",
        latent_noise: float = 0.7,
        kl_weight: float = 0.02,
    ):
        super().__init__()
        if latent_regularization not in LATENT_REGULARIZATIONS:
            raise ValueError(f"latent_regularization must be one of {LATENT_REGULARIZATIONS}, got "
                             f"{latent_regularization!r}")
        if latent_noise < 0 or kl_weight < 0:
            raise ValueError(f"latent_noise ({latent_noise}) and kl_weight ({kl_weight}) must be 0 or more")
        groups = groups or [{"name": "values", "kind": "continuous", "width": 1}]
        for group in groups:
            if group["kind"] not in GROUP_KINDS:
                raise ValueError(f"group {group['name']!r} has kind {group['kind']!r}; expected one of {GROUP_KINDS}")
        self.input_dim = sum(int(group["width"]) for group in groups)
        self.slices: dict[str, slice] = {}
        start = 0
        for group in groups:
            self.slices[group["name"]] = slice(start, start + int(group["width"]))
            start += int(group["width"])
        sizes = [self.input_dim] + [hidden_dim] * num_layers + [latent_dim]
        # with "kl" the encoder's last layer gives the posterior's mean and log-variance side by side
        width = 2 if latent_regularization == "kl" else 1
        self.encoder = _mlp(sizes[:-1] + [latent_dim * width], dropout)
        self.decoder = _mlp(sizes[::-1], dropout)
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))
        self.register_buffer("thresholds", torch.full((self.input_dim,), 0.5))
        self.register_buffer("residual_std", torch.zeros(self.input_dim))

    @classmethod
    def from_schema(cls, schema: EHRSchema, **kwargs: Any) -> EHRAutoencoderModel:
        """A fresh model for vectors of ``schema``; its config keeps the schema's groups (categories and ranges, not
        the code titles), so that the model can decode records on its own (:meth:`schema`)."""
        groups = [{key: value for key, value in group.to_dict().items() if key != "titles"} for group in schema.groups]
        return cls(groups=groups, **kwargs)

    def schema(self) -> EHRSchema | None:
        """The record schema the model was built for, from its config; None for a model built from bare group sizes."""
        if not all("categories" in group or "minimum" in group for group in self.config.groups):
            return None
        return EHRSchema.from_dict({"schema_version": SCHEMA_VERSION, "groups": self.config.groups})

    def check_schema(self, schema: EHRSchema) -> None:
        """Raises a ValueError naming the first group where ``schema`` and this model's vector layout differ."""
        expected = [(g["name"], g["kind"], int(g["width"])) for g in self.config.groups]
        actual = [(g.name, g.kind, g.width) for g in schema.groups]
        for position in range(max(len(expected), len(actual))):
            mine = expected[position] if position < len(expected) else None
            theirs = actual[position] if position < len(actual) else None
            if mine != theirs:
                raise ValueError(f"schema does not match the autoencoder at group {position}: the schema has "
                                 f"{theirs}, the autoencoder was trained on {mine} (name, kind, width)")

    def _columns(self, kinds: Sequence[str]) -> torch.Tensor:
        """Boolean mask of the vector columns whose group is of one of ``kinds``."""
        mask = torch.zeros(self.input_dim, dtype=torch.bool, device=self.thresholds.device)
        for group in self.config.groups:
            if group["kind"] in kinds:
                mask[self.slices[group["name"]]] = True
        return mask

    # ------------------------------------------------------------------ the network
    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """The latent of each record: the encoder's output, or its posterior mean with "kl"."""
        return self.encoder(vectors)[:, : self.config.latent_dim]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    def forward(self, vectors: torch.Tensor, return_dict: bool = True) -> EHRAutoencoderOutput | tuple:
        """Encodes and decodes; in training mode the decoder reads the regularised latent (noised, or drawn from the
        posterior), in eval mode the latent itself."""
        encoded = self.encoder(vectors)
        latent = encoded[:, : self.config.latent_dim]
        decoder_input, kl = latent, None
        regularization = self.config.latent_regularization
        if regularization == "kl":
            log_variance = encoded[:, self.config.latent_dim :].clamp(-30.0, 20.0)
            kl = 0.5 * (latent.pow(2) + log_variance.exp() - 1.0 - log_variance).sum(dim=1).mean()
            if self.training:
                decoder_input = latent + torch.randn_like(latent) * (0.5 * log_variance).exp()
        elif regularization == "noise" and self.training and latent.shape[0] > 1:
            scale = self.config.latent_noise * latent.detach().std(dim=0, keepdim=True)
            decoder_input = latent + torch.randn_like(latent) * scale
        logits = self.decode(decoder_input)
        if not return_dict:
            return (latent, logits, kl)
        return EHRAutoencoderOutput(latent=latent, logits=logits, kl=kl)

    def normalize_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.latent_mean) / self.latent_std

    def denormalize_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.latent_std + self.latent_mean

    # ------------------------------------------------------------------ training
    def regularization_loss(self, kl: torch.Tensor | None) -> torch.Tensor | None:
        """The weighted KL term to add to the reconstruction loss ("kl"), None otherwise."""
        return None if kl is None else self.config.kl_weight * kl

    def loss(self, logits: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reconstruction loss (the sum over groups) and the loss of each group, each a mean over the batch."""
        per_group = {}
        for group in self.config.groups:
            where = self.slices[group["name"]]
            predicted, target = logits[:, where], vectors[:, where]
            if group["kind"] in ("binary", "multi_hot"):
                value = F.binary_cross_entropy_with_logits(predicted, target, reduction="none").sum(dim=1).mean()
            elif group["kind"] == "one_hot":
                value = F.cross_entropy(predicted, target.argmax(dim=1))
            else:
                value = F.mse_loss(predicted, target, reduction="none").sum(dim=1).mean()
            per_group[group["name"]] = value
        return torch.stack(list(per_group.values())).sum(), per_group

    @torch.no_grad()
    def fit_latent_statistics(self, latents: torch.Tensor) -> None:
        """Per-dimension mean and standard deviation of the training latents (std at least 1e-6)."""
        self.latent_mean.copy_(latents.mean(dim=0))
        self.latent_std.copy_(latents.std(dim=0).clamp(min=1e-6))

    @torch.no_grad()
    def calibrate_thresholds(self, probabilities: torch.Tensor, vectors: torch.Tensor) -> None:
        """Per binary/code column, the threshold at which as many rows decode to 1 as the data hold: the k-th largest
        predicted probability, k = the column's count of ones. A column with no ones never decodes to 1."""
        columns = self._columns(("binary", "multi_hot")).nonzero().squeeze(1)
        counts = vectors[:, columns].sum(dim=0).round().long()
        ordered = probabilities[:, columns].sort(dim=0, descending=True).values
        kth = ordered.gather(0, (counts - 1).clamp(min=0).unsqueeze(0)).squeeze(0)
        self.thresholds[columns] = torch.where(counts > 0, kth, torch.full_like(kth, 1.0 + 1e-6))

    @torch.no_grad()
    def calibrate_residuals(self, probabilities: torch.Tensor, vectors: torch.Tensor) -> None:
        """Per continuous or count column, the standard deviation of the data around the decoder's prediction on the
        training split. The decoder predicts a conditional mean, whose spread is smaller than the data's by exactly
        this residual variance (the law of total variance): sampled decoding adds it back, so that generated ages
        and admission counts keep the real spread instead of crowding around the middle."""
        columns = self._columns(("continuous", "count")).nonzero().squeeze(1)
        residual = vectors[:, columns].float() - probabilities[:, columns].float().clamp(0.0, 1.0)
        self.residual_std[columns] = residual.std(dim=0) if len(residual) > 1 else torch.zeros_like(columns).float()

    # ------------------------------------------------------------------ decoding
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid for binary fields and codes, softmax within one-hot groups; continuous values as they are."""
        out = logits.clone()
        for group in self.config.groups:
            where = self.slices[group["name"]]
            if group["kind"] in ("binary", "multi_hot"):
                out[:, where] = torch.sigmoid(logits[:, where])
            elif group["kind"] == "one_hot":
                out[:, where] = torch.softmax(logits[:, where], dim=1)
        return out

    def to_vectors(
        self,
        logits: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Logits -> schema vectors: binary fields and codes by the calibrated thresholds (or Bernoulli draws with
        ``sample``), one-hot groups by their most likely category (or a categorical draw), scaled values as predicted
        (or with Gaussian noise at the calibrated ``residual_std`` added, with ``sample``), clipped to [0, 1].
        ``EHRSchema.decode`` turns the result into records. With one generator per row, row i's draws depend only on
        generator i."""
        probabilities = self.probabilities(logits.float())
        vectors = torch.zeros_like(probabilities)
        # one uniform per column, drawn at once (one call per row's generator): a binary column is on below its
        # probability, a one-hot group takes the category at its first column's uniform
        uniform = _uniform(probabilities, generator) if sample else None
        for group in self.config.groups:
            where = self.slices[group["name"]]
            block = probabilities[:, where]
            if group["kind"] in ("binary", "multi_hot"):
                if sample:
                    vectors[:, where] = (uniform[:, where] < block).float()
                else:
                    vectors[:, where] = (block >= self.thresholds[where]).float()
            elif group["kind"] == "one_hot":
                chosen = _categorical(block, uniform[:, where.start : where.start + 1]) if sample \
                    else block.argmax(dim=1)
                vectors[:, where] = F.one_hot(chosen, block.shape[1]).float()
            else:
                if sample:  # a normal draw from the column's uniform, by the inverse normal CDF
                    normal = torch.special.ndtri(uniform[:, where].clamp(1e-7, 1.0 - 1e-7))
                    block = block + normal * self.residual_std[where]
                vectors[:, where] = block.clamp(0.0, 1.0)
        return vectors
