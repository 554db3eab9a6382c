"""LONGER's user side on the append-stable grid (config `encoding = "append_stable"`), so a
cached state can be brought up to date with new events instead of encoded again.

Same layers, tokens roles and masks as longer/model.py, placed on longer/window.py's grid:

    S   history tokens, one per window event: seq_proj([item, category, action,
        time(gap to the previous event of its group)]) + Slot(a mod K) + Index(log2 bucket of a),
        a = the absolute event index. Nothing in a token depends on a later event.
    M   TokenMerge over each grid group (group g = events [gK, (g+1)K)), the last G = max_len/K
        groups; a merged group is unchanged until it drops out of the window.
    Q_s the k most recent events' tokens (query_select "recent"; or k learnable queries).
    A sequence query at index a sees the groups whose newest event is <= a (layer 1) and the
    queries at indices <= a (layers 2..N); G_u, learnable queries and candidates see every
    valid user-side token; candidates never are seen by the user side.

Recency relative to the request enters as an attention bias on candidate→sequence attention
(`time_bias = true`; the paper's time difference to the target, §3.2), computed at scoring
time from the stored group times: a candidate token attending to a sequence key with index a'
and time t' adds, per head h and layer, TimeBias[log2b(request time - t'), h] +
PosBias[log2b(latest index - a'), h]. A merged group counts as its newest event; global keys
get no bias; the user side gets none (its queries are recomputed on every update anyway, and a
pairwise user-side bias cost quality on the synthetic log). Initialised ALiBi-like (Press et
al. 2022, arXiv 2108.12409): -2^-(h+1)·bucket.

UserState (B users; n_g = 2 global tokens (+k learnable queries); n_q = k "recent" queries or 0;
W = max(n_q, K) tail; every shape fixed by the config, so a state has a bounded size):

    k0, v0     (B, H, n_g + G, dh)   layer-1 keys: G_u, then the G merged groups (append-stable)
    k{i}, v{i} (B, H, n_g + n_q, dh) layers 2..N: G_u and the queries' outputs (recomputed)
    valid{i}   (B, n_g + ...) bool   which of those keys are real
    cls        (B, d)                CLS output (the head's user vector)
    latest_ts, total  (B,) int64     time of the latest event (-1: none); T, the user's events
    group_ts   (B, G) int64          each group's newest event time (the request-time bias)
    tail, tail_ts (B, W, d), (B, W)  the W latest events' tokens and times: what update_user
                                     needs to rebuild the partial group and the queries

`state_bytes(cfg)` is the tensor payload per user, the same at every history length (the
config fixes every shape) (the Redis value adds the codec's ~1 KB header). What recency's state does not
have: total (8 B), group_ts (8·G B) and the tail (W·(4d + 8) B in fp32). Figures (fp32):

    config                                   bytes/user   of which group_ts + tail + total
    configs/tiny.toml (d 32, L 64, K 4, k 8)     11,126         128 + 1,088 + 8
    defaults (d 64, L 256, K 4, k 32)            60,532         512 + 8,448 + 8
    bench serve shape, L 1,000 (K 8, k 100)     145,149       1,000 + 26,400 + 8
    bench serve shape, L 2,000                  210,274       2,000 + 26,400 + 8
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .embedding import HISTORY_KEYS
from .interface import UserState
from .model import Longer
from .modules import log2_bucket
from .spec import FeatureSpec, SpecError
from .window import event_grid, gap_in_group, group_ts, n_groups, update_span, window_start


class RelativeBias(nn.Module):
    """Per head: a table over log2 time buckets and one over log2 index-distance buckets."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, H = cfg.time_buckets, cfg.n_heads
        self.time, self.pos = nn.Embedding(n, H), nn.Embedding(n, H)
        alibi = -torch.arange(n, dtype=torch.float32)[:, None] * 2.0 ** -(torch.arange(H) + 1.0)[None]
        with torch.no_grad():
            self.time.weight.copy_(alibi)
            self.pos.weight.copy_(alibi)

    def forward(self, q_idx, q_ts, k_idx, k_ts, k_seq) -> torch.Tensor:
        """Anchors (B, Tq), keys (B, Tk), k_seq (B, Tk) bool → (B, H, Tq, Tk)."""
        n = self.time.num_embeddings
        tb = log2_bucket(q_ts[:, :, None] - k_ts[:, None, :], n)
        pb = log2_bucket(q_idx[:, :, None] - k_idx[:, None, :], n)
        bias = (self.time(tb) + self.pos(pb)) * k_seq[:, None, :, None]
        return bias.permute(0, 3, 1, 2)


def state_bytes(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """Tensor bytes of one user's append-stable UserState (the Redis value adds the codec's header)."""
    cfg = cfg.effective
    d, K = cfg.d_model, cfg.merge_k
    n_g = 2 + (cfg.query_k if cfg.query_select == "learnable" else 0)
    n_q = cfg.query_k if cfg.query_select == "recent" else 0
    G, W = n_groups(cfg.max_len, K), max(n_q, K)
    keys = (n_g + G) + (cfg.n_layers - 1) * (n_g + n_q)
    return (
        2 * keys * d * dtype_bytes  # K and V of every layer
        + keys  # valid masks, one byte each
        + d * dtype_bytes  # cls
        + 2 * 8  # latest_ts, total
        + G * 8  # group_ts
        + W * (d * dtype_bytes + 8)  # tail, tail_ts
    )


class StableLonger(Longer):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec | None = None):
        if spec is not None and spec.history_keys != HISTORY_KEYS:
            raise SpecError(
                "[features] sequence: the append-stable encoding reads the default sequence columns "
                f"only (category_id, action), got {list(spec.sequence)}"
            )
        super().__init__(cfg, spec)
        cfg, d = self.cfg, self.cfg.d_model
        self.features.pos_emb = None  # no position counted from the latest event: see the bias
        self.slot_emb = nn.Embedding(cfg.merge_k, d)
        self.index_emb = nn.Embedding(cfg.time_buckets, d)
        for e in (self.slot_emb, self.index_emb):
            nn.init.normal_(e.weight, std=0.1)
        self.bias = nn.ModuleList([RelativeBias(cfg) for _ in self.blocks]) if cfg.time_bias else None
        self.n_groups = n_groups(cfg.max_len, cfg.merge_k)
        self.n_q = cfg.query_k if cfg.query_select == "recent" else 0
        self.tail = max(self.n_q, cfg.merge_k)

    # --- tokens -----------------------------------------------------------------------------
    def _event_tokens(self, item, cat, act, gap, index, valid) -> torch.Tensor:
        """Embeddings (..., e), gap/index/valid (...) → tokens (..., d), zero where invalid."""
        f, n = self.features, self.cfg.time_buckets
        x = torch.cat([item, cat, act, f.time_emb(log2_bucket(gap, n))], dim=-1)
        slot = torch.remainder(index.clamp(min=0), self.cfg.merge_k)
        return (f.seq_proj(x) + self.slot_emb(slot) + self.index_emb(log2_bucket(index, n))) * valid[
            ..., None
        ]

    def _window(self, total: torch.Tensor):
        """Per user: (start, last group, tail indices (B, W), tail valid) of the window."""
        K, W = self.cfg.merge_k, self.tail
        start = window_start(total, K, self.n_groups)
        last = torch.div(total - 1, K, rounding_mode="floor")
        a = total[:, None] - W + torch.arange(W, device=total.device)
        return start, last, a, a >= start[:, None]

    def _grid_state(self, batch, emb) -> tuple[UserState, torch.Tensor]:
        """The append-stable part of the state, and the merged groups (B, G, d)."""
        K = self.cfg.merge_k
        lengths = emb["hist_item_id"].lengths().long()
        if getattr(batch, "hist_total", None) is None:
            raise ValueError(
                "append_stable encoding: the batch has no hist_total (each user's event count), "
                "which places the events on the grid"
            )
        total = batch.hist_total.long()
        grid = event_grid(total, lengths, K, self.n_groups, full=True)
        ts = grid.gather(batch.hist_ts.long())
        item, cat, act = (grid.gather(emb[k].values()) for k in HISTORY_KEYS)
        tokens = self._event_tokens(item, cat, act, gap_in_group(ts, grid.valid), grid.index, grid.valid)
        B, G, _, d = tokens.shape
        _, last, a, tail_valid = self._window(total)
        col = G - 1 - (last[:, None] - torch.div(a, K, rounding_mode="floor"))
        pos = torch.where(tail_valid, col * K + torch.remainder(a, K), 0)
        flat = tokens.reshape(B, G * K, d)
        tail = flat.gather(1, pos[..., None].expand(-1, -1, d)) * tail_valid[..., None]
        tail_ts = ts.reshape(B, G * K).gather(1, pos) * tail_valid
        state = UserState(
            {"total": total, "group_ts": group_ts(ts, grid.valid), "tail": tail, "tail_ts": tail_ts}
        )
        return state, self.merge(flat)

    # --- the layers over the user side (and, for the reference, the candidates) ---------------
    def _attrs(self, state: UserState, n_glob: int):
        """Per user: anchors of the user-side queries and attributes of the layer-1 keys."""
        total, dev = state["total"], state["total"].device
        B, K, G = total.shape[0], self.cfg.merge_k, self.n_groups
        start, last, a, tail_valid = self._window(total)
        latest = state["latest_ts"]
        r = torch.arange(self.n_q, device=dev)
        q_valid = tail_valid[:, self.tail - 1 - r]
        q_idx = torch.where(q_valid, a[:, self.tail - 1 - r], -1)
        q_ts = state["tail_ts"][:, self.tail - 1 - r]
        g = last[:, None] - (G - 1) + torch.arange(G, device=dev)
        g_valid = g >= torch.div(start, K, rounding_mode="floor")[:, None]
        g_idx = torch.where(g_valid, torch.minimum(g * K + K - 1, total[:, None] - 1), -1)
        ones = torch.ones(B, n_glob, dtype=torch.bool, device=dev)
        glob_idx = (total - 1)[:, None].expand(-1, n_glob)
        return {
            "q": (torch.cat([glob_idx, q_idx], 1), torch.cat([latest[:, None].expand(-1, n_glob), q_ts], 1)),
            "q_valid": torch.cat([ones, q_valid], 1),
            "k0": (torch.cat([glob_idx * 0 - 1, g_idx], 1), torch.cat([glob_idx * 0, state["group_ts"]], 1)),
            "k0_valid": torch.cat([ones, g_valid], 1),
            "n_glob": n_glob,
        }

    def _user_mask(self, n_glob, q_idx, k_idx, k_valid, first_layer: bool) -> torch.Tensor:
        """(B, Tq, Tk) bool; q_idx/k_idx (B, T) absolute indices, the first n_glob are global."""
        Tq, Tk, dev = q_idx.shape[1], k_idx.shape[1], q_idx.device
        q_glob = torch.arange(Tq, device=dev) < n_glob
        k_glob = torch.arange(Tk, device=dev) < n_glob
        see = ~k_glob[None, None] & (k_idx[:, None, :] <= q_idx[:, :, None]) & (q_idx[:, :, None] >= 0)
        if first_layer:
            see = see | k_glob[None, None]
        mask = k_valid[:, None, :] & (q_glob[None, :, None] | see)
        if not first_layer:
            mask = mask | torch.eye(Tq, Tk, dtype=torch.bool, device=dev)[None]
        return mask

    def _cand_bias(self, i: int, state: UserState, request_ts, k_attr, k_seq) -> torch.Tensor:
        """(B, H, 1, Tk): layer i's bias from a candidate token (anchor: the latest event's
        index, the request time) to keys with attributes k_attr ((B, Tk) index, time)."""
        anchor = ((state["total"] - 1)[:, None], request_ts[:, None])
        return self.bias[i](*anchor, *k_attr, k_seq)

    def _layers(self, state, glob, group_k, group_v, cand=None, request_ts=None):
        """Run every layer; fills the state's per-layer K/V, cls and returns the final tokens.
        With `cand` (B, T, d) and `request_ts` (B,), the candidate tokens join every layer (the
        unsplit reference): they see every valid user key and their own copies. Without
        candidates the last layer runs the CLS query only (nothing reads the other queries'
        outputs of the last layer: the state keeps cls and the K/V that enter each layer), so
        "the final tokens" are then CLS's alone."""
        B, n_glob = glob.shape[:2]
        at = self._attrs(state, n_glob)
        r = torch.arange(self.n_q, device=glob.device)
        x = torch.cat([glob, state["tail"][:, self.tail - 1 - r]], 1)
        q, q_valid = at["q"], at["q_valid"]
        k_attr, k_valid = at["k0"], at["k0_valid"]
        Tu = x.shape[1]
        if cand is not None:
            x = torch.cat([x, cand], 1)
        for i, blk in enumerate(self.blocks):
            if i == 0:
                kg, vg = blk.kv(glob)
                k, v = torch.cat([kg, group_k], 2), torch.cat([vg, group_v], 2)
            else:
                k, v = blk.kv(x[:, :Tu])
            state[f"k{i}"], state[f"v{i}"], state[f"valid{i}"] = k, v, k_valid
            k_seq = (torch.arange(k.shape[2], device=x.device) >= n_glob)[None].expand(B, -1)
            mask = self._user_mask(n_glob, q[0], k_attr[0], k_valid, first_layer=i == 0)
            if cand is not None:
                k, v, mask, k_attr, k_seq = self._join(blk, x[:, Tu:], k, v, mask, k_attr, k_valid, k_seq)
                if self.bias is not None:  # the candidate rows get the request-relative bias
                    bias = self._cand_bias(i, state, request_ts, k_attr, k_seq)
                    bias = torch.cat(
                        [
                            bias.new_zeros(B, bias.shape[1], Tu, bias.shape[3]),
                            bias.expand(-1, -1, x.shape[1] - Tu, -1),
                        ],
                        2,
                    )
                    mask = bias.masked_fill(~mask[:, None], float("-inf"))
            if cand is None and i == len(self.blocks) - 1:
                x, mask = x[:, :1], mask[:, :1]  # the last layer: only CLS's output is kept (the state's cls)
            x = self._run(i, x, k, v, mask)
            k_attr, k_valid = q, q_valid  # layers 2..N: keys = the queries
        state["cls"] = x[:, 0]
        return x

    def _join(self, blk, xc, k, v, mask, k_attr, k_valid, k_seq):
        """Add the candidate tokens to one layer's keys and mask (the unsplit reference)."""
        B, Tu, Tc = mask.shape[0], mask.shape[1], xc.shape[1]
        kc, vc = blk.kv(xc)
        own = self._copy_mask(1, xc.device)[None].expand(B, -1, -1)
        top = torch.cat([mask, mask.new_zeros(B, Tu, Tc)], 2)
        bottom = torch.cat([k_valid[:, None, :].expand(-1, Tc, -1), own], 2)
        zeros = k_attr[0].new_zeros(B, Tc)
        return (
            torch.cat([k, kc], 2),
            torch.cat([v, vc], 2),
            torch.cat([top, bottom], 1),
            tuple(torch.cat([t, zeros], 1) for t in k_attr),
            torch.cat([k_seq, k_seq.new_zeros(B, Tc)], 1),
        )

    def _latest(self, state: UserState) -> None:
        state["latest_ts"] = torch.where(state["total"] > 0, state["tail_ts"][:, -1], -1)

    def encode(self, batch, emb) -> UserState:
        state, merged = self._grid_state(batch, emb)
        self._latest(state)
        gk, gv = self.blocks[0].kv(merged)
        self._layers(state, self.global_tokens(emb, emb["user_id"].values().shape[0]), gk, gv)
        return state

    # --- candidate side -----------------------------------------------------------------------
    def score_tokens(self, state, cand, request_ts) -> torch.Tensor:
        return self.score(state, cand, request_ts)

    def _cand_mask(self, state: UserState, i: int, rows, own, request_ts) -> torch.Tensor:
        mask = super()._cand_mask(state, i, rows, own, request_ts)
        if self.bias is None:
            return mask
        user = self._state_bias(state, i, request_ts)[rows]  # (B·chunks, H, 1, Tk)
        Tq = own.shape[0]
        bias = torch.cat([user.expand(-1, -1, Tq, -1), user.new_zeros(len(rows), user.shape[1], Tq, Tq)], 3)
        return bias.masked_fill(~mask[:, None], float("-inf"))

    def _cand_user_bias(self, state: UserState, i: int, request_ts) -> torch.Tensor:
        """(B, H, 1, Tu): the valid-key bias plus the request-relative time/position bias."""
        valid = super()._cand_user_bias(state, i, request_ts)
        if self.bias is None:
            return valid
        return self._state_bias(state, i, request_ts) + valid

    def _state_bias(self, state: UserState, i: int, request_ts) -> torch.Tensor:
        """(B, H, 1, Tu): `_cand_bias` on layer i's cached user keys."""
        n_glob = state["k0"].shape[2] - self.n_groups
        at = self._attrs(state, n_glob)
        k_attr = at["k0"] if i == 0 else at["q"]
        B, Tk = k_attr[0].shape
        k_seq = (torch.arange(Tk, device=request_ts.device) >= n_glob)[None].expand(B, -1)
        return self._cand_bias(i, state, request_ts, k_attr, k_seq)

    def reference(self, batch, emb) -> torch.Tensor:
        state, merged = self._grid_state(batch, emb)
        self._latest(state)
        gk, gv = self.blocks[0].kv(merged)
        cand = self.features.candidate_tokens(
            emb, self.features.sample_dense(batch), batch.ts, state["latest_ts"]
        )
        c = self._copies(cand)[:, 0]
        x = self._layers(
            state,
            self.global_tokens(emb, emb["user_id"].values().shape[0]),
            gk,
            gv,
            cand=c,
            request_ts=batch.ts,
        )
        return self._head(x[:, 0], x[:, None, -c.shape[1] :])[:, 0]

    # --- incremental update ---------------------------------------------------------------------
    def update(self, state: UserState, batch, emb) -> UserState:
        """RecModel.update_user's work: per user, only the new events' tokens, the groups they
        touch and the user-side queries are computed."""
        lengths = emb["hist_item_id"].lengths().long()
        B = int(state["total"].shape[0])
        if lengths.shape[0] != B:
            raise ValueError(f"update_user: the state holds {B} users, the new events {lengths.shape[0]}")
        offsets = (torch.cumsum(lengths, 0) - lengths).tolist()
        glob = self.global_tokens(emb, emb["user_id"].values().shape[0])
        parts = []
        for b in range(B):
            sl = slice(offsets[b], offsets[b] + int(lengths[b]))
            new = [emb[k].values()[sl] for k in HISTORY_KEYS]
            total = int(batch.hist_total[b])
            parts.append(
                self._update_one(
                    UserState({k: t[b : b + 1] for k, t in state.tensors.items()}),
                    glob[b : b + 1],
                    new,
                    batch.hist_ts[sl],
                    total,
                    b,
                )
            )
        return UserState({k: torch.cat([p[k] for p in parts]) for k in parts[0].tensors})

    def _update_one(self, s: UserState, glob, new, ts, total: int, b: int) -> UserState:
        K, G, W, n = self.cfg.merge_k, self.n_groups, self.tail, len(ts)
        T = int(s["total"][0])
        if T + n != total:
            raise ValueError(
                f"update_user: user {b}: the state holds {T} events and {n} new ones came, "
                f"but the batch's hist_total is {total} (missed or repeated events: encode_user again)"
            )
        if n == 0:
            return s
        span = update_span(T, n, K)
        ts = ts.long()
        idx = torch.arange(T, T + n)
        prev = torch.cat([s["tail_ts"][0, -1:], ts[:-1]])
        gap = torch.where(torch.remainder(idx, K) == 0, 0, ts - prev)
        tok = self._event_tokens(*new, gap, idx, torch.ones(n, dtype=torch.bool))
        old = T - span.first_event  # events of the partial group that are already in the state
        span_tok = torch.cat([s["tail"][0, W - old :], tok])
        span_ts = torch.cat([s["tail_ts"][0, W - old :], ts])
        pad = span.n_groups * K - len(span_tok)
        span_tok = torch.cat([span_tok, span_tok.new_zeros(pad, span_tok.shape[1])])
        valid = torch.arange(span.n_groups * K) < len(span_ts)
        span_ts = torch.cat([span_ts, span_ts.new_zeros(pad)])
        merged = self.merge(span_tok[None])  # (1, n_groups, d)
        gk, gv = self.blocks[0].kv(merged)
        n_glob = glob.shape[1]
        keep = G - (1 if old else 0)
        out = UserState({"total": s["total"] + n})
        out["group_ts"] = torch.cat(
            [s["group_ts"][:, :keep], group_ts(span_ts.view(1, -1, K), valid.view(1, -1, K))], 1
        )[:, -G:]
        tail_valid = self._window(out["total"])[3]
        out["tail"] = torch.cat([s["tail"], tok[None]], 1)[:, -W:] * tail_valid[..., None]
        out["tail_ts"] = torch.cat([s["tail_ts"], ts[None]], 1)[:, -W:] * tail_valid
        self._latest(out)
        group_k = torch.cat([s["k0"][:, :, n_glob : n_glob + keep], gk], 2)[:, :, -G:]
        group_v = torch.cat([s["v0"][:, :, n_glob : n_glob + keep], gv], 2)[:, :, -G:]
        self._layers(out, glob, group_k, group_v)
        return out
