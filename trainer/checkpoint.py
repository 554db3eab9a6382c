"""Checkpoint / resume with torch.distributed.checkpoint (DCP), in safetensors.

`RUN/checkpoints/step-00000100/` holds {"model": sharded embeddings + dense weights, "optim":
the fused embedding optimizer's and AdamW's states}, written by every rank through DCP's
HuggingFaceStorageWriter (`shard-<rank>-model-00001-of-00001.safetensors`: raw tensors, their
shard offsets in the JSON header), plus the RNG state, `trainer_state.json` (step, the
loader's world-size-independent state, the run config) and, written last, `manifest.json`:
the size and sha256 of every other file. The directory appears under its final name only
when complete. DCP reshards on load, so a run saved with N processes resumes with M.

Trust: nothing in a checkpoint is unpickled. DCP's default FileSystemWriter/Reader keep the
metadata in a pickle (`.metadata`, read with `pickle.load`) and restore non-tensor items with
`torch.load(weights_only=False)`; its safetensors storage, used here, keeps metadata in JSON
headers and holds tensors only (`save_checkpoint` refuses anything else). A checkpoint is read
only after its files match its manifest (`verify_checkpoint`: no file missing, extra, resized,
altered or a symlink): that catches corrupt and half-copied checkpoints. docs/operations.md
says who may write run directories.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from longer.errors import LongerError

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.bin"
MANIFEST = "manifest.json"


class CheckpointError(LongerError, ValueError):
    pass


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(run: str | Path) -> list[Path]:
    """Checkpoint directories that finished writing (they hold a manifest), newest first."""
    done = [
        p
        for p in (Path(run) / "checkpoints").glob("step-*")
        if p.name.removeprefix("step-").isdigit() and (p / MANIFEST).is_file()
    ]
    return sorted(done, key=step_of, reverse=True)


def latest_checkpoint(run: str | Path) -> Path | None:
    done = complete_checkpoints(run)
    return done[0] if done else None


def remove_partial_checkpoints(run: str | Path, log=print) -> None:
    """Remove the `step-N.partial` directories a killed save left (one trainer job writes a run
    directory at a time; every rank of a restarted job is past this point only after rank 0)."""
    for p in sorted((Path(run) / "checkpoints").glob("step-*.partial")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            log(f"longer: removed {p} (a checkpoint whose save did not finish)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(path.iterdir())
        if p.name != MANIFEST
    }
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=2) + "\n")
    tmp.rename(path / MANIFEST)


def verify_checkpoint(path: Path) -> None:
    """CheckpointError naming the first file that does not match the manifest; reads no file
    but the manifest (JSON) and the bytes it hashes."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = {str(name): (int(m["size"]), str(m["sha256"])) for name, m in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({type(e).__name__}: {e})") from None
    present = {p.name: p for p in path.iterdir() if p.name != MANIFEST}
    for name in sorted(set(present) - set(expected)):
        raise CheckpointError(f"{path}: {name} is not in the checkpoint's manifest (added after the save)")
    for name, (size, digest) in sorted(expected.items()):
        f = present.get(name)
        if f is None:
            raise CheckpointError(f"{path}: {name} is missing")
        if f.is_symlink() or not f.is_file():
            raise CheckpointError(f"{path}: {name} is not a regular file")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {size} "
                f"(truncated or replaced)"
            )
        if _sha256(f) != digest:
            raise CheckpointError(
                f"{path}: {name} does not match its sha256 in the manifest (corrupt or edited)"
            )


def choose_checkpoint(run: str | Path, fallback: bool, log=print) -> Path | None:
    """The newest complete checkpoint whose files match its manifest. With `fallback` (auto-
    resume), a checkpoint that fails the check is skipped, with a message, for the previous
    one; without, it is a CheckpointError. None when the run has no complete checkpoint."""
    for path in complete_checkpoints(run):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(
                    f"{e}; refusing to resume from it (--auto-resume falls back to the "
                    f"previous valid checkpoint)"
                ) from None
            log(f"auto-resume: skipping {path.name}: {e}")
    return None


def tensors_only(state, where: str = "") -> None:
    """The safetensors storage holds tensors only: refuse (loudly) anything else, which it
    would otherwise write as raw bytes that no reader finds."""
    if isinstance(state, dict):
        for k, v in state.items():
            tensors_only(v, f"{where}.{k}" if where else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            tensors_only(v, f"{where}[{i}]")
    elif not isinstance(state, torch.Tensor):
        raise TypeError(f"checkpoint state {where} is a {type(state).__name__}, not a tensor")


def save_checkpoint(
    run: Path, step: int, dmp, optimizer, loader_state: dict, config: dict, extra: dict | None = None
) -> Path:
    """`extra`: more JSON state for trainer_state.json (the early-stop state)."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
    tensors_only(state)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / RNG_FILE).write_bytes(torch.get_rng_state().numpy().tobytes())
        state = {
            "step": step,
            "loader": loader_state,
            "world_size": dist.get_world_size(),
            "config": config,
            **(extra or {}),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        write_manifest(tmp)  # last: a checkpoint without one is incomplete
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier()
    return final


def load_checkpoint(path: Path, dmp, optimizer) -> dict:
    """Restore model and optimizer states in place (any world size); returns trainer_state.json.
    `path` comes from `choose_checkpoint` (verified against its manifest on rank 0). Reads JSON
    and safetensors only."""
    state = json.loads((path / STATE_FILE).read_text())
    optimizer.init_state()  # materialise lazy optimizer state so DCP can load into it
    target = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
    try:
        dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path)))
    except (
        Exception,
        CheckpointException,
    ) as e:  # files matching their manifest, but no checkpoint of this model
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable checkpoint of this model ({type(e).__name__}: {last[:300]})"
        ) from e
    dmp.load_state_dict(target["model"])
    optimizer.load_state_dict(target["optim"])
    torch.set_rng_state(torch.frombuffer(bytearray((path / RNG_FILE).read_bytes()), dtype=torch.uint8))
    return state
