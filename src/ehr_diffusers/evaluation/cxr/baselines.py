"""The events-only baseline: what the events alone say about the target study's findings. A predicted image should
carry at least that much, since it sees the same events and the previous image besides.

One L2-regularised logistic regression per finding (scikit-learn) on a fixed summary of each triplet's events: the
mean and the element-wise maximum of the event embeddings (the maximum keeps a single decisive event, such as a
thoracentesis among a hundred vital signs, that the mean would dilute) and the log of the event count. It is fitted
on the TRAIN split and scores the evaluated split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def event_summary(embeddings: Sequence[np.ndarray], dim: int) -> np.ndarray:
    """(n, 2 dim + 1): mean and maximum of each triplet's event embeddings and log(1 + count); zeros without events."""
    rows = np.zeros((len(embeddings), 2 * dim + 1), dtype=np.float32)
    for row, events in enumerate(embeddings):
        events = np.asarray(events, dtype=np.float32).reshape(-1, dim)
        if len(events):
            rows[row, :dim] = events.mean(axis=0)
            rows[row, dim : 2 * dim] = events.max(axis=0)
        rows[row, -1] = np.log1p(len(events))
    return rows


def events_only_scores(train_embeddings: Sequence[np.ndarray], train_present: np.ndarray,
                       embeddings: Sequence[np.ndarray], dim: int, regularisation: float = 0.1) -> np.ndarray:
    """Probabilities (n, findings) of each finding in the target study from the events alone; a finding with one
    class only in train gets its train rate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x = event_summary(train_embeddings, dim)
    scaler = StandardScaler().fit(train_x)
    train_x, x = scaler.transform(train_x), scaler.transform(event_summary(embeddings, dim))
    train_present = np.asarray(train_present, dtype=bool)
    scores = np.empty((len(x), train_present.shape[1]), dtype=np.float64)
    for column in range(train_present.shape[1]):
        target = train_present[:, column]
        if target.all() or not target.any():
            scores[:, column] = target.mean()
            continue
        model = LogisticRegression(C=regularisation, max_iter=2000).fit(train_x, target)
        scores[:, column] = model.predict_proba(x)[:, 1]
    return scores
