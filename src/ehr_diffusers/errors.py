"""The errors a user can cause, as opposed to bugs.

Every exception here derives from :class:`EHRDiffusersError`. The command line prints one as one or two lines naming
the file, column, row or argument at fault and exits with status 2; any other exception is a bug and keeps its
traceback. Each kind also derives from the built-in exception a Python caller would catch (``ValueError``,
``FileExistsError``), so that library code raising them stays compatible with callers written before they existed.

This module is a leaf: it imports nothing from the package, so that any layer may raise these.
"""

from __future__ import annotations


class EHRDiffusersError(Exception):
    """A user error: bad input data, a model that is missing or does not fit, a bad argument or a refused output."""


class DataError(EHRDiffusersError, ValueError):
    """An input file, table, column, row, image or text that cannot be used; the message names it."""


class ModelError(EHRDiffusersError, ValueError):
    """A model folder or Hub id that is missing, incomplete, or does not fit the data or the command."""


class ArgumentError(EHRDiffusersError, ValueError):
    """A command-line argument (or a library argument) whose value cannot be used; the message names it."""


class OutputError(EHRDiffusersError, FileExistsError):
    """An output that may not be written: it exists, it is an input, or it lies inside one."""


__all__ = ["ArgumentError", "DataError", "EHRDiffusersError", "ModelError", "OutputError"]
