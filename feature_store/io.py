"""Small file-system helpers shared by every writer: all-or-nothing output directories.

`atomic_dir(out)` writes into a hidden sibling `.{out}.partial-{pid}@{host}-{random}` and
renames it to `out` only on success. A killed writer leaves its partial directory behind;
the next `atomic_dir` for the same `out` removes the stale ones and says so on stderr. A
partial directory is stale when

  * its owner ran on this host and that pid is no longer running, or
  * its owner is unknown (another host sharing the volume, or a name from before owners were
    recorded) and nothing in it changed for `STALE_AFTER_S` (24 hours).

So a live writer's directory is never removed: not on this host (its pid runs), and not on
another host sharing the volume unless it wrote nothing for a day.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from longer.errors import LongerError

STALE_AFTER_S = 24 * 3600


class OutputExistsError(LongerError, FileExistsError):
    pass


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """OutputExistsError if `out` exists, is not an empty directory, and `overwrite` is off (a
    command calls this first, to fail before its work rather than after it)."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def partial_name(out: Path) -> str:
    return f".{out.name}.partial-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:8]}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_change(path: Path) -> float:
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


def stale_reason(partial: Path, out_name: str, now: float | None = None) -> str | None:
    """Why `partial` (a sibling partial directory of `out_name`) is stale, or None if it may be live."""
    m = re.fullmatch(rf"\.{re.escape(out_name)}\.partial-(?:(\d+)@(.+)-)?[0-9a-f]{{8}}", partial.name)
    if m is None:
        return None
    pid, host = m.group(1), m.group(2)
    if pid is not None and host == _host():
        return None if _pid_running(int(pid)) else f"left by pid {pid}, which is no longer running"
    idle = (now or time.time()) - _last_change(partial)
    if idle > STALE_AFTER_S:
        return f"left by {'pid ' + pid + ' on ' + host if pid else 'an earlier run'}, unchanged for {idle / 3600:.0f} h"
    return None


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the stale partial directories of `out` (see the module docstring), telling stderr."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if not p.name.startswith(f".{out.name}.partial-"):
            continue
        reason = stale_reason(p, out.name) if p.is_dir() and not p.is_symlink() else None
        if reason:
            shutil.rmtree(p, ignore_errors=True)
            print(f"longer: removed {p} (a partial output {reason})", file=sys.stderr, flush=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write into a hidden sibling directory and rename it to `out` only on success.

    A crash or an exception leaves `out` as it was (absent, or the previous version), so a
    reader never sees a half-written dataset.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / partial_name(out)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
