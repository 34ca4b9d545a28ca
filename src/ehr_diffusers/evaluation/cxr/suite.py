"""One scored run of an EHRXDiff model on one split of a triplet dataset: the model's predictions with the true
events, with the events shuffled between triplets and with no events, the baselines, and every figure with a 95%
cluster-bootstrap interval over the split's subjects.

Methods, one row each in the table (``METHODS``):

* the model with each triplet's own events, then the same model, the same previous images and the same starting
  noise with another triplet's events (a seeded derangement: never a triplet's own) and with none. The event effect
  is the difference, given with its own paired interval;
* the previous image as the prediction, and the previous study's labels copied (EHRXDiff's baselines, arXiv
  2409.07012);
* the events-only classifier (:mod:`.baselines`): what the events alone predict about the target's findings;
* the real target image through the same scorer: the ceiling that the scorer's own errors leave.

Figures (:mod:`.metrics`): FID and KID against the target images in the scorer's feature space (a resample with
repeated images inflates them, so their interval is the normal bootstrap interval around the estimate), SSIM to
the target, AUROC of the target's findings per finding and micro/macro over All / Diff / Same, and the direction of
change on Diff. A figure that cannot be computed is None with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...data.cxr.split import CXRSplit
from ..stats import figure, normal_interval
from .baselines import events_only_scores
from .classifier import binary_findings
from .controls import derangement
from .metrics import (
    SUBSETS,
    direction_accuracy,
    finding_auroc,
    frechet_distance,
    kernel_inception_distance,
    ssim,
    subject_resamples,
    subset_masks,
)

logger = logging.getLogger(__name__)

METHODS = ("model", "shuffled_events", "no_events", "previous_image", "previous_labels", "events_only",
           "target_image")
METHOD_LABELS = {"model": "model (true events)", "shuffled_events": "model, shuffled events",
                 "no_events": "model, no events", "previous_image": "previous image",
                 "previous_labels": "previous labels", "events_only": "events-only classifier",
                 "target_image": "target image (scorer ceiling)"}
EVENT_CONDITIONS = {"model": "true", "shuffled_events": "shuffled", "no_events": "none"}
PREDICTED = tuple(EVENT_CONDITIONS)
IMAGE_METHODS = (*PREDICTED, "previous_image")
FIGURE_LABELS = {
    "auroc_micro_diff": "AUROC micro, Diff", "auroc_macro_diff": "AUROC macro, Diff",
    "direction_diff": "direction of change, Diff", "auroc_micro_same": "AUROC micro, Same",
    "auroc_macro_same": "AUROC macro, Same", "auroc_micro_all": "AUROC micro, All",
    "auroc_macro_all": "AUROC macro, All", "fid": "FID", "kid": "KID", "ssim": "SSIM to the target",
}
BETTER = {"fid": "lower", "kid": "lower"}
DISTANCES = ("fid", "kid")
CONTRASTS = (("model", "shuffled_events"), ("model", "no_events"))
CONTRAST_FIGURES = ("auroc_micro_diff", "direction_diff", "auroc_micro_all")


def predict_images(pipe: Any, split: CXRSplit, events: str, *, permutation: np.ndarray | None = None,
                   num_inference_steps: int = 25, guidance_scale: float = 1.0, eta: float = 1.0, seed: int = 0,
                   batch_size: int = 64, show_progress: bool = True) -> torch.Tensor:
    """uint8 predictions (n, S, S) of every triplet of ``split`` with its own events ("true"), with the events of
    triplet ``permutation[i]`` ("shuffled") or with none ("none"). Triplet i starts from the noise of seed
    ``seed + i`` whatever the events, so the conditions differ by the events only."""
    if events not in ("true", "shuffled", "none"):
        raise ValueError(f"events must be 'true', 'shuffled' or 'none', got {events!r}")
    if events == "shuffled" and permutation is None:
        raise ValueError("shuffled events need a permutation")
    n, dim = len(split), split.event_dim
    source = permutation if events == "shuffled" else np.arange(n)
    empty_embeddings, empty_hours = np.zeros((0, dim), np.float32), np.zeros(0, np.float32)
    outputs = []
    for start in tqdm(range(0, n, batch_size), desc=f"predicting ({events} events)", disable=not show_progress):
        rows = range(start, min(start + batch_size, n))
        embeddings = [empty_embeddings if events == "none" else split.event_embeddings[source[i]] for i in rows]
        hours = [empty_hours if events == "none" else split.event_hours[source[i]] for i in rows]
        generators = [torch.Generator().manual_seed(seed + i) for i in rows]
        # without events the guided and the unguided noise predictions coincide (eps_events = eps_null): sample once
        images = pipe(list(split.previous[start : start + len(rows)].numpy()), event_embeddings=embeddings,
                      event_hours=hours, num_inference_steps=num_inference_steps,
                      guidance_scale=1.0 if events == "none" else guidance_scale, eta=eta, generator=generators,
                      output_type="np").images
        outputs.append(torch.from_numpy((np.asarray(images)[..., 0] * 255.0).round().clip(0, 255).astype(np.uint8)))
    return torch.cat(outputs) if outputs else torch.zeros((0, *split.previous.shape[1:]), dtype=torch.uint8)


def _scores_figures(scores: np.ndarray, target: np.ndarray, masks: Mapping[str, np.ndarray]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for subset in SUBSETS:
        result = finding_auroc(scores, target, masks[subset])
        values[f"auroc_micro_{subset}"] = result["micro"]
        values[f"auroc_macro_{subset}"] = result["macro"]
    return values


class _Inputs:
    """Everything the figures are computed from, row-aligned with the split."""

    def __init__(self, scores: dict[str, np.ndarray], features: dict[str, np.ndarray],
                 similarity: dict[str, np.ndarray], previous: np.ndarray, target: np.ndarray,
                 subjects: np.ndarray) -> None:
        self.scores, self.features, self.similarity = scores, features, similarity
        self.previous, self.target, self.subjects = previous, target, subjects

    def figures(self, rows: np.ndarray) -> dict[str, dict[str, float | None]]:
        """Every figure of every method over ``rows`` (a resample may repeat rows)."""
        previous, target = self.previous[rows], self.target[rows]
        masks = subset_masks(previous, target)
        target_features = self.features["target_image"][rows]
        out: dict[str, dict[str, float | None]] = {name: {} for name in FIGURE_LABELS}
        for method, scores in self.scores.items():
            for name, value in _scores_figures(scores[rows], target, masks).items():
                out[name][method] = value
        for method in IMAGE_METHODS:
            features = self.features[method][rows]
            out["fid"][method] = frechet_distance(features, target_features)
            subjects = self.subjects[rows]
            out["kid"][method] = (kernel_inception_distance(features, target_features, subjects)
                                  if len(np.unique(subjects)) > 1 else None)
            out["ssim"][method] = float(self.similarity[method][rows].mean())
        for method in (*IMAGE_METHODS, "target_image"):
            out["direction_diff"][method] = direction_accuracy(self.scores[method][rows],
                                                               self.scores["previous_image"][rows], previous, target)
        return out


def _interval(name: str, estimate: float | None, replicates: list[float | None]) -> tuple[Any, str | None]:
    if estimate is None:
        return None, None
    if any(value is None for value in replicates) or len(replicates) < 2:
        return None, "a bootstrap resample had no value (too few subjects with the subset's classes)"
    if name in DISTANCES:
        return normal_interval(estimate, replicates, (0.0, np.inf) if name == "fid" else (-np.inf, np.inf)), None
    low, high = np.quantile(np.asarray(replicates, dtype=np.float64), [0.025, 0.975])
    return (float(low), float(high)), None


def score_methods(split: CXRSplit, finding_names: Sequence[str], finding_columns: Sequence[int],
                  encode: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]],
                  predictions: Mapping[str, torch.Tensor], events_only: np.ndarray, *, reps: int = 200,
                  seed: int = 0, split_name: str = "test", show_progress: bool = True) -> dict[str, Any]:
    """The figures of every method (``METHODS``) on ``split`` with cluster-bootstrap intervals over subjects.

    ``encode`` is the scorer (features and probabilities of uint8 images, the probabilities' columns
    ``finding_names``); ``finding_columns`` are those findings' columns in the CheXpert label order; ``predictions``
    hold the model's images per condition of ``EVENT_CONDITIONS``; ``events_only`` the events-only probabilities."""
    if split.chexpert_previous is None or split.chexpert_target is None:
        raise ValueError("the split has no CheXpert labels: finding preservation cannot be scored")
    columns = list(finding_columns)
    previous = binary_findings(split.chexpert_previous)[:, columns]
    target = binary_findings(split.chexpert_target)[:, columns]
    features, scores, similarity = {}, {}, {}
    images = {**predictions, "previous_image": split.previous, "target_image": split.target}
    for method, stack in tqdm(images.items(), desc="scoring images", disable=not show_progress):
        features[method], scores[method] = encode(stack)
        if method != "target_image":
            similarity[method] = ssim(stack, split.target)
    scores["previous_labels"] = previous.astype(np.float64)
    scores["events_only"] = np.asarray(events_only, dtype=np.float64)
    subjects = split.subject_id if split.subject_id is not None else np.arange(len(split))
    inputs = _Inputs(scores, features, similarity, previous, target, subjects)
    point = inputs.figures(np.arange(len(split)))
    resamples = subject_resamples(subjects, reps, seed)
    replicates = [inputs.figures(rows) for rows in tqdm(resamples, desc="bootstrap over subjects",
                                                         disable=not show_progress)]
    method = f"percentile cluster bootstrap over {len(np.unique(subjects))} subjects, {reps} resamples"
    distance_method = f"normal cluster bootstrap over {len(np.unique(subjects))} subjects, {reps} resamples"
    figures: dict[str, dict[str, Any]] = {}
    for name in FIGURE_LABELS:
        figures[name] = {}
        for row in METHODS:
            if row not in point[name]:
                continue
            estimate = point[name][row]
            ci, reason = _interval(name, estimate, [replicate[name][row] for replicate in replicates])
            if estimate is None:
                reason = "no value on this subset (it holds one class only)"
            figures[name][row] = figure(estimate, split_name, ci, distance_method if name in DISTANCES else method,
                                        reason=reason)
    contrasts = {}
    for first, second in CONTRASTS:
        for name in CONTRAST_FIGURES:
            a, b = point[name].get(first), point[name].get(second)
            if a is None or b is None:
                continue
            differences = [None if r[name][first] is None or r[name][second] is None else r[name][first] -
                           r[name][second] for r in replicates]
            ci, reason = _interval(name, a - b, differences)
            contrasts[f"{name}: {first} - {second}"] = figure(a - b, split_name, ci, f"paired {method}",
                                                              reason=reason)
    masks = subset_masks(previous, target)
    per_finding = {method_name: {subset: finding_auroc(scores[method_name], target, masks[subset])["per_finding"]
                                 for subset in SUBSETS} for method_name in METHODS}
    return {"figures": figures, "contrasts": contrasts, "per_finding": per_finding,
            "pairs": {subset: masks[subset].sum(axis=0).tolist() for subset in SUBSETS},
            "positives": {"previous": previous.sum(axis=0).tolist(), "target": target.sum(axis=0).tolist()},
            "onsets": (~previous & target).sum(axis=0).tolist(),
            "resolutions": (previous & ~target).sum(axis=0).tolist(),
            "findings": list(finding_names), "triplets": len(split), "subjects": int(len(np.unique(subjects))),
            "_scores": scores, "_labels": (previous, target)}


def goals(figures: Mapping[str, Mapping[str, Any]], contrasts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The evaluation goals, each met or not with the figures it rests on: Diff micro AUROC above the previous image,
    the previous labels and the model with shuffled or no events, with non-overlapping intervals against shuffled
    events (and, the more powerful test, a paired difference whose interval is above 0), and against the events-only
    classifier, FID and KID below the previous image, Same AUROC within 0.05 of the previous labels (1.0
    by construction, so the scorer's own errors count against the model) and of the previous image through the same
    scorer, direction of change better than chance and than with shuffled events."""
    def value(name: str, method: str) -> float | None:
        return (figures.get(name, {}).get(method) or {}).get("value")

    def ci(name: str, method: str) -> list[float] | None:
        return (figures.get(name, {}).get(method) or {}).get("ci95")

    def above_zero(name: str) -> tuple[bool, str]:
        contrast = contrasts.get(name) or {}
        interval = contrast.get("ci95")
        return bool(interval and interval[0] > 0), f"{name} {contrast.get('value')} {interval}"

    rows = []
    model = value("auroc_micro_diff", "model")
    baselines = [m for m in ("previous_image", "previous_labels", "shuffled_events", "no_events")
                 if value("auroc_micro_diff", m) is not None]
    above = model is not None and all(model > value("auroc_micro_diff", m) for m in baselines)
    model_ci, shuffled_ci = ci("auroc_micro_diff", "model"), ci("auroc_micro_diff", "shuffled_events")
    separate = bool(model_ci and shuffled_ci and model_ci[0] > shuffled_ci[1])
    rows.append({"goal": "Diff micro AUROC above every baseline, CI apart from shuffled events",
                 "met": bool(above and separate),
                 "detail": f"model {model}; " + ", ".join(f"{m} {value('auroc_micro_diff', m)}" for m in baselines)
                           + f"; CIs model {model_ci}, shuffled {shuffled_ci}"})
    met, detail = above_zero("auroc_micro_diff: model - shuffled_events")
    rows.append({"goal": "Diff micro AUROC: true minus shuffled events above 0 (paired interval)", "met": met,
                 "detail": detail})
    events_only = value("auroc_micro_diff", "events_only")
    rows.append({"goal": "Diff micro AUROC at least the events-only classifier's (the image carries what the "
                         "events say)",
                 "met": model is not None and events_only is not None and model >= events_only,
                 "detail": f"model {model}, events-only classifier {events_only}"})
    for name in DISTANCES:
        mine, previous = value(name, "model"), value(name, "previous_image")
        rows.append({"goal": f"{FIGURE_LABELS[name]} below the previous-image baseline",
                     "met": mine is not None and previous is not None and mine < previous,
                     "detail": f"model {mine}, previous image {previous}"})
    same = value("auroc_micro_same", "model")
    for baseline in ("previous_labels", "previous_image"):
        reference = value("auroc_micro_same", baseline)
        rows.append({"goal": f"Same micro AUROC within 0.05 of the {METHOD_LABELS[baseline]}",
                     "met": same is not None and reference is not None and same >= reference - 0.05,
                     "detail": f"model {same}, {METHOD_LABELS[baseline]} {reference}"})
    direction = ci("direction_diff", "model")
    rows.append({"goal": "direction of change on Diff better than chance (CI above 0.5)",
                 "met": bool(direction and direction[0] > 0.5),
                 "detail": f"model {value('direction_diff', 'model')} {direction}"})
    met, detail = above_zero("direction_diff: model - shuffled_events")
    rows.append({"goal": "direction of change: true minus shuffled events above 0 (paired interval)", "met": met,
                 "detail": detail})
    return rows


def evaluate_ehrxdiff(pipe: Any, split: CXRSplit, train: CXRSplit, scorer: Any, *, num_inference_steps: int = 25,
                      guidance_scale: float = 1.0, eta: float = 1.0, seed: int = 0, reps: int = 200,
                      batch_size: int = 64, split_name: str = "test", show_progress: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Predictions under the three event conditions, the baselines, and every figure (see the module docstring).
    Returns the metrics (JSON-ready) and the arrays the report draws (predicted images, scores)."""
    from ...data.cxr.triplets import CHEXPERT_LABELS

    unknown = [name for name in scorer.finding_names if name not in CHEXPERT_LABELS]
    if unknown:
        raise ValueError(f"the scorer's findings {unknown} are not CheXpert labels")
    columns = [CHEXPERT_LABELS.index(name) for name in scorer.finding_names]
    shuffle = "derangement across subjects (no triplet gets events of its own subject)"
    try:
        permutation = derangement(len(split), seed, split.subject_id)
    except ValueError as error:  # one subject holds more than half the split: a small or odd split
        logger.warning("%s; shuffling across triplets instead", error)
        permutation = derangement(len(split), seed)
        shuffle = f"derangement across triplets ({error})"
    sampling = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "eta": eta,
                "seed": seed, "batch_size": batch_size}
    predictions = {method: predict_images(pipe, split, condition, permutation=permutation,
                                          show_progress=show_progress, **sampling)
                   for method, condition in EVENT_CONDITIONS.items()}
    if train.chexpert_target is None:
        raise ValueError("the train split has no CheXpert labels: the events-only baseline cannot be fitted")
    events_only = events_only_scores(train.event_embeddings, binary_findings(train.chexpert_target)[:, columns],
                                     split.event_embeddings, split.event_dim)
    scored = score_methods(split, scorer.finding_names, columns, scorer.encode, predictions, events_only, reps=reps,
                           seed=seed, split_name=split_name, show_progress=show_progress)
    scores, labels = scored.pop("_scores"), scored.pop("_labels")
    scored["goals"] = goals(scored["figures"], scored["contrasts"])
    scored["sampling"] = sampling
    scored["shuffle"] = {"kind": shuffle, "seed": seed}
    return scored, {"predictions": predictions, "scores": scores, "permutation": permutation, "labels": labels}
