"""The sparse part of every model: id hashing and one TorchRec EmbeddingCollection, laid out
by the model's `FeatureSpec` (longer/spec.py).

Contract: `SparseEmbedding(cfg, spec)(kjt)` maps a KeyedJaggedTensor with the keys of
`spec.sparse_keys` (raw ids, any non-negative int64) to one JaggedTensor of (n, emb_dim)
embeddings per key. A history key and the candidate key of the same column share a table
(`spec.tables()`), so a candidate and the same item in a history get the same vector. Table
rows: `table_sizes`. List (multi-valued) columns come out per value; the Tokenizer pools them.
This module is what TorchRec's DistributedModelParallel shards; it holds no dense parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from .config import ModelConfig
from .interface import Candidates
from .spec import MODEL_SIZED, FeatureSpec, SpecError, table_name

DEFAULT_SPEC = FeatureSpec()
# The default spec's layout (the model before the spec existed).
EMBEDDING_TABLES = DEFAULT_SPEC.tables()
FEATURE_KEYS = DEFAULT_SPEC.sparse_keys
HISTORY_KEYS = DEFAULT_SPEC.history_keys  # the default spec's (longer/stable.py reads exactly these)


def column_rows(cfg: ModelConfig, spec: FeatureSpec, column: str) -> int:
    """Rows of a column's table: the spec's resolved buckets, else ModelConfig's `*_buckets`."""
    if column in spec.buckets:
        return int(spec.buckets[column])
    if column in MODEL_SIZED:
        return int(getattr(cfg, MODEL_SIZED[column]))
    raise SpecError(f"column '{column}': no table size; resolve the spec against the dataset first")


def table_sizes(cfg: ModelConfig, spec: FeatureSpec = DEFAULT_SPEC) -> dict[str, int]:
    """Rows of each embedding table (raw ids are hashed into them)."""
    cols = ("item_id", *spec.categorical, "user_id")
    return {table_name(c): column_rows(cfg, spec, c) for c in cols}


class IdHash(nn.Module):
    """Hash raw ids into their table's size (`id mod size`), key by key of the KJT."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec = DEFAULT_SPEC):
        super().__init__()
        sizes = table_sizes(cfg, spec)
        self.size_of = {f: sizes[t] for t, feats in spec.tables().items() for f in feats}

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

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec = DEFAULT_SPEC):
        super().__init__()
        self.spec = spec
        sizes = table_sizes(cfg, spec)
        self.hash = IdHash(cfg, spec)
        self.table_of = {f: t for t, feats in spec.tables().items() for f in feats}
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=t,
                    embedding_dim=cfg.emb_dim,
                    num_embeddings=sizes[t],
                    feature_names=list(feats),
                    init_fn=init_embedding,
                )
                for t, feats in spec.tables().items()
            ]
        )

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.ec(self.hash(kjt))

    def lookup(self, key: str, ids: torch.Tensor) -> JaggedTensor:
        """One key's (n, 1) or (n, M) raw ids (a list column padded with negatives) looked up in
        its own table directly: what `forward` gives for that key, without building a KJT of
        every key or the collection's per-key split (inference on an unsharded collection)."""
        table = self.ec.embeddings[self.table_of[key]]
        if not self.spec.is_list(key):
            lengths = torch.ones(len(ids), dtype=torch.long, device=ids.device)
            flat = ids.reshape(-1)
        else:
            keep = ids >= 0
            flat, lengths = ids[keep], keep.sum(1)
        values = F.embedding(torch.remainder(flat, self.hash.size_of[key]), table.weight)
        return JaggedTensor(values=values, lengths=lengths)

    def candidates(self, cands: Candidates) -> dict[str, JaggedTensor]:
        """The candidates' candidate-key and context-key embeddings, through the same tables.

        One KJT row per (user, candidate): B·N rows; a context key's value is repeated for each
        of its user's candidates (the Tokenizer reads it from the first). List values: padded
        with negative ids in `Candidates`, dropped here. Without autograd on an unsharded
        collection, only the candidate and context keys, each in its own table (`lookup`)."""
        B, N = cands.item_id.shape
        n = B * N
        dev = cands.item_id.device
        given = {k: cands.column(k) for k in self.spec.candidate_keys}
        for k in self.spec.context_keys:
            v = cands.context[k]
            given[k] = v[:, None].expand(B, N, *v.shape[1:])
        if not torch.is_grad_enabled() and type(self.ec) is EmbeddingCollection:  # unsharded inference
            return {k: self.lookup(k, v.reshape(n, -1).long()) for k, v in given.items()}
        values, lengths = [], []
        for k in self.spec.sparse_keys:
            if k not in given:
                lengths.append(torch.zeros(n, dtype=torch.long, device=dev))
                continue
            v = given[k].reshape(n, -1).long()  # (n, 1) or (n, M) padded with negatives
            if not self.spec.is_list(k):  # one id per row
                values.append(v.reshape(-1))
                lengths.append(torch.ones(n, dtype=torch.long, device=dev))
                continue
            keep = v >= 0
            values.append(v[keep])
            lengths.append(keep.sum(1))
        kjt = KeyedJaggedTensor(
            keys=list(self.spec.sparse_keys), values=torch.cat(values), lengths=torch.cat(lengths)
        )
        return self(kjt)
