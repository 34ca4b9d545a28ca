"""Moved to :mod:`ehr_diffusers.evaluation.ehr.clinical`; this alias keeps the old import path working."""

import sys

from .ehr import clinical as _moved

sys.modules[__name__] = _moved
