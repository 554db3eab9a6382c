"""Length extrapolation (STCA, arXiv 2511.06077): read a bundle at a `max_len` longer than the
one it was trained at (`longer eval --max-len N`, `longer serve --max-len N` / LONGER_MAX_LEN).

Contract: `extend_max_len(cfg, tensors, N)` returns the run config and weights of the same
model reading the last N events. The one weight whose shape depends on max_len is the learned
absolute position embedding (longer/tokens.py, 0 = most recent); positions the training never
reached reuse the oldest trained one (rows appended as copies of the last row), so events within
the trained length are scored exactly as before. Everything else in every arch is
length-independent: merge groups, query selection and attention adapt to L. N shorter than the
training length is refused (the model never saw such truncation; retrain instead), and so is an
N the model's own constraints reject (e.g. merge_k must divide max_len), naming why.
"""

from __future__ import annotations

import dataclasses

import torch

from longer.config import ConfigError
from longer.errors import UsageError

from .config import RunConfig

POSITIONS = "net.features.pos_emb.weight"  # (max_len, d_model): the one length-shaped weight


def extend_max_len(
    cfg: RunConfig, tensors: dict[str, torch.Tensor], max_len: int, where: str = "bundle"
) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(config, weights) of the model reading `max_len` events; unchanged if it is the trained one."""
    trained = cfg.model.max_len
    if max_len == trained:
        return cfg, tensors
    if max_len < trained:
        raise UsageError(
            f"{where}: max_len {max_len} is shorter than the training max_len {trained}; "
            "a bundle reads at least the length it was trained at"
        )
    try:
        model = dataclasses.replace(cfg.model, max_len=max_len)
    except ConfigError as e:
        raise UsageError(f"{where}: arch {cfg.model.arch} cannot read max_len {max_len}: {e}") from None
    pos = tensors[POSITIONS]
    extended = {**tensors, POSITIONS: torch.cat([pos, pos[-1:].expand(max_len - trained, -1)])}
    return dataclasses.replace(cfg, model=model), extended
