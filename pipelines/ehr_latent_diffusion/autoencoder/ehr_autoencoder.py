from ehr_diffusers.models.ehr_autoencoder import EHRAutoencoderModel  # noqa: F401
