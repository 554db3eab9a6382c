"""The online store and the service on a real Redis Cluster: three masters started from the
machine's redis-server on free loopback ports (skipped, with the reason, where redis-server or
its cluster mode is missing), joined with CLUSTER ADDSLOTS / MEET, torn down afterwards.

On it: `longer store load`, a full encode then a hit, 16 concurrent appenders losing nothing
(and the event totals and tail reads of their users), and a master stopped: `bypass` answers
and /readyz 503."""

import asyncio
import re
import socket
import subprocess
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient

from longer_cli.main import main
from serving.app import create_app
from serving.settings import Settings
from tests.serving_utils import free_port, redis_server_binary, start_redis_server, stop_process, tiny_bundle

pytestmark = pytest.mark.slow

SLOTS = 16384


@pytest.fixture
def cluster(tmp_path):
    """Three masters on loopback; yields their ports and processes."""
    version = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout
    major = int(re.search(r"v=(\d+)", version).group(1)) if re.search(r"v=(\d+)", version) else 0
    if major < 3:
        pytest.skip(f"redis-server {version.strip()!r} has no cluster mode (Redis 3.0+)")
    ports, procs = [cluster_port() for _ in range(3)], []
    try:
        for port in ports:
            procs.append(
                start_redis_server(
                    port,
                    tmp_path / f"node-{port}",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "1000",
                )
            )
        nodes = [redis.Redis(port=p) for p in ports]
        for i, node in enumerate(nodes):  # three equal slot ranges
            node.execute_command("CLUSTER", "ADDSLOTS", *range(i * SLOTS // 3, (i + 1) * SLOTS // 3))
        for port in ports[1:]:
            nodes[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        deadline = time.time() + 30
        while not all(b"cluster_state:ok" in n.execute_command("CLUSTER", "INFO") for n in nodes):
            if time.time() > deadline:
                raise RuntimeError("the cluster did not converge")
            time.sleep(0.1)
        for n in nodes:
            n.close()
        yield ports, procs
    finally:
        for p in procs:
            stop_process(p)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


def node_of(client, key: str) -> int:
    return client.get_node_from_key(key).port


def test_store_and_service_on_a_three_master_cluster(cluster, synth_dataset, tmp_path):
    ports, procs = cluster
    url = f"redis+cluster://127.0.0.1:{ports[0]}"
    assert (
        main(["store", "load", "--data", str(synth_dataset), "--redis", url, "--max-len", "64", "--quiet"])
        == 0
    )
    bundle = tiny_bundle(tmp_path / "bundle")
    app = create_app(Settings(model=str(bundle), redis_url=url, token="tok"))
    store = app.state.service.store
    seq = pq.read_table(synth_dataset / "sequences").to_pydict()
    users = seq["user_id"]
    assert len({node_of(store.r, store._key(u, "seq")) for u in users}) == 3  # users on every master
    for i in (0, 7, len(users) - 1):
        events, version, _ = store.read(users[i])
        order = np.lexsort((seq["item_id"][i], seq["ts"][i]))[-64:]
        assert version == 1 and events["item_id"].tolist() == np.array(seq["item_id"][i])[order].tolist()

    async def appenders(n_writers=16, per_writer=20):  # ~53 events per user: under max_len 64
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as c:

            async def writer(w):
                answers = []
                for i in range(per_writer):
                    user = 900_000 + (w + i) % 6  # six users, on all masters, written by everyone
                    ev = {
                        "user_id": user,
                        "item_id": w * 1000 + i,
                        "ts": 1_700_000_000 + i,
                        "event_id": f"{w}-{i}",
                    }
                    r = await c.post(
                        "/v1/events", json={"events": [ev]}, headers={"Authorization": "Bearer tok"}
                    )
                    assert r.status_code == 200, r.text
                    answers.append(r.json()["appended"])
                return answers

            return await asyncio.gather(*[writer(w) for w in range(n_writers)])

    answers = asyncio.run(appenders())
    assert sum(map(sum, answers)) == 16 * 20
    written = {}
    for w in range(16):
        for i in range(20):
            written.setdefault(900_000 + (w + i) % 6, []).append(w * 1000 + i)
    assert len({node_of(store.r, store._key(u, "seq")) for u in written}) == 3
    for user, items in written.items():
        events, version, _ = store.read(user)
        assert sorted(events["item_id"].tolist()) == sorted(items) and version == len(items)  # nothing lost
        tail = store.read_since(user, len(items) - 2, "mv")  # the tail-read script, on the user's slot
        assert tail.complete and tail.total == len(items) and len(tail.events) == 2
    u0 = users[0]  # `store load` set the dataset's event count; the read_since script sees it
    assert store.read_since(u0, None, "mv").total == len(seq["item_id"][0]) == store.read_head(u0, "mv")[3]

    bad = store._key(users[5], "ver")
    store.r.set(bad, "corrupt")
    argv = ["store", "check", "--redis", url, "--quiet"]
    assert main(argv) == 1 and main([*argv, "--repair"]) == 0 and main(argv) == 0  # SCAN over every primary

    victim = node_of(store.r, store._key(users[0], "seq"))
    hist = [{"item_id": i, "ts": t} for i, t in zip(seq["item_id"][0][-64:], seq["ts"][0][-64:])]
    with TestClient(app) as client:
        body = {"user_id": users[0], "candidates": [{"item_id": 3}, {"item_id": 4}]}
        first, second = (client.post("/v1/score", json=body).json() for _ in range(2))
        assert (first["user_state"], second["user_state"]) == ("full", "hit")
        assert np.allclose(first["scores"], second["scores"], atol=1e-6)
        assert client.get("/readyz").status_code == 200
        # the left-out category_id came from the item table, its keys spread over the masters
        assert (
            'longer_feature_fill_ins_total{column="category_id",source="item"} 4.0'
            in client.get("/metrics").text
        )
        assert len({node_of(store.r, store.item_key(i)) for i in range(12)}) > 1
        r = client.put(f"/v1/users/{users[0]}", json={}, headers={"Authorization": "Bearer tok"})
        assert r.status_code == 200 and client.post("/v1/score", json=body).json()["user_state"] == "full"

        stop_process(procs[ports.index(victim)])  # one master down
        t0 = time.perf_counter()
        r = client.post(
            "/v1/score", json={"user_id": users[0], "candidates": [{"item_id": 3}], "history": hist}
        )
        bypass_s = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["user_state"] == "bypass", r.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "degraded"
        r = client.post(
            "/v1/events",
            json={"events": [{"user_id": users[0], "item_id": 1, "ts": 5}]},
            headers={"Authorization": "Bearer tok"},
        )
        assert r.status_code == 503
        print({"bypass_answer_s": round(bypass_s, 3)})
