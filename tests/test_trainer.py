"""The trainer end to end, in subprocesses (one process, and torchrun with 2 gloo processes)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from feature_store.builder import BuildConfig, build
from feature_store.synth import SynthConfig, synthesize
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_toml(max_len=64, steps=16, batch=64, train_extra="") -> str:
    """A small run config: the model shape every trainer test uses, and its [train] table."""
    return f"""
[model]
max_len = {max_len}
d_model = 32
n_heads = 4
n_layers = 2
emb_dim = 16
merge_k = 4
query_k = 16
item_buckets = 200003
category_buckets = 64
user_buckets = 1009

[train]
steps = {steps}
batch_size = {batch}
eval_batch_size = 512
log_every = 4
{train_extra}
"""


TINY_RUN = run_toml(train_extra="warmup_steps = 4\nprefetch = 0")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    synthesize(SynthConfig(users=120, items=600, events_per_user=120, seed=5), root / "log", progress=False)
    build(root / "log", root / "data", BuildConfig(max_len=64, test_days=5), progress=False)
    (root / "run.toml").write_text(TINY_RUN)
    return root


def run(args, world=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if world == 1:
        cmd = [sys.executable, "-m", "longer_cli", *map(str, args)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            "-m",
            "trainer",
            *map(str, args[1:]),
        ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def train(small, out, *overrides, world=1, resume=False, check=True):
    args = [
        "train",
        "--config",
        small / "run.toml",
        "--data",
        small / "data",
        "--out",
        out,
        "--quiet",
        *overrides,
    ]
    if resume:
        args.append("--resume")
    return run(args, world=world, check=check)


def weights(run_dir):
    return load_file(str(run_dir / "export" / "model.safetensors"))


def last_metrics(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1])


def test_two_processes_shard_a_table_and_match_the_bundle_eval(small, tmp_path):
    out = tmp_path / "run"
    train(small, out, "train.sharding=row_wise", "train.eval_every=8", world=2)
    plan = (out / "plan.txt").read_text()
    assert "rank 0 rows" in plan and "rank 1 rows" in plan  # a table split across both ranks
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # step 8 and the end
    trained = last_metrics(out)
    evaluated = json.loads(
        run(
            [
                "eval",
                "--model",
                out / "export",
                "--data",
                small / "data",
                "--quiet",
                "--predictions",
                tmp_path / "p.parquet",
            ]
        ).stdout
    )
    for k in ("auc", "gauc"):
        assert abs(trained[k] - evaluated[k]) < 1e-9, k
    for k in ("logloss", "calibration"):
        assert abs(trained[k] - evaluated[k]) < 1e-6, k
    assert trained["n"] == evaluated["n"] == pq.read_metadata(tmp_path / "p.parquet").num_rows
    a = pq.read_table(out / "predictions.parquet").to_pydict()
    b = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert a["row_id"] == b["row_id"]
    assert np.abs(np.array(a["logit"]) - np.array(b["logit"])).max() < 1e-5
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())


def test_resume_equals_uninterrupted(small, tmp_path):
    """A run killed after its step-8 checkpoint and resumed ends with the uninterrupted run's weights."""
    full = tmp_path / "full"
    flags = ("train.deterministic=true", "train.checkpoint_every=8", "train.eval_every=0")
    train(small, full, *flags)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000016")
    shutil.rmtree(cut / "export")
    summary = json.loads(train(small, cut, *flags, resume=True).stdout)
    assert summary["steps"] == 16
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    state = json.loads((cut / "checkpoints" / "step-00000016" / "trainer_state.json").read_text())
    assert state["loader"]["position"] == 16 * 64


def test_resume_across_world_sizes(small, tmp_path):
    out = tmp_path / "run"
    train(small, out, "train.steps=6", "train.sharding=row_wise", world=2)
    summary = json.loads(train(small, out, "train.steps=10", "train.sharding=row_wise", resume=True).stdout)
    assert summary["steps"] == 10 and summary["world_size"] == 1
    state = json.loads((out / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["loader"]["position"] == 6 * 2 * 64 + 4 * 64  # no sample skipped or repeated
    train(small, out, "train.steps=12", "train.sharding=row_wise", world=2, resume=True)
    state = json.loads((out / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert state["loader"]["position"] == 6 * 2 * 64 + 4 * 64 + 2 * 2 * 64
    assert all(np.isfinite(t.numpy()).all() for t in weights(out).values())


def test_user_errors(small, tmp_path):
    out = tmp_path / "run"
    r = train(small, out, "train.lr=fast", check=False)
    assert r.returncode == 2 and "lr must be float" in r.stderr
    r = train(small, out, "model.max_len=128", check=False)
    assert r.returncode == 2 and "exceeds the dataset's --max-len 64" in r.stderr
    r = train(small, out, resume=True, check=False)
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr
    train(small, out, "train.steps=2")
    r = train(small, out, "train.steps=2", check=False)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = train(small, out, "model.d_model=64", resume=True, check=False)
    assert r.returncode == 2 and "model config differs" in r.stderr and "d_model" in r.stderr
    r = run(["eval", "--model", small, "--data", small / "data"], check=False)
    assert r.returncode == 2 and "not a model bundle" in r.stderr
    r = run(["eval", "--model", out, "--data", small / "data"], check=False)
    assert r.returncode == 2 and f"its bundle is {out / 'export'}" in r.stderr


def test_overwrite_replaces_a_run_only_once_the_new_one_has_finished(small, tmp_path):
    out = tmp_path / "run"
    first = json.loads(train(small, out, "train.steps=2").stdout)
    r = train(small, out, "train.steps=2", "--overwrite", resume=True, check=False)
    assert r.returncode == 2 and "cannot be combined" in r.stderr
    leftover = tmp_path / ".run.partial-overwrite"  # what an interrupted --overwrite leaves behind
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    r = train(small, out, "train.steps=3", "--overwrite")
    assert "replaces" in r.stderr  # never silently
    second = json.loads(r.stdout)
    assert (
        second["run"] == str(out)
        and second["steps"] == 3
        and second["model_version"] != first["model_version"]
    )
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 3
    assert (
        json.loads((out / "export" / "config.json").read_text())["model_version"] == second["model_version"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial or old directory left


def test_auto_resume_restarts_what_an_elastic_restart_finds(small, tmp_path):
    """--auto-resume: step 0 in a fresh directory or over a same-config attempt that died before
    its first checkpoint; the latest checkpoint when there is one; never over another run."""
    out = tmp_path / "run"
    flags = ["train.steps=4", "--auto-resume"]
    train(small, out, *flags)
    reference = weights(out)
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "export")
    (out / "metrics.jsonl").write_text('{"step": 2, "auc": 0.1}\n')  # the dead attempt's
    summary = json.loads(train(small, out, *flags).stdout)
    assert summary["steps"] == 4 and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert all(np.allclose(reference[k].numpy(), v.numpy(), atol=1e-6) for k, v in weights(out).items())
    r = train(small, out, "train.steps=4", "train.lr=0.1", "--auto-resume", check=False)  # another config
    assert r.returncode == 2 and "differs from the checkpoint" in r.stderr
    shutil.rmtree(out / "checkpoints")
    r = train(small, out, "train.steps=4", "train.lr=0.1", "--auto-resume", check=False)
    assert r.returncode == 2 and "not empty" in r.stderr


def test_corrupt_bundle_is_refused(small, tmp_path):
    out = tmp_path / "run"
    train(small, out, "train.steps=2")
    cfg = json.loads((out / "export" / "config.json").read_text())
    cfg["model_version"] = "0" * 16
    (out / "export" / "config.json").write_text(json.dumps(cfg))
    r = run(["eval", "--model", out / "export", "--data", small / "data"], check=False)
    assert r.returncode == 2 and "does not match model_version" in r.stderr


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_are_verified_and_auto_resume_falls_back(small, tmp_path):
    """A checkpoint whose files do not match its manifest is refused by --resume (naming the
    file) and skipped by --auto-resume, which resumes from the previous one; metrics.jsonl then
    holds every eval step exactly once (the killed attempt's later lines are dropped)."""
    out = tmp_path / "run"
    flags = ("train.steps=12", "train.checkpoint_every=6", "train.eval_every=3")
    train(small, out, *flags)
    shutil.rmtree(out / "export")
    shard = next((out / "checkpoints" / "step-00000012").glob("*.safetensors"))
    flip_a_byte(shard)
    (out / "checkpoints" / "step-00000012.partial").mkdir()  # a save that was killed
    r = train(small, out, *flags, resume=True, check=False)
    assert r.returncode == 2 and f"{shard.name} does not match its sha256" in r.stderr
    r = train(small, out, *flags, "--auto-resume", check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "auto-resume: skipping step-00000012" in r.stderr
    assert "removed" in r.stderr and not (out / "checkpoints" / "step-00000012.partial").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]
    assert json.loads(r.stdout)["steps"] == 12


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_never_runs_code(small, tmp_path):
    """Someone who can write the run directory plants pickles that run code — a DCP `.metadata`
    and a shard replaced by one — and rewrites the manifest to match: resume reads JSON and
    safetensors only, so it refuses the shard (naming it) and runs nothing."""
    import pickle

    from trainer.checkpoint import write_manifest

    out = tmp_path / "run"
    train(small, out, "train.steps=4", "train.checkpoint_every=2")
    ck = out / "checkpoints" / "step-00000004"
    assert not list(ck.glob("*.distcp")) and not (ck / ".metadata").exists()  # no pickled format at all
    marker = tmp_path / "pwned"
    (ck / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    r = train(small, out, "train.steps=6", "train.checkpoint_every=2", resume=True, check=False)
    assert r.returncode == 2 and ".metadata is not in the checkpoint's manifest" in r.stderr
    (ck / "manifest.json").unlink()
    write_manifest(ck)
    r = train(small, out, "train.steps=6", "train.checkpoint_every=2", resume=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]  # the planted file is never read
    shard = next(ck.glob("*.safetensors"))
    shard.write_bytes(pickle.dumps(RunsCode(marker)))
    (ck / "manifest.json").unlink()
    write_manifest(ck)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    r = train(small, out, "train.steps=6", "train.checkpoint_every=2", resume=True, check=False)
    assert r.returncode == 2 and not marker.exists()
    assert "step-00000004: not a readable checkpoint of this model" in r.stderr, r.stderr[-2000:]
