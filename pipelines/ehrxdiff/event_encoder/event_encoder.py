from ehr_diffusers import EventEncoderModel  # noqa: F401
