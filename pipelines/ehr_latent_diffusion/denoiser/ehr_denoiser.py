from ehr_diffusers import EHRDenoiserModel  # noqa: F401
