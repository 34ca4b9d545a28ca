#!/usr/bin/env python
"""Train a grayscale chest X-ray AutoencoderKL for the EHRXDiff pipeline (diffusers-examples style).

    accelerate launch training_scripts/train_cxr_vae.py --help

The code lives in the package, in `ehr_diffusers/training/train_cxr_vae.py`, and this file only calls its `main()`:
top-level folders are not part of the wheel, and an installed package runs the same script with
`accelerate launch -m ehr_diffusers.training.train_cxr_vae ...`. Read or copy that module to change the training loop.
"""

from ehr_diffusers.training.common import run_script
from ehr_diffusers.training.train_cxr_vae import main

if __name__ == "__main__":
    run_script(main)
