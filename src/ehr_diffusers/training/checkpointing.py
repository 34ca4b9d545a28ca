"""Checkpoints of the training scripts: diffusers-format model folders inside accelerate's ``save_state`` folders,
pruning old ``checkpoint-N`` folders, and resolving ``--resume_from_checkpoint``.

A checkpoint folder ``OUTPUT/checkpoint-N`` holds accelerate's optimizer, LR scheduler and RNG states plus the model
saved with ``save_pretrained`` in a subfolder (``OUTPUT/checkpoint-N/denoiser``) and, with EMA, the averaged weights
beside it (``denoiser_ema``), so that a checkpoint's model loads on its own with ``from_pretrained(dir, subfolder=...)``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: str | Path) -> int:
    """The optimisation step of a ``checkpoint-N`` folder; a ValueError naming the argument for another name."""
    match = _CHECKPOINT.match(Path(path).name)
    if match is None:
        raise ValueError(f"--resume_from_checkpoint {path}: not a checkpoint folder (expected a name like "
                         f"{CHECKPOINT_PREFIX}500, as written by --checkpointing_steps)")
    return int(match.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and _CHECKPOINT.match(path.name)]
    return sorted(found, key=checkpoint_step)


def resolve_resume_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names: ``latest`` is the newest checkpoint in ``output_dir`` (None, and
    training starts afresh, when there is none); a path is taken as it is or, when it does not exist, relative to
    ``output_dir``. A path that names no checkpoint is a ValueError: silently starting afresh would waste a run."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.exists() and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder (nor "
                         f"{Path(output_dir) / resume_from_checkpoint}); pass 'latest' or a {CHECKPOINT_PREFIX}N folder")
    checkpoint_step(path)
    return path


def resume_state(accelerator: Any, resume_from: Path | None, requested: str | None, steps_per_epoch: int,
                 gradient_accumulation_steps: int, logger: Any) -> tuple[int, int, int]:
    """Loads ``resume_from`` (when there is one) and returns (global step, first epoch, batches of that epoch to
    skip), so that a resumed run continues where the checkpoint left off."""
    if resume_from is None:
        if requested:
            logger.info(f"--resume_from_checkpoint {requested}: no checkpoint yet; starting afresh")
        return 0, 0, 0
    logger.info(f"Resuming from checkpoint {resume_from}")
    accelerator.load_state(str(resume_from))
    global_step = checkpoint_step(resume_from)
    return (global_step, global_step // steps_per_epoch,
            (global_step % steps_per_epoch) * gradient_accumulation_steps)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None, logger: Any = None) -> list[Path]:
    """Before a new checkpoint is saved, removes the oldest ones so that at most ``total_limit - 1`` remain (the new
    one then makes ``total_limit``). Returns the removed folders."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    excess = len(found) - max(total_limit - 1, 0)
    removed = found[:excess] if excess > 0 else []
    for path in removed:
        shutil.rmtree(path)
    if removed and logger is not None:
        logger.info(f"--checkpoints_total_limit {total_limit}: removed {', '.join(p.name for p in removed)}")
    return removed


def register_diffusers_hooks(
    accelerator: Any,
    model_cls: type,
    subfolder: str,
    ema_model: Any = None,
) -> None:
    """Makes ``accelerator.save_state(dir)`` write the prepared model as ``dir/<subfolder>`` (``save_pretrained``) and
    the EMA weights as ``dir/<subfolder>_ema``, and ``accelerator.load_state(dir)`` read them back, instead of
    accelerate's anonymous ``model.safetensors``."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, subfolder))
            if weights:
                weights.pop()  # saved above; accelerate must not save it again
        if ema_model is not None and accelerator.is_main_process:
            ema_model.save_pretrained(os.path.join(output_dir, f"{subfolder}_ema"))

    def load_hook(models: list, input_dir: str) -> None:
        if ema_model is not None and models:
            load_ema_state(ema_model, accelerator.unwrap_model(models[0]), os.path.join(input_dir, f"{subfolder}_ema"))
            ema_model.to(accelerator.device)
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = model_cls.from_pretrained(input_dir, subfolder=subfolder)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_ema_state(ema_model: Any, model: Any, folder: str | Path) -> None:
    """Restores an ``EMAModel`` from the folder its ``save_pretrained`` wrote: the averaged weights (in ``model``'s
    parameter order) and the EMA counters recorded in ``config.json``. ``EMAModel.from_pretrained`` does the same
    through a deprecated ``from_config(path)`` call and warns about the counters as unknown config keys."""
    import json

    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / SAFETENSORS_WEIGHTS_NAME))
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"{folder}: EMA weights lack parameter(s) {missing[:5]}; the checkpoint belongs to another model")
    state = {key: config[key] for key in ema_model.state_dict() if key != "shadow_params" and key in config}
    state["shadow_params"] = [weights[name] for name in names]
    ema_model.load_state_dict(state)


def save_checkpoint(accelerator: Any, output_dir: str | Path, global_step: int, total_limit: int | None,
                    logger: Any = None) -> Path:
    """Prunes old checkpoints (main process) and saves ``output_dir/checkpoint-<global_step>`` on every process (each
    saves its own RNG state; only the main process writes models and optimizer)."""
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, logger)
    accelerator.wait_for_everyone()
    path = Path(output_dir) / f"{CHECKPOINT_PREFIX}{global_step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if logger is not None:
        logger.info(f"saved state to {path}")
    return path


@contextmanager
def staged_output(output_dir: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder inside ``output_dir``; on success every entry written there is moved into
    ``output_dir`` (replacing entries of the same name), on error it is removed. A run that fails while saving never
    leaves half a model next to its checkpoints."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=out))
    try:
        yield staging
        for item in sorted(staging.iterdir()):
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output_dir(output_dir: str | Path, inputs: dict[str, str | Path | None]) -> Path:
    """``--output_dir`` must be a folder (or not exist yet) and must not be, or lie inside, an input folder:
    ``inputs`` maps each input's flag to its path. A ValueError names the argument."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out}: exists and is not a folder")
    resolved = out.resolve()
    for flag, source in inputs.items():
        if source is None:
            continue
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents:
            raise ValueError(f"--output_dir {out}: is, or lies inside, the input {flag} {source}; choose another "
                             "output folder")
    return out
