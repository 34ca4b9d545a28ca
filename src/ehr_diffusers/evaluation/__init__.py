"""Evaluation of synthetic clinical data: the statistics both modalities share (:mod:`.stats`), the synthetic EHR
metrics (:mod:`.ehr`), the chest X-ray metrics (:mod:`.cxr`, to come) and the report (:mod:`.report`)."""
