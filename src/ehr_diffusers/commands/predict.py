"""``predict-cxr``: the next chest X-ray of one patient from the previous image and the events since it."""

from __future__ import annotations

import argparse
import logging
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, DataError, ModelError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _finite(embeddings: Any, path: Path) -> Any:
    """Event embeddings with NaN or infinite values would turn the whole prediction into NaN."""
    import numpy as np

    bad = ~np.isfinite(embeddings)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"--events {path}: event {row} holds NaN or infinite values; event embeddings must be finite")
    return embeddings


def read_events(path: Path) -> dict[str, Any]:
    """``--events``: a text file with one event per line ("..., time -3.5 h" gives its time), a ``.npy`` array of
    per-event embeddings ``(n_events, dim)``, or a ``.npz`` with ``event_embeddings`` and ``event_hours`` (hours
    before the next study, negative; without them the times are unknown). Arrays load without pickle. An empty text
    file means no events."""
    import numpy as np

    from ..io import read_user_text

    if not path.is_file():
        raise FileNotFoundError(f"--events {path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(f"--events {path}: not a numeric .npz archive ({error or type(error).__name__})") from None
        if "event_embeddings" not in arrays:
            raise DataError(f"--events {path}: no event_embeddings array (found {sorted(arrays)})")
        embeddings = arrays["event_embeddings"]
        if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.number):
            raise DataError(f"--events {path}: event_embeddings must be a numeric (n_events, dim) array, got "
                             f"{embeddings.dtype} {embeddings.shape}")
        found = {"event_embeddings": _finite(embeddings.astype(np.float32), path)}
        if "event_hours" in arrays:
            hours = np.asarray(arrays["event_hours"], dtype=np.float32).reshape(-1)
            if len(hours) != len(embeddings):
                raise DataError(f"--events {path}: {len(hours)} event_hours for {len(embeddings)} events")
            found["event_hours"] = [hours.tolist()]
        return found
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(f"--events {path}: not a numeric .npy array ({error or type(error).__name__})") from None
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise DataError(f"--events {path}: expected a numeric (n_events, dim) array, got {array.dtype} "
                             f"{array.shape}")
        return {"event_embeddings": _finite(array.astype(np.float32), path)}
    text = read_user_text(path, "--events")
    return {"events": [line.strip() for line in text.splitlines() if line.strip()]}


def read_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    from ..data.cxr.triplets import MIN_IMAGE_SIDE

    if not path.is_file():
        raise FileNotFoundError(f"--prev {path}: no such file")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("L")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"--prev {path}: not a readable image ({error})") from None
    if min(image.size) < MIN_IMAGE_SIDE:
        raise DataError(f"--prev {path}: {image.size[0]} x {image.size[1]} pixels, smaller than {MIN_IMAGE_SIDE} x "
                        f"{MIN_IMAGE_SIDE}: not a chest X-ray")
    return image


def _saved_event_dim(model: str) -> int | None:
    """The event width a local pipeline folder's event encoder takes, read from its config file (None for a Hub id),
    so that a mismatch fails before the model loads."""
    import json

    config = Path(model) / "event_encoder" / "config.json"
    return json.loads(config.read_text()).get("event_dim") if config.is_file() else None


def _check_event_width(events: dict[str, Any], dim: int | None, args: argparse.Namespace) -> None:
    """Event embeddings against the width ``dim`` the model's event encoder takes (None: not known yet)."""
    if "event_embeddings" in events and dim is not None and events["event_embeddings"].shape[1] != dim:
        raise ModelError(f"--events {args.events}: {events['event_embeddings'].shape[1]}-d event embeddings, but "
                         f"--model {args.model} takes {dim}-d ones")


def run(args: argparse.Namespace) -> None:
    from ..hub.errors import check_model_path, explain_missing_model
    from ..io import atomic_file, check_output_file
    from .common import local_folder, torch_device

    # everything a user can get wrong is checked here, before the model loads
    if args.out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ArgumentError(f"--out {args.out}: name a .png or .jpg file")
    if args.out.exists() and not args.overwrite:
        raise ArgumentError(f"--out {args.out}: exists; pass --overwrite to replace it")
    check_output_file(args.out, {"--prev": args.prev, "--events": args.events,
                                 "--model": local_folder(args.model)})
    check_model_path(str(args.model), "--model")
    device = torch_device(args.device or "cpu")
    previous = read_image(args.prev)
    events = read_events(args.events)
    _check_event_width(events, _saved_event_dim(args.model), args)

    # the checks passed: now diffusers and the model
    import torch

    from ..pipelines.pipeline_ehrxdiff import EHRXDiffPipeline

    with explain_missing_model(str(args.model), "--model"):
        pipe = EHRXDiffPipeline.from_pretrained(str(args.model))
    pipe.to(device)
    _check_event_width(events, pipe.event_encoder.config.event_dim, args)  # a Hub model: known only now
    if "events" in events and pipe.event_embedder is None:
        raise ModelError(f"--model {args.model} has no event embedder: give --events as a .npy array of event "
                         "embeddings")
    if events.get("events") == []:
        logger.info("--events %s holds no event: predicting from the previous image alone (the null context)",
                    args.events)
    image = pipe(previous, **events, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                 eta=args.eta, generator=torch.Generator().manual_seed(args.seed)).images[0]
    with atomic_file(args.out) as temporary:
        image.save(temporary, format="JPEG" if args.out.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    print(f"predicted image written to {args.out} ({image.size[0]} x {image.size[1]}, {args.steps} DDIM steps, "
          f"guidance {args.guidance_scale:g}, seed {args.seed})")
