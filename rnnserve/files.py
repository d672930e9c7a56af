"""Files written so that a crash never leaves half of one and another user can read them:
a new file under a hidden name beside its destination, synced, renamed over it, and the
folder synced (checkpoints, exported models)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_file(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file in ``directory`` (an open descriptor and its path) with the mode the
    umask gives (0644 under umask 022), not mkstemp's owner-only 0600: a server or job
    running as another user reads what was written."""
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {str(directory)!r}")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable, where the file system can."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)
