"""Sampler and SamplingParams: exact masks on crafted logits, seeded reproducibility."""
import math

import pytest
import torch

from kvarn.engine.sampler import Sampler, apply_top_k, apply_top_p
from kvarn.engine.sampling_params import SamplingParams

NEG = float("-inf")


def test_top_k_mask_exact():
    x = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0]])
    assert apply_top_k(x, 1).tolist() == [[NEG, 5.0, NEG, 5.0, NEG]]      # ties with the k-th kept
    assert apply_top_k(x, 3).tolist() == [[NEG, 5.0, 3.0, 5.0, NEG]]
    assert apply_top_k(x, -1).tolist() == x.tolist()
    assert apply_top_k(x, 5).tolist() == x.tolist()


def test_top_p_mask_exact():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    x = probs.log()

    def keep(p):
        return (apply_top_p(x, p) > NEG).tolist()[0]

    assert keep(0.5) == [False, True, False, False]           # 0.5 alone reaches 0.5
    assert keep(0.79) == [False, True, False, True]           # 0.5 + 0.3
    assert keep(0.81) == [False, True, True, True]
    assert keep(0.96) == [True, True, True, True]
    assert keep(0.01) == [False, True, False, False]          # the top token always stays
    assert keep(1.0) == [True, True, True, True]


def w(p: SamplingParams):
    return p.to_wire()


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    s = Sampler()
    toks, lps = s(logits, [0, 1], [w(SamplingParams(temperature=0, logprobs=0)), w(SamplingParams(temperature=0))])
    assert toks == [1, 0]
    assert lps[1] is None
    assert math.isclose(lps[0], torch.log_softmax(logits[0], -1)[1].item(), rel_tol=1e-6)


def test_top_logprobs_are_the_n_best_in_order():
    """logprobs=N > 0: (sampled logprob, N best (id, logprob) descending); N=None/0 unchanged."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [w(SamplingParams(temperature=0.0, logprobs=3)), w(SamplingParams(temperature=0.0)),
              w(SamplingParams(temperature=0.0, logprobs=0))]
    toks, lps = Sampler()(logits, [1, 2, 3], params)
    ref = torch.log_softmax(logits, -1)
    lp0, top = lps[0]
    assert toks[0] == int(logits[0].argmax()) and lp0 == pytest.approx(ref[0, toks[0]].item())
    order = ref[0].argsort(descending=True)[:3].tolist()
    assert [t for t, _ in top] == order
    assert [v for _, v in top] == pytest.approx(ref[0, order].tolist())
    assert top[0][0] == toks[0]
    assert lps[1] is None
    assert isinstance(lps[2], float) and lps[2] == pytest.approx(ref[2, toks[2]].item())


def test_seeded_sampling_is_reproducible_and_batch_independent():
    torch.manual_seed(0)
    logits = torch.randn(50, 100)
    p = w(SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234))

    def draw(sampler, rows_before):
        out = []
        for i in range(50):
            batch = torch.cat([torch.randn(rows_before, 100), logits[i:i + 1]])
            params = [w(SamplingParams(temperature=1.0))] * rows_before + [p]
            toks, _ = sampler(batch, list(range(100, 100 + rows_before)) + [7], params)
            out.append(toks[-1])
        return out

    a = draw(Sampler(seed=0), 0)
    b = draw(Sampler(seed=99), 3)        # other engine seed, other rows in the batch
    assert a == b
    c = [Sampler()(logits[i:i + 1], [7], [w(SamplingParams(temperature=1.0, seed=4321))])[0][0] for i in range(50)]
    assert c != a
    # sampled tokens respect the masks
    for i, t in enumerate(a):
        assert t in torch.topk(logits[i], 20).indices.tolist()


def test_unseeded_requests_differ_but_follow_the_engine_seed():
    logits = torch.zeros(1, 1000)
    p = [w(SamplingParams(temperature=1.0))]
    a = [Sampler(seed=5)(logits, [1], p)[0][0] for _ in range(3)]
    s = Sampler(seed=5)
    b = [s(logits, [1], p)[0][0] for _ in range(3)]
    assert a[0] == b[0]                  # same engine seed and sequence id: same first draw
    assert len(set(b)) > 1               # the request's generator advances


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "non-empty"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
    ({"seed": "x"}, "seed"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalizes():
    p = SamplingParams(stop="###", top_k=0)
    assert p.stop_strings == ["###"] and p.top_k == -1 and p.stop_token_ids == []
