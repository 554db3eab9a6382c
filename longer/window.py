"""The append-stable event grid: which events a user's window holds, in which merge group and
slot, and what must be recomputed when new events arrive. Pure tensor code, no parameters.

Events of one user carry an absolute index a = 0, 1, 2, ... in time order (a user with T
events so far has indices 0..T-1; `Batch.hist_total` is T, so the i-th of the n loaded events,
oldest first, has a = T - n + i). The grid is aligned to that index, never to the most recent
event, so nothing about an event's place in it changes when later events are appended:

    group g      = events [g·K, (g+1)·K)           slot s = a mod K (0 = the oldest in the group)
    last group   = (T - 1) // K                      partial unless K divides T
    window       = the last G = max_len / K groups (K divides max_len); it slides by whole groups, so it holds
                   between max_len - K + 1 and max_len events once T >= max_len (all T before)

Layout: G columns per user, right-aligned — column G-1 is the newest group, older groups to
its left, columns before the user's first group are padding (`group = -1`). A batch may use
fewer columns than G (as many as its longest window needs); padding never changes a result.

Per-token features that are append-stable (a token's value never depends on later events):
its absolute index, its slot, and the gap to the previous event *within its group* (slot 0:
no previous, gap 0). Not "seconds before the latest event": that is request/update relative,
and enters the model as an attention bias computed at request time from `group_ts`.

When n new events arrive to a user with T events (`update_span`), only these change: the
partial last group (if T mod K != 0, its T mod K old events plus new ones) and the groups the
new events start. Everything before event `first_event = (T // K)·K` is unchanged; the window
slides left by `(T + n - 1) // K - (T - 1) // K` groups (T = 0: the window starts there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def n_groups(max_len: int, k: int) -> int:
    """G = max_len / K: how many merge groups the window keeps (so it never holds more than
    max_len events, which is what a loader reads; K must divide max_len)."""
    if k < 1 or max_len % k:
        raise ValueError(f"event grid: merge_k={k} must divide max_len={max_len}")
    return max_len // k


def window_start(total: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    """(B,) absolute index of the window's first event: the first event of the oldest kept group."""
    last = torch.div(total - 1, k, rounding_mode="floor").clamp(min=0)
    return (last - groups + 1).clamp(min=0) * k


@dataclass
class Grid:
    """Where each window event sits, for a batch; shapes (B, C, K) per slot, (B, C) per group,
    C <= G columns, right-aligned (column C-1 = the newest group)."""

    src: torch.Tensor  # (B, C, K) int64: position in the flat, oldest-first event values; sentinel = Σ loaded
    valid: torch.Tensor  # (B, C, K) bool
    index: torch.Tensor  # (B, C, K) int64 absolute event index, -1 where invalid
    group: torch.Tensor  # (B, C) int64 absolute group number, -1 for a padding column
    total: torch.Tensor  # (B,) int64 events of the user so far (T)

    @property
    def group_valid(self) -> torch.Tensor:  # (B, C) bool
        return self.group >= 0

    @property
    def slot(self) -> torch.Tensor:  # (K,) int64
        return torch.arange(self.src.shape[-1], device=self.src.device)

    def newest_index(self) -> torch.Tensor:
        """(B, C) absolute index of each group's newest event (-1 for padding)."""
        return self.index.max(dim=-1).values

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Flat per-event values (N, ...) → (B, C, K, ...), zero where invalid."""
        pad = values.new_zeros((1,) + values.shape[1:])
        return torch.cat([values, pad])[self.src]


def event_grid(total: torch.Tensor, lengths: torch.Tensor, k: int, groups: int, full: bool = False) -> Grid:
    """The grid of a batch whose user b has `total[b]` events so far, of which the last
    `lengths[b]` are loaded (oldest first, concatenated over users). The loaded events must
    cover the window: lengths >= total - window_start (a loader reading the last max_len events
    always does). `full`: always G columns (a fixed-size state), not just as many as needed."""
    total, lengths = total.long(), lengths.long()
    if bool((lengths > total).any()):
        b = int(torch.nonzero(lengths > total)[0, 0])
        raise ValueError(
            f"event grid: sample {b} has {int(lengths[b])} history events but a total of {int(total[b])}"
        )
    start = window_start(total, k, groups)
    short = total - lengths > start
    if bool(short.any()):
        b = int(torch.nonzero(short)[0, 0])
        raise ValueError(
            f"event grid: sample {b} loads {int(lengths[b])} of {int(total[b])} events, "
            f"but its window starts at event {int(start[b])}"
        )
    dev = total.device
    last = torch.div(total - 1, k, rounding_mode="floor")  # -1 for an empty history
    used = torch.where(total > 0, last - torch.div(start, k, rounding_mode="floor") + 1, 0)
    cols = groups if full else max(1, int(used.max()) if used.numel() else 1)
    group = last[:, None] - (cols - 1) + torch.arange(cols, device=dev)[None]  # (B, C)
    group = torch.where(group >= torch.div(start, k, rounding_mode="floor")[:, None], group, -1)
    index = group[..., None] * k + torch.arange(k, device=dev)  # (B, C, K)
    valid = (group[..., None] >= 0) & (index < total[:, None, None])
    offsets = torch.cumsum(lengths, 0) - lengths
    flat = offsets[:, None, None] + index - (total - lengths)[:, None, None]
    src = torch.where(valid, flat, lengths.sum())
    return Grid(src=src, valid=valid, index=torch.where(valid, index, -1), group=group, total=total)


def gap_in_group(ts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, C, K) seconds since the previous event of the same group (slot 0 and padding: 0)."""
    prev = torch.cat([ts[..., :1], ts[..., :-1]], dim=-1)
    return torch.where(valid, ts - prev, 0)


def group_ts(ts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, C) time of each group's newest event (0 for padding): what the state stores for the
    request-time bias (events are in time order, so the newest valid slot holds the max)."""
    return torch.where(valid, ts, torch.zeros_like(ts)).max(dim=-1).values


@dataclass(frozen=True)
class UpdateSpan:
    """What n new events change for a user with `total` events (ints, one user)."""

    first_event: int  # absolute index of the first event to (re)tokenize: start of the partial group
    first_group: int  # the first group whose merged token is (re)computed
    n_groups: int  # groups recomputed: the partial one (if any) + the ones the new events start
    slide: int  # columns the window moves left (old groups dropped from the left are at most this)


def update_span(total: int, n_new: int, k: int) -> UpdateSpan:
    if total < 0 or n_new < 0:
        raise ValueError(f"update span: negative counts (total={total}, new={n_new})")
    first_group = total // k
    last_new = (total + n_new - 1) // k
    last_old = (total - 1) // k if total else -1
    return UpdateSpan(
        first_event=first_group * k,
        first_group=first_group,
        n_groups=max(0, last_new - first_group + 1) if n_new else 0,
        slide=max(0, last_new - last_old) if n_new else 0,
    )
