"""Moved to :mod:`ehr_diffusers.evaluation.ehr.data`; this alias keeps the old import path working."""

import sys

from .ehr import data as _moved

sys.modules[__name__] = _moved
