"""The Tokenizer: embedded ids → the tokens every model is built from (dense; it reads the
SparseEmbedding's output, never raw ids). Which columns feed which token is the `FeatureSpec`.

    history tokens    one per event: [item, *sequence columns, time-before-latest] → d, plus a
                      learned position (0 = most recent); padded in recency order (`History`)
    user token        [user id, *user columns] → d (user side: cached in the UserState)
    candidate tokens  per candidate: the target item token [item, *candidate columns, *dense] → d
                      and the request-context token [gap since the latest event, hour of day,
                      *context columns] → d

With the default spec (sequence = category_id, action; candidate = category_id; nothing else)
these are the tokens, and the parameters, of the model before the spec existed.

List (multi-valued) columns are mean-pooled: per event in a history (the batch's
`event_lengths`), per sample elsewhere; an empty list pools to zeros. Dense columns arrive
normalised (train-split mean and std, by the loader or the server).

Time enters in two places, split so the user side can be cached (DESIGN.md "Model interface"):
a history token carries log2-bucketed seconds *before the user's latest event* (user-side
only); the candidate-side context token carries the gap from the latest event to the request
and the request's hour of day.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from .config import ModelConfig
from .interface import History
from .modules import log2_bucket
from .spec import HIST_PREFIX, FeatureSpec


def mean_pool(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(Σ lengths, e) values → (len(lengths), e) per-segment means; an empty segment → zeros."""
    lengths = lengths.long()
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    out = values.new_zeros(len(lengths), values.shape[-1]).index_add_(0, seg, values)
    return out / lengths.clamp(min=1)[:, None].to(values.dtype)


class Tokenizer(nn.Module):
    """The tokens every model is built from (dense: reads the SparseEmbedding's output)."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec | None = None, history: bool = True):
        """`history=False` (the Base): no history tokens, so no parameters for them."""
        super().__init__()
        self.cfg = cfg
        self.spec = spec = spec or FeatureSpec()
        e, d = cfg.emb_dim, cfg.d_model
        if history:
            self.time_emb = nn.Embedding(cfg.time_buckets, e)  # history: seconds before the latest event
            self.pos_emb = nn.Embedding(cfg.max_len, d)  # learned absolute position, 0 = most recent
            nn.init.normal_(self.pos_emb.weight, std=0.1)  # a small offset to content, not a rival
            self.seq_proj = nn.Linear((len(spec.history_keys) + 1) * e, d)  # [item, *sequence, time] → token
        # [item, *candidate columns, *dense] → target item token
        self.target_proj = nn.Linear(len(spec.candidate_keys) * e + len(spec.dense_keys), d)
        self.gap_emb = nn.Embedding(cfg.time_buckets + 1, e)  # last bucket: no history
        self.hour_emb = nn.Embedding(24, e)
        # [gap since latest event, hour, *context columns] → context token
        self.context_proj = nn.Linear((2 + len(spec.context_keys)) * e, d)
        self.user_proj = nn.Linear(len(spec.user_keys) * e, d)  # [user id, *user columns] → user token

    def pooled(self, emb: dict[str, JaggedTensor], key: str) -> torch.Tensor:
        """One (rows, e) vector per KJT row of a non-history key (list columns mean-pooled)."""
        jt = emb[key]
        return mean_pool(jt.values(), jt.lengths()) if self.spec.is_list(key) else jt.values()

    def history(
        self, emb: dict[str, JaggedTensor], batch, pad_multiple: int = 1, max_len: int | None = None
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

        ts = gather(batch.hist_ts.long())
        latest = torch.where(lengths > 0, ts[:, 0], torch.full_like(ts[:, 0], -1))
        t_bucket = log2_bucket(latest[:, None] - ts, self.cfg.time_buckets)
        fields = [gather(self._event_values(emb, k, batch)) for k in self.spec.history_keys]
        x = torch.cat(fields + [self.time_emb(t_bucket)], dim=-1)
        tokens = (self.seq_proj(x) + self.pos_emb(r)[None]) * valid[..., None]
        return History(tokens=tokens, valid=valid, ts=ts * valid, lengths=lengths, latest_ts=latest)

    def _event_values(self, emb: dict[str, JaggedTensor], key: str, batch) -> torch.Tensor:
        """(Σ events, e): one vector per history event (a list column pooled per event)."""
        if not self.spec.is_list(key[len(HIST_PREFIX) :]):
            return emb[key].values()
        return mean_pool(emb[key].values(), batch.event_lengths[key])

    def user_token(self, emb: dict[str, JaggedTensor]) -> torch.Tensor:
        """(B, d): the user id and the user's profile columns."""
        parts = [self.pooled(emb, k) for k in self.spec.user_keys]
        return self.user_proj(parts[0] if len(parts) == 1 else torch.cat(parts, -1))

    def sample_dense(self, batch) -> dict[str, torch.Tensor]:
        """A training batch's dense columns as (B, 1): its one candidate's."""
        return {k: batch.dense[k][:, None] for k in self.spec.dense_keys}

    def candidate_tokens(
        self,
        emb: dict[str, JaggedTensor],
        dense: dict[str, torch.Tensor],
        request_ts: torch.Tensor,
        latest_ts: torch.Tensor,
    ) -> torch.Tensor:
        """(B, N, 2, d): the target item token and the request-context token of each candidate.

        emb: B·N rows per candidate and context key (a context key's N rows per user are equal);
        dense: (B, N) per dense column; request_ts, latest_ts: (B,)."""
        B = request_ts.shape[0]
        cand = [self.pooled(emb, k).view(B, -1, self.cfg.emb_dim) for k in self.spec.candidate_keys]
        N = cand[0].shape[1]
        dense_in = [dense[k].to(cand[0].dtype).view(B, N, 1) for k in self.spec.dense_keys]
        target = self.target_proj(torch.cat(cand + dense_in, -1))
        gap = torch.where(
            latest_ts >= 0,
            log2_bucket(request_ts - latest_ts, self.cfg.time_buckets),
            torch.full_like(latest_ts, self.cfg.time_buckets),
        )
        hour = torch.remainder(torch.div(request_ts, 3600, rounding_mode="floor"), 24)
        ctx = [self.pooled(emb, k).view(B, N, -1)[:, 0] for k in self.spec.context_keys]
        context = self.context_proj(torch.cat([self.gap_emb(gap), self.hour_emb(hour), *ctx], -1))  # (B, d)
        return torch.stack([target, context[:, None].expand_as(target)], dim=2)
