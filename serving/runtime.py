"""The model at serving time: one bundle and the two halves of the split — `encode` (a user's
history → UserState, once per sequence version) and `score` (candidates against a UserState).
How a UserState is cached between requests is serving/state_cache.py's."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store.batch import DEFAULT_KEYS
from longer.interface import Candidates, UserState
from trainer.export import Bundle, load_bundle
from trainer.threads import configure_threads


@dataclass
class HistoryBatch:
    """What `encode_user` reads: the KJT (history + the user; no candidate) and event times."""

    sparse: KeyedJaggedTensor
    hist_ts: torch.Tensor


def history_batch(user_id: int, events: np.ndarray, max_len: int) -> HistoryBatch:
    """One user's last `max_len` events (a structured array sorted by time) as a model input."""
    ev = events[-max_len:] if max_len else events[:0]
    n = len(ev)
    values, lengths = [], []
    for key in DEFAULT_KEYS:
        if key.startswith("hist_"):
            values.append(np.array(ev[key.removeprefix("hist_")], dtype=np.int64))  # a packed copy
            lengths.append(n)
        elif key == "user_id":
            values.append(np.array([user_id], np.int64))
            lengths.append(1)
        else:  # the candidate's keys: filled with a placeholder id, never read by encode_user
            values.append(np.zeros(1, np.int64))
            lengths.append(1)
    kjt = KeyedJaggedTensor(
        keys=list(DEFAULT_KEYS),
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.tensor(lengths, dtype=torch.long),
    )
    return HistoryBatch(kjt, torch.from_numpy(np.array(ev["ts"], dtype=np.int64)))


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
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads in eval either

    def encode(self, user_id: int, events: np.ndarray) -> UserState:
        with self._lock, torch.no_grad():
            torch.set_num_threads(self.threads)
            return self.bundle.model.encode_user(history_batch(user_id, events, self.max_len))

    def score(
        self, state: UserState, item_ids: Sequence[int], category_ids: Sequence[int], ts: int
    ) -> list[float]:
        """Click probabilities of the candidates (parallel id sequences) against `state`.
        inference_mode: no autograd bookkeeping at all on the hot path (no_grad keeps some)."""
        cands = Candidates(
            item_id=torch.as_tensor(item_ids, dtype=torch.long)[None],
            category_id=torch.as_tensor(category_ids, dtype=torch.long)[None],
            ts=torch.tensor([ts], dtype=torch.long),
        )
        with self._lock, torch.inference_mode():
            torch.set_num_threads(self.threads)
            logits = self.bundle.model.score(state, cands)[0]
        return torch.sigmoid(logits.double()).tolist()
