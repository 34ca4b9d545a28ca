"""Model cards of the X-ray side: the chest X-ray components that ehr-diffusers trains on their own (the X-ray VAE of
``train_cxr_vae`` and the event-image CLIP encoders of ``train_event_clip``, from one template) and the
EHRXDiffPipeline (``train_ehrxdiff``, its own template).

A leaf like the rest of ``hub/``: it reads the prepared dataset's files itself (``cxr_summary.json``,
``dataset_dict.json``) and imports nothing of the project above ``io``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .. import __version__
from ..io import write_text_atomic
from .cards import METRICS_END, METRICS_START, MIMIC_LICENSE_NAME, _table, front_matter

logger = logging.getLogger(__name__)

CXR_MODEL_CARD_TEMPLATE = "templates/model_card_cxr_vae.md"
CXR_SUMMARY_NAME = "cxr_summary.json"
COMPONENTS = {"vae": "Chest X-ray VAE", "event_clip": "Event-image CLIP encoders"}


def cxr_training_data_record(dataset_dir: str | Path) -> dict[str, Any]:
    """What identifies a prepared triplet dataset: the ``datasets`` fingerprint of ``train``, rows per split, whether
    it is synthetic (``cxr_summary.json``, else the dataset card's metadata; anything else counts as MIMIC-derived)
    and the event embedder."""
    from datasets import load_from_disk

    folder = Path(dataset_dir)
    if not (folder / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{folder}: not a prepared triplet dataset (no dataset_dict.json)")
    dataset = load_from_disk(str(folder))
    summary_path = folder / CXR_SUMMARY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if isinstance(summary.get("synthetic"), bool):
        synthetic, evidence = summary["synthetic"], CXR_SUMMARY_NAME
    else:
        metadata = front_matter(folder / "README.md")
        synthetic = metadata.get("license") == "cc0-1.0" or "synthetic" in (metadata.get("tags") or [])
        evidence = "README.md metadata" if metadata else "no marker found (treated as MIMIC-derived)"
    embeddings = summary.get("embeddings") or {}
    return {
        "path": str(folder),
        "fingerprint": dataset["train"]._fingerprint if "train" in dataset else None,
        "rows": {split: len(table) for split, table in dataset.items()},
        "synthetic": bool(synthetic),
        "synthetic_evidence": evidence,
        "subjects": summary.get("triplet_subjects"),
        "embedder": embeddings.get("model"),
        "embedding_dim": embeddings.get("dim"),
    }


def _data_table(record: Mapping[str, Any]) -> str:
    """The card's training-data table: source, how "synthetic" was decided, the train fingerprint, triplets per split
    and the event embedder."""
    rows = {
        "source": ("synthetic demo cohort (`ehr-diffusers demo-cxr-data`)" if record["synthetic"]
                   else "MIMIC-CXR-JPG + MIMIC-IV (credentialed)"),
        "synthetic decided by": record["synthetic_evidence"],
        "train fingerprint (`datasets`)": f"`{record['fingerprint']}`",
        **{f"triplets: {split}": f"{n:,}" for split, n in record["rows"].items()},
        "event embedder": f"`{record['embedder']}` ({record['embedding_dim']}-d)" if record.get("embedder")
        else "none",
    }
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows.items())])


def render_cxr_model_card(component: str, record: Mapping[str, Any], training_config: Mapping[str, Any],
                          metrics: Mapping[str, Any] | None = None, model_id: str = "path/to/model",
                          resolution: int = 64) -> str:
    """The model card text (YAML metadata + markdown) of ``component`` ("vae" or "event_clip")."""
    from huggingface_hub import ModelCard, ModelCardData

    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {sorted(COMPONENTS)}, got {component!r}")
    synthetic = bool(record["synthetic"])
    licence = {"license": "cc0-1.0"} if synthetic else {"license": "other", "license_name": MIMIC_LICENSE_NAME}
    tags = ["ehr-diffusers", "chest-x-ray", "ehrxdiff", "synthetic" if synthetic else "mimic-cxr"]
    tags += ["autoencoder", "vae"] if component == "vae" else ["clip", "contrastive-learning"]
    card_data = ModelCardData(library_name="diffusers", tags=tags, **licence)
    data_table = _data_table(record)
    template = resources.files("ehr_diffusers").joinpath(CXR_MODEL_CARD_TEMPLATE)
    with resources.as_file(template) as template_path:
        card = ModelCard.from_template(
            card_data, template_path=str(template_path), component=component, title=COMPONENTS[component],
            model_id=model_id, synthetic=synthetic, version=__version__, resolution=resolution,
            data_table=data_table,
            training_table=_table(training_config) if training_config else "No training settings recorded.",
            metrics_start=METRICS_START, metrics_end=METRICS_END,
            metrics_table=_table(metrics, ("figure", "value")) if metrics else "Not evaluated.",
        )
    return str(card).rstrip("\n") + "\n"


def save_cxr_model_card(output_dir: str | Path, component: str, *, dataset_dir: str | Path,
                        training_config: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
                        repo_id: str | None = None, resolution: int = 64) -> Path:
    """Writes ``output_dir/README.md`` (:func:`render_cxr_model_card`) and returns its path. The licence follows the
    data, as for the pipelines' cards, so that ``push_to_hub`` refuses to publish MIMIC-derived weights openly."""
    out = Path(output_dir)
    card = render_cxr_model_card(component, cxr_training_data_record(dataset_dir), training_config, metrics,
                                 model_id=repo_id or out.name, resolution=resolution)
    path = out / "README.md"
    write_text_atomic(path, card)
    logger.info("wrote model card %s", path)
    return path


EHRXDIFF_CARD_TEMPLATE = "templates/model_card_ehrxdiff.md"


def render_ehrxdiff_model_card(record: Mapping[str, Any], training_config: Mapping[str, Any], event_effect: str,
                               model_id: str = "path/to/model", adapter: str = "cross_attention",
                               conditioning: str = "hybrid", resolution: int = 64) -> str:
    """The EHRXDiffPipeline's model card (YAML metadata + markdown) for a model trained on the triplet dataset that
    ``record`` (:func:`cxr_training_data_record`) describes; ``event_effect`` is the validation's shuffled-events
    comparison in words."""
    from huggingface_hub import ModelCard, ModelCardData

    synthetic = bool(record["synthetic"])
    licence = {"license": "cc0-1.0"} if synthetic else {"license": "other", "license_name": MIMIC_LICENSE_NAME}
    card_data = ModelCardData(library_name="diffusers", pipeline_tag="image-to-image",
                              tags=["ehr-diffusers", "ehrxdiff", "chest-x-ray", "image-to-image",
                                    "synthetic" if synthetic else "mimic-cxr"], **licence)
    template = resources.files("ehr_diffusers").joinpath(EHRXDIFF_CARD_TEMPLATE)
    with resources.as_file(template) as template_path:
        card = ModelCard.from_template(
            card_data, template_path=str(template_path), model_id=model_id, synthetic=synthetic, version=__version__,
            adapter=adapter, conditioning=conditioning, resolution=resolution, event_effect=event_effect,
            data_table=_data_table(record),
            training_table=_table(training_config) if training_config else "No training settings recorded.",
            metrics_start=METRICS_START, metrics_end=METRICS_END,
        )
    return str(card).rstrip("\n") + "\n"
