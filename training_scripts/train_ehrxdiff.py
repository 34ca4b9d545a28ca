#!/usr/bin/env python
"""Train the EHRXDiff denoiser (UNet, fusion adapter, event encoder) and save the EHRXDiffPipeline (diffusers-examples
style).

    accelerate launch training_scripts/train_ehrxdiff.py --help

The code lives in the package, in `ehr_diffusers/training/train_ehrxdiff.py`, and this file only calls its `main()`:
top-level folders are not part of the wheel, and `ehr-diffusers train-cxr` must run the same script from an installed
package (`accelerate launch -m ehr_diffusers.training.train_ehrxdiff ...`). Read or copy that module to change the
training loop.
"""

from ehr_diffusers.training.common import run_script
from ehr_diffusers.training.train_ehrxdiff import main

if __name__ == "__main__":
    run_script(main)
