"""Data-parallel training on CPUs: 1 process against 2 (over gloo), for both pipelines' diffusion training and for the
X-ray latent caching, launched as the commands launch them (``commands.launch.accelerate_launch``).

    python benchmarks/bench_scale_out.py --work /tmp/bench-scale-out [--repeats 2] [--markdown table.md]

Set-ups, each run in turn within a repeat so that a change of load touches all alike:

* ``1 x 1``: one process, one thread; ``1 x 2``: one process, two threads; ``2 x 1``: two processes of one thread
  (what ``--num-processes 2`` gives on 2 cores with the demo presets' one thread per process).

Throughput is measured without start-up: each training run is launched twice, for a short and a long number of
optimisation steps (``--ehr-steps``, ``--cxr-steps``), and the rate is the extra records (or triplets) of the long
run over its extra seconds. The batch is per process, so 2 processes see twice the records per step. The latent
cache is timed whole (start-up included: it is one pass) on a copy of the dataset per run.

Data: the EHR demo cohort (``--patients``, labelled as the demo does, autoencoder trained once) and the synthetic X-ray
demo cohort (``--subjects``, 64 px copies, MiniLM events) with a random 64 px VAE of the demo preset's sizes (speed
does not depend on the weights). The demo presets' model sizes and batches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETUPS = {"1 x 1": (1, 1), "1 x 2": (1, 2), "2 x 1": (2, 1)}


def _run(command: list[str], threads: int) -> float:
    """Seconds of one CLI or launch run with ``threads`` intra-op threads per process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _launch(module: str, arguments: list[str], processes: int, threads: int) -> list[str]:
    code = ("import sys; from ehr_diffusers.commands.launch import LaunchOptions, accelerate_launch; "
            f"accelerate_launch({module!r}, sys.argv[1:], LaunchOptions(num_processes={processes}), quiet=True, "
            f"cpu_threads={threads})")
    return [sys.executable, "-c", code, *arguments]


def build(work: Path, patients: int, subjects: int) -> dict[str, Path]:
    """The labelled EHR dataset with a trained autoencoder, and the X-ray triplets with a random VAE (kept between
    runs)."""
    paths = {"ehr": work / "ehr" / "dataset", "autoencoder": work / "ehr" / "autoencoder-training",
             "cxr": work / "cxr" / "dataset", "vae": work / "cxr" / "vae"}
    cli = [sys.executable, "-m", "ehr_diffusers.cli"]
    if not paths["autoencoder"].is_dir():
        shutil.rmtree(work / "ehr", ignore_errors=True)
        _run([*cli, "demo-data", "--out", str(work / "ehr" / "mimic"), "--patients", str(patients), "-q"], 2)
        _run([*cli, "prepare", "--mimic-dir", str(work / "ehr" / "mimic"), "--out", str(paths["ehr"]), "-q"], 2)
        _run([*cli, "label", "--dataset", str(paths["ehr"]), "-q"], 2)
        from ehr_diffusers.commands.train import TRAINING_PRESETS

        _run(_launch("ehr_diffusers.training.train_ehr_autoencoder",
                     ["--train_data_dir", str(paths["ehr"]), "--output_dir", str(paths["autoencoder"]), "--seed", "0",
                      *TRAINING_PRESETS["demo"]["autoencoder"], "--num_train_epochs", "5", "--report_to", "none"],
                     1, 2), 2)
    if not paths["vae"].is_dir():
        shutil.rmtree(work / "cxr", ignore_errors=True)
        _run([*cli, "demo-cxr-data", "--out", str(work / "cxr" / "cohort"), "--subjects", str(subjects), "-q"], 2)
        _run([*cli, "prepare-cxr", "--cxr-dir", str(work / "cxr" / "cohort" / "mimic-cxr-jpg"), "--mimic-dir",
              str(work / "cxr" / "cohort" / "mimic-iv"), "--out", str(paths["cxr"]), "--image-size", "64", "-q"], 2)
        import torch
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
                      latent_channels=4, norm_num_groups=16, sample_size=64).save_pretrained(paths["vae"])
    return paths


def training_rate(module: str, arguments: list[str], batch: int, processes: int, threads: int, out: Path,
                  short: int, long: int) -> float:
    """Records (or triplets) per second of optimisation, start-up excluded: (long - short) steps over their seconds."""
    seconds = {}
    for steps in (short, long):
        shutil.rmtree(out, ignore_errors=True)
        seconds[steps] = _run(_launch(module, [*arguments, "--output_dir", str(out), "--max_train_steps", str(steps)],
                                      processes, threads), threads)
    return (long - short) * batch * processes / (seconds[long] - seconds[short])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--subjects", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ehr-steps", type=int, nargs=2, default=(50, 1050), metavar=("SHORT", "LONG"),
                        help="optimisation steps of the two EHR runs (the demo model's step takes milliseconds)")
    parser.add_argument("--cxr-steps", type=int, nargs=2, default=(10, 70), metavar=("SHORT", "LONG"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    from ehr_diffusers.commands.train import CXR_TRAINING_PRESETS, TRAINING_PRESETS

    paths = build(args.work, args.patients, args.subjects)
    ehr = ["--train_data_dir", str(paths["ehr"]), "--autoencoder_path", str(paths["autoencoder"]), "--seed", "0",
           "--report_to", "none", "--checkpointing_steps", "100000", *TRAINING_PRESETS["demo"]["diffusion"]]
    cxr = ["--train_data_dir", str(paths["cxr"]), "--vae_path", str(paths["vae"]), "--seed", "0", "--report_to",
           "none", "--checkpointing_steps", "100000", *CXR_TRAINING_PRESETS["demo"]["diffusion"],
           "--validation_steps", "100000", "--validation_images", "0", "--validation_triplets", "256",
           "--validation_draws", "1"]
    rows: dict[str, dict[str, list[float]]] = {name: {"ehr": [], "cxr": [], "cache": []} for name in SETUPS}
    loads = []
    for _ in range(args.repeats):
        for name, (processes, threads) in SETUPS.items():
            loads.append(os.getloadavg()[0])
            rows[name]["ehr"].append(training_rate("ehr_diffusers.training.train_ehr_diffusion", ehr, 256, processes,
                                                   threads, args.work / "run-ehr", *args.ehr_steps))
            rows[name]["cxr"].append(training_rate("ehr_diffusers.training.train_ehrxdiff", cxr, 32, processes,
                                                   threads, args.work / "run-cxr", *args.cxr_steps))
            copy = args.work / "cache-copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(paths["cxr"], copy)
            images = len({p for split in ("train", "validation", "test") for p in _paths(copy, split)})
            seconds = _run(_launch("ehr_diffusers.training.cache_cxr_latents",
                                   ["--train_data_dir", str(copy), "--vae_path", str(paths["vae"]), "--shard_size",
                                    "256"], processes, threads), threads)
            rows[name]["cache"].append(images / seconds)
    medians = {name: {key: statistics.median(values) for key, values in row.items()} for name, row in rows.items()}
    lines = ["| set-up (processes x threads) | EHR diffusion, records/s | X-ray diffusion, triplets/s | "
             "latent cache, images/s (with start-up) |", "|---|---:|---:|---:|"]
    for name, figures in medians.items():
        ratio = {key: figures[key] / medians["1 x 1"][key] for key in figures}
        lines.append(f"| {name} | {figures['ehr']:,.0f} ({ratio['ehr']:.2f}x) | {figures['cxr']:,.1f} "
                     f"({ratio['cxr']:.2f}x) | {figures['cache']:,.1f} ({ratio['cache']:.2f}x) |")
    table = "\n".join(lines)
    note = (f"medians of {args.repeats} repeat(s); ratios against 1 x 1; 1-minute load average "
            f"{min(loads):.2f}-{max(loads):.2f} before the runs; {os.cpu_count()} cores")
    print(table)
    print(note)
    if args.markdown:
        args.markdown.write_text(table + "\n\n" + note + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "medians": medians, "loads": loads}, indent=2))


def _paths(dataset: Path, split: str) -> list[str]:
    from datasets import load_from_disk

    table = load_from_disk(str(dataset / split))
    return list(table["previous_image"]) + list(table["target_image"])


if __name__ == "__main__":
    main()
