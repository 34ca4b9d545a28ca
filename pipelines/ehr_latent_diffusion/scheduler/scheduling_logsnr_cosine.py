from ehr_diffusers import LogSNRCosineScheduler  # noqa: F401
