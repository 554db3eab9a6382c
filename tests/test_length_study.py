"""scripts/length_study.sh end to end at toy size (issue 19): the long-range log, the scaling
table (LONGER without merge and DIN, power-law fits) and the extrapolation rows — the command a
GPU user runs at the paper's scale (`SCALE=gpu`) is the same script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_length_study_runs_end_to_end_at_toy_size(tmp_path):
    if not (ROOT / ".venv/bin/longer").exists():
        pytest.skip("the script runs .venv/bin/longer (make setup)")
    env = dict(os.environ, USERS="20", EVENTS="300", LENGTHS="16,32,64", STEPS="10", SEEDS="1")
    env.update(
        ARCHS="longer,din", EXTRAPOLATE_FROM="32", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    out = tmp_path / "study"
    r = subprocess.run(
        ["bash", str(ROOT / "scripts/length_study.sh"), str(out), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "scaling/results.json").read_text())
    rows = [x for x in results["rows"] if x["table"] == "scaling"]
    assert {(x["arch"], x["max_len"]) for x in rows} == {
        (a, n) for a in ("longer", "din") for n in (16, 32, 64)
    }
    assert all(0 < x["auc"] < 1 for x in rows)
    assert "merge_k=1" in (out / "scaling/results.md").read_text()  # LONGER without merge (the script's why)
    assert "Power-law fit of longer against max_len" in (out / "scaling/results.md").read_text()
    extra = [json.loads(line) for line in (out / "extrapolation.jsonl").read_text().splitlines()]
    assert [(x["trained_at"], x["max_len"]) for x in extra] == [(32, 32), (32, 64)]
    assert all(0 < x["auc"] < 1 for x in extra)
