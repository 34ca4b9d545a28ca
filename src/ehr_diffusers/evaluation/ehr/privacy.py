"""Privacy of synthetic records against the real training split: membership inference, attribute inference and a
memorisation audit (distance to closest record, exact copies).

Every function takes vectors in one ``EHRSchema`` layout (``schema.encode``), as dense arrays or scipy sparse
matrices. A figure that cannot be computed (fewer than 2 rows on a side) is None with a ``reason``, never a silent
NaN. Per-record arrays come back beside each figure so that the report can bootstrap confidence intervals over
records (``attribute_bootstrap`` gives replicates of the attribute inference figures over resampled victims).

Distances are squared Euclidean over the schema vector: for 0/1 columns (sex, death, one-hot fields, codes) that is
the Hamming distance, for the scaled age and admission columns the squared difference, so theta = 5 means "about five
fields differ".

How they are computed. A record has ~16 non-zero entries out of ~1,800 columns, so ||q - r||^2 = |q|^2 + |r|^2 -
2 q.r is summed over the query's non-zero columns only: each block of references is stored transposed, one row per
column plus rows holding 1, the references' squared norms over the 0/1 columns and over the others, and
``torch.nn.functional.embedding_bag`` (mode "sum" with per-entry weights) adds, for every query, its rows weighted by
-2 q_j (and |q|^2, 1) into the distances to all references of the block at once. Reference blocks of 128 rows keep
the table in the CPU's L2 cache; a minimum over each block's output follows. The cost is about (non-zeros per
query) x (pairs), ~1 ns per pair and thread, where a dense matrix product pays 1,800 multiply-adds per pair (measured
on 4,096 x 50,000 pairs of ~1,800 columns: dense BLAS 15-25x slower, torch CSR @ dense and scipy CSR @ dense 3-6x
slower). Columns whose values are all 0 or 1 in both sets (detected from the data) are summed first: their partial
sums are whole numbers, exact in float32, so the 0/1 part of every distance is exact and two references at the same
true distance with the same continuous values tie exactly; the continuous columns (age, admissions, or any column with
another value) follow and carry float32 rounding (at most ~3e-6 at distances of ~15). Distances come back as float64,
clipped at 0 and rounded to 6 decimals; tests check them against brute force.

* Membership inference (Choi et al. 2017, medGAN; as in EHRDiff): members are train rows, non-members holdout rows,
  the same number of each (seeded sample). The attacker scores a record by its distance to the nearest synthetic
  record; a record within theta is called a member. Reported: F1 at theta = 5 and over a sweep of theta, ROC AUC (0.5
  is chance), and the true-positive rate at 1% false-positive rate; per record: ``member_distances`` and
  ``nonmember_distances``.
* Attribute inference (the attribute disclosure attack of Choi et al. 2017, in the setup and scoring of Yan et al.
  2022, "A multifaceted benchmarking of synthetic electronic health record generation models", Nat. Commun.
  13:7609, the attribute inference that EHRDiff reports): the attacker knows each victim's demographics (every
  non-code group of the schema) and the ``known_codes`` (256) codes most common in the real train split (ties by
  column order), finds the victim's nearest synthetic record on those known columns and predicts the victim's
  remaining ("unknown") codes as that record's codes. The distance is the one above restricted to the known columns
  (Yan et al. use the L1 distance scaled by each column's range: the same on 0/1 columns); among equally near records
  the lowest row index wins (Yan et al. take the per-column majority of all tied records). Victims are all train
  rows. Per unknown code c, F1_c = 2 TP / (2 TP + FP + FN) over victims; the figure is the entropy-weighted mean
  sum_c w_c F1_c / sum_c w_c with w_c = H(p_c), the binary entropy (bits) of the code's prevalence p_c in real train.
  Codes never or always present in train have weight 0 and drop out (``weighted_codes`` counts those that stay). The
  baseline is the same attack with the holdout in place of the synthetic set: what an attacker learns from similar
  real patients who are not the victims. When the two sets differ in size the larger is sampled (seeded) to the size
  of the smaller, so both attacks search equally many records. ``difference`` = f1 - baseline_f1; above 0 the
  synthetic records disclose more than real non-victims do.
* Distance to closest record (DCR share, on code sets): for each synthetic record, the Jaccard distance
  1 - |A n B| / |A u B| of its set of codes (ICD-10 categories; two empty sets are at 0) to the nearest record of a
  seeded train sample and to the nearest holdout record, the train sample as large as the holdout (or all of train
  when it is smaller). The share of synthetic records closer to train, ties counted one half, is 0.5 when the model is
  no closer to its training patients than to unseen ones; per record: ``closer_to_train`` (1, 0.5 or 0), whose mean
  is the share. Copies of sampled train patients score 1, but a copy of a train patient outside the sample looks
  fresh: a generator that copies a train split f times the holdout's size scores about (1 + 1/f) / 2 (0.62 at
  f = 4), which the exact-copy rate below catches. At most 10,000 synthetic records are audited (a seeded sample of
  larger sets). It replaces an earlier DCR over squared Euclidean distances of whole schema vectors, against train and
  holdout samples of half the holdout's size: the code set is what identifies a patient, and demographics blurred it.
* Exact copies: the share of synthetic records with at least 2 codes whose exact code set (demographics aside) is the
  code set of some train record, among the synthetic records with at least 2 codes (a set of 0 or 1 codes is shared
  by many patients and says nothing about copying). The reference is the holdout's own rate, the share of holdout
  records with at least 2 codes whose code set occurs in train: how often unseen real patients repeat a train
  patient's diagnoses by chance. A generator above it reproduces train patients.

``privacy`` runs membership and attribute inference; ``memorisation`` the distance to closest record and the exact
copies, against the whole train split and the whole holdout.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from scipy import sparse

from ...data.ehr.schema import EHRSchema
from ..stats import binary_f1, roc_auc, tpr_at_fpr
from .vectors import as_csr

logger = logging.getLogger(__name__)

MIN_ROWS = 2
CHUNK_ROWS = 4096  # queries per embedding_bag call
REFERENCE_BLOCK = 128  # references per table: (columns + 3) x 128 float32 is under 1 MB, it stays in L2 cache
CODES = "icd10_categories"


# ---------------------------------------------------------------------------------------------- nearest neighbours
Vectors = np.ndarray | sparse.spmatrix | sparse.sparray


def _check_arrays(schema: EHRSchema | None, **arrays: Vectors) -> dict[str, sparse.csr_matrix]:
    """Every array as canonical float32 CSR (sorted, no duplicate or zero entries; the callers' matrices stay as they
    are), checked: 2-D, one width (the schema's when given, else the first array's), finite. A ValueError names the
    argument."""
    out: dict[str, sparse.csr_matrix] = {}
    width = schema.dim if schema is not None else None
    for name, vectors in arrays.items():
        matrix = as_csr(vectors, name, copy=True)
        if width is not None and matrix.shape[1] != width:
            raise ValueError(f"{name} has {matrix.shape[1]} columns, expected {width}")
        if not np.isfinite(matrix.data).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        matrix.sum_duplicates()
        matrix.eliminate_zeros()
        out[name] = matrix
        width = matrix.shape[1]
    return out


def _binary_columns(*matrices: sparse.csr_matrix) -> np.ndarray:
    """Columns whose stored values are all 1 in every matrix (so all values are 0 or 1)."""
    binary = np.ones(matrices[0].shape[1], dtype=bool)
    for matrix in matrices:
        binary[matrix.indices[matrix.data != 1]] = False
    return binary


class _References:
    """References as embedding tables: per block of rows, the block transposed plus three rows (a row of ones, the
    squared norm over the 0/1 columns, the squared norm over the others)."""

    def __init__(self, references: sparse.csr_matrix, binary: np.ndarray, block: int = REFERENCE_BLOCK):
        if references.shape[0] == 0:
            raise ValueError("nearest neighbours need at least one reference row")
        self.rows, self.columns = references.shape
        self.starts = list(range(0, self.rows, block))
        self.tables = []
        for start in self.starts:
            part = references[start : start + block].tocoo()
            count = min(block, self.rows - start)
            squared = part.data.astype(np.float64) ** 2
            on_binary = binary[part.col]
            table = np.zeros((self.columns + 3, count), dtype=np.float32)
            table[part.col, part.row] = part.data
            table[self.columns] = 1.0
            table[self.columns + 1] = np.bincount(part.row[on_binary], squared[on_binary], minlength=count)
            table[self.columns + 2] = np.bincount(part.row[~on_binary], squared[~on_binary], minlength=count)
            self.tables.append(torch.from_numpy(table))


def _bags(queries: sparse.csr_matrix, binary: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """embedding_bag indices, weights and offsets that give |q|^2 + |r|^2 - 2 q.r for every query row.

    Per query, in this order: (ones, |q_b|^2), (binary norm, 1), its non-zero 0/1 columns (-2 q_j), then, only if
    some column is not 0/1, (ones, |q_c|^2), (other norm, 1) and its other non-zero columns (-2 q_j). The 0/1 part
    comes first so that its partial sums stay whole numbers (exact)."""
    n, columns = queries.shape
    ones, binary_norm, other_norm = columns, columns + 1, columns + 2
    rows = np.repeat(np.arange(n), np.diff(queries.indptr))
    cols, values = queries.indices, queries.data.astype(np.float64)
    is_binary = binary[cols]
    everyone = np.arange(n)

    def squared_norm(where: np.ndarray) -> np.ndarray:
        return np.bincount(rows[where], weights=values[where] ** 2, minlength=n)

    # (row, phase, index, weight) for every entry; a stable sort by (row, phase) lays out the bags
    parts = [
        (everyone, 0, np.full(n, ones), squared_norm(is_binary)),
        (everyone, 1, np.full(n, binary_norm), np.ones(n)),
        (rows[is_binary], 2, cols[is_binary], -2.0 * values[is_binary]),
    ]
    if not binary.all():
        parts += [
            (everyone, 3, np.full(n, ones), squared_norm(~is_binary)),
            (everyone, 4, np.full(n, other_norm), np.ones(n)),
            (rows[~is_binary], 5, cols[~is_binary], -2.0 * values[~is_binary]),
        ]
    key = np.concatenate([part_rows * 6 + phase for part_rows, phase, _, _ in parts])
    order = np.argsort(key, kind="stable")
    indices = np.concatenate([index for _, _, index, _ in parts])[order]
    weights = np.concatenate([weight for _, _, _, weight in parts])[order]
    lengths = np.bincount(np.concatenate([part_rows for part_rows, _, _, _ in parts]), minlength=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return (torch.from_numpy(indices.astype(np.int64)), torch.from_numpy(weights.astype(np.float32)),
            torch.from_numpy(offsets.astype(np.int64)))


def _chunk_search(chunk: sparse.csr_matrix, references: _References, binary: np.ndarray,
                  want_index: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One chunk of queries against every reference block: nearest distance (float32) and index."""
    indices, weights, offsets = _bags(chunk, binary)
    best = torch.full((chunk.shape[0],), float("inf"))
    best_index = torch.zeros(chunk.shape[0], dtype=torch.int64)
    for block_start, table in zip(references.starts, references.tables):
        squared = torch.nn.functional.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
        block_best = squared.amin(dim=1)
        if want_index:
            # only rows that improve strictly look for their argmin: earlier blocks (lower indices) win ties
            improved = torch.nonzero(block_best < best).squeeze(1)
            best_index[improved] = squared[improved].argmin(dim=1) + block_start
        best = torch.minimum(best, block_best)
    return best.numpy(), best_index.numpy() if want_index else None


def _chunk_jaccard(chunk: sparse.csr_matrix, references: _References) -> np.ndarray:
    """One chunk of 0/1 code rows against every reference block: the nearest Jaccard distance (float32). The shared
    codes of a query and every reference of a block are one embedding_bag sum over the query's codes; a reference's
    code count is its table's binary-norm row. Counts are whole numbers and the division is correctly rounded, so
    equal distances tie exactly."""
    codes = references.columns
    indices = torch.from_numpy(chunk.indices.astype(np.int64))
    offsets = torch.from_numpy(chunk.indptr[:-1].astype(np.int64))
    sizes = torch.from_numpy(np.diff(chunk.indptr).astype(np.float32))[:, None]
    best = torch.full((chunk.shape[0],), float("inf"))
    for table in references.tables:
        shared = torch.nn.functional.embedding_bag(indices, table, offsets, mode="sum")
        union = sizes + table[codes + 1][None, :] - shared
        distance = torch.where(union > 0, 1.0 - shared / union.clamp_min(1.0), 0.0)
        best = torch.minimum(best, distance.amin(dim=1))
    return best.numpy()


@contextlib.contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _in_chunks(n: int, chunk_rows: int, work: Callable[[int, int], Any]) -> list[Any]:
    """``work(start, stop)`` over chunks of at most ``chunk_rows`` of ``n`` queries, in order.

    Chunks run on ``torch.get_num_threads()`` Python threads (torch releases the GIL) with torch's own intra-op
    parallelism set to 1 meanwhile: each call is ~0.5 ms of work, and OpenMP's per-call barriers made a 2-thread run
    4x slower than 1 thread on a busy 2-core machine, where independent chunks just share the cores."""
    workers = torch.get_num_threads()
    chunks = workers * max(1, -(-n // (workers * chunk_rows)))  # a multiple of the workers, each <= chunk_rows
    chunk_rows = max(1, -(-n // chunks))
    with _intra_op_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda start: work(start, start + chunk_rows), range(0, n, chunk_rows)))


def _search(
    queries: sparse.csr_matrix,
    references: _References,
    binary: np.ndarray,
    want_index: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per query the nearest squared distance (and the lowest reference index at it)."""
    parts = _in_chunks(queries.shape[0], chunk_rows,
                       lambda start, stop: _chunk_search(queries[start:stop], references, binary, want_index))
    nearest = np.concatenate([part[0] for part in parts]).astype(np.float64) if parts else np.empty(0)
    index = None
    if want_index:
        index = np.concatenate([part[1] for part in parts]) if parts else np.empty(0, dtype=np.int64)
    return _clean(nearest), index


def _clean(distances: np.ndarray) -> np.ndarray:
    """Float rounding can leave exact matches a hair below 0 and equal distances a hair apart."""
    return np.clip(distances, 0.0, None).round(6)


def nearest_distances(queries: Vectors, references: Vectors, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """For each query row, the squared Euclidean distance to its nearest reference row (float64, clipped at 0,
    rounded to 6 decimals)."""
    arrays = _check_arrays(None, queries=queries, references=references)
    binary = _binary_columns(arrays["queries"], arrays["references"])
    return _search(arrays["queries"], _References(arrays["references"], binary), binary, chunk_rows=chunk_rows)[0]


def nearest_jaccard(queries: Vectors, references: Vectors, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """For each query row, the Jaccard distance of its set of present columns (values >= 0.5) to the nearest
    reference row's (float64; two empty sets are at distance 0)."""
    arrays = _check_arrays(None, queries=queries, references=references)
    queries, references = (_present(arrays[name], np.arange(arrays[name].shape[1]))
                           for name in ("queries", "references"))
    table = _References(references, np.ones(references.shape[1], dtype=bool))
    parts = _in_chunks(queries.shape[0], chunk_rows, lambda start, stop: _chunk_jaccard(queries[start:stop], table))
    return np.concatenate(parts).astype(np.float64) if parts else np.empty(0)


def nearest_neighbours(queries: Vectors, references: Vectors,
                       chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the distance to its nearest reference row and that row's index (the lowest index among
    equally near rows)."""
    arrays = _check_arrays(None, queries=queries, references=references)
    binary = _binary_columns(arrays["queries"], arrays["references"])
    return _search(arrays["queries"], _References(arrays["references"], binary), binary, want_index=True,
                   chunk_rows=chunk_rows)


# ----------------------------------------------------------------------------------------- membership inference
def membership_f1(member_distances: np.ndarray, nonmember_distances: np.ndarray, theta: float) -> float:
    """F1 of the attack that calls every record within ``theta`` of a synthetic record a member (members are the
    positives)."""
    called = np.concatenate([member_distances, nonmember_distances]) <= theta
    return float(binary_f1(called, np.arange(len(called)) < len(member_distances)))


def _balanced(train: sparse.csr_matrix, holdout: sparse.csr_matrix, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of equal-size seeded samples of train and holdout."""
    rng = np.random.default_rng(seed)
    n = min(train.shape[0], holdout.shape[0])
    return rng.choice(train.shape[0], n, replace=False), rng.choice(holdout.shape[0], n, replace=False)


def _distances_to_synthetic(arrays: dict[str, sparse.csr_matrix], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The members' (train sample) and non-members' (holdout sample) nearest distances to the synthetic set."""
    train_rows, holdout_rows = _balanced(arrays["train"], arrays["holdout"], seed)
    members, nonmembers = arrays["train"][train_rows], arrays["holdout"][holdout_rows]
    binary = _binary_columns(members, nonmembers, arrays["synthetic"])
    synthetic = _References(arrays["synthetic"], binary)
    return _search(members, synthetic, binary)[0], _search(nonmembers, synthetic, binary)[0]


def _membership_figures(member_distance: np.ndarray, nonmember_distance: np.ndarray, theta: float,
                        sweep: tuple[float, ...]) -> dict[str, Any]:
    return {
        "members": len(member_distance),
        "nonmembers": len(nonmember_distance),
        "theta": theta,
        "f1": membership_f1(member_distance, nonmember_distance, theta),
        "f1_sweep": {str(t): membership_f1(member_distance, nonmember_distance, t) for t in sweep},
        "auc": roc_auc(-member_distance, -nonmember_distance),
        "tpr_at_1pct_fpr": tpr_at_fpr(-member_distance, -nonmember_distance, 0.01),
        "member_distances": member_distance,
        "nonmember_distances": nonmember_distance,
    }


def _skipped(reason: str, empty: dict[str, Any]) -> dict[str, Any]:
    logger.info("%s", reason)
    return {"reason": reason, **empty}


def _too_few(name: str, arrays: dict[str, sparse.csr_matrix]) -> str | None:
    """Why a figure is skipped: train and holdout (the two sides) need ``MIN_ROWS`` rows each, synthetic one."""
    needed = {"train": MIN_ROWS, "holdout": MIN_ROWS, "synthetic": 1}
    short = [f"{key} has {arrays[key].shape[0]} (needs {least})" for key, least in needed.items()
             if arrays[key].shape[0] < least]
    return f"{name} skipped: {', '.join(short)}" if short else None


SWEEP = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20)
MIA_SKIPPED = {"f1": None, "f1_sweep": None, "auc": None, "tpr_at_1pct_fpr": None}


def membership_inference(
    train: Vectors,
    holdout: Vectors,
    synthetic: Vectors,
    theta: float = 5.0,
    sweep: tuple[float, ...] = SWEEP,
    seed: int = 0,
    schema: EHRSchema | None = None,
) -> dict[str, Any]:
    """The distance attack above on equal numbers of train (members) and holdout (non-members) rows."""
    arrays = _check_arrays(schema, train=train, holdout=holdout, synthetic=synthetic)
    reason = _too_few("membership inference", arrays)
    if reason:
        return _skipped(reason, MIA_SKIPPED)
    return _membership_figures(*_distances_to_synthetic(arrays, seed), theta, sweep)


# ------------------------------------------------------------------------------------------ attribute inference
def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in bits, 0 at p = 0 and p = 1."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.where((p > 0) & (p < 1), h, 0.0)


def _weighted_f1(true_positive: np.ndarray, predicted_positive: np.ndarray, actual_positive: np.ndarray,
                 weights: np.ndarray) -> np.ndarray:
    """Per column of the (codes x resamples) counts, the entropy-weighted mean F1 over codes; NaN where no code with
    a defined F1 (2 TP + FP + FN > 0) and a positive weight is left."""
    denominator = predicted_positive + actual_positive  # = 2 TP + FP + FN
    kept = np.where(denominator > 0, weights[:, None], 0.0)
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    total = kept.sum(axis=0)
    return np.divide((kept * f1).sum(axis=0), total, out=np.full(total.shape, np.nan), where=total > 0)


def attribute_f1(true: sparse.csr_matrix, predicted: sparse.csr_matrix, weights: np.ndarray,
                 rows: np.ndarray | None = None) -> float | None:
    """The entropy-weighted mean of per-code F1 over victims (the attribute inference figure).

    ``true`` and ``predicted`` are victims x unknown codes (0/1), ``weights`` one per unknown code. ``rows`` (victim
    indices, repeats allowed) recomputes it on a resample of victims; a code that no resampled victim has and none
    is predicted to have (F1 = 0/0) drops out with its weight. None when no weighted code is left."""
    n = true.shape[0]
    counts = np.bincount(rows, minlength=n) if rows is not None else np.ones(n)
    counts = counts.astype(np.float64)[:, None]
    hits = true.multiply(predicted).tocsr()
    value = _weighted_f1(hits.T @ counts, predicted.T @ counts, true.T @ counts, weights)[0]
    return None if np.isnan(value) else float(value)


def attribute_bootstrap(result: dict[str, Any], reps: int = 1000, seed: int = 0,
                        batch: int = 100) -> dict[str, Any]:
    """Percentile-bootstrap replicates over victims of an ``attribute_inference`` result: ``f1``, ``baseline_f1``
    and their ``difference`` (paired: each replicate resamples the same victims for both attacks).

    Each replicate draws len(victims) victims with replacement and recomputes both figures as ``attribute_f1`` does,
    ``batch`` replicates at a time as one sparse-dense product (about 1 ms a replicate at 50,000 victims). A
    replicate where either figure is undefined is left out; ``reps`` says how many remain. A 95% interval is
    ``np.percentile(replicates, [2.5, 97.5])``."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    if result.get("f1") is None or result.get("baseline_f1") is None:
        raise ValueError("result has no attribute inference figures to bootstrap (it was skipped)")
    true, weights = result["true"], result["weights"]
    n = true.shape[0]
    hits = {name: true.multiply(result[name]).tocsr() for name in ("predicted", "baseline_predicted")}
    rng = np.random.default_rng(seed)
    f1, baseline = [], []
    for start in range(0, reps, batch):
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                           for _ in range(min(batch, reps - start))], axis=1).astype(np.float64)
        actual = true.T @ counts
        f1.append(_weighted_f1(hits["predicted"].T @ counts, result["predicted"].T @ counts, actual, weights))
        baseline.append(_weighted_f1(hits["baseline_predicted"].T @ counts,
                                     result["baseline_predicted"].T @ counts, actual, weights))
    f1_all, baseline_all = np.concatenate(f1), np.concatenate(baseline)
    defined = ~(np.isnan(f1_all) | np.isnan(baseline_all))
    return {"reps": int(defined.sum()), "f1": f1_all[defined], "baseline_f1": baseline_all[defined],
            "difference": f1_all[defined] - baseline_all[defined]}


def _present(vectors: sparse.csr_matrix, columns: np.ndarray) -> sparse.csr_matrix:
    """The given (code) columns as 0/1: a value of at least 0.5 counts as present, as in fidelity.code_matrix."""
    selected = vectors[:, columns].tocsr()
    selected.data = (selected.data >= 0.5).astype(np.float32)
    selected.eliminate_zeros()
    return selected


AIA_SKIPPED = {"f1": None, "baseline_f1": None, "difference": None}


def _known_split(schema: EHRSchema, known_codes: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The demographic columns, the code columns, and why the attack is skipped when the vocabulary leaves no code
    to infer; a ValueError when the attacker would know nothing."""
    codes = np.arange(schema.dim)[schema.slices[CODES]]
    demographic = np.setdiff1d(np.arange(schema.dim), codes)
    if known_codes < 0:
        raise ValueError(f"known_codes must be at least 0, got {known_codes}")
    if known_codes == 0 and len(demographic) == 0:
        raise ValueError("known_codes is 0 and the schema has no demographic column: the attacker would know nothing")
    if known_codes >= len(codes):
        return demographic, codes, (f"attribute inference skipped: known_codes={known_codes} leaves none of the "
                                    f"{len(codes)} codes to infer")
    return demographic, codes, None


def _sample_to(matrix: sparse.csr_matrix, size: int, rng: np.random.Generator) -> sparse.csr_matrix:
    """``size`` rows in their original order (all of them when there are that many)."""
    rows = matrix.shape[0]
    return matrix if rows == size else matrix[np.sort(rng.choice(rows, size, replace=False))]


def attribute_inference(
    train: Vectors,
    holdout: Vectors,
    synthetic: Vectors,
    schema: EHRSchema,
    known_codes: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """The attribute inference attack of the module docstring, against the synthetic set and, as the baseline,
    against the holdout.

    Returns the figures with the per-victim matrices ``true``, ``predicted`` and ``baseline_predicted`` (CSR,
    victims x unknown codes), the code ``weights`` and their columns in the schema vector: ``attribute_f1(true,
    predicted, weights, rows)`` recomputes either figure on victims ``rows``, and ``attribute_bootstrap`` gives
    bootstrap replicates for confidence intervals."""
    arrays = _check_arrays(schema, train=train, holdout=holdout, synthetic=synthetic)
    demographic, codes, reason = _known_split(schema, known_codes)
    reason = reason or _too_few("attribute inference", arrays)
    if reason:
        return _skipped(reason, AIA_SKIPPED)
    train = arrays["train"]
    prevalence = np.bincount(_present(train, codes).indices, minlength=len(codes)) / train.shape[0]
    by_prevalence = np.argsort(-prevalence, kind="stable")  # ties: lower column first
    known = np.concatenate([demographic, np.sort(codes[by_prevalence[:known_codes]])])
    unknown_positions = np.sort(by_prevalence[known_codes:])
    unknown = codes[unknown_positions]
    weights = binary_entropy(prevalence[unknown_positions])

    rng = np.random.default_rng(seed)
    size = min(arrays["synthetic"].shape[0], arrays["holdout"].shape[0])
    victims = train[:, known].tocsr()
    true = _present(train, unknown)
    predicted: dict[str, sparse.csr_matrix] = {}
    for name in ("synthetic", "holdout"):
        references = _sample_to(arrays[name], size, rng)
        known_references = references[:, known].tocsr()
        binary = _binary_columns(victims, known_references)
        _, neighbour = _search(victims, _References(known_references, binary), binary, want_index=True)
        predicted[name] = _present(references, unknown)[neighbour]
    f1 = attribute_f1(true, predicted["synthetic"], weights)
    baseline = attribute_f1(true, predicted["holdout"], weights)
    result: dict[str, Any] = {
        "victims": train.shape[0],
        "reference_rows": size,
        "known_columns": len(known),
        "known_codes": known_codes,
        "unknown_codes": len(unknown),
        "weighted_codes": int((weights > 0).sum()),
        "f1": f1,
        "baseline_f1": baseline,
        "difference": f1 - baseline if f1 is not None and baseline is not None else None,
        "unknown_code_columns": unknown,
        "weights": weights,
        "true": true,
        "predicted": predicted["synthetic"],
        "baseline_predicted": predicted["holdout"],
    }
    if f1 is None:
        result["reason"] = "attribute inference skipped: no unknown code varies in train (every weight is 0)"
        logger.info("%s", result["reason"])
    return result


# ---------------------------------------------------------------------------------------------- memorisation audit
MIN_COPY_CODES = 2
# DCR searches (synthetic x (train sample + holdout)) pairs: at most this many synthetic records (a seeded sample), so
# that 50,000 records against a 50,000-patient holdout stay seconds; the share's standard error is then <= 0.005.
DCR_MAX_SYNTHETIC = 10_000
DCR_SKIPPED = {"share_closer_to_train": None}


def _code_rows(arrays: dict[str, sparse.csr_matrix], schema: EHRSchema | None) -> dict[str, sparse.csr_matrix]:
    """The code columns (the schema's ICD-10 group, or every column without a schema) as 0/1 at >= 0.5."""
    first = next(iter(arrays.values()))
    columns = np.arange(first.shape[1])[schema.slices[CODES]] if schema is not None else np.arange(first.shape[1])
    return {name: _present(matrix, columns) for name, matrix in arrays.items()}


def distance_to_closest_record(train: Vectors, holdout: Vectors, synthetic: Vectors, seed: int = 0,
                               schema: EHRSchema | None = None,
                               max_synthetic: int = DCR_MAX_SYNTHETIC) -> dict[str, Any]:
    """The DCR share of the module docstring: synthetic records whose code set is nearer (Jaccard) to a seeded train
    sample as large as ``holdout`` than to ``holdout`` (ties one half; 0.5 = no closer to train than to unseen
    patients), over at most ``max_synthetic`` synthetic records (a seeded sample beyond that; ``synthetic_rows``
    says how many). ``schema`` names the code columns; without it every column is a code."""
    arrays = _code_rows(_check_arrays(schema, train=train, holdout=holdout, synthetic=synthetic), schema)
    short = [f"{name} has no rows" for name, matrix in arrays.items() if matrix.shape[0] == 0]
    if short:
        return _skipped(f"distance to closest record skipped: {', '.join(short)}", DCR_SKIPPED)
    rng = np.random.default_rng(seed)
    size = min(arrays["holdout"].shape[0], arrays["train"].shape[0])
    sample = _sample_to(arrays["train"], size, rng)
    queries = _sample_to(arrays["synthetic"], min(arrays["synthetic"].shape[0], max_synthetic), rng)
    to_train, to_holdout = nearest_jaccard(queries, sample), nearest_jaccard(queries, arrays["holdout"])
    closer = (to_train < to_holdout) + 0.5 * (to_train == to_holdout)
    return {"share_closer_to_train": float(closer.mean()), "train_rows": size,
            "holdout_rows": arrays["holdout"].shape[0], "synthetic_rows": len(closer),
            "synthetic_rows_given": arrays["synthetic"].shape[0], "distance": "Jaccard over code sets",
            "median_distance_to_train": float(np.median(to_train)),
            "median_distance_to_holdout": float(np.median(to_holdout)),
            "closer_to_train": closer, "distances_to_train": to_train, "distances_to_holdout": to_holdout}


def _code_sets(codes: sparse.csr_matrix) -> list[bytes]:
    """Each row's set of codes as bytes (canonical CSR: sorted column indices), hashable and exact."""
    indices = codes.indices.astype(np.int32)
    return [indices[start:stop].tobytes() for start, stop in zip(codes.indptr[:-1], codes.indptr[1:])]


def exact_copies(records: Vectors, train: Vectors, schema: EHRSchema | None = None,
                 min_codes: int = MIN_COPY_CODES) -> dict[str, Any]:
    """Among ``records`` with at least ``min_codes`` codes, how many have exactly the code set of some ``train``
    record: ``copies``, ``eligible`` and ``rate`` (None with a reason when no record is eligible). ``schema`` names
    the code columns; without it every column is a code (values >= 0.5 present)."""
    arrays = _code_rows(_check_arrays(schema, records=records, train=train), schema)
    counts = np.diff(arrays["records"].indptr)
    eligible = np.flatnonzero(counts >= min_codes)
    known = set(_code_sets(arrays["train"]))
    copied = int(sum(code_set in known for code_set in _code_sets(arrays["records"][eligible])))
    out: dict[str, Any] = {"copies": copied, "eligible": len(eligible), "records": arrays["records"].shape[0],
                           "min_codes": min_codes, "train_rows": arrays["train"].shape[0]}
    if not len(eligible):
        return {**out, "rate": None, "reason": f"no record has at least {min_codes} codes"}
    return {**out, "rate": copied / len(eligible)}


def memorisation(train: Vectors, holdout: Vectors, synthetic: Vectors, schema: EHRSchema | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """The memorisation audit against the whole ``train`` split and the whole ``holdout``: the DCR share and the
    exact-copy rate of ``synthetic``, with the holdout's own exact-copy rate as its reference."""
    return {"distance_to_closest_record": distance_to_closest_record(train, holdout, synthetic, seed, schema),
            "exact_copies": {"synthetic": exact_copies(synthetic, train, schema),
                             "holdout": exact_copies(holdout, train, schema)}}


# ----------------------------------------------------------------------------------------------------- both attacks
def privacy(
    train: Vectors,
    holdout: Vectors,
    synthetic: Vectors,
    schema: EHRSchema,
    theta: float = 5.0,
    known_codes: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Membership inference and attribute inference, equal to the two functions called one by one with the same
    seed."""
    arrays = _check_arrays(schema, train=train, holdout=holdout, synthetic=synthetic)
    _known_split(schema, known_codes)  # bad known_codes fail before the long part
    reason = _too_few("membership inference", arrays)
    if reason:
        mia = _skipped(reason, MIA_SKIPPED)
    else:
        mia = _membership_figures(*_distances_to_synthetic(arrays, seed), theta, SWEEP)
    aia = attribute_inference(arrays["train"], arrays["holdout"], arrays["synthetic"], schema, known_codes, seed)
    return {"membership_inference": mia, "attribute_inference": aia}
