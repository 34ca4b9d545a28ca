"""``demo``: the whole workflow on a synthetic demo cohort, built in a temporary folder that replaces the working
folder only when every step succeeded: EHR (data, preparation, labels, training, samples, evaluation) by default,
chest X-ray (cohort, triplets, training, the finding classifier, evaluation) with ``--cxr``, both with ``--all``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import load_pipeline
from .ehr_data import print_demo_summary
from .evaluate import run_cxr_evaluation, run_evaluation
from .train import train_cxr, train_ehr

# DDIM steps of the X-ray demo's evaluation: three event conditions over the whole test split must fit the demo's
# time on 2 CPU cores (BENCHMARKS.md gives the figures at 25 steps too). The guidance scale was chosen on the
# validation split, never on test: at 3 the true-minus-shuffled Diff AUROC of the demo model tripled (BENCHMARKS.md).
CXR_DEMO_STEPS = 10
CXR_DEMO_GUIDANCE = 3.0


def run(args: argparse.Namespace) -> None:
    from ..io import atomic_directory

    # The demo folder is replaced as a whole, so a failed run never leaves a mix of old and new parts.
    with atomic_directory(args.out, args.overwrite) as work:
        if args.all:
            ehr = _ehr_demo(work / "ehr", args.out / "ehr", args)
            cxr = _cxr_demo(work / "cxr", args.out / "cxr", args)
        elif args.cxr:
            ehr, cxr = None, _cxr_demo(work, args.out, args)
        else:
            ehr, cxr = _ehr_demo(work, args.out, args), None
    for text in (ehr, cxr):
        if text:
            print(text)


def _ehr_demo(work: Path, out: Path, args: argparse.Namespace) -> str:
    """The EHR demo in ``work`` (renamed to ``out`` when every step succeeded); returns the closing text."""
    from ..data.ehr.cohort import CohortOptions, format_summary, prepare
    from ..data.ehr.demo import write_demo_mimic
    from ..evaluation.report import model_card_markdown
    from ..text.embed import load_embedder
    from ..text.judge import load_judge
    from ..text.label import label_dataset
    from ..text.summarize import load_summarizer

    generated = write_demo_mimic(work / "mimic-iv-demo", n_patients=args.patients, seed=args.seed,
                                 show_progress=not args.quiet)
    prepared = prepare(work / "mimic-iv-demo", work / "dataset", CohortOptions(seed=args.seed),
                       show_progress=not args.quiet, synthetic=True, source=str(out / "mimic-iv-demo"))
    labelled = label_dataset(work / "dataset", load_summarizer("template"), load_judge("rules"), load_embedder(),
                             show_progress=not args.quiet, embedder_spec="minilm")
    print_demo_summary(generated, out / "mimic-iv-demo")
    print(f"prepared dataset written to {out / 'dataset'} (from the synthetic demo cohort)")
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
                                device="cpu", names=(str(out / "model"), str(out / "dataset")), seed=args.seed)
    return (f"{samples}\n{model_card_markdown(metrics)}\n"
            f"demo finished in {out}: the dataset (datasets.load_from_disk({str(out / 'dataset')!r})), the "
            f"pipeline (EHRLatentDiffusionPipeline.from_pretrained({str(out / 'model')!r}); "
            f"ehr-diffusers generate --model {out / 'model'} ...) and the evaluation report "
            f"({out / 'evaluation' / 'report.html'}, metrics in {out / 'evaluation' / 'metrics.json'})")


def _cxr_demo(work: Path, out: Path, args: argparse.Namespace) -> str:
    """The chest X-ray demo in ``work`` (renamed to ``out`` when every step succeeded): synthetic cohort ->
    prepare-cxr (64 px copies, MiniLM event embeddings) -> train-cxr (demo preset) -> the finding classifier ->
    evaluate-cxr; returns the closing text."""
    from ..data.cxr.dataset import CXRDatasetOptions, EventEmbeddingOptions, format_cxr_summary, prepare_cxr
    from ..data.cxr.demo import write_demo_cxr
    from ..evaluation.cxr.extractors import save_classifier, train_classifier_for
    from ..evaluation.cxr.report import cxr_model_card_markdown
    from ..text.event_embeddings import EventEmbedder

    cohort = write_demo_cxr(work / "cohort", n_subjects=args.subjects, seed=args.seed, show_progress=not args.quiet)
    print(f"synthetic chest X-ray cohort written to {out / 'cohort'}: {cohort['subjects']:,} patients, "
          f"{cohort['studies']:,} studies, {cohort['images']:,} images", flush=True)
    summary = prepare_cxr(work / "cohort" / "mimic-cxr-jpg", work / "cohort" / "mimic-iv", work / "dataset",
                          CXRDatasetOptions(), show_progress=not args.quiet, synthetic=True,
                          embed_events=EventEmbedder(EventEmbeddingOptions(embedder="minilm")), image_size=64)
    print(f"triplet dataset written to {out / 'dataset'} (from the synthetic demo cohort)")
    print(format_cxr_summary(summary))
    print("training the chest X-ray VAE and the EHRXDiff diffusion model (demo preset) with accelerate launch, and "
          "meanwhile the evaluation's finding classifier on the train split ...", flush=True)
    # train-cxr's processes use one core each (the demo preset's one thread); the classifier takes the other
    scorer = _while_training(lambda: train_classifier_for(work / "dataset", 64, seed=args.seed, show_progress=False),
                             lambda: train_cxr(work / "dataset", work, "demo", diffusion_steps=args.diffusion_steps,
                                               seed=args.seed, quiet=args.quiet))
    save_classifier(scorer, work / "finding-classifier")
    scorer.source = f"saved in {out / 'finding-classifier'}"
    macro = scorer.figures.get("validation_macro_auroc")
    print(f"finding classifier: validation macro AUROC {f'{macro:.3f}' if isinstance(macro, float) else 'n/a'}; "
          f"predicting the test split with true, shuffled and no events ({CXR_DEMO_STEPS} DDIM steps, guidance "
          f"{CXR_DEMO_GUIDANCE:g}) and scoring ...", flush=True)
    metrics, _ = run_cxr_evaluation(str(work / "model"), work / "dataset", work / "evaluation", extractor=scorer,
                                    steps=CXR_DEMO_STEPS, guidance_scale=CXR_DEMO_GUIDANCE, seed=args.seed,
                                    quiet=args.quiet, device="cpu",
                                    names=(str(out / "model"), str(out / "dataset")))
    goals = "\n".join(f"  {'met' if goal['met'] else 'not met'}: {goal['goal']}" for goal in metrics["goals"])
    return (f"{cxr_model_card_markdown(metrics)}\n{goals}\n"
            f"X-ray demo finished in {out}: the triplets (datasets.load_from_disk({str(out / 'dataset')!r})), the "
            f"pipeline (EHRXDiffPipeline.from_pretrained({str(out / 'model')!r}); ehr-diffusers predict-cxr --model "
            f"{out / 'model'} ...) and the evaluation report ({out / 'evaluation' / 'report.html'}, metrics in "
            f"{out / 'evaluation' / 'metrics.json'})")


def _while_training(side: Callable[[], Any], training: Callable[[], Any]) -> Any:
    """Runs ``side`` on one torch thread in a thread of this process while ``training`` (which waits on its
    ``accelerate launch`` processes) runs; returns ``side``'s result, or raises its error once training is done."""
    import threading

    import torch

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = side()
        except BaseException as error:  # re-raised below, in the calling thread
            result["error"] = error

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker = threading.Thread(target=work, name="finding-classifier", daemon=True)
    worker.start()
    try:
        training()  # on an error the daemon worker is not waited for: its output goes with the demo folder
        worker.join()
    finally:
        torch.set_num_threads(threads)
    if "error" in result:
        raise result["error"]
    return result["value"]


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
