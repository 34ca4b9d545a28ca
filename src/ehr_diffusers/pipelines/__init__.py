"""Pipelines (``DiffusionPipeline``)."""

from .pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline, EHRLatentDiffusionPipelineOutput

__all__ = ["EHRLatentDiffusionPipeline", "EHRLatentDiffusionPipelineOutput"]
