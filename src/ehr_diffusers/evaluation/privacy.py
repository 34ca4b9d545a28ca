"""Moved to :mod:`ehr_diffusers.evaluation.ehr.privacy`; this alias keeps the old import path working."""

import sys

from .ehr import privacy as _moved

sys.modules[__name__] = _moved
