"""CPU threads that fit the machine this process really has.

`cpu_budget()` is the number of CPUs the process may use: the smallest of its CPU affinity
(`os.sched_getaffinity`: taskset, cpusets) and its cgroup CPU quota, rounded up (v2 `cpu.max`,
v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; the process's own cgroup and every ancestor, as
a Kubernetes pod's CPU limit is written), and at least 1. Not `os.cpu_count()`, which counts
the node's cores: a pod limited to 2 CPUs on a 64-core node that starts 64 torch threads is
throttled to a crawl.

`configure_threads(n, source)` sets torch's intra-op threads (and inter-op threads, once, to
the same number) to `n` from an explicit setting (`train.threads`, `LONGER_THREADS`) or, when
`n` is None, to `cpu_budget()`, and says on stderr what it chose and why.

`passive_wait_default()` sets `OMP_WAIT_POLICY=PASSIVE` unless the environment says otherwise:
OpenMP threads that wait for work sleep instead of spinning. It must run before torch is
imported (libgomp reads it once, at load); the `longer` CLI, `python -m trainer` and hence
torchrun workers call it first thing. Why: with libgomp's default spinning, two trainings on
2 cores (2 threads each) did together 0.4–0.7× the samples/s of one alone, and any other busy
process on the machine slowed a lone one the same way (README, Training, "CPU threads").

Bad values (a quota file that does not parse, `LONGER_THREADS=abc`) raise `ThreadsError`
naming the file or the setting.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

from longer.errors import UsageError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
AUTO = "auto"


class ThreadsError(UsageError):
    """A thread setting or a cgroup file with a value that is not a CPU count; names which."""


def _quota_cpus(path: Path, text: str, period_text: str | None = None) -> float | None:
    """CPUs allowed by one quota file (None: no limit). v2: text = "max 100000" or "150000 100000";
    v1: text = cfs_quota_us ("-1": none), period_text = cfs_period_us."""
    parts = text.split() if period_text is None else [text.strip(), period_text.strip()]
    if len(parts) != 2:
        raise ThreadsError(f"{path}: expected '<quota|max> <period>', got {text.strip()!r}")
    quota, period = parts
    if quota in ("max", "-1"):
        return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        raise ThreadsError(
            f"{path}: expected integers '<quota> <period>', got {quota!r} {period!r}"
        ) from None
    if q <= 0 or p <= 0:
        raise ThreadsError(f"{path}: quota and period must be > 0, got {q} {p}")
    return q / p


def _cgroup_dirs(proc_cgroup: Path, root: Path) -> list[tuple[str, Path]]:
    """(version, directory) of this process's CPU cgroup and each of its ancestors, innermost first."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        hid, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and controllers == "":
            version, base = "v2", root
        elif "cpu" in controllers.split(","):
            base = next(
                (root / n for n in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (root / n).is_dir()), None
            )
            if base is None:
                continue
            version = "v1"
        else:
            continue
        parts = [p for p in rel.strip().split("/") if p]
        found += [(version, base.joinpath(*parts[:i])) for i in range(len(parts), -1, -1)]
    if not found:  # no /proc/self/cgroup (or no cpu line): a cgroup namespace's own root
        found = [("v2", root), ("v1", root / "cpu,cpuacct"), ("v1", root / "cpu")]
    return found


def cgroup_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroups (v2 or v1), in CPUs; None: no quota."""
    limits = []
    for version, d in _cgroup_dirs(proc_cgroup, root):
        if version == "v2":
            f = d / "cpu.max"
            if f.is_file():
                limits.append(_quota_cpus(f, f.read_text()))
        else:
            f, fp = d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"
            if f.is_file() and fp.is_file():
                limits.append(_quota_cpus(f, f.read_text(), fp.read_text()))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may really use: min(affinity, ceil(cgroup quota)), at least 1."""
    quota = cgroup_cpus(root, proc_cgroup)
    n = affinity_cpus()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def threads_setting(raw: str | int | None, name: str) -> int | None:
    """An explicit thread count from setting `name` (e.g. LONGER_THREADS): None for unset, "",
    "auto" or 0; else a positive integer."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", AUTO)):
        return None
    try:
        n = int(raw)
    except (TypeError, ValueError):
        raise ThreadsError(f"{name}={raw!r}: expected a positive integer or 'auto'") from None
    if n < 0:
        raise ThreadsError(f"{name}={raw!r}: expected a positive integer or 'auto'")
    return n or None


def env_threads(name: str = "LONGER_THREADS") -> int | None:
    """The explicit thread count in environment variable `name` (None: unset or "auto")."""
    return threads_setting(os.environ.get(name), name)


def resolve_threads(n: int | None = None, source: str = "setting") -> tuple[int, str]:
    """(threads, why): `n` from `source` if given; else OMP_NUM_THREADS if set (torchrun sets it
    for its workers); else the CPU budget shared among this node's torchrun workers."""
    if n is not None:
        if n < 1:
            raise ThreadsError(f"{source}={n}: expected a positive integer")
        return n, source
    omp = threads_setting(os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS")
    if omp is not None:
        return omp, "OMP_NUM_THREADS"
    local = threads_setting(os.environ.get("LOCAL_WORLD_SIZE"), "LOCAL_WORLD_SIZE") or 1
    budget, quota = cpu_budget(), cgroup_cpus()
    why = f"auto: affinity {affinity_cpus()} CPUs, cgroup quota {'none' if quota is None else f'{quota:g}'}"
    return max(1, budget // local), why + (f", {local} processes on this node" if local > 1 else "")


def configure_threads(n: int | None = None, source: str = "setting", log: bool = True) -> int:
    """Set torch's intra-op (and, once, inter-op) threads as `resolve_threads` says; print the
    choice and its reason to stderr; return the number."""
    import torch

    n, why = resolve_threads(n, source)
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # inter-op threads can be set once, before they start
        torch.set_num_interop_threads(n)
    if log:
        wait = os.environ.get("OMP_WAIT_POLICY", "unset")
        print(f"torch threads: {n} ({why}; OMP_WAIT_POLICY {wait})", file=sys.stderr, flush=True)
    return n


def passive_wait_default() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless already set (call before torch is imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
