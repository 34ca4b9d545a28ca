"""Moved to :mod:`ehr_diffusers.evaluation.ehr.baselines`; this alias keeps the old import path working."""

import sys

from .ehr import baselines as _moved

sys.modules[__name__] = _moved
