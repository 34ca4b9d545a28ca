from ehr_diffusers import EHRAutoencoderModel  # noqa: F401
