"""Evaluation: per-sample predictions over a split, gathered exactly from every rank, and the
metrics of `trainer.metrics` over all of them (`longer eval` for a bundle)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from feature_store.batch import Batch, padding_batch
from feature_store.loader import BatchLoader

from .distributed import all_max, gather_to_main
from .metrics import all_metrics

PREDICTION_COLUMNS = ("row_id", "user_id", "item_id", "ts", "label", "logit")


def predict_split(
    predict: Callable[[Batch], torch.Tensor],
    loader: BatchLoader,
    device: torch.device,
    progress: bool = False,
) -> dict[str, np.ndarray] | None:
    """Predictions for every sample of `loader`'s split, on rank 0 (None on other ranks).

    Under a process group every rank makes the same number of `predict` calls (sharded
    embeddings need matching collectives): a rank that runs out repeats a batch and drops it."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    loader.rewind()
    n_local = len(loader)
    n_calls = all_max(n_local) if distributed else n_local
    parts: dict[str, list] = {c: [] for c in PREDICTION_COLUMNS}
    filler = None
    batches = iter(loader)
    with torch.no_grad():
        for i in tqdm(range(n_calls), desc="eval", unit="batch", disable=not progress):
            real = i < n_local
            batch = next(batches) if real else (filler or padding_batch())
            filler = batch
            logits = predict(batch.to(device, non_blocking=True)).float().cpu()
            if real:
                parts["row_id"].append(batch.row_id.numpy())
                parts["user_id"].append(batch.sparse["user_id"].values().numpy())
                parts["item_id"].append(batch.sparse["item_id"].values().numpy())
                parts["ts"].append(batch.ts.numpy())
                parts["label"].append(batch.labels.numpy())
                parts["logit"].append(logits.numpy())
    local = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    everyone = gather_to_main(local) if distributed else [local]
    if everyone is None:
        return None
    merged = {c: np.concatenate([p[c] for p in everyone]) for c in PREDICTION_COLUMNS}
    order = np.argsort(merged["row_id"], kind="stable")
    return {c: v[order] for c, v in merged.items()}


def metrics_of(pred: dict[str, np.ndarray]) -> dict:
    return all_metrics(pred["user_id"], pred["label"], pred["logit"])


def write_predictions(pred: dict[str, np.ndarray], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            **{c: pred[c] for c in PREDICTION_COLUMNS},
            "prediction": 1.0 / (1.0 + np.exp(-pred["logit"].astype(np.float64))),
        }
    )
    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(table, tmp)
    tmp.replace(path)


def eval_bundle(
    bundle_path: str | Path,
    data: str | Path,
    predictions: str | Path | None = None,
    batch_size: int = 1024,
    split: str = "eval",
    progress: bool = True,
    max_len: int | None = None,
) -> dict:
    """`longer eval`: load a bundle without any process group and evaluate it on a split;
    `max_len`: read histories that long (≥ the training one; trainer/extrapolate.py)."""
    from .export import load_bundle

    bundle = load_bundle(bundle_path, max_len=max_len)
    loader = BatchLoader(
        data,
        split,
        batch_size=batch_size,
        max_len=bundle.config.model.max_len,
        shuffle=False,
        spec=bundle.spec,
    )
    pred = predict_split(bundle.model, loader, torch.device("cpu"), progress=progress)
    if predictions:
        write_predictions(pred, predictions)
    return {
        **metrics_of(pred),
        "model_version": bundle.version,
        "split": split,
        "max_len": bundle.config.model.max_len,
    }
