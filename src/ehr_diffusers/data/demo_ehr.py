"""Moved to :mod:`ehr_diffusers.data.ehr.demo`; this alias keeps the old import path working."""

import sys

from .ehr import demo as _moved

sys.modules[__name__] = _moved
