"""RecModel, the whole model: SparseEmbedding (sharded by TorchRec) + a DenseNet
(data-parallel), and `build_model`, the one place an `arch` name becomes a class.

Contract (DESIGN.md "Model interface"): `encode_user(batch) -> UserState`,
`score(state, candidates) -> logits (B, N)`, and `forward(batch)` = the two composed for one
candidate per sample (logits (B,)); for an append-stable net, `update_user(state, new events)
-> UserState` equal to `encode_user` of all the events. State-dict keys are `embedding.*` and `net.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from .baselines import DIN, HSTU, Base, SumPool
from .config import ModelConfig
from .embedding import SparseEmbedding
from .interface import Candidates, DenseNet, UserState
from .model import Longer
from .spec import FeatureSpec
from .stable import StableLonger

# arch → DenseNet class. `transformer` is Longer without merge and with every token a query
# (ModelConfig.effective); din_recent50 is DIN over the `din_recent` most recent events.
ARCH_CLASSES: dict[str, type[DenseNet]] = {
    "base": Base,
    "longer": Longer,
    "transformer": Longer,
    "sumpool": SumPool,
    "hstu": HSTU,
    "din": DIN,
    "din_recent50": DIN,
}


class RecModel(nn.Module):
    """A model = SparseEmbedding (sharded by TorchRec) + a DenseNet (data-parallel)."""

    def __init__(self, net: DenseNet):
        super().__init__()
        self.cfg = net.cfg
        self.spec = net.features.spec
        self.embedding = SparseEmbedding(net.cfg, self.spec)
        self.net = net

    def forward(self, batch) -> torch.Tensor:
        return self.net(batch, self.embedding(batch.sparse))

    def encode_user(self, batch) -> UserState:
        return self.net.encode(batch, self.embedding(batch.sparse))

    def score(self, state: UserState, cands: Candidates) -> torch.Tensor:
        """Logits (B, N) for N candidates per user, from the cached user state."""
        return self.net.score_tokens(state, self.candidate_tokens(state, cands), cands.ts)

    def candidate_tokens(self, state: UserState, cands: Candidates) -> torch.Tensor:
        """The candidates' tokens (B, N, 2, d) [target, context]: the embedding lookup and the
        Tokenizer, the part of `score` before `DenseNet.score_tokens`."""
        dense = {k: cands.dense[k] for k in self.spec.dense_keys}
        emb = self.embedding.candidates(cands)
        return self.net.features.candidate_tokens(emb, dense, cands.ts, state["latest_ts"])

    def update_user(self, state: UserState, new_events) -> UserState:
        """`state` of users with T events + a batch holding only their n new events (oldest
        first, `hist_total` = T + n) → the state `encode_user` gives for all T + n events.
        Only nets with an append-stable user side have it (LONGER with encoding
        "append_stable", longer/stable.py)."""
        update = getattr(self.net, "update", None)
        if update is None:
            raise TypeError(
                f"update_user: arch {self.cfg.arch!r} with encoding {self.cfg.encoding!r} has no "
                "incremental update; encode_user the whole history instead"
            )
        return update(state, new_events, self.embedding(new_events.sparse))

    def forward_reference(self, batch) -> torch.Tensor:
        """The unsplit computation, where the net has one (LONGER): for tests."""
        return self.net.reference(batch, self.embedding(batch.sparse))


def build_model(cfg: ModelConfig, spec: FeatureSpec | None = None) -> RecModel:
    """The model a config names (`cfg.arch`; LONGER's user side by `cfg.encoding`) over a
    resolved feature spec (default: the default spec, whose tables ModelConfig sizes)."""
    if cfg.arch in ("longer", "transformer") and cfg.encoding == "append_stable":
        return RecModel(StableLonger(cfg, spec))
    return RecModel(ARCH_CLASSES[cfg.arch](cfg, spec))
