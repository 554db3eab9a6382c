"""LONGER (arXiv 2505.04421) with HybridNorm blocks and PHD candidate copies.

Tokens (per user b; DESIGN.md "Model interface"):

    user side       G_u = [CLS, user token]                            global, see everything user-side
                    S   = history tokens in recency order (r = 0 is the latest event)
                    M   = TokenMerge(S): groups of K adjacent tokens → one token (§3.3)
                    Q_s = the k query tokens: the k most recent of S (or k uniform, or k learnable)
    candidate side  C   = [target item, request context] × R PHD copies

Layer 1, CrossCausalAttention (§3.4): queries [G_u; Q_s; C], keys/values [G_u; M; C].
Layers 2..N, SelfCausalAttention (§3.4): queries = keys = [G_u; Q_s; C]. Masks:
  * a sequence query at recency r sees only history at or before its own event: merged groups
    whose newest event has recency >= r (a group holding a later event is hidden), and in
    self layers the queries with recency >= r; in layer 1 it also sees G_u (whose layer-1 keys
    hold no sequence information); never a candidate token;
  * G_u and learnable queries see every valid user-side token, never a candidate token;
  * candidate tokens see every valid user-side token, and copies <= j of their own
    candidate's tokens (PHD: copy j refines copy j-1; only the last copy feeds the head).
So no user-side value depends on a candidate: `encode_user` computes it once into a
`UserState` (per layer user-side K/V + the CLS output) and `score` runs only the candidate
tokens against it. `forward_reference` runs the same layers over all tokens jointly with one
mask per layer: the tests check that the two agree.

Candidate attention at inference (no autograd, CPU; `Longer.score`): each layer's candidate
queries attend to the cached user K/V with unmasked-by-pattern SDPA (one additive (B, ·, 1, Tu)
bias: -inf on invalid keys, plus the request-relative time/position bias of the append-stable
encoding) and, separately, to their own candidate's keys (copies <= j; a (N, T, T) product);
the two softmaxes are merged exactly by their log-sum-exps (`lse_merge`). The query, key and
value projections of the candidate tokens are one fused matmul. No mask of N·T × (Tu + N·T) is
ever built. Training (autograd on) keeps the masked path over chunks of `cand_chunk`
candidates: the two agree within float rounding (tests/test_model.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .interface import DenseNet, History, UserState
from .modules import FFN, Head, RMSNorm
from .spec import FeatureSpec
from .tokens import Tokenizer


class Attention(nn.Module):
    """Multi-head attention through SDPA, with HybridNorm's optional per-head QKV RMSNorm."""

    def __init__(self, d: int, heads: int, qkv_norm: bool):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q_proj, self.kv_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.qkv_norm = nn.ModuleList([RMSNorm(self.dh) for _ in range(3)]) if qkv_norm else None

    def _heads(self, x: torch.Tensor, i: int) -> torch.Tensor:
        x = x.unflatten(-1, (self.h, self.dh))
        if self.qkv_norm is not None:
            x = self.qkv_norm[i](x)
        return x.transpose(1, 2)  # (B, H, T, dh)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.q_proj(x), 0)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return self._heads(k, 1), self._heads(v, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the same tokens in one fused projection (inference: no autograd)."""
        w = torch.cat([self.q_proj.weight, self.kv_proj.weight])
        b = torch.cat([self.q_proj.bias, self.kv_proj.bias])
        q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
        return self._heads(q, 0), self._heads(k, 1), self._heads(v, 2)

    def candidate_attention(
        self, q, kc, vc, k_user, v_user, user_bias: torch.Tensor, own: torch.Tensor
    ) -> torch.Tensor:
        """Candidate queries q (B, H, N·T, dh) against the user keys (B, H, Tu, dh) with the
        additive `user_bias` (B, 1 or H, 1, Tu) and against their own candidate's keys kc/vc
        (B, H, N·T, dh) under `own` (T, T) bool, as one softmax over both: the two partial
        attentions merged by their log-sum-exps. → (B, N·T, d) after o_proj."""
        B, H, NT, dh = q.shape
        T = own.shape[0]
        out_u, lse_u = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k_user.to(q.dtype), v_user.to(q.dtype), attn_mask=user_bias.to(q.dtype)
        )
        qs = q.reshape(B, H, NT // T, T, dh)
        scores = qs @ kc.reshape(B, H, NT // T, T, dh).transpose(-1, -2) * dh**-0.5
        scores = scores.masked_fill(~own, float("-inf"))
        lse_c = scores.logsumexp(-1)  # (B, H, N, T)
        out_c = torch.softmax(scores, -1) @ vc.reshape(B, H, NT // T, T, dh)
        out = lse_merge(out_u, lse_u, out_c.reshape(B, H, NT, dh), lse_c.reshape(B, H, NT))
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def forward(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None and mask.dim() == 3:  # a float (B, H, Tq, Tk) mask also adds a bias
            mask = mask[:, None]  # (B, 1, Tq, Tk): one mask for every head
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).flatten(2))


def lse_merge(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """One softmax attention over the keys of a and b from the two computed apart: outputs
    (..., T, dh) weighted by exp(lse - max) of their log-sum-exps (..., T)."""
    m = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - m)[..., None], torch.exp(lse_b - m)[..., None]
    return (out_a * wa + out_b * wb) / (wa + wb)


class Block(nn.Module):
    """One attention + FFN block. `mode` places the norms:

    pre          Y = X + Attn(N1(X));        X+ = Y + FFN(N2(Y))
    post         Y = N1(X + Attn(X));        X+ = N2(Y + FFN(Y))
    hybrid       Y = X + Attn_qkvnorm(X);    X+ = FFN(N2(Y)) + N2(Y)     (HybridNorm)
    hybrid_first Y = X + Attn_qkvnorm(N1(X)); X+ = Y + FFN(N2(Y))        (HybridNorm*'s first block)
    """

    def __init__(self, cfg: ModelConfig, mode: str):
        super().__init__()
        d = cfg.d_model
        self.mode = mode
        self.attn = Attention(d, cfg.n_heads, qkv_norm=mode in ("hybrid", "hybrid_first"))
        self.norm1 = RMSNorm(d) if mode != "hybrid" else None
        self.norm2 = RMSNorm(d)
        self.ffn = FFN(d, cfg.ffn_mult)

    def _in(self, x):
        return self.norm1(x) if self.mode in ("pre", "hybrid_first") else x

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.kv(self._in(x))

    def forward(self, x, k, v, mask) -> torch.Tensor:
        """x (B, Tq, d) queries; k, v (B, H, Tk, dh) from `kv`; mask (B, Tq, Tk) bool or None."""
        return self._out(x + self.attn(self.attn.q(self._in(x)), k, v, mask))

    def candidates(self, x, k_user, v_user, user_bias, own) -> torch.Tensor:
        """The block on candidate tokens x (B, N·T, d) at inference: `Attention.candidate_attention`
        over the cached user K/V and their own keys (`own` (T, T): copy visibility)."""
        q, kc, vc = self.attn.qkv(self._in(x))
        return self._out(x + self.attn.candidate_attention(q, kc, vc, k_user, v_user, user_bias, own))

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """The rest of the block after the attention's residual y = x + Attn(...)."""
        if self.mode == "post":
            y = self.norm1(y)
            return self.norm2(y + self.ffn(y))
        if self.mode == "hybrid":
            z = self.norm2(y)
            return z + self.ffn(z)
        return y + self.ffn(self.norm2(y))


class CrossCausalAttention(Block):
    """LONGER's first layer (§3.4): the queries are the global tokens and the k query tokens
    (by default the k most recent events), the keys/values the global tokens and the whole
    merged sequence, so the cost is k·(L/K) instead of L². A sequence query also sees the
    global tokens, whose layer-1 keys carry no sequence information."""

    def user_mask(self, q_attr: tuple, k_attr: tuple) -> torch.Tensor:
        return user_mask(q_attr, k_attr, first_layer=True)


class SelfCausalAttention(Block):
    """LONGER's later layers (§3.4): causal self-attention among the layer-1 queries only
    (queries = keys = [global tokens; query tokens]); every query also sees itself."""

    def user_mask(self, q_attr: tuple, k_attr: tuple) -> torch.Tensor:
        return user_mask(q_attr, k_attr, first_layer=False)


def attention_layers(cfg: ModelConfig) -> list[Block]:
    """Layer 1 CrossCausalAttention, layers 2..N SelfCausalAttention, norms placed by cfg.norm."""
    if cfg.norm == "hybrid_star":
        modes = ["hybrid_first"] + ["hybrid"] * (cfg.n_layers - 1)
    else:
        modes = [cfg.norm] * cfg.n_layers
    return [CrossCausalAttention(cfg, modes[0])] + [SelfCausalAttention(cfg, m) for m in modes[1:]]


def user_mask(q_attr: tuple, k_attr: tuple, first_layer: bool) -> torch.Tensor:
    """(B, Tq, Tk) visibility among user-side tokens (see the module docstring).

    Each attr is (is_global (T,), recency (T,) with -1 for globals, valid (B, T))."""
    qg, qr, _ = q_attr
    kg, kr, kv = k_attr
    causal = ~kg[None, :] & (kr[None, :] >= qr[:, None])  # history at or before the query's event
    if first_layer:
        causal = causal | kg[None, :]
    see = qg[:, None] | causal
    mask = kv[:, None, :] & see[None]
    if not first_layer:  # a query always sees itself (padding queries would see nothing)
        mask = mask | torch.eye(len(qr), dtype=torch.bool, device=qr.device)[None]
    return mask


class InnerTrans(nn.Module):
    """A small transformer inside each merge group (§3.3), full attention over its K tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg, "pre") for _ in range(cfg.inner_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B·G, K, d)
        for blk in self.blocks:
            k, v = blk.kv(x)
            x = blk(x, k, v, None)
        return x


class TokenMerge(nn.Module):
    """K adjacent tokens → one: `concat` (→ Linear) or `inner_trans` (InnerTrans, then concat → Linear).

    Attention cost against L/K merged keys instead of L. The paper keeps a merged token K·d wide
    (its ratio for the layer, (6dK + L/K) / (6d + L), longer/flops.py `paper_merge_ratio`); here
    the group is projected back to d_model, so K events share d_model dims. On the long-range
    log at d_model 32 that costs what the far signal needs (L 256: AUC 0.635 with K 8, 0.677
    with K 1; docs/results.md): size d_model with K in mind."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.merge_k
        self.inner = InnerTrans(cfg) if cfg.merge == "inner_trans" and self.k > 1 else None
        self.proj = nn.Linear(self.k * cfg.d_model, cfg.d_model) if self.k > 1 else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L, d) → (B, L/K, d)
        if self.k == 1:
            return tokens
        B, L, d = tokens.shape
        groups = tokens.reshape(B * (L // self.k), self.k, d)
        if self.inner is not None:
            groups = self.inner(groups)
        return self.proj(groups.reshape(B, L // self.k, self.k * d))


class Longer(DenseNet):
    """LONGER's dense part: Tokenizer → global tokens, TokenMerge, CrossCausalAttention, then
    SelfCausalAttention layers, the head on CLS and the last PHD copy of the candidate tokens."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec | None = None):
        super().__init__()
        self.cfg = cfg = cfg.effective
        d = cfg.d_model
        self.features = Tokenizer(cfg, spec)
        self.cls = nn.Parameter(torch.randn(d) * 0.02)  # global tokens: the learned CLS
        self.merge = TokenMerge(cfg)
        self.learned_queries = (
            nn.Parameter(torch.randn(cfg.query_k, d) * 0.02) if cfg.query_select == "learnable" else None
        )
        self.copy_emb = nn.Parameter(torch.zeros(cfg.phd_copies, d)) if cfg.phd_copies > 1 else None
        self.blocks = nn.ModuleList(attention_layers(cfg))
        self.final_norm = RMSNorm(d)
        self.head = Head(cfg)

    # --- user side ------------------------------------------------------------------------------
    def _query_offsets(self, L: int, device) -> torch.Tensor:
        """Recency offsets of the sequence-token queries (empty for learnable queries)."""
        cfg = self.cfg
        if cfg.query_select == "recent":
            return torch.arange(min(cfg.query_k, L), device=device)
        if cfg.query_select == "uniform":
            r = torch.div(
                torch.arange(cfg.query_k, device=device) * cfg.max_len, cfg.query_k, rounding_mode="floor"
            )
            return r[r < L]
        return torch.zeros(0, dtype=torch.long, device=device)

    def global_tokens(self, emb, B: int) -> torch.Tensor:
        """GlobalTokens (the paper's global tokens): [CLS, user token] (+ the learned queries) → (B, G, d). They
        attend to, and are seen by, every user-side token; CLS's output feeds the head."""
        glob = torch.stack([self.cls.expand(B, self.cfg.d_model), self.features.user_token(emb)], dim=1)
        if self.learned_queries is not None:
            glob = torch.cat([glob, self.learned_queries.expand(B, -1, -1)], dim=1)
        return glob

    def _user_tokens(self, batch, emb) -> dict:
        """The user side's layer-1 inputs: queries (B, G + k, d), keys/values (B, G + L/K, d)."""
        hist: History = self.features.history(emb, batch, pad_multiple=self.cfg.merge_k)
        B, L, _ = hist.tokens.shape  # L: longest history in the batch, padded to a multiple of K
        dev = hist.tokens.device
        glob = self.global_tokens(emb, B)  # (B, G, d)
        n_glob = glob.shape[1]
        r_q = self._query_offsets(L, dev)  # (k,) recency of each sequence query
        queries = torch.cat([glob, hist.tokens[:, r_q]], dim=1)  # (B, G + k, d)
        merged = self.merge(hist.tokens)  # (B, L/K, d)
        K = self.cfg.merge_k
        r_m = torch.arange(merged.shape[1], device=dev) * K  # newest event of each group
        true = torch.ones(B, n_glob, dtype=torch.bool, device=dev)
        return {
            "hist": hist,
            "queries": queries,
            "kv1": torch.cat([glob, merged], dim=1),
            # per token: is it global, its recency (globals: -1), is it valid
            "q_attr": self._attr(n_glob, r_q, torch.cat([true, hist.valid[:, r_q]], 1)),
            "kv1_attr": self._attr(n_glob, r_m, torch.cat([true, hist.valid[:, r_m]], 1)),
        }

    @staticmethod
    def _attr(n_glob: int, r: torch.Tensor, valid: torch.Tensor) -> tuple:
        is_glob = torch.cat(
            [
                torch.ones(n_glob, dtype=torch.bool, device=r.device),
                torch.zeros(len(r), dtype=torch.bool, device=r.device),
            ]
        )
        rec = torch.cat([torch.full((n_glob,), -1, dtype=torch.long, device=r.device), r])
        return is_glob, rec, valid

    def _run(self, i: int, x, k, v, mask):
        blk = self.blocks[i]
        if self.cfg.checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, k, v, mask, use_reentrant=False)
        return blk(x, k, v, mask)

    def encode(self, batch, emb) -> UserState:
        u = self._user_tokens(batch, emb)
        state = UserState({"latest_ts": u["hist"].latest_ts})
        x, kv_tokens, k_attr = u["queries"], u["kv1"], u["kv1_attr"]
        for i, blk in enumerate(self.blocks):
            k, v = blk.kv(kv_tokens)
            mask = blk.user_mask(u["q_attr"], k_attr)
            x = self._run(i, x, k, v, mask)
            state[f"k{i}"], state[f"v{i}"], state[f"valid{i}"] = k, v, k_attr[2]
            kv_tokens, k_attr = x, u["q_attr"]
        state["cls"] = x[:, 0]
        return state

    # --- candidate side -------------------------------------------------------------------------
    def _copies(self, cand: torch.Tensor) -> torch.Tensor:
        """(B, N, 2, d) → (B, N, 2R, d), copy-major: token t of copy j at index 2j + t."""
        R = self.cfg.phd_copies
        if R == 1:
            return cand
        x = cand[:, :, None] + self.copy_emb[None, None, :, None, :]
        return x.flatten(2, 3)

    def _copy_mask(self, n_cand: int, device) -> torch.Tensor:
        """Within one candidate, token (j, t) sees (j', t') iff j' <= j; candidates never see each other."""
        T = 2 * self.cfg.phd_copies
        copy = torch.arange(T, device=device) // 2
        within = copy[None, :] <= copy[:, None]
        return torch.block_diag(*[within] * n_cand) if n_cand > 1 else within

    def score(
        self, state: UserState, cand: torch.Tensor, request_ts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """cand (B, N, 2, d) candidate tokens → logits (B, N), against the cached user state.
        Without autograd on CPU: `score_merged` (the module docstring); else the masked path."""
        if not torch.is_grad_enabled() and cand.device.type == "cpu":
            return self.score_merged(state, cand, request_ts)
        return self.score_masked(state, cand, request_ts)

    def score_merged(
        self, state: UserState, cand: torch.Tensor, request_ts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`score` with every candidate at once, each layer's attention split in user keys and
        own keys and merged by log-sum-exp (`Block.candidates`)."""
        B, N = cand.shape[:2]
        x = self._copies(cand).reshape(B, -1, self.cfg.d_model)  # (B, N·T, d)
        own = self._copy_mask(1, x.device)
        for i, blk in enumerate(self.blocks):
            bias = self._cand_user_bias(state, i, request_ts)
            x = blk.candidates(x, state[f"k{i}"], state[f"v{i}"], bias, own)
        return self._head(state["cls"], x.reshape(B, N, -1, self.cfg.d_model))

    def _cand_user_bias(self, state: UserState, i: int, request_ts) -> torch.Tensor:
        """(B, 1, 1, Tu) additive bias of a candidate query on layer i's user keys: 0 on a valid
        key, -inf on padding."""
        valid = state[f"valid{i}"]
        zero = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        return zero.masked_fill(~valid, float("-inf"))[:, None, None, :]

    def score_masked(
        self, state: UserState, cand: torch.Tensor, request_ts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`score` over chunks of `cand_chunk` candidates, one masked SDPA per layer over the
        user keys and the chunk's own keys (the training path: exact autograd)."""
        B, N = cand.shape[:2]
        chunk = min(N, self.cfg.cand_chunk)
        n_chunks = -(-N // chunk)
        if n_chunks * chunk != N:  # pad with copies of the last candidate, dropped at the end
            cand = torch.cat([cand, cand[:, -1:].expand(B, n_chunks * chunk - N, -1, -1)], dim=1)
        x = self._copies(cand).reshape(B * n_chunks, -1, self.cfg.d_model)  # (B·chunks, chunk·T, d)
        own = self._copy_mask(chunk, x.device)
        rows = torch.arange(B, device=x.device).repeat_interleave(n_chunks)
        for i, blk in enumerate(self.blocks):
            kc, vc = blk.kv(x)
            k = torch.cat([state[f"k{i}"][rows], kc], dim=2)
            v = torch.cat([state[f"v{i}"][rows], vc], dim=2)
            x = self._run(i, x, k, v, self._cand_mask(state, i, rows, own, request_ts))
        return self._head(state["cls"], x.reshape(B, n_chunks * chunk, -1, self.cfg.d_model)[:, :N])

    def _cand_mask(self, state: UserState, i: int, rows, own, request_ts) -> torch.Tensor:
        """(B·chunks, chunk·T, Tk) layer-i mask of candidate queries: every valid user key + `own`."""
        user_valid = state[f"valid{i}"][rows][:, None, :].expand(-1, own.shape[0], -1)
        return torch.cat([user_valid, own[None].expand(len(rows), -1, -1)], dim=2)

    def _head(self, cls: torch.Tensor, cand_out: torch.Tensor) -> torch.Tensor:
        last = cand_out[:, :, -2:]  # the last copy's [target, context]
        return self.head(self.final_norm(cls), self.final_norm(last[:, :, 0]), self.final_norm(last[:, :, 1]))

    # --- the unsplit reference ------------------------------------------------------------------
    def reference(self, batch, emb) -> torch.Tensor:
        """All tokens through every layer jointly, one mask per layer (no cache, no split)."""
        u = self._user_tokens(batch, emb)
        cand = self.features.candidate_tokens(
            emb, self.features.sample_dense(batch), batch.ts, u["hist"].latest_ts
        )
        c = self._copies(cand)[:, 0]  # (B, T, d)
        B, T = c.shape[:2]
        own = self._copy_mask(1, c.device)
        x, kv_tokens, k_attr = torch.cat([u["queries"], c], 1), torch.cat([u["kv1"], c], 1), u["kv1_attr"]
        for blk in self.blocks:
            uu = blk.user_mask(u["q_attr"], k_attr)
            top = torch.cat([uu, uu.new_zeros(B, uu.shape[1], T)], 2)  # user side never sees candidates
            bottom = torch.cat([k_attr[2][:, None, :].expand(-1, T, -1), own[None].expand(B, -1, -1)], 2)
            k, v = blk.kv(kv_tokens)
            x = blk(x, k, v, torch.cat([top, bottom], 1))
            kv_tokens, k_attr = x, u["q_attr"]
        return self._head(x[:, 0], x[:, None, -T:])[:, 0]
