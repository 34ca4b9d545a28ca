from ehr_diffusers.text.embed import SentenceEmbedder  # noqa: F401
