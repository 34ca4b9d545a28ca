"""Models (``ModelMixin``, ``ConfigMixin``)."""

from .ehr_autoencoder import EHRAutoencoderModel, EHRAutoencoderOutput

__all__ = ["EHRAutoencoderModel", "EHRAutoencoderOutput"]
