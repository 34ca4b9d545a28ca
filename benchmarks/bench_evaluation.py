"""Speed of the evaluation suite at MIMIC-IV size: 50,000 train, 50,000 holdout and 50,000 synthetic records of
~1,800 columns (the issue's goal: the full suite in under 60 s on 2 cores). Fidelity, the dimension-wise test set and
the memorisation audit use the whole holdout; membership inference a train sample and half the holdout, as
``ehr-diffusers evaluate`` does.

The records are random but shaped like MIMIC-IV vectors: ~1,780 ICD-10 categories with heavy-tailed prevalence
(the most common ~35%) and comorbidity clusters, ~12 codes per patient, sex, age, death, admissions, marital status
and race. "Synthetic" is a perturbed copy of the generating process, so every metric has something to measure.
Each step is timed on its own and the total printed in a table; results go into BENCHMARKS.md.

    OMP_NUM_THREADS=2 python benchmarks/bench_evaluation.py --rows 50000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema

MARITAL = ["DIVORCED", "MARRIED", "SINGLE", "WIDOWED", "MISSING"]
RACE = ["AMERICAN INDIAN/ALASKA NATIVE", "ASIAN", "BLACK", "HISPANIC/LATINO", "NATIVE HAWAIIAN/PACIFIC ISLANDER",
        "OTHER", "UNKNOWN", "WHITE", "MISSING"]


def make_schema(n_codes: int) -> EHRSchema:
    letters = "ABCDEFGHIJKLMNOPQRSTZ"
    codes = sorted({f"{letters[i % len(letters)]}{i // len(letters):02d}" for i in range(n_codes)})
    return EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=18.0, maximum=91.0),
        ColumnGroup("death", "binary", [False, True]),
        ColumnGroup("num_admissions", "count", minimum=0.0, maximum=200.0),
        ColumnGroup("marital_status", "one_hot", MARITAL),
        ColumnGroup("race", "one_hot", RACE),
        ColumnGroup("icd10_categories", "multi_hot", codes),
    ])


def make_records(schema: EHRSchema, n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """``n`` random MIMIC-shaped vectors; ``shift`` perturbs the prevalences (a stand-in for a generator's error)."""
    rng = np.random.default_rng(seed)
    structure = np.random.default_rng(12345)  # the population, shared by every set
    d = schema["icd10_categories"].width
    base = 0.35 / np.arange(1, d + 1) ** 0.9
    base *= 12 / base.sum() * 0.7
    clusters = structure.random((8, d)) < 0.01
    prevalence = np.clip(base * np.exp(shift * rng.normal(size=d)), 0, 0.9)
    codes = rng.random((n, d), dtype=np.float32) < prevalence
    membership = rng.integers(0, 8, n)
    boost = clusters[membership] & (rng.random((n, d), dtype=np.float32) < 0.25)
    codes |= boost
    out = np.zeros((n, schema.dim), dtype=np.float32)
    out[:, 0] = rng.random(n) < 0.52
    out[:, 1] = rng.beta(3, 2, n)
    out[:, 2] = rng.random(n) < 0.1 + 0.2 * out[:, 1]
    out[:, 3] = np.log1p(rng.geometric(0.45, n)) / np.log1p(200)
    marital = schema.slices["marital_status"]
    out[np.arange(n), marital.start + rng.choice(len(MARITAL), n, p=[0.08, 0.42, 0.3, 0.12, 0.08])] = 1
    race = schema.slices["race"]
    out[np.arange(n), race.start + rng.choice(len(RACE), n, p=[0.01, 0.04, 0.15, 0.06, 0.01, 0.05, 0.05, 0.62,
                                                               0.01])] = 1
    out[:, schema.slices["icd10_categories"]] = codes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows in each of train, holdout and synthetic")
    parser.add_argument("--codes", type=int, default=1_780)
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates (default: the suite's)")
    args = parser.parse_args()

    from ehr_diffusers.evaluation.ehr.data import RealData
    from ehr_diffusers.evaluation.ehr.suite import score_sets

    schema = make_schema(args.codes)
    started = time.perf_counter()
    train, holdout = make_records(schema, args.rows, 1), make_records(schema, args.rows, 2)
    half = args.rows // 2
    real = RealData(schema=schema, train_all=train, train=train[:half], holdout=holdout, holdout_eval=holdout[:half],
                    train_rows=args.rows, holdout_rows=args.rows, synthetic_data=True)
    synthetic = make_records(schema, args.rows, 4, shift=0.3)
    made = time.perf_counter() - started
    options = {} if args.bootstrap is None else {"bootstrap_reps": args.bootstrap}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    score_sets(real, {"synthetic": synthetic}, seed=0, timings=timings, show_progress=False, **options)
    total = time.perf_counter() - started
    print(f"records: {args.rows:,} train, {args.rows:,} holdout ({half:,} as non-members), {args.rows:,} synthetic; "
          f"{schema.dim:,} columns ({args.codes:,} codes); data made in {made:.1f} s")
    print(f"{'step':<32}{'seconds':>10}")
    for step, seconds in timings.items():
        print(f"{step:<32}{seconds:>10.1f}")
    print(f"{'total (goal < 60 s)':<32}{total:>10.1f}")


if __name__ == "__main__":
    main()
