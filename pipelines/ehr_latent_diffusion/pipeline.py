from ehr_diffusers import EHRLatentDiffusionPipeline  # noqa: F401
