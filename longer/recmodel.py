"""RecModel, the whole model: SparseEmbedding (sharded by TorchRec) + a DenseNet
(data-parallel), and `build_model`, the one place an `arch` name becomes a class.

Contract (DESIGN.md "Model interface"): `encode_user(batch) -> UserState`,
`score(state, candidates) -> logits (B, N)`, and `forward(batch)` = the two composed for one
candidate per sample (logits (B,)). State-dict keys are `embedding.*` and `net.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from .baselines import DIN, HSTU, SumPool
from .config import ModelConfig
from .embedding import SparseEmbedding
from .interface import Candidates, DenseNet, UserState
from .model import Longer

# arch → DenseNet class. `transformer` is Longer without merge and with every token a query
# (ModelConfig.effective); din_recent50 is DIN over the `din_recent` most recent events.
ARCH_CLASSES: dict[str, type[DenseNet]] = {
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
        self.embedding = SparseEmbedding(net.cfg)
        self.net = net

    def forward(self, batch) -> torch.Tensor:
        return self.net(batch, self.embedding(batch.sparse))

    def encode_user(self, batch) -> UserState:
        return self.net.encode(batch, self.embedding(batch.sparse))

    def score(self, state: UserState, cands: Candidates) -> torch.Tensor:
        """Logits (B, N) for N candidates per user, from the cached user state."""
        return self.net.score_embedded(state, *self.embedding.candidates(cands), cands.ts)

    def forward_reference(self, batch) -> torch.Tensor:
        """The unsplit computation, where the net has one (LONGER): for tests."""
        return self.net.reference(batch, self.embedding(batch.sparse))


def build_model(cfg: ModelConfig) -> RecModel:
    """The model a config names (`cfg.arch`)."""
    return RecModel(ARCH_CLASSES[cfg.arch](cfg))
