"""Serving a bundle with declared features (issue 15): /v1/score takes the bundle's candidate,
dense and context columns (request models built from its FeatureSpec), scores equal the offline
predictions, the OpenAPI shows the fields, an undeclared field is a 422 naming it, a left-out
column is filled in and counted, and a hot reload to another spec changes the request model."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from feature_store.synth import SynthConfig, synthesize
from serving.app import create_app
from serving.runtime import ModelRuntime
from serving.settings import Settings
from tests.serving_utils import prefixed_store, served_bundle, shared_redis, tiny_bundle
from tests.test_trainer import run, run_toml

pytestmark = pytest.mark.slow

FEATURES = """
[features]
candidate = ["category_id", "brand", "tags"]
context = ["device"]
dense = ["price"]
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_features")
    synthesize(
        SynthConfig(users=80, items=300, events_per_user=60, seed=5, extra_columns=True),
        root / "log",
        progress=False,
    )
    (root / "run.toml").write_text(
        run_toml(max_len=32, train_extra="warmup_steps = 2\nprefetch = 0") + FEATURES
    )
    cfg = root / "run.toml"
    run(
        [
            "build",
            "--log",
            root / "log",
            "--out",
            root / "data",
            "--max-len",
            32,
            "--test-days",
            5,
            "--config",
            cfg,
        ]
    )
    run(
        ["train", "--config", cfg, "--data", root / "data", "--out", root / "run", "--quiet", "train.steps=8"]
    )
    preds = root / "preds.parquet"
    run(
        [
            "eval",
            "--bundle",
            root / "run" / "export",
            "--data",
            root / "data",
            "--quiet",
            "--predictions",
            preds,
        ]
    )
    return root / "run" / "export", root / "data", preds


@pytest.fixture
def app_and_store(trained):
    bundle, data, _ = trained
    with served_bundle(bundle, data) as app_store:  # its keys are deleted when the test ends
        yield app_store


def test_online_scores_equal_offline_with_candidate_list_context_and_dense_columns(trained, app_and_store):
    _, data, preds = trained
    app, _ = app_and_store
    ev = pq.read_table(data / "eval").to_pydict()
    pred = pq.read_table(preds).to_pydict()
    rows = np.random.default_rng(0).choice(len(ev["user_id"]), 30, replace=False)
    with TestClient(app) as client:
        for i in rows:
            cand = {c: ev[c][i] for c in ("item_id", "category_id", "brand", "tags", "price")}
            body = {
                "user_id": ev["user_id"][i],
                "ts": ev["ts"][i],
                "candidates": [cand],
                "context": {"device": ev["device"][i]},
            }
            r = client.post("/v1/score", json=body)
            assert r.status_code == 200, r.text
            assert pred["row_id"][i] == i
            assert abs(r.json()["scores"][0] - pred["prediction"][i]) < 1e-5
        # the columns matter: another device changes the score
        other = {**body, "context": {"device": ev["device"][rows[-1]] % 3 + 1}}
        assert client.post("/v1/score", json=other).json()["scores"] != r.json()["scores"]


def test_openapi_undeclared_fields_and_fill_ins(app_and_store):
    app, _ = app_and_store
    with TestClient(app) as client:
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        assert set(schemas["Candidate"]["properties"]) == {"item_id", "category_id", "brand", "tags", "price"}
        assert set(schemas["Context"]["properties"]) == {"device"}
        r = client.post(
            "/v1/score", json={"user_id": 1, "ts": 1_700_000_000, "candidates": [{"item_id": 3, "color": 2}]}
        )
        assert r.status_code == 422 and "color" in r.text
        r = client.post(
            "/v1/score", json={"user_id": 1, "context": {"hour": 2}, "candidates": [{"item_id": 3}]}
        )
        assert r.status_code == 422 and "hour" in r.text
        r = client.post("/v1/score", json={"user_id": 1, "candidates": [{"item_id": 3, "tags": ["x"]}]})
        assert r.status_code == 422 and "tags" in r.text
        r = client.post(
            "/v1/score", json={"user_id": 1, "candidates": [{"item_id": 3}, {"item_id": 4, "brand": 2}]}
        )
        assert r.status_code == 200, r.text
        metrics = client.get("/metrics").text
        assert 'longer_feature_fill_ins_total{column="brand",source="unknown"} 1.0' in metrics
        assert 'longer_feature_fill_ins_total{column="tags",source="unknown"} 2.0' in metrics
        assert 'longer_feature_fill_ins_total{column="device",source="unknown"} 1.0' in metrics


def test_reload_to_another_spec_rebuilds_the_request_model(trained, tmp_path):
    """Hot reload to a bundle with a different spec: /v1/score validates against the new spec and
    /openapi.json shows it (states are keyed by model_version, so none is reused)."""
    bundle, _, _ = trained
    live = tmp_path / "live"
    shutil.copytree(bundle, live)
    with prefixed_store(shared_redis()) as store:
        app = create_app(Settings(model=str(live), token="t"), runtime=ModelRuntime(str(live)), store=store)
        with TestClient(app) as client:
            assert (
                "brand"
                in client.get("/openapi.json").json()["components"]["schemas"]["Candidate"]["properties"]
            )
            tiny_bundle(tmp_path / "plain")
            shutil.rmtree(live)
            shutil.copytree(tmp_path / "plain", live)
            r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer t"})
            assert r.json()["reloaded"] is True
            props = client.get("/openapi.json").json()["components"]["schemas"]["Candidate"]["properties"]
            assert set(props) == {"item_id", "category_id"}
            r = client.post("/v1/score", json={"user_id": 1, "candidates": [{"item_id": 3, "brand": 2}]})
            assert r.status_code == 422 and "brand" in r.text
            assert (
                client.post("/v1/score", json={"user_id": 1, "candidates": [{"item_id": 3}]}).status_code
                == 200
            )
