"""Importing the shipped packages has no side effects on logging, and `longer` (the model)
imports nothing from the layers around it."""

import subprocess
import sys

from tests.conftest import REPO


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_importing_the_batch_and_model_code_leaves_torch_logging_alone():
    out = _run(
        "import logging, feature_store.batch, feature_store.loader, longer.recmodel, bench.batches\n"
        "print(logging.getLogger('torch.fx._symbolic_trace').level)"
    )
    assert out == str(0)  # NOTSET: nobody changed it


def test_the_model_package_imports_no_other_layer():
    out = _run(
        "import sys, longer.recmodel, longer.flops\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'feature_store', 'trainer', 'serving', 'bench', 'longer_cli'}))"
    )
    assert out == "[]"
