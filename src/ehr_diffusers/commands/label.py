"""``label``: facts_text, summary, judge_scores and embedding columns added to a prepared dataset."""

from __future__ import annotations

import argparse

from .common import torch_device


def _label_models(args: argparse.Namespace):
    """The summariser, judge and embedder named on the command line; one LLM is loaded once when both use it."""
    import torch

    from ..text.embed import load_embedder
    from ..text.generation import CausalLMGenerator
    from ..text.judge import load_judge
    from ..text.summarize import load_summarizer

    device = torch_device(args.device)
    options = {"batch_size": args.batch_size, "seed": args.seed}
    generators: dict[str, CausalLMGenerator] = {}

    def llm(spec: str) -> CausalLMGenerator:
        if spec not in generators:
            generators[spec] = CausalLMGenerator(spec, device=device, trust_remote_code=args.trust_remote_code)
        return generators[spec]

    summarizer = load_summarizer("template") if args.summarizer == "template" else \
        load_summarizer(llm(args.summarizer), **options)
    judge = load_judge(args.judge) if args.judge in ("rules", "none") else load_judge(llm(args.judge), **options)
    embedder = load_embedder(args.embedder, torch_dtype=getattr(torch, args.embedder_dtype),
                             trust_remote_code=args.trust_remote_code)
    return summarizer, judge, embedder.to(device)


def run(args: argparse.Namespace) -> None:
    from ..hub.errors import check_model_path
    from ..text.label import check_dataset, label_dataset

    # everything a user can get wrong is checked here, before models that may take minutes load
    check_dataset(args.dataset)
    if args.device is not None:
        torch_device(args.device)
    for argument, spec, builtin in (("--summarizer", args.summarizer, ("template",)),
                                    ("--judge", args.judge, ("rules", "none")),
                                    ("--embedder", args.embedder, ("minilm",))):
        if spec not in builtin:
            check_model_path(spec, argument)
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    summarizer, judge, embedder = _label_models(args)
    result = label_dataset(args.dataset, summarizer, judge, embedder, batch_size=args.batch_size,
                           threshold=args.threshold, show_progress=not args.quiet, embedder_spec=args.embedder)
    print(f"labelled {args.dataset} (summarizer {summarizer.name}, judge {judge.name if judge else 'none'}, "
          f"embedder {embedder.config.source}, {embedder.dim}-d)")
    print(result.format())
