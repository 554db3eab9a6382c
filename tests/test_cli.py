import json
import subprocess
import sys

from tests.conftest import REPO


def longer(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "longer_cli", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_synth_build_roundtrip(tmp_path):
    out = json.loads(longer("synth", "--users", 20, "--items", 100, "--events-per-user", 40, "--seed", 1,
                            "--out", tmp_path / "log", "--quiet").stdout)
    assert out["rows"] > 0
    meta = json.loads(longer("build", "--log", tmp_path / "log", "--out", tmp_path / "data", "--max-len", 32,
                             "--test-days", 3, "--quiet").stdout)
    assert meta["rows"]["events"] == out["rows"]
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta


def test_user_errors_exit_2_with_one_line(tmp_path):
    r = longer("build", "--log", tmp_path / "missing", "--out", tmp_path / "d", "--max-len", 5, check=False)
    assert r.returncode == 2 and "longer build: error:" in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    r = longer("synth", "--users", 0, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "x", check=False)
    assert r.returncode == 2 and "--users must be >= 1" in r.stderr
    r = longer("build", "--log", tmp_path, "--out", tmp_path / "d", "--max-len", 5, "--test-days", 1,
               "--split-ts", 3, check=False)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = longer("synth", "--users", 2, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "y", "--quiet")
    r = longer("synth", "--users", 2, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "y", check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
