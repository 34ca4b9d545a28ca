"""ehr-diffusers: diffusion pipelines for synthetic clinical data (MIMIC-IV records and chest X-rays)."""

__version__ = "0.1.0"
