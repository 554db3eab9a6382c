"""Length extrapolation: a bundle read at a longer max_len than it was trained at
(trainer/extrapolate.py; `longer eval --max-len`, `longer serve --max-len` / LONGER_MAX_LEN)."""

import dataclasses

import pytest
import torch

from feature_store.loader import BatchLoader
from longer.config import ModelConfig
from longer.errors import UsageError
from longer.recmodel import build_model
from tests.conftest import REPO
from trainer.config import RunConfig
from trainer.export import load_bundle, write_bundle

TINY = ModelConfig.from_toml(REPO / "configs" / "tiny.toml")


def bundle(tmp_path, arch="longer", max_len=32):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, arch=arch, max_len=max_len)
    out = tmp_path / f"{arch}-{max_len}"
    write_bundle(out, build_model(cfg).state_dict(), RunConfig(model=cfg), {})
    return out


def first_batch(data, max_len):
    return next(iter(BatchLoader(data, "eval", batch_size=64, max_len=max_len, shuffle=False)))


@pytest.mark.parametrize("arch", ["longer", "transformer", "din", "din_recent50", "hstu", "sumpool"])
def test_a_longer_max_len_reads_more_and_keeps_the_trained_window(synth_dataset, tmp_path, arch):
    path = bundle(tmp_path, arch)
    trained, extended = load_bundle(path), load_bundle(path, max_len=128)
    assert extended.config.model.max_len == 128 and extended.version == trained.version
    assert extended.trained_max_len == trained.trained_max_len == 32
    short, long = first_batch(synth_dataset, 32), first_batch(synth_dataset, 128)
    assert (long.hist_lengths > 32).any()
    with torch.no_grad():
        same = extended.model(short), trained.model(short)
        torch.testing.assert_close(*same, rtol=0, atol=1e-6)  # within the trained length: unchanged
        more = extended.model(long)
    assert torch.isfinite(more).all()
    if arch != "din_recent50":  # it reads its 50 most recent events whatever max_len says
        assert not torch.allclose(more, same[0], atol=1e-4)


def test_max_len_errors_name_the_reason(synth_dataset, tmp_path):
    path = bundle(tmp_path, max_len=32)
    with pytest.raises(UsageError, match="shorter than the training max_len 32"):
        load_bundle(path, max_len=16)
    with pytest.raises(UsageError, match="cannot read max_len 130: .*merge_k=4 must divide"):
        load_bundle(path, max_len=130)
    from trainer.evaluate import eval_bundle

    with pytest.raises(UsageError, match="built with --max-len 256"):
        eval_bundle(path, synth_dataset, max_len=512, progress=False)
    res = eval_bundle(path, synth_dataset, max_len=128, progress=False)
    assert res["max_len"] == 128 and 0 < res["auc"] < 1


def test_serving_reads_the_serving_max_len(tmp_path, monkeypatch):
    from serving.runtime import ModelRuntime
    from serving.settings import Settings

    path = bundle(tmp_path, max_len=32)
    plain, longer = ModelRuntime(str(path)), ModelRuntime(str(path), max_len=64)
    assert plain.max_len == 32 and longer.max_len == 64
    assert longer.model_version == f"{plain.model_version}-L64"  # cached states never mix
    assert ModelRuntime(str(path), max_len=32).model_version == plain.model_version
    monkeypatch.setenv("LONGER_MAX_LEN", "64")
    assert Settings.from_env().max_len == 64
