"""Event rendering and embedding throughput for EHRXDiff triplets: ``render_events`` over random MIMIC-IV-shaped
event tables (csv.gz and parquet), then the offline MiniLM embedder on the distinct event contents.

    OMP_NUM_THREADS=2 python benchmarks/bench_cxr_events.py [--triplets 20000] [--events 2000000] [--embed 4000]

The tables hold chart, lab, prescription and procedure events of the triplets' admissions (listed items and
unlisted ones, inside and outside the windows), as a MIMIC-IV extract filtered to these admissions would.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from ehr_diffusers.data.cxr.events import event_content, load_item_lists, render_events

EPOCH = datetime(2150, 1, 1)


def _times(hours: np.ndarray) -> pl.Series:
    return pl.Series(hours * 3600e6).cast(pl.Int64).cast(pl.Duration("us")) + pl.lit(EPOCH).cast(pl.Datetime("us"))


def make_tables(root: Path, n_triplets: int, n_events: int, seed: int, suffix: str) -> pl.DataFrame:
    """Windows of ``n_triplets`` triplets over n_triplets / 3 admissions, and ``n_events`` events in their tables."""
    rng = np.random.default_rng(seed)
    n_admissions = max(n_triplets // 3, 1)
    admission = rng.integers(0, n_admissions, n_triplets)
    admit = rng.uniform(0, 24 * 3650, n_admissions)
    start = admit[admission] + rng.uniform(0, 96, n_triplets)
    windows = pl.DataFrame({
        "triplet_id": np.arange(n_triplets, dtype=np.int64), "subject_id": 10_000_000 + admission,
        "hadm_id": 20_000_000 + admission,
        "window_start": pl.select(_times(start)).to_series(),
        "window_end": pl.select(_times(start + rng.uniform(4, 47, n_triplets))).to_series(),
    })
    items = load_item_lists()
    share = {"chartevents": 0.6, "labevents": 0.25, "prescriptions": 0.1, "procedureevents": 0.05}
    for table, fraction in share.items():
        n = int(n_events * fraction)
        owner = rng.integers(0, n_admissions, n)
        hours = admit[owner] + rng.uniform(0, 150, n)
        base = {"subject_id": 10_000_000 + owner, "hadm_id": 20_000_000 + owner}
        if table == "prescriptions":
            drugs = [*items.lists[table]["pattern"].head(20).str.to_titlecase().to_list(), "Acetaminophen", "Senna"]
            frame = pl.DataFrame({**base, "starttime": pl.select(_times(hours)).to_series(),
                                  "drug": rng.choice(drugs, n), "dose_val_rx": rng.integers(1, 500, n).astype(str),
                                  "dose_unit_rx": "mg", "route": "IV"})
        else:
            listed = items.lists[table]["itemid"].to_numpy()
            itemid = np.where(rng.random(n) < 0.7, rng.choice(listed, n), rng.integers(200_000, 230_000, n))
            time_column = "starttime" if table == "procedureevents" else "charttime"
            frame = pl.DataFrame({**base, "stay_id": 30_000_000 + owner,
                                  time_column: pl.select(_times(hours)).to_series(), "itemid": itemid,
                                  "value": np.round(rng.normal(80, 15, n), 1).astype(str), "valueuom": "unit"})
            if table == "labevents":
                frame = frame.drop("stay_id").with_columns(pl.lit(None, dtype=pl.String).alias("flag"))
        folder = root / ("hosp" if table in ("labevents", "prescriptions") else "icu")
        folder.mkdir(exist_ok=True)
        if suffix == ".parquet":
            frame.write_parquet(folder / f"{table}.parquet")
        else:
            frame.with_columns(pl.col(pl.Datetime).dt.strftime("%Y-%m-%d %H:%M:%S")).write_csv(
                folder / f"{table}.csv.gz", compression="gzip")
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triplets", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--max-events", type=int, default=1024)
    parser.add_argument("--embed", type=int, default=4_000, help="distinct event contents to embed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    contents = None
    for suffix in (".csv.gz", ".parquet"):
        with tempfile.TemporaryDirectory() as folder:
            windows = make_tables(Path(folder), args.triplets, args.events, args.seed, suffix)
            started = time.perf_counter()
            events, summary = render_events(folder, windows, max_events=args.max_events, show_progress=False)
            seconds = time.perf_counter() - started
        kept = int(sum(summary["events_kept"].values()))
        rows.append((f"render_events, {suffix} tables", seconds, f"{kept / seconds:,.0f} events kept/s"))
        contents = events["event_texts"].explode().drop_nulls().to_frame().select(
            event_content(pl.col("event_texts"))).to_series().unique().sort()
    from ehr_diffusers.text.embed import load_embedder

    embedder = load_embedder("minilm")
    sample = contents.sample(min(args.embed, len(contents)), seed=args.seed).to_list()
    started = time.perf_counter()
    embedder.encode(sample, batch_size=256)
    seconds = time.perf_counter() - started
    rows.append((f"MiniLM embedding of {len(sample):,} distinct contents", seconds,
                 f"{len(sample) / seconds:,.0f} texts/s"))
    print(f"{args.triplets:,} triplets, {args.events:,} events in the tables; {kept:,} (triplet, event) pairs kept, "
          f"{summary['events_per_triplet_mean']:.1f} per triplet; {len(contents):,} distinct contents")
    print(f"{'step':<50}{'seconds':>9}  throughput")
    for name, seconds, rate in rows:
        print(f"{name:<50}{seconds:>9.1f}  {rate}")


if __name__ == "__main__":
    main()
