"""Optional retrieval augmentation of event embeddings with an exact FAISS index (``pip install
'ehr-diffusers[retrieval]'``).

An EHR event between two chest X-rays is rendered as a short text and embedded as one unit-norm vector ``e_i``.
On its own that vector only knows its own text; retrieval augmentation mixes in the vectors of similar texts from a
corpus, either the training set's event texts (:func:`build_event_index`, ``source="events:train"``) or a supplied
knowledge list (:func:`load_knowledge`), so that rare events borrow context from related ones. With it off, the
event vectors are used as they are; :func:`augment` with ``weight=0`` is exactly that, so both settings can be
compared through one flag.

How an event is enriched (:func:`augment`), with corpus vectors ``c_j`` (unit norm) in a
:class:`RetrievalIndex`:

1. Neighbours: the ``k`` corpus entries with the highest cosine ``s_ij = e_i . c_j`` (an exact inner-product search,
   ``faiss.IndexFlatIP``; on unit vectors inner product is cosine). With ``exclude_self`` (for a corpus built from
   the event texts themselves) every entry with ``s_ij >= 1 - 1e-5`` is skipped: that is the event's own text
   (:func:`build_event_index` stores each distinct text once), and the next entries take its place.
2. Weights: a softmax over those neighbours, ``w_ij = exp(s_ij / temperature) / sum_l exp(s_il / temperature)``.
3. Mixture: ``r_i = normalize((1 - weight) * e_i + weight * sum_j w_ij c_j)`` with ``normalize(x) = x / ||x||_2``.

If fewer than ``k`` neighbours exist, the sums run over those found; an event with none (the corpus holds only its
own text) gets ``r_i = e_i``, as does one whose mixture is the zero vector. ``weight = 0`` returns the input
unchanged (a float32 copy) without searching. The result has the input's shape, float32, unit-norm rows.
Defaults: ``k = 4``, ``weight = 0.5``, ``temperature = 0.05`` (a cosine gap of 0.05 weighs a neighbour e times less).

An index is saved without pickle: ``index.faiss`` (``faiss.write_index``), ``texts.jsonl`` (one ``{"text": ...}``
per line, in index order) and ``config.json`` (dim, count, source, metric, faiss version).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from ..io import read_user_text

if TYPE_CHECKING:
    from .embed import SentenceEmbedder

logger = logging.getLogger(__name__)

SELF_MATCH_MIN_COSINE = 1.0 - 1e-5
"""A neighbour at least this similar to the query is the query's own text; ``exclude_self`` skips it. Not 1: the
same text embedded in a differently padded batch drifts by up to ~5e-7 in cosine (measured with MiniLM)."""

INDEX_FILE = "index.faiss"
TEXTS_FILE = "texts.jsonl"
CONFIG_FILE = "config.json"

_NORM_TOLERANCE = 1e-3  # how far from 1 a row's norm may be: embedders normalise in float32 or lower precision
_METRIC = "inner_product"


def _import_faiss() -> Any:
    """faiss is an optional dependency: imported only when an index is built, searched or loaded."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("retrieval augmentation needs faiss-cpu: pip install 'ehr-diffusers[retrieval]'") from error
    return faiss


def _as_unit_matrix(array: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 ``(n, dim)`` view or copy, as FAISS needs; unit-norm finite rows, or a ValueError."""
    matrix = np.ascontiguousarray(array, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {matrix.shape}")
    if dim is not None and matrix.shape[1] != dim:
        raise ValueError(f"{name} has dimension {matrix.shape[1]}, the index has {dim}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(matrix, axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if off.size:
        raise ValueError(
            f"{name} row {off[0]} has norm {norms[off[0]]:.4g}; retrieval needs unit-norm rows (cosine = inner product)"
        )
    return matrix


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class RetrievalIndex:
    """Corpus texts and an exact inner-product FAISS index over their unit-norm embeddings.

    Exact search (``IndexFlatIP``) keeps results reproducible and needs no training; corpora here are event texts or
    a knowledge list, small enough for brute force. Build with :meth:`build` or :func:`build_event_index`; persist
    with :meth:`save` / :meth:`load`.
    """

    def __init__(self, index: Any, texts: Sequence[str], source: str) -> None:
        faiss = _import_faiss()
        if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"index must be an exact inner-product FAISS index (IndexFlatIP), got {type(index)}")
        if index.ntotal != len(texts):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(texts)} texts were given")
        self._index = index
        self.texts: tuple[str, ...] = tuple(texts)
        self.source = source

    @property
    def dim(self) -> int:
        """Length of an embedding."""
        return int(self._index.d)

    @property
    def count(self) -> int:
        """Number of corpus entries."""
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"RetrievalIndex(count={self.count}, dim={self.dim}, source={self.source!r})"

    @classmethod
    def build(cls, texts: Sequence[str], embeddings: np.ndarray, *, source: str) -> RetrievalIndex:
        """Indexes ``embeddings`` (float32 ``(n, d)``, unit-norm rows, row ``i`` embeds ``texts[i]``).

        ``source`` records where the corpus came from (``"events:train"``, a knowledge file path) for provenance.
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, not a single string")
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{position}] is {type(text).__name__}, not str")
        if not isinstance(source, str) or not source:
            raise ValueError(f"source must be a non-empty string, got {source!r}")
        matrix = _as_unit_matrix(embeddings, "embeddings")
        if matrix.shape[0] != len(texts):
            raise ValueError(f"embeddings has {matrix.shape[0]} rows but texts has {len(texts)} entries")
        if not len(texts):
            raise ValueError("texts is empty: a retrieval corpus needs at least one entry")
        faiss = _import_faiss()
        index = faiss.IndexFlatIP(matrix.shape[1])
        index.add(matrix)
        logger.info("Built a retrieval index over %d texts (dim %d) from %s", index.ntotal, index.d, source)
        return cls(index, texts, source)

    def vectors(self, indices: np.ndarray) -> np.ndarray:
        """The stored embeddings of corpus rows ``indices`` (any shape of row numbers in ``[0, count)``), float32
        ``(*indices.shape, dim)``; read from FAISS's storage so the corpus is held in memory once."""
        rows = np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise ValueError(f"indices must lie in [0, {self.count}), got values from {rows.min()} to {rows.max()}")
        return self._index.reconstruct_batch(rows.ravel()).reshape(*rows.shape, self.dim)

    def search(self, queries: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar corpus entries of each query, best first.

        Returns ``(scores, indices)``, each ``(n, k)``: cosine similarities (float32) and corpus row numbers
        (int64). Where fewer than ``k`` entries exist the remaining slots hold index ``-1`` and score ``-inf``.
        ``exclude_self`` skips entries with cosine ``>= 1 - 1e-5`` (the query's own text) and fills up from the next.
        """
        _check_positive_int(k, "k")
        k = int(k)
        matrix = _as_unit_matrix(queries, "queries", self.dim)
        fetch = min(k + 1 if exclude_self else k, self.count)
        while True:
            scores, indices = self._index.search(matrix, fetch)
            keep = indices >= 0
            if exclude_self:
                keep &= scores < SELF_MATCH_MIN_COSINE
            # Duplicate corpus vectors can hide more than one self match: widen the search until k remain.
            if not exclude_self or fetch == self.count or (keep.sum(axis=1) >= k).all():
                break
            fetch = min(2 * fetch, self.count)
        # Kept entries first, in score order (stable sort), then pad or cut to k columns.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep, order, axis=1)
        out_scores = np.full((matrix.shape[0], k), -np.inf, dtype=np.float32)
        out_indices = np.full((matrix.shape[0], k), -1, dtype=np.int64)
        width = order.shape[1]
        out_scores[:, :width] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
        out_indices[:, :width] = np.where(kept, np.take_along_axis(indices, order, axis=1), -1)
        return out_scores, out_indices

    def save(self, folder: str | Path) -> None:
        """Writes ``index.faiss``, ``texts.jsonl`` and ``config.json`` into ``folder`` (no pickle)."""
        faiss = _import_faiss()
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(root / INDEX_FILE))
        with (root / TEXTS_FILE).open("w", encoding="utf-8") as handle:
            for text in self.texts:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        config = {
            "_class_name": type(self).__name__,
            "metric": _METRIC,
            "dim": self.dim,
            "count": self.count,
            "source": self.source,
            "faiss_version": faiss.__version__,
        }
        (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        logger.info("Saved retrieval index (%d texts) to %s", self.count, root)

    @classmethod
    def load(cls, folder: str | Path) -> RetrievalIndex:
        """Reads a folder written by :meth:`save`; a file that disagrees with ``config.json`` is named in the error."""
        faiss = _import_faiss()
        root = Path(folder)
        paths = {name: root / name for name in (CONFIG_FILE, INDEX_FILE, TEXTS_FILE)}
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"retrieval index file {path} not found")
        config_path = paths[CONFIG_FILE]
        config = json.loads(config_path.read_text(encoding="utf-8"))
        missing = [key for key in ("metric", "dim", "count", "source") if key not in config]
        if missing:
            raise ValueError(f"{config_path}: missing {', '.join(missing)}")
        if config["metric"] != _METRIC:
            raise ValueError(f"{config_path}: metric {config['metric']!r} is not supported (only {_METRIC!r})")
        index = faiss.read_index(str(paths[INDEX_FILE]))
        if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{paths[INDEX_FILE]}: not an exact inner-product index (IndexFlatIP)")
        if index.d != config["dim"]:
            raise ValueError(f"{paths[INDEX_FILE]}: dimension {index.d}, but {config_path} says {config['dim']}")
        if index.ntotal != config["count"]:
            raise ValueError(
                f"{paths[INDEX_FILE]}: {index.ntotal} vectors, but {config_path} says count {config['count']}"
            )
        texts = load_knowledge(paths[TEXTS_FILE])
        if len(texts) != config["count"]:
            raise ValueError(f"{paths[TEXTS_FILE]}: {len(texts)} texts, but {config_path} says count {config['count']}")
        return cls(index, texts, config["source"])


def augment(
    embeddings: np.ndarray,
    index: RetrievalIndex,
    *,
    k: int = 4,
    weight: float = 0.5,
    temperature: float = 0.05,
    exclude_self: bool = True,
    batch_size: int = 4096,
) -> np.ndarray:
    """Enriches each event vector with its ``k`` nearest corpus entries (the formula is in the module docstring):

    ``r_i = normalize((1 - weight) * e_i + weight * sum_j softmax_j(s_ij / temperature) * c_j)``.

    ``weight`` in [0, 1] is the neighbours' share (0: retrieval off, the input is returned unchanged);
    ``temperature > 0`` sharpens (small) or flattens (large) the neighbour weights. ``exclude_self`` must be True
    when ``index`` was built from the same event texts, so an event does not retrieve itself. Queries are searched
    ``batch_size`` at a time to bound memory. Returns float32 ``(n, d)`` unit-norm rows in input order.
    """
    _check_positive_int(k, "k")
    _check_positive_int(batch_size, "batch_size")
    if isinstance(weight, bool) or not isinstance(weight, Real) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    weight, temperature, batch_size = float(weight), float(temperature), int(batch_size)
    events = _as_unit_matrix(embeddings, "embeddings", index.dim)
    if weight == 0:
        return events.copy()
    result = np.empty_like(events)
    for start in range(0, events.shape[0], batch_size):
        queries = events[start : start + batch_size]
        scores, indices = index.search(queries, k, exclude_self=exclude_self)
        found = indices >= 0
        logits = np.where(found, scores.astype(np.float64) / temperature, -np.inf)
        # Subtract each row's best logit for a stable softmax; rows with no neighbour keep all-zero weights.
        best = np.where(found.any(axis=1), logits.max(axis=1), 0.0)[:, None]
        weights = np.exp(logits - best)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        neighbours = index.vectors(np.where(found, indices, 0))  # (batch, k, dim); unfound slots have zero weight
        context = np.einsum("bk,bkd->bd", weights, neighbours)
        mixed = (1.0 - weight) * queries + weight * context
        norms = np.linalg.norm(mixed, axis=1, keepdims=True)
        degenerate = norms[:, 0] <= 1e-12
        result[start : start + len(queries)] = np.where(
            degenerate[:, None], queries, mixed / np.where(degenerate[:, None], 1.0, norms)
        )
    logger.debug("Augmented %d embeddings with k=%d, weight=%g, temperature=%g", len(events), k, weight, temperature)
    return result


def load_knowledge(path: str | Path) -> list[str]:
    """Reads a supplied knowledge list: a ``.jsonl`` file (one object with a string ``"text"`` per line) or a text
    file (one entry per non-empty line; lines starting with ``#`` are comments). Errors name the file and line."""
    source = Path(path)
    entries = []
    for number, line in enumerate(read_user_text(source, "--knowledge").splitlines(), start=1):
        stripped = line.strip()
        if source.suffix == ".jsonl":
            if not stripped:
                continue
            try:
                record = json.loads(stripped)
            except json.JSONDecodeError as error:
                raise DataError(f"--knowledge {source}:{number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'--knowledge {source}:{number}: expected an object with a string "text" field')
            entries.append(record["text"])
        elif stripped and not stripped.startswith("#"):
            entries.append(stripped)
    if not entries:
        raise DataError(f"--knowledge {source}: no entries")
    return entries


def build_event_index(
    texts: Sequence[str],
    embedder: SentenceEmbedder,
    *,
    batch_size: int = 256,
    show_progress: bool = True,
    source: str = "events",
) -> RetrievalIndex:
    """Embeds the distinct ``texts`` once each (events repeat a lot) and indexes them, in first-seen order.

    Use it for the training events (``source="events:train"``, then ``augment(..., exclude_self=True)``) or for a
    knowledge list from :func:`load_knowledge` (``source=<its path>``, ``exclude_self=False``).
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not a single string")
    unique = list(dict.fromkeys(texts))
    if not unique:
        raise ValueError("texts is empty: a retrieval corpus needs at least one entry")
    logger.info("Embedding %d distinct texts of %d for the %s retrieval index", len(unique), len(texts), source)
    embeddings = embedder.encode(unique, batch_size=batch_size, show_progress=show_progress)
    return RetrievalIndex.build(unique, embeddings.detach().cpu().numpy(), source=source)
