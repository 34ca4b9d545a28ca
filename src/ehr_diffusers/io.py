"""Writing output folders all at once, so that a failure never leaves half a dataset behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

# Every folder written through ``atomic_directory`` holds this file; ``--overwrite`` replaces only such folders
# (or empty ones), so that a mistyped --out can never delete a user's data.
MARKER_NAME = ".ehr-diffusers-output"


class OutputExistsError(FileExistsError):
    """The output folder exists and may not be replaced."""


def check_output_dir(
    out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (), option: str = "--overwrite"
) -> Path:
    """Fails early, before any work, when ``out`` may not be written.

    ``out`` may not be, or contain, one of ``inputs``; an existing ``out`` is replaced only with ``overwrite`` and
    only when it is empty or an earlier ehr-diffusers output.
    """
    out = Path(out)
    resolved = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == resolved or resolved in source.parents:
            raise OutputExistsError(f"{out}: output folder would replace the input {source}; choose another --out")
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out}: output folder exists; pass {option} to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER_NAME).is_file()):
            raise OutputExistsError(
                f"{out}: exists and was not written by ehr-diffusers; {option} only replaces earlier outputs"
            )
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; on success it gets the permissions of a plainly created
    file and replaces ``path`` by a rename, on any error it is removed, so a reader never sees half a file.

    ``durable`` also flushes the file to disk before the rename, so that it is whole even after a power cut (a
    resumable cache relies on that).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        if durable:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(
    out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (), option: str = "--overwrite"
) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``out``; on success it replaces ``out``, on any error (or interrupt)
    it is removed and an earlier ``out`` is left as it was.

    The temporary folder lives in the same parent so that the final step is a rename on one file system.
    """
    out = check_output_dir(out, overwrite, inputs, option).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output gets the permissions of a plain mkdir
    (staging / MARKER_NAME).write_text("written by ehr-diffusers; --overwrite may replace this folder\n")
    trash: Path | None = None
    try:
        yield staging
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if trash is not None and (trash / out.name).exists() and not out.exists():
            os.replace(trash / out.name, out)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` (UTF-8) through :func:`atomic_file`, so that a reader never sees half a file."""
    with atomic_file(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
