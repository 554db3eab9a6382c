"""The model interface (DESIGN.md "Model interface"): what a sequence model takes and returns.

    History     a batch's histories as padded tokens, most recent first (the Tokenizer's output)
    UserState   everything a model computed from the user side, candidate-independent
    Candidates  N candidates per user and the request time
    DenseNet    the base of every model: everything after the embedding lookup

Contract of a `DenseNet` subclass:
    encode(batch, emb) -> UserState          candidate-independent work only; the state must
                                             hold `latest_ts` (B,) and every tensor has the
                                             users on dim 0, so serving can cache it;
    score(state, cand (B, N, 2, d)) -> (B, N) candidate-dependent work only: the logits of N
                                             candidates per user against the cached state.
Which columns feed which token is the model's `FeatureSpec` (longer/spec.py): user columns the
user side (cached), candidate, context and dense columns the candidate side.
`forward(batch, emb)` is the two composed for the one candidate each training sample carries.

An append-stable net (LONGER with `encoding = "append_stable"`, longer/stable.py) also has
    update(state, new_events, emb) -> UserState   the state of `encode` over all the events
                                             (1e-5, fp32), computing only the new events'
                                             tokens, the merge groups they touch and the
                                             user-side queries. Its state caches the layer-1
                                             K/V of the merge groups (which never change once
                                             full), each group's newest event time (for the
                                             request-time bias), the user's event count
                                             (`total`, the absolute index) and the tokens of
                                             the latest max(k, K) events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from .config import ModelConfig
from .requests import expand_state, request_view

if TYPE_CHECKING:
    from .tokens import Tokenizer


@dataclass
class History:
    """A batch's histories, padded in recency order: index r = r-th most recent event."""

    tokens: torch.Tensor  # (B, L, d), zero where invalid
    valid: torch.Tensor  # (B, L) bool
    ts: torch.Tensor  # (B, L) int64 seconds, 0 where invalid
    lengths: torch.Tensor  # (B,)
    latest_ts: torch.Tensor  # (B,) ts of the most recent event; -1 for an empty history


@dataclass
class UserState:
    """Everything a model computed from the user side; candidates are scored against it.

    A flat dict of named tensors, every one with the users on dim 0, so it can be sliced,
    moved and serialised without knowing the model (the Redis codec relies on this).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value


@dataclass
class Candidates:
    """N candidates for each of B users, each user's request time and request context.

    Ids are raw; a list column is (B, N, M) (context: (B, M)) padded with negative ids."""

    item_id: torch.Tensor  # (B, N) raw ids
    category_id: torch.Tensor | None  # (B, N) raw ids (None when the spec has no category_id)
    ts: torch.Tensor  # (B,) request time, unix seconds
    columns: dict[str, torch.Tensor] = field(default_factory=dict)  # other candidate columns, (B, N[, M])
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, N) float, normalised as in training
    context: dict[str, torch.Tensor] = field(default_factory=dict)  # (B[, M]) per-request columns

    def to(self, device) -> Candidates:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        cat = None if self.category_id is None else self.category_id.to(device)
        return Candidates(
            self.item_id.to(device),
            cat,
            self.ts.to(device),
            move(self.columns),
            move(self.dense),
            move(self.context),
        )

    def column(self, key: str) -> torch.Tensor:
        """A candidate key's ids, (B, N[, M])."""
        if key == "item_id":
            return self.item_id
        if key == "category_id" and self.category_id is not None:
            return self.category_id
        return self.columns[key]


class DenseNet(nn.Module, ABC):
    """Everything after the embedding lookup (data-parallel; TorchRec shards only the embedding).
    Subclasses set `cfg` and `features` (their Tokenizer) and define `encode` and `score`."""

    cfg: ModelConfig
    features: Tokenizer  # the attribute keeps its name: it is part of every state_dict key

    @abstractmethod
    def encode(self, batch, emb: dict[str, JaggedTensor]) -> UserState:
        """The user side of `batch` → its UserState (no candidate may influence it)."""

    @abstractmethod
    def score(self, state: UserState, cand: torch.Tensor) -> torch.Tensor:
        """cand (B, N, 2, d) candidate tokens [target, context] → logits (B, N)."""

    def score_embedded(
        self,
        state: UserState,
        emb: dict[str, JaggedTensor],
        dense: dict[str, torch.Tensor],
        request_ts: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, N) from the candidates' embeddings (B·N rows per key, candidate and context
        keys) and dense columns (B, N)."""
        cand = self.features.candidate_tokens(emb, dense, request_ts, state["latest_ts"])
        return self.score_tokens(state, cand, request_ts)

    def score_tokens(self, state: UserState, cand: torch.Tensor, request_ts: torch.Tensor) -> torch.Tensor:
        """`score` with the request time (B,) beside the tokens, for nets whose candidate side
        reads it (append-stable LONGER's time bias); tensors in, logits out, and no Python
        branch on values: the part of scoring serving/traced.py traces as one graph."""
        return self.score(state, cand)

    def forward(self, batch, emb: dict[str, JaggedTensor]) -> torch.Tensor:
        """One candidate per sample (training/eval): logits (B,). A batch with `request` set is
        encoded once per request (longer/requests.py), then each sample scored."""
        if getattr(batch, "request", None) is None:
            state = self.encode(batch, emb)
        else:
            state = expand_state(self.encode(*request_view(batch, emb)), batch.request)
        return self.score_embedded(state, emb, self.features.sample_dense(batch), batch.ts)[:, 0]
