#!/usr/bin/env python
"""Pretrain the EHRXDiff event encoder against a chest X-ray image encoder with CLIP's contrastive loss
(diffusers-examples style).

    accelerate launch training_scripts/train_event_clip.py --help

The code lives in the package, in `ehr_diffusers/training/train_event_clip.py`, and this file only calls its
`main()`: top-level folders are not part of the wheel, and an installed package runs the same script with
`accelerate launch -m ehr_diffusers.training.train_event_clip ...`. Read or copy that module to change the training
loop.
"""

from ehr_diffusers.training.common import run_script
from ehr_diffusers.training.train_event_clip import main

if __name__ == "__main__":
    run_script(main)
