"""Sequence baselines in the same framework (same embeddings, tokens and head as LONGER), so
the paper's Table 1 (arXiv 2505.04421) can be reproduced on public data. Each is a `DenseNet`
(longer/interface.py): `encode` the user side once, `score` candidates against it.
`transformer` is not here: it is `Longer` with no merge and every token a query
(`ModelConfig.effective`).

    sumpool        mean of the history tokens
    din            DIN target attention over the history (activation unit on [h, t, h−t, h⊙t])
    din_recent50   DIN over the most recent `din_recent` events only
    hstu           HSTU blocks (SiLU pointwise attention, gating U, relative time/position bias)
                   over the history, with the candidate's tokens appended
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .interface import DenseNet, History, UserState
from .modules import Head, RMSNorm, log2_bucket
from .spec import FeatureSpec
from .tokens import Tokenizer


class Base(DenseNet):
    """The paper's Base (Table 1): the DNN head over the non-sequence features only — the user
    token (user id and profile columns), the target item token (candidate and dense columns)
    and the request-context token (context columns, hour, and the gap since the user's latest
    event: the one number it reads from the history). Every other arch is this plus a sequence
    module that turns the history into the user vector."""

    uses_history = False  # a sequence arch (a subclass) reads the history tokens

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec | None = None):
        super().__init__()
        self.cfg = cfg
        self.features = Tokenizer(cfg, spec, history=self.uses_history)
        self.head = Head(cfg)

    def encode(self, batch, emb) -> UserState:
        lengths = emb["hist_item_id"].lengths().long()
        last = (torch.cumsum(lengths, 0) - 1).clamp(min=0)  # each history's latest event: its last
        ts = torch.cat([batch.hist_ts.long(), lengths.new_full((1,), -1)])  # + one for all-empty
        latest = torch.where(lengths > 0, ts[last], -1)
        return UserState({"latest_ts": latest, "user": self.features.user_token(emb)})

    def score(self, state, cand):
        return self.head(state["user"], cand[:, :, 0], cand[:, :, 1])


class SumPool(Base):
    """Base + the mean of the history tokens added to the user vector."""

    uses_history = True

    def encode(self, batch, emb) -> UserState:
        hist = self.features.history(emb, batch)
        pooled = hist.tokens.sum(1) / hist.lengths.clamp(min=1)[:, None]
        return UserState({"latest_ts": hist.latest_ts, "user": pooled + self.features.user_token(emb)})


DIN_HIDDEN = 32  # width of DIN's activation unit


class DIN(DenseNet):
    """Target attention. The activation unit's first layer W·[h, t, h−t, h⊙t] is computed as
    A·h + B·t + W₄·(h⊙t), so nothing of size (candidates × L × 4d) is ever materialised."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec | None = None, hidden: int = DIN_HIDDEN):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.features = Tokenizer(cfg, spec)
        self.w_h = nn.Linear(d, hidden)  # (W1 + W3) h, with the bias
        self.w_t = nn.Linear(d, hidden, bias=False)  # (W2 − W3) t
        self.w_ht = nn.Parameter(torch.randn(d, hidden) / math.sqrt(d))  # W4 (h ⊙ t)
        self.out = nn.Linear(hidden, 1)
        self.head = Head(cfg)

    def encode(self, batch, emb) -> UserState:
        hist = self.features.history(emb, batch, max_len=self.cfg.history_window)
        return UserState(
            {
                "latest_ts": hist.latest_ts,
                "user": self.features.user_token(emb),
                "hist": hist.tokens,
                "valid": hist.valid,
                "hist_h": self.w_h(hist.tokens),
            }
        )

    def score(self, state, cand):
        h, valid = state["hist"], state["valid"]
        t = cand[:, :, 0]  # (B, N, d)
        z = (
            state["hist_h"][:, None]
            + self.w_t(t)[:, :, None]
            + torch.einsum("bld,bnd,dk->bnlk", h, t, self.w_ht)
        )
        a = self.out(torch.sigmoid(z)).squeeze(-1)  # (B, N, L)
        a = a.masked_fill(~valid[:, None], torch.finfo(a.dtype).min)
        w = torch.softmax(a.float(), dim=-1).to(h.dtype) * valid[:, None]  # empty history → zero interest
        interest = torch.einsum("bnl,bld->bnd", w, h)
        return self.head(interest + state["user"][:, None], t, cand[:, :, 1])


class HSTULayer(nn.Module):
    """Y = f2(Norm(A·V) ⊙ U), A = SiLU(QKᵀ/√d_h + rab) / n over visible keys; X+ = X + Y."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.dh = d // self.h
        self.norm_in = RMSNorm(d)
        self.f1 = nn.Linear(d, 4 * d)
        self.f2 = nn.Linear(d, d)
        self.norm_av = RMSNorm(d)
        self.time_bias = nn.Embedding(cfg.time_buckets, self.h)  # log2 |Δt| buckets
        self.pos_bias = nn.Embedding(cfg.time_buckets, self.h)  # log2 |Δposition| buckets
        self.n_buckets = cfg.time_buckets

    def project(self, x):
        u, v, q, k = F.silu(self.f1(self.norm_in(x))).chunk(4, dim=-1)
        split = lambda t: t.unflatten(-1, (self.h, self.dh)).transpose(1, 2)  # noqa: E731 (B, H, T, dh)
        return u, split(v), split(q), split(k)

    def rab(self, tq, tk, rq, rk):
        """Relative bias (B, H, Tq, Tk) from time and position differences."""
        bt = log2_bucket((tq[:, :, None] - tk[:, None, :]).abs(), self.n_buckets)
        bp = log2_bucket((rq[:, :, None] - rk[:, None, :]).abs(), self.n_buckets)
        return (self.time_bias(bt) + self.pos_bias(bp)).permute(0, 3, 1, 2)

    def attend(self, x, u, q, k, v, bias, mask):
        a = F.silu(q @ k.transpose(-1, -2) / math.sqrt(self.dh) + bias) * mask[:, None]
        a = a / mask.sum(-1).clamp(min=1)[:, None, :, None]
        av = (a @ v).transpose(1, 2).flatten(2)
        return x + self.f2(self.norm_av(av) * u)


class HSTU(DenseNet):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec | None = None):
        super().__init__()
        self.cfg = cfg
        self.features = Tokenizer(cfg, spec)
        self.layers = nn.ModuleList([HSTULayer(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model)
        self.head = Head(cfg)

    def encode(self, batch, emb) -> UserState:
        hist: History = self.features.history(emb, batch)
        B, L, _ = hist.tokens.shape
        r = torch.arange(L, device=hist.tokens.device).expand(B, L)
        mask = hist.valid[:, None, :] & (r[:, None, :] >= r[:, :, None])  # key at or before the query
        mask = mask | torch.eye(L, dtype=torch.bool, device=r.device)[None]
        state = UserState({"latest_ts": hist.latest_ts, "ts": hist.ts, "valid": hist.valid})
        x = hist.tokens
        for i, layer in enumerate(self.layers):
            u, v, q, k = layer.project(x)
            x = layer.attend(x, u, q, k, v, layer.rab(hist.ts, hist.ts, r, r), mask)
            state[f"k{i}"], state[f"v{i}"] = k, v
        state["user"] = self.final_norm(x[:, 0]) * hist.valid[:, :1] + self.features.user_token(emb)
        return state

    def score(self, state, cand):
        B, N, T, d = cand.shape
        x = cand.flatten(1, 2)  # (B, N·T, d); shapes from tensors, not Python arithmetic: traceable
        hist_ts, valid = state["ts"], state["valid"]
        # Candidate tokens sit just after the latest event (position -1, time = latest event); the
        # request's own time reaches them through the context token.
        tq = state["latest_ts"][:, None].expand_as(x[..., 0])
        rq = torch.full_like(tq, -1)
        rk = torch.ones_like(hist_ts).cumsum(1) - 1  # 0..L-1
        which = torch.ones_like(x[0, :, 0], dtype=torch.long).cumsum(0).sub(1).div(T, rounding_mode="floor")
        own = which[:, None] == which[None, :]  # (N·T, N·T): each candidate sees its own T tokens
        mask = torch.cat([valid[:, None, :].expand(-1, own.shape[0], -1), own[None].expand(B, -1, -1)], dim=2)
        for i, layer in enumerate(self.layers):
            u, v, q, k = layer.project(x)
            keys = torch.cat([state[f"k{i}"], k], 2)
            vals = torch.cat([state[f"v{i}"], v], 2)
            bias_u = layer.rab(tq, hist_ts, rq, rk)
            bias_c = layer.rab(tq, tq, rq, rq)
            x = layer.attend(x, u, q, keys, vals, torch.cat([bias_u, bias_c], -1), mask)
        out = self.final_norm(x).reshape(B, N, T, d)
        return self.head(state["user"], out[:, :, 0], out[:, :, 1])
