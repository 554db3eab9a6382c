"""trainer/threads.py: the CPU budget from fake cgroup trees and a patched affinity, the
explicit settings that override it, and the passive-wait default of every entry point."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from trainer import threads as th
from trainer.threads import ThreadsError, cgroup_cpus, cpu_budget, resolve_threads, threads_setting


@pytest.fixture
def cpus(monkeypatch):
    """Set the affinity this process appears to have: cpus(8) → 8 CPUs."""

    def set_(n):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)

    set_(8)
    return set_


def tree(tmp, proc_line: str, files: dict[str, str]):
    """A fake /sys/fs/cgroup under tmp/cg and /proc/self/cgroup with `proc_line`."""
    root = tmp / "cg"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp / "proc-cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


@pytest.mark.parametrize(
    "cpu_max,want", [("max 100000\n", 8), ("150000 100000\n", 2), ("200000 100000\n", 2), ("1000 100000", 1)]
)
def test_v2_quota_rounds_up_and_caps_the_affinity(tmp_path, cpus, cpu_max, want):
    root, proc = tree(tmp_path, "0::/", {"cpu.max": cpu_max})
    assert cpu_budget(root, proc) == want


def test_v2_tightest_quota_of_the_cgroup_and_its_ancestors(tmp_path, cpus):
    root, proc = tree(
        tmp_path,
        "0::/kubepods/pod1/ctr",
        {
            "cpu.max": "max 100000",
            "kubepods/pod1/cpu.max": "300000 100000",  # the pod's limit: 3 CPUs
            "kubepods/pod1/ctr/cpu.max": "max 100000",
        },
    )
    assert cgroup_cpus(root, proc) == 3.0 and cpu_budget(root, proc) == 3


def test_affinity_below_the_quota_wins(tmp_path, cpus):
    cpus(1)
    root, proc = tree(tmp_path, "0::/", {"cpu.max": "400000 100000"})
    assert cpu_budget(root, proc) == 1


def test_no_cgroup_files_means_the_affinity(tmp_path, cpus):
    cpus(5)
    root, proc = tree(tmp_path, "0::/user.slice", {})
    assert cgroup_cpus(root, proc) is None and cpu_budget(root, proc) == 5
    assert cpu_budget(tmp_path / "absent", tmp_path / "absent-proc") == 5


@pytest.mark.parametrize("quota,want", [("50000", 1), ("250000", 3), ("-1", 8)])
def test_v1_cfs_quota(tmp_path, cpus, quota, want):
    root, proc = tree(
        tmp_path,
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": quota,
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        },
    )
    assert cpu_budget(root, proc) == want


@pytest.mark.parametrize(
    "cpu_max,msg",
    [
        ("lots 100000", "expected integers"),
        ("0 100000", "must be > 0"),
        ("100000", "expected '<quota|max> <period>'"),
        ("100000 -5", "must be > 0"),
    ],
)
def test_bad_quota_file_is_named(tmp_path, cpus, cpu_max, msg):
    root, proc = tree(tmp_path, "0::/", {"cpu.max": cpu_max})
    with pytest.raises(ThreadsError, match=msg) as e:
        cpu_budget(root, proc)
    assert str(root / "cpu.max") in str(e.value)


def test_bad_v1_period_is_named(tmp_path, cpus):
    root, proc = tree(
        tmp_path,
        "4:cpu,cpuacct:/",
        {"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "often"},
    )
    with pytest.raises(ThreadsError, match="cpu.cfs_quota_us: expected integers"):
        cpu_budget(root, proc)


def test_settings_parse_auto_and_refuse_garbage():
    assert [threads_setting(v, "LONGER_THREADS") for v in (None, "", "auto", " AUTO ", 0, "0")] == [None] * 6
    assert threads_setting("3", "LONGER_THREADS") == 3 and threads_setting(4, "train.threads") == 4
    for bad in ("abc", "-1", "2.5"):
        with pytest.raises(
            ThreadsError, match=f"LONGER_THREADS='{bad}': expected a positive integer or 'auto'"
        ):
            threads_setting(bad, "LONGER_THREADS")


def test_resolve_order_setting_then_omp_then_budget(monkeypatch):
    monkeypatch.setattr(th, "cpu_budget", lambda *a: 6)
    monkeypatch.setattr(th, "cgroup_cpus", lambda *a: 5.5)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    n, why = resolve_threads(None)
    assert n == 6 and "auto" in why and "cgroup quota 5.5" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 workers share the node's budget
    assert resolve_threads(None)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == (3, "OMP_NUM_THREADS")
    assert resolve_threads(2, "train.threads") == (2, "train.threads")
    with pytest.raises(ThreadsError, match="train.threads=-2"):
        resolve_threads(-2, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ThreadsError, match="OMP_NUM_THREADS='many'"):
        resolve_threads(None)


def test_configure_sets_torch_and_says_why(capsys):
    before = torch.get_num_threads()
    try:
        assert th.configure_threads(1, "LONGER_THREADS") == 1
        assert torch.get_num_threads() == 1
        assert "torch threads: 1 (LONGER_THREADS" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("entry", [["-m", "longer_cli"], ["-m", "trainer"]])
def test_entry_points_default_to_passive_waiting_before_torch_loads(entry):
    """`longer …`, `python -m trainer` (hence torchrun workers): OMP_WAIT_POLICY=PASSIVE is in the
    environment when torch is imported, unless the user set a policy."""
    probe = (
        "import os, runpy, sys\n"
        "import builtins\n"
        "seen = {}\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name == 'torch' and 'torch' not in sys.modules:\n"
        "        seen['policy'] = os.environ.get('OMP_WAIT_POLICY')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        f"sys.argv = ['x', *{['bench', 'nope'] if entry[1] == 'longer_cli' else ['--config', 'nope.toml']}]\n"
        "try:\n"
        f"    runpy.run_module({entry[1]!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import torch\n"
        "print(seen.get('policy'), os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.stdout.split() == ["PASSIVE", "PASSIVE"], out.stderr[-2000:]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.stdout.split() == ["ACTIVE", "ACTIVE"], out.stderr[-2000:]


def test_serving_setting_is_auto_unless_given(monkeypatch):
    from serving.settings import Settings

    monkeypatch.delenv("LONGER_THREADS", raising=False)
    assert Settings.from_env().threads == 0  # ModelRuntime: 0 → the CPU budget
    for raw, want in (("auto", 0), ("3", 3)):
        monkeypatch.setenv("LONGER_THREADS", raw)
        assert Settings.from_env().threads == want
    assert Settings.from_env(threads=1).threads == 1  # `longer serve --threads 1`
    monkeypatch.setenv("LONGER_THREADS", "two")
    with pytest.raises(ValueError, match="LONGER_THREADS='two'"):
        Settings.from_env()
