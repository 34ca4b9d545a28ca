"""Times ``ehr-diffusers label`` with the offline defaults (template summaries, rules judge, all-MiniLM-L6-v2).

    python benchmarks/bench_label.py --patients 5000 --threads 2 --work /tmp/bench-label

Builds the synthetic demo cohort of ``--patients`` patients and prepares it, then times, on ``--threads`` CPU threads:

* each stage alone over every patient (facts and fact text, template summaries, rules judge, MiniLM embeddings at
  the batch sizes given), so that the slow one is visible;
* ``label_dataset`` end to end, the code behind the CLI, including the atomic rewrite of the dataset folder.

Goal: 300 patients/s or better end to end on 2 cores. With ``--llm ID`` (a local folder or a cached Hub id, on a
GPU machine) it also times that causal LM as the summariser on ``--llm-patients`` patients, at each batch size.
Results go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "inf"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--embedder-dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--llm", default=None, help="also time this causal LM (Hub id or folder) as summariser")
    parser.add_argument("--llm-patients", type=int, default=256)
    parser.add_argument("--llm-batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_from_disk

    from ehr_diffusers.data.ehr.cohort import prepare
    from ehr_diffusers.data.ehr.demo import write_demo_mimic
    from ehr_diffusers.text.describe import DiagnosisOrder, FactDescriber, fact_text
    from ehr_diffusers.text.embed import load_embedder
    from ehr_diffusers.text.label import label_dataset
    from ehr_diffusers.text.rules_judge import RulesJudge
    from ehr_diffusers.text.summarize import TemplateSummarizer

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-label-"))
    shutil.rmtree(work, ignore_errors=True)
    write_demo_mimic(work / "mimic", n_patients=args.patients, seed=0, show_progress=False)
    prepare(work / "mimic", work / "dataset", show_progress=False, synthetic=True)
    dataset = load_from_disk(str(work / "dataset"))
    rows = [row for split in dataset.values() for row in split]
    n = len(rows)

    timings: list[tuple[str, float]] = []
    start = time.perf_counter()
    describer = FactDescriber(DiagnosisOrder.from_code_lists(dataset["train"]["icd10_categories"]))
    facts = [describer.facts(row) for row in rows]
    texts = [fact_text(patient) for patient in facts]
    timings.append(("facts + fact text", time.perf_counter() - start))
    start = time.perf_counter()
    summaries = TemplateSummarizer().summarize(facts)
    timings.append(("template summaries", time.perf_counter() - start))
    judge = RulesJudge()  # building the lexicon (ICD-10-CM tabular list) is a one-off cost, timed apart
    judge.score(facts[:1], summaries[:1])
    start = time.perf_counter()
    judge.score(facts, summaries)
    timings.append(("rules judge", time.perf_counter() - start))
    embedders = {dtype: load_embedder("minilm", torch_dtype=getattr(torch, dtype)) for dtype in args.embedder_dtypes}
    tokens = sum(len(ids) for ids in next(iter(embedders.values())).tokenizer(summaries)["input_ids"]) / n
    for dtype, embedder in embedders.items():
        embedder.encode(summaries[:8])
        for batch_size in args.batch_sizes:
            start = time.perf_counter()
            embedder.encode(summaries, batch_size=batch_size)
            timings.append((f"MiniLM {dtype} embeddings, batch {batch_size}", time.perf_counter() - start))
    del texts

    end_to_end = []
    for dtype, embedder in embedders.items():
        start = time.perf_counter()
        label_dataset(work / "dataset", TemplateSummarizer(), RulesJudge(), embedder, batch_size=args.batch_sizes[0],
                      show_progress=False)
        end_to_end.append((f"label_dataset end to end, {dtype}", time.perf_counter() - start))

    print(f"\nlabelling {n:,} demo patients on {args.threads} threads (goal: 300 patients/s end to end); "
          f"summaries average {tokens:.1f} MiniLM tokens\n")
    print(f"| {'stage':<40} | {'seconds':>8} | {'patients/s':>10} |")
    print(f"|{'-' * 42}|{'-' * 10}:|{'-' * 12}:|")
    for name, seconds in timings:
        print(f"| {name:<40} | {seconds:8.2f} | {_rate(n, seconds):>10} |")
    for name, seconds in end_to_end:
        print(f"| {name + ' (batch ' + str(args.batch_sizes[0]) + ')':<40} | {seconds:8.2f} "
              f"| {_rate(n, seconds):>10} |")

    if args.llm:
        from ehr_diffusers.text.generation import CausalLMGenerator
        from ehr_diffusers.text.summarize import LLMSummarizer

        generator = CausalLMGenerator(args.llm)
        subset = facts[: args.llm_patients]
        print(f"\n{args.llm} as summariser, {len(subset)} patients, device {generator.device}\n")
        print(f"| {'batch size':>10} | {'seconds':>8} | {'patients/s':>10} | {'fallbacks':>9} |")
        print(f"|{'-' * 11}:|{'-' * 9}:|{'-' * 11}:|{'-' * 10}:|")
        for batch_size in args.llm_batch_sizes:
            summarizer = LLMSummarizer(generator, batch_size=batch_size)
            summarizer.summarize(subset[:batch_size])  # warm-up
            summarizer.fallbacks = 0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            summarizer.summarize(subset)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            print(f"| {batch_size:>10} | {seconds:8.2f} | {len(subset) / seconds:10.2f} | {summarizer.fallbacks:>9} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
