"""``demo-cxr-data`` and ``prepare-cxr``: the synthetic longitudinal chest X-ray cohort, and MIMIC-CXR-JPG +
MIMIC-IV -> EHRXDiff triplet dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ArgumentError, DataError, EHRDiffusersError
from .launch import LaunchOptions, accelerate_launch, check_launch, cuda_device_count


def run_demo_data(args: argparse.Namespace) -> None:
    from ..data.cxr.demo import write_demo_cxr

    summary = write_demo_cxr(args.out, n_subjects=args.subjects, seed=args.seed, overwrite=args.overwrite,
                             show_progress=not args.quiet, real_data=not args.no_real_data, workers=args.workers)
    print(f"synthetic chest X-ray cohort written to {args.out}: {summary['subjects']:,} patients, "
          f"{summary['admissions']:,} admissions, {summary['studies']:,} studies, {summary['images']:,} images "
          f"(statistics: {summary['statistics_source']}, real lung masks: {summary['real_lung_masks']})")
    print(f"next: ehr-diffusers prepare-cxr --cxr-dir {args.out / 'mimic-cxr-jpg'} --mimic-dir "
          f"{args.out / 'mimic-iv'} --out DIR")


def run_prepare(args: argparse.Namespace) -> None:
    from ..data.cxr.dataset import (
        CXRDatasetOptions,
        EventEmbeddingOptions,
        check_image_size,
        format_cxr_summary,
        prepare_cxr,
    )
    from ..data.cxr.demo import is_demo_cxr
    from ..data.cxr.triplets import TripletOptions
    from ..io import check_output_dir

    # everything a user can get wrong is checked here, before the embedder loads
    triplets = TripletOptions(window_hours=args.window_hours, split=args.split, seed=args.seed,
                              validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
                              check_images=not args.no_image_check, strict=args.strict)
    options = CXRDatasetOptions(triplets=triplets, max_events=args.max_events, item_lists=args.items)
    check_image_size(args.image_size)
    for argument, folder in (("--cxr-dir", args.cxr_dir), ("--mimic-dir", args.mimic_dir), ("--items", args.items)):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{argument} {folder}: no such folder")
    check_output_dir(args.out, args.overwrite, {"--cxr-dir": args.cxr_dir, "--mimic-dir": args.mimic_dir},
                     argument="--out")
    launch = LaunchOptions.from_args(args)
    if args.cache_latents != (args.vae is not None):
        raise ArgumentError("--cache-latents and --vae go together: --cache-latents --vae ID_OR_DIR encodes the images "
                            "with that VAE")
    launch_flags = {"--num-processes": args.num_processes, "--num-machines": args.num_machines,
                    "--machine-rank": args.machine_rank, "--main-process-ip": args.main_process_ip,
                    "--main-process-port": args.main_process_port, "--accelerate-config": args.accelerate_config}
    given = [flag for flag, value in launch_flags.items() if value is not None]
    if given and not args.cache_latents:
        raise ArgumentError(f"{', '.join(given)}: only --cache-latents runs processes; add --cache-latents --vae VAE, "
                            "or leave them out")
    if args.cache_latents:
        from ..hub.errors import check_model_path

        check_model_path(args.vae, "--vae")
        check_launch(launch, cuda_device_count())
    if args.knowledge is not None and args.retrieval:
        from ..text.retrieval import load_knowledge

        load_knowledge(args.knowledge)
    embedding = EventEmbeddingOptions(embedder=None if args.embedder == "none" else args.embedder,
                                      batch_size=args.batch_size, retrieval=args.retrieval,
                                      retrieval_k=args.retrieval_k, retrieval_weight=args.retrieval_weight,
                                      knowledge=args.knowledge)
    embed_events = None
    if embedding.embedder is not None:  # the text layer (torch, transformers) loads only when it is needed
        from ..text.event_embeddings import EventEmbedder

        embed_events = EventEmbedder(embedding)  # checks that faiss is there for --retrieval, before any work
    synthetic = is_demo_cxr(args.cxr_dir)
    summary = prepare_cxr(args.cxr_dir, args.mimic_dir, args.out, options, overwrite=args.overwrite,
                          show_progress=not args.quiet, synthetic=synthetic, embed_events=embed_events,
                          image_size=args.image_size)
    print(f"triplet dataset written to {args.out}" + (" (from the synthetic demo cohort)" if synthetic else ""))
    print(format_cxr_summary(summary))
    if args.cache_latents:
        try:
            cache_latents(args.out, args.vae, launch, quiet=args.quiet)
        except EHRDiffusersError as error:
            raise type(error)(f"{error}. The dataset in {args.out} is complete; encode its latents alone with "
                              f"`ehr-diffusers cache-latents --dataset {args.out} --vae {args.vae}`") from None
        print(f"latents of {args.vae} cached in {args.out}")


def cache_latents(dataset: Path, vae: str, launch: LaunchOptions | None = None, batch_size: int = 64,
                  shard_size: int = 1024, resolution: int | None = None, quiet: bool = False) -> None:
    """Encodes every image of a ``prepare-cxr`` dataset with ``vae`` once, sharded over the launch's processes, and
    stores the latents in the dataset (``training/cache_cxr_latents.py``); run again after a stop, it encodes only
    the shards that were not saved."""
    from ..data.cxr.split import load_dataset_dict
    from ..hub.errors import check_model_path

    launch = launch or LaunchOptions()
    try:
        load_dataset_dict(dataset)
    except (DataError, FileNotFoundError) as error:
        raise DataError(f"--dataset {error}") from None
    check_model_path(vae, "--vae")
    check_launch(launch, cuda_device_count())
    arguments = ["--train_data_dir", str(dataset), "--vae_path", vae, "--batch_size",
                 str(batch_size), "--shard_size", str(shard_size)]
    if resolution is not None:
        arguments += ["--resolution", str(resolution)]
    accelerate_launch("ehr_diffusers.training.cache_cxr_latents", arguments, launch, quiet)


def run_cache_latents(args: argparse.Namespace) -> None:
    cache_latents(args.dataset, args.vae, LaunchOptions.from_args(args), args.batch_size, args.shard_size,
                  args.resolution, args.quiet)
    print(f"latents of {args.vae} cached in {args.dataset}; train-cxr --vae {args.vae} reads them instead of "
          "encoding the images")
