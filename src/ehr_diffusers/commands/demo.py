"""``demo``: the whole workflow on the synthetic demo cohort (data, preparation, labels, training, samples,
evaluation), built in a temporary folder that replaces the working folder only when every step succeeded."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import load_pipeline
from .ehr_data import print_demo_summary
from .evaluate import run_evaluation
from .train import train_ehr


def run(args: argparse.Namespace) -> None:
    from ..data.ehr.cohort import CohortOptions, format_summary, prepare
    from ..data.ehr.demo import write_demo_mimic
    from ..io import atomic_directory
    from ..text.embed import load_embedder
    from ..text.judge import load_judge
    from ..text.label import label_dataset
    from ..text.summarize import load_summarizer

    # The demo folder is replaced as a whole, so a failed run never leaves a mix of old and new parts.
    with atomic_directory(args.out, args.overwrite) as work:
        generated = write_demo_mimic(work / "mimic-iv-demo", n_patients=args.patients, seed=args.seed,
                                     show_progress=not args.quiet)
        prepared = prepare(work / "mimic-iv-demo", work / "dataset", CohortOptions(seed=args.seed),
                           show_progress=not args.quiet, synthetic=True, source=str(args.out / "mimic-iv-demo"))
        labelled = label_dataset(work / "dataset", load_summarizer("template"), load_judge("rules"), load_embedder(),
                                 show_progress=not args.quiet, embedder_spec="minilm")
        print_demo_summary(generated, args.out / "mimic-iv-demo")
        print(f"prepared dataset written to {args.out / 'dataset'} (from the synthetic demo cohort)")
        print(format_summary(prepared))
        print("text labels (template summaries, rules judge, all-MiniLM-L6-v2 embeddings):")
        print(labelled.format())
        print(f"training the autoencoder and the diffusion model ({args.preset} preset) with accelerate launch ...",
              flush=True)
        train_ehr(work / "dataset", work, args.preset, args.autoencoder_epochs, args.diffusion_steps,
                  args.judge_threshold, seed=args.seed, quiet=args.quiet)
        samples = _demo_samples(work / "model", work / "dataset", args.seed)
        print("evaluating the model against the holdout and the baselines ...", flush=True)
        metrics, _ = run_evaluation(str(work / "model"), work / "dataset", work / "evaluation", quiet=args.quiet,
                                    device="cpu", names=(str(args.out / "model"), str(args.out / "dataset")),
                                    seed=args.seed)
    from ..evaluation.report import model_card_markdown

    print(samples)
    print(model_card_markdown(metrics))
    print(f"demo finished in {args.out}: the dataset (datasets.load_from_disk({str(args.out / 'dataset')!r})), the "
          f"pipeline (EHRLatentDiffusionPipeline.from_pretrained({str(args.out / 'model')!r}); "
          f"ehr-diffusers generate --model {args.out / 'model'} ...) and the evaluation report "
          f"({args.out / 'evaluation' / 'report.html'}, metrics in {args.out / 'evaluation' / 'metrics.json'})")


def _demo_samples(model_dir: Path, dataset_dir: Path, seed: int, records_per_prompt: int = 3) -> str:
    """A few generated records, each stated as a one-sentence summary, under the prompt it was generated from: three
    train patients' summaries (never the holdout's, which the evaluation scores against) and one free-text prompt."""
    from datasets import load_from_disk

    from ..sampling import generate_records
    from ..text.describe import DiagnosisOrder, FactDescriber, template_summary
    from ..text.label import load_label_metadata

    train = load_from_disk(str(dataset_dir))["train"]
    prompts = list(train.shuffle(seed=seed).select(range(min(3, len(train))))["summary"])
    prompts.append("65 year old woman with heart failure and chronic kidney disease")
    pipe = load_pipeline(str(model_dir), None, "cpu")
    result = generate_records(pipe, prompts, records_per_prompt, seed=seed, show_progress=False)
    # the order the labels used (principal diagnoses first), so generated records read like the prompts
    describer = FactDescriber(DiagnosisOrder(load_label_metadata(dataset_dir)["diagnosis_order"]["ranked_codes"]))
    lines = ["synthetic records (each stated as a summary) under the prompt they were generated from:"]
    for index, prompt in enumerate(prompts):
        lines.append(f"  prompt: {prompt}")
        for record in result.records[index * records_per_prompt : (index + 1) * records_per_prompt]:
            lines.append(f"    -> {template_summary(describer.facts(record))}")
    return "\n".join(lines)
