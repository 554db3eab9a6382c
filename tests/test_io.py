"""All-or-nothing output directories, and the partial directories killed writers leave."""

import os
import subprocess
import sys
import time

import pytest

from feature_store.io import _host, atomic_dir, remove_stale_partials


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path, capsys):
    out = tmp_path / "data"
    host = _host()
    dead = tmp_path / f".data.partial-{dead_pid()}@{host}-0badc0de"
    live = tmp_path / f".data.partial-{os.getpid()}@{host}-1badc0de"  # this process: running
    foreign = tmp_path / ".data.partial-123@elsewhere-2badc0de"  # another host, recently written
    legacy_old = tmp_path / ".data.partial-3badc0de"  # a name from before owners were recorded, a day idle
    other_output = tmp_path / f".model.partial-{dead_pid()}@{host}-4badc0de"
    for d in (dead, live, foreign, legacy_old, other_output):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "part-0.parquet").write_bytes(b"x" * 100)
    day_ago = time.time() - 25 * 3600
    for p in (legacy_old / "sub" / "part-0.parquet", legacy_old / "sub", legacy_old):
        os.utime(p, (day_ago, day_ago))
    with atomic_dir(out) as tmp:
        (tmp / "meta.json").write_text("{}")
    err = capsys.readouterr().err
    assert not dead.exists() and not legacy_old.exists()
    assert live.exists() and foreign.exists() and other_output.exists()
    assert f"removed {dead} (a partial output left by pid" in err and "no longer running" in err
    assert f"removed {legacy_old} (a partial output left by an earlier run, unchanged for 25 h)" in err
    assert (out / "meta.json").is_file()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".data.partial"))
    assert left == sorted([live.name, foreign.name])


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "data") as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert remove_stale_partials(tmp_path / "data") == []


@pytest.mark.slow
def test_the_next_build_removes_what_a_killed_build_left(tmp_path):
    from feature_store.synth import SynthConfig, synthesize
    from tests.conftest import REPO

    synthesize(
        SynthConfig(users=400, items=2000, events_per_user=500, seed=1), tmp_path / "log", progress=False
    )
    cmd = [
        sys.executable,
        "-m",
        "longer_cli",
        "build",
        "--log",
        str(tmp_path / "log"),
        "--out",
        str(tmp_path / "data"),
        "--max-len",
        "64",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not list(tmp_path.glob(".data.partial-*")):
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    left = list(tmp_path.glob(".data.partial-*"))
    if not left:
        pytest.skip("the build finished before it could be killed")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (
        f"removed {left[0]} (a partial output left by pid {proc.pid}, which is no longer running)" in r.stderr
    )
    assert not list(tmp_path.glob(".data.partial-*")) and (tmp_path / "data" / "meta.json").is_file()
