"""Writing output folders all at once, so that a failure never leaves half a dataset behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    """The output folder exists and ``overwrite`` was not given."""


def check_output_dir(out: str | Path, overwrite: bool, option: str = "--overwrite") -> Path:
    """Fails early, before any work, when ``out`` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output folder exists; pass {option} to replace it")
    return out


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False, option: str = "--overwrite") -> Iterator[Path]:
    """Yields an empty temporary folder beside ``out``; on success it replaces ``out``, on error it is removed.

    The temporary folder lives in the same parent so that the final step is a rename on one file system.
    """
    out = check_output_dir(out, overwrite, option).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
