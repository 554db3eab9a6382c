"""`longer bench quality`: the tables machinery, on a tiny budget (the figures themselves come
from the documented full run, docs/results.md)."""

import json
import math

import pytest

from bench.quality import (
    SCALING_ARCHS,
    TRANSFORMER_MAX_LEN,
    default_lengths,
    power_law,
    scaling_fits,
    variants,
)
from bench.verdict import STATES
from longer.config import ModelConfig
from longer.flops import forward_flops
from tests.test_trainer import run

TINY = """
[model]
max_len = {max_len}
d_model = 16
n_heads = 2
n_layers = 2
emb_dim = 8
merge_k = 4
query_k = 10
item_buckets = 1009
category_buckets = 64
user_buckets = 127

[train]
steps = 4
batch_size = 32
eval_batch_size = 512
log_every = 2
"""


def tiny_config(tmp_path, max_len=32, arch="longer"):
    path = tmp_path / f"tiny-{max_len}-{arch}.toml"
    path.write_text(TINY.format(max_len=max_len).replace("[model]", f'[model]\narch = "{arch}"'))
    return path


def bench(tmp_path, data, out, *extra, check=True):
    return run(
        [
            "bench",
            "quality",
            "--data",
            data,
            "--config",
            tiny_config(tmp_path),
            "--out",
            out,
            "--quiet",
            "--jobs",
            "2",
            *extra,
        ],
        check=check,
    )


def test_variants_cover_the_paper_tables_and_share_the_base():
    base = ModelConfig(max_len=512, merge_k=8, query_k=100)
    vs = variants(base, [128, 512])
    tables = {v.table for v in vs}
    assert tables == {"baselines", "merge", "queries", "norms", "phd", "scaling"}
    labels = {(v.table, v.label) for v in vs}
    for want in [
        ("baselines", m) for m in ("sumpool", "din_recent50", "din", "hstu", "transformer", "longer")
    ] + [
        ("merge", "K=1 (no merge)"),
        ("merge", "K=4 concat"),
        ("merge", "K=8 inner_trans"),
        ("queries", "all (512) recent"),
        ("queries", "k=100 recent"),
        ("queries", "k=50 uniform"),
        ("queries", "k=20 learnable"),
        ("norms", "hybrid_star"),
        ("phd", "R=3"),
        ("scaling", "L=128"),
    ]:
        assert want in labels, want
    # the base LONGER is one config wherever it appears: it trains once
    base_rows = [v for v in vs if v.model == base]
    assert {v.table for v in base_rows} == tables
    assert len({v.key for v in base_rows}) == 1
    # every row differs from the base in what its table varies, and only there
    for v in vs:
        diff = {k for k, x in v.model.to_dict().items() if base.to_dict()[k] != x}
        allowed = {
            "baselines": {"arch"},
            "merge": {"merge_k", "merge"},
            "queries": {"query_k", "query_select"},
            "norms": {"norm"},
            "phd": {"phd_copies"},
            "scaling": {"max_len", "query_k"},
        }[v.table]
        assert diff <= allowed, (v.table, v.label, diff)


def test_scaling_archs_compare_baselines_across_lengths():
    base = ModelConfig(max_len=256, merge_k=8, query_k=16)
    lengths = [64, 256, 1024, 2048]
    vs = [v for v in variants(base, lengths, tables=("scaling",), scaling_archs=SCALING_ARCHS)]
    by_arch = {}
    for v in vs:
        by_arch.setdefault(v.model.arch, []).append(v.model.max_len)
    assert by_arch == {
        "longer": lengths,
        "transformer": [n for n in lengths if n <= TRANSFORMER_MAX_LEN],  # O(L²): only where it fits
        "din": lengths,
        "din_recent50": [2048],  # reads the latest 50 at any length: one row
    }
    assert {v.label for v in vs if v.model.arch == "din"} == {f"din L={n}" for n in lengths}
    rows = [
        {
            "table": "scaling",
            "arch": v.model.arch,
            "max_len": v.model.max_len,
            "gflops": 1.0 + v.model.max_len,
            "auc": 0.6 + 0.01 * len(str(v.model.max_len)),
        }
        for v in vs
    ]
    fits = scaling_fits(rows)
    assert set(fits) == {"longer", "transformer", "din", "din_recent50"}
    assert fits["longer"]["max_len"]["beta"] > 0 and fits["din_recent50"]["max_len"] is None
    assert variants(base, lengths, tables=("scaling",)) == [v for v in vs if v.model.arch == "longer"]


def test_default_lengths_double_up_to_the_data_and_keep_the_base():
    assert default_lengths(256, 2048, quick=False) == [32, 64, 128, 256, 512, 1024, 2048]
    assert default_lengths(256, 4096, quick=True) == [32, 256, 2048]
    assert default_lengths(96, 128, quick=False) == [32, 64, 96, 128]


def test_power_law_fit_recovers_a_known_law():
    xs = [64, 128, 256, 512, 1024]
    fit = power_law(xs, [0.7 * x**0.013 for x in xs])
    assert fit["alpha"] == pytest.approx(0.7, rel=1e-9) and fit["beta"] == pytest.approx(0.013, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert power_law([1, 2], [0.5, 0.6]) is None


@pytest.mark.slow
def test_bench_quality_writes_tables_and_resumes_from_its_journal(tmp_path, synth_dataset):
    out = tmp_path / "q"
    flags = ["--seeds", "2", "--tables", "phd,scaling", "--lengths", "16,32"]
    bench(tmp_path, synth_dataset, out, *flags)
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["variant"] for r in rows if r["table"] == "phd"] == ["R=1", "R=2", "R=3"]
    assert [r["max_len"] for r in rows if r["table"] == "scaling"] == [16, 32]
    # R=1 (the base, also L=32), R=2, R=3, L=16: 4 configs, 2 seeds each
    journal = (out / "runs.jsonl").read_text().splitlines()
    assert len(journal) == len(res["runs"]) == 8
    assert len(list((out / "predictions").glob("*.parquet"))) == 8  # every run's, for the verdicts
    by_key = {json.loads(line)["key"]: json.loads(line) for line in journal}
    for r in rows:
        assert 0 < r["auc"] < 1 and r["auc_std"] is not None and r["logloss"] > 0
        assert r["train_samples_per_s"] > 0 and r["serve_candidates_per_s"] > 0
        cfg = ModelConfig.from_dict(r["config"])
        assert r["gflops"] == pytest.approx(forward_flops(cfg) / 1e9)
        seeds = [x for x in by_key.values() if ModelConfig.from_dict(x["model"]) == cfg]
        assert sorted(x["seed"] for x in seeds) == [0, 1]
        mean = sum(x["auc"] for x in seeds) / 2
        assert r["auc"] == pytest.approx(mean)
    # one base config, one result, in every table
    base = [r for r in rows if r["variant"] in ("R=1", "L=32")]
    assert len({(r["auc"], r["gauc"], r["logloss"]) for r in base}) == 1
    assert res["scaling_fits"]["max_len"] is None  # two points: no fit
    for png in res["plots"]:
        assert (out / png).stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "PHD copies" in md and "| R=3 |" in md and "| L=16 |" in md

    # a rerun trains nothing: every run is in the journal (a cut-off last line is retrained)
    lines = journal[:-1] + [journal[-1][: len(journal[-1]) // 2]]
    (out / "runs.jsonl").write_text("\n".join(lines) + "\n")
    bench(tmp_path, synth_dataset, out, *flags)
    again = json.loads((out / "results.json").read_text())
    valid = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines() if x.endswith("}")]
    assert len(valid) == 8
    assert [r["auc"] for r in again["rows"]] == pytest.approx([r["auc"] for r in rows], abs=1e-6)


@pytest.mark.slow
def test_bench_quality_quick_covers_every_table(tmp_path, synth_dataset):
    out = tmp_path / "quick"
    converge = ["train.steps=6", "train.val_frac=0.2", "train.eval_every=2", "train.early_stop=2"]
    r = bench(tmp_path, synth_dataset, out, "--quick", *converge)
    summary = json.loads(r.stdout)
    res = json.loads((out / "results.json").read_text())
    assert res["quick"] and res["seeds"] == [0] and summary["rows"] == len(res["rows"])
    assert res["train"]["steps"] == 6 and all(x["model"]["d_model"] == 16 for x in res["runs"])
    for x in res["runs"]:  # every variant, baselines too, by the same early-stopping rule
        assert [p["step"] for p in x["curve"]] == list(range(2, x["steps"] + 1, 2)), x["curve"]
        assert x["best_step"] in [p["step"] for p in x["curve"]]
    assert "curves.png" in res["plots"] and (out / "curves.png").stat().st_size > 10_000
    assert {r["table"] for r in res["rows"]} == {"baselines", "merge", "queries", "norms", "phd", "scaling"}
    assert all(r["auc_std"] is None for r in res["rows"])
    assert len(res["comparison"]) == 6 and all(c["verdict"] in STATES for c in res["comparison"])
    for c in res["comparison"]:
        assert all(
            d["ci_low"] <= d["diff"] <= d["ci_high"] or d["verdict"] == "inconclusive" for d in c["deltas"]
        )
    md = (out / "results.md").read_text()
    assert "Table 1 analogue" in md and "| hstu |" in md and "Against the paper" in md and "0.85111" in md
    assert "**inconclusive**: the CI contains it" in md  # the rule is printed with the table
    assert "trained to convergence" in md
    assert all(math.isfinite(r["auc"]) for r in res["rows"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "16,4096"], "4096 exceeds the dataset's --max-len"),
        (["--tables", "baselines,tabel3"], "unknown table 'tabel3'"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--scaling-archs", "longer,gpt"], "unknown arch 'gpt'"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["train.stepz=3"], "unknown key 'stepz'"),
    ],
)
def test_bench_quality_refuses_bad_flags(tmp_path, synth_dataset, args, message):
    r = bench(tmp_path, synth_dataset, tmp_path / "bad", *args, check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def test_bench_quality_needs_a_longer_base(tmp_path, synth_dataset):
    r = run(
        [
            "bench",
            "quality",
            "--data",
            synth_dataset,
            "--config",
            tiny_config(tmp_path, arch="din"),
            "--out",
            tmp_path / "bad",
        ],
        check=False,
    )
    assert r.returncode == 2 and "needs a LONGER base config" in r.stderr, r.stderr


def test_features_table_is_base_and_longer_without_and_with_the_configs_features():
    base = ModelConfig(max_len=512, merge_k=8, query_k=100)
    table = {"user": ["age"], "dense": ["price"]}
    vs = variants(base, [512], tables=("features",), features=table)
    assert [(v.label, v.model.arch, v.features) for v in vs] == [
        ("base (no sequence), with features", "base", table),
        ("LONGER without features", "longer", None),
        ("LONGER with features", "longer", table),
    ]
    assert len({v.key for v in vs}) == 3  # the two LONGER rows are different runs
    assert not [v for v in variants(base, [512]) if v.table == "features"]  # no [features]: no table
