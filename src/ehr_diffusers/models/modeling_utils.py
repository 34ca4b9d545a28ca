"""What every model of the package shares: its weights are written as safetensors only."""

from __future__ import annotations

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
