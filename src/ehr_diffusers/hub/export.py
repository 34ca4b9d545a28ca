"""Remote-code form of a saved pipeline: the ``model_index.json`` and one-line shim files with which
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads the installed classes.

Pipelines write this form when they are saved; :func:`export_for_hub` converts folders saved before that (plain
``_class_name``, components recorded by module path). A shim imports from the package root where the root exports the
class (every pipeline and component class), so that the files stay valid when a module moves inside the package.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import __all__ as ROOT_EXPORTS  # the names ``ehr_diffusers`` exports (lazily: nothing is imported)
from ..io import MARKER_NAME, atomic_directory

logger = logging.getLogger(__name__)

MODEL_INDEX_NAME = "model_index.json"
# The file diffusers looks for beside model_index.json when ``_class_name`` is ``[file, class]``.
REMOTE_PIPELINE_FILE = "pipeline"
# What never goes to the Hub: training checkpoints, logs, the output marker and half-written temporary files.
# training_data.json lists the patients a model was trained on, for the leakage check of a local evaluation: not
# something to publish.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "logs/*", MARKER_NAME, "*.tmp-*", "training_data.json"]
# The package whose root every shim of its own classes imports from.
PACKAGE = __name__.split(".")[0]
# Libraries diffusers resolves by name (``LOADABLE_CLASSES``); their components need no code file.
_LIBRARY_NAMES = {"diffusers", "transformers", "onnxruntime.training"}
_SHIM = re.compile(r"from ([A-Za-z_][\w.]*) import ([A-Za-z_]\w*)  # noqa: F401\n")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def shim_source(module: str, class_name: str) -> str:
    """The one line a remote-code file holds: it imports the installed class, so loading returns that class."""
    return f"from {module} import {class_name}  # noqa: F401\n"


def parse_shim(text: str) -> tuple[str, str] | None:
    """``(module, class)`` of a file that is exactly one shim line; None for any other code."""
    match = _SHIM.fullmatch(text)
    return (match[1], match[2]) if match else None


def is_own_module(module: str) -> bool:
    """Whether ``module`` belongs to this package: importing it runs only installed ehr-diffusers code."""
    return module == PACKAGE or module.startswith(f"{PACKAGE}.")


def _is_component(key: str, value: Any) -> bool:
    """A ``model_index.json`` entry that names a component: ``[library, class]`` or ``[null, null]``."""
    return (
        not key.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(item is None or isinstance(item, str) for item in value)
    )


def remote_code_files(
    model_index: Mapping[str, Any], pipeline_module: str | None = None
) -> tuple[dict, dict[str, str]]:
    """The remote-code ``model_index.json`` and its shim files (relative path -> text) for a pipeline's config.

    Each component recorded by module path (``["ehr_diffusers.models.ehr_autoencoder", "EHRAutoencoderModel"]``)
    becomes ``["ehr_autoencoder", "EHRAutoencoderModel"]`` plus ``autoencoder/ehr_autoencoder.py``; the pipeline becomes
    ``["pipeline", class]`` plus ``pipeline.py``. Shims of the classes this package's root exports import from the
    root; any other component keeps its module. Components of diffusers or transformers, ``[null, null]`` entries and
    every other key (``schema``, ``_diffusers_version``) are kept; ``_name_or_path`` (a local path of whoever saved
    the folder) is dropped. ``pipeline_module`` is accepted for callers of earlier versions and not needed: the
    pipeline's shim imports the class from the package root.
    """
    del pipeline_module
    class_name = model_index.get("_class_name")
    if not isinstance(class_name, str):
        raise ValueError(f"model_index.json: _class_name must be a pipeline class name, got {class_name!r}")
    exported: dict[str, Any] = {}
    files = {f"{REMOTE_PIPELINE_FILE}.py": shim_source(PACKAGE, class_name)}
    for key, value in model_index.items():
        if key == "_name_or_path":
            continue
        if key == "_class_name":
            exported[key] = [REMOTE_PIPELINE_FILE, class_name]
        elif _is_component(key, value) and value[0] is not None and "." in value[0] and value[0] not in _LIBRARY_NAMES:
            if value[1] is None:
                raise ValueError(f"model_index.json: component {key!r} names module {value[0]!r} but no class")
            file_name = value[0].rsplit(".", 1)[-1]
            # the root survives module moves; a class it does not export is imported from its own module
            module = PACKAGE if is_own_module(value[0]) and value[1] in ROOT_EXPORTS else value[0]
            files[f"{key}/{file_name}.py"] = shim_source(module, value[1])
            exported[key] = [file_name, value[1]]
        else:
            exported[key] = value
    return exported, files


def code_files(model_index: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """The files diffusers would run as remote code for this ``model_index.json``: key (``_class_name`` for the
    pipeline) -> (path relative to the folder, class name). Whether each file exists is for the caller to check."""
    files: dict[str, tuple[str, str]] = {}
    class_name = model_index.get("_class_name")
    if isinstance(class_name, list) and len(class_name) == 2 and all(isinstance(item, str) for item in class_name):
        files["_class_name"] = (f"{class_name[0]}.py", class_name[1])
    for key, value in model_index.items():
        if _is_component(key, value) and value[0] is not None and value[1] is not None:
            files[key] = (f"{key}/{value[0]}.py", value[1])
    return files


def own_shims(model_index: Mapping[str, Any], texts: Mapping[str, str | None]) -> dict[str, tuple[str, str]] | None:
    """``key -> (module, class)`` for a remote-code ``model_index.json`` whose every code file is one of this
    package's shims importing the class it names; None when the folder holds other code, or is not in that form.

    ``texts`` maps each path of :func:`code_files` to the file's text, or None where there is no such file.
    """
    files = code_files(model_index)
    if "_class_name" not in files or "_ignore_files" in model_index:
        return None  # diffusers skips ignored files and then looks for the pipeline code elsewhere
    names = [part for key, (path, _) in files.items() for part in path.removesuffix(".py").split("/")]
    if not all(_IDENTIFIER.fullmatch(name) for name in names) or len(names) != 2 * len(files) - 1:
        return None  # a name such as "user/repo" or "../x" makes diffusers fetch or run code from elsewhere
    shims = {}
    for key, (path, class_name) in files.items():
        text = texts.get(path)
        if text is None:
            if key == "_class_name":
                return None
            continue  # no file: diffusers resolves the entry as a library, it runs no code from the folder
        shim = parse_shim(text)
        if shim is None or not is_own_module(shim[0]) or shim[1] != class_name:
            return None
        shims[key] = shim
    return shims


def read_own_shims(folder: str | Path, model_index: Mapping[str, Any]) -> dict[str, tuple[str, str]] | None:
    """:func:`own_shims` for a local folder."""
    folder = Path(folder)
    texts = {}
    for path, _ in code_files(model_index).values():
        file = folder / path
        texts[path] = file.read_text(encoding="utf-8") if file.is_file() else None
    return own_shims(model_index, texts)


def own_remote_code_revision(repo_id: str, **hub_kwargs: Any) -> str | None:
    """The commit of Hub repo ``repo_id`` (at ``hub_kwargs["revision"]``) if its every remote-code file is one of
    this package's shims, else None; a caller that trusts the code pins that commit, so what runs is what was read.

    ``hub_kwargs`` are ``hf_hub_download`` options (``revision``, ``cache_dir``, ``token``, ``local_files_only``,
    ``force_download``, ``proxies``). Any failure but a missing file gives None: then nothing is trusted.
    """
    from diffusers.utils import extract_commit_hash
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index_file = hf_hub_download(repo_id, MODEL_INDEX_NAME, **hub_kwargs)
        commit = extract_commit_hash(index_file)
        model_index = json.loads(Path(index_file).read_text(encoding="utf-8"))
        if commit is None or not isinstance(model_index, dict) or not isinstance(model_index.get("_class_name"), list):
            return None
        texts: dict[str, str | None] = {}
        for path, _ in code_files(model_index).values():
            try:
                texts[path] = Path(hf_hub_download(repo_id, path, **{**hub_kwargs, "revision": commit})).read_text(
                    encoding="utf-8"
                )
            except EntryNotFoundError:
                texts[path] = None
    except Exception as error:  # offline, missing or malformed: trust nothing, and let diffusers report it
        logger.debug("not checking the remote code of %s: %s", repo_id, error)
        return None
    return commit if own_shims(model_index, texts) is not None else None


def download_own_pipeline(repo_id: str, **hub_kwargs: Any) -> str | None:
    """The local snapshot of Hub repo ``repo_id`` at the commit :func:`own_remote_code_revision` checked, or None when
    its code files are not all this package's shims.

    The snapshot is fetched here, at that commit, rather than by diffusers with ``trust_remote_code``: the class route
    then reads the folder as any local one (:func:`read_own_shims`) and no file of the repository is ever imported.
    ``hub_kwargs`` are ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``proxies``.
    """
    commit = own_remote_code_revision(repo_id, **hub_kwargs)
    if commit is None:
        return None
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **{**hub_kwargs, "revision": commit})


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


def is_remote_code_form(model_index: Mapping[str, Any], folder: Path) -> bool:
    """Whether a saved folder is in remote-code form: ``_class_name`` is ``[file, class]`` and that file is a shim."""
    class_name = model_index.get("_class_name")
    if not isinstance(class_name, list) or len(class_name) != 2 or not isinstance(class_name[0], str):
        return False
    code = folder / f"{class_name[0]}.py"
    return code.is_file() and parse_shim(code.read_text(encoding="utf-8")) is not None


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

    Pipelines write that form themselves when saved, so their folders are copied as they are. A folder saved before
    (``"_class_name": "EHRLatentDiffusionPipeline"``, components recorded by module path) gets a rewritten
    ``model_index.json`` (``"_class_name": ["pipeline", "EHRLatentDiffusionPipeline"]``,
    ``"autoencoder": ["ehr_autoencoder", "EHRAutoencoderModel"]``, ...) and one-line shim files (``pipeline.py``,
    ``autoencoder/ehr_autoencoder.py``, ...): diffusers loads a component from the Hub only through such a file. The
    original folder is left untouched.

    ``out_dir`` defaults to ``<pipeline_dir>-hub`` beside the original; an existing ``out_dir`` is replaced only if it
    is empty or an earlier ehr-diffusers output. Checkpoints, logs and temporary files are not copied. Returns
    ``out_dir``.
    """
    source = Path(pipeline_dir)
    model_index = read_model_index(source)
    target = Path(out_dir) if out_dir is not None else source.with_name(f"{source.name}-hub")
    if source.resolve() in target.resolve().parents:
        raise ValueError(f"out_dir {target} lies inside the pipeline folder {source}; choose a folder outside it")
    if is_remote_code_form(model_index, source):
        exported, files = model_index, {}
    else:
        class_name = model_index.get("_class_name")
        if not isinstance(class_name, str):
            raise ValueError(f"{source / MODEL_INDEX_NAME}: _class_name {class_name!r} is not a pipeline class name")
        exported, files = remote_code_files(model_index)
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
