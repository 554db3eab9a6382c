"""Checkpoint / resume with torch.distributed.checkpoint.

`RUN/checkpoints/step-00000100/` holds the DCP shards of {"model": sharded embeddings + dense
weights, "optim": the fused embedding optimizer's and AdamW's states} written by every rank,
plus the RNG state and `trainer_state.json` (step, the loader's world-size-independent state,
the run config), written last.
DCP reshards on load, so a run saved with N processes resumes with M. A checkpoint directory
appears under its final name only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.bin"


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(run: str | Path) -> Path | None:
    done = [p for p in (Path(run) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(run: Path, step: int, dmp, optimizer, loader_state: dict, config: dict) -> Path:
    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / RNG_FILE).write_bytes(torch.get_rng_state().numpy().tobytes())
        state = {"step": step, "loader": loader_state, "world_size": dist.get_world_size(), "config": config}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier()
    return final


def load_checkpoint(path: Path, dmp, optimizer) -> dict:
    """Restore model and optimizer states in place (any world size); returns trainer_state.json."""
    state = json.loads((path / STATE_FILE).read_text())
    optimizer.init_state()  # materialise lazy optimizer state so DCP can load into it
    target = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
    dcp.load(target, checkpoint_id=str(path))
    dmp.load_state_dict(target["model"])
    optimizer.load_state_dict(target["optim"])
    torch.set_rng_state(torch.frombuffer(bytearray((path / RNG_FILE).read_bytes()), dtype=torch.uint8))
    return state
