"""The sparse part of every model: id hashing and one TorchRec EmbeddingCollection.

Contract: `SparseEmbedding(cfg)(kjt)` maps a KeyedJaggedTensor with the keys of
`FEATURE_KEYS` (raw ids, any non-negative int64) to one JaggedTensor of (n, emb_dim)
embeddings per key. History and candidate keys share a table (`EMBEDDING_TABLES`), so a
candidate and the same item in a history get the same vector. This module is what TorchRec's
DistributedModelParallel shards; it holds no dense parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from .config import ModelConfig
from .interface import Candidates

# (table, features reading it): history and candidate share the item and category tables.
EMBEDDING_TABLES = {
    "item": ("hist_item_id", "item_id"),
    "category": ("hist_category_id", "category_id"),
    "action": ("hist_action",),
    "user": ("user_id",),
}
HISTORY_KEYS = ("hist_item_id", "hist_category_id", "hist_action")
CANDIDATE_KEYS = ("item_id", "category_id")
FEATURE_KEYS = HISTORY_KEYS + CANDIDATE_KEYS + ("user_id",)


def table_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Rows of each embedding table (raw ids are hashed into them)."""
    return {
        "item": cfg.item_buckets,
        "category": cfg.category_buckets,
        "action": cfg.action_buckets,
        "user": cfg.user_buckets,
    }


class IdHash(nn.Module):
    """Hash raw ids into their table's size (`id mod size`), key by key of the KJT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sizes = table_sizes(cfg)
        self.size_of = {f: sizes[t] for t, feats in EMBEDDING_TABLES.items() for f in feats}

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
                for t, feats in EMBEDDING_TABLES.items()
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
