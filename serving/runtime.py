"""The model at serving time: one bundle, its user-state cache format, and the two halves of
the split — `encode` (a user's history → UserState, once per sequence version) and `score`
(candidates against a UserState)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feature_store import codec
from feature_store.batch import DEFAULT_KEYS
from longer.interface import Candidates, UserState
from trainer.export import Bundle, load_bundle


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


def state_tag(user_id: int, seq_version: int, n_events: int) -> dict:
    """What a cached UserState is bound to, besides the model version (which `dumps` adds): the
    user, the sequence version it was computed from and the number of events it used. The tag
    travels inside the codec value's meta, so a value copied to another user's key, or left
    from an older sequence, is a miss."""
    return {"user_id": int(user_id), "seq_version": int(seq_version), "n_events": int(n_events)}


class ModelRuntime:
    def __init__(self, bundle_dir: str, threads: int = 2, precision: str = "fp32"):
        self.bundle: Bundle = load_bundle(bundle_dir)
        self.version = self.bundle.version
        self.max_len = self.bundle.config.model.max_len
        self.precision = precision
        self.threads = threads
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads in eval either

    def encode(self, user_id: int, events: np.ndarray) -> UserState:
        with self._lock, torch.no_grad():
            torch.set_num_threads(self.threads)
            return self.bundle.model.encode_user(history_batch(user_id, events, self.max_len))

    def score(self, state: UserState, item_ids: list[int], category_ids: list[int], ts: int) -> list[float]:
        cands = Candidates(
            item_id=torch.tensor([item_ids], dtype=torch.long),
            category_id=torch.tensor([category_ids], dtype=torch.long),
            ts=torch.tensor([ts], dtype=torch.long),
        )
        with self._lock, torch.no_grad():
            torch.set_num_threads(self.threads)
            logits = self.bundle.model.score(state, cands)[0]
        return torch.sigmoid(logits.double()).tolist()

    # --- the cached form -----------------------------------------------------------------------
    def dumps(self, state: UserState, tag: dict) -> bytes:
        return codec.encode(state.tensors, self.precision, meta={"model_version": self.version, **tag})

    def loads(self, blob: bytes | None, tag: dict) -> UserState | None:
        """The cached state if it decodes and carries exactly this model version and `tag`
        (`state_tag`: user, sequence version, events used)."""
        if blob is None:
            return None
        try:
            tensors, meta = codec.decode(blob)
        except codec.CodecError:
            return None
        if meta != {"model_version": self.version, **tag}:
            return None
        return UserState(tensors)
