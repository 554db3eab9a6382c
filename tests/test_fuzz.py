"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, in-process over ASGI).

Every operation gets valid (positive) and invalid (negative) cases, from a fixed seed and a
bounded count; no case may get a 5xx, a status the schema does not document, a body that
does not match the documented schema, or an undocumented content type.
"""

import json
import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serving.app import create_app  # noqa: E402
from serving.settings import Settings  # noqa: E402
from tests.serving_utils import prefixed_store, shared_redis, tiny_bundle  # noqa: E402

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
EXAMPLES = int(os.environ.get("LONGER_FUZZ_EXAMPLES", "500"))  # per operation and mode (~2,000 cases, ~1 min)


def fuzz(op, mode, cases: dict, failures: list) -> None:
    """Run `EXAMPLES` cases of one operation in one generation mode, collecting failures."""
    label = f"{op.label} {mode.value}"

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=["explicit", "generate"],
    )
    @given(case=op.as_strategy(generation_mode=mode, headers={"Authorization": "Bearer tok"}))
    def run(case):
        cases[label] = cases.get(label, 0) + 1
        try:
            case.call_and_validate(checks=CHECKS)
        except (Exception, FailureGroup) as e:  # collect every failure, keep fuzzing
            kinds = (
                [type(f).__name__ for f in e.exceptions]
                if isinstance(e, FailureGroup)
                else [type(e).__name__]
            )
            failures.append((label, kinds, str(e)[:800]))

    try:
        run()
    except Unsatisfiable:  # negative mode of an operation with no input at all: nothing to break
        assert mode == schemathesis.GenerationMode.NEGATIVE and label not in cases, label


def test_no_server_error_and_every_answer_is_documented(tmp_path):
    bundle = tiny_bundle(tmp_path / "bundle")
    with prefixed_store(shared_redis(), max_len=64) as store:
        app = create_app(Settings(model=str(bundle), token="tok", max_candidates=64), store=store)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        cases, failures = {}, []
        for result in schema.get_all_operations():
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                fuzz(result.ok(), mode, cases, failures)
        kinds = Counter(k for _, ks, _ in failures for k in ks)
        report = {
            "cases": sum(cases.values()),
            "per_operation": cases,
            "failures": len(failures),
            "kinds": kinds,
        }
        print(json.dumps(report, indent=2))
        assert not failures, "\n".join(f"{label}: {text}" for label, _, text in failures[:10])
        assert all(
            op in " ".join(cases) for op in ("/v1/score", "/v1/events", "/v1/admin/reload", "/metrics")
        )
