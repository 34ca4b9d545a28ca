"""What every model of the package shares: its weights are written as safetensors only, and a fingerprint that names
them."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..io import refuse_pickle


class SafetensorsModelMixin:
    """Mixed in before ``ModelMixin``: ``save_pretrained(safe_serialization=False)`` is refused instead of writing a
    pickled ``.bin``. The arguments are listed by name because ``DiffusionPipeline.save_pretrained`` passes a
    component only those its signature names."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        refuse_pickle(safe_serialization, type(self).__name__)
        super().save_pretrained(save_directory, is_main_process=is_main_process, safe_serialization=True,
                                variant=variant, max_shard_size=max_shard_size, push_to_hub=push_to_hub, **kwargs)


def weights_fingerprint(model: Any) -> str:
    """SHA-256 of a model's class, configuration (less ``sample_size``, which a run may change without changing what
    the model computes) and weights: outputs cached from a model (latents) are reused only with the same one."""
    import torch

    digest = hashlib.sha256(type(model).__name__.encode())
    config = {key: value for key, value in dict(model.config).items()
              if not key.startswith("_") and key != "sample_size"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
