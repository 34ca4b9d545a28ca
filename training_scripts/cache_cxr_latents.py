#!/usr/bin/env python
"""Encode every image of a prepare-cxr dataset once with a VAE, sharded over the processes, for the EHRXDiff training.

    accelerate launch training_scripts/cache_cxr_latents.py --help

The code lives in the package, in `ehr_diffusers/training/cache_cxr_latents.py`, and this file only calls its
`main()`: top-level folders are not part of the wheel, and an installed package runs the same script with
`accelerate launch -m ehr_diffusers.training.cache_cxr_latents ...` (or `ehr-diffusers cache-latents`).
"""

from ehr_diffusers.training.cache_cxr_latents import main
from ehr_diffusers.training.common import run_script

if __name__ == "__main__":
    run_script(main)
