"""Remote-code form of a saved pipeline: the ``model_index.json`` and one-line shim files with which
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads the installed classes."""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from ..io import MARKER_NAME, atomic_directory

logger = logging.getLogger(__name__)

MODEL_INDEX_NAME = "model_index.json"
# The file diffusers looks for beside model_index.json when ``_class_name`` is ``[file, class]``.
REMOTE_PIPELINE_FILE = "pipeline"
# What never goes to the Hub: training checkpoints, logs, the output marker and half-written temporary files.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "logs/*", MARKER_NAME, "*.tmp-*"]
# Libraries diffusers resolves by name (``LOADABLE_CLASSES``); their components need no code file.
_LIBRARY_NAMES = {"diffusers", "transformers", "onnxruntime.training"}
_SHIM = re.compile(r"from ([A-Za-z_][\w.]*) import ([A-Za-z_]\w*)  # noqa: F401\n")


def shim_source(module: str, class_name: str) -> str:
    """The one line a remote-code file holds: it imports the installed class, so loading returns that class."""
    return f"from {module} import {class_name}  # noqa: F401\n"


def _is_component(key: str, value: Any) -> bool:
    """A ``model_index.json`` entry that names a component: ``[library, class]`` or ``[null, null]``."""
    return (
        not key.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(item is None or isinstance(item, str) for item in value)
    )


def remote_code_files(model_index: Mapping[str, Any], pipeline_module: str) -> tuple[dict, dict[str, str]]:
    """The exported ``model_index.json`` and the shim files (relative path -> text) for a saved pipeline.

    Each component recorded by full module path (``["ehr_diffusers.models.ehr_autoencoder", "EHRAutoencoderModel"]``)
    becomes ``["ehr_autoencoder", "EHRAutoencoderModel"]`` plus ``autoencoder/ehr_autoencoder.py``; the pipeline becomes
    ``["pipeline", class]`` plus ``pipeline.py``. Components of diffusers or transformers, ``[null, null]`` entries and
    every other key (``schema``, ``_diffusers_version``) are kept; ``_name_or_path`` (a local path of whoever saved
    the folder) is dropped.
    """
    class_name = model_index.get("_class_name")
    if not isinstance(class_name, str):
        raise ValueError(f"model_index.json: _class_name must be a pipeline class name, got {class_name!r}")
    exported: dict[str, Any] = {}
    files = {f"{REMOTE_PIPELINE_FILE}.py": shim_source(pipeline_module, class_name)}
    for key, value in model_index.items():
        if key == "_name_or_path":
            continue
        if key == "_class_name":
            exported[key] = [REMOTE_PIPELINE_FILE, class_name]
        elif _is_component(key, value) and value[0] is not None and "." in value[0] and value[0] not in _LIBRARY_NAMES:
            if value[1] is None:
                raise ValueError(f"model_index.json: component {key!r} names module {value[0]!r} but no class")
            file_name = value[0].rsplit(".", 1)[-1]
            files[f"{key}/{file_name}.py"] = shim_source(value[0], value[1])
            exported[key] = [file_name, value[1]]
        else:
            exported[key] = value
    return exported, files


def _pipeline_module(class_name: str) -> str:
    """The installed module that defines the pipeline class named in ``model_index.json``.

    diffusers records only the class name of a pipeline, so the module is looked up: first among the
    ``ehr_diffusers`` modules already imported, then in ``ehr_diffusers.pipelines``.
    """
    for name, module in list(sys.modules.items()):
        candidate = getattr(module, class_name, None) if name.startswith("ehr_diffusers.") else None
        if isinstance(candidate, type) and candidate.__module__ == name:
            return name
    try:
        pipelines = importlib.import_module("ehr_diffusers.pipelines")
    except ImportError as error:
        raise ValueError(f"cannot find pipeline class {class_name!r}: ehr_diffusers.pipelines failed") from error
    candidate = getattr(pipelines, class_name, None)
    if not isinstance(candidate, type):
        raise ValueError(f"model_index.json names pipeline class {class_name!r}, which ehr_diffusers.pipelines lacks")
    return candidate.__module__


def read_model_index(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such pipeline folder")
    path = folder / MODEL_INDEX_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: not a saved pipeline (no {MODEL_INDEX_NAME}); save it with save_pretrained first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _is_exported(model_index: Mapping[str, Any], folder: Path) -> bool:
    """Already in remote-code form: ``_class_name`` is ``[file, class]`` and that file is a shim."""
    class_name = model_index.get("_class_name")
    if not isinstance(class_name, list):
        return False
    code = folder / f"{class_name[0]}.py"
    return code.is_file() and _SHIM.fullmatch(code.read_text()) is not None


def _hub_ignore(root: Path):
    """``shutil.copytree`` ignore function for the top level of ``root``: what ``HUB_IGNORE_PATTERNS`` leaves out."""
    top_level = [pattern.removesuffix("/*") for pattern in HUB_IGNORE_PATTERNS]

    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) != root:
            return set()
        return set(shutil.ignore_patterns(*top_level)(directory, names))

    return ignore


def export_for_hub(pipeline_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Copies a saved pipeline into ``out_dir`` in the form ``DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`` loads, offline or from the Hub, returning the installed ``ehr_diffusers`` classes.

    The copy holds a rewritten ``model_index.json`` (``"_class_name": ["pipeline", "EHRLatentDiffusionPipeline"]``,
    ``"autoencoder": ["ehr_autoencoder", "EHRAutoencoderModel"]``, ...) and one-line shim files (``pipeline.py``,
    ``autoencoder/ehr_autoencoder.py``, ...) generated from the recorded module paths. Why a copy: diffusers treats
    any folder with ``pipeline.py`` as custom code, so the exported form no longer loads with
    ``EHRLatentDiffusionPipeline.from_pretrained(folder)`` unless ``trust_remote_code=True`` is passed, and the
    original form cannot be loaded from the Hub at all (diffusers wants ``<component>/<module>.py`` there for every
    component that is not from diffusers or transformers). The original folder is left untouched.

    ``out_dir`` defaults to ``<pipeline_dir>-hub`` beside the original; an existing ``out_dir`` is replaced only if it
    is empty or an earlier ehr-diffusers output. Checkpoints, logs and temporary files are not copied. Returns
    ``out_dir``.
    """
    source = Path(pipeline_dir)
    model_index = read_model_index(source)
    target = Path(out_dir) if out_dir is not None else source.with_name(f"{source.name}-hub")
    if source.resolve() in target.resolve().parents:
        raise ValueError(f"out_dir {target} lies inside the pipeline folder {source}; choose a folder outside it")
    if _is_exported(model_index, source):
        exported, files = model_index, {}
    else:
        class_name = model_index.get("_class_name")
        if not isinstance(class_name, str):
            raise ValueError(f"{source / MODEL_INDEX_NAME}: _class_name {class_name!r} is not a pipeline class name")
        exported, files = remote_code_files(model_index, _pipeline_module(class_name))
        for relative in files:
            component = relative.rpartition("/")[0]
            if component and not (source / component).is_dir():
                raise ValueError(
                    f"{source}: model_index.json lists component {component!r} but the folder has no {component}/"
                )
    with atomic_directory(target, overwrite=True, inputs=[source], option="export_for_hub") as staging:
        shutil.copytree(source, staging, ignore=_hub_ignore(source), dirs_exist_ok=True)
        for relative, text in files.items():
            (staging / relative).write_text(text)
        (staging / MODEL_INDEX_NAME).write_text(json.dumps(exported, indent=2, sort_keys=True) + "\n")
    logger.info("exported %s for remote-code loading into %s (%d shim files)", source, target, len(files))
    return target
