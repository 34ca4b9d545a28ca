"""Moved to :mod:`ehr_diffusers.data.ehr.icd`; this alias keeps the old import path working."""

import sys

from .ehr import icd as _moved

sys.modules[__name__] = _moved
