"""Loaded by every Python process of a test run whose PYTHONPATH starts with this folder: a process of rank > 0
(torchrun sets RANK) appends every path it opens for writing, creates, renames or removes to
``$EHR_WRITE_AUDIT.rank<N>``, so that a test can assert that only the main process writes the outputs
(tests/test_scale_out.py). Files written outside Python (torch.save, safetensors) are not seen; a saved model's
config.json is."""

import os
import sys

_RANK, _LOG = os.environ.get("RANK", "0"), os.environ.get("EHR_WRITE_AUDIT")
_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move",
           "os.truncate"}


def _audit(event: str, args: tuple) -> None:
    if _busy:  # the log's own opening
        return
    if event == "open":
        path, mode = args[0], args[1]
        if isinstance(mode, str) and not any(flag in mode for flag in "wax+"):
            return
        if isinstance(mode, int) or mode is None:  # os.open: flags
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                return
    elif event not in _EVENTS:
        return
    else:
        path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        _busy.append(True)
        try:
            with open(f"{_LOG}.rank{_RANK}", "a") as log:
                log.write(f"{event}\t{os.path.abspath(os.fsdecode(path))}\n")
        finally:
            _busy.clear()


_busy: list = []
if _LOG and _RANK != "0":
    sys.addaudithook(_audit)
