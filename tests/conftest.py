from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LONGER_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (set LONGER_SHARED_DATA to the folder holding {name}/)")
    return path


def write_log(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def random_log(rng: np.random.Generator, users: int = 20, rows: int = 2000, ts_range: int = 40,
               items: int = 15) -> dict:
    """Small log with many same-second ties and duplicate events, rows in random order."""
    return {
        "user_id": rng.integers(0, users, rows).astype(np.int64),
        "item_id": rng.integers(0, items, rows).astype(np.int64),
        "ts": (1_600_000_000 + rng.integers(0, ts_range, rows)).astype(np.int64),
        "label": rng.integers(0, 2, rows).astype(np.int8),
        "category_id": rng.integers(0, 4, rows).astype(np.int64),
        "action": rng.integers(1, 4, rows).astype(np.int64),
    }


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A small synthetic log built into a dataset with several buckets and row groups."""
    from feature_store.builder import BuildConfig, build
    from feature_store.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(users=60, items=300, events_per_user=300, seed=7), root / "log", progress=False)
    build(root / "log", root / "data", BuildConfig(max_len=256, test_days=5, bucket_rows=5000), progress=False)
    return root / "data"
