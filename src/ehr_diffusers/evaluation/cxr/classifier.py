"""The offline finding classifier: a small CNN trained on a triplet dataset's TRAIN split (never on test) to score
CheXpert findings on a chest X-ray. Its probabilities score finding preservation and its penultimate features
define the FID/KID space, in the roles that torchxrayvision's DenseNet-121 plays in EHRXDiff (arXiv 2409.07012).

A finding counts as present when CheXpert says 1 or -1 (the "U-Ones" policy of Irvin et al. 2019: an uncertain
mention is treated as positive); a blank label counts as absent. Training uses random shifts, contrast jitter and
blur, so that the scores follow findings rather than the sharpness that separates real images from decoded ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm

from ...data.cxr.split import to_pixels
from .metrics import finding_auroc

logger = logging.getLogger(__name__)


def binary_findings(labels: np.ndarray) -> np.ndarray:
    """CheXpert labels (1, 0, -1, blank) -> present (bool): 1 and -1 (U-Ones) are present, 0 and blank absent."""
    labels = np.asarray(labels)
    return (labels == 1) | (labels == -1)


class FindingClassifierModel(ModelMixin, ConfigMixin):
    """Convolution blocks halving the image each, global average pooling to ``feature_dim`` features, one logit per
    finding. ``finding_names`` records which CheXpert findings the logits are, in order."""

    @register_to_config
    def __init__(self, finding_names: Sequence[str] = (), image_size: int = 64, in_channels: int = 1,
                 block_out_channels: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.1) -> None:
        super().__init__()
        if not finding_names:
            raise ValueError("finding_names must name at least one finding")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in block_out_channels:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU()]
            channels = width
        self.encoder = nn.Sequential(*layers)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, len(finding_names))

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (B, feature_dim) of images (B, C, S, S) in [-1, 1]."""
        return self.encoder(pixels).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """One logit per finding (B, findings)."""
        return self.head(self.head_dropout(self.features(pixels)))


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts of up to 1/16 of the side, contrast and brightness jitter, and a 3x3 blur on a third of the images."""
    batch, _, size, _ = pixels.shape
    shift = max(1, size // 16)
    padded = nn.functional.pad(pixels, (shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    pixels = padded[:, :, dy : dy + size, dx : dx + size]
    scale = 1 + 0.15 * (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1)
    offset = 0.1 * (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1)
    pixels = pixels * scale + offset
    blurred = nn.functional.avg_pool2d(nn.functional.pad(pixels, (1,) * 4, mode="replicate"), 3, stride=1)
    choose = torch.rand(batch, 1, 1, 1, generator=generator) < 1 / 3
    return torch.where(choose, blurred, pixels).clamp(-1, 1)


@torch.no_grad()
def predict(model: FindingClassifierModel, images: torch.Tensor, batch_size: int = 256
            ) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, feature_dim) and finding probabilities (n, findings) of uint8 images (n, S, S)."""
    model.eval()
    features, probabilities = [], []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start : start + batch_size])
        pooled = model.features(pixels)
        features.append(pooled.numpy())
        probabilities.append(torch.sigmoid(model.head(pooled)).numpy())
    width = model.feature_dim
    return (np.concatenate(features) if features else np.zeros((0, width), np.float32),
            np.concatenate(probabilities) if probabilities else np.zeros((0, len(model.config.finding_names))))


def train_finding_classifier(train_images: torch.Tensor, train_present: np.ndarray, finding_names: Sequence[str],
                             validation_images: torch.Tensor | None = None,
                             validation_present: np.ndarray | None = None, *, epochs: int = 8,
                             batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
                             show_progress: bool = True) -> tuple[FindingClassifierModel, dict]:
    """Trains a classifier on uint8 images (n, S, S) and their present findings (n, findings) with a
    positive-weighted binary cross-entropy (rare findings are not drowned by the frequent ones). Returns the model
    (eval mode) and its figures on the validation images, when given: per-finding AUROC and their mean."""
    if len(train_images) != len(train_present):
        raise ValueError(f"{len(train_images)} training images but {len(train_present)} label rows")
    if len(train_images) < 2:
        raise ValueError("the finding classifier needs at least 2 training images")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = FindingClassifierModel(finding_names=list(finding_names), image_size=int(train_images.shape[-1]))
    targets = torch.as_tensor(np.asarray(train_present, dtype=np.float32))
    positives = targets.sum(dim=0).clamp(min=1)
    pos_weight = ((len(targets) - positives) / positives).clamp(max=20.0)
    loss_function = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * ((len(train_images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    progress = tqdm(total=steps, desc="finding classifier", disable=not show_progress)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            pixels = _augment(to_pixels(train_images[rows]), generator)
            loss = loss_function(model(pixels), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
    model.eval()
    figures: dict = {"train_images": int(len(train_images)), "epochs": epochs, "seed": seed}
    if validation_images is not None and validation_present is not None and len(validation_images):
        _, probabilities = predict(model, validation_images)
        present = np.asarray(validation_present, dtype=bool)
        auroc = finding_auroc(probabilities, present, np.ones_like(present))
        figures.update(validation_images=int(len(validation_images)),
                       validation_auroc=dict(zip(finding_names, auroc["per_finding"])),
                       validation_macro_auroc=auroc["macro"])
        logger.info("finding classifier: validation macro AUROC %s", figures["validation_macro_auroc"])
    return model, figures
