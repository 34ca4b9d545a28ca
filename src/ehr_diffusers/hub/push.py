"""Uploads to the Hugging Face Hub: every Hub call of the project goes through here, so tests patch one place."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .cards import front_matter
from .export import HUB_IGNORE_PATTERNS, export_for_hub, is_remote_code_form, read_model_index

if TYPE_CHECKING:
    from huggingface_hub import HfApi

logger = logging.getLogger(__name__)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with ehr-diffusers",
    api: HfApi | None = None,
    allow_public_mimic: bool = False,
) -> str:
    """Uploads a saved pipeline folder to the model repo ``repo_id`` (created if needed); returns the repo URL.

    The Hub copy loads with ``DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`` as well as with the
    pipeline class: a folder saved by a pipeline is already in that remote-code form and goes up as it is, one saved
    before goes up as a temporary :func:`export_for_hub` copy. Checkpoints, logs and temporary files stay local.
    A folder whose card says ``license: other`` (trained on MIMIC-derived data) goes only to a private repo
    (``private=True``): the PhysioNet Credentialed Health Data License forbids sharing with people who are not
    credentialed. ``allow_public_mimic=True`` overrides this for users who have checked that their data use permits
    it. ``api`` is the Hub client (default ``huggingface_hub.HfApi(token=token)``); tests pass a fake.
    """
    source = Path(folder)
    model_index = read_model_index(source)
    metadata = front_matter(source / "README.md")
    if not (source / "README.md").is_file():
        logger.warning("%s has no README.md model card; the Hub repo will have none", source)
    if metadata.get("license") == "other" and private is not True and not allow_public_mimic:
        raise ValueError(
            f"{source / 'README.md'}: the model was trained on MIMIC-derived data (license: other, "
            f"{metadata.get('license_name', 'PhysioNet credentialed')}), which the PhysioNet Credentialed Health Data "
            "License forbids sharing publicly; push it with private=True to a repo only credentialed "
            "users can read, or pass allow_public_mimic=True if you are sure your data use permits it"
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="ehr-diffusers-hub-") as temporary:
        exported = is_remote_code_form(model_index, source)
        upload = source if exported else export_for_hub(source, Path(temporary) / "export")
        url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(
            folder_path=str(upload),
            repo_id=repo_id,
            commit_message=commit_message,
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
        )
    logger.info("uploaded %s to %s", source, url)
    return str(url)
