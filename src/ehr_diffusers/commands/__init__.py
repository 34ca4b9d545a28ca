"""The work of each ``ehr-diffusers`` command, one module per command group; ``cli.py`` parses and dispatches.

Every module here imports only the standard library at import time, so that ``ehr-diffusers --help`` stays fast; the
heavy libraries (torch, diffusers, datasets, polars) load inside the functions that need them.
"""
