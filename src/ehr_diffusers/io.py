"""Writing output folders all at once, so that a failure never leaves half a dataset behind."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import ArgumentError, DataError, OutputError

# Every folder written through ``atomic_directory`` holds this file; ``--overwrite`` replaces only such folders
# (or empty ones), so that a mistyped --out can never delete a user's data.
MARKER_NAME = ".ehr-diffusers-output"


# The outputs this process has put in place, in order: an interrupted command says truthfully what it left behind.
# Outputs written inside a staging folder are not recorded: they stand or fall with it.
_COMPLETED: list[Path] = []
_STAGING: set[Path] = set()


class OutputExistsError(OutputError):
    """The output folder exists and may not be replaced."""


class OutputArgumentError(OutputExistsError, ArgumentError):
    """The output folder a command-line argument names may not be written: bad input, hence also a ValueError."""


def _completed(path: Path) -> None:
    path = Path(path).absolute()
    if not any(staging in path.parents for staging in _STAGING):
        _COMPLETED.append(path)


def completed_outputs() -> list[Path]:
    """The files and folders put in place by :func:`atomic_file`, :func:`atomic_directory` and :func:`atomic_merge`
    in this process, oldest first."""
    return list(_COMPLETED)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Holds SIGINT and SIGTERM until the block ends, then delivers them, so that the swap of an old output for a new
    one is never cut in half (it would leave both, or neither). Only the main thread handles signals; elsewhere this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {kind: signal.signal(kind, lambda number, frame: pending.append(number)) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in previous.items():  # None: a handler not set from Python, whose default was in force
            signal.signal(kind, signal.SIG_DFL if handler is None else handler)
        if pending:  # SIGTERM, the stronger request, wins over a Ctrl-C that came with it
            signal.raise_signal(signal.SIGTERM if signal.SIGTERM in pending else signal.SIGINT)


def check_output_dir(
    out: str | Path,
    overwrite: bool = False,
    inputs: Iterable[str | Path] | Mapping[str, str | Path | None] = (),
    option: str = "--overwrite",
    *,
    argument: str | None = None,
    merge: bool = False,
) -> Path:
    """Fails early, before any work, when ``out`` may not be written.

    ``out`` may not be, contain, or lie inside one of ``inputs``; an existing ``out`` is replaced only with
    ``overwrite`` and only when it is empty or an earlier ehr-diffusers output. With ``merge`` (output added to
    ``out`` by :func:`atomic_merge`, beside what it holds, as a training run's checkpoints and model) an existing
    folder is fine and ``out`` may instead not be, or lie inside, an input, which would mix output into it.

    ``inputs`` may map argument names to paths (None: not given) and ``argument`` names ``out``'s own, so that the
    error, then an :class:`OutputArgumentError`, tells the user which argument to change.
    """
    out = Path(out)
    where = f"{argument} {out}" if argument else str(out)
    error = OutputArgumentError if argument else OutputExistsError
    for label, overlap in _overlaps(out, inputs):
        if merge and overlap in ("is", "lies inside"):
            raise error(f"{where}: is, or lies inside, the input {label}; choose another output folder")
        if not merge and overlap in ("is", "contains"):
            raise error(f"{where}: output folder would replace the input {label}; choose another {argument or '--out'}")
        if not merge and overlap == "lies inside":
            raise error(f"{where}: lies inside the input {label}; choose an output folder outside it")
    if merge:
        if out.exists() and not out.is_dir():
            raise error(f"{where}: exists and is not a folder")
    elif out.exists():
        if not overwrite:
            raise error(f"{where}: output folder exists; pass {option} to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER_NAME).is_file()):
            raise error(f"{where}: exists and was not written by ehr-diffusers; {option} only replaces earlier outputs")
    return out


def check_output_file(out: str | Path, inputs: Mapping[str, str | Path | None], argument: str = "--out") -> Path:
    """Fails early when the output file ``out`` is one of ``inputs`` or lies inside one of them (a model folder):
    with ``--overwrite`` it would replace an input."""
    out = Path(out)
    for label, overlap in _overlaps(out, inputs):
        if overlap in ("is", "lies inside"):
            raise OutputArgumentError(f"{argument} {out}: is, or lies inside, the input {label}; choose another "
                                      "output file")
    return out


def _overlaps(out: Path, inputs: Iterable[str | Path] | Mapping[str, str | Path | None]) -> Iterator[tuple[str, str]]:
    """(the input as a message names it, how ``out`` overlaps it: "is", "lies inside" or "contains") for each given
    input that ``out`` overlaps; ``inputs`` may map argument names to paths (None: not given)."""
    named = inputs.items() if isinstance(inputs, Mapping) else ((None, source) for source in inputs)
    resolved = out.resolve()
    for name, source in named:
        if source is None:
            continue
        source = Path(source).resolve()
        label = f"{name} {source}" if name else str(source)
        if source == resolved:
            yield label, "is"
        elif source in resolved.parents:
            yield label, "lies inside"
        elif resolved in source.parents:
            yield label, "contains"


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
        with deferred_signals():
            os.replace(temporary, path)
            _completed(path)
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
    _STAGING.add(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _STAGING.discard(staging)
    with deferred_signals():  # the old output or the new one, never both and never neither
        trash: Path | None = None
        try:
            if out.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, trash / out.name)
            os.replace(staging, out)
            _completed(out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if trash is not None and (trash / out.name).exists() and not out.exists():
                os.replace(trash / out.name, out)
            raise
        finally:
            if trash is not None and out.exists():  # never delete the old output while it is the only one
                shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_merge(out: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder inside ``out``; on success each entry written there replaces the entry of the
    same name in ``out`` by a rename; on an error while writing it is removed and ``out`` is left as it was.

    For a folder that holds more than one writer's output (a training run's checkpoints beside its final model), which
    :func:`atomic_directory` would replace whole.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merge.tmp-", dir=out))
    _STAGING.add(staging.absolute())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _STAGING.discard(staging.absolute())
    with deferred_signals():
        trash = Path(tempfile.mkdtemp(prefix=".merge.old-", dir=out))
        try:
            for item in sorted(staging.iterdir()):
                target = out / item.name
                if target.exists() or target.is_symlink():
                    os.replace(target, trash / item.name)  # a rename, not a slow delete, between old and new
                try:
                    os.replace(item, target)
                except BaseException:
                    if (trash / item.name).exists() and not target.exists():
                        os.replace(trash / item.name, target)  # the old entry back: never neither
                    raise
                _completed(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` (UTF-8) through :func:`atomic_file`, so that a reader never sees half a file."""
    with atomic_file(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")


def refuse_pickle(safe_serialization: bool, what: str) -> None:
    """Weights are written as safetensors only: a pickled file runs code when it is loaded. A ValueError naming
    ``what`` when a caller asks for ``safe_serialization=False``."""
    if not safe_serialization:
        raise ArgumentError(f"safe_serialization=False: {what} saves weights as safetensors only (pickle files can run "
                         "code when loaded); leave safe_serialization at True")


def read_user_text(path: str | Path, argument: str) -> str:
    """The UTF-8 text of a file the user named with ``argument``; a DataError naming both when the file is absent,
    a folder, or not UTF-8 text (a Windows-1252 export, say), rather than a bare decoding error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{argument} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{argument} {path}: not UTF-8 text ({error.reason} at byte {error.start}); save the file as "
                        "UTF-8") from None
