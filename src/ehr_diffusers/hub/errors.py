"""Loading errors: a model named by Hub id or folder that is not here gets one line saying how to supply it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelError


class ModelNotFoundError(ModelError, OSError):
    """A pretrained model named by Hub id or folder is not available here; the message says how to supply it."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_path(name_or_path: str) -> bool:
    """An existing folder, or anything that cannot be a Hub id ("name" or "namespace/name")."""
    return Path(name_or_path).expanduser().exists() or not _HUB_ID.fullmatch(name_or_path)


def check_model_path(name_or_path: str, what: str) -> None:
    """Fails at once, before anything loads, when ``name_or_path`` names a local folder (or cannot be a Hub id) that
    does not exist."""
    if _looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ModelNotFoundError(f"{what} {name_or_path}: no such folder")


@contextmanager
def explain_missing_model(name_or_path: str, what: str) -> Iterator[None]:
    """Runs a ``from_pretrained`` call and turns "not found" into one line that says how to supply the model.

    transformers answers a missing Hub id (offline, or a typo) with a multi-line OSError about internet access; users
    need to know that a local folder or a filled cache is what is wanted.
    """
    check_model_path(name_or_path, what)
    try:
        yield
    except ModelNotFoundError:
        raise
    except ValueError as error:  # diffusers: a folder of another pipeline, or with components missing
        if not Path(name_or_path).expanduser().exists():
            raise
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"{what} {name_or_path}: cannot be loaded from this folder ({detail})") from error
    except OSError as error:
        if Path(name_or_path).expanduser().exists():
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelNotFoundError(f"{what} {name_or_path}: cannot be loaded from this folder ({detail})") from error
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelNotFoundError(
            f"{what} {name_or_path!r} cannot be found locally{offline}: it is neither a folder nor in the Hugging Face "
            f"cache {constants.HF_HUB_CACHE}; pass a local folder instead (for example one written by "
            f"`hf download {name_or_path} --local-dir DIR`) or point HF_HOME at a cache that holds it"
        ) from error
