import pytest
import torch

from longer.baselines import build_model
from longer.flops import forward_flops, measured_flops, paper_merge_ratio
from longer.config import MODELS
from tests.model_utils import make_batch
from tests.test_model import TINY


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kw", [{}, {"merge": "concat"}, {"query_select": "learnable"}, {"phd_copies": 3},
                                {"merge_k": 8, "query_k": 16, "n_layers": 2}])
def test_analytic_flops_match_flop_counter(name, kw):
    if name != "longer" and kw:
        pytest.skip("settings that only LONGER reads")
    cfg = TINY.replace(model=name, din_recent=16, **kw)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    b = make_batch([cfg.max_len] * 4, seed=1)  # full histories: the analytic case
    measured = measured_flops(m, b)
    assert measured > 0
    assert abs(measured - forward_flops(cfg)) <= 0.10 * measured, (measured, forward_flops(cfg))


def test_merge_and_queries_cut_flops_as_the_paper_says():
    cfg = TINY.replace(max_len=2048, merge_k=8, query_k=100 - 100 % 4, d_model=32)
    full = forward_flops(cfg.replace(model="transformer"))
    assert forward_flops(cfg) < 0.25 * full
    assert forward_flops(cfg.replace(merge_k=1)) > forward_flops(cfg)
    assert 0 < paper_merge_ratio(cfg) < 1
