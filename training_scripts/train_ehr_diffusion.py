#!/usr/bin/env python
"""Train the text-conditioned EHR denoiser and save the EHRLatentDiffusionPipeline (diffusers-examples style).

    accelerate launch training_scripts/train_ehr_diffusion.py --help

The code lives in the package, in `ehr_diffusers/training/train_ehr_diffusion.py`, and this file only calls its
`main()`: top-level folders are not part of the wheel, and `ehr-diffusers train-ehr` must run the same script from an
installed package (`accelerate launch -m ehr_diffusers.training.train_ehr_diffusion ...`). Read or copy that module to
change the training loop.
"""

from ehr_diffusers.training.common import run_script
from ehr_diffusers.training.train_ehr_diffusion import main

if __name__ == "__main__":
    run_script(main)
