import copy

import pytest
import torch

from bench.batches import random_batch, split_batch
from longer.config import ARCHS, ConfigError, ModelConfig
from longer.interface import Candidates
from longer.model import Longer
from longer.recmodel import build_model
from tests.conftest import REPO

TINY = ModelConfig.from_toml(REPO / "configs" / "tiny.toml")  # max_len 64, K 4, k 8, 3 layers
LENGTHS = [0, 1, 3, 4, 5, 17, 40, 64, 90, 64]  # empty, partial groups, full, longer than max_len


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(TINY.replace(**kw)).eval()


def block_outputs(m, batch) -> list[torch.Tensor]:
    """Each attention layer's output while `m` encodes `batch`'s users (no grad)."""
    captured = []
    hooks = [blk.register_forward_hook(lambda mod, a, out: captured.append(out)) for blk in m.net.blocks]
    with torch.no_grad():
        m.encode_user(batch)
    for h in hooks:
        h.remove()
    return captured


ENCODINGS = pytest.mark.parametrize("encoding", ["recency", "append_stable"])


@ENCODINGS
@pytest.mark.parametrize("norm", ["pre", "post", "hybrid", "hybrid_star"])
@pytest.mark.parametrize("R", [1, 2, 3])
def test_split_equals_unsplit_reference(norm, R, encoding):
    m = model(norm=norm, phd_copies=R, encoding=encoding)
    b = random_batch(LENGTHS)
    with torch.no_grad():
        split, ref = m(b), m.forward_reference(b)
    assert torch.isfinite(split).all()
    torch.testing.assert_close(split, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {"query_select": "uniform"},
        {"query_select": "learnable"},
        {"merge": "concat"},
        {"merge_k": 1},
        {"arch": "transformer"},
        {"query_k": 64},
        {"encoding": "append_stable", "query_select": "learnable"},
        {"encoding": "append_stable", "merge": "concat"},
        {"encoding": "append_stable", "merge_k": 1},
        {"encoding": "append_stable", "time_bias": False},
        {"encoding": "append_stable", "arch": "transformer"},
        {"encoding": "append_stable", "query_k": 64},
    ],
)
def test_split_equals_reference_other_settings(kw):
    m = model(**kw)
    b = random_batch(LENGTHS, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(m(b), m.forward_reference(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_many_candidates_against_one_state_equal_per_sample_forward(name):
    """The serving path: one user × N candidates scored against one UserState."""
    m = model(arch=name, phd_copies=2 if name == "longer" else 1, cand_chunk=4)
    n = 11  # not a multiple of cand_chunk: exercises the padding of the last chunk
    base = random_batch([37], seed=2)
    hist, _, ts = split_batch(base)
    cands = [(i * 7 + 3, i % 5) for i in range(n)]
    per_sample = random_batch([37] * n, hist=hist * n, cand=cands, ts=ts * n, users=[1] * n)
    with torch.no_grad():
        expected = m(per_sample)
        state = m.encode_user(base)
        got = m.score(
            state,
            Candidates(
                item_id=torch.tensor([[c[0] for c in cands]]),
                category_id=torch.tensor([[c[1] for c in cands]]),
                ts=torch.tensor(ts),
            ),
        )
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)


@ENCODINGS
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_candidate_attention_equals_masked_sdpa(R, encoding, precision):
    """Inference's candidate attention (user keys unmasked + own keys, merged by log-sum-exp;
    the append-stable time/position bias included) equals the masked SDPA path of training,
    for users of every history length (padded keys) and a state stored at lower precision."""
    m = model(phd_copies=R, encoding=encoding, cand_chunk=4)
    n = 9
    with torch.no_grad():
        state = m.encode_user(random_batch(LENGTHS, seed=4))
        state = type(state)(
            {k: v.to(precision) if v.is_floating_point() else v for k, v in state.tensors.items()}
        )
        cands = Candidates(
            item_id=torch.arange(len(LENGTHS) * n).reshape(-1, n) * 13 + 1,
            category_id=torch.arange(len(LENGTHS) * n).reshape(-1, n) % 7,
            ts=torch.full((len(LENGTHS),), 2_000_000_000),
        )
        emb = m.embedding.candidates(cands)
        tokens = m.net.features.candidate_tokens(emb, {}, cands.ts, state["latest_ts"])
        merged = m.net.score_merged(state, tokens, cands.ts)
        masked = m.net.score_masked(state, tokens, cands.ts)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_candidate_never_changes_the_user_state(name):
    m = model(arch=name, phd_copies=3 if name == "longer" else 1)
    b = random_batch(LENGTHS, seed=3)
    hist, cand, ts = split_batch(b)
    other = random_batch(LENGTHS, hist=hist, cand=[(c[0] + 1, c[1] + 1) for c in cand], ts=ts)
    with torch.no_grad():
        s1, s2 = m.encode_user(b), m.encode_user(other)
        assert s1.tensors.keys() == s2.tensors.keys()
        for k in s1.tensors:
            assert torch.equal(s1[k], s2[k]), k  # bit-identical
        assert not torch.allclose(m(b), m(other))  # while the scores do depend on the candidate


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"query_select": "uniform"},
        {"merge": "concat"},
        {"norm": "pre"},
        {"arch": "transformer"},
        {"encoding": "append_stable"},
        {"encoding": "append_stable", "merge": "concat"},
        {"encoding": "append_stable", "norm": "pre"},
        {"encoding": "append_stable", "arch": "transformer"},
    ],
)
def test_queries_never_see_later_events(kw):
    """Perturbing events more recent than recency r leaves every sequence query at recency >= r unchanged."""
    m = model(**kw)
    L, r = 64, 5
    b = random_batch([L], seed=4)
    hist, cand, ts = split_batch(b)
    later = copy.deepcopy(hist)
    for key in ("hist_item_id", "hist_category_id", "hist_action"):
        for j in range(L - r, L):  # oldest-first lists: the last r events are the r most recent
            later[0][key][j] = (later[0][key][j] + 5) % 20 + 1
    b2 = random_batch([L], hist=later, cand=cand, ts=ts)
    outs = [block_outputs(m, batch) for batch in (b, b2)]
    r_q = m.net._query_offsets(L, "cpu")
    n_glob = 2
    older = n_glob + torch.nonzero(r_q >= r).flatten()
    newer = n_glob + torch.nonzero(r_q < r).flatten()
    assert len(older) and len(newer)
    for layer_a, layer_b in zip(*outs):
        if (
            layer_a.shape[1] == 1
        ):  # append-stable's last layer runs CLS only (its queries' outputs are never kept)
            continue
        torch.testing.assert_close(layer_a[:, older], layer_b[:, older], atol=0, rtol=0)
        assert not torch.allclose(layer_a[:, newer], layer_b[:, newer])
    # the global tokens and the score do see the whole history
    assert not torch.allclose(outs[0][-1][:, 0], outs[1][-1][:, 0])


@pytest.mark.parametrize("name", ARCHS + ("append_stable",))
def test_extra_padding_leaves_scores_unchanged(name):
    """A sample scored alone equals the same sample in a batch padded for a longer history."""
    m = model(encoding="append_stable") if name == "append_stable" else model(arch=name)
    alone = random_batch([9], seed=5)
    hist, cand, ts = split_batch(alone)
    long = random_batch([60], seed=6)
    h2, c2, t2 = split_batch(long)
    together = random_batch([9, 60], hist=hist + h2, cand=cand + c2, ts=ts + t2)
    with torch.no_grad():
        torch.testing.assert_close(m(alone)[0], m(together)[0], atol=1e-5, rtol=0)


def test_history_beyond_max_len_is_ignored():
    m = model()
    b = random_batch([100], seed=7)
    hist, cand, ts = split_batch(b)
    cut = [{k: v[-64:] for k, v in hist[0].items()}]
    with torch.no_grad():
        torch.testing.assert_close(m(b), m(random_batch([64], hist=cut, cand=cand, ts=ts)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"phd_copies": 2, "norm": "hybrid_star"},
        {"query_select": "learnable"},
        {"merge": "concat"},
        {"arch": "transformer"},
        {"arch": "din"},
        {"arch": "din_recent50"},
        {"arch": "sumpool"},
        {"arch": "hstu"},
    ],
)
def test_every_parameter_gets_a_gradient(kw):
    m = model(**kw).train()
    b = random_batch([64, 70, 30, 5, 64, 64], seed=8)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.labels)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # embedding rows only get gradients where looked up; tables as a whole must
    assert not missing, missing
    dead = [n for n, p in m.named_parameters() if p.grad.abs().sum() == 0 and "embeddings" not in n]
    assert not dead, dead


@pytest.mark.parametrize("name", ["longer", "hstu", "din"])
def test_bf16_autocast_close_to_fp32(name):
    m = model(arch=name, phd_copies=2 if name == "longer" else 1)
    b = random_batch(LENGTHS, seed=9)
    with torch.no_grad():
        ref = m(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(b)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * max(1.0, ref.abs().max().item())


def test_activation_checkpointing_gives_the_same_gradients():
    b = random_batch([64, 20, 3], seed=10)
    grads = []
    for ckpt in (False, True):
        m = model(checkpoint=ckpt).train()
        torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.labels).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_each_model_learns(name):
    """A few Adam steps on a fixed batch with a learnable rule drive the loss down."""
    m = model(arch=name).train()
    b = random_batch([64, 64, 40, 12, 64, 50, 64, 33] * 4, seed=11)
    b.labels = (b.sparse["item_id"].values() % 2).float()  # the candidate's id decides
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"n_heads": 5}, "does not divide d_model"),
        ({"query_k": 65}, "query_k=65 is larger than max_len=64"),
        ({"merge_k": 128}, "larger than max_len"),
        ({"merge_k": 3}, "must divide max_len"),
        ({"norm": "layer"}, "norm must be one of"),
        ({"phd_copies": 0}, "phd_copies must be an integer >= 1"),
        ({"arch": "gpt"}, "arch must be one of"),
    ],
)
def test_impossible_configs_are_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TINY.replace(**kw)


def test_toml_configs_load_and_unknown_keys_are_refused(tmp_path):
    for name in ("tiny", "ml_small", "paper"):
        ModelConfig.from_toml(REPO / "configs" / f"{name}.toml")
    paper = ModelConfig.from_toml(REPO / "configs" / "paper.toml")
    assert (paper.max_len, paper.merge_k, paper.merge, paper.query_k) == (2000, 8, "inner_trans", 100)
    (tmp_path / "bad.toml").write_text("[model]\nmax_len = 10\nheads = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'heads'"):
        ModelConfig.from_toml(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        ModelConfig.from_toml(tmp_path / "broken.toml")


def test_transformer_is_longer_without_merge_or_query_sampling():
    m = model(arch="transformer")
    assert isinstance(m.net, Longer) and m.cfg.merge_k == 1 and m.cfg.query_k == TINY.max_len


def test_phd_copy_j_never_sees_later_copies():
    m = model(phd_copies=3)
    b = random_batch([30, 64], seed=12)
    outs = []
    for bump in (0.0, 1.0):
        with torch.no_grad():
            m.net.copy_emb[2] += bump
            captured = []
            hooks = [
                blk.register_forward_hook(lambda mod, a, out: captured.append(out)) for blk in m.net.blocks
            ]
            m.eval()(b)
            for h in hooks:
                h.remove()
        outs.append([c for c in captured if c.shape[1] == 2 * 3])  # the candidate-side calls
    for before, after in zip(*outs):
        torch.testing.assert_close(before[:, :4], after[:, :4], atol=0, rtol=0)  # copies 0 and 1
        assert not torch.allclose(before[:, 4:], after[:, 4:])
