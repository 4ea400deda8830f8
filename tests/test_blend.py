"""trust_region_beta and friends against an independent float64 brute force."""

import math

import numpy as np
import pytest
import torch

from trb.blend import (
    blend_logprobs,
    canonicalize_eos,
    kl_divergence,
    sample_from_logprobs,
    skd_behavior_logprobs,
    skd_sample,
    temperature_logprobs,
    trust_region_beta,
    trust_region_blend,
)

EPS_GRID = [0.0, 1e-6, 1e-3, 0.05, 1.0, 100.0]


def kl_blend_np(s: np.ndarray, t: np.ndarray, beta: float) -> float:
    """KL(mu_beta || pi_S) in float64, written independently of trb (numpy, explicit support)."""
    if beta == 0.0:
        return 0.0
    support = np.isfinite(s) & np.isfinite(t) if beta < 1 else np.isfinite(t)
    if not support.any():
        return math.inf
    z = np.full_like(s, -np.inf)
    z[support] = t[support] if beta == 1 else (1 - beta) * s[support] + beta * t[support]
    m = z[support].max()
    logz = m + np.log(np.exp(z[support] - m).sum())
    log_mu = z[support] - logz
    if not np.isfinite(s[support]).all():
        return math.inf
    return float((np.exp(log_mu) * (log_mu - s[support])).sum())


def brute_beta(s: np.ndarray, t: np.ndarray, eps: float) -> float:
    """Largest feasible beta: dense grid, then float64 bisection inside the last feasible cell."""
    if eps == 0:
        return 0.0
    if kl_blend_np(s, t, 1.0) <= eps:
        return 1.0
    grid = np.linspace(0, 1, 101)
    feas = [g for g in grid if kl_blend_np(s, t, g) <= eps]
    lo = max(feas)
    hi = min(lo + 1 / 100, 1.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if kl_blend_np(s, t, mid) <= eps:
            lo = mid
        else:
            hi = mid
    return lo


def random_pair(rng: np.random.Generator, v: int, kind: str):
    if kind == "peaked":
        a, b = rng.normal(size=v) * rng.uniform(3, 10), rng.normal(size=v) * rng.uniform(3, 10)
    elif kind == "flat":
        a, b = rng.normal(size=v) * 0.1, rng.normal(size=v) * 0.1
    elif kind == "disjoint":
        a, b = np.full(v, -30.0), np.full(v, -30.0)
        a[rng.integers(v)] = 10.0
        b[rng.integers(v)] = 10.0
        a += rng.normal(size=v) * 0.5
        b += rng.normal(size=v) * 0.5
    elif kind == "zeros":  # exact zero-probability tokens on either side
        a, b = rng.normal(size=v) * 3, rng.normal(size=v) * 3
        if v > 2:
            a[rng.integers(v)] = -np.inf
            b[rng.integers(v)] = -np.inf
    else:  # smooth
        a = rng.normal(size=v)
        b = a + rng.normal(size=v) * 0.7
    ls = a - np.logaddexp.reduce(a[np.isfinite(a)])
    lt = b - np.logaddexp.reduce(b[np.isfinite(b)])
    return ls, lt


def _check(s64, t64, beta, eps, errors):
    """Feasibility on the true (float64) distributions to 1e-6 relative, and maximality to 1e-4."""
    kl = kl_blend_np(s64, t64, beta)
    assert kl <= eps * (1 + 1e-6), (beta, kl, eps)
    if beta < 1.0 and eps > 0:
        assert kl_blend_np(s64, t64, min(beta + 1e-4, 1.0)) > eps, (beta, eps)
    errors.append(abs(beta - brute_beta(s64, t64, eps)))


@pytest.mark.parametrize("kind", ["peaked", "flat", "disjoint", "zeros", "smooth"])
def test_beta_against_brute_force_small_vocab(kind):
    import zlib

    rng = np.random.default_rng(zlib.crc32(kind.encode()))  # hash() of a str changes per process
    errors = []
    for _ in range(200):
        v = int(rng.choice([2, 3, 5, 17, 64]))
        s, t = random_pair(rng, v, kind)
        for eps in EPS_GRID:
            beta = float(trust_region_beta(torch.tensor(s, dtype=torch.float32),
                                           torch.tensor(t, dtype=torch.float32), eps))
            # against the true distributions the float32 inputs were rounded from
            _check(s, t, beta, eps, errors)
    assert max(errors) < 1e-4, max(errors)


def test_beta_batched_large_vocab_and_tensor_eps():
    rng = np.random.default_rng(0)
    for v in [1000, 50_000]:
        pairs = [random_pair(rng, v, k) for k in ["peaked", "smooth", "disjoint", "flat"]]
        s = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)
        t = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)
        eps = torch.tensor([1e-3, 0.05, 1.0, 1e-6])  # per-row budgets
        beta = trust_region_beta(s, t, eps)
        assert beta.shape == (4,)
        errors = []
        for i in range(4):
            _check(pairs[i][0], pairs[i][1], float(beta[i]), float(eps[i]), errors)
        assert max(errors) < 1e-4


def test_beta_endpoints_and_dtypes():
    torch.manual_seed(0)
    s = torch.log_softmax(torch.randn(8, 32), -1)
    t = torch.log_softmax(torch.randn(8, 32), -1)
    assert torch.equal(trust_region_beta(s, t, 0.0), torch.zeros(8))
    big = kl_divergence(t, s).max().item() + 1e-3
    assert torch.equal(trust_region_beta(s, t, big), torch.ones(8))
    assert torch.equal(trust_region_beta(s, s, 1e-6), torch.ones(8))  # identical models: teacher inside
    # bf16 inputs are searched in float32
    b16 = trust_region_beta(s.bfloat16(), t.bfloat16(), 0.01)
    assert b16.dtype == torch.float32
    # blend endpoints
    assert torch.allclose(blend_logprobs(s, t, 0.0), s, atol=1e-6)
    assert torch.allclose(blend_logprobs(s, t, 1.0), t, atol=1e-6)


def test_realised_kl_never_exceeds_eps():
    torch.manual_seed(1)
    s = torch.log_softmax(torch.randn(512, 100) * 4, -1)
    t = torch.log_softmax(torch.randn(512, 100) * 4, -1)
    for eps in [1e-4, 1e-2, 0.3]:
        log_mu, beta, kl = trust_region_blend(s, t, eps)
        assert (kl <= eps).all()
        assert torch.allclose(log_mu.exp().sum(-1), torch.ones(512), atol=1e-5)


def test_small_budget_law():
    """beta*(eps) ~ sqrt(2 eps / Var_S[r]) within 5% at eps = 1e-4 on smooth pairs."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        s, t = random_pair(rng, 50, "smooth")
        r = t - s
        p = np.exp(s)
        var = (p * r**2).sum() - (p * r).sum() ** 2
        beta = float(trust_region_beta(torch.tensor(s), torch.tensor(t), 1e-4))
        predicted = math.sqrt(2 * 1e-4 / var)
        assert abs(beta / predicted - 1) < 0.05, (beta, predicted)


def test_kl_monotone_in_beta():
    rng = np.random.default_rng(3)
    for kind in ["peaked", "smooth", "disjoint"]:
        s, t = random_pair(rng, 40, kind)
        betas = torch.linspace(0, 1, 101, dtype=torch.float64)
        st, tt = torch.tensor(s).expand(101, -1), torch.tensor(t).expand(101, -1)
        kl = kl_divergence(blend_logprobs(st, tt, betas), st)
        assert (kl.diff() >= -1e-12).all()


def test_kl_divergence_zero_probabilities():
    p = torch.tensor([[0.0, -math.inf, -math.inf]])
    q = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(kl_divergence(p, q), torch.tensor([math.log(2)]))
    assert torch.isinf(kl_divergence(q, p)).all()
    # zero in both: a token neither model can emit stays 0 in the blend
    mu = blend_logprobs(q, torch.log(torch.tensor([[0.2, 0.8, 0.0]])), 0.5)
    assert mu[0, 2].item() == -math.inf and torch.isfinite(mu[0, :2]).all()


def test_gumbel_sampling_matches_distribution():
    logp = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    g = torch.Generator().manual_seed(0)
    draws = sample_from_logprobs(logp.expand(40_000, 4), g)
    freq = torch.bincount(draws, minlength=4).float() / 40_000
    assert (freq - logp.exp()).abs().max() < 0.01


def test_skd_sampler_matches_closed_form():
    torch.manual_seed(2)
    s = torch.log_softmax(torch.randn(6) * 2, -1)
    t = torch.log_softmax(torch.randn(6) * 2, -1)
    g = torch.Generator().manual_seed(1)
    n = 60_000
    toks, replaced = skd_sample(s.expand(n, 6), t.expand(n, 6), top_k=2, teacher_temperature=0.6, generator=g)
    freq = torch.bincount(toks, minlength=6).float() / n
    mu = skd_behavior_logprobs(s, t, 2, 0.6).exp()
    assert torch.allclose(mu.sum(), torch.tensor(1.0), atol=1e-6)
    assert (freq - mu).abs().max() < 0.01
    top2 = t.topk(2).indices
    p_replace = 1 - s.exp()[top2].sum()
    assert abs(replaced.float().mean() - p_replace) < 0.01


def test_temperature_and_eos_canonicalisation():
    logp = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert torch.allclose(temperature_logprobs(logp, 1.0), logp, atol=1e-6)
    cold = temperature_logprobs(logp, 0.5)
    assert cold.exp()[2] > logp.exp()[2]
    # two stop ids (1 and 3) collapse onto canonical 3
    lp = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    c = canonicalize_eos(lp, [1, 3], 3)
    assert c[0, 1].item() == -math.inf
    assert torch.allclose(c.exp(), torch.tensor([[0.1, 0.0, 0.3, 0.6]]), atol=1e-6)
    assert torch.equal(canonicalize_eos(lp, [3], 3), lp)


def test_top_p_keeps_the_smallest_nucleus():
    from trb.blend import top_p_logprobs

    lp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = top_p_logprobs(lp, 0.7).exp()
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(top_p_logprobs(lp, 0.45).exp(), torch.tensor([[1.0, 0, 0, 0]]))
    assert top_p_logprobs(lp, 1.0) is lp


@pytest.mark.parametrize("kind", ["peaked", "flat", "disjoint", "zeros", "smooth"])
def test_newton_search_matches_bisection_reference(kind):
    rng = np.random.default_rng(7 + len(kind))
    diffs = []
    for v in (3, 64, 4096):
        pairs = [random_pair(rng, v, kind) for _ in range(16)]
        s = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)
        t = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)
        for eps in EPS_GRID:
            fast = trust_region_beta(s, t, eps, method="newton")
            ref = trust_region_beta(s, t, eps, method="bisect")
            diffs.append(float((fast - ref).abs().max()))
            if eps > 0:  # feasible as evaluated by the blend itself (eps = 0 is the student: beta = 0)
                _, _, kl = trust_region_blend(s, t, eps)
                assert float(kl.max()) <= eps
            else:
                assert float(fast.abs().max()) == 0
    assert max(diffs) < 1e-4, max(diffs)


@pytest.mark.slow
def test_compiled_search_matches_eager():
    from trb.blend import compile_search

    rng = np.random.default_rng(3)
    pairs = [random_pair(rng, 2048, k) for k in ["peaked", "smooth", "flat", "zeros"] * 2]
    s = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)
    t = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)
    eager = trust_region_beta(s, t, 0.01)
    compile_search(True)
    try:
        fused = trust_region_beta(s, t, 0.01)
        fused3d = trust_region_beta(s.view(2, 4, -1), t.view(2, 4, -1), 0.01)  # same 2-D kernel
    finally:
        compile_search(False)
    assert float((fused - eager).abs().max()) < 1e-6
    assert torch.equal(fused3d.reshape(-1), fused)
