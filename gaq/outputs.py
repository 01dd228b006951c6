"""Output folders of the commands (``gaq quantize --out``, ``gaq convert-ldm --out``):
checked before any work, written whole or not at all.

A command that computes for minutes before writing checks its output path first: a file
where a folder should be, a parent that is a file, a folder it cannot write to, or a
folder that already holds something (replaced only with ``--overwrite``, and only when it
holds an earlier output of the same command) is one clear line before any compute. The
output is then written into a temp folder beside it and renamed into place, so a failure
midway leaves nothing behind and an earlier output is replaced only once the new one is
complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gaq.errors import GaqError

__all__ = ["check_output_file", "check_output_folder", "output_folder"]


def check_output_folder(path: str | Path, flag: str, *, what: str,
                        marker: str | None = None, overwrite: bool = False) -> Path:
    """Check that ``path`` can become the output folder ``what`` (e.g. "quantization
    state"), named by ``flag`` in the messages: it does not exist, or is an empty folder,
    or, with ``overwrite``, a folder holding an earlier output (recognised by its
    ``marker`` file). Nothing is created. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GaqError(f"{flag} {path} is a file, not a folder; choose a new folder for the "
                       f"{what} (it is created)")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GaqError(f"{flag} {path}: {blocker} is a file, not a folder; choose another "
                       "path")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            earlier = marker is not None and (path / marker).is_file()
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            if earlier and not overwrite:
                raise GaqError(f"{flag} {path} exists and holds an earlier {what}; choose a "
                               "new folder, or add --overwrite to replace it")
            if not earlier:
                only = (f", and is no earlier {what}, the only thing --overwrite replaces"
                        if overwrite else "")
                raise GaqError(f"{flag} {path} exists and is not empty (it holds {shown})"
                               f"{only}; choose a new folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GaqError(f"{flag} {path}: cannot write to {existing} (permission denied); "
                       "choose a writable folder")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Check that ``path`` can be written as a file (an existing file is replaced): not a
    folder, no parent that is a file, a writable folder. Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise GaqError(f"{flag} {path} is a folder; name a file, e.g. {path / 'samples.png'}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GaqError(f"{flag} {path}: {blocker} is a file, not a folder; choose another "
                       "path")
    existing = next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists()
                                                      and not os.access(path, os.W_OK)):
        raise GaqError(f"{flag} {path}: cannot write there (permission denied); choose a "
                       "writable place")
    return path


@contextlib.contextmanager
def output_folder(path: str | Path, flag: str, *, what: str, marker: str | None = None,
                  overwrite: bool = False) -> Iterator[Path]:
    """A temp folder beside ``path`` to write the output into; when the block ends
    without an error it becomes ``path`` (an earlier output there, allowed by
    ``overwrite``, is replaced), else it is removed. ``path`` is checked again (as by
    :func:`check_output_folder`) in case it changed while the command computed."""
    path = check_output_folder(path, flag, what=what, marker=marker, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            # an empty folder, or an earlier output (checked above): moved aside first,
            # so a failed rename below leaves it where it was
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}-{os.getpid()}-old-",
                                        dir=path.parent))
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
