"""Moved to :mod:`ehr_diffusers.data.cxr.demo`; this alias keeps the old import path working."""

import sys

from .cxr import demo as _moved

sys.modules[__name__] = _moved
