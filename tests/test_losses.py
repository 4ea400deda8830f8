"""Each estimator's value and gradient against autograd of the exact reverse KL."""

import pytest
import torch

from trb.losses import (
    chunked_distill_loss,
    forward_kl,
    reverse_kl_full,
    reverse_kl_sampled,
    reverse_kl_topk,
    Estimator,
    Target,
    veto_target,
)

V = 12


def exact_reverse_kl(logits_s, logits_t):
    """KL(softmax(logits_s) || softmax(logits_t)) per row, written out directly."""
    p = torch.softmax(logits_s, -1)
    return (p * (torch.log_softmax(logits_s, -1) - torch.log_softmax(logits_t, -1))).sum(-1)


def _pair(n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ls = (torch.randn(n, V, generator=g, dtype=dtype) * 2).requires_grad_(True)
    lt = torch.randn(n, V, generator=g, dtype=dtype) * 2
    return ls, lt


def _grad(fn, ls):
    (g,) = torch.autograd.grad(fn(ls).sum(), ls)
    return g


def test_full_matches_autograd_of_exact_kl():
    ls, lt = _pair()
    t = torch.log_softmax(lt, -1)
    sur, val = reverse_kl_full(torch.log_softmax(ls, -1), t)
    assert torch.allclose(val, exact_reverse_kl(ls, lt).detach())
    g_est = _grad(lambda x: reverse_kl_full(torch.log_softmax(x, -1), t)[0], ls)
    g_ref = _grad(lambda x: exact_reverse_kl(x, lt), ls)
    assert torch.allclose(g_est, g_ref, atol=1e-10)


def test_topk_equals_full_when_k_is_vocab():
    ls, lt = _pair(seed=1)
    t = torch.log_softmax(lt, -1)
    sur, val = reverse_kl_topk(torch.log_softmax(ls, -1), t, k=V)
    assert torch.allclose(val, exact_reverse_kl(ls, lt).detach())
    g_est = _grad(lambda x: reverse_kl_topk(torch.log_softmax(x, -1), t, k=V)[0], ls)
    g_ref = _grad(lambda x: exact_reverse_kl(x, lt), ls)
    assert torch.allclose(g_est, g_ref, atol=1e-10)


def test_topk_truncated_support_formula():
    """k < V: value sum_a w_a (s_a - t_a) and gradient sum_a w_a (s_a - t_a) grad s_a over S_k."""
    ls, lt = _pair(seed=2)
    t = torch.log_softmax(lt, -1)
    k = 4
    s = torch.log_softmax(ls, -1)
    idx = s.detach().topk(k, -1).indices
    w = torch.softmax(s.detach().gather(-1, idx), -1)
    lr = (s.detach() - t).gather(-1, idx)
    _, val = reverse_kl_topk(s, t, k)
    assert torch.allclose(val, (w * lr).sum(-1))
    # literal reading (no baseline)
    g_est = _grad(lambda x: reverse_kl_topk(torch.log_softmax(x, -1), t, k, baseline=False)[0], ls)
    g_ref = _grad(lambda x: (w * lr * torch.log_softmax(x, -1).gather(-1, idx)).sum(-1), ls)
    assert torch.allclose(g_est, g_ref, atol=1e-10)
    # and it differs from the full gradient (truncation is real)
    assert not torch.allclose(g_est, _grad(lambda x: exact_reverse_kl(x, lt), ls), atol=1e-3)
    # default (baseline): exactly the gradient of KL between both distributions renormalised on S_k
    g_base = _grad(lambda x: reverse_kl_topk(torch.log_softmax(x, -1), t, k)[0], ls)

    def renormalised_kl(x):
        p = torch.log_softmax(x.gather(-1, idx), -1)
        q = torch.log_softmax(lt.gather(-1, idx), -1)
        return (p.exp() * (p - q)).sum(-1)

    assert torch.allclose(g_base, _grad(renormalised_kl, ls), atol=1e-10)
    # ... which moves no logit outside S_k, so it cannot push mass onto unseen tokens
    outside = torch.ones_like(ls, dtype=torch.bool).scatter(-1, idx, False)
    assert g_base[outside].abs().max() < 1e-12 and g_est[outside].abs().max() > 1e-3


@pytest.mark.parametrize("behavior", ["student", "other"])
def test_sampled_matches_exact_gradient_in_expectation(behavior):
    """E_y~mu[ w(y) (s_y - t_y) grad s_y ] = grad KL when w = pi_S / mu (exact enumeration + MC)."""
    ls, lt = _pair(n=1, seed=3)
    t = torch.log_softmax(lt, -1)
    s = torch.log_softmax(ls, -1)
    mu = s.detach() if behavior == "student" else torch.log_softmax(torch.randn(1, V, dtype=torch.float64), -1)
    # exact expectation by enumerating the token
    g_exp = torch.zeros_like(ls)
    for y in range(V):
        tok = torch.tensor([y])
        g_y = _grad(lambda x, tok=tok: reverse_kl_sampled(torch.log_softmax(x, -1), t, tok,
                                                          mu.gather(-1, tok[:, None])[:, 0], max_weight=1e9)[0], ls)
        g_exp += mu[0, y].exp() * g_y
    g_ref = _grad(lambda x: exact_reverse_kl(x, lt), ls)
    assert torch.allclose(g_exp, g_ref, atol=1e-10)
    # Monte-Carlo: 20k samples, standard-error based tolerance
    n = 20_000
    gen = torch.Generator().manual_seed(4)
    toks = torch.multinomial(mu.exp().expand(1, V), n, replacement=True, generator=gen)[0]
    lsn = ls.detach().expand(n, V).clone().requires_grad_(True)
    sur, _ = reverse_kl_sampled(torch.log_softmax(lsn, -1), t.expand(n, V), toks, mu[0, toks], max_weight=1e9)
    (g,) = torch.autograd.grad(sur.sum(), lsn)
    mean, se = g.mean(0), g.std(0) / n**0.5
    assert ((mean - g_ref[0]).abs() <= 5 * se + 1e-6).all()


def test_sampled_direct_loss_would_have_zero_expected_gradient():
    """Why the sampled estimator is a policy gradient: differentiating (s_y - t_y) directly is useless."""
    ls, lt = _pair(n=1, seed=5)
    s = torch.log_softmax(ls, -1)
    direct = sum(s[0, y].detach().exp() * _grad(lambda x, y=y: torch.log_softmax(x, -1)[:, y], ls) for y in range(V))
    assert direct.abs().max() < 1e-12


def test_forward_kl_and_veto_target():
    ls, lt = _pair(seed=6)
    s, t = torch.log_softmax(ls, -1), torch.log_softmax(lt, -1)
    _, val = forward_kl(s, t)
    assert torch.allclose(val, exact_reverse_kl(lt, ls.detach()))
    q = veto_target(s, t, 0.5)
    assert torch.allclose(q.exp(), torch.softmax(t + 0.5 * s.detach(), -1))
    assert veto_target(s, t, 0.0) is t
    # the Veto target holds p_S constant: its gradient flows only through the KL's first argument
    g = _grad(lambda x: Estimator("full")(torch.log_softmax(x, -1), veto_target(torch.log_softmax(x, -1), t, 0.5)
                                          )[0], ls)
    q_const = veto_target(s.detach(), t, 0.5)
    g_ref = _grad(lambda x: exact_reverse_kl(x, q_const), ls)
    assert torch.allclose(g, g_ref, atol=1e-10)


@pytest.mark.parametrize("estimator", ["full", "topk", "sampled"])
def test_chunked_equals_unchunked_and_mask(estimator):
    torch.manual_seed(0)
    n, h = 37, 8
    head_s = torch.nn.Linear(h, V, bias=False).double()
    head_t = torch.nn.Linear(h, V, bias=False).double()
    hs = torch.randn(n, h, dtype=torch.float64)
    ht = torch.randn(n, h, dtype=torch.float64)
    toks = torch.randint(0, V, (n,))
    blp = torch.log_softmax(torch.randn(n, V, dtype=torch.float64), -1).gather(-1, toks[:, None])[:, 0]

    def run(chunk):
        head_s.zero_grad()
        loss, val = chunked_distill_loss(hs, head_s, ht, head_t, Estimator(estimator, k=5), tokens=toks,
                                         behavior_logprobs=blp, chunk_size=chunk)
        loss.backward()
        return loss.detach(), val, head_s.weight.grad.clone()

    hs.requires_grad_(True)
    l1, v1, g1 = run(1000)
    l2, v2, g2 = run(6)
    assert torch.allclose(l1, l2) and torch.allclose(v1, v2)
    assert torch.allclose(g1, g2, atol=1e-12)
    # token mean: equals the mean of per-row estimator values
    s = torch.log_softmax(head_s(hs).float(), -1)
    t = torch.log_softmax(head_t(ht).float(), -1)
    _, per_row = Estimator(estimator, k=5)(s, t, toks, blp)
    assert torch.allclose(v1, per_row.mean(), atol=1e-5)


def test_eos_canonicalisation_in_loss():
    """Student stops with id 0, teacher with id 1: after canonicalisation they agree exactly."""
    torch.manual_seed(0)
    h = 4
    w = torch.randn(V, h)
    w_t = w.clone()
    w_t[[0, 1]] = w[[1, 0]]  # teacher = student with the two stop ids swapped
    hs = torch.randn(3, h, requires_grad=True)
    kl_raw, _ = chunked_distill_loss(hs, lambda x: x @ w.T, hs.detach(), lambda x: x @ w_t.T, Estimator("full"))
    kl_can, _ = chunked_distill_loss(hs, lambda x: x @ w.T, hs.detach(), lambda x: x @ w_t.T, Estimator("full"),
                                     Target(stop_ids=(0, 1), canonical_stop=0))
    assert kl_raw.item() > 1e-3
    assert abs(kl_can.item()) < 1e-6


@pytest.mark.parametrize("estimator", ["full", "topk", "sampled"])
def test_minus_inf_student_logits_give_finite_gradients(estimator):
    """A student logit of -inf (a token it can never emit) keeps the loss AND every gradient finite."""
    torch.manual_seed(0)
    logits = torch.randn(4, V, dtype=torch.float64)
    logits[:, 3] = float("-inf")
    logits.requires_grad_(True)
    t = torch.log_softmax(torch.randn(4, V, dtype=torch.float64), -1)
    tokens = torch.tensor([0, 1, 2, 4])
    sur, val = Estimator(estimator, k=V)(torch.log_softmax(logits, -1), t, tokens, t.gather(-1, tokens[:, None])[:, 0])
    sur.sum().backward()
    assert torch.isfinite(sur).all() and torch.isfinite(val).all()
    assert torch.isfinite(logits.grad).all()
    if estimator == "full":  # and it is the gradient of the exact KL over the finite tokens
        keep = [i for i in range(V) if i != 3]
        x = logits.detach()[:, keep].clone().requires_grad_(True)
        ref = exact_reverse_kl(x, torch.log_softmax(t[:, keep], -1) + torch.logsumexp(t[:, keep], -1, keepdim=True))
        ref.sum().backward()
        assert torch.allclose(logits.grad[:, keep], x.grad, atol=1e-10)
