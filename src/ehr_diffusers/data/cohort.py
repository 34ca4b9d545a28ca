"""Moved to :mod:`ehr_diffusers.data.ehr.cohort`; this alias keeps the old import path working."""

import sys

from .ehr import cohort as _moved

sys.modules[__name__] = _moved
