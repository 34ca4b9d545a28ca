"""Data: the MIMIC file reader both modalities share (``mimic``), MIMIC-IV patient records (``ehr``) and chest X-ray
triplets with their events (``cxr``)."""
