"""Moved to :mod:`ehr_diffusers.evaluation.ehr.fidelity`; this alias keeps the old import path working."""

import sys

from .ehr import fidelity as _moved

sys.modules[__name__] = _moved
