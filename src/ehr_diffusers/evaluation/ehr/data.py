"""The real data an evaluation compares against: a prepared dataset's splits as schema vectors, cut the same way
for every method so that all rows of the comparison table use the same real records.

* ``holdout``: every holdout row, the real reference of every fidelity figure (and of plausibility), the test set of
  dimension-wise prediction and the unseen patients of the memorisation audit;
* ``holdout_eval``: a seeded half of the holdout, the non-members of membership inference (against ``train``, a train
  sample of the same size: the attack wants equal numbers of members and non-members) and the attacker's data of the
  attribute inference baseline;
* ``train``: that seeded train sample (members, attribute-inference victims);
* ``train_all``: the whole train split, which the baselines are fitted on as the model was, the source of the real
  train rows reference and of the TRTR classifiers' training rows (:meth:`RealData.train_sample`), and what the
  exact-copy audit compares with (dense float32: about 7 KB per patient at 1,800 columns, 2 GB for MIMIC-IV's
  300,000);
* ``prompts`` and ``prompt_records``: summaries of a seeded sample of train patients and those patients' records, for
  prompt faithfulness and the extractor check. Prompts never come from the holdout, whose patients are scored:
  ``holdout_summaries`` lets a caller's own prompts be checked against them, and a train summary whose text is also a
  holdout patient's summary is left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...data.ehr.dataset import HOLDOUT_SPLIT, TRAIN_SPLIT, iter_vectors, load_training_dataset
from ...data.ehr.schema import EHRSchema
from ...errors import ModelError

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("sex", "age", "death", "num_admissions", "marital_status", "race", "icd10_categories")
PROMPT_ROWS = 200


@dataclass
class RealData:
    """Schema vectors of the real splits (see the module docstring) and what the report says about them."""

    schema: EHRSchema
    train_all: np.ndarray
    train: np.ndarray
    holdout: np.ndarray
    holdout_eval: np.ndarray
    train_rows: int
    holdout_rows: int
    synthetic_data: bool
    prompts: list[str] | None = None
    prompt_records: list[dict[str, Any]] = field(default_factory=list)
    holdout_summaries: frozenset[str] = frozenset()

    def train_sample(self, n: int, seed: int) -> np.ndarray:
        """A seeded sample without replacement of min(``n``, train size) train rows, in train order: the real train
        rows reference, and the TRTR training set scored beside a synthetic set of ``n`` records."""
        if n >= len(self.train_all):
            return self.train_all
        return self.train_all[np.sort(np.random.default_rng(seed).choice(len(self.train_all), n, replace=False))]


def _vectors(split: Any, schema: EHRSchema, show_progress: bool, desc: str) -> np.ndarray:
    return np.concatenate([batch.numpy() for batch in iter_vectors(split, schema, 8192, desc, show_progress)])


def load_real_data(dataset_dir: str | Path, seed: int = 0, show_progress: bool = True,
                   argument: str = "--dataset", prompt_rows: int = PROMPT_ROWS) -> RealData:
    """The splits of a prepared dataset folder, cut as the module docstring says, with up to ``prompt_rows`` train
    summaries as prompts; errors name ``argument``."""
    from ...hub.cards import training_data_record

    dataset, schema = load_training_dataset(dataset_dir, (TRAIN_SPLIT, HOLDOUT_SPLIT), argument)
    train_split, holdout_split = dataset[TRAIN_SPLIT], dataset[HOLDOUT_SPLIT]
    if len(holdout_split) < 4:
        raise ValueError(f"{argument} {dataset_dir}: the holdout split has {len(holdout_split)} rows; the evaluation "
                         "needs at least 4 (two halves of at least 2)")
    rng = np.random.default_rng(seed)
    half = len(holdout_split) // 2
    eval_rows = np.sort(rng.permutation(len(holdout_split))[:half])
    train_rows = np.sort(rng.choice(len(train_split), min(half, len(train_split)), replace=False))
    train_all = _vectors(train_split, schema, show_progress, "Encoding train")
    holdout = _vectors(holdout_split, schema, show_progress, "Encoding holdout")
    prompts, prompt_records, holdout_summaries = None, [], frozenset()
    if "summary" in holdout_split.column_names:
        holdout_summaries = frozenset(summary for summary in holdout_split["summary"] if summary)
    if "summary" in train_split.column_names:
        summaries = train_split["summary"]
        # a seeded order of the train rows with a summary that is not also a holdout patient's
        order = [int(i) for i in rng.permutation(len(train_split))
                 if summaries[i] and summaries[i] not in holdout_summaries]
        chosen = train_split.select(order[:prompt_rows])
        prompts = list(chosen["summary"])
        prompt_records = chosen.select_columns([n for n in RECORD_FIELDS if n in chosen.column_names]).to_list()
    return RealData(
        schema=schema,
        train_all=train_all,
        train=train_all[train_rows],
        holdout=holdout,
        holdout_eval=holdout[eval_rows],
        train_rows=len(train_split),
        holdout_rows=len(holdout_split),
        synthetic_data=bool(training_data_record(dataset_dir)["synthetic"]),
        prompts=prompts,
        prompt_records=prompt_records,
        holdout_summaries=holdout_summaries,
    )


def _layout(schema: EHRSchema) -> list[dict[str, Any]]:
    """What decides where a value sits in a vector and what it means (titles are only labels)."""
    return [{key: value for key, value in group.to_dict().items() if key != "titles"} for group in schema.groups]


def check_same_schema(real: EHRSchema, synthetic: EHRSchema, real_name: str, synthetic_name: str) -> None:
    """A ModelError naming both sources and the first group that differs, when the vector layouts differ."""
    real_groups, synthetic_groups = _layout(real), _layout(synthetic)
    if real_groups == synthetic_groups:
        return
    for real_group, synthetic_group in zip(real_groups, synthetic_groups):
        if real_group != synthetic_group:
            differs = sorted(key for key in set(real_group) | set(synthetic_group)
                             if real_group.get(key) != synthetic_group.get(key))
            raise ModelError(f"{synthetic_name} and {real_name} use different schemas: group "
                             f"{real_group['name']!r} differs in {', '.join(differs)}; evaluate a model against the "
                             "dataset it was trained on")
    raise ModelError(f"{synthetic_name} has {len(synthetic_groups)} schema groups and {real_name} "
                     f"{len(real_groups)}; evaluate a model against the dataset it was trained on")
