"""The real data an evaluation compares against: a prepared dataset's splits as schema vectors, cut the same way
for every method so that all rows of the comparison table use the same real records.

The holdout is split once, with the seed, into two disjoint halves:

* ``holdout_eval``: the real reference of every fidelity figure, the test set of dimension-wise prediction and the
  non-members of membership inference;
* ``holdout_reference``: the "real data" baseline, scored exactly like a synthetic set. It is the ceiling a generator
  can reach (fresh patients from the same population) and the baseline of attribute inference.

Comparing the holdout with itself would give perfect figures that say nothing, hence the halves. ``train`` is a
seeded sample of the train split as large as ``holdout_eval`` (members, attribute-inference victims, and the
training set of the TRTR classifiers, the same size as each synthetic set by default); ``train_all`` is the whole
train split, which the baselines are fitted on as the model was (dense float32: about 7 KB per patient at 1,800
columns, 2 GB for MIMIC-IV's 300,000).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...data.ehr.dataset import HOLDOUT_SPLIT, TRAIN_SPLIT, iter_vectors, load_training_dataset
from ...data.ehr.schema import EHRSchema

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("sex", "age", "death", "num_admissions", "marital_status", "race", "icd10_categories")


@dataclass
class RealData:
    """Schema vectors of the real splits (see the module docstring) and what the report says about them."""

    schema: EHRSchema
    train_all: np.ndarray
    train: np.ndarray
    holdout_eval: np.ndarray
    holdout_reference: np.ndarray
    train_rows: int
    holdout_rows: int
    synthetic_data: bool
    eval_summaries: list[str] | None = None
    eval_records: list[dict[str, Any]] = field(default_factory=list)


def _vectors(split: Any, schema: EHRSchema, show_progress: bool, desc: str) -> np.ndarray:
    return np.concatenate([batch.numpy() for batch in iter_vectors(split, schema, 8192, desc, show_progress)])


def load_real_data(dataset_dir: str | Path, seed: int = 0, show_progress: bool = True,
                   argument: str = "--dataset") -> RealData:
    """The splits of a prepared dataset folder, cut as the module docstring says; errors name ``argument``."""
    from ...hub.cards import training_data_record

    dataset, schema = load_training_dataset(dataset_dir, (TRAIN_SPLIT, HOLDOUT_SPLIT), argument)
    train_split, holdout_split = dataset[TRAIN_SPLIT], dataset[HOLDOUT_SPLIT]
    if len(holdout_split) < 4:
        raise ValueError(f"{argument} {dataset_dir}: the holdout split has {len(holdout_split)} rows; the evaluation "
                         "needs at least 4 (two halves of at least 2)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(holdout_split))
    half = len(order) // 2
    eval_rows, reference_rows = np.sort(order[:half]), np.sort(order[half:])
    train_rows = np.sort(rng.choice(len(train_split), min(half, len(train_split)), replace=False))
    train_all = _vectors(train_split, schema, show_progress, "Encoding train")
    eval_split = holdout_split.select(eval_rows)
    summaries = list(eval_split["summary"]) if "summary" in eval_split.column_names else None
    present = [name for name in RECORD_FIELDS if name in eval_split.column_names]
    records = eval_split.select_columns(present).to_list()
    return RealData(
        schema=schema,
        train_all=train_all,
        train=train_all[train_rows],
        holdout_eval=_vectors(eval_split, schema, show_progress, "Encoding holdout (evaluation half)"),
        holdout_reference=_vectors(holdout_split.select(reference_rows), schema, show_progress,
                                   "Encoding holdout (reference half)"),
        train_rows=len(train_split),
        holdout_rows=len(holdout_split),
        synthetic_data=bool(training_data_record(dataset_dir)["synthetic"]),
        eval_summaries=summaries,
        eval_records=records,
    )


def _layout(schema: EHRSchema) -> list[dict[str, Any]]:
    """What decides where a value sits in a vector and what it means (titles are only labels)."""
    return [{key: value for key, value in group.to_dict().items() if key != "titles"} for group in schema.groups]


def check_same_schema(real: EHRSchema, synthetic: EHRSchema, real_name: str, synthetic_name: str) -> None:
    """A ValueError naming both sources and the first group that differs, when the vector layouts differ."""
    real_groups, synthetic_groups = _layout(real), _layout(synthetic)
    if real_groups == synthetic_groups:
        return
    for real_group, synthetic_group in zip(real_groups, synthetic_groups):
        if real_group != synthetic_group:
            differs = sorted(key for key in set(real_group) | set(synthetic_group)
                             if real_group.get(key) != synthetic_group.get(key))
            raise ValueError(f"{synthetic_name} and {real_name} use different schemas: group "
                             f"{real_group['name']!r} differs in {', '.join(differs)}; evaluate a model against the "
                             "dataset it was trained on")
    raise ValueError(f"{synthetic_name} has {len(synthetic_groups)} schema groups and {real_name} "
                     f"{len(real_groups)}; evaluate a model against the dataset it was trained on")
