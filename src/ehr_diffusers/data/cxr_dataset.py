"""Moved to :mod:`ehr_diffusers.data.cxr.dataset`; this alias keeps the old import path working."""

import sys

from .cxr import dataset as _moved

sys.modules[__name__] = _moved
