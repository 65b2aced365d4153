"""Files written so that a crash leaves the old version or the new one, never a torn one
(the token cache's meta.json, a checkpoint's `latest` pointer)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text(path: Path, text: str, tmp: Path | None = None) -> None:
    """Write text to tmp (default: path + ".tmp"), flush it, rename it over path, flush the directory.
    A failure removes tmp and leaves path as it was."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
