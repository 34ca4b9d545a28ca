"""Times ``ehr-diffusers prepare`` at MIMIC-IV scale against a reimplementation of the HealthForge reference
implementation's approach.

    python benchmarks/bench_prepare.py --patients 300000 --work /tmp/bench-prepare

Builds a synthetic demo cohort of ``--patients`` patients (300,000 give about 5 million diagnosis rows),
then runs, each in a fresh process so that peak memory is its own:

* ``prepare``: this project's polars build, the same code as the CLI, writing the DatasetDict;
* ``seed approach``: the HealthForge reference implementation's way, pandas tables and one query per batch of 512
  patients, building the same per-patient records (demographics + ICD-10 categories through the same GEM table) in
  Python.

Goal for ``prepare``: under 120 s and under 4 GB peak memory on 2 cores. Results go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_prepare(mimic: Path, out: Path) -> dict:
    from ehr_diffusers.data.ehr.cohort import prepare

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = prepare(mimic, out, show_progress=False)
    return {"seconds": time.perf_counter() - start, "patients": summary["patients"],
            "diagnosis_rows": summary["diagnosis_rows"], "vocabulary": summary["vocabulary_size"]}


def run_seed(mimic: Path, batches: int | None) -> dict:
    """The HealthForge reference implementation's approach: pandas frames, a query per 512-patient batch, per-patient
    Python loops."""
    import numpy as np
    import pandas as pd

    from ehr_diffusers.data.ehr.icd import GemMapper

    start = time.perf_counter()
    hosp = mimic / "hosp"
    patients = pd.read_csv(hosp / "patients.csv.gz")
    admissions = pd.read_csv(hosp / "admissions.csv.gz", parse_dates=["admittime"])
    diagnoses = pd.read_csv(hosp / "diagnoses_icd.csv.gz", dtype={"icd_code": str})
    gem = GemMapper().table.to_pandas().groupby("icd9")["category"].apply(list).to_dict()
    subjects = patients["subject_id"].to_numpy()
    chunks = [subjects[i : i + 512] for i in range(0, len(subjects), 512)]
    done = chunks if batches is None else chunks[:batches]
    loaded = time.perf_counter() - start
    rows = []
    for batch in done:  # noqa: B007  (read by DataFrame.query's "@batch")
        dx = diagnoses.query("subject_id in @batch")
        adm = admissions.query("subject_id in @batch")
        pat = patients.query("subject_id in @batch")
        for _, patient in pat.iterrows():
            sid = patient["subject_id"]
            p_adm = adm[adm["subject_id"] == sid].sort_values("admittime")
            p_dx = dx[dx["subject_id"] == sid]
            categories = set()
            for code, version in zip(p_dx["icd_code"], p_dx["icd_version"]):
                categories.update(gem.get(code, []) if version == 9 else [code[:3]])
            rows.append(
                {
                    "subject_id": sid,
                    "sex": patient["gender"],
                    "age": patient["anchor_age"],
                    "death": not pd.isna(patient["dod"]),
                    "num_admissions": len(p_adm),
                    "marital_status": (p_adm["marital_status"].dropna().iloc[-1]
                                       if p_adm["marital_status"].notna().any() else None),
                    "race": p_adm["race"].iloc[-1] if len(p_adm) else None,
                    "codes": sorted(categories),
                }
            )
    vocabulary = sorted({c for row in rows for c in row["codes"]})
    index = {c: i for i, c in enumerate(vocabulary)}
    vectors = np.zeros((len(rows), len(vocabulary)), dtype=np.float32)
    for i, row in enumerate(rows):
        vectors[i, [index[c] for c in row["codes"]]] = 1.0
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "patients": len(rows), "batches_run": len(done), "batches_total": len(chunks)}
    if len(done) < len(chunks):  # extrapolate the per-batch part linearly (not the loading), stated in the table
        result["extrapolated_seconds"] = loaded + (seconds - loaded) * len(chunks) / len(done)
    return result


def _child(args: argparse.Namespace) -> None:
    if args.child == "prepare":
        result = run_prepare(args.work / "mimic", args.work / "prepared")
    else:
        result = run_seed(args.work / "mimic", args.seed_batches)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-prepare"))
    parser.add_argument("--seed-batches", type=int, default=None,
                        help="run only the first N batches of the seed approach and extrapolate (default: all)")
    parser.add_argument("--child", choices=("prepare", "seed"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return

    from ehr_diffusers.data.ehr.demo import write_demo_mimic

    start = time.perf_counter()  # always regenerated: a cached cohort could predate a change of the generator
    generated = write_demo_mimic(args.work / "mimic", n_patients=args.patients, seed=args.seed, overwrite=True,
                                 show_progress=False)
    print(f"demo cohort: {generated} in {time.perf_counter() - start:.1f} s")

    results = {}
    for name in ("prepare", "seed"):
        command = [sys.executable, __file__, "--child", name, "--work", str(args.work)]
        if args.seed_batches is not None:
            command += ["--seed-batches", str(args.seed_batches)]
        finished = subprocess.run(command, check=True, capture_output=True, text=True)
        results[name] = json.loads(finished.stdout.strip().splitlines()[-1])

    ours, seed = results["prepare"], results["seed"]
    seed_seconds = seed.get("extrapolated_seconds", seed["seconds"])
    note = ("" if "extrapolated_seconds" not in seed
            else f" ({seed['batches_run']}/{seed['batches_total']} batches, extrapolated)")
    print(f"\ninput: {ours['patients']:,} patients, {ours['diagnosis_rows']:,} diagnosis rows\n")
    print(f"| {'':<28} | {'prepare (polars)':>18} | {'seed approach (pandas, 512/batch)':>34} |")
    print(f"|{'-' * 30}|{'-' * 20}|{'-' * 36}|")
    print(f"| {'wall time (s)':<28} | {ours['seconds']:>18.1f} | {seed_seconds:>34.1f} |")
    print(f"| {'peak memory (MB)':<28} | {ours['peak_rss_mb']:>18.0f} | {seed['peak_rss_mb']:>34.0f} |")
    print(f"| {'speed-up of prepare':<28} | {seed_seconds / ours['seconds']:>17.1f}x | {'1.0x':>34} |")
    print(f"\nseed approach{note}; goal for prepare: < 120 s and < 4096 MB")


if __name__ == "__main__":
    main()
