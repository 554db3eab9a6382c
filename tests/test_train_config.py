import itertools

import pytest

from longer.config import ConfigError
from tests.conftest import REPO
from trainer.config import RunConfig, TrainConfig, parse_override


def test_overrides_are_typed_and_validated():
    cfg = RunConfig.load(
        REPO / "configs" / "tiny.toml",
        ["model.merge_k=8", "train.lr=1e-3", "model.norm=pre", "train.bf16=true", "train.emb_lr=1"],
    )
    assert (cfg.model.merge_k, cfg.model.norm, cfg.train.lr, cfg.train.bf16) == (8, "pre", 1e-3, True)
    assert cfg.train.emb_lr == 1.0 and isinstance(cfg.train.emb_lr, float)
    assert parse_override("model.norm=hybrid_star") == ("model", "norm", "hybrid_star")


@pytest.mark.parametrize(
    "override,msg",
    [
        ("train.lr=abc", "lr must be float"),
        ("model.merge_k=3", "must divide max_len"),
        ("foo.x=1", "section must be 'model' or 'train'"),
        ("train.steps=2.5", "steps must be int"),
        ("model.nope=1", "unknown key 'nope'"),
        ("lr=3", "expected section.key=value"),
        ("train.decay=exp", "decay must be one of"),
        ("train.sharding=column", "sharding must be one of"),
        ("model.checkpoint=5", "checkpoint must be bool"),
        ("train.steps=0", "steps must be an integer >= 1"),
    ],
)
def test_bad_overrides_name_the_problem(override, msg):
    with pytest.raises(ConfigError, match=msg):
        RunConfig.load(REPO / "configs" / "tiny.toml", [override])


def test_unknown_table_refused(tmp_path):
    (tmp_path / "c.toml").write_text("[model]\n[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown table \\[optim\\]"):
        RunConfig.load(tmp_path / "c.toml")


def test_learning_rate_schedule():
    t = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert t.lr_at(0) == pytest.approx(0.1) and t.lr_at(9) == pytest.approx(1.0)
    assert t.lr_at(10) == pytest.approx(1.0) and t.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    lin = TrainConfig(steps=100, lr=1.0, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lin.lr_at(50) == pytest.approx(0.5)
    assert TrainConfig(steps=100, lr=2.0, warmup_steps=0, decay="none").lr_at(77) == 2.0
    values = [t.lr_at(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_old_model_key_still_loads_with_a_rename_warning(tmp_path):
    """`[model] model = ...` (before the kind was named `arch`) loads as arch, with a FutureWarning."""
    (tmp_path / "old.toml").write_text('[model]\nmodel = "din"\nmax_len = 32\n')
    with pytest.warns(FutureWarning, match=r"rename \[model\] model to \[model\] arch"):
        cfg = RunConfig.load(tmp_path / "old.toml")
    assert cfg.model.arch == "din" and cfg.model.max_len == 32
    (tmp_path / "plain.toml").write_text("[model]\nmax_len = 32\n")
    with pytest.warns(FutureWarning, match="rename"):  # the old name as a command-line override
        assert RunConfig.load(tmp_path / "plain.toml", ["model.model=hstu"]).model.arch == "hstu"
    assert RunConfig.load(REPO / "configs" / "tiny.toml", ["model.arch=sumpool"]).model.arch == "sumpool"


def test_old_and_new_model_key_together_are_refused(tmp_path):
    (tmp_path / "both.toml").write_text('[model]\nmodel = "din"\narch = "longer"\n')
    with pytest.raises(ConfigError, match=r"both\.toml \[model\]: both 'model' and 'arch'"):
        RunConfig.load(tmp_path / "both.toml")
    with pytest.raises(ConfigError, match="both 'model' and 'arch'"):
        RunConfig.load(REPO / "configs" / "tiny.toml", ["model.model=din"])  # tiny.toml sets arch
