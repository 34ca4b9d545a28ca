from ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion import EHRLatentDiffusionPipeline  # noqa: F401
