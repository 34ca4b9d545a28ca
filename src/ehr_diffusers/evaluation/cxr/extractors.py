"""Finding scorers, pluggable by name: each turns chest X-rays into features (the FID/KID space) and per-finding
probabilities (finding preservation), and says which model it is, so that every figure names what produced it.

* ``classifier`` (the offline default): :class:`~ehr_diffusers.evaluation.cxr.classifier.FindingClassifierModel`
  trained on the dataset's TRAIN split, validated on its validation split, saved with a card and its validation
  AUROC in a cache folder keyed by the dataset's fingerprint, and reused by later runs on the same dataset.
* a folder holding such a classifier (``save_classifier`` writes one).
* ``xrv`` (``densenet121-res224-all``): torchxrayvision's DenseNet-121, the choice of EHRXDiff (arXiv 2409.07012):
  FID on its 1024-d pooled features and its zero-shot findings. Needs ``pip install torchxrayvision`` and its
  weights, which the package downloads on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ...data.cxr.split import CXRSplit, load_cxr_split, load_dataset_dict, refuse_seen_subjects, training_record
from ...data.cxr.triplets import CHEXPERT_LABELS
from ...errors import ArgumentError
from ...io import atomic_directory

if TYPE_CHECKING:  # diffusers loads with the classifier, after the arguments are checked
    from .classifier import FindingClassifierModel

logger = logging.getLogger(__name__)

CLASSIFIER = "classifier"
XRV_NAMES = ("xrv", "densenet121-res224-all")
CLASSIFIER_METRICS_NAME = "classifier_metrics.json"
CACHE_ENV = "EHR_DIFFUSERS_CACHE"
# Findings with fewer train images on either side are not scored: their AUROC would rest on a handful of images.
MIN_IMAGES_PER_CLASS = 10
# Part of the cache key: a change of the recipe (architecture, augmentation, epochs) must not reuse old classifiers.
RECIPE = "finding-classifier-v1"
# torchxrayvision's names where they differ from CheXpert's
XRV_TO_CHEXPERT = {"Effusion": "Pleural Effusion"}


class FindingScorer(Protocol):
    name: str
    description: str
    source: str
    finding_names: list[str]
    image_size: int

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Features (n, d) and probabilities (n, findings) of uint8 grayscale images (n, S, S)."""


@dataclass
class ClassifierScorer:
    """The offline finding classifier as a scorer; ``figures`` are its training and validation figures."""

    model: FindingClassifierModel
    source: str
    figures: dict[str, Any] = field(default_factory=dict)
    name: str = CLASSIFIER

    @property
    def finding_names(self) -> list[str]:
        return list(self.model.config.finding_names)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def description(self) -> str:
        macro = self.figures.get("validation_macro_auroc")
        quality = f", validation macro AUROC {macro:.3f}" if isinstance(macro, float) else ""
        return (f"finding classifier trained on the dataset's train split ({self.model.feature_dim}-d penultimate "
                f"features for FID/KID{quality})")

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from .classifier import predict

        return predict(self.model, _resized(images, self.image_size))


@dataclass
class XRVScorer:
    """torchxrayvision's DenseNet-121 (``densenet121-res224-all``) at 224 px."""

    model: Any
    columns: list[int]
    finding_names: list[str]
    name: str = "densenet121-res224-all"
    image_size: int = 224
    description: str = ("torchxrayvision densenet121-res224-all (1024-d pooled features, zero-shot findings; trained "
                        "on public datasets that include MIMIC-CXR, so it may have seen the evaluated patients)")
    source: str = "torchxrayvision"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features, probabilities = [], []
        for start in range(0, len(images), 64):
            # xrv's input: one channel, 224 px, values scaled from [0, 255] to [-1024, 1024]
            pixels = _resized(images[start : start + 64], 224).float().unsqueeze(1) / 255.0 * 2048.0 - 1024.0
            features.append(self.model.features2(pixels).numpy())
            probabilities.append(self.model(pixels)[:, self.columns].numpy())
        return np.concatenate(features), np.concatenate(probabilities)


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = torch.nn.functional.interpolate(images[:, None].float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized[:, 0].round().clamp(0, 255).to(torch.uint8)


def image_labels(split: CXRSplit) -> np.ndarray:
    """Present findings (bool, distinct images x 14) of a split's distinct images, from the triplets' labels."""
    from .classifier import binary_findings

    if split.chexpert_previous is None or split.chexpert_target is None or split.images is None:
        raise ValueError("the split has no CheXpert labels (previous_chexpert / target_chexpert columns)")
    labels = np.zeros((len(split.images), len(CHEXPERT_LABELS)), dtype=bool)
    labels[split.previous_index] = binary_findings(split.chexpert_previous)
    labels[split.target_index] = binary_findings(split.chexpert_target)
    return labels


def cache_folder(dataset_dir: str | Path, image_size: int, seed: int = 0, epochs: int = 8) -> Path:
    """Where the classifier of this dataset's train and validation splits at ``image_size`` is kept: under
    ``$EHR_DIFFUSERS_CACHE`` (default ``~/.cache/ehr_diffusers``), keyed by the splits' fingerprints and the
    training's settings."""
    dataset = load_dataset_dict(dataset_dir)
    parts = [RECIPE, str(image_size), f"seed:{seed}", f"epochs:{epochs}"] + [
        f"{name}:{dataset[name]._fingerprint}" for name in ("train", "validation") if name in dataset]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ehr_diffusers")
    return root / "finding-classifiers" / key


def train_classifier_for(dataset_dir: str | Path, image_size: int, *, seed: int = 0, epochs: int = 8,
                         show_progress: bool = True) -> ClassifierScorer:
    """A classifier trained on the dataset's TRAIN split (findings with enough images of both classes), validated on
    its validation split when it has one. The test split is never read."""
    from .classifier import train_finding_classifier

    train = load_cxr_split(dataset_dir, "train", image_size, show_progress)
    present = image_labels(train)
    counts = present.sum(axis=0)
    keep = [j for j in range(present.shape[1])
            if counts[j] >= MIN_IMAGES_PER_CLASS and len(present) - counts[j] >= MIN_IMAGES_PER_CLASS]
    if not keep:
        raise ValueError(f"{dataset_dir}: no CheXpert finding has {MIN_IMAGES_PER_CLASS} train images with and "
                         "without it; the finding classifier cannot be trained")
    names = [CHEXPERT_LABELS[j] for j in keep]
    validation_images = validation_present = None
    if "validation" in load_dataset_dict(dataset_dir):
        validation = load_cxr_split(dataset_dir, "validation", image_size, show_progress)
        validation_images, validation_present = validation.images, image_labels(validation)[:, keep]
    model, figures = train_finding_classifier(train.images, present[:, keep], names, validation_images,
                                              validation_present, epochs=epochs, seed=seed,
                                              show_progress=show_progress)
    figures.update(dataset=str(dataset_dir), recipe=RECIPE, train_positives=dict(zip(names, counts[keep].tolist())),
                   train_subjects=training_record(dataset_dir, "train", train.subject_id)["subjects"]
                   if train.subject_id is not None else None)
    return ClassifierScorer(model, "trained now", figures)


def save_classifier(scorer: ClassifierScorer, folder: str | Path) -> Path:
    """The classifier (safetensors), its figures and a card, written whole or not at all."""
    folder = Path(folder)
    with atomic_directory(folder, overwrite=True) as work:
        scorer.model.save_pretrained(work)
        (work / CLASSIFIER_METRICS_NAME).write_text(json.dumps(scorer.figures, indent=2) + "\n")
        (work / "README.md").write_text(_card(scorer), encoding="utf-8")
    return folder


def _card(scorer: ClassifierScorer) -> str:
    figures = scorer.figures
    rows = "\n".join(f"| {name} | {figures.get('train_positives', {}).get(name, 'n/a')} | "
                     f"{_fmt(figures.get('validation_auroc', {}).get(name))} |" for name in scorer.finding_names)
    return (f"# Finding classifier for ehr-diffusers evaluate-cxr\n\n"
            f"A small CNN ({scorer.model.feature_dim}-d features) trained on the TRAIN split of "
            f"`{figures.get('dataset')}` "
            f"({figures.get('train_images')} images, {figures.get('epochs')} epochs, seed {figures.get('seed')}) to "
            "score CheXpert findings (1 and -1 present, 0 and blank absent). `evaluate-cxr` uses its probabilities "
            "for finding preservation and its penultimate features for FID and KID. It never saw the test split. "
            "It is an evaluation instrument for this dataset, not a diagnostic model.\n\n"
            f"Validation macro AUROC: {_fmt(figures.get('validation_macro_auroc'))} "
            f"({figures.get('validation_images', 0)} validation images).\n\n"
            "| finding | train images with it | validation AUROC |\n|---|---|---|\n" + rows + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def load_classifier(folder: str | Path) -> ClassifierScorer:
    """A classifier saved by :func:`save_classifier`."""
    from .classifier import FindingClassifierModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no finding classifier here (no config.json)")
    model = FindingClassifierModel.from_pretrained(folder, use_safetensors=True).eval()
    metrics = folder / CLASSIFIER_METRICS_NAME
    figures = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return ClassifierScorer(model, str(folder), figures)


def check_scorer_unseen(scorer: FindingScorer, subjects: np.ndarray, split: str) -> bool:
    """Raises ValueError when a finding classifier was trained on patients of the evaluated split; False when the
    scorer records no training subjects (torchxrayvision's, or an older classifier), True when checked."""
    trained = getattr(scorer, "figures", {}).get("train_subjects")
    if trained is None:
        return False
    refuse_seen_subjects(trained, subjects, split,
                         f"--extractor: the finding classifier ({getattr(scorer, 'source', scorer.name)})",
                         "train it on the dataset's train split")
    return True


def check_extractor_name(name: str) -> None:
    """Fails at once, before any model loads, on a name that is no scorer."""
    if name not in (CLASSIFIER, *XRV_NAMES) and not (Path(name) / "config.json").is_file():
        raise ArgumentError(f"--extractor {name}: not {CLASSIFIER!r}, 'xrv' or a folder holding a finding classifier "
                         "(its config.json)")


def load_xrv() -> XRVScorer:
    """torchxrayvision's ``densenet121-res224-all``, its outputs restricted to the CheXpert findings it scores."""
    try:
        import torchxrayvision as xrv
    except ImportError as error:
        raise ArgumentError("--extractor xrv needs torchxrayvision (pip install torchxrayvision) and its "
                         "densenet121-res224-all weights, which it downloads on first use") from error
    model = xrv.models.DenseNet(weights="densenet121-res224-all").eval()
    columns, names = [], []
    for column, pathology in enumerate(model.pathologies):
        name = XRV_TO_CHEXPERT.get(pathology, pathology)
        if name in CHEXPERT_LABELS:
            columns.append(column)
            names.append(name)
    return XRVScorer(model, columns, names)


def load_scorer(name: str, dataset_dir: str | Path, image_size: int, *, seed: int = 0,
                show_progress: bool = True) -> FindingScorer:
    """The scorer ``name``: "classifier" (trained once per dataset and cached), "xrv", or a classifier folder."""
    if name in XRV_NAMES:
        return load_xrv()
    if name != CLASSIFIER:
        if not Path(name).is_dir():
            raise ArgumentError(f"--extractor {name}: not {CLASSIFIER!r}, 'xrv' or a folder holding a finding "
                                "classifier")
        return load_classifier(name)
    folder = cache_folder(dataset_dir, image_size, seed)
    if (folder / "config.json").is_file():
        scorer = load_classifier(folder)
        scorer.source = f"cached in {folder}"
        logger.info("reusing the finding classifier in %s", folder)
        return scorer
    scorer = train_classifier_for(dataset_dir, image_size, seed=seed, show_progress=show_progress)
    save_classifier(scorer, folder)
    scorer.source = f"trained now, cached in {folder}"
    return scorer
