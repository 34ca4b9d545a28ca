"""Published generators run as peers in the benchmark tables, each fitted on the train split's schema vectors and
returning schema vectors, so the evaluation scores them exactly like the model's records.

SDV's GaussianCopula (``sdv.single_table.GaussianCopulaSynthesizer``, SDV 2.0; ``pip install -e .[bench]``) sees one
table in the record's own units: sex, death, marital status and race as categorical columns, age and admissions as
whole numbers, and each ICD-10 category as a 0/1 categorical column (about 1,070 columns on the demo cohort).

Distributions. SDV encodes every categorical column with its ``UniformEncoder``, whose output is uniform on [0, 1] by
construction, so the copula's marginal for it is ``uniform``: it gives every code its training prevalence back and
fits in closed form. SDV's default, ``beta``, fits a beta by maximum likelihood to each of the ~1,070 columns for the
same result (prevalence r 0.995 against 0.996 on the demo cohort) and is slower; ``norm`` puts mass outside [0, 1]
and turns rare codes on (48 codes per patient against 11). Age and admissions use ``gaussian_kde``: ``beta`` moved
the mean age by 2.5 years. On the 5,000-patient demo cohort (4,000 train rows, 1,067 columns, 2 shared CPU cores)
fitting took 82 to 125 s whatever the distributions, most of it SDV's per-column preprocessing and pandas' correlation
matrix (both linear in the rows), and sampling 4,000 records 51 s (the KDE's inverse CDF: 20 s with ``beta``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ehr_diffusers.data.ehr.schema import EHRSchema

TABLE = "records"
WHOLE_NUMBER_KINDS = ("continuous", "count")


def sdv_available() -> bool:
    """Whether SDV is installed (the ``bench`` extra); the peer is skipped without it."""
    import importlib.util

    return importlib.util.find_spec("sdv") is not None


def records_frame(vectors: np.ndarray, schema: EHRSchema) -> Any:
    """Schema vectors -> a pandas DataFrame in the record's units: one column per field (binary and one-hot fields
    as their category values, age and admissions as whole numbers) and one 0/1 column per code."""
    import pandas as pd

    vectors = np.asarray(vectors, dtype=np.float32)
    columns: dict[str, Any] = {}
    for group in schema.groups:
        block = vectors[:, schema.slices[group.name]]
        if group.kind == "binary":
            columns[group.name] = np.asarray(group.categories, dtype=object)[(block[:, 0] >= 0.5).astype(int)]
        elif group.kind in WHOLE_NUMBER_KINDS:
            columns[group.name] = schema.decode_column(group.name, block[:, 0])
        elif group.kind == "one_hot":
            columns[group.name] = np.asarray(group.categories, dtype=object)[block.argmax(axis=1)]
        else:
            columns.update(zip(group.categories, (block >= 0.5).astype(np.int8).T))
    return pd.DataFrame(columns)


def frame_vectors(frame: Any, schema: EHRSchema) -> np.ndarray:
    """:func:`records_frame`'s layout -> schema vectors, through ``EHRSchema.encode`` (the one place that knows the
    layout)."""
    records: dict[str, list] = {}
    for group in schema.groups:
        if group.kind == "multi_hot":
            hits = frame[list(group.categories)].to_numpy(dtype=np.int8) == 1
            names = np.asarray(group.categories, dtype=object)[np.nonzero(hits)[1]]
            records[group.name] = [part.tolist() for part in np.split(names, np.cumsum(hits.sum(axis=1))[:-1])]
        else:
            records[group.name] = frame[group.name].tolist()
    return schema.encode(records)


def sdv_metadata(schema: EHRSchema) -> Any:
    """SDV metadata of :func:`records_frame`'s table: whole-number fields numerical, every other column categorical."""
    from sdv.metadata import Metadata

    columns: dict[str, dict[str, str]] = {}
    for group in schema.groups:
        if group.kind == "multi_hot":
            columns.update({code: {"sdtype": "categorical"} for code in group.categories})
        else:
            columns[group.name] = {"sdtype": "numerical" if group.kind in WHOLE_NUMBER_KINDS else "categorical"}
    return Metadata.load_from_dict({"tables": {TABLE: {"columns": columns}}})


class GaussianCopulaPeer:
    """SDV's GaussianCopula on schema vectors (see the module docstring for the distributions)."""

    def __init__(self) -> None:
        self.schema: EHRSchema | None = None
        self.synthesizer: Any = None

    def fit(self, train_vectors: np.ndarray, schema: EHRSchema) -> GaussianCopulaPeer:
        """Fits the copula on ``train_vectors``; deterministic (SDV seeds its encoders' noise itself)."""
        from sdv.single_table import GaussianCopulaSynthesizer

        whole_numbers = {group.name: "gaussian_kde" for group in schema.groups if group.kind in WHOLE_NUMBER_KINDS}
        self.schema = schema
        self.synthesizer = GaussianCopulaSynthesizer(sdv_metadata(schema), default_distribution="uniform",
                                                     numerical_distributions=whole_numbers)
        with _quiet_sdv():
            self.synthesizer.fit({TABLE: records_frame(train_vectors, schema)})
        return self

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` records (float32, the schema layout); the same ``seed`` gives the same records."""
        if self.synthesizer is None or self.schema is None:
            raise ValueError("GaussianCopulaPeer.sample needs fit() first")
        if n < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        # SDV's sample() has no seed argument; it seeds the copula through this method itself (with a fixed seed
        # when none was set), so setting it here makes each seed's records reproducible.
        self.synthesizer._set_random_state(seed)
        with _quiet_sdv():
            sampled = self.synthesizer.sample(n)
        frame = sampled[TABLE] if isinstance(sampled, dict) else sampled
        if len(frame) != n:
            raise RuntimeError(f"SDV returned {len(frame)} records instead of {n}")
        return frame_vectors(frame, self.schema)


@contextmanager
def _quiet_sdv() -> Iterator[None]:
    """SDV logs every fit and sample and warns about the table's width; the benchmark prints its own lines."""
    loggers = [logging.getLogger(name) for name in ("sdv", "rdt", "copulas")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
