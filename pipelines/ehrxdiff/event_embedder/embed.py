from ehr_diffusers import SentenceEmbedder  # noqa: F401
