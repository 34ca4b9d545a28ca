"""Pipelines (``DiffusionPipeline``), loaded on first use: importing a module of this package (the EHRXDiff
converter, say) does not import diffusers for the others."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EHRLatentDiffusionPipeline": ".pipeline_ehr_latent_diffusion",
    "EHRLatentDiffusionPipelineOutput": ".pipeline_ehr_latent_diffusion",
    "RemoteCodePipelineMixin": ".pipeline_utils",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
