"""Moved to :mod:`ehr_diffusers.evaluation.stats`; this alias keeps the old import path working."""

import sys

from . import stats as _moved

sys.modules[__name__] = _moved
