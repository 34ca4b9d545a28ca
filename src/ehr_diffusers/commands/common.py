"""Helpers shared by the commands that load models: the torch device of --device and the pipeline of --model."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArgumentError


def local_folder(name_or_path: str | Path) -> Path | None:
    """``--model`` as a local path when it is one (an input an output must not overwrite), None for a Hub id."""
    path = Path(name_or_path)
    return path if path.exists() else None


def torch_device(name: str | None):
    """The torch device named by --device (default: cuda when available), checked before any model loads."""
    import torch

    from ..text.generation import default_device

    try:
        device = torch.device(name or default_device())
    except RuntimeError as error:
        raise ArgumentError(f"--device {name}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_pipeline(model: str, text_embedder: str | None, device: str | None):
    """The pipeline from a folder or Hub id, with a clear error when it is not there."""
    from ..hub.errors import explain_missing_model
    from ..pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline
    from ..text.embed import load_embedder

    target = torch_device(device)
    extra = {"text_embedder": load_embedder(text_embedder)} if text_embedder else {}
    with explain_missing_model(model, "--model"):
        pipe = EHRLatentDiffusionPipeline.from_pretrained(model, **extra)
    return pipe.to(target)
