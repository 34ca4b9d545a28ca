"""The baseline table: the model against independent marginals, the real holdout, an EHRDiff-style model and
HealthForge's sampler configuration ("seed"), each figure as the mean over seeds with a 95% t interval, written into
BENCHMARKS.md.

Every seed redoes everything that is random: the cut of the holdout into its evaluation and reference halves, the
train sample, the model's records, the marginals' records and the EHRDiff-style model's training and records. The
seed sampler is HealthForge's (ancestral, variance interpolation 0.1, 1,000 steps) run on this model: HealthForge's
2.8B-parameter denoiser (``EHRDenoiserModel.seed_reference_config()``) cannot be trained on a CPU.

    python benchmarks/fidelity_table.py --model ehr-diffusers-demo/model --dataset ehr-diffusers-demo/dataset \
        --seeds 0 1 2 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

START, END = "<!-- fidelity-table:start -->", "<!-- fidelity-table:end -->"
METHODS = ("model", "seed_sampler", "ehrdiff", "bernoulli", "holdout")


def _seed_sampler_vectors(pipe, n: int, seed: int, batch_size: int) -> np.ndarray:
    from ehr_diffusers.sampling import generate_records
    from ehr_diffusers.schedulers.scheduling_logsnr_cosine import LogSNRCosineScheduler

    default = pipe.scheduler
    pipe.scheduler = LogSNRCosineScheduler.from_config(default.config, solver="ancestral", variance_interpolation=0.1)
    try:
        return generate_records(pipe, None, n, batch_size=batch_size, seed=seed, show_progress=False,
                                num_inference_steps=1000, decode_mode="threshold").vectors
    finally:
        pipe.scheduler = default


def run(model: str, dataset: Path, seeds: list[int], methods: tuple[str, ...], ehrdiff_steps: int,
        batch_size: int) -> tuple[dict, dict, float]:
    from ehr_diffusers.evaluation.ehr.baselines import baseline_vectors
    from ehr_diffusers.evaluation.ehr.data import load_real_data
    from ehr_diffusers.evaluation.ehr.suite import score_sets
    from ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline
    from ehr_diffusers.sampling import generate_records

    pipe = EHRLatentDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    values: dict[tuple[str, str], list[float]] = {}
    seconds: dict[str, list[float]] = {}
    started = time.perf_counter()
    for seed in seeds:
        real = load_real_data(dataset, seed=seed, show_progress=False)
        n = len(real.holdout_eval)
        sets: dict[str, np.ndarray] = {}
        for method in methods:
            begun = time.perf_counter()
            if method == "model":
                sets[method] = generate_records(pipe, None, n, batch_size=batch_size, seed=seed,
                                                show_progress=False, decode_mode="threshold").vectors
            elif method == "seed_sampler":
                sets[method] = _seed_sampler_vectors(pipe, n, seed, batch_size)
            else:
                sets.update(baseline_vectors([method], real, n, seed, ehrdiff_steps, show_progress=False))
            seconds.setdefault(method, []).append(time.perf_counter() - begun)
        scored = score_sets(real, sets, seed=seed, show_progress=False)
        for method, result in scored.items():
            for section in result["figures"].values():
                for key, figure in section.items():
                    if figure["value"] is not None:
                        values.setdefault((method, key), []).append(figure["value"])
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)
    return values, seconds, time.perf_counter() - started


def _cell(key: str, samples: list[float] | None, runs: int) -> str:
    """mean [95% t interval over seeds, cut to the figure's range]; a figure missing in some seeds says in how many
    it exists."""
    from ehr_diffusers.evaluation.ehr.figures import figure_support
    from ehr_diffusers.evaluation.stats import cut_to_range, mean_interval

    if not samples:
        return "n/a"
    mean = float(np.mean(samples))
    digits = 3 if abs(mean) < 100 else 1
    if len(samples) < 2:
        return f"{mean:.{digits}f} (1 seed)"
    low, high = cut_to_range(mean_interval(samples), figure_support(key))
    text = f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return text if len(samples) == runs else f"{text} ({len(samples)} of {runs} seeds)"


def table(values: dict, seeds: list[int], methods: tuple[str, ...]) -> str:
    from ehr_diffusers.evaluation.ehr.presentation import COMPARISON, METHOD_LABELS

    extra = (("fidelity", "codes_per_patient_synthetic_mean", "Codes per patient (real holdout: see that column)",
              "close to real"),
             ("utility", "trtr_auroc", "Dimension-wise TRTR AUROC (real train, the reference)", "-"),
             ("privacy", "aia_baseline_f1", "Attribute inference F1 with the holdout as data (baseline)", "-"))
    rows = [*COMPARISON[:7], extra[1], *COMPARISON[7:11], extra[2], *COMPARISON[11:], extra[0]]
    lines = ["| figure | better | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
             "|---|---|" + "---:|" * len(methods)]
    for _, key, label, better in rows:
        cells = " | ".join(_cell(key, values.get((m, key)), len(seeds)) for m in methods)
        lines.append(f"| {label} | {better} | {cells} |")
    return "\n".join(lines)


def write_into(path: Path, block: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path}: no {START} ... {END} block to replace")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ehrdiff-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--write", type=Path, default=None, help="BENCHMARKS.md to write the table into")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if len(set(args.seeds)) < 3 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: at least 3 different seeds, for an interval over seeds")
    methods = tuple(args.methods)
    values, seconds, total = run(args.model, args.dataset, args.seeds, methods, args.ehrdiff_steps, args.batch_size)
    block = table(values, args.seeds, methods)
    timing = ", ".join(f"{m} {np.mean(seconds[m]):.0f} s" for m in methods)
    block += (f"\n\nMean over seeds {', '.join(map(str, args.seeds))} with a 95% t interval over seeds; "
              f"{total / 60:.1f} min in all; records made per seed in: {timing}.")
    print(block)
    if args.write is not None:
        write_into(args.write, block)
        print(f"table written into {args.write}")


if __name__ == "__main__":
    main()
