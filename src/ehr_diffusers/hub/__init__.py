"""Everything that touches the Hugging Face Hub, split by job: ``errors`` (a model that cannot be found), ``cards``
(dataset and model cards), ``export`` (the remote-code form pipelines save, and the export of folders saved before
it) and ``push`` (uploads).

hub/ is a leaf: it imports nothing of the project above ``io``, so that every layer may use it. ``ehr_diffusers.hub``
was once one module; its names stay importable from here.
"""

from .cards import (
    METRICS_END,
    METRICS_START,
    MIMIC_LICENSE_NAME,
    MODEL_CARD_TEMPLATE,
    render_cxr_dataset_card,
    render_dataset_card,
    render_model_card,
    save_model_card,
    training_data_record,
    update_model_card_metrics,
)
from .errors import ModelNotFoundError, explain_missing_model
from .export import (
    HUB_IGNORE_PATTERNS,
    MODEL_INDEX_NAME,
    REMOTE_PIPELINE_FILE,
    export_for_hub,
    is_remote_code_form,
    parse_shim,
    remote_code_files,
    shim_source,
)
from .push import push_to_hub

__all__ = [
    "HUB_IGNORE_PATTERNS",
    "METRICS_END",
    "METRICS_START",
    "MIMIC_LICENSE_NAME",
    "MODEL_CARD_TEMPLATE",
    "MODEL_INDEX_NAME",
    "REMOTE_PIPELINE_FILE",
    "ModelNotFoundError",
    "explain_missing_model",
    "export_for_hub",
    "is_remote_code_form",
    "parse_shim",
    "push_to_hub",
    "remote_code_files",
    "render_cxr_dataset_card",
    "render_dataset_card",
    "render_model_card",
    "save_model_card",
    "shim_source",
    "training_data_record",
    "update_model_card_metrics",
]
