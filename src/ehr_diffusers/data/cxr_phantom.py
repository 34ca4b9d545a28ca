"""Moved to :mod:`ehr_diffusers.data.cxr.phantom`; this alias keeps the old import path working."""

import sys

from .cxr import phantom as _moved

sys.modules[__name__] = _moved
