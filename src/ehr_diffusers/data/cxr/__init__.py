"""Chest X-rays with the EHR events between them: MIMIC-CXR-JPG metadata and EHRXDiff triplets, event rendering, the
triplet dataset, the chest phantom and the synthetic demo cohort.

``ehr_diffusers.data.cxr`` was once the module now at :mod:`ehr_diffusers.data.cxr.triplets`; its names stay
importable from here.
"""

from __future__ import annotations

import importlib
from typing import Any

# the public names of the module that ``ehr_diffusers.data.cxr`` was
__all__ = ["CHEXPERT_LABELS", "CXR_TABLES", "FRONTAL_VIEWS", "MIMIC_SPLITS", "SPLITS", "MimicCXRReader",
           "TripletOptions", "build_triplets", "image_path"]


def __getattr__(name: str) -> Any:
    triplets = importlib.import_module(".triplets", __name__)
    if name.startswith("__") or not hasattr(triplets, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(triplets, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
