"""Bundles written before `[model] model` became `[model] arch` still load (fast; no training)."""

import json

import pytest
import torch

from longer.config import ModelConfig
from longer.recmodel import build_model
from tests.conftest import REPO
from trainer.config import RunConfig
from trainer.export import BundleError, content_version, load_bundle, write_bundle

TINY = ModelConfig.from_toml(REPO / "configs" / "tiny.toml")


def _as_before_the_rename(bundle, tensors) -> dict:
    """Rewrite config.json as the old code wrote it: `model` for the kind, hashed that way."""
    path = bundle / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("model_version")
    raw["model"] = {("model" if k == "arch" else k): v for k, v in raw["model"].items()}
    path.write_text(json.dumps({**raw, "model_version": content_version(tensors, raw)}, indent=2))
    return raw


def test_a_bundle_from_before_the_arch_rename_loads_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY.replace(arch="din"))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_bundle(tmp_path / "b", tensors, RunConfig(model=TINY.replace(arch="din")), {})
    old = _as_before_the_rename(tmp_path / "b", tensors)
    assert old["model"]["model"] == "din" and "arch" not in old["model"]
    with pytest.warns(FutureWarning, match=r"rename \[model\] model to \[model\] arch"):
        b = load_bundle(tmp_path / "b")
    assert b.config.model.arch == "din" and type(b.model.net).__name__ == "DIN"
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, tensors[k]), k
    # the old hash is still checked: an edited old bundle is refused
    text = (tmp_path / "b" / "config.json").read_text()
    assert '"n_layers": 3' in text
    (tmp_path / "b" / "config.json").write_text(text.replace('"n_layers": 3', '"n_layers": 2'))
    with pytest.warns(FutureWarning), pytest.raises(BundleError, match="does not match model_version"):
        load_bundle(tmp_path / "b")
