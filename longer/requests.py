"""Request-level batching (RLB; STCA, arXiv 2511.06077 §"Request Level Batching"): the samples
of one request (same user, time and history) share one user-side encoding in training, as they
do in serving.

Contract: a batch with `request` (B,) int64 (consecutive request numbers 0..R-1, one per
sample) stores each request's history once, on its first sample: the `hist_*` embeddings and
`hist_ts` hold R histories, the per-sample keys (and `hist_total`, the append-stable grid's
event count) hold B rows. `request_view` gives the R-row
batch and embeddings `encode` needs; `expand_state` gives every sample its request's state
(an index_select on dim 0, whose backward sums the samples' gradients into the one encoding).
The logits equal encoding every sample on its own copy of the history.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

HISTORY_PREFIX = "hist_"  # keys whose rows are stored once per request


def request_firsts(request: torch.Tensor) -> torch.Tensor:
    """(R,) the index of each request's first sample."""
    first = torch.ones_like(request, dtype=torch.bool)
    first[1:] = request[1:] != request[:-1]
    return first.nonzero().squeeze(1)


def take_rows(jt: JaggedTensor, rows: torch.Tensor) -> JaggedTensor:
    """The jagged rows `rows` of `jt`, in that order."""
    lengths = jt.lengths().long()
    starts = (torch.cumsum(lengths, 0) - lengths)[rows]
    n = lengths[rows]
    ends = torch.cumsum(n, 0)
    idx = torch.arange(int(ends[-1]) if len(ends) else 0, device=n.device)
    idx = idx + torch.repeat_interleave(starts - (ends - n), n)
    return JaggedTensor(values=jt.values()[idx], lengths=n)


def request_view(batch, emb: dict[str, JaggedTensor]):
    """(batch, emb) with one row per request: what `encode` reads."""
    firsts = request_firsts(batch.request)
    view = {}
    for k, jt in emb.items():
        if k.startswith(HISTORY_PREFIX):  # already one history per request; drop the empty rows
            view[k] = JaggedTensor(values=jt.values(), lengths=jt.lengths()[firsts])
        else:
            view[k] = take_rows(jt, firsts)
    per_sample = {"ts", "labels", "row_id", "hist_lengths", "hist_total"}
    kw = {f: getattr(batch, f)[firsts] for f in per_sample if hasattr(batch, f)}
    if hasattr(batch, "dense"):
        kw["dense"] = {k: v[firsts] for k, v in batch.dense.items()}
    return replace(batch, request=None, **kw), view


def expand_state(state, request: torch.Tensor):
    """Each sample's copy of its request's UserState: (R, ...) → (B, ...)."""
    return type(state)({k: v.index_select(0, request) for k, v in state.tensors.items()})
