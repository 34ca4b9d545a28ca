"""Training scripts for the EHR latent diffusion pipeline, in the style of diffusers' example scripts.

``train_ehr_autoencoder`` trains the record autoencoder; ``train_ehr_diffusion`` trains the text-conditioned denoiser in
its latent space and saves the whole pipeline. Both run under ``accelerate launch``::

    accelerate launch -m ehr_diffusers.training.train_ehr_autoencoder --train_data_dir DATA --output_dir AE
    accelerate launch -m ehr_diffusers.training.train_ehr_diffusion --train_data_dir DATA --autoencoder_path AE \\
        --output_dir MODEL

They live inside the package (not only in the top-level ``training_scripts/``) so that an installed wheel can run them.
``common``, ``data`` and ``checkpointing`` hold the helpers the scripts share. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# What train_ehr_autoencoder writes and train_ehr_diffusion copies beside the pipeline; `evaluate` reads it there.
AUTOENCODER_METRICS_NAME = "autoencoder_metrics.json"


@dataclass
class TrainingRun:
    """What a script's ``main`` returns, for callers and tests.

    Args:
        output_dir: where the trained model was saved.
        global_step: optimisation steps done when training ended (counting steps done before a resume).
        resumed_from: the checkpoint folder training resumed from, or None.
        first_step: the step training (re)started at: 0, or the resumed checkpoint's step.
        losses: the training loss logged at each optimisation step of this run, in order.
        metrics: figures written at the end (the autoencoder's reconstruction metrics; empty for the denoiser).
        validation: the records generated for each validation prompt at the end, one line each (the denoiser).
    """

    output_dir: Path
    global_step: int
    resumed_from: Path | None = None
    first_step: int = 0
    losses: list[float] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
