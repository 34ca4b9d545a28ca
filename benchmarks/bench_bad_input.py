"""Times every row of the bad-input table (tests/test_bad_input.py) as a user meets it: ``ehr-diffusers ...`` in a
fresh process, from start to exit.

    python benchmarks/bench_bad_input.py --work /tmp/bench-bad-input [--markdown cases.md]

Builds the table's inputs once (a tiny MIMIC-IV folder, a 1,000-patient labelled demo dataset, a tiny EHR pipeline, a
12-subject chest X-ray cohort with its triplets and a tiny EHRXDiff pipeline), then runs each row's command line as
a subprocess and prints its exit status, wall time and first error line, then the side-by-side summary: the slowest
rows and the median. Goal: every validation error in under 2 s, before any model loads. ``--markdown`` also writes
the table of every row with its message (for the closing note of an issue, or a review).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _labelled_dataset(root: Path) -> Path:
    """The labelled demo dataset the table's training rows read, built as the tests build it."""
    from ehr_diffusers.data.ehr.cohort import prepare
    from ehr_diffusers.data.ehr.demo import write_demo_mimic
    from ehr_diffusers.text.embed import load_embedder
    from ehr_diffusers.text.judge import load_judge
    from ehr_diffusers.text.label import label_dataset
    from ehr_diffusers.text.summarize import load_summarizer

    write_demo_mimic(root / "demo-mimic", n_patients=1000, seed=3, show_progress=False)
    prepare(root / "demo-mimic", root / "labelled", show_progress=False, synthetic=True)
    label_dataset(root / "labelled", load_summarizer("template"), load_judge("rules"), load_embedder("minilm"),
                  show_progress=False, embedder_spec="minilm")
    return root / "labelled"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write every row and its message here")
    args = parser.parse_args(argv)

    from test_bad_input import CASES, build_world

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-bad-input-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    world = build_world(work / "world", _labelled_dataset(work))
    command = [str(Path(sys.executable).with_name("ehr-diffusers"))]
    rows = []
    for index, case in enumerate(CASES):
        tmp = work / f"case-{index:03d}"
        tmp.mkdir()
        argv_case = case.argv(world, tmp)
        start = time.perf_counter()
        done = subprocess.run([*command, *argv_case], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        message = next((line[line.index("ehr-diffusers "):] for line in done.stderr.splitlines()
                        if "ehr-diffusers " in line), "")
        message = message.replace(str(work) + "/", "")
        rows.append((case.name, done.returncode, seconds, message))
        print(f"{seconds:6.2f} s  exit {done.returncode}  {case.name}: {message}", flush=True)
    times = [row[2] for row in rows]
    slowest = sorted(rows, key=lambda row: -row[2])[:5]
    print(f"\n| {len(rows)} rows | seconds |\n|---|---:|")
    print(f"| median | {statistics.median(times):.2f} |")
    for name, _, seconds, _ in slowest:
        print(f"| slowest: {name} | {seconds:.2f} |")
    print(f"| rows over 2 s | {sum(t > 2 for t in times)} |")
    if args.markdown:
        lines = ["| row | exit | seconds | message |", "|---|---:|---:|---|"]
        lines += [f"| {name} | {code} | {seconds:.2f} | `{message.replace('|', '/')}` |"
                  for name, code, seconds, message in rows]
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
