"""The scoring service against a real Redis (127.0.0.1:6379 in CI) and a trained bundle."""

import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from feature_store.online import OnlineStore, connect
from serving.app import create_app
from serving.runtime import ModelRuntime
from serving.settings import Settings
from serving.state_cache import state_tag
from tests.conftest import REPO
from tests.serving_utils import prefixed_store, served_bundle, shared_redis
from tests.test_trainer import run, small, train  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("serve") / "run"
    train(small, out, "train.steps=8", "train.eval_every=0")
    preds = out / "preds.parquet"
    run(["eval", "--model", out / "export", "--data", small / "data", "--quiet", "--predictions", preds])
    return out / "export", small / "data", preds


@pytest.fixture
def app_and_store(trained):
    bundle, data, _ = trained
    with served_bundle(bundle, data) as app_store:  # its keys are deleted when the test ends
        yield app_store


def test_online_scores_equal_offline_predictions(trained, app_and_store):
    _, data, preds = trained
    app, _ = app_and_store
    ev = pq.read_table(data / "eval").to_pydict()
    pred = pq.read_table(preds).to_pydict()
    rows = np.random.default_rng(0).choice(len(ev["user_id"]), 40, replace=False)
    with TestClient(app) as client:
        for i in rows:
            r = client.post(
                "/v1/score",
                json={
                    "user_id": ev["user_id"][i],
                    "ts": ev["ts"][i],
                    "candidates": [{"item_id": ev["item_id"][i], "category_id": ev["category_id"][i]}],
                },
            )
            assert r.status_code == 200, r.text
            assert pred["row_id"][i] == i
            assert abs(r.json()["scores"][0] - pred["prediction"][i]) < 1e-5


def test_hit_after_full_and_an_event_invalidates(app_and_store):
    app, store = app_and_store
    user = int(store.r.keys(f"{store.prefix}:*:seq")[0].decode().split("{u")[1].split("}")[0])
    body = {
        "user_id": user,
        "candidates": [{"item_id": 3, "category_id": 1}, {"item_id": 9, "category_id": 2}],
    }
    with TestClient(app) as client:
        first = client.post("/v1/score", json=body).json()
        second = client.post("/v1/score", json=body).json()
        assert (first["user_state"], second["user_state"]) == ("full", "hit")
        assert np.allclose(first["scores"], second["scores"], atol=1e-6)
        now = int(time.time())
        r = client.post(
            "/v1/events",
            headers={"Authorization": "Bearer s3cret"},
            json={
                "events": [
                    {
                        "user_id": user,
                        "item_id": 3,
                        "category_id": 1,
                        "action": 3,
                        "label": 1,
                        "ts": now - 5,
                        "event_id": "e1",
                    }
                ]
            },
        )
        assert r.status_code == 200 and r.json()["appended"] == 1
        third = client.post("/v1/score", json={**body, "ts": now}).json()
        assert third["user_state"] == "full" and third["scores"] != second["scores"]
        assert client.post("/v1/score", json={**body, "ts": now}).json()["user_state"] == "hit"


def flipped_last_byte(blob: bytes) -> bytes:
    """`blob` with its last byte changed (setting it to a constant left it as it was 1 time in 256)."""
    return blob[:-1] + bytes([blob[-1] ^ 0xFF])


def test_stale_or_corrupt_states_are_never_used(app_and_store, caplog):
    app, store = app_and_store
    user = int(store.r.keys(f"{store.prefix}:*:seq")[0].decode().split("{u")[1].split("}")[0])
    body = {"user_id": user, "candidates": [{"item_id": 4}]}
    rt, cache = app.state.service.runtime, app.state.service.cache
    with TestClient(app) as client:
        good = client.post("/v1/score", json=body).json()
        key = store._key(user, f"st:{rt.model_version}")
        for bad, reason in (
            (b"garbage", "value too short"),
            (flipped_last_byte(store.r.get(key)), "checksum"),
        ):
            store.r.set(key, bad)
            with caplog.at_level("WARNING", logger="longer.serving.state"):
                again = client.post("/v1/score", json=body).json()
            assert again["user_state"] == "full" and np.allclose(again["scores"], good["scores"], atol=1e-6)
            logged = [r.getMessage() for r in caplog.records if r.name == "longer.serving.state"]
            assert any(f"user {user}" in m and reason in m for m in logged), logged
            caplog.clear()
        held, seq_version, blob, total = store.read_head(user, rt.model_version)
        state = cache.loads(rt, blob, state_tag(user, seq_version, held, total))
        assert state is not None  # rewritten after the full encode
        stale = cache.dumps(rt, state, state_tag(user, seq_version - 1, held, total))
        store.r.set(key, stale)
        assert client.post("/v1/score", json=body).json()["user_state"] == "full"


def a_user(store) -> int:
    return int(store.r.keys(f"{store.prefix}:*:seq")[0].decode().split("{u")[1].split("}")[0])


def test_columnar_candidates_score_as_the_object_list_and_are_as_strict(app_and_store):
    app, store = app_and_store
    user = a_user(store)
    items, cats = [3, 9, 4, 3], [1, 2, 0, 7]
    objects = {"user_id": user, "candidates": [{"item_id": i, "category_id": c} for i, c in zip(items, cats)]}
    with TestClient(app) as client:
        by_objects = client.post("/v1/score", json=objects).json()["scores"]
        columns = {"user_id": user, "item_ids": items, "category_ids": cats}
        by_columns = client.post("/v1/score", json=columns).json()
        assert by_columns["user_state"] == "hit" and by_columns["scores"] == by_objects
        no_cats = client.post("/v1/score", json={"user_id": user, "item_ids": items}).json()["scores"]
        zero_cats = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
        assert no_cats == client.post("/v1/score", json=zero_cats).json()["scores"]
        cases = [
            ({**columns, "candidates": objects["candidates"]}, "exactly one"),
            ({"user_id": user, "candidates": objects["candidates"], "category_ids": cats}, "category_ids"),
            ({"user_id": user, "item_ids": items, "category_ids": cats[:3]}, "3 entries"),
            ({"user_id": user, "item_ids": []}, "item_ids"),
            ({"user_id": user, "item_ids": [1, "2"]}, "item_ids"),
            ({"user_id": user, "item_ids": [1, 2.0]}, "item_ids"),
            ({"user_id": user, "item_ids": [-1]}, "item_ids"),
            ({"user_id": user, "item_ids": [1], "category_ids": [2**63]}, "category_ids"),
            ({"user_id": user, "item_ids": None}, "exactly one"),
        ]
        for body, named in cases:
            r = client.post("/v1/score", json=body)
            assert r.status_code == 422 and named in r.text, (body, r.text)
        r = client.post("/v1/score", json={"user_id": user, "item_ids": list(range(51))})
        assert r.status_code == 422 and "at most 50 item_ids" in r.text
        schema = client.get("/openapi.json").json()["components"]["schemas"]["ScoreRequest"]
        assert {"candidates", "item_ids", "category_ids"} <= set(schema["properties"])


def test_a_hit_reads_no_events_and_earlier_requests_stay_point_in_time(app_and_store, monkeypatch):
    app, store = app_and_store
    user = a_user(store)
    latest = int(store.read(user)[0]["ts"].max())
    body = {"user_id": user, "item_ids": [3, 9], "ts": latest + 60}
    reads = []
    read = store.read_since
    monkeypatch.setattr(store, "read_since", lambda *a: reads.append(a) or read(*a))
    with TestClient(app) as client:
        assert client.post("/v1/score", json=body).json()["user_state"] == "full"
        reads.clear()
        hit = client.post("/v1/score", json=body).json()
        assert hit["user_state"] == "hit" and reads == []  # the head only: no LRANGE of the events
        # at the latest event's own time that event is not history yet: a prefix, computed
        earlier = client.post("/v1/score", json={**body, "ts": latest}).json()
        assert earlier["user_state"] == "full" and earlier["scores"] != hit["scores"]
        assert client.post("/v1/score", json=body).json() == hit  # the full state is still cached
        # an unreadable item in the list: the head's count is off, the full read still finds the hit
        store.r.rpush(store._key(user, "seq"), b"short")
        reads.clear()
        again = client.post("/v1/score", json=body).json()
        assert again == hit and len(reads) == 1


def test_client_mistakes_are_4xx_naming_the_problem(app_and_store):
    app, _ = app_and_store
    with TestClient(app) as client:
        cases = [
            ({"user_id": 1}, "candidates"),
            ({"user_id": -1, "candidates": [{"item_id": 1}]}, "user_id"),
            ({"user_id": 1, "candidates": [{"item_id": "x"}]}, "item_id"),
            ({"user_id": 1, "candidates": [{"item_id": 1}], "colour": "red"}, "colour"),
            ({"user_id": 1, "candidates": []}, "candidates"),
        ]
        for body, field in cases:
            r = client.post("/v1/score", json=body)
            assert r.status_code == 422 and field in r.text, (body, r.text)
        r = client.post("/v1/score", json={"user_id": 1, "candidates": [{"item_id": i} for i in range(51)]})
        assert r.status_code == 422 and "at most 50" in r.text
        r = client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        ev = {"events": [{"user_id": 1, "item_id": 2, "ts": 5}]}
        assert client.post("/v1/events", json=ev).status_code == 401
        assert client.post("/v1/events", json=ev, headers={"Authorization": "Bearer nope"}).status_code == 401
        r = client.post("/v1/score", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.get("/openapi.json").json()["paths"]["/v1/score"]["post"]["summary"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_down_means_bypass_then_hits_resume(trained, tmp_path):
    bundle, data, _ = trained
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server binary not installed")
    port = free_port()

    def start():
        p = subprocess.Popen(
            [server, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                connect(f"redis://127.0.0.1:{port}/0").ping()
                return p
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    proc = start()
    try:
        client_r = connect(f"redis://127.0.0.1:{port}/0")
        store = OnlineStore(client_r, max_len=1000)
        store.load_sequences(data, progress=False)
        app = create_app(Settings(model=str(bundle)), runtime=ModelRuntime(str(bundle)), store=store)
        seq = pq.read_table(data / "sequences").to_pydict()
        user, hist = (
            seq["user_id"][0],
            [
                {"item_id": i, "ts": t, "category_id": c, "action": a, "label": lab}
                for i, t, c, a, lab in zip(
                    *(seq[k][0] for k in ("item_id", "ts", "category_id", "action", "label"))
                )
            ],
        )
        body = {"user_id": user, "candidates": [{"item_id": 5, "category_id": 2}], "history": hist}
        with TestClient(app) as client:
            assert client.post("/v1/score", json=body).json()["user_state"] == "full"
            online = client.post("/v1/score", json=body).json()
            assert online["user_state"] == "hit"
            proc.terminate()
            proc.wait(10)
            r = client.post("/v1/score", json=body)
            assert r.status_code == 200 and r.json()["user_state"] == "bypass"
            assert np.allclose(r.json()["scores"], online["scores"], atol=1e-5)  # same history, same score
            assert client.get("/readyz").status_code == 503
            assert (
                client.post(
                    "/v1/events", json={"events": [{"user_id": 1, "item_id": 2, "ts": 5}]}
                ).status_code
                == 503
            )
            proc = start()
            store.load_sequences(data, progress=False)  # a restarted Redis comes back empty here
            assert client.get("/readyz").status_code == 200
            states = [client.post("/v1/score", json=body).json()["user_state"] for _ in range(2)]
            assert states == ["full", "hit"]
            assert "longer_user_state_total" in client.get("/metrics").text
    finally:
        proc.terminate()
        proc.wait(10)


def perturbed_bundle(src, dst, delta=0.05):
    from trainer.export import load_bundle, write_bundle

    b = load_bundle(src)
    tensors = {k: v + delta if k.endswith("head.mlp.2.bias") else v for k, v in b.model.state_dict().items()}
    return write_bundle(dst, tensors, b.config, {})


def test_reload_and_watch_swap_the_model(trained, tmp_path, caplog):
    bundle, data, _ = trained
    live = tmp_path / "live"
    shutil.copytree(bundle, live)
    old_version = json.loads((live / "config.json").read_text())["model_version"]
    with prefixed_store(shared_redis()) as store, caplog.at_level("INFO", logger="longer.serving.reload"):
        store.load_sequences(data, progress=False)
        new_version = reload_and_watch(bundle, live, data, store)
    reloads = [r.getMessage() for r in caplog.records if r.name == "longer.serving.reload"]
    assert any(f"{old_version} → {new_version}" in m for m in reloads), reloads


def reload_and_watch(bundle, live, data, store):
    app = create_app(Settings(model=str(live), token="t", watch_s=0.2), store=store)
    user = pq.read_table(data / "sequences", columns=["user_id"]).column("user_id")[0].as_py()
    body = {"user_id": user, "candidates": [{"item_id": 1}]}
    with TestClient(app) as client:
        before = client.post("/v1/score", json=body).json()
        assert client.post("/v1/admin/reload").status_code == 401
        assert (
            client.post("/v1/admin/reload", headers={"Authorization": "Bearer t"}).json()["reloaded"] is False
        )
        new_version = perturbed_bundle(bundle, live)  # atomic directory swap, as the trainer's export does
        for _ in range(100):  # the watcher picks it up
            if client.get("/v1/model").json()["model_version"] == new_version:
                break
            time.sleep(0.05)
        after = client.post("/v1/score", json=body).json()
        assert after["model_version"] == new_version != before["model_version"]
        assert after["user_state"] == "full"  # states are cached per model version
        assert after["scores"] != before["scores"]
        assert f'model_version="{new_version}"' in client.get("/metrics").text
    return new_version


def test_concurrent_full_encodes_for_one_user_run_once(app_and_store):
    import asyncio

    import httpx

    app, store = app_and_store
    svc = app.state.service
    calls = []
    encode = svc.runtime.encode

    def counting(*a):
        calls.append(1)
        time.sleep(0.2)  # hold the first computation so the others arrive while it runs
        return encode(*a)

    svc.runtime.encode = counting
    user = int(store.r.keys(f"{store.prefix}:*:seq")[0].decode().split("{u")[1].split("}")[0])

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(
                *[
                    c.post("/v1/score", json={"user_id": user, "candidates": [{"item_id": i}]})
                    for i in range(8)
                ]
            )
        return [r.json() for r in rs]

    out = asyncio.run(burst())
    assert all(r["user_state"] == "full" for r in out) and len(calls) == 1


def test_users_without_history_are_scored(app_and_store):
    app, _ = app_and_store
    with TestClient(app) as client:
        for user in (10**12, 0):
            r = client.post("/v1/score", json={"user_id": user, "candidates": [{"item_id": 1}], "ts": 5})
            assert r.status_code == 200 and r.json()["user_state"] in ("full", "hit"), r.text
        r = client.post(
            "/v1/score",
            json={
                "user_id": 7,
                "candidates": [{"item_id": 1}],
                "ts": 1_700_000_000,
                "history": [{"item_id": 3, "ts": 1_600_000_000}],
            },
        )
        assert r.status_code == 200


def start_serve(bundle, redis_dir, *extra, timeout_s=120):
    """`longer serve --port 0` in a subprocess with its own embedded store; returns the process
    and its first stdout line (the listening line), or '' if it exited first."""
    env = {**os.environ, "LONGER_REDIS_DIR": str(redis_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "longer_cli", "serve", "--model", str(bundle), "--port", "0", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            p.kill()
            p.wait()
            raise AssertionError("longer serve printed nothing")
    return p, p.stdout.readline()


def embedded_servers(redis_dir) -> list[psutil.Process]:
    out = []
    for q in psutil.process_iter(["name"]):
        try:
            if (
                "redis-server" in (q.info["name"] or "")
                and q.cwd() == str(redis_dir)
                and q.status() != psutil.STATUS_ZOMBIE
            ):
                out.append(q)
        except psutil.Error:
            continue
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_says_where_it_listens_and_a_stop_signal_stops_its_redis(trained, tmp_path, sig):
    bundle = trained[0]
    version = json.loads((bundle / "config.json").read_text())["model_version"]
    redis_dir = tmp_path / "redis"
    p, line = start_serve(bundle, redis_dir)
    try:
        m = re.fullmatch(
            r"longer serve: listening on http://127\.0\.0\.1:(\d+) \(model (\w+), scoring traced, redis embedded, "
            r"data in (.+)\)\n",
            line,
        )
        assert m, (line, p.stderr.read() if p.poll() is not None else "")
        assert m.group(2) == version and m.group(3) == str(redis_dir / "store.rdb")
        assert httpx.get(f"http://127.0.0.1:{m.group(1)}/readyz", timeout=10).json()["status"] == "ready"
        servers = embedded_servers(redis_dir)
        assert len(servers) == 1
    finally:
        p.send_signal(sig)
        rc = p.wait(60)
    assert rc == 0, p.stderr.read()
    assert not embedded_servers(redis_dir)  # the embedded Redis stopped with it
    assert (redis_dir / "store.rdb").is_file()  # ... after saving its data


def test_serve_on_a_taken_port_is_a_one_line_error(trained, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**os.environ, "LONGER_REDIS_DIR": str(tmp_path / "redis")}
        r = subprocess.run(
            [sys.executable, "-m", "longer_cli", "serve", "--model", str(trained[0]), "--port", str(port)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2 and r.stderr.strip() == (
        f"longer serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ), r.stderr
    assert not (tmp_path / "redis").exists()  # refused before the store or the model was touched


def test_docs_are_served_without_a_network(app_and_store):
    app, _ = app_and_store
    with TestClient(app) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", page.text)
        assets += re.findall(
            r"""url:\s*['"]([^'"]+)['"]""", page.text
        )  # the OpenAPI URL in the page's script
        assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
        for a in assets:
            assert client.get(a).status_code == 200, a
        assert (
            "cdn" not in page.text.lower() and '"validatorUrl": null' in page.text
        )  # no online validator badge
        assert client.get("/redoc").status_code == 200
