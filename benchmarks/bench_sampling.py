"""Times EHRLatentDiffusionPipeline's default sampler against HealthForge's sampler configuration on one trained demo
model.

    python benchmarks/bench_sampling.py --model ehr-diffusers-demo/model --dataset ehr-diffusers-demo/dataset

(``ehr-diffusers demo --out ehr-diffusers-demo`` trains that model.) On ``--threads`` CPU threads, it generates
``--records`` records conditioned on summaries of train patients (each summary used equally often; never the
holdout's, which the records are scored against), with:

* the default sampler: the pipeline's scheduler as saved (DPM-Solver++(2M)), its default steps and guidance scale,
  conditional and null predictions in one batched pass, 4,096 records per batch (``ehr_diffusers.sampling``);
* HealthForge's configuration ("seed" below): the ancestral sampler with variance interpolation 0.1, 1,000 steps, the
  conditional and the null pass as two separate model calls, 100 records per call, the same guidance scale.

Both decode with the model's calibrated thresholds and both use the learned null condition, so the comparison is
the sampler alone. Beside each rate: prevalence Pearson r of the ICD-10 categories against the holdout split (the
split no model saw and no prompt came from), with the real train split as the reference. Prompts are the summaries of
a seeded sample of train patients as large as the holdout, leaving out any whose text is also a holdout patient's
summary. Then it times ``--large-records`` records with the
default sampler. Goal: at least 50x faster at equal or better fidelity, and 100,000 records in under 60 s.
Results go into BENCHMARKS.md. ``--seed-records`` < ``--records`` times the seed configuration on fewer records
(its rate does not depend on the count) and says so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _prevalence_r(vectors: np.ndarray, reference: np.ndarray, codes: slice) -> float:
    return float(np.corrcoef(vectors[:, codes].mean(axis=0), reference[:, codes].mean(axis=0))[0, 1])


def _seed_sampler(pipe, embeds, guidance_scale: float, steps: int, per_call: int, seed: int):
    """HealthForge's loop: ancestral steps, two unbatched passes per step, ``per_call`` records per call."""
    import torch

    from ehr_diffusers.schedulers.scheduling_logsnr_cosine import LogSNRCosineScheduler

    scheduler = LogSNRCosineScheduler.from_config(pipe.scheduler.config, solver="ancestral",
                                                  variance_interpolation=0.1)
    generator = torch.Generator().manual_seed(seed)
    vectors = []
    with torch.no_grad():
        for start in range(0, len(embeds), per_call):
            condition = embeds[start : start + per_call]
            null = pipe.denoiser.null_condition_embeds(len(condition))
            latents = torch.randn(len(condition), pipe.denoiser.config.latent_dim, generator=generator)
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                logsnr = scheduler.logsnr(t).float()
                eps_cond = pipe.denoiser(latents, logsnr, condition).sample
                eps_null = pipe.denoiser(latents, logsnr, null).sample
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
                latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
            vectors.append(pipe.decode_latents(latents).numpy())
    return np.concatenate(vectors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="trained pipeline folder")
    parser.add_argument("--dataset", type=Path, required=True, help="the labelled dataset it was trained on")
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--seed-records", type=int, default=10_000)
    parser.add_argument("--large-records", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import inspect

    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_from_disk

    from ehr_diffusers.data.ehr.schema import EHRSchema
    from ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline
    from ehr_diffusers.sampling import generate_records

    pipe = EHRLatentDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_from_disk(str(args.dataset))
    schema = EHRSchema.load(args.dataset)
    codes = schema.slices["icd10_categories"]
    holdout = schema.encode(dataset["holdout"][:])
    train = schema.encode(dataset["train"][:])
    holdout_summaries = set(dataset["holdout"]["summary"])
    train_summaries = dataset["train"]["summary"]
    rows = [int(i) for i in np.random.default_rng(args.seed).permutation(len(train_summaries))
            if train_summaries[i] not in holdout_summaries][: len(holdout)]
    prompted = dataset["train"].select(rows)
    summaries = list(prompted["summary"])
    embeds = torch.tensor(np.asarray(prompted.with_format("numpy")["embedding"][:]), dtype=torch.float32)
    defaults = inspect.signature(pipe.__call__).parameters
    steps, guidance = defaults["num_inference_steps"].default, defaults["guidance_scale"].default
    per_prompt = max(1, args.records // len(summaries))
    order = np.repeat(np.arange(len(summaries)), per_prompt)

    rows = []
    start = time.perf_counter()
    ours = generate_records(pipe, summaries, per_prompt, seed=args.seed, show_progress=False, decode_mode="threshold")
    seconds = time.perf_counter() - start
    rows.append((f"default: {pipe.scheduler.config.solver}, {steps} steps, batched guidance, 4,096 per batch",
                 len(ours.records), seconds, _prevalence_r(ours.vectors, holdout, codes)))

    seed_order = order[: args.seed_records]
    start = time.perf_counter()
    seed_vectors = _seed_sampler(pipe, embeds[torch.from_numpy(seed_order)], guidance, 1000, 100, args.seed)
    seconds = time.perf_counter() - start
    rows.append(("seed: ancestral (v = 0.1), 1,000 steps, two passes per step, 100 per call", len(seed_vectors),
                 seconds, _prevalence_r(seed_vectors, holdout, codes)))

    large_per_prompt = max(1, args.large_records // len(summaries))
    start = time.perf_counter()
    large = generate_records(pipe, summaries, large_per_prompt, seed=args.seed + 1, show_progress=False,
                             decode_mode="threshold")
    seconds = time.perf_counter() - start
    rows.append((f"default at scale ({len(large.records):,} records)", len(large.records), seconds,
                 _prevalence_r(large.vectors, holdout, codes)))

    base_rate = rows[1][1] / rows[1][2]
    print(f"| {time.strftime('%Y-%m-%d')}, guidance scale {guidance}, {args.threads} threads | records | seconds | "
          "records/s | speed-up | prevalence r vs holdout |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, seconds, r in rows:
        print(f"| {name} | {n:,} | {seconds:,.1f} | {n / seconds:,.0f} | {n / seconds / base_rate:,.0f}x | {r:.3f} |")
    print(f"| reference: the real train split | {len(train):,} | | | | {_prevalence_r(train, holdout, codes):.3f} |")
    if args.seed_records < args.records:
        print(f"\nThe seed configuration ran on {args.seed_records:,} records (the first prompts in the same order); "
              "its rate does not depend on the count.")


if __name__ == "__main__":
    main()
