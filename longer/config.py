"""Model configuration: one frozen dataclass, validated, loadable from the `[model]` table of a
TOML file, and `ConfigSection`, the one validation helper every config table uses.

Contract: `ModelConfig(...)` and `ModelConfig.from_dict(table)` either return a config whose
every field is valid or raise `ConfigError` naming the field (and, from a file, the file and
table). `arch` names the model kind (`ARCHS`); a table written before the rename with
`model = "..."` still loads, with a `FutureWarning` saying what to rename.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import tomllib

from .errors import LongerError

ARCHS = ("longer", "transformer", "din", "din_recent50", "sumpool", "hstu", "base")
NORMS = ("pre", "post", "hybrid", "hybrid_star")
MERGES = ("concat", "inner_trans")
QUERY_SELECTIONS = ("recent", "uniform", "learnable")
ENCODINGS = ("recency", "append_stable")


class ConfigError(LongerError, ValueError):
    """A config file, table or key with a bad value; the message names the key."""


class ConfigSection:
    """Mixin for a frozen config dataclass read from one TOML table: typed loading from a dict
    (unknown keys and wrong types refused by name) and the checks `__post_init__` runs."""

    section: ClassVar[str]  # the table's name in messages: "model", "train"

    def need(self, cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{self.section} config: {msg}")

    def need_ints(self, names, minimum: int) -> None:
        for name in names:
            v = getattr(self, name)
            self.need(
                isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                f"{name} must be an integer >= {minimum}, got {v!r}",
            )

    def need_choice(self, name: str, choices: tuple) -> None:
        v = getattr(self, name)
        self.need(v in choices, f"{name} must be one of {choices}, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        return dataclass_from_dict(cls, d, where or f"{cls.section} config")

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def dataclass_from_dict(cls, d: dict, where: str):
    """Build a config dataclass from a TOML table: unknown keys and wrong types are refused by name."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    defaults = cls()
    values = {}
    for k, v in d.items():
        want = type(getattr(defaults, k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"{where}: {k} must be {want.__name__}, got {v!r}")
        values[k] = v
    return cls(**values)


def renamed_model_key(d: dict, where: str) -> dict:
    """A `[model]` table with the pre-`arch` key `model` renamed (FutureWarning); both → ConfigError."""
    if "model" not in d:
        return d
    if "arch" in d:
        raise ConfigError(
            f"{where}: both 'model' and 'arch' given; 'model' is the old name of 'arch', keep only arch"
        )
    warnings.warn(f"{where}: rename [model] model to [model] arch", FutureWarning, stacklevel=3)
    return {("arch" if k == "model" else k): v for k, v in d.items()}


@dataclass(frozen=True)
class ModelConfig(ConfigSection):
    section: ClassVar[str] = "model"

    arch: str = "longer"  # the model kind, one of ARCHS
    max_len: int = 256  # L: longest history the model reads
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2  # layer 1 is CrossCausalAttention, the rest SelfCausal (LONGER, transformer)
    ffn_mult: int = 4
    emb_dim: int = 32  # every TorchRec table (EmbeddingCollection needs one dim)
    # Token merge (paper §3.3): K adjacent tokens → one; K = 1 means no merge.
    merge_k: int = 4
    merge: str = "inner_trans"
    inner_layers: int = 1
    # Hybrid attention (paper §3.4): layer-1 queries = global tokens + k sequence tokens.
    query_k: int = 32
    query_select: str = "recent"
    norm: str = "hybrid"  # HybridNorm; hybrid_star = HybridNorm* (first block Pre-Norm)
    phd_copies: int = 1  # PHD: R copies of each candidate-side token (1 = plain model)
    # How LONGER's user side encodes time (longer/window.py, longer/stable.py): `recency` aligns
    # groups, positions and time features to the latest event (every new event changes every
    # cached K/V); `append_stable` aligns them to the absolute event index, so a state can be
    # updated with new events, and request-relative recency enters as an attention bias.
    encoding: str = "recency"
    time_bias: bool = True  # append_stable: relative time/position bias (log2 buckets, per head)
    # Id spaces: raw ids are hashed (mod) into these table sizes.
    item_buckets: int = 200_003
    category_buckets: int = 1_024
    action_buckets: int = 64
    user_buckets: int = 200_003
    time_buckets: int = 32  # log2 buckets of seconds
    din_recent: int = 50  # din_recent50: how many recent events DIN reads
    checkpoint: bool = False  # activation recomputation per block
    cand_chunk: int = 64  # candidates scored together against one cached user state

    def __post_init__(self):
        self.need_choice("arch", ARCHS)
        self.need_choice("norm", NORMS)
        self.need_choice("merge", MERGES)
        self.need_choice("query_select", QUERY_SELECTIONS)
        self.need_choice("encoding", ENCODINGS)
        self.need(
            self.encoding == "recency" or self.arch in ("longer", "transformer"),
            f"encoding 'append_stable' is LONGER's (arch longer or transformer), not {self.arch!r}'s",
        )
        self.need(
            self.encoding == "recency" or self.query_select != "uniform",
            "encoding 'append_stable' needs query_select 'recent' or 'learnable' (uniform queries move with every event)",
        )
        self.need_ints(
            (
                "max_len",
                "d_model",
                "n_heads",
                "n_layers",
                "ffn_mult",
                "emb_dim",
                "merge_k",
                "query_k",
                "phd_copies",
                "item_buckets",
                "category_buckets",
                "action_buckets",
                "user_buckets",
                "time_buckets",
                "din_recent",
                "cand_chunk",
                "inner_layers",
            ),
            minimum=1,
        )
        need = self.need
        need(
            self.d_model % self.n_heads == 0, f"n_heads={self.n_heads} does not divide d_model={self.d_model}"
        )
        need(self.merge_k <= self.max_len, f"merge_k={self.merge_k} is larger than max_len={self.max_len}")
        need(
            self.max_len % self.merge_k == 0,
            f"merge_k={self.merge_k} must divide max_len={self.max_len} (groups align to the most recent event)",
        )
        need(self.query_k <= self.max_len, f"query_k={self.query_k} is larger than max_len={self.max_len}")
        need(self.time_buckets <= 63, f"time_buckets must be <= 63, got {self.time_buckets}")

    @property
    def effective(self) -> ModelConfig:
        """The settings the model really runs with. `transformer` is LONGER without its two
        savings: no token merge and every sequence token a query (full causal self-attention)."""
        if self.arch == "transformer":
            return dataclasses.replace(self, merge_k=1, query_k=self.max_len, query_select="recent")
        return self

    @property
    def history_window(self) -> int:
        """How many recent events the model reads (din_recent50 reads only `din_recent`)."""
        return min(self.din_recent, self.max_len) if self.arch == "din_recent50" else self.max_len

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> ModelConfig:
        return dataclass_from_dict(cls, renamed_model_key(d, where), where)

    @classmethod
    def from_toml(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        if "model" not in data:
            raise ConfigError(f"{path}: no [model] table")
        return cls.from_dict(data["model"], f"{path} [model]")
