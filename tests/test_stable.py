"""The append-stable LONGER (longer/stable.py): update_user equals encode_user, appended events
leave old groups alone, the request-time bias, the state's size. (Split-vs-unsplit, causality
and padding run for both encodings in test_model.py.)"""

import pytest
import torch

from bench.batches import random_batch, split_batch
from feature_store import codec
from longer.config import ConfigError, ModelConfig
from longer.recmodel import build_model
from longer.stable import state_bytes
from tests.conftest import REPO

TINY = ModelConfig.from_toml(REPO / "configs" / "tiny.toml").replace(encoding="append_stable")


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(TINY.replace(**kw)).eval()


def user_events(n, seed):
    """One user's n events (oldest first): dict of lists, times increasing."""
    return split_batch(random_batch([n], seed=seed))[0][0]


def window_batch(h, upto, max_len, user=7):
    """The encode_user input for a user's first `upto` events: the last max_len of them."""
    lo = max(0, upto - max_len)
    part = {k: v[lo:upto] for k, v in h.items()}
    return random_batch(
        [upto - lo], hist=[part], users=[user], totals=[upto], ts=[h["ts"][upto - 1] + 60 if upto else 0]
    )


def new_events_batch(h, lo, hi, user=7):
    part = {k: v[lo:hi] for k, v in h.items()}
    return random_batch([hi - lo], hist=[part], users=[user], totals=[hi], ts=[0])


def assert_states_close(a, b):
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert a[k].shape == b[k].shape, k
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def check_updates(m, steps, start=0, n_total=None, seed=0):
    """Encode the first `start` events, then update by `steps` new events at a time; after each
    update the state equals encode_user of all events so far (and so do the scores)."""
    max_len = m.cfg.max_len
    n_total = n_total or start + sum(steps)
    h = user_events(n_total, seed)
    with torch.no_grad():
        state = m.encode_user(window_batch(h, start, max_len))
        at = start
        for n in steps:
            state = m.update_user(state, new_events_batch(h, at, at + n))
            at += n
            full = window_batch(h, at, max_len)
            assert_states_close(state, m.encode_user(full))
            torch.testing.assert_close(
                m.net.score_embedded(state, *cand_emb(m, full)), m(full)[:, None], atol=1e-5, rtol=0
            )


def cand_emb(m, batch):
    """score_embedded's candidate inputs for the one candidate of each sample."""
    return m.embedding(batch.sparse), m.net.features.sample_dense(batch), batch.ts


@pytest.mark.parametrize("norm", ["pre", "post", "hybrid", "hybrid_star"])
@pytest.mark.parametrize("R", [1, 2])
def test_update_equals_encode_every_norm(norm, R):
    check_updates(model(norm=norm, phd_copies=R), steps=[1, 1, 3, 1, 9, 1], start=5)


@pytest.mark.parametrize(
    "kw",
    [
        {"merge": "concat"},
        {"merge_k": 1},
        {"merge_k": 2},
        {"merge_k": 8},
        {"merge_k": 16, "merge": "concat"},
        {"query_select": "learnable"},
        {"time_bias": False},
        {"arch": "transformer"},
        {"phd_copies": 3, "norm": "post"},
    ],
)
def test_update_equals_encode_other_settings(kw):
    check_updates(model(**kw), steps=[1, 2, 1, 7, 4], start=3)


@pytest.mark.parametrize("merge_k", [1, 4, 8])
def test_update_while_the_window_slides_past_max_len(merge_k):
    """64 events, then one at a time and in bursts past max_len = 64 (the window drops groups)."""
    check_updates(model(merge_k=merge_k), steps=[1, 1, 1, 1, 5, 30, 1, 70, 2], start=62)


def test_update_from_an_empty_state_and_by_many_events_at_once():
    check_updates(model(), steps=[1, 200], start=0)
    check_updates(model(), steps=[63, 1], start=0, seed=1)


def test_update_of_a_batch_of_users_with_different_counts():
    m = model()
    hs = [user_events(90, s) for s in range(3)]
    starts, ends = [0, 10, 60], [5, 10, 81]

    def batch(lo, hi):
        parts = [{k: v[a:b] for k, v in h.items()} for h, a, b in zip(hs, lo, hi)]
        return random_batch([b - a for a, b in zip(lo, hi)], hist=parts, users=[1, 2, 3], totals=hi)

    with torch.no_grad():
        before = m.encode_user(batch([max(0, s - 64) for s in starts], starts))
        got = m.update_user(before, batch(starts, ends))
        want = m.encode_user(batch([max(0, e - 64) for e in ends], ends))
    assert_states_close(got, want)


def test_update_refuses_missed_events():
    m = model()
    h = user_events(20, 0)
    with torch.no_grad():
        state = m.encode_user(window_batch(h, 10, 64))
        with pytest.raises(
            ValueError, match="state holds 10 events and 3 new ones came, but the batch's hist_total is 15"
        ):
            m.update_user(state, new_events_batch(h, 12, 15))


def test_recency_model_has_no_update():
    m = model(encoding="recency")
    b = random_batch([5])
    with pytest.raises(TypeError, match="no incremental update"):
        m.update_user(m.encode_user(b), b)


def test_old_tokens_and_groups_never_change_when_events_are_appended():
    """encode_user of T and of T + n events: the kept full groups' layer-1 K/V are bit-identical."""
    m = model()
    h = user_events(40, 3)
    with torch.no_grad():
        a = m.encode_user(window_batch(h, 30, 64))  # groups 0..6 full, 7 partial (events 28, 29)
        b = m.encode_user(window_batch(h, 37, 64))
    n_glob, G = 2, 16
    # a's columns: groups -8..7 (right-aligned); b's: groups -6..9. Full groups 0..6 in both.
    ka = a["k0"][:, :, n_glob + 8 : n_glob + 15]
    kb = b["k0"][:, :, n_glob + 6 : n_glob + 13]
    torch.testing.assert_close(ka, kb, atol=1e-6, rtol=0)
    assert not torch.allclose(a["k0"][:, :, n_glob + G - 1], b["k0"][:, :, n_glob + G - 3])  # group 7 grew


def test_time_bias_makes_scores_depend_on_request_time():
    m = model()
    b = random_batch([30], seed=2)
    hist, cand, ts = split_batch(b)
    later = random_batch([30], hist=hist, cand=cand, ts=[ts[0] + 86400 * 50])
    with torch.no_grad():
        s = m.encode_user(b)
        a1 = m.net.score_embedded(s, *cand_emb(m, b))
        a2 = m.net.score_embedded(s, *cand_emb(m, later))
    assert not torch.allclose(a1, a2)


def test_every_parameter_gets_a_gradient():
    m = model(phd_copies=2).train()
    b = random_batch([64, 70, 30, 5, 64, 64], seed=8, totals=[64, 70, 30, 5, 200, 64])
    torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.labels).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_uniform_queries_and_other_archs_are_refused():
    with pytest.raises(ConfigError, match="append_stable"):
        TINY.replace(query_select="uniform")
    with pytest.raises(ConfigError, match="not 'hstu'"):
        TINY.replace(arch="hstu")


@pytest.mark.parametrize("kw", [{}, {"query_select": "learnable"}, {"merge_k": 1}])
def test_state_bytes_at_max_len(kw):
    """A user at max_len: the state's tensors, and its codec value, have the documented size."""
    m = model(**kw)
    h = user_events(200, 4)
    with torch.no_grad():
        s = m.encode_user(window_batch(h, 200, 64))
    payload = sum(t.numel() * t.element_size() for t in s.tensors.values())
    assert state_bytes(TINY) == 11_126  # the figure longer/stable.py's docstring quotes
    assert payload == state_bytes(m.cfg)
    assert s["group_ts"].shape == (1, 64 // m.cfg.merge_k) and s["group_ts"].dtype == torch.int64
    blob = codec.encode(s.tensors, "fp32", {"user_id": 7})
    header = len(blob) - state_bytes(m.cfg)
    assert 0 < header < 1500, header  # prefix, JSON header (names, shapes), digest
    assert len(codec.encode(s.tensors, "bf16")) - header <= state_bytes(m.cfg, dtype_bytes=2) + 40


def test_split_equals_reference_when_only_the_last_max_len_events_are_loaded():
    m = model(phd_copies=2)
    b = random_batch([64, 64, 64, 10], totals=[65, 66, 203, 10], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(m(b), m.forward_reference(b), atol=1e-5, rtol=0)


def test_a_batch_without_hist_total_is_refused():
    m = model()
    b = random_batch([5])
    b.hist_total = None
    with pytest.raises(ValueError, match="no hist_total"):
        m.encode_user(b)
