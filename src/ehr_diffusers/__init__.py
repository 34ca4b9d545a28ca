"""ehr-diffusers: diffusion pipelines for synthetic clinical data (MIMIC-IV records and chest X-rays).

The pipeline, models and scheduler are importable from here; they load lazily so that ``ehr-diffusers --help`` and
the data commands do not pay for importing diffusers and transformers. Importing the pipeline imports every component
module it records in ``model_index.json``, which is what ``from_pretrained`` needs. Saved pipelines hold one-line
remote-code shims (``from ehr_diffusers import EHRAutoencoderModel``) that import these names from here: every pipeline
and component class stays exported at the package root.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EHRLatentDiffusionPipeline": "pipelines.pipeline_ehr_latent_diffusion",
    "EHRLatentDiffusionPipelineOutput": "pipelines.pipeline_ehr_latent_diffusion",
    "EHRXDiffPipeline": "pipelines.pipeline_ehrxdiff",
    "EHRXDiffPipelineOutput": "pipelines.pipeline_ehrxdiff",
    "EHRAutoencoderModel": "models.ehr_autoencoder",
    "EHRDenoiserModel": "models.ehr_denoiser",
    "EventEncoderModel": "models.event_encoder",
    "FusionAdapterModel": "models.fusion_adapter",
    "LogSNRCosineScheduler": "schedulers.scheduling_logsnr_cosine",
    "SentenceEmbedder": "text.embed",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ehr_diffusers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
