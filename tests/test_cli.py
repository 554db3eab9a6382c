import json
import re
import subprocess
import sys

from tests.conftest import REPO


def longer(*args, check=True):
    r = subprocess.run(
        [sys.executable, "-m", "longer_cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_synth_build_roundtrip(tmp_path):
    out = json.loads(
        longer(
            "synth",
            "--users",
            20,
            "--items",
            100,
            "--events-per-user",
            40,
            "--seed",
            1,
            "--out",
            tmp_path / "log",
            "--quiet",
        ).stdout
    )
    assert out["rows"] > 0
    meta = json.loads(
        longer(
            "build",
            "--log",
            tmp_path / "log",
            "--out",
            tmp_path / "data",
            "--max-len",
            32,
            "--test-days",
            3,
            "--quiet",
        ).stdout
    )
    assert meta["rows"]["events"] == out["rows"]
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta


def test_user_errors_exit_2_with_one_line(tmp_path):
    r = longer("build", "--log", tmp_path / "missing", "--out", tmp_path / "d", "--max-len", 5, check=False)
    assert r.returncode == 2 and "longer build: error:" in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    r = longer(
        "synth", "--users", 0, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "x", check=False
    )
    assert r.returncode == 2 and "--users must be >= 1" in r.stderr
    r = longer(
        "build",
        "--log",
        tmp_path,
        "--out",
        tmp_path / "d",
        "--max-len",
        5,
        "--test-days",
        1,
        "--split-ts",
        3,
        check=False,
    )
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = longer(
        "synth", "--users", 2, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "y", "--quiet"
    )
    r = longer(
        "synth", "--users", 2, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "y", check=False
    )
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_errors_name_the_command_once(tmp_path):
    cases = [
        (
            ["build", "--log", tmp_path, "--out", tmp_path / "d", "--max-len", 0],
            "longer build: error: --max-len",
        ),
        (
            ["synth", "--users", 0, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "s"],
            "longer synth: error: --users",
        ),
        (["store", "load", "--data", tmp_path / "nowhere"], "longer store load: error: "),
        (
            ["replay", "--log", tmp_path / "log", "--arm", "A=http://127.0.0.1:9", "--out", tmp_path],
            "longer replay: error: ",
        ),
    ]
    for args, start in cases:
        r = longer(*args, check=False)
        assert r.returncode == 2 and r.stderr.startswith(start), (args, r.stderr)
        assert not re.search(r"\b(\w+): (longer )?\1:", r.stderr), r.stderr  # e.g. "build: build:"


def test_error_text_drops_a_prefix_the_line_already_has():
    from longer_cli.main import error_text, parser

    args = parser().parse_args(["store", "load", "--data", "x"])
    assert error_text(ValueError("store load: x is bad"), args) == "x is bad"
    assert error_text(ValueError("longer store load: x is bad"), args) == "x is bad"
    assert error_text(ValueError("x: store is bad"), args) == "x: store is bad"


def test_replay_refuses_an_existing_report(tmp_path):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text("earlier")
    r = longer(
        "replay",
        "--log",
        tmp_path / "log",
        "--arm",
        "A=http://127.0.0.1:9",
        "--arm",
        "B=http://127.0.0.1:9",
        "--out",
        tmp_path / "rep",
        check=False,
    )
    assert (
        r.returncode == 2
        and "--overwrite" in r.stderr
        and (tmp_path / "rep" / "report.md").read_text() == "earlier"
    )


def test_only_user_errors_are_one_line_exit_2_a_bug_is_a_traceback_exit_1(tmp_path):
    """A LongerError is one line and exit 2; an internal ValueError or KeyError (a bug) keeps
    its traceback and exits 1, so it is not mistaken for bad input."""
    args = ["synth", "--users", 2, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "s", "--quiet"]
    for exc in ("ValueError('internal invariant broken')", "KeyError('missing_column')"):
        code = (
            "import sys, feature_store.synth as s\n"
            f"def boom(*a, **k): raise {exc}\n"
            "s.synthesize = boom\n"
            "from longer_cli.main import main\n"
            f"sys.exit(main({[str(a) for a in args]!r}))\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 1 and "Traceback" in r.stderr and exc.split("(")[0] in r.stderr, r.stderr
        assert "error:" not in r.stderr.splitlines()[0]
    r = longer(
        "synth", "--users", 0, "--items", 5, "--events-per-user", 3, "--out", tmp_path / "t", check=False
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_key_prefix_is_one_setting_and_prefix_a_deprecated_alias(monkeypatch, capsys):
    from longer_cli.main import key_prefix, parser

    monkeypatch.delenv("LONGER_KEY_PREFIX", raising=False)
    p = parser()
    assert key_prefix(p.parse_args(["store", "load", "--data", "d"])) == "lg"
    monkeypatch.setenv("LONGER_KEY_PREFIX", "env")
    assert key_prefix(p.parse_args(["store", "check"])) == "env"
    assert key_prefix(p.parse_args(["store", "load", "--data", "d", "--key-prefix", "kp"])) == "kp"
    assert capsys.readouterr().err == ""
    assert key_prefix(p.parse_args(["store", "check", "--prefix", "old"])) == "old"
    assert "--prefix is deprecated, use --key-prefix" in capsys.readouterr().err
    serve = p.parse_args(["serve", "--model", "b", "--key-prefix", "kp"])
    assert (serve.bundle, key_prefix(serve)) == ("b", "kp")
