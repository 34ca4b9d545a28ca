"""What every ehr-diffusers pipeline shares: one saved folder that loads by both routes.

A folder written by ``save_pretrained`` loads with ``PipelineClass.from_pretrained(folder)`` and with
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``. diffusers 0.42 finds a pipeline class
that is not its own only through remote code (``"_class_name": ["pipeline", "Class"]`` and ``pipeline.py``), and a
component only through ``<component>/<module>.py`` on the Hub; so ``model_index.json`` is written in that form, beside
one-line shims that import the installed classes from the package root.

The pipeline class itself reads that form back as the installed classes the shims name, without running them: a
shim is recognised only by its exact one-line form importing from this package. Any other code file in the folder
leaves ``model_index.json`` as it is, and diffusers asks for ``trust_remote_code=True`` as usual.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..hub.export import PACKAGE, download_own_pipeline, is_own_module, read_own_shims, remote_code_files
from ..io import refuse_pickle

# hf_hub_download options of DiffusionPipeline.download that also apply to reading the remote-code files.
_HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def _installed_class(module: str, class_name: str, where: str) -> type:
    """The class a shim or a recorded module path names, imported from the installed package (its root when the
    recorded module no longer has it)."""
    for candidate in dict.fromkeys((module, PACKAGE)):
        try:
            found = getattr(importlib.import_module(candidate), class_name, None)
        except ImportError:
            found = None
        if isinstance(found, type):
            return found
    raise ValueError(f"{where} names {module}.{class_name}, which the installed {PACKAGE} does not have; install the "
                     f"{PACKAGE} version the pipeline was saved with")


def installed_model_index(config: dict[str, Any], folder: str | os.PathLike) -> dict[str, Any]:
    """``config`` (a ``model_index.json`` read from ``folder``) with this package's classes recorded by the module
    that defines them, as diffusers resolves them from ``sys.modules``.

    The remote-code form becomes ``"_class_name": "Class"`` and ``[module, class]`` when all its code files are this
    package's shims; components recorded by a module path of this package (folders saved before the remote-code form)
    are resolved through the installed package, so that they load after a module moved. Anything else is left as is.
    """
    config = dict(config)
    shims = read_own_shims(folder, config) or {}
    where = str(Path(folder) / "model_index.json")
    if shims:
        config["_class_name"] = shims.pop("_class_name")[1]
    for key, value in list(config.items()):
        if key in shims:
            config[key] = [_installed_class(*shims[key], where).__module__, shims[key][1]]
        elif (not key.startswith("_") and isinstance(value, list) and len(value) == 2
              and all(isinstance(item, str) for item in value) and is_own_module(value[0])):
            config[key] = [_installed_class(*value, where).__module__, value[1]]
    return config


def check_callback_inputs(requested: list[str], allowed: list[str]) -> None:
    """``callback_on_step_end_tensor_inputs`` may only name tensors the pipeline hands its callback."""
    unknown = [name for name in requested if name not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among {allowed}")


def check_callback_outputs(outputs: Any, tensors: dict[str, torch.Tensor]) -> None:
    """What a ``callback_on_step_end`` returned must fit where it goes (``tensors``: name -> the current tensor): a
    misfit would fail steps later, far from its cause."""
    if not isinstance(outputs, dict):
        raise ValueError(f"callback_on_step_end must return a dict of tensors (keys among {list(tensors)}), got "
                         f"{type(outputs).__name__}")
    for name, value in outputs.items():
        if name not in tensors:
            raise ValueError(f"callback_on_step_end returned {name!r}, which is none of the tensors it may "
                             f"replace: {list(tensors)}")
        expected = tuple(tensors[name].shape)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"callback_on_step_end returned {name} with {got}; expected a tensor of shape "
                             f"{expected}")


class RemoteCodePipelineMixin:
    """Saves a pipeline in the remote-code form and loads that form by the class route without remote code.

    Mixed into a ``DiffusionPipeline`` subclass before it: ``class MyPipeline(RemoteCodePipelineMixin,
    DiffusionPipeline)``. Weights are saved as safetensors only.
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """``DiffusionPipeline.save_pretrained``; ``model_index.json`` and its shims are written in remote-code form
        (see :meth:`save_config`). ``safe_serialization=False`` is refused: pickled weights run code when loaded."""
        refuse_pickle(safe_serialization, type(self).__name__)
        super().save_pretrained(save_directory, safe_serialization=True, variant=variant,
                                max_shard_size=max_shard_size, push_to_hub=push_to_hub, **kwargs)

    def to_json_string(self) -> str:
        """The pipeline's ``model_index.json`` in remote-code form (:func:`~ehr_diffusers.hub.remote_code_files`)."""
        exported, _ = remote_code_files(json.loads(super().to_json_string()))
        return json.dumps(exported, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Writes the shim files ``model_index.json`` names, then ``model_index.json`` (before any upload)."""
        _, files = remote_code_files(json.loads(super().to_json_string()))
        for relative, text in files.items():
            path = Path(save_directory, relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``ConfigMixin.load_config``; a local ``model_index.json`` is read as :func:`installed_model_index`."""
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        path = Path(pretrained_model_name_or_path)
        folder = path.parent if path.is_file() else path
        if not folder.is_dir() or not (folder / cls.config_name).is_file():
            return loaded
        if isinstance(loaded, tuple):
            return (installed_model_index(loaded[0], folder), *loaded[1:])
        return installed_model_index(loaded, folder)

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str | os.PathLike:
        """``DiffusionPipeline.download``; a Hub repo whose every code file is one of this package's shims is fetched
        as a snapshot of the commit that was checked, and then loads as a local folder: no repository file runs and
        ``trust_remote_code`` stays as the user left it. A custom pipeline asked for by name takes diffusers' path."""
        if not (kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") or kwargs.get("custom_revision")
                or os.path.isdir(pretrained_model_name)):
            snapshot = download_own_pipeline(pretrained_model_name,
                                             **{key: kwargs[key] for key in _HUB_OPTIONS if key in kwargs})
            if snapshot is not None:
                return snapshot
        return super().download(pretrained_model_name, **kwargs)
