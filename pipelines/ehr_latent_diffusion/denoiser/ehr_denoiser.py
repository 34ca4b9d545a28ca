from ehr_diffusers.models.ehr_denoiser import EHRDenoiserModel  # noqa: F401
