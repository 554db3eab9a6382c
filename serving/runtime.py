"""The model at serving time: one bundle and the two halves of the split — `encode` (a user's
history → UserState, once per sequence version) and `score` (candidates against a UserState).
How a UserState is cached between requests is serving/state_cache.py's.

Features follow the bundle's FeatureSpec. A declared column a request leaves out (and the
item table does not hold, serving/features.py) is filled in with the unknown bucket (id 0; an
empty list for a list column; a dense column's train mean), and `candidates` returns how many
of each it filled. History events carry the columns of the store's event layout
(`layout` = feature_store.online.event_dtype(spec): item_id and the scalar sequence columns); a
list<int64> sequence column is not stored online and enters as empty lists. User columns come
from the user's stored profile (`encode(..., profile)`), user side: they are part of the
UserState, so a profile change must invalidate cached states (it bumps `seq_version`,
feature_store/online.py); a column the profile lacks is the unknown bucket.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.columns import normalised
from feature_store.online import event_dtype
from longer.interface import Candidates, UserState
from longer.spec import FeatureSpec, hist_key
from trainer.export import Bundle, load_bundle
from trainer.threads import configure_threads

from .schemas import request_models


@dataclass
class HistoryBatch:
    """What `encode_user` reads: the KJT (history + the user; no candidate) and event times."""

    sparse: KeyedJaggedTensor
    hist_ts: torch.Tensor
    event_lengths: dict[str, torch.Tensor]  # list sequence columns: values per event (none known: 0)
    hist_total: torch.Tensor  # (1,): the user's event count up to the last one (the append-stable grid)


def history_batch(
    user_id: int,
    events: np.ndarray,
    max_len: int,
    spec: FeatureSpec | None = None,
    profile: dict | None = None,
    total: int | None = None,
) -> HistoryBatch:
    """One user's last `max_len` events (a structured array sorted by time) and profile
    ({user column: id or list of ids}; a column left out: the unknown bucket) as a model input.
    `total`: how many events the user had up to the last of `events` (default: len(events)),
    which places them on the append-stable grid (`Batch.hist_total`)."""
    spec, profile = spec or FeatureSpec(), profile or {}
    ev = events[-max_len:] if max_len else events[:0]
    n = len(ev)
    values, lengths, event_lengths = [], [], {}
    stored = set(ev.dtype.names or ())
    for col in spec.history_fields:
        if spec.is_list(col):  # not stored online: every event's list is empty
            event_lengths[hist_key(col)] = torch.zeros(n, dtype=torch.long)
            values.append(np.zeros(0, np.int64))
            lengths.append(0)
        else:  # a packed copy; a column the store does not hold: the unknown bucket
            values.append(np.array(ev[col], dtype=np.int64) if col in stored else np.zeros(n, np.int64))
            lengths.append(n)
    values.append(np.array([user_id], np.int64))
    lengths.append(1)
    for col in spec.user:  # the stored profile; a column it lacks: the unknown bucket
        v = profile.get(col, [] if spec.is_list(col) else 0)
        v = np.array(v if spec.is_list(col) else [v], np.int64)
        values.append(v)
        lengths.append(len(v))
    # the candidate and context keys: a placeholder id each, never read by encode_user
    for _ in (*spec.candidate_keys, *spec.context_keys):
        values.append(np.zeros(1, np.int64))
        lengths.append(1)
    kjt = KeyedJaggedTensor(
        keys=list(spec.history_keys + spec.user_keys + spec.candidate_keys + spec.context_keys),
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.tensor(lengths, dtype=torch.long),
    )
    hist_ts = torch.from_numpy(np.array(ev["ts"], dtype=np.int64))
    n_total = len(events) if total is None else int(total)
    return HistoryBatch(kjt, hist_ts, event_lengths, torch.tensor([n_total], dtype=torch.long))


class ModelRuntime:
    """One loaded bundle; `model_version` is its version (a hash of its files), tagged with the
    max_len when it reads longer histories than it was trained at (`max_len`, 0: the trained
    one), so cached user states of the two never mix."""

    def __init__(self, bundle_dir: str, threads: int = 0, max_len: int = 0):
        self.bundle: Bundle = load_bundle(bundle_dir, max_len=max_len or None)
        self.max_len = self.bundle.config.model.max_len
        extended = max_len and self.max_len != self.bundle.trained_max_len
        self.model_version = f"{self.bundle.version}-L{self.max_len}" if extended else self.bundle.version
        self.threads = configure_threads(threads or None, "LONGER_THREADS")  # 0: the CPU budget
        self.spec = self.bundle.spec
        self.models = request_models(self.spec)  # the request bodies this bundle declares
        self.layout = event_dtype(self.spec)  # the packed events of the store it reads
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads in eval either

    @property
    def incremental(self) -> bool:
        """Whether a cached state can be brought up to date with `update` (append_stable)."""
        return getattr(self.bundle.model.net, "update", None) is not None

    def encode(
        self, user_id: int, events: np.ndarray, profile: dict | None = None, total: int | None = None
    ) -> UserState:
        """The state of `events` (the last max_len read); `total`: the user's event count up to
        the last of them (default len(events); history_batch)."""
        with self._lock, torch.no_grad():
            torch.set_num_threads(self.threads)
            return self.bundle.model.encode_user(
                history_batch(user_id, events, self.max_len, self.spec, profile, total)
            )

    def update(
        self, state: UserState, user_id: int, new_events: np.ndarray, profile: dict | None, total: int
    ) -> UserState:
        """`state` (of total - len(new_events) events) brought up to `total` with the new events
        (oldest first): `encode` of all of them within 1e-5 (model.update_user)."""
        batch = history_batch(user_id, new_events, len(new_events), self.spec, profile, total)
        with self._lock, torch.no_grad():
            torch.set_num_threads(self.threads)
            return self.bundle.model.update_user(state, batch)

    def candidates(
        self, cands: list, context: dict, ts: int, known: dict[str, list] | None = None
    ) -> tuple[Candidates, dict]:
        """Request candidates (objects with item_id and the candidate and dense columns as
        attributes, None = left out) and context → model Candidates, and the fill-ins
        {(column, "unknown"): count}. `known`: candidate columns already read off the
        candidates (and filled from the item table, serving/features.py), a list per column."""
        spec, fills = self.spec, {}

        def filled(col, v, unknown):
            if v is None:
                fills[(col, "unknown")] = fills.get((col, "unknown"), 0) + 1
                return unknown
            return v

        def ids(col, vs):
            if not spec.is_list(col):
                return torch.tensor([[filled(col, v, 0) for v in vs]], dtype=torch.long)
            rows = [filled(col, v, []) for v in vs]
            M = max(1, *(len(r) for r in rows))
            return torch.tensor([[r + [-1] * (M - len(r)) for r in rows]], dtype=torch.long)

        known = known or {}
        columns = {
            c: ids(c, known[c] if c in known else [getattr(x, c) for x in cands]) for c in spec.candidate
        }
        dense = {}
        for c in spec.dense:  # normalised with the train split's statistics, as the loader does
            mean, std = spec.dense_stats.get(c, (0.0, 1.0))
            raw = [filled(c, getattr(x, c), mean) for x in cands]
            dense[c] = torch.from_numpy(normalised(np.array([raw], dtype=np.float64), mean, std))
        ctx = {c: ids(c, [context.get(c)])[0] for c in spec.context}
        out = Candidates(
            item_id=torch.tensor([[x.item_id for x in cands]], dtype=torch.long),
            category_id=columns.pop("category_id", None),
            ts=torch.tensor([ts], dtype=torch.long),
            columns=columns,
            dense=dense,
            context=ctx,
        )
        return out, fills

    def score(self, state: UserState, cands: Candidates) -> list[float]:
        """Click probabilities of the candidates against `state`. inference_mode: no autograd
        bookkeeping at all on the hot path (no_grad keeps some)."""
        with self._lock, torch.inference_mode():
            torch.set_num_threads(self.threads)
            logits = self.bundle.model.score(state, cands)[0]
        return torch.sigmoid(logits.double()).tolist()
