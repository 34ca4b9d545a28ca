from ehr_diffusers import EHRXDiffPipeline  # noqa: F401
