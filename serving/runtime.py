"""The model at serving time: one bundle and the two halves of the split — `encode` (a user's
history → UserState, once per sequence version) and `score` (candidates against a UserState).
How a UserState is cached between requests is serving/state_cache.py's.

Features follow the bundle's FeatureSpec. A declared column a request leaves out (and the
item table does not hold, serving/features.py) is filled in with the unknown bucket (id 0; an
empty list for a list column; a dense column's train mean), and `candidates` returns how many
of each it filled. History events carry the columns of the store's event layout
(feature_store.online.event_dtype: item_id and the sequence columns, a list column as a
fixed-width subarray padded with -1); `history_batch` turns them into the loader's jagged form
(a list column: each event's ids >= 0, `event_lengths` their counts), so a history scores
online as offline. User columns come
from the user's stored profile (`encode(..., profile)`), user side: they are part of the
UserState, so a profile change must invalidate cached states (it bumps `seq_version`,
feature_store/online.py); a column the profile lacks is the unknown bucket.

Candidates come as columns (`CandidateColumns`: item ids and, per declared column, one value
per candidate): the columnar request form's arrays as they are, the object form's read off its
objects once (`as_columns`). `candidates` turns them into tensors in one pass per column.

Model calls run in `ComputeSlots`, not under one global lock: up to `slots` calls at once
(encode or score, on the executor's threads), each with torch threads = the CPU budget ÷ the
calls running when it starts (at least 1), capped at `call_threads` (`LONGER_CALL_THREADS`,
default 1; 0: no cap, a lone request gets every thread), so one request's compute overlaps
another's Redis read and JSON. `slots` is `LONGER_COMPUTE_SLOTS`, by default the CPU budget + 1:
a call spends part of its time in Python with the GIL (the candidate lookup, the state's
decode), and a third one-thread call on 2 CPUs keeps a core busy meanwhile — 8 clients at
L 2,000 × 500 got 5–7 % more requests/s than with 2 slots (149–155 against 142–145). Why the cap is 1 by default: the entry points make OpenMP's idle
threads sleep (trainer/threads.py), and waking them costs more than a second thread gains at a
serving call's size — a score of 500 candidates against L = 2,000 (d 64) takes 6.0 ms on one
thread and 7.4 ms on two — while two calls of one thread each run side by side. All under
`torch.inference_mode`. `score` runs the candidate side as one traced graph where the trace
checks out against the eager net (serving/traced.py: the GIL taken once a call, not once an
op, so concurrent calls and the event loop do not queue for it; LONGER_TRACE).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.columns import normalised
from feature_store.online import event_lists
from longer.interface import Candidates, UserState
from longer.spec import FeatureSpec, hist_key
from trainer.export import Bundle, load_bundle
from trainer.threads import configure_threads

from .schemas import request_models
from .settings import Settings
from .traced import TracedScore, trace_score


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
        if spec.is_list(col):  # each event's ids (PAD dropped); a column not stored: empty lists
            ids, per_event = (
                event_lists(ev, col) if col in stored else (np.zeros(0, np.int64), np.zeros(n, np.int64))
            )
            event_lengths[hist_key(col)] = torch.from_numpy(per_event)
            values.append(ids)
            lengths.append(len(ids))
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


class ComputeSlots:
    """At most `slots` model calls at once; a call entering with n calls running (itself
    included) runs with max(1, budget // n) torch threads, at most `per_call` (0: no cap; torch's
    thread count is per calling thread). `slots` defaults to the budget: on 2 CPUs, two calls of
    1 thread, or (no cap) one of 2."""

    def __init__(self, budget: int, slots: int = 0, per_call: int = 0):
        self.budget = max(1, budget)
        self.slots = slots or self.budget
        self.per_call = per_call or self.budget
        self._free = threading.BoundedSemaphore(self.slots)
        self._count = threading.Lock()
        self.running = 0

    @contextlib.contextmanager
    def __call__(self):
        """Hold one slot: yields the torch threads this call runs with."""
        with self._free:
            with self._count:
                self.running += 1
                threads = max(1, min(self.per_call, self.budget // self.running))
            try:
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    yield threads
            finally:
                with self._count:
                    self.running -= 1


@dataclass
class CandidateColumns:
    """A request's candidates as columns: `item_ids` and, per declared candidate or dense column
    given, a value per candidate (None: this one leaves it out); a column absent from `columns`
    is left out by every candidate."""

    item_ids: list[int]
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item_ids)

    def values(self, column: str) -> list:
        """The column's values, one per candidate (None where left out)."""
        return self.columns.get(column) or [None] * len(self.item_ids)


def as_columns(given, spec: FeatureSpec) -> CandidateColumns:
    """Candidate objects (item_id and the declared columns as attributes, None = left out) as
    columns; `CandidateColumns` as they are."""
    if isinstance(given, CandidateColumns):
        return given
    cols = {c: [getattr(x, c, None) for x in given] for c in (*spec.candidate, *spec.dense)}
    return CandidateColumns([x.item_id for x in given], cols)


class ModelRuntime:
    """One loaded bundle; `model_version` is its version (a hash of its files), tagged with the
    max_len when it reads longer histories than it was trained at (`max_len`, 0: the trained
    one), so cached user states of the two never mix."""

    def __init__(
        self,
        bundle_dir: str,
        threads: int = 0,
        max_len: int = 0,
        call_threads: int = 1,
        trace: bool = True,
        slots: int = 0,
    ):
        self.bundle: Bundle = load_bundle(bundle_dir, max_len=max_len or None)
        self.max_len = self.bundle.config.model.max_len
        extended = max_len and self.max_len != self.bundle.trained_max_len
        self.model_version = f"{self.bundle.version}-L{self.max_len}" if extended else self.bundle.version
        self.threads = configure_threads(threads or None, "LONGER_THREADS")  # 0: the CPU budget
        self.spec = self.bundle.spec
        self.models = request_models(self.spec)  # the request bodies this bundle declares
        # the module docstring; slots 0: the budget + 1
        self.slots = ComputeSlots(self.threads, slots=slots or self.threads + 1, per_call=call_threads)
        # the candidate side as one traced graph where it checks out (serving/traced.py)
        self._score = (trace and trace_score(self)) or self.bundle.model.score

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        bundle: str | None = None,
        threads: int | None = None,
        max_len: int | None = None,
    ) -> ModelRuntime:
        """The runtime the settings describe (LONGER_BUNDLE, LONGER_THREADS, LONGER_MAX_LEN,
        LONGER_CALL_THREADS, LONGER_TRACE, LONGER_COMPUTE_SLOTS), with `bundle`, `threads` or `max_len` given instead
        where the caller has its own (the replay's arms, the serve bench)."""
        s = settings
        return cls(
            bundle or s.model,
            s.threads if threads is None else threads,
            s.max_len if max_len is None else max_len,
            s.call_threads,
            s.trace,
            s.compute_slots,
        )

    @property
    def traced(self) -> bool:
        """Whether `score` runs the candidate side as a traced graph (serving/traced.py)."""
        return isinstance(self._score, TracedScore)

    @property
    def incremental(self) -> bool:
        """Whether a cached state can be brought up to date with `update` (append_stable)."""
        return getattr(self.bundle.model.net, "update", None) is not None

    def encode(
        self, user_id: int, events: np.ndarray, profile: dict | None = None, total: int | None = None
    ) -> UserState:
        """The state of `events` (the last max_len read); `total`: the user's event count up to
        the last of them (default len(events); history_batch)."""
        with self.slots():
            return self.bundle.model.encode_user(
                history_batch(user_id, events, self.max_len, self.spec, profile, total)
            )

    def update(
        self, state: UserState, user_id: int, new_events: np.ndarray, profile: dict | None, total: int
    ) -> UserState:
        """`state` (of total - len(new_events) events) brought up to `total` with the new events
        (oldest first): `encode` of all of them within 1e-5 (model.update_user)."""
        batch = history_batch(user_id, new_events, len(new_events), self.spec, profile, total)
        with self.slots():
            return self.bundle.model.update_user(state, batch)

    def candidates(
        self, given, context: dict, ts: int, known: dict[str, list] | None = None
    ) -> tuple[Candidates, dict]:
        """Request candidates (`CandidateColumns`, or objects with item_id and the candidate and
        dense columns as attributes, None = left out) and context → model Candidates, and the
        fill-ins {(column, "unknown"): count}. `known`: candidate columns already filled from
        the item table (serving/features.py), a list per column."""
        spec, fills, cols = self.spec, {}, as_columns(given, self.spec)
        n = len(cols)

        def filled(col, vs, unknown):
            missing = sum(v is None for v in vs)
            if not missing:
                return vs
            fills[(col, "unknown")] = fills.get((col, "unknown"), 0) + missing
            return [unknown if v is None else v for v in vs]

        def ids(col, vs):
            if vs is None:  # left out by every candidate: the unknown bucket
                fills[(col, "unknown")] = fills.get((col, "unknown"), 0) + len(cols)
                return (
                    torch.zeros((1, n), dtype=torch.long)
                    if not spec.is_list(col)
                    else torch.full((1, n, 1), -1)
                )
            if not spec.is_list(col):
                return torch.tensor([filled(col, vs, 0)], dtype=torch.long)
            rows = filled(col, vs, [])
            M = max(1, *(len(r) for r in rows))
            return torch.tensor([[r + [-1] * (M - len(r)) for r in rows]], dtype=torch.long)

        known = known or {}
        columns = {c: ids(c, known[c] if c in known else cols.columns.get(c)) for c in spec.candidate}
        dense = {}
        for c in spec.dense:  # normalised with the train split's statistics, as the loader does
            mean, std = spec.dense_stats.get(c, (0.0, 1.0))
            raw = filled(c, cols.values(c), mean)
            dense[c] = torch.from_numpy(normalised(np.array([raw], dtype=np.float64), mean, std))
        ctx = {c: ids(c, [context.get(c)])[0] for c in spec.context}
        out = Candidates(
            item_id=torch.tensor([cols.item_ids], dtype=torch.long),
            category_id=columns.pop("category_id", None),
            ts=torch.tensor([ts], dtype=torch.long),
            columns=columns,
            dense=dense,
            context=ctx,
        )
        return out, fills

    def score(self, state: UserState, cands: Candidates) -> list[float]:
        """Click probabilities of the candidates against `state`, in a compute slot
        (inference_mode: no autograd bookkeeping at all on the hot path)."""
        with self.slots():
            logits = self._score(state, cands)[0]
        return torch.sigmoid(logits.double()).tolist()
