import pytest
import torch

from bench.batches import random_batch
from longer.config import ARCHS
from longer.flops import forward_flops, measured_flops, paper_merge_ratio
from longer.recmodel import build_model
from tests.test_model import TINY

CASES = [(name, {}) for name in ARCHS] + [
    ("longer", kw)
    for kw in (
        {"merge": "concat"},
        {"query_select": "learnable"},
        {"query_select": "uniform"},
        {"phd_copies": 3},
        {"merge_k": 8, "query_k": 16, "n_layers": 2},
        {"norm": "hybrid_star", "inner_layers": 2},
    )
]


@pytest.mark.parametrize("name,kw", CASES)
def test_analytic_flops_match_flop_counter(name, kw):
    cfg = TINY.replace(arch=name, din_recent=16, **kw)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    b = random_batch([cfg.max_len] * 4, seed=1)  # full histories: the analytic case
    measured = measured_flops(m, b)
    assert measured > 0
    assert abs(measured - forward_flops(cfg)) <= 0.10 * measured, (measured, forward_flops(cfg))


def test_merge_and_queries_cut_flops():
    cfg = TINY.replace(max_len=2048, merge_k=8, query_k=96, d_model=32)
    assert forward_flops(cfg) < 0.25 * forward_flops(cfg.replace(arch="transformer"))
    concat = cfg.replace(merge="concat")
    assert forward_flops(concat) < forward_flops(concat.replace(merge_k=1))


def test_paper_merge_ratio_formula():
    # (6dK + L/K) / (6d + L) for d = 32, L = 2000, K = 8 (the paper's tokens stay K·d wide)
    cfg = TINY.replace(max_len=2000, merge_k=8, d_model=32)
    assert paper_merge_ratio(cfg) == pytest.approx((6 * 32 * 8 + 2000 / 8) / (6 * 32 + 2000))


@pytest.mark.parametrize("name", ARCHS)
def test_analytic_flops_follow_the_feature_spec(name):
    """Every feature kind widens a token projection; the formula counts it (list columns: one
    embedding each, pooling is free)."""
    from bench.batches import spec_batch, spec_samples
    from tests.test_model_features import SPEC

    cfg = TINY.replace(arch=name, din_recent=16)
    torch.manual_seed(0)
    m = build_model(cfg, SPEC).eval()
    measured = measured_flops(m, spec_batch(SPEC, spec_samples(SPEC, [cfg.max_len] * 4, seed=1)))
    assert abs(measured - forward_flops(cfg, SPEC)) <= 0.10 * measured, (measured, forward_flops(cfg, SPEC))
    assert forward_flops(cfg, SPEC) > forward_flops(cfg)
