"""trainer/allocator.py: glibc's malloc thresholds are raised, unless the environment sets them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from trainer import allocator

CALL = "from trainer.allocator import keep_freed_memory; print(keep_freed_memory())"


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in allocator.ENV_SETTINGS} | env_extra
    out = subprocess.run(
        [sys.executable, "-c", CALL], env=env, capture_output=True, text=True, check=True, cwd=REPO
    )
    return out.stdout.strip()


@pytest.mark.skipif(allocator._libc() is None, reason="not glibc")
def test_sets_the_thresholds_on_glibc():
    assert _run({}) == "True"  # both mallopt calls succeeded (a rejected value returns 0)


@pytest.mark.parametrize("name", allocator.ENV_SETTINGS)
def test_an_explicit_environment_setting_wins(name):
    assert _run({name: "131072"}) == "False"


def test_thresholds_are_values_glibc_accepts():
    # older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
    assert 0 < allocator.MMAP_THRESHOLD <= 32 * 1024 * 1024 <= allocator.TRIM_THRESHOLD
