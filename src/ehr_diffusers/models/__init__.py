"""Models (``ModelMixin``, ``ConfigMixin``)."""

from .ehr_autoencoder import EHRAutoencoderModel, EHRAutoencoderOutput
from .ehr_denoiser import EHRDenoiserModel, EHRDenoiserOutput

__all__ = ["EHRAutoencoderModel", "EHRAutoencoderOutput", "EHRDenoiserModel", "EHRDenoiserOutput"]
