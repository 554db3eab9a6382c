"""The service under hostile input, in-process: strict and bounded fields, answers that do not
mislead, states bound to their user, bad keys named, reloads that never give 500."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.routes import bearer_matches
from serving.settings import Settings
from tests.serving_utils import prefixed_store, shared_redis, tiny_bundle

AUTH = {"Authorization": "Bearer tok"}
TS = 1_700_000_000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("hardening") / "bundle")


@pytest.fixture
def client(bundle):
    with prefixed_store(shared_redis(), max_len=64) as store:
        # refresh off: what an event does to the next request is deterministic (tests/test_refresh.py)
        settings = Settings(model=str(bundle), token="tok", max_candidates=50, refresh=False)
        app = create_app(settings, store=store)
        with TestClient(app) as c:
            c.store = store
            yield c


def post_raw(client, path, text: str, headers=None):
    return client.post(
        path,
        content=text.encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json", **(headers or {})},
    )


SCORE = '{"user_id": 1, "candidates": [{"item_id": 2, "category_id": 3}], "ts": 1700000000%s}'
EVENT = '{"events": [{"user_id": 1, "item_id": 2, "ts": 1700000000, "label": 1%s}]}'


@pytest.mark.parametrize(
    "path,template,extra,field",
    [
        ("/v1/score", SCORE, ', "user_id": "5"', "user_id"),  # lax coercion refused
        ("/v1/score", SCORE.replace('"item_id": 2', '"item_id": true'), "", "item_id"),
        ("/v1/score", SCORE.replace('"item_id": 2', '"item_id": 2.0'), "", "item_id"),
        (
            "/v1/score",
            SCORE.replace('"item_id": 2', '"item_id": 9223372036854775808'),
            "",
            "item_id",
        ),  # int64 + 1
        ("/v1/score", SCORE.replace("1700000000", "1790000000000"), "", "ts"),  # milliseconds
        ("/v1/score", SCORE, ', "history": [{"item_id": 1, "ts": 1790000000000}]', "ts"),
        (
            "/v1/score",
            SCORE,
            ', "history": [{"item_id": 1, "ts": 5, "action": 99999999999999999999}]',
            "action",
        ),
        ("/v1/score", SCORE.replace("1700000000", "NaN"), "", "ts"),
        ("/v1/score", SCORE.replace("1700000000", "-Infinity"), "", "ts"),
        ("/v1/score", SCORE.replace("1700000000", '"\\ud800"'), "", "ts"),  # a lone surrogate
        ("/v1/events", EVENT, ', "label": false', "label"),
        ("/v1/events", EVENT, ', "category_id": 1e400', "category_id"),
        ("/v1/events", EVENT.replace("1700000000", "1790000000000"), "", "ts"),
        ("/v1/events", EVENT, ', "event_id": "\\udfff"', "event_id"),
        ("/v1/events", EVENT, ', "event_id": 7', "event_id"),
    ],
)
def test_bad_fields_get_422_naming_them(client, path, template, extra, field):
    r = post_raw(client, path, template % extra, AUTH)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(field in e["loc"] for e in errors), errors


def test_limits_are_422_in_the_validation_shape(client):
    r = client.post("/v1/score", json={"user_id": 1, "candidates": [{"item_id": i} for i in range(51)]})
    assert r.status_code == 422
    assert (
        r.json()["detail"][0]["loc"] == ["body", "candidates"]
        and "at most 50" in r.json()["detail"][0]["msg"]
    )


def test_appended_counts_only_new_events(client):
    ev = {
        "events": [
            {"user_id": 11, "item_id": 2, "ts": TS, "event_id": "e1"},
            {"user_id": 11, "item_id": 3, "ts": TS, "event_id": "e2"},
        ]
    }
    first = client.post("/v1/events", json=ev, headers=AUTH).json()
    again = client.post("/v1/events", json=ev, headers=AUTH).json()
    assert (first["appended"], again["appended"]) == (2, 0)
    assert first["versions"] == again["versions"] == {"11": 1}
    one_new = {"events": ev["events"] + [{"user_id": 11, "item_id": 4, "ts": TS, "event_id": "e3"}]}
    assert client.post("/v1/events", json=one_new, headers=AUTH).json() == {
        "appended": 1,
        "versions": {"11": 2},
    }
    metrics = client.get("/metrics").text
    assert "longer_events_appended_total 3.0" in metrics


def test_bearer_scheme_is_case_insensitive_and_the_token_exact(client):
    ev = {"events": [{"user_id": 12, "item_id": 2, "ts": TS}]}
    for header in ("Bearer tok", "bearer tok", "BEARER  tok"):
        assert client.post("/v1/events", json=ev, headers={"Authorization": header}).status_code == 200, (
            header
        )
    for header in ("Bearer tok2", "Bearer to", "Basic tok", "tok", "", "Bearer"):
        r = client.post("/v1/events", json=ev, headers={"Authorization": header})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", header
    assert not bearer_matches("Bearer t\u00f6k", "tok")  # non-ASCII header values do not raise


def test_a_state_copied_from_another_user_is_no_hit(client):
    store = client.store
    for user in (21, 22):  # same sequence version and length: only the user differs
        client.post(
            "/v1/events",
            json={"events": [{"user_id": user, "item_id": 5 + user, "ts": TS - 10}]},
            headers=AUTH,
        )
    body = {"candidates": [{"item_id": 9}], "ts": TS}
    own = client.post("/v1/score", json={"user_id": 21, **body}).json()
    assert client.post("/v1/score", json={"user_id": 22, **body}).json()["user_state"] == "full"
    assert client.post("/v1/score", json={"user_id": 21, **body}).json()["user_state"] == "hit"
    version = own["model_version"]
    store.r.set(store._key(21, f"st:{version}"), store.r.get(store._key(22, f"st:{version}")))
    copied = client.post("/v1/score", json={"user_id": 21, **body}).json()
    assert copied["user_state"] == "full"
    assert np.allclose(copied["scores"], own["scores"], atol=1e-6)  # user 21's own score, recomputed


@pytest.mark.parametrize(
    "kind,corrupt",
    [
        ("seq", lambda r, k: r.set(k, "not a list")),
        ("ver", lambda r, k: r.set(k, "abc")),
        ("ver", lambda r, k: r.rpush(k, "1")),
        ("ids", lambda r, k: r.set(k, "x")),
    ],
)
def test_a_bad_key_is_a_503_naming_it_and_counted(client, kind, corrupt):
    store = client.store
    client.post("/v1/events", json={"events": [{"user_id": 31, "item_id": 1, "ts": TS - 5}]}, headers=AUTH)
    key = store._key(31, kind)
    store.r.delete(key)
    corrupt(store.r, key)
    r = client.post("/v1/events", json={"events": [{"user_id": 31, "item_id": 2, "ts": TS}]}, headers=AUTH)
    assert r.status_code == 503 and key in r.json()["detail"] and "store check --repair" in r.json()["detail"]
    if kind != "ids":  # scoring reads seq and ver only
        r = client.post("/v1/score", json={"user_id": 31, "candidates": [{"item_id": 1}]})
        assert r.status_code == 503 and key in r.json()["detail"]
    assert f'longer_bad_keys_total{{kind="{kind}"}}' in client.get("/metrics").text


def test_a_wrong_type_state_is_no_hit_and_overwritten(client):
    store = client.store
    body = {"user_id": 41, "candidates": [{"item_id": 1}], "ts": TS}
    version = client.post("/v1/score", json=body).json()["model_version"]
    store.r.delete(store._key(41, f"st:{version}"))
    store.r.rpush(store._key(41, f"st:{version}"), "x")
    assert client.post("/v1/score", json=body).json()["user_state"] == "full"
    assert client.post("/v1/score", json=body).json()["user_state"] == "hit"


class Marker:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def corruptions(tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy("/etc/passwd", outside)
    return {
        "random bytes": lambda f: f.write_bytes(os.urandom(4096)),
        "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
        "empty": lambda f: f.write_bytes(b""),
        "pickle": lambda f: f.write_bytes(pickle.dumps({"w": Marker(str(tmp_path / "pwned"))})),
        "symlink to /etc/passwd": lambda f: (f.unlink(), f.symlink_to("/etc/passwd")),
        "symlink out of the bundle": lambda f: (f.unlink(), f.symlink_to(outside)),
    }


def test_reload_of_an_unloadable_bundle_is_409_and_the_old_model_serves(bundle, tmp_path):
    live = tmp_path / "live"
    with prefixed_store(shared_redis(), max_len=64) as store:
        for name, corrupt in corruptions(tmp_path).items():
            shutil.rmtree(live, ignore_errors=True)
            shutil.copytree(bundle, live)
            app = create_app(Settings(model=str(live), token="tok"), store=store)
            with TestClient(app) as c:
                before = c.post(
                    "/v1/score", json={"user_id": 1, "candidates": [{"item_id": 1}], "ts": TS}
                ).json()
                cfg = json.loads((live / "config.json").read_text())
                (live / "config.json").write_text(json.dumps({**cfg, "model_version": "f" * 16}))
                corrupt(live / "model.safetensors")
                r = c.post("/v1/admin/reload", headers=AUTH)
                assert r.status_code == 409, (name, r.text)
                assert "still serving the old model" in r.json()["detail"], name
                if name.startswith("symlink"):
                    assert "symlink out of the bundle directory" in r.json()["detail"], name
                after = c.post(
                    "/v1/score", json={"user_id": 1, "candidates": [{"item_id": 1}], "ts": TS}
                ).json()
                assert (
                    after["model_version"] == before["model_version"] and after["scores"] == before["scores"]
                )
        assert not (tmp_path / "pwned").exists()


def test_openapi_documents_every_status_and_metrics_as_text(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/events"]["post"]["responses"]) >= {"200", "400", "401", "408", "413", "422", "503"}
    assert set(paths["/v1/score"]["post"]["responses"]) >= {"200", "400", "408", "413", "422", "503"}
    assert set(paths["/v1/admin/reload"]["post"]["responses"]) >= {"200", "401", "409"}
    assert set(paths["/readyz"]["get"]["responses"]) >= {"200", "503"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_a_non_finite_score_is_an_error_never_a_null(client, monkeypatch):
    """orjson writes NaN as null: a model that returns NaN must fail the request (the app's 500
    handler, a bug of ours), not answer 200 with scores a client would read as missing."""
    from serving.runtime import ModelRuntime

    score = ModelRuntime.score
    monkeypatch.setattr(ModelRuntime, "score", lambda self, state, cands: [float("nan")])
    with pytest.raises(ValueError, match="user 1: the model returned a non-finite score"):
        post_raw(client, "/v1/score", SCORE % "")
    monkeypatch.setattr(ModelRuntime, "score", score)
    assert 0 < post_raw(client, "/v1/score", SCORE % "").json()["scores"][0] < 1  # finite ones pass
