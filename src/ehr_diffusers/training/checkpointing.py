"""Checkpoints of the training scripts: diffusers-format model folders inside accelerate's ``save_state`` folders,
pruning old ``checkpoint-N`` folders, and resolving ``--resume_from_checkpoint``.

A checkpoint folder ``OUTPUT/checkpoint-N`` holds accelerate's optimizer, LR scheduler and RNG states (one file per
process), the batch layout it was written under (``training_state.json``) and every trained model saved with
``save_pretrained`` in its own subfolder (``OUTPUT/checkpoint-N/denoiser``) and, with EMA, the averaged weights beside
it (``denoiser_ema``), so that each model loads on its own with ``from_pretrained(dir, subfolder=...)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import ModelMixin
    from diffusers.training_utils import EMAModel

CHECKPOINT_PREFIX = "checkpoint-"
logger = logging.getLogger(__name__)
EMA_SUFFIX = "_ema"
MODEL_CONFIG_NAME = "config.json"
TRAINING_STATE_NAME = "training_state.json"
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
                         f"{Path(output_dir) / resume_from_checkpoint}); pass 'latest' or a {CHECKPOINT_PREFIX}N "
                         "folder")
    checkpoint_step(path)
    return path


def batch_layout(accelerator: Accelerator, args: Any) -> dict[str, int]:
    """How a run splits its batches: the processes, the batch per process and the accumulation steps. A checkpoint
    records it (``training_state.json``): resuming under another layout would change the effective batch, the data
    order and the learning-rate schedule's step count, so it is refused."""
    return {"num_processes": accelerator.num_processes, "train_batch_size": args.train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps}


def checkpoint_layout(checkpoint: str | Path) -> dict[str, int] | None:
    """The batch layout a checkpoint was written under; for checkpoints written before it was recorded, the process
    count alone (one RNG state file per process), or None."""
    folder = Path(checkpoint)
    if (folder / TRAINING_STATE_NAME).is_file():
        return json.loads((folder / TRAINING_STATE_NAME).read_text())
    states = list(folder.glob("random_states_*.pkl"))
    return {"num_processes": len(states)} if states else None


def check_layout(checkpoint: str | Path, layout: dict[str, int]) -> None:
    """An ArgumentError naming the checkpoint when it was written under another batch layout than ``layout``."""
    from ehr_diffusers.errors import ArgumentError

    recorded = checkpoint_layout(checkpoint)
    if recorded is None:
        return
    changed = {key: (recorded[key], layout[key]) for key in layout if key in recorded and recorded[key] != layout[key]}
    if not changed:
        return
    flags = {"num_processes": "processes", "train_batch_size": "batch per process",
             "gradient_accumulation_steps": "accumulation steps"}
    was = ", ".join(f"{flags[key]} {old}" for key, (old, _) in changed.items())
    now = ", ".join(f"{flags[key]} {new}" for key, (_, new) in changed.items())
    same = f" (--num-processes {recorded['num_processes']})" if "num_processes" in changed else ""
    raise ArgumentError(f"checkpoint {checkpoint}: written with {was}, this run has {now}. Resuming would change the "
                        "effective batch, the data order and the learning-rate schedule, so the result would match "
                        f"no uninterrupted run: resume with the same settings{same}, or start a new --output-dir")


def resume_state(accelerator: Accelerator, resume_from: Path | None, requested: str | None, steps_per_epoch: int,
                 layout: dict[str, int], logger: Any) -> tuple[int, int, int]:
    """Loads ``resume_from`` (when there is one) and returns (global step, first epoch, batches of that epoch to
    skip), so that a resumed run continues where the checkpoint left off. A checkpoint of another batch layout
    (:func:`batch_layout`) is refused before anything loads."""
    if resume_from is None:
        if requested:
            logger.info(f"--resume_from_checkpoint {requested}: no checkpoint yet; starting afresh")
        return 0, 0, 0
    check_layout(resume_from, layout)
    logger.info(f"Resuming from checkpoint {resume_from}")
    accelerator.load_state(str(resume_from))
    global_step = checkpoint_step(resume_from)
    return (global_step, global_step // steps_per_epoch,
            (global_step % steps_per_epoch) * layout["gradient_accumulation_steps"])


def epoch_batches(accelerator: Accelerator, dataloader: Any, epoch: int, first_epoch: int,
                  batches_to_skip: int) -> Iterator[Any]:
    """The batches of ``epoch`` in an order drawn from the seed and the epoch alone (the Accelerator's seedable
    sampler), less the first ``batches_to_skip`` in the epoch a resumed run starts in, so that a run resumed from any
    checkpoint, mid-epoch included, trains on the batches, and draws the noise, of the run that was never stopped.

    Starting a DataLoader's iterator draws a seed from torch's global generator. The uninterrupted run drew it at the
    start of the epoch, before the checkpoint saved that generator; a resumed run draws it after the checkpoint restored
    it, so that draw is undone here."""
    import torch

    dataloader.set_epoch(epoch)
    if epoch != first_epoch or not batches_to_skip:
        yield from dataloader
        return
    state = torch.get_rng_state()
    batches = iter(accelerator.skip_first_batches(dataloader, batches_to_skip))
    first = next(batches, None)
    torch.set_rng_state(state)
    if first is not None:
        yield first
        yield from batches


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


def register_checkpoint_hooks(
    accelerator: Accelerator,
    models: Mapping[str, ModelMixin],
    ema: Mapping[str, EMAModel] | None = None,
) -> None:
    """Makes ``accelerator.save_state(dir)`` write each of ``models`` as ``dir/<subfolder>`` (``save_pretrained``) and
    each of ``ema`` as ``dir/<subfolder>_ema``, and ``accelerator.load_state(dir)`` read them back, instead of
    accelerate's anonymous ``model_<i>.safetensors``: a checkpoint's models then load with ``from_pretrained``.

    Both map a subfolder name to a model (``ema``: to the ``EMAModel`` of the model of that name). Accelerate hands the
    hooks the prepared models as a list; each is matched to its subfolder by identity once unwrapped (DDP,
    ``torch.compile``), so the order of ``accelerator.prepare`` does not matter. Every model of ``models`` is saved and
    loaded, prepared or not; prepared models not in ``models`` are left to accelerate. Loading a checkpoint that lacks
    one of these subfolders, or holds another model subfolder, is a ValueError naming the subfolder and the
    checkpoint: it was written by another training set-up.
    """
    models, ema = dict(models), dict(ema or {})
    folders = {name: Path(name).name for name in [*models, *(f"{name}{EMA_SUFFIX}" for name in ema)]}
    if any(name != folder or folder in ("", ".", "..") for name, folder in folders.items()):
        raise ValueError(f"checkpoint subfolder names must be plain folder names, got {list(folders)}")
    if len(folders) != len(models) + len(ema):
        raise ValueError(f"a model name ends with {EMA_SUFFIX!r} like an EMA subfolder: {list(models)}")
    if set(ema) - set(models):
        raise ValueError(f"EMA for {sorted(set(ema) - set(models))} but no model of that name in {list(models)}")

    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    def registered(passed: list[torch.nn.Module]) -> list[int]:
        """Positions in accelerate's list of the models these hooks save, so that accelerate skips them."""
        targets = [unwrap(model) for model in models.values()]
        return [index for index, model in enumerate(passed) if any(unwrap(model) is target for target in targets)]

    def save_hook(passed: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for index in reversed(registered(passed)):
            if weights:  # empty where accelerate saves models its own way (DeepSpeed, FSDP)
                del weights[index]
        if accelerator.is_main_process:
            for name, model in models.items():
                unwrap(model).save_pretrained(os.path.join(output_dir, name))
            for name, ema_model in ema.items():
                ema_model.save_pretrained(os.path.join(output_dir, f"{name}{EMA_SUFFIX}"))

    def load_hook(passed: list[torch.nn.Module], input_dir: str) -> None:
        _check_subfolders(input_dir, list(folders), unused_ema=[f"{name}{EMA_SUFFIX}" for name in models
                                                                if name not in ema])
        for index in reversed(registered(passed)):
            del passed[index]
        for name, model in models.items():
            load_model_state(unwrap(model), input_dir, name)
        for name, ema_model in ema.items():
            load_ema_state(ema_model, unwrap(models[name]), os.path.join(input_dir, f"{name}{EMA_SUFFIX}"))
            ema_model.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _check_subfolders(checkpoint: str | Path, expected: list[str], unused_ema: list[str] = ()) -> None:
    """A ValueError naming the checkpoint and its subfolders when they are not the model subfolders (folders with a
    ``config.json``) that ``expected`` names: loading part of a checkpoint would resume a different training. The EMA
    of a trained model (``unused_ema``) is the exception: a run without EMA may resume from a run with it, and is told
    that the EMA is left out."""
    folder = Path(checkpoint)
    present = {path.name for path in folder.iterdir() if (path / MODEL_CONFIG_NAME).is_file()}
    for name in sorted(present & set(unused_ema)):
        logger.warning(f"checkpoint {folder}: its {name!r} subfolder is not loaded, this run keeps no EMA "
                       "(pass --use_ema to resume it)")
    missing = [name for name in expected if name not in present]
    extra = sorted(present - set(expected) - set(unused_ema))
    problems = [f"no {name!r} subfolder" for name in missing]
    problems += [f"a {name!r} subfolder this run does not train" for name in extra]
    if problems:
        raise ValueError(f"checkpoint {folder}: {'; '.join(problems)}. This run's checkpoints hold "
                         f"{', '.join(map(repr, expected))}: resume with the models (and --use_ema) of the run that "
                         "wrote it, or from another checkpoint")


def load_model_state(model: ModelMixin, checkpoint: str | Path, subfolder: str) -> None:
    """Loads ``checkpoint/subfolder`` into ``model`` in place (the prepared model and its optimizer keep their
    tensors); a ValueError naming the folder when its weights do not fit ``model``."""
    loaded = type(model).from_pretrained(checkpoint, subfolder=subfolder)
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as error:
        raise ValueError(f"checkpoint {Path(checkpoint) / subfolder}: does not fit this run's "
                         f"{type(model).__name__} ({error})") from None
    model.register_to_config(**loaded.config)


def load_ema_state(ema_model: EMAModel, model: ModelMixin, folder: str | Path) -> None:
    """Restores an ``EMAModel`` from the folder its ``save_pretrained`` wrote: the averaged weights (in ``model``'s
    parameter order) and the EMA counters recorded in ``config.json``. ``EMAModel.from_pretrained`` does the same
    through a deprecated ``from_config(path)`` call and warns about the counters as unknown config keys."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / MODEL_CONFIG_NAME).read_text())
    weights = load_file(str(folder / SAFETENSORS_WEIGHTS_NAME))
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"{folder}: EMA weights lack parameter(s) {missing[:5]}; the checkpoint belongs to another "
                         "model")
    state = {key: config[key] for key in ema_model.state_dict() if key != "shadow_params" and key in config}
    state["shadow_params"] = [weights[name] for name in names]
    ema_model.load_state_dict(state)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, global_step: int, total_limit: int | None,
                    layout: dict[str, int], logger: Any = None) -> Path:
    """Prunes old checkpoints (main process) and saves ``output_dir/checkpoint-<global_step>`` on every process (each
    saves its own RNG state; only the main process writes models, optimizer and the batch ``layout``)."""
    from ehr_diffusers.io import write_text_atomic

    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, logger)
    accelerator.wait_for_everyone()
    path = Path(output_dir) / f"{CHECKPOINT_PREFIX}{global_step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_text_atomic(path / TRAINING_STATE_NAME, json.dumps({"step": global_step, **layout}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if logger is not None:
        logger.info(f"saved state to {path}")
    return path
