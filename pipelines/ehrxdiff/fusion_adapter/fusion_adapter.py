from ehr_diffusers import FusionAdapterModel  # noqa: F401
