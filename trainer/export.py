"""The serving bundle (`RUN/export/`): what `longer eval` and `longer serve` load, with no
process group and no TorchRec sharding.

    config.json           the run config ({"model": ..., "train": ...}) and "model_version"
    feature_schema.json   format 2: "spec", the model's resolved FeatureSpec (longer/spec.py:
                          declared columns by kind, buckets, list columns, dense mean/std),
                          and derived from it the KJT keys, features and table sizes; plus the
                          dataset's schema (columns, cardinalities, split). A format-1 file
                          (no "spec", bundles from before issue 15) loads as the default spec.
    model.safetensors     every weight, unsharded, under the RecModel's own parameter names

model_version = the first 16 hex digits of sha256(config + every tensor's name, dtype, shape
and bytes): two bundles with the same version score identically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from feature_store.io import atomic_dir
from longer.embedding import table_sizes
from longer.errors import LongerError
from longer.recmodel import RecModel, build_model
from longer.spec import FeatureSpec

from .config import RunConfig
from .extrapolate import extend_max_len

FILES = ("config.json", "feature_schema.json", "model.safetensors")
SCHEMA_FORMAT = 2  # 1: no "spec" (the default spec)


def content_version(tensors: dict[str, torch.Tensor], config: dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def feature_schema(cfg: RunConfig, data_meta: dict, spec: FeatureSpec) -> dict:
    return {
        "format": SCHEMA_FORMAT,
        "spec": spec.to_json(),
        "keys": list(spec.sparse_keys),
        "history_features": list(spec.history_fields),
        "candidate_features": list(spec.candidate_keys),
        "max_len": cfg.model.max_len,
        "tables": table_sizes(cfg.model, spec),
        "dataset": {
            k: data_meta.get(k) for k in ("schema_version", "columns", "cardinalities", "split", "max_len")
        },
    }


def write_bundle(
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    cfg: RunConfig,
    data_meta: dict,
    spec: FeatureSpec | None = None,
) -> str:
    """Write a bundle atomically (replacing an older one); returns its model version. `spec`:
    the resolved spec the weights were trained with (None: the config's, which must then need
    no resolving, e.g. the default spec)."""
    spec = spec or cfg.features
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config = cfg.to_dict()
    version = content_version(tensors, config)
    with atomic_dir(out, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"model_version": version})
        (tmp / "config.json").write_text(json.dumps({**config, "model_version": version}, indent=2) + "\n")
        (tmp / "feature_schema.json").write_text(
            json.dumps(feature_schema(cfg, data_meta, spec), indent=2) + "\n"
        )
    return version


@dataclass
class Bundle:
    model: RecModel
    config: RunConfig
    schema: dict
    version: str
    path: Path
    trained_max_len: int = 0  # the max_len it was trained at (config.model.max_len may be longer)
    # resolved: what the model reads and the server's request fields
    spec: FeatureSpec = field(default_factory=FeatureSpec)


class BundleError(LongerError, ValueError):
    pass


def bundle_file(path: Path, name: str) -> Path:
    """A bundle file that is a regular file inside the bundle directory: a symlink that leaves
    the directory (to /etc/passwd, say) or a device is refused."""
    f = path / name
    if not f.is_file():
        hint = (
            f"; a run directory? its bundle is {path / 'export'}"
            if (path / "export" / name).is_file()
            else ""
        )
        raise BundleError(f"{path}: not a model bundle (missing {name}{hint})")
    real, root = f.resolve(), path.resolve()
    if real.parent != root:
        raise BundleError(f"{f}: a symlink out of the bundle directory (to {real}) is refused")
    return f


def declared_version(path: str | Path) -> str | None:
    """The model_version a bundle directory's config.json declares now (None while unreadable)."""
    try:
        return json.loads(bundle_file(Path(path), "config.json").read_text())["model_version"]
    except (BundleError, OSError, ValueError, KeyError, TypeError):
        return None


def load_bundle(path: str | Path, verify: bool = True, max_len: int | None = None) -> Bundle:
    """Load a bundle into an unsharded RecModel in eval mode, checking its content hash. Any
    unloadable bundle (missing, truncated, corrupt or foreign files, symlinks out of the
    directory, weights that do not fit the config) is a BundleError naming the reason.
    `max_len` (None: the trained one): read longer histories (trainer/extrapolate.py); the
    Bundle's config then says that max_len, its version stays the files' own."""
    path = Path(path)
    files = {f: bundle_file(path, f) for f in FILES}
    try:
        raw = json.loads(files["config.json"].read_text())
        schema = json.loads(files["feature_schema.json"].read_text())
        version = raw.pop("model_version")
        cfg = RunConfig.from_dict(raw, str(files["config.json"]))
        tensors = load_file(str(files["model.safetensors"]))
    except Exception as e:  # SafetensorError is not a ValueError; a bundle is input like any other
        raise BundleError(f"{path}: unreadable bundle ({type(e).__name__}: {e})") from e
    # The hash covers the config as written (a bundle from before a key's rename stays valid).
    if verify and content_version(tensors, raw) != version:
        raise BundleError(
            f"{path}: content does not match model_version {version} (corrupt or edited bundle)"
        )
    trained_max_len = cfg.model.max_len
    if max_len is not None:
        cfg, tensors = extend_max_len(cfg, tensors, max_len, str(path))
    try:
        spec = FeatureSpec.from_json(schema["spec"]) if "spec" in schema else FeatureSpec()
        model = build_model(cfg.model, spec)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except Exception as e:  # e.g. a tensor of the wrong shape
        raise BundleError(f"{path}: weights do not fit the config ({type(e).__name__}: {e})") from e
    if missing or unexpected:
        raise BundleError(
            f"{path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return Bundle(model.eval(), cfg, schema, version, path, trained_max_len, spec)


def gather_unsharded(dmp) -> dict[str, torch.Tensor] | None:
    """Every weight of a DistributedModelParallel-wrapped TrainModule, whole, on rank 0 (a
    collective: every rank calls it). Names are the RecModel's own (`model.` stripped)."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    main = dist.get_rank() == 0
    out = {}
    for name, value in dmp.state_dict().items():
        key = name.removeprefix("model.")
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if main else None
            value.gather(dst=0, out=full)
            value = full
        if main:
            out[key] = value.detach().cpu()
    return out if main else None
