"""Benchmarks that print JSON (`longer bench ...`)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def finish(result: dict, out: str | None) -> dict:
    """Write the result JSON to `out` (if given) and return it for printing."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
