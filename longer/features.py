"""What every model shares: TorchRec embeddings, tokenizers for the history, the candidate,
the request context and the user, the prediction head, and the cacheable `UserState`.

Time enters in two places, split so the user side can be cached (DESIGN.md "Model interface"):
a history token carries log2-bucketed seconds *before the user's latest event* (user-side
only); the candidate-side context token carries the gap from the latest event to the request
and the request's hour of day.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from .config import ModelConfig

# (table, features reading it): history and candidate share the item and category tables.
TABLES = {
    "item": ("hist_item_id", "item_id"),
    "category": ("hist_category_id", "category_id"),
    "action": ("hist_action",),
    "user": ("user_id",),
}
HISTORY_KEYS = ("hist_item_id", "hist_category_id", "hist_action")
CANDIDATE_KEYS = ("item_id", "category_id")
FEATURE_KEYS = HISTORY_KEYS + CANDIDATE_KEYS + ("user_id",)


def table_sizes(cfg: ModelConfig) -> dict[str, int]:
    return {
        "item": cfg.item_buckets,
        "category": cfg.category_buckets,
        "action": cfg.action_buckets,
        "user": cfg.user_buckets,
    }


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the autocast dtype (bf16-safe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class IdHash(nn.Module):
    """Hash raw ids into their table's size (`id mod size`), key by key of the KJT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sizes = table_sizes(cfg)
        self.size_of = {f: sizes[t] for t, feats in TABLES.items() for f in feats}

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()  # not `for k in kjt`: a KJT is not iterable over its keys
        sizes = torch.tensor(
            [self.size_of[k] for k in keys], dtype=kjt.values().dtype, device=kjt.values().device
        )
        per_value = torch.repeat_interleave(sizes, torch.tensor(kjt.length_per_key(), device=sizes.device))
        return KeyedJaggedTensor(
            keys=kjt.keys(),
            values=torch.remainder(kjt.values(), per_value),
            lengths=kjt.lengths(),
            stride=kjt.stride(),
        )


def log2_bucket(seconds: torch.Tensor, n: int) -> torch.Tensor:
    """floor(log2(s + 1)) clipped to [0, n - 1]; negative gaps count as 0."""
    s = seconds.clamp(min=0).to(torch.float64)
    return torch.floor(torch.log2(s + 1.0)).long().clamp(max=n - 1)


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

    @property
    def batch_size(self) -> int:
        return int(self.tensors["latest_ts"].shape[0])

    def select(self, index: torch.Tensor) -> UserState:
        return UserState({k: v.index_select(0, index) for k, v in self.tensors.items()})

    def to(self, device) -> UserState:
        return UserState({k: v.to(device) for k, v in self.tensors.items()})


@dataclass
class Candidates:
    """N candidates for each of B users, and each user's request time."""

    item_id: torch.Tensor  # (B, N) raw ids
    category_id: torch.Tensor  # (B, N) raw ids
    ts: torch.Tensor  # (B,) request time, unix seconds


def init_embedding(weight: torch.Tensor) -> None:
    """N(0, 1) for every embedding table, TorchRec's and ours alike, so that the item, category,
    action and time parts of a token start on one scale (TorchRec's default, U(±1/√rows), would
    make a 200k-row item table 400× smaller than the time embedding and drown it)."""
    with torch.no_grad():
        weight.normal_(0.0, 1.0)


class SparseEmbedding(nn.Module):
    """The sparse part: id hashing + one TorchRec EmbeddingCollection (what DMP shards).

    Kept apart from everything dense so TorchRec's train pipeline can trace the model as
    `net(batch, embedding(batch.sparse))`, with IdHash as a parameter-free postproc module."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sizes = table_sizes(cfg)
        self.hash = IdHash(cfg)
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=t,
                    embedding_dim=cfg.emb_dim,
                    num_embeddings=sizes[t],
                    feature_names=list(feats),
                    init_fn=init_embedding,
                )
                for t, feats in TABLES.items()
            ]
        )

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.ec(self.hash(kjt))

    def candidates(self, cands: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, e) item and category embeddings of the candidates, through the same tables."""
        B, N = cands.item_id.shape
        n = B * N
        dev = cands.item_id.device
        values, lengths = [], []
        for k in FEATURE_KEYS:
            if k == "item_id":
                values.append(cands.item_id.reshape(-1))
            elif k == "category_id":
                values.append(cands.category_id.reshape(-1))
            lengths.append(torch.full((n,), int(k in CANDIDATE_KEYS), dtype=torch.long, device=dev))
        kjt = KeyedJaggedTensor(
            keys=list(FEATURE_KEYS), values=torch.cat(values).long(), lengths=torch.cat(lengths)
        )
        emb = self(kjt)
        return emb["item_id"].values().view(B, N, -1), emb["category_id"].values().view(B, N, -1)


class Features(nn.Module):
    """The tokens every model is built from (dense: reads the SparseEmbedding's output)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e, d = cfg.emb_dim, cfg.d_model
        self.time_emb = nn.Embedding(cfg.time_buckets, e)  # history: seconds before the latest event
        self.pos_emb = nn.Embedding(cfg.max_len, d)  # learned absolute position, 0 = most recent
        nn.init.normal_(self.pos_emb.weight, std=0.1)  # a small offset to content, not a rival
        self.seq_proj = nn.Linear(4 * e, d)  # [item, category, action, time] → token
        self.target_proj = nn.Linear(2 * e, d)  # [item, category] → target item token
        self.gap_emb = nn.Embedding(cfg.time_buckets + 1, e)  # last bucket: no history
        self.hour_emb = nn.Embedding(24, e)
        self.context_proj = nn.Linear(2 * e, d)  # [gap since latest event, hour] → context token
        self.user_proj = nn.Linear(e, d)

    def history(
        self,
        emb: dict[str, JaggedTensor],
        hist_ts: torch.Tensor,
        pad_multiple: int = 1,
        max_len: int | None = None,
    ) -> History:
        """Pad the jagged histories into recency order (most recent first), at most max_len long."""
        max_len = max_len or self.cfg.max_len
        lengths = emb["hist_item_id"].lengths().long().clamp(max=max_len)
        full = emb["hist_item_id"].lengths().long()
        offsets = torch.cumsum(full, 0) - full
        longest = int(lengths.max()) if lengths.numel() else 0
        L = max(pad_multiple, -(-longest // pad_multiple) * pad_multiple)
        r = torch.arange(L, device=lengths.device)
        valid = r[None, :] < lengths[:, None]
        sentinel = int(full.sum())
        idx = torch.where(valid, offsets[:, None] + full[:, None] - 1 - r[None, :], sentinel)

        def gather(values: torch.Tensor) -> torch.Tensor:
            pad = values.new_zeros((1,) + values.shape[1:])
            return torch.cat([values, pad])[idx]

        ts = gather(hist_ts.long())
        latest = torch.where(lengths > 0, ts[:, 0], torch.full_like(ts[:, 0], -1))
        t_bucket = log2_bucket(latest[:, None] - ts, self.cfg.time_buckets)
        x = torch.cat([gather(emb[k].values()) for k in HISTORY_KEYS] + [self.time_emb(t_bucket)], dim=-1)
        tokens = (self.seq_proj(x) + self.pos_emb(r)[None]) * valid[..., None]
        return History(tokens=tokens, valid=valid, ts=ts * valid, lengths=lengths, latest_ts=latest)

    def user_token(self, emb: dict[str, JaggedTensor]) -> torch.Tensor:
        return self.user_proj(emb["user_id"].values())  # (B, d)

    def candidate_tokens(
        self, item: torch.Tensor, category: torch.Tensor, request_ts: torch.Tensor, latest_ts: torch.Tensor
    ) -> torch.Tensor:
        """(B, N, 2, d): the target item token and the request-context token of each candidate."""
        target = self.target_proj(torch.cat([item, category], -1))
        gap = torch.where(
            latest_ts >= 0,
            log2_bucket(request_ts - latest_ts, self.cfg.time_buckets),
            torch.full_like(latest_ts, self.cfg.time_buckets),
        )
        hour = torch.remainder(torch.div(request_ts, 3600, rounding_mode="floor"), 24)
        context = self.context_proj(torch.cat([self.gap_emb(gap), self.hour_emb(hour)], -1))  # (B, d)
        return torch.stack([target, context[:, None].expand_as(target)], dim=2)


class Head(nn.Module):
    """logit = MLP([user vector, target token, context token]), each normalised first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norms = nn.ModuleList([RMSNorm(d) for _ in range(3)])
        self.mlp = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, user: torch.Tensor, target: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        user = user[:, None].expand_as(target) if user.dim() < target.dim() else user
        x = torch.cat([n(t) for n, t in zip(self.norms, (user, target, context))], -1)
        return self.mlp(x).squeeze(-1).float()


class FFN(nn.Module):
    def __init__(self, d: int, mult: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, mult * d), nn.Linear(mult * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class DenseNet(nn.Module):
    """Everything after the embedding lookup. Subclasses define `_encode(batch, emb) -> UserState`
    (candidate-independent work) and `_score(state, cand_tokens (B, N, 2, d)) -> logits (B, N)`
    (candidate-dependent work only)."""

    cfg: ModelConfig
    features: Features

    def _encode(self, batch, emb: dict[str, JaggedTensor]) -> UserState:
        raise NotImplementedError

    def _score(self, state: UserState, cand: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_embedded(
        self, state: UserState, item: torch.Tensor, category: torch.Tensor, request_ts: torch.Tensor
    ) -> torch.Tensor:
        return self._score(
            state, self.features.candidate_tokens(item, category, request_ts, state["latest_ts"])
        )

    def forward(self, batch, emb: dict[str, JaggedTensor]) -> torch.Tensor:
        """One candidate per sample (training/eval): logits (B,)."""
        state = self._encode(batch, emb)
        item, cat = emb["item_id"].values()[:, None], emb["category_id"].values()[:, None]
        return self.score_embedded(state, item, cat, batch.ts)[:, 0]


class RecModel(nn.Module):
    """A model = SparseEmbedding (sharded by TorchRec) + a DenseNet (data-parallel).

    The interface of DESIGN.md "Model interface": `encode_user(batch) -> UserState`,
    `score(state, candidates) -> logits (B, N)`, and `forward(batch)` = the two composed for one
    candidate per sample."""

    def __init__(self, net: DenseNet):
        super().__init__()
        self.cfg = net.cfg
        self.embedding = SparseEmbedding(net.cfg)
        self.net = net

    def forward(self, batch) -> torch.Tensor:
        return self.net(batch, self.embedding(batch.sparse))

    def encode_user(self, batch) -> UserState:
        return self.net._encode(batch, self.embedding(batch.sparse))

    def score(self, state: UserState, cands: Candidates) -> torch.Tensor:
        """Logits (B, N) for N candidates per user, from the cached user state."""
        return self.net.score_embedded(state, *self.embedding.candidates(cands), cands.ts)

    def update_user(self, state: UserState, new_events) -> UserState:
        """`state` of users with T events + a batch holding only their n new events (oldest
        first, `hist_total` = T + n) → the state `encode_user` gives for all T + n events.
        Only nets with an append-stable user side have it (LONGER with encoding
        "append_stable", longer/stable.py)."""
        update = getattr(self.net, "_update", None)
        if update is None:
            raise TypeError(
                f"update_user: model {self.cfg.model!r} with encoding {self.cfg.encoding!r} has no "
                "incremental update; encode_user the whole history instead"
            )
        return update(state, new_events, self.embedding(new_events.sparse))

    def forward_reference(self, batch) -> torch.Tensor:
        """The unsplit computation, where the net has one (LONGER): for tests."""
        return self.net.reference(batch, self.embedding(batch.sparse))
