"""Moved to :mod:`ehr_diffusers.evaluation.ehr.suite`; this alias keeps the old import path working."""

import sys

from .ehr import suite as _moved

sys.modules[__name__] = _moved
