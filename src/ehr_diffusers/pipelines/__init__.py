"""Pipelines (``DiffusionPipeline``)."""

from .pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline, EHRLatentDiffusionPipelineOutput
from .pipeline_utils import RemoteCodePipelineMixin

__all__ = ["EHRLatentDiffusionPipeline", "EHRLatentDiffusionPipelineOutput", "RemoteCodePipelineMixin"]
