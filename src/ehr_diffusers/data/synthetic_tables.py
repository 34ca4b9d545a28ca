"""Moved to :mod:`ehr_diffusers.data.ehr.synthetic_tables`; this alias keeps the old import path working."""

import sys

from .ehr import synthetic_tables as _moved

sys.modules[__name__] = _moved
