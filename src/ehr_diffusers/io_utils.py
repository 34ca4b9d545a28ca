"""Moved to :mod:`ehr_diffusers.io`; this alias keeps the old import path working."""

import sys

from . import io as _moved

sys.modules[__name__] = _moved
