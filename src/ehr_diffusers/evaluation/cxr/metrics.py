"""The figures of a predicted chest X-ray against the real next one, each computed the standard way.

* ``frechet_distance`` (FID, Heusel et al. 2017): the Frechet distance between Gaussians fitted to two feature sets,
  ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), the square root taken through symmetric eigenvalue
  decompositions (equal to ``sqrtm(S1 S2)``'s trace, without its complex round-off).
* ``kernel_inception_distance`` (KID, Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3; unbiased, so it does not grow with 1/n as FID does, which makes it the better figure at
  the few hundred images of a test split (CheXGenBench, arXiv 2505.10496, reports both). For two sets of one size
  it is Gretton et al. (2012)'s U-statistic, whose cross term also leaves out the pairs (x_i, y_i): a prediction
  and its own target are not independent draws.
* ``finding_auroc``: per finding, the AUROC of a score for the target study's label over the triplets of a subset:
  All, Diff (the finding's label changed between the previous and the target study) or Same (EHRXDiff, arXiv
  2409.07012, Table 2); micro pools every (triplet, finding) pair of the subset, macro averages the findings.
* ``direction_accuracy``: on Diff pairs, how often the score moved from the previous image to the prediction the way
  the label moved (up for an onset, down for a resolution), balanced over onsets and resolutions; no move counts one
  half, so a model that changes nothing, or pushes every score the same way, scores 0.5.
* ``ssim`` (Wang et al. 2004): structural similarity with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, images in [0, 1]; one value per image pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..stats import roc_auc

SUBSETS = ("all", "diff", "same")


def _gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"a feature set needs at least 2 rows of shape (n, d), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """FID between two feature sets (n, d) and (m, d); 0 for a set against itself."""
    mu1, sigma1 = _gaussian_statistics(first)
    mu2, sigma2 = _gaussian_statistics(second)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature widths differ: {mu1.shape[0]} and {mu2.shape[0]}")
    root = _psd_sqrt(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0.0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)
    return max(value, 0.0)


def kernel_inception_distance(first: np.ndarray, second: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Unbiased MMD^2 between two feature sets with the kernel (x.y / d + 1)^3; about 0 for samples of one
    distribution (it can be slightly negative).

    ``groups`` (one label per row, for two sets of one size whose row i belongs together, e.g. the subject of a
    prediction and of its target) leaves out every pair of rows of one group from all three terms: one patient's
    consecutive films share images (a target is the next triplet's previous image), and such pairs are not
    independent draws. Without it, sets of one size leave out the pairs (x_i, y_i) (Gretton et al. 2012's
    U-statistic)."""
    x, y = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"KID needs two feature sets (n >= 2, d) of one width, got shapes {x.shape} and {y.shape}")
    d, n, m = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    if groups is not None or n == m:
        if n != m:
            raise ValueError(f"groups need two sets of one size, got {n} and {m} rows")
        labels = np.asarray(groups) if groups is not None else np.arange(n)
        if len(labels) != n:
            raise ValueError(f"groups has {len(labels)} labels for {n} rows")
        keep = labels[:, None] != labels[None, :]
        pairs = int(keep.sum())
        if pairs == 0:
            raise ValueError("KID needs rows of at least two groups")
        return float((kxx[keep].sum() + kyy[keep].sum() - 2 * kxy[keep].sum()) / pairs)
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def subset_masks(previous: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean (n, findings) masks of the pairs in each subset, from binary previous and target labels."""
    previous, target = np.asarray(previous, dtype=bool), np.asarray(target, dtype=bool)
    if previous.shape != target.shape:
        raise ValueError(f"previous and target labels differ in shape: {previous.shape} and {target.shape}")
    diff = previous != target
    return {"all": np.ones_like(diff), "diff": diff, "same": ~diff}


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    positive, negative = scores[labels], scores[~labels]
    if len(positive) == 0 or len(negative) == 0:
        return None
    return roc_auc(positive, negative)


def finding_auroc(scores: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float | None | list]:
    """AUROC of ``scores`` (n, findings) for the binary ``target`` labels over the pairs in ``mask``: ``per_finding``
    (None where the subset holds one class only), ``micro`` (all pairs pooled) and ``macro`` (mean over the findings
    that have a value)."""
    scores, target, mask = np.asarray(scores, dtype=np.float64), np.asarray(target, dtype=bool), np.asarray(mask, bool)
    per_finding = [_auroc(scores[mask[:, j], j], target[mask[:, j], j]) for j in range(scores.shape[1])]
    values = [value for value in per_finding if value is not None]
    return {"per_finding": per_finding, "micro": _auroc(scores[mask], target[mask]),
            "macro": float(np.mean(values)) if values else None}


def direction_accuracy(predicted: np.ndarray, previous_scores: np.ndarray, previous_labels: np.ndarray,
                       target: np.ndarray) -> float | None:
    """Balanced accuracy of the direction of change on Diff pairs: the mean, over onsets and resolutions, of the
    share whose score moved the way the label did (ties one half), so that pushing every score one way scores 0.5
    whatever the mix of onsets and resolutions; None without Diff pairs."""
    previous_labels, target = np.asarray(previous_labels, dtype=bool), np.asarray(target, dtype=bool)
    move = np.sign(np.asarray(predicted, np.float64) - np.asarray(previous_scores, np.float64))
    shares = []
    for kind, wanted in ((~previous_labels & target, 1.0), (previous_labels & ~target, -1.0)):
        if kind.any():
            shares.append(float(((move[kind] == wanted) + 0.5 * (move[kind] == 0)).mean()))
    return float(np.mean(shares)) if shares else None


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(first: np.ndarray | torch.Tensor, second: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """SSIM of each pair of grayscale images (n, H, W) in [0, 1] (uint8 is divided by 255): one value per pair,
    the mean of the SSIM map over the valid (unpadded) window positions."""
    a, b = torch.as_tensor(np.asarray(first)), torch.as_tensor(np.asarray(second))
    if a.dtype != b.dtype:
        raise ValueError(f"SSIM needs two image stacks of one dtype, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"SSIM needs two image stacks of one shape (n, H, W), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for start in range(0, len(a), batch_size):
        x = a[start : start + batch_size, None].double()
        y = b[start : start + batch_size, None].double()
        if a.dtype == torch.uint8:
            x, y = x / 255.0, y / 255.0
        mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
        var_x = F.conv2d(x * x, window) - mu_x**2
        var_y = F.conv2d(y * y, window) - mu_y**2
        cov = F.conv2d(x * y, window) - mu_x * mu_y
        index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        values.append(index.mean(dim=(1, 2, 3)))
    return torch.cat(values).numpy() if values else np.zeros(0)


def subject_resamples(subjects: Sequence[int] | np.ndarray, reps: int, seed: int) -> list[np.ndarray]:
    """``reps`` cluster-bootstrap resamples of the rows: subjects drawn with replacement, each bringing all its rows
    (a patient's consecutive triplets share images and are not independent)."""
    _, inverse = np.unique(np.asarray(subjects), return_inverse=True)
    rows_of = [np.flatnonzero(inverse == group) for group in range(inverse.max() + 1)] if len(inverse) else []
    rng = np.random.default_rng(seed)
    return [np.concatenate([rows_of[group] for group in rng.integers(0, len(rows_of), len(rows_of))])
            for _ in range(reps)] if rows_of else []
