"""Speculative TRB sampling: emitted tokens are distributed as mu_beta, and the records equal
those of the per-token decoder on the same prefixes."""

import pytest
import torch

from helpers import prompts, tiny_model
from trb.blend import blend_logprobs, trust_region_blend
from trb.models import check_pair
from trb.rollout import Sampler, _logprobs, positions_from_mask, rollout


@pytest.fixture(scope="module")
def pair():
    # peaked heads: most of the mass on tens of tokens, so 4,000 draws resolve the distributions
    s, tok = tiny_model(scale=8.0)
    t, ttok = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=8.0)
    return s, t, tok, check_pair(s, tok, t, ttok)


def rescore(model, seq, mask, stop):
    with torch.no_grad():
        return _logprobs(model(seq, attention_mask=mask, position_ids=positions_from_mask(mask)).logits, stop)


def chi2_excess(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """(Pearson chi-square / df - 1) / sqrt(2 / df), bins with expected count < 5 pooled: roughly
    a standard normal when counts are drawn from probs, large when they are not."""
    e = probs.double() * counts.sum()
    big = e >= 5
    stat = ((counts[big] - e[big]) ** 2 / e[big]).sum()
    rest = e[~big].sum()
    if rest > 0:
        stat = stat + (counts[~big].sum() - rest) ** 2 / rest
    df = max(int(big.sum()), 1)
    return (float(stat) / df - 1) / (2 / df) ** 0.5


@pytest.mark.parametrize("eps,k", [(0.01, 4), (0.03, 2), (0.2, 1), (100.0, 3)])
def test_emitted_tokens_follow_mu(pair, eps, k):
    s, t, tok, stop = pair
    n = 4000
    ids, mask = prompts(tok, ("What is 12+30-4?",))
    ids, mask = ids.repeat(n, 1), mask.repeat(n, 1)
    g = torch.Generator().manual_seed(1)
    ro = rollout(s, t, ids, mask, max_new_tokens=3, sampler=Sampler("trb", eps=eps, draft_k=k), stop=stop,
                 generator=g)
    # exact mu at position 1 (the prompt) and at position 2 given the most frequent first token
    s1, t1 = rescore(s, ids[:1], mask[:1], stop)[0, -1], rescore(t, ids[:1], mask[:1], stop)[0, -1]
    mu1, beta1, _ = trust_region_blend(s1, t1, eps)
    v = mu1.shape[-1]
    first = ro.tokens[:, 0]
    c1 = torch.bincount(first, minlength=v).double()
    a = int(c1.argmax())
    rows = (first == a) & ro.response_mask[:, 1]
    pre = torch.cat([ids[:1], torch.tensor([[a]])], 1)
    pm = torch.ones_like(pre)
    pm[:, : mask.shape[1]] = mask[:1]
    mu2, _, _ = trust_region_blend(rescore(s, pre, pm, stop)[0, -1], rescore(t, pre, pm, stop)[0, -1], eps)
    c2 = torch.bincount(ro.tokens[rows, 1], minlength=v).double()
    assert chi2_excess(c1, mu1.exp()) < 4.5 and chi2_excess(c2, mu2.exp()) < 4.5
    if eps >= 0.03:  # the test has power: the student's own distribution is rejected
        assert chi2_excess(c1, s1.exp()) > 8
    if eps == 100.0:
        assert float(beta1) == 1.0 and float(ro.beta[ro.response_mask].min()) == 1.0  # mu = teacher
    # acceptance is at least the Pinsker bound (on average)
    rate = float(ro.draft_accepted.sum() / ro.draft_proposed.sum())
    assert rate >= 1 - (eps / 2) ** 0.5 - 0.02


@pytest.mark.parametrize("k", [1, 3, 8])
def test_records_equal_per_token_decoder_on_same_prefixes(pair, k):
    s, t, tok, stop = pair
    ids, mask = prompts(tok)  # left-padded, rows of different lengths
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    eps = 0.05
    ro = rollout(s, t, ids, mask, max_new_tokens=24, sampler=Sampler("trb", eps=eps, draft_k=k), stop=stop,
                 generator=torch.Generator().manual_seed(0))
    assert ro.response_mask.sum() > 0 and ro.draft_proposed.sum() > 0
    seq, sm = ro.sequences()
    p, n = ids.shape[1], ro.tokens.shape[1]
    ls = rescore(s, seq, sm, stop)[:, p - 1 : p - 1 + n]
    lt = rescore(t, seq, sm, stop)[:, p - 1 : p - 1 + n]
    m, tk = ro.response_mask, ro.tokens[..., None]
    log_mu, beta, kl = trust_region_blend(ls, lt, eps)  # what the per-token decoder computes
    torch.testing.assert_close(ls.gather(-1, tk)[..., 0][m], ro.student_logp[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(lt.gather(-1, tk)[..., 0][m], ro.teacher_logp[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(beta[m], ro.beta[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(log_mu.gather(-1, tk)[..., 0][m], ro.behavior_logp[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(blend_logprobs(ls, lt, ro.beta).gather(-1, tk)[..., 0][m], ro.behavior_logp[m],
                               atol=1e-4, rtol=0)
    assert float(ro.kl[m].max()) <= eps and float(kl[m].max()) <= eps
    # the stop token ends a row; nothing follows it
    for row, mm in zip(ro.tokens, m):
        body = row[mm].tolist()
        assert stop.emit_id not in body[:-1]
    assert bool((ro.stopped == ((ro.tokens == stop.emit_id) & m).any(1)).all())


def test_max_new_tokens_and_bookkeeping(pair):
    s, t, tok, stop = pair
    ids, mask = prompts(tok)
    ro = rollout(s, t, ids, mask, max_new_tokens=5, sampler=Sampler("trb", eps=0.5, draft_k=4), stop=stop,
                 generator=torch.Generator().manual_seed(3))
    assert ro.tokens.shape[1] <= 5 and int(ro.response_mask.sum(1).max()) <= 5
    assert bool((ro.draft_accepted <= ro.draft_proposed).all())
