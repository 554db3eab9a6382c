"""The Tokenizer: embedded ids → the tokens every model is built from (dense; it reads the
SparseEmbedding's output, never raw ids).

    history tokens    one per event: [item, category, action, time-before-latest] → d, plus a
                      learned position (0 = most recent); padded in recency order (`History`)
    user token        the user id's embedding → d
    candidate tokens  per candidate: the target item token [item, category] → d and the
                      request-context token [gap since the latest event, hour of day] → d

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
from .embedding import HISTORY_KEYS
from .interface import History
from .modules import log2_bucket


class Tokenizer(nn.Module):
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
