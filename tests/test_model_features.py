"""The model over a FeatureSpec with every feature kind (issue 15): user (cached, user side),
candidate, context and dense (candidate side), and list (pooled) columns of each categorical
kind. The split-vs-unsplit, serving-path, cacheability and causality properties of
tests/test_model.py, with the features in play; and the default spec is the old model."""

import copy

import pytest
import torch

from bench.batches import spec_batch, spec_candidates, spec_samples
from longer.config import ARCHS
from longer.recmodel import build_model
from longer.spec import FeatureSpec
from tests.test_model import LENGTHS, TINY, block_outputs

SPEC = FeatureSpec(
    sequence=("category_id", "action", "tags"),
    candidate=("category_id", "brand", "genres"),
    user=("age", "interests"),
    context=("device", "slots"),
    dense=("price", "dwell"),
    buckets={"tags": 50, "brand": 30, "genres": 19, "age": 7, "interests": 23, "device": 5, "slots": 11},
    lists=("tags", "genres", "interests", "slots"),
)
CANDIDATE_SIDE = ("item_id", "category_id", "brand", "genres", "price", "dwell")


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(TINY.replace(**kw), SPEC).eval()


@pytest.mark.parametrize(
    "kw", [{}, {"phd_copies": 2}, {"arch": "transformer"}, {"query_select": "learnable"}]
)
def test_split_equals_unsplit_reference_with_every_feature_kind(kw):
    m = model(**kw)
    b = spec_batch(SPEC, spec_samples(SPEC, LENGTHS))
    with torch.no_grad():
        split, ref = m(b), m.forward_reference(b)
    assert torch.isfinite(split).all()
    torch.testing.assert_close(split, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_serving_path_equals_per_sample_forward_with_every_feature_kind(name):
    """One user × N candidates (candidate, list and dense columns differ) against one UserState
    equals N training samples with the same history, user and context columns."""
    m = model(arch=name, phd_copies=2 if name == "longer" else 1, cand_chunk=4)
    n = 11
    user = spec_samples(SPEC, [37], seed=2)[0]
    others = spec_samples(SPEC, [0] * n, seed=3)
    samples = [{**user, **{k: o[k] for k in CANDIDATE_SIDE}} for o in others]
    with torch.no_grad():
        expected = m(spec_batch(SPEC, samples))
        got = m.score(m.encode_user(spec_batch(SPEC, [user])), spec_candidates(SPEC, samples))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)


def _states_equal(s1, s2) -> bool:
    assert s1.tensors.keys() == s2.tensors.keys()
    return all(torch.equal(s1[k], s2[k]) for k in s1.tensors)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("column", ["brand", "genres", "device", "slots", "price"])
def test_candidate_side_columns_never_change_the_user_state(name, column):
    """Candidate, context and dense columns (lists too) are candidate side: the cached state
    is bit-identical, while the scores do read them."""
    m = model(arch=name)
    samples = spec_samples(SPEC, LENGTHS, seed=4)
    changed = copy.deepcopy(samples)
    for s in changed:
        v = s[column]
        s[column] = (
            v + 1.5 if isinstance(v, float) else [x + 1 for x in v] + [7] if isinstance(v, list) else v + 1
        )
    b1, b2 = spec_batch(SPEC, samples), spec_batch(SPEC, changed)
    with torch.no_grad():
        assert _states_equal(m.encode_user(b1), m.encode_user(b2))
        assert not torch.allclose(m(b1), m(b2))


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("column", ["age", "interests"])
def test_user_columns_enter_the_cached_user_state(name, column):
    m = model(arch=name)
    samples = spec_samples(SPEC, LENGTHS, seed=5)
    changed = copy.deepcopy(samples)
    for s in changed:
        s[column] = [x + 1 for x in s[column]] + [3] if isinstance(s[column], list) else s[column] + 1
    b1, b2 = spec_batch(SPEC, samples), spec_batch(SPEC, changed)
    with torch.no_grad():
        assert not _states_equal(m.encode_user(b1), m.encode_user(b2))
        assert not torch.allclose(m(b1), m(b2))


@pytest.mark.parametrize("key", ["hist_tags", "hist_category_id"])
def test_queries_never_see_later_events_of_any_sequence_column(key):
    """Perturbing one sequence column (a list column too) of the r most recent events leaves
    every sequence query at recency >= r unchanged, in every layer."""
    m = model()
    L, r = 64, 5
    samples = spec_samples(SPEC, [L], seed=6)
    later = copy.deepcopy(samples)
    hist = later[0]["hist"][key]
    for j in range(L - r, L):  # oldest first: the last r events are the r most recent
        hist[j] = [x + 1 for x in hist[j]] + [2] if isinstance(hist[j], list) else hist[j] + 1
    outs = [block_outputs(m, batch) for batch in (spec_batch(SPEC, samples), spec_batch(SPEC, later))]
    r_q = m.net._query_offsets(L, "cpu")
    older, newer = 2 + torch.nonzero(r_q >= r).flatten(), 2 + torch.nonzero(r_q < r).flatten()
    for layer_a, layer_b in zip(*outs):
        torch.testing.assert_close(layer_a[:, older], layer_b[:, older], atol=0, rtol=0)
        assert not torch.allclose(layer_a[:, newer], layer_b[:, newer])


@pytest.mark.parametrize("name", ARCHS)
def test_every_parameter_gets_a_gradient_with_every_feature_kind(name):
    m = model(arch=name, din_recent=16).train()
    b = spec_batch(SPEC, spec_samples(SPEC, [64, 70, 30, 5, 64, 64, 0], seed=7))
    torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.labels).backward()
    missing = [
        n
        for n, p in m.named_parameters()
        if "embeddings" not in n and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, missing


def test_default_spec_is_the_model_before_the_spec():
    """Same parameter names and shapes as the model before issue 15 (TINY: 4 tables, the
    Tokenizer's 4-field sequence, 2-field target, 2-field context and 1-field user inputs)."""
    shapes = {n: tuple(p.shape) for n, p in build_model(TINY).state_dict().items()}
    assert shapes == {n: tuple(p.shape) for n, p in build_model(TINY, FeatureSpec()).state_dict().items()}
    e, d = TINY.emb_dim, TINY.d_model
    assert shapes["net.features.seq_proj.weight"] == (d, 4 * e)
    assert shapes["net.features.target_proj.weight"] == (d, 2 * e)
    assert shapes["net.features.context_proj.weight"] == (d, 2 * e)
    assert shapes["net.features.user_proj.weight"] == (d, e)
    tables = sorted(n.split(".")[3] for n in shapes if n.startswith("embedding.ec.embeddings."))
    assert tables == ["action", "category", "item", "user"]


def test_base_reads_no_sequence():
    """arch = base (Table 1's Base row): no history-token parameters, and history content
    beyond the latest event's time changes nothing."""
    m = model(arch="base")
    assert not [n for n, _ in m.named_parameters() if "seq_proj" in n or "pos_emb" in n or "time_emb" in n]
    samples = spec_samples(SPEC, LENGTHS, seed=8)
    changed = copy.deepcopy(samples)
    for s in changed:
        s["hist"]["hist_item_id"] = [x + 1 for x in s["hist"]["hist_item_id"]]
    with torch.no_grad():
        torch.testing.assert_close(m(spec_batch(SPEC, samples)), m(spec_batch(SPEC, changed)), atol=0, rtol=0)
