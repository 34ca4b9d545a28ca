"""Moved to :mod:`ehr_diffusers.data.cxr.events`; this alias keeps the old import path working."""

import sys

from .cxr import events as _moved

sys.modules[__name__] = _moved
