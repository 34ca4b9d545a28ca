"""Old module paths are public API (users import them; saved model_index.json files may record them): each one still
imports, and gives the very module, class or function that now lives at its new path."""

from __future__ import annotations

import importlib

import pytest

# old module path -> new module path; the old one is an alias of the new one
MOVED_MODULES = {
    "ehr_diffusers.data.cohort": "ehr_diffusers.data.ehr.cohort",
    "ehr_diffusers.data.schema": "ehr_diffusers.data.ehr.schema",
    "ehr_diffusers.data.icd": "ehr_diffusers.data.ehr.icd",
    "ehr_diffusers.data.demo_ehr": "ehr_diffusers.data.ehr.demo",
    "ehr_diffusers.data.synthetic_tables": "ehr_diffusers.data.ehr.synthetic_tables",
    "ehr_diffusers.data.cxr_events": "ehr_diffusers.data.cxr.events",
    "ehr_diffusers.data.cxr_dataset": "ehr_diffusers.data.cxr.dataset",
    "ehr_diffusers.data.cxr_phantom": "ehr_diffusers.data.cxr.phantom",
    "ehr_diffusers.data.demo_cxr": "ehr_diffusers.data.cxr.demo",
    "ehr_diffusers.io_utils": "ehr_diffusers.io",
    "ehr_diffusers.evaluation.fidelity": "ehr_diffusers.evaluation.ehr.fidelity",
    "ehr_diffusers.evaluation.privacy": "ehr_diffusers.evaluation.ehr.privacy",
    "ehr_diffusers.evaluation.conditional": "ehr_diffusers.evaluation.ehr.conditional",
    "ehr_diffusers.evaluation.clinical": "ehr_diffusers.evaluation.ehr.clinical",
    "ehr_diffusers.evaluation.baselines": "ehr_diffusers.evaluation.ehr.baselines",
    "ehr_diffusers.evaluation.data": "ehr_diffusers.evaluation.ehr.data",
    "ehr_diffusers.evaluation.suite": "ehr_diffusers.evaluation.ehr.suite",
    "ehr_diffusers.evaluation.intervals": "ehr_diffusers.evaluation.stats",
}

# (old module, name) -> (new module, name): names whose module became a package or changed module
MOVED_NAMES = {
    ("ehr_diffusers.data.cxr", "CHEXPERT_LABELS"): ("ehr_diffusers.data.cxr.triplets", "CHEXPERT_LABELS"),
    ("ehr_diffusers.data.cxr", "TripletOptions"): ("ehr_diffusers.data.cxr.triplets", "TripletOptions"),
    ("ehr_diffusers.data.cxr", "build_triplets"): ("ehr_diffusers.data.cxr.triplets", "build_triplets"),
    ("ehr_diffusers.data.cxr", "MimicCXRReader"): ("ehr_diffusers.data.cxr.triplets", "MimicCXRReader"),
    ("ehr_diffusers.hub", "ModelNotFoundError"): ("ehr_diffusers.hub.errors", "ModelNotFoundError"),
    ("ehr_diffusers.hub", "explain_missing_model"): ("ehr_diffusers.hub.errors", "explain_missing_model"),
    ("ehr_diffusers.hub", "render_dataset_card"): ("ehr_diffusers.hub.cards", "render_dataset_card"),
    ("ehr_diffusers.hub", "render_cxr_dataset_card"): ("ehr_diffusers.hub.cards", "render_cxr_dataset_card"),
    ("ehr_diffusers.hub", "save_model_card"): ("ehr_diffusers.hub.cards", "save_model_card"),
    ("ehr_diffusers.hub", "update_model_card_metrics"): ("ehr_diffusers.hub.cards", "update_model_card_metrics"),
    ("ehr_diffusers.hub", "training_data_record"): ("ehr_diffusers.hub.cards", "training_data_record"),
    ("ehr_diffusers.hub", "export_for_hub"): ("ehr_diffusers.hub.export", "export_for_hub"),
    ("ehr_diffusers.hub", "push_to_hub"): ("ehr_diffusers.hub.push", "push_to_hub"),
    ("ehr_diffusers.hub", "MODEL_CARD_TEMPLATE"): ("ehr_diffusers.hub.cards", "MODEL_CARD_TEMPLATE"),
    ("ehr_diffusers.hub", "REMOTE_PIPELINE_FILE"): ("ehr_diffusers.hub.export", "REMOTE_PIPELINE_FILE"),
    ("ehr_diffusers.text.judge", "JUDGE_CATEGORIES"): ("ehr_diffusers.text.judge_rubric", "JUDGE_CATEGORIES"),
    ("ehr_diffusers.text.judge", "DEFAULT_SCREENING_THRESHOLD"):
        ("ehr_diffusers.text.judge_rubric", "DEFAULT_SCREENING_THRESHOLD"),
}


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_old_module_path_is_the_new_module(old, new) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_NAMES.items()))
def test_old_names_import_from_their_old_module(old, new) -> None:
    assert getattr(importlib.import_module(old[0]), old[1]) is getattr(importlib.import_module(new[0]), new[1])


def test_from_import_of_an_old_path() -> None:
    from ehr_diffusers.data.cohort import prepare
    from ehr_diffusers.data.ehr.cohort import prepare as moved

    assert prepare is moved


def test_unknown_name_of_an_old_package_path_is_an_attribute_error() -> None:
    import ehr_diffusers.data.cxr as cxr

    with pytest.raises(AttributeError, match="no_such_name"):
        cxr.no_such_name  # noqa: B018


def test_star_import_and_dir_of_the_old_data_cxr_module() -> None:
    import ehr_diffusers.data.cxr as cxr
    from ehr_diffusers.data.cxr import triplets

    namespace: dict = {}
    exec("from ehr_diffusers.data.cxr import *", namespace)
    assert all(namespace[name] is getattr(triplets, name) for name in cxr.__all__)
    assert set(cxr.__all__) <= set(dir(cxr))
