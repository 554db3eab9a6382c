"""Small file-system helpers shared by every writer: all-or-nothing output directories."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    pass


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """OutputExistsError if `out` exists, is not an empty directory, and `overwrite` is off (a
    command calls this first, to fail before its work rather than after it)."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write into a hidden sibling directory and rename it to `out` only on success.

    A crash or an exception leaves `out` as it was (absent, or the previous version), so a
    reader never sees a half-written dataset.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
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
