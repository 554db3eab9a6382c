"""`longer bench serve --quick`: the JSON has every figure the issue asks for, with values that
can be true (no timing is asserted: the machine's load decides those), the profiles lie beside
it, and the bench leaves no key and no process behind."""

import json

import pytest

from bench.hit_profile import STAGES, InlineExecutor, breakdown
from bench.http_load import request_bytes
from bench.serve import CLIENTS, main
from tests.conftest import SHARED_REDIS_URL, fresh_prefix
from tests.serving_utils import shared_redis


def _sane_latency(p: dict) -> None:
    assert 0 < p["p50_ms"] <= p["p99_ms"] and p["n"] > 0 and p["requests_per_s"] > 0


@pytest.mark.slow
def test_quick_bench_reports_every_figure(tmp_path, monkeypatch):
    client = shared_redis()
    monkeypatch.setenv("REDIS_URL", SHARED_REDIS_URL)
    prefix = fresh_prefix()
    out = tmp_path / "serve.json"
    result = main(quick=True, out=str(out), prefix=prefix)
    assert json.loads(out.read_text()) == result
    assert result["results"], "no cell was measured"
    for row in result["results"]:
        for path in ("hit", "hit_columnar", "full", "in_process_score", "naive_unsplit_forward"):
            _sane_latency(row[path])
        _sane_latency(row["in_process_asgi"]["pool"])
        _sane_latency(row["in_process_asgi"]["inline"])
        for form in ("", "_columnar"):
            assert row[f"hit_overhead_x{form}"] == pytest.approx(
                row[f"hit{form}"]["p50_ms"] / row["in_process_score"]["p50_ms"], abs=0.01
            )
        stages = row["breakdown"]["ms_per_hit"]
        assert set(stages) == set(STAGES) and min(stages.values()) >= 0
        assert stages["compute"] > 0  # the others may fall between samples on a quiet machine
        for name in row["breakdown"]["files"]:
            assert (tmp_path / name).stat().st_size > 0, name
        assert [t["clients"] for t in row["throughput"]] == list(CLIENTS)
        for t in row["throughput"]:
            assert t["requests"] > 0 and t["requests_per_s"] > 0 and 0 < t["p50_ms"] <= t["p99_ms"]
            assert t["server_cpu_ms_per_request"] > 0
    update = result["results"][0]["update"]  # an append-stable bundle's incremental requests
    for path in ("hit", "full", "update_1", "update_10"):
        _sane_latency(update[path])
    assert update["update_1_over_full"] == pytest.approx(
        update["update_1"]["p50_ms"] / update["full"]["p50_ms"], abs=0.001
    )
    assert not list(client.scan_iter(match=f"{prefix}:*")), "the bench left keys behind"


def test_inline_executor_runs_in_the_callers_thread_and_keeps_errors():
    import threading

    ex = InlineExecutor()
    assert ex.submit(threading.get_ident).result() == threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        ex.submit(lambda: 1 / 0).result()


def test_breakdown_gives_each_sample_to_its_innermost_stage():
    class F:
        def __init__(self, function, file_path, self_time, children=()):
            self.function, self.file_path = function, file_path
            self.total_self_time, self.children = self_time, list(children)

    root = F(
        "run",
        "asyncio/runners.py",
        0.001,
        [
            F(
                "score",
                "/x/serving/routes.py",
                0.002,
                [
                    F(
                        "serialize_response",
                        "/s/fastapi/routing.py",
                        0.003,
                        [F("score", "/x/serving/runtime.py", 0.010)],
                    )
                ],
            ),
            F("solve_dependencies", "/s/fastapi/dependencies/utils.py", 0.004),
        ],
    )
    ms = breakdown(root, hits=2)
    assert ms == {
        "parse_validate": 2.0,
        "redis_read": 0.0,
        "decode": 0.0,
        "compute": 5.0,
        "serialise": 1.5,
        "handler": 1.0,
        "framework": 0.5,
    }


def test_request_bytes_is_one_well_formed_http_request():
    raw = request_bytes("/v1/score", b'{"a":1}')
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/score HTTP/1.1\r\n") and b"content-length: 7" in head
    assert body == b'{"a":1}'
