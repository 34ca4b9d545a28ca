"""``evaluate-cxr`` speed on the CPU: the scoring per 1,000 test triplets with sampling excluded, and the sampling
itself at several DDIM step counts.

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate_cxr.py --model DIR/model --dataset DIR/dataset \
        [--sample-triplets 128] [--inference-steps 25 100] [--bootstrap 200] [--threads 1]

* ``scoring``: everything ``evaluate-cxr`` does after the predictions exist, on the whole split: the events-only
  baseline's fit on the train split, the finding scorer over the seven image stacks (three predicted ones, the
  previous and the target images), SSIM, and every figure over ``--bootstrap`` cluster resamples. Stand-in
  predictions (the previous images) cost what real ones do. The finding classifier must be cached already (a first
  ``evaluate-cxr`` run trains it; its training time is printed by ``--train-classifier``).
* ``sampling``: ``--sample-triplets`` test triplets predicted with their events at each ``--inference-steps``; an
  evaluation predicts every triplet three times (true, shuffled and no events).

Prints a side-by-side table with the load average at the start and the end; ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def _load() -> tuple[float, ...]:
    return tuple(round(value, 2) for value in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an EHRXDiffPipeline folder (train-cxr's model/)")
    parser.add_argument("--dataset", type=Path, required=True, help="the prepare-cxr dataset it was trained on")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sample-triplets", type=int, default=128)
    parser.add_argument("--inference-steps", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-classifier", action="store_true",
                        help="also time the finding classifier's training (then cached, as evaluate-cxr does)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ehr_diffusers import EHRXDiffPipeline
    from ehr_diffusers.data.cxr.split import load_cxr_split
    from ehr_diffusers.data.cxr.triplets import CHEXPERT_LABELS
    from ehr_diffusers.evaluation.cxr.baselines import events_only_scores
    from ehr_diffusers.evaluation.cxr.classifier import binary_findings
    from ehr_diffusers.evaluation.cxr.extractors import cache_folder, load_scorer, save_classifier, train_classifier_for
    from ehr_diffusers.evaluation.cxr.suite import EVENT_CONDITIONS, predict_images, score_methods

    load_start = _load()
    pipe = EHRXDiffPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = int(pipe.vae.config.sample_size)
    split = load_cxr_split(args.dataset, args.split, size, show_progress=False)
    rows: list[tuple[str, float, float]] = []
    if args.train_classifier:
        start = time.perf_counter()
        trained = train_classifier_for(args.dataset, size, show_progress=False)
        rows.append(("finding classifier training (once per dataset)", time.perf_counter() - start, float("nan")))
        save_classifier(trained, cache_folder(args.dataset, size))  # what evaluate-cxr would cache
    scorer = load_scorer("classifier", args.dataset, size, show_progress=False)
    columns = [CHEXPERT_LABELS.index(name) for name in scorer.finding_names]

    start = time.perf_counter()
    train = load_cxr_split(args.dataset, "train", size, show_progress=False, images=False)
    events_only = events_only_scores(train.event_embeddings, binary_findings(train.chexpert_target)[:, columns],
                                     split.event_embeddings, split.event_dim)
    predictions = {method: split.previous for method in EVENT_CONDITIONS}
    score_methods(split, scorer.finding_names, columns, scorer.encode, predictions, events_only,
                  reps=args.bootstrap, show_progress=False)
    seconds = time.perf_counter() - start
    rows.append((f"scoring, {args.bootstrap} resamples (sampling excluded)", seconds, seconds * 1000 / len(split)))

    count = min(args.sample_triplets, len(split))  # the first triplets: predict_images reads no other field
    subset = dataclasses.replace(split, previous=split.previous[:count], target=split.target[:count],
                                 event_embeddings=split.event_embeddings[:count],
                                 event_hours=split.event_hours[:count], triplet_id=split.triplet_id[:count])
    for steps in args.inference_steps:
        start = time.perf_counter()
        with torch.inference_mode():
            predict_images(pipe, subset, "true", num_inference_steps=steps, batch_size=args.batch_size,
                           show_progress=False)
        seconds = time.perf_counter() - start
        rows.append((f"sampling, {steps} DDIM steps, one condition ({count} triplets)", seconds,
                     seconds * 1000 / count))
    result = {"rows": rows, "triplets": len(split), "load_start": load_start, "load_end": _load(),
              "threads": args.threads}
    print(f"{'step':<62} {'seconds':>9} {'s per 1,000 triplets':>21}")
    for name, seconds, per_thousand in rows:
        print(f"{name:<62} {seconds:>9.1f} {per_thousand:>21.1f}")
    print(f"{len(split)} {args.split} triplets; {args.threads} torch thread(s); load average {load_start} at the "
          f"start, {result['load_end']} at the end")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
