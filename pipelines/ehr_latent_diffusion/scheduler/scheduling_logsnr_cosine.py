from ehr_diffusers.schedulers.scheduling_logsnr_cosine import LogSNRCosineScheduler  # noqa: F401
