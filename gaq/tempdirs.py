"""Temp folders named by the process that made them: ``gaq-<kind>-<pid>-<random>``.

A process killed (SIGKILL, out of memory) never runs its cleanup, so its temp folders
would stay in the temp directory for good. With its pid in the name, the next start of
any gaq process recognises the folders of processes that no longer exist and removes them
(:func:`remove_dead_temp_dirs`); a live process's folders are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["alive", "make_temp_dir", "remove_dead_temp_dirs", "temp_dir", "temp_prefix"]

_NAME = re.compile(r"gaq-[a-z]+-(\d+)-.+")


def temp_prefix(kind: str) -> str:
    """The name prefix of this process's temp folders of ``kind`` (lowercase letters)."""
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"temp folder kind {kind!r} must be lowercase letters")
    return f"gaq-{kind}-{os.getpid()}-"


def make_temp_dir(kind: str) -> Path:
    """A new temp folder of ``kind``; the caller removes it (or the next start does, once
    this process is gone)."""
    return Path(tempfile.mkdtemp(prefix=temp_prefix(kind)))


@contextlib.contextmanager
def temp_dir(kind: str) -> Iterator[Path]:
    """A temp folder of ``kind`` for the duration of the block, removed however it ends."""
    path = make_temp_dir(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_dead_temp_dirs(root: str | Path | None = None) -> list[Path]:
    """The gaq temp folders under ``root`` (default: the temp directory) whose process no
    longer exists, removed; returns them. Folders of live processes, and names without a
    pid, are left alone."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob("gaq-*-*-*"):
        m = _NAME.fullmatch(folder.name)
        if m is None or not folder.is_dir() or folder.is_symlink():
            continue
        if int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
