"""serving/traced.py: the candidate side traced as one graph scores exactly as the eager model,
for every architecture, on shapes it was not traced at; a net whose score branches on a shape
(a made-up one) or does not trace is caught by the check and left eager;
LONGER_TRACE=false keeps the runtime eager."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from serving.runtime import CandidateColumns, ModelRuntime
from serving.traced import _events, trace_score
from tests.conftest import REPO
from tests.serving_utils import tiny_bundle

VARIANTS = {
    "longer": {},
    "longer_append_stable": {"encoding": "append_stable"},
    "longer_phd_hybrid_star": {"phd_copies": 2, "norm": "hybrid_star"},
    "transformer": {"arch": "transformer", "merge_k": 1},
    "base": {"arch": "base"},
    "sumpool": {"arch": "sumpool"},
    "din": {"arch": "din"},
    "hstu": {"arch": "hstu"},
}


def bundle_of(tmp_path, **overrides):
    """A bundle of configs/tiny.toml's model with `overrides`, random weights."""
    from longer.config import ModelConfig
    from longer.recmodel import build_model
    from trainer.config import RunConfig
    from trainer.export import write_bundle

    torch.manual_seed(1)
    cfg = ModelConfig.from_toml(REPO / "configs" / "tiny.toml")
    cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    write_bundle(tmp_path / "b", build_model(cfg).state_dict(), RunConfig(model=cfg), {})
    return tmp_path / "b"


def request(rt: ModelRuntime, n_events: int, n_cands: int, seed: int):
    """(state, candidates) of a user with n_events synthetic events and n_cands candidates."""
    events = _events(rt, n_events, seed)
    state = rt.encode(7, events)
    ids = np.random.default_rng(seed).integers(0, 10_000, n_cands).tolist()
    return state, rt.candidates(CandidateColumns(ids), {}, int(events["ts"][-1]) + 5)[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_traced_scores_equal_the_eager_model_on_untraced_shapes(tmp_path, variant):
    rt = ModelRuntime(str(bundle_of(tmp_path, **VARIANTS[variant])))
    assert rt.traced, f"{variant}: the candidate side fell back to eager"
    model = rt.bundle.model
    for n_events, n_cands, seed in ((rt.max_len, 13, 11), (5, 2, 12), (rt.max_len // 2 + 3, 40, 13)):
        state, cands = request(rt, n_events, n_cands, seed)
        with rt.slots():
            eager = model.score(state, cands)
        traced = torch.logit(torch.tensor(rt.score(state, cands), dtype=torch.float64))
        assert traced.shape == (n_cands,)
        torch.testing.assert_close(traced, eager[0].double(), atol=1e-5, rtol=0)


def test_a_net_branching_on_the_candidate_count_is_left_eager(tmp_path, caplog):
    rt = ModelRuntime(str(tiny_bundle(tmp_path / "b")), trace=False)
    net = rt.bundle.model.net
    plain = type(net).score_tokens

    def branching(state, cand, request_ts):  # a Python branch on a shape: a trace freezes it
        logits = plain(net, state, cand, request_ts)
        return logits * 2 if cand.shape[1] > 4 else logits

    net.score_tokens = branching
    with caplog.at_level(logging.WARNING, logger="longer.serving.runtime"):
        assert trace_score(rt) is None
    assert "differs from the model" in caplog.text


def test_a_net_that_does_not_trace_is_left_eager(tmp_path, caplog):
    rt = ModelRuntime(str(tiny_bundle(tmp_path / "b")), trace=False)

    def untraceable(state, cand, request_ts):
        return torch.tensor([cand.shape[1] * [float(cand.sum())]])  # a value read into Python

    rt.bundle.model.net.score_tokens = untraceable
    with caplog.at_level(logging.WARNING, logger="longer.serving.runtime"):
        assert trace_score(rt) is None
    assert "scoring eagerly" in caplog.text


def test_trace_off_by_setting(tmp_path, monkeypatch):
    from serving.service import Service
    from serving.settings import Settings

    bundle = tiny_bundle(tmp_path / "b")
    monkeypatch.setenv("LONGER_TRACE", "false")
    settings = Settings(model=str(bundle))
    assert settings.trace is False
    svc = Service.__new__(Service)  # load_runtime reads only the settings
    svc.settings = settings
    assert not svc.load_runtime().traced
    monkeypatch.setenv("LONGER_TRACE", "true")
    svc.settings = Settings(model=str(bundle))
    assert svc.load_runtime().traced
