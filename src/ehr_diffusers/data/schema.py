"""Moved to :mod:`ehr_diffusers.data.ehr.schema`; this alias keeps the old import path working."""

import sys

from .ehr import schema as _moved

sys.modules[__name__] = _moved
