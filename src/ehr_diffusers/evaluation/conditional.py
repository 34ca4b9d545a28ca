"""Moved to :mod:`ehr_diffusers.evaluation.ehr.conditional`; this alias keeps the old import path working."""

import sys

from .ehr import conditional as _moved

sys.modules[__name__] = _moved
