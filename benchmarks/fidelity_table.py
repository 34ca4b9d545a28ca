"""The fidelity table: the model against SDV's GaussianCopula (a published peer), independent marginals and real
train rows (the reference), each figure as the mean over seeds with a 95% t interval, written into BENCHMARKS.md in
one marked block per cohort.

The model is either given (``--model/--dataset``, e.g. the one ``ehr-diffusers demo`` trains) or built by the
script (``--patients N --work DIR``) with the functions ``ehr-diffusers demo`` runs, seed 0: the synthetic demo
cohort at N patients, ``prepare``, ``label`` (template summaries, rules judge, MiniLM embeddings) and ``train-ehr
--preset demo``. Each stage is kept in DIR, so a rerun only scores.

Every seed redoes everything that is random in the scoring: the evaluation's cut of the real data, the model's
records and each baseline's (the EHRDiff-style model is retrained per seed). The GaussianCopula is fitted once, on
the same train split as the model (SDV's fit is deterministic), and sampled with each seed. Every set holds
``--records`` records. ``--methods`` also offers the EHRDiff-style model ("ehrdiff") and HealthForge's sampler
configuration run on this model ("seed_sampler": ancestral, variance interpolation 0.1, 1,000 steps; HealthForge's
2.8B-parameter denoiser cannot be trained on a CPU).

    ehr-diffusers demo --out ehr-diffusers-demo
    python benchmarks/fidelity_table.py --model ehr-diffusers-demo/model --dataset ehr-diffusers-demo/dataset \
        --write BENCHMARKS.md
    python benchmarks/fidelity_table.py --patients 20000 --work /tmp/fidelity-20000 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ehr_diffusers.evaluation.ehr.baselines import BASELINES
from peers import GaussianCopulaPeer, sdv_available

METHODS = ("model", "gaussian_copula", *BASELINES, "seed_sampler")
DEFAULT_METHODS = ("model", "gaussian_copula", "bernoulli", "train")
PEER_LABELS = {"gaussian_copula": "SDV GaussianCopula (peer)"}
# The real side's figures that a row is read against, each after the row it belongs to (the same in every column).
REFERENCE_ROWS = {
    "tstr_auroc": ("utility", "trtr_auroc", "Dimension-wise TRTR AUROC (real train rows, the reference)", "-"),
    "aia_f1": ("privacy", "aia_baseline_f1", "Attribute inference F1 with the holdout as data (baseline)", "-"),
}
BUILD_SEED = 0  # ehr-diffusers demo's default


def _timed(label: str, step: Callable[[], object]) -> float:
    print(f"{label} ...", flush=True)
    begun = time.perf_counter()
    step()
    seconds = time.perf_counter() - begun
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def build(work: Path, patients: int, autoencoder_epochs: int | None, diffusion_steps: int | None) -> dict:
    """The demo workflow's cohort and model in ``work``, each stage skipped when its output is there; returns
    ``build.json`` (the settings and each stage's seconds, kept from the run that made it)."""
    from ehr_diffusers.commands.train import TRAINING_PRESETS, train_ehr
    from ehr_diffusers.data.ehr.cohort import CohortOptions, prepare
    from ehr_diffusers.data.ehr.demo import write_demo_mimic
    from ehr_diffusers.text.embed import load_embedder
    from ehr_diffusers.text.judge import load_judge
    from ehr_diffusers.text.label import LABELS_NAME, label_dataset
    from ehr_diffusers.text.summarize import load_summarizer

    # the preset's arguments too, so that a model trained before the preset changed is not scored as its result
    settings = {"patients": patients, "seed": BUILD_SEED, "preset": "demo", "autoencoder_epochs": autoencoder_epochs,
                "diffusion_steps": diffusion_steps, "preset_arguments": TRAINING_PRESETS["demo"]}
    record_path = work / "build.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        differs = [key for key in settings if record["settings"].get(key) != settings[key]]
        if differs:
            raise SystemExit(f"--work {work} was built with other {', '.join(differs)} (see its build.json): pass "
                             "another --work or remove it")
    elif work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work}: not empty and not built by this script (no build.json)")
    else:
        work.mkdir(parents=True, exist_ok=True)
        record = {"settings": settings, "seconds": {}}
    mimic, dataset = work / "mimic-iv-demo", work / "dataset"
    stages = [
        ("demo-data", mimic.is_dir(),
         lambda: write_demo_mimic(mimic, n_patients=patients, seed=BUILD_SEED, show_progress=False)),
        ("prepare", dataset.is_dir(),
         lambda: prepare(mimic, dataset, CohortOptions(seed=BUILD_SEED), show_progress=False, synthetic=True)),
        ("label", (dataset / LABELS_NAME).is_file(),
         lambda: label_dataset(dataset, load_summarizer("template"), load_judge("rules"), load_embedder(),
                               show_progress=False, embedder_spec="minilm")),
        ("train-ehr --preset demo", (work / "model" / "model_index.json").is_file(),
         lambda: train_ehr(dataset, work, "demo", autoencoder_epochs, diffusion_steps, seed=BUILD_SEED, quiet=True)),
    ]
    for name, done, step in stages:
        if done:
            print(f"{name}: kept from an earlier run in {work}", flush=True)
            continue
        record["seconds"][name] = _timed(f"{name} ({patients:,} patients)", step)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _seed_sampler_vectors(pipe, n: int, seed: int, batch_size: int) -> np.ndarray:
    from ehr_diffusers.sampling import generate_records
    from ehr_diffusers.schedulers.scheduling_logsnr_cosine import LogSNRCosineScheduler

    default = pipe.scheduler
    pipe.scheduler = LogSNRCosineScheduler.from_config(default.config, solver="ancestral", variance_interpolation=0.1)
    try:
        return generate_records(pipe, None, n, batch_size=batch_size, seed=seed, show_progress=False,
                                num_inference_steps=1000).vectors
    finally:
        pipe.scheduler = default


def run(model: str, dataset: Path, seeds: list[int], methods: tuple[str, ...], records: int, ehrdiff_steps: int,
        batch_size: int) -> tuple[dict, dict, dict]:
    """Scores every method's records for every seed; returns the figures' values per (method, key), each method's
    seconds per seed (with "scoring" and the copula's one fit), and the cohort's split sizes."""
    from ehr_diffusers.evaluation.ehr.baselines import baseline_vectors
    from ehr_diffusers.evaluation.ehr.data import load_real_data
    from ehr_diffusers.evaluation.ehr.suite import score_sets
    from ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline
    from ehr_diffusers.sampling import generate_records

    pipe = EHRLatentDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    values: dict[tuple[str, str], list[float]] = {}
    seconds: dict[str, list[float]] = {}
    copula: GaussianCopulaPeer | None = None
    sizes: dict[str, int] = {}
    started = time.perf_counter()
    for seed in seeds:
        real = load_real_data(dataset, seed=seed, show_progress=False)
        sizes = {"train": real.train_rows, "holdout": real.holdout_rows}
        if "gaussian_copula" in methods and copula is None:
            print(f"GaussianCopula fit on {len(real.train_all):,} train rows ...", flush=True)
            begun = time.perf_counter()
            copula = GaussianCopulaPeer().fit(real.train_all, real.schema)
            seconds["gaussian_copula fit"] = [time.perf_counter() - begun]
            print(f"GaussianCopula fit: {seconds['gaussian_copula fit'][0]:.1f} s", flush=True)
        sets: dict[str, np.ndarray] = {}
        for method in methods:
            begun = time.perf_counter()
            if method == "model":
                # as a user gets them: the pipeline's default steps and decoding (its config's decode_mode)
                sets[method] = generate_records(pipe, None, records, batch_size=batch_size, seed=seed,
                                                show_progress=False).vectors
            elif method == "seed_sampler":
                sets[method] = _seed_sampler_vectors(pipe, records, seed, batch_size)
            elif method == "gaussian_copula":
                sets[method] = copula.sample(records, seed)
            else:
                sets.update(baseline_vectors([method], real, records, seed, ehrdiff_steps, show_progress=False))
            seconds.setdefault(method, []).append(time.perf_counter() - begun)
            print(f"seed {seed}: {method} records in {seconds[method][-1]:.1f} s", flush=True)
        begun = time.perf_counter()
        scored = score_sets(real, sets, seed=seed, show_progress=False)
        seconds.setdefault("scoring", []).append(time.perf_counter() - begun)
        for method, result in scored.items():
            for section in result["figures"].values():
                for key, figure in section.items():
                    if figure["value"] is not None:
                        values.setdefault((method, key), []).append(figure["value"])
        print(f"seed {seed}: scored in {seconds['scoring'][-1]:.1f} s ({time.perf_counter() - started:.0f} s so far)",
              flush=True)
    return values, seconds, sizes


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
    """The evaluation's comparison rows (``presentation.COMPARISON``, a real target's value in the "better" cell as in
    the report) with the reference rows after theirs; a figure that no method has is left out."""
    from ehr_diffusers.evaluation.ehr.presentation import COMPARISON, METHOD_LABELS, REAL_REFERENCES, with_reference

    labels = METHOD_LABELS | PEER_LABELS
    listed = {key for _, key, _, _ in COMPARISON}
    rows = []
    for row in COMPARISON:
        rows.append(row)
        if row[1] in REFERENCE_ROWS and REFERENCE_ROWS[row[1]][1] not in listed:
            rows.append(REFERENCE_ROWS[row[1]])
    lines = ["| figure | better | " + " | ".join(labels.get(m, m) for m in methods) + " |",
             "|---|---|" + "---:|" * len(methods)]
    for _, key, label, better in rows:
        if not any((m, key) in values for m in methods):
            continue
        if key in REAL_REFERENCES:  # the real side's figure, the same in every method's scores
            real = next((values[m, REAL_REFERENCES[key][1]] for m in methods if (m, REAL_REFERENCES[key][1]) in values),
                        None)
            better = with_reference(better, {"value": float(np.mean(real)) if real else None})
        cells = " | ".join(_cell(key, values.get((m, key)), len(seeds)) for m in methods)
        lines.append(f"| {label} | {better} | {cells} |")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def block(values: dict, seconds: dict, sizes: dict, seeds: list[int], methods: tuple[str, ...], records: int,
          built: dict | None, total: float, skipped: str | None) -> str:
    """The marked block: the command, the table, and the cohort, records per set, seeds and times under it."""
    patients = sizes["train"] + sizes["holdout"]
    if built is not None:
        settings = built["settings"]
        overrides = "".join(f", {name.replace('_', ' ')} {settings[name]}" for name in
                            ("autoencoder_epochs", "diffusion_steps") if settings[name] is not None)
        origin = (f"the synthetic demo cohort at {patients:,} patients ({sizes['train']:,} train, "
                  f"{sizes['holdout']:,} holdout) and its model (`train-ehr --preset demo`{overrides}, seed "
                  f"{settings['seed']}), built by the script in "
                  + ", ".join(f"{name} {_minutes(s)}" for name, s in built["seconds"].items()))
    else:
        origin = f"a cohort of {patients:,} patients ({sizes['train']:,} train, {sizes['holdout']:,} holdout)"
    per_seed = ", ".join(f"{m} {_minutes(float(np.mean(seconds[m])))}" for m in methods)
    fit = (f"; the GaussianCopula fitted once in {_minutes(seconds['gaussian_copula fit'][0])}"
           if "gaussian_copula fit" in seconds else "")
    lines = [
        "```bash",
        "python benchmarks/fidelity_table.py " + shlex.join(sys.argv[1:]),
        "```",
        "",
        table(values, seeds, methods),
        "",
        f"{datetime.date.today().isoformat()}: {origin}. {records:,} records per set, scored against the real "
        f"holdout; mean over seeds {', '.join(map(str, seeds))} with a 95% t interval over seeds. Records made per "
        f"seed in: {per_seed}{fit}; scoring {_minutes(float(np.mean(seconds['scoring'])))} per seed; "
        f"{_minutes(total)} in all.",
    ]
    if skipped:
        lines.append(f"\n{skipped}")
    return "\n".join(lines)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- fidelity-table:{name}:start -->", f"<!-- fidelity-table:{name}:end -->"


def write_into(path: Path, name: str, text: str) -> None:
    """Replaces the block ``name`` of ``path``; everything outside it stays as it was."""
    start, end = markers(name)
    content = path.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{path}: no {start} ... {end} block; add both lines where the table goes")
    head, _, rest = content.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def _quiet_libraries() -> None:
    """No library progress bars: the script prints one line per stage, which is what a long run's log should hold."""
    import datasets
    import transformers
    from diffusers.utils import logging as diffusers_logging

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained pipeline folder (with --dataset)")
    parser.add_argument("--dataset", type=Path, help="the prepared, labelled dataset the model was trained on")
    parser.add_argument("--patients", type=int, help="build the demo cohort at this size and its model in --work")
    parser.add_argument("--work", type=Path, help="folder for --patients' cohort and model, reused by a rerun")
    parser.add_argument("--autoencoder-epochs", type=int, default=None, help="with --patients: override the preset")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="with --patients: override the preset")
    parser.add_argument("--records", type=int, default=4000, help="records per set (default 4,000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--ehrdiff-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--write", type=Path, default=None, help="BENCHMARKS.md to write the table into")
    parser.add_argument("--block", default=None,
                        help="the marked block to replace (default: the --patients count, else 'demo')")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _quiet_libraries()
    if (args.patients is None) == (args.model is None):
        parser.error("either --model and --dataset, or --patients and --work")
    if args.model is not None and args.dataset is None:
        parser.error("--model needs --dataset")
    if args.patients is not None and (args.work is None or args.dataset is not None):
        parser.error("--patients needs --work (and builds its own dataset)")
    if args.patients is None and (args.autoencoder_epochs is not None or args.diffusion_steps is not None):
        parser.error("--autoencoder-epochs and --diffusion-steps shape the model that --patients builds")
    if args.records < 1:
        parser.error("--records: a positive number")
    if len(set(args.seeds)) < 3 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: at least 3 different seeds, for an interval over seeds")
    methods = tuple(dict.fromkeys(args.methods))
    skipped = None
    if "gaussian_copula" in methods and not sdv_available():
        skipped = "SDV GaussianCopula skipped: SDV is not installed (pip install -e .[bench])."
        print(skipped, flush=True)
        methods = tuple(m for m in methods if m != "gaussian_copula")
    name = args.block or (str(args.patients) if args.patients is not None else "demo")
    started = time.perf_counter()
    built, model, dataset = None, args.model, args.dataset
    if args.patients is not None:
        built = build(args.work, args.patients, args.autoencoder_epochs, args.diffusion_steps)
        model, dataset = str(args.work / "model"), args.work / "dataset"
    values, seconds, sizes = run(model, dataset, args.seeds, methods, args.records, args.ehrdiff_steps,
                                 args.batch_size)
    text = block(values, seconds, sizes, args.seeds, methods, args.records, built, time.perf_counter() - started,
                 skipped)
    print(text)
    if args.write is not None:
        write_into(args.write, name, text)
        print(f"table written into {args.write} (block {name!r})")


if __name__ == "__main__":
    main()
