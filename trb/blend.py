"""Behaviour policies: pure functions on log-probability tensors of shape [..., V].

The trust-region blend (docs/method.md section 2):

    mu*(.|h) = argmin_mu KL(mu || pi_T)  s.t.  KL(mu || pi_S) <= eps
    log mu_beta = (1 - beta) log pi_S + beta log pi_T - log Z(beta)

with beta* the largest beta in [0, 1] whose blend satisfies the constraint. With
r = log pi_T - log pi_S, KL(mu_beta || pi_S) = beta * E_mu[r] - log E_S[exp(beta r)], which is
non-decreasing in beta (its derivative is beta * Var_mu[r]), so the feasible set is [0, beta*]
and a bracket search is valid.

Also here: the other samplers the paper compares (SKD token interleaving, temperature scaling),
EOS canonicalisation, and Gumbel-max sampling. No I/O, no config.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

# Bisection halves [0, 1] this many times: bracket width 2**-24 ~ 6e-8, far below the 1e-4
# maximality the tests demand, while staying a fixed-shape loop (no host sync, graph-capturable).
SEARCH_ITERS = 24
# The default search: safeguarded Newton steps on sqrt(KL(beta)) - sqrt(eps), each one pass over
# the vocabulary computing KL and its derivative together, inside a bisection bracket.
# Newton converges in 3-6 steps on ordinary rows; rows where it stalls fall back to bisection
# steps, so the cap equals the bisection count. On CPU the loop exits once every row converged.
NEWTON_ITERS = SEARCH_ITERS


def _as_work(x: torch.Tensor) -> torch.Tensor:
    """Promote to float32 (or keep float64) for the reductions."""
    return x if x.dtype == torch.float64 else x.float()


def safe_prod(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w * x with 0 wherever w == 0, so 0 * inf from zero-probability tokens stays 0 - in the value
    and in the gradient (x is masked before the product: a where() after it would still send
    0 * inf = NaN into the backward of the masked entries)."""
    live = w > 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
        return torch.where(live, w * x, zero)  # no backward: one temporary fewer
    return torch.where(live, w, torch.zeros((), dtype=w.dtype, device=w.device)) * torch.where(live, x, zero)


def renormalise(logprobs: torch.Tensor) -> torch.Tensor:
    """log-probabilities made exactly normalised in float64: x - logsumexp(x). A float32
    log_softmax over ~152k tokens is off by logsumexp = 2e-5 .. 1.4e-4 (always positive), enough to
    move KL(mu || pi_S) of a small budget by several times eps. Rows with no finite entry stay -inf."""
    x = logprobs.double()
    c = torch.logsumexp(x, dim=-1, keepdim=True)
    return x - torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def kl_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row.

    Args: p_logprobs, q_logprobs: [..., V] normalised log-probabilities (any float dtype).
    Returns: [...] in float32 (float64 if an input is float64). Tokens with p = 0 contribute 0
    (no 0 * inf NaN); a token with p > 0 and q = 0 makes the row +inf, as it should.
    """
    p = _as_work(p_logprobs)
    q = _as_work(q_logprobs).to(p.dtype)
    return safe_prod(p.exp(), p - q).sum(-1)


def _mix(s: torch.Tensor, t: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(1 - beta) s + beta t, unnormalised, with exact endpoints and -inf kept as -inf."""
    b = beta.unsqueeze(-1)
    inner = torch.lerp(s, t, b)  # s + b (t - s); NaN where both are -inf or 0*inf: fixed below
    # A token that either model gives probability 0 stays 0 for beta in (0, 1).
    dead = torch.isneginf(s) | torch.isneginf(t)
    inner = inner.masked_fill(dead, NEG_INF)
    out = torch.where(b == 0, s, torch.where(b == 1, t, inner))
    return out


def blend_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: torch.Tensor | float
) -> torch.Tensor:
    """log mu_beta = log_softmax((1 - beta) log pi_S + beta log pi_T).

    Args: student_logprobs, teacher_logprobs: [..., V] log-probabilities; beta: [...] or a float
    in [0, 1]. Returns: [..., V] normalised log-probabilities in float32 (float64 if given).
    beta = 0 returns pi_S and beta = 1 returns pi_T exactly (up to renormalisation).
    """
    s = _as_work(student_logprobs)
    t = _as_work(teacher_logprobs).to(s.dtype)
    beta = torch.as_tensor(beta, dtype=s.dtype, device=s.device).expand(s.shape[:-1])
    return torch.log_softmax(_mix(s, t, beta), dim=-1)


def _kl_at(s: torch.Tensor, r: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """KL(mu_beta || pi_S) for beta in (0, 1], from s = log pi_S and r = log pi_T - log pi_S.

    Computed as sum mu * (log mu - log pi_S) on the normalised blend, which keeps the tiny-KL
    regime accurate (no cancellation between two large terms).
    """
    log_mu = torch.log_softmax(s + beta.unsqueeze(-1) * r, dim=-1)  # -inf where either model is 0
    return kl_divergence(log_mu, s)


def trust_region_beta(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    eps: float | torch.Tensor,
    iters: int = SEARCH_ITERS,
    method: str | None = None,
) -> torch.Tensor:
    """The largest beta in [0, 1] with KL(mu_beta || pi_S) <= eps, per row.

    Args:
        student_logprobs, teacher_logprobs: [..., V] normalised log-probabilities (any float
            dtype; the search itself runs in float64).
        eps: trust-region budget, a float or a tensor broadcastable to [...]; must be >= 0.
        iters: bisection halvings of [0, 1] (method=bisect; fixed, no data-dependent control flow)
            or Newton steps (method=newton; default NEWTON_ITERS).
        method: newton (default: one pass per step computes KL and dKL/dbeta = beta Var_mu[r];
            safeguarded by a bracket, ending on a feasible point) or bisect (the reference).
    Returns:
        beta: [...] float32 (float64 if an input is float64). Guarantees: eps == 0 gives exactly 0; rows with
        KL(pi_T || pi_S) <= eps give exactly 1; otherwise beta is the low (feasible) end of the
        final bracket, so the constraint holds as evaluated in the working precision, and beta is
        within 2**-iters of the boundary.
    """
    return _trust_region(student_logprobs, teacher_logprobs, eps, iters=iters, method=method)[2]


def _trust_region(student_logprobs, teacher_logprobs, eps, rounded_inputs: bool = False, iters: int = SEARCH_ITERS,
                  method: str | None = None):
    """The shared entry of the trust-region functions: (s, t renormalised in float64, beta* rounded
    down to the output dtype - the feasible side, as KL is monotone in beta - and that dtype:
    float64 if an input is, else float32). rounded_inputs: float64 inputs that were float32
    log-probs (the search keeps the float32 margin)."""
    s, t = renormalise(student_logprobs), renormalise(teacher_logprobs)
    out = torch.float64 if torch.float64 in (student_logprobs.dtype, teacher_logprobs.dtype) else torch.float32
    roundoff = 2.0**-24 if rounded_inputs else _roundoff(student_logprobs, teacher_logprobs)
    return s, t, _round_down(_search(s, t, eps, iters, method, roundoff), out), out


_ROUNDOFF = {torch.float64: 0.0, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _roundoff(*inputs: torch.Tensor) -> float:
    return max(_ROUNDOFF.get(x.dtype, 2.0**-24) for x in inputs)


def _rounding_margin(s: torch.Tensor, r: torch.Tensor, t: torch.Tensor, roundoff: float) -> torch.Tensor:
    """The relative share of eps the search keeps free for inputs rounded to `roundoff`: each input
    log-prob x is off from the true one by up to roundoff |x|, which moves r = t - s by
    Delta_i = roundoff (|s_i| + |t_i|) and KL(mu_beta || pi_S) ~ beta^2 Var_S[r] / 2 by at most
    beta^2 sum_i p_i |r_i - E[r]| Delta_i. Relative to the KL that is
    2 E_S[|r - E r| Delta] / Var_S[r]; the margin is 4x that (mu_beta is not pi_S) plus 1e-6,
    capped at 1%. One pass over the vocabulary. Shapes: [..., V] -> [...]."""
    p = s.exp()
    fin = torch.isfinite(r) & torch.isfinite(t)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    r0 = torch.where(fin, r, zero)
    m1 = (p * r0).sum(-1, keepdim=True)
    dev = (r0 - m1).abs()
    var = (p * dev * dev).sum(-1)
    delta = roundoff * (torch.where(torch.isfinite(s), s.abs(), zero) + torch.where(fin, t.abs(), zero))
    spread = safe_prod(p, dev * delta).sum(-1)
    rel = 1e-6 + 8 * spread / var.clamp_min(1e-300)
    return torch.where(var > 0, rel.clamp(max=1e-2), torch.full_like(rel, 1e-6))


def _search(s: torch.Tensor, t: torch.Tensor, eps, iters: int = SEARCH_ITERS, method: str | None = None,
            roundoff: float = 0.0) -> torch.Tensor:
    """trust_region_beta on normalised float64 log-probs s, t [..., V]; returns float64 beta [...].
    roundoff > 0: s, t came from inputs of that precision; the search then aims below eps by the
    margin those roundings could move the true KL (`_rounding_margin`), so the constraint holds for
    the true distributions."""
    # float64: KL(mu_beta || pi_S) of a small budget is a second-order quantity (beta^2 Var/2)
    # summed from first-order terms; in float32 that cancellation costs ~1% of eps = 1e-6.
    batch_shape = s.shape[:-1]
    eps_t = torch.as_tensor(eps, dtype=s.dtype, device=s.device).expand(batch_shape)
    # Tokens the student gives probability 0 never enter mu_beta for beta < 1: zero their r.
    s_dead = torch.isneginf(s)
    r = torch.where(s_dead, torch.zeros((), dtype=s.dtype, device=s.device), t - s)
    # t = -inf where s is finite -> r = -inf: that token leaves mu_beta for any beta > 0.
    # mu_beta is unchanged by r -> r - c. Centring r on the student's mode keeps the dominant
    # logit of s + beta r near log pi_S(mode), so tiny KLs of peaked rows survive float32.
    r_mode = r.gather(-1, s.argmax(-1, keepdim=True))
    r = torch.where(torch.isfinite(r_mode), r - r_mode, r)

    if roundoff > 0:
        eps_t = eps_t * (1 - _rounding_margin(s, r, t, roundoff))
    kl_full = kl_divergence(t, s)  # KL(pi_T || pi_S): the beta = 1 check
    lo = torch.zeros(batch_shape, dtype=s.dtype, device=s.device)
    hi = torch.ones(batch_shape, dtype=s.dtype, device=s.device)
    method = method or _KERNELS["method"]
    if method == "bisect":
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            feasible = _kl_at(s, r, mid) <= eps_t
            lo = torch.where(feasible, mid, lo)
            hi = torch.where(feasible, hi, mid)
    elif method == "newton":
        lo = _newton(s, r, eps_t, lo, hi, NEWTON_ITERS if iters == SEARCH_ITERS else iters)
    else:
        raise ValueError(f"search method must be newton or bisect; got {method!r}")
    beta = torch.where(kl_full <= eps_t, torch.ones_like(lo), lo)
    # supports that share no token: every beta > 0 gives an empty blend; the student alone is the answer
    shared = (torch.isfinite(s) & torch.isfinite(t)).any(-1)
    return torch.where((eps_t > 0) & shared, beta, torch.zeros_like(beta))


def _kl_and_var(s: torch.Tensor, r_fin: torch.Tensor, r: torch.Tensor, beta: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(mu_beta || pi_S) and Var_{mu_beta}[r] (so dKL/dbeta = beta Var) from one blend.

    With log mu = s + beta r - log Z: KL = beta E_mu[r] - log Z and Var = E_mu[r^2] - E_mu[r]^2,
    three reductions and no per-token temporaries beyond mu (float64: the cancellation in both
    differences costs ~1e-10 relative at eps = 1e-6). r_fin is r with -inf replaced by 0 (those
    tokens have mu = 0 for beta > 0). Shapes: s, r [..., V]; beta [...]."""
    z = s + beta.unsqueeze(-1) * r
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    mu = (z - log_z).exp().unsqueeze(-2)  # [..., 1, V]
    m1 = (mu @ r_fin.unsqueeze(-1))[..., 0, 0]
    m2 = (mu @ (r_fin * r_fin).unsqueeze(-1))[..., 0, 0]
    return beta * m1 - log_z[..., 0], (m2 - m1 * m1).clamp_min(0)


def _newton(s: torch.Tensor, r: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            iters: int) -> torch.Tensor:
    """Largest feasible beta by Newton on h(beta) = sqrt(KL(beta)) - sqrt(eps).

    h is nearly linear in beta (KL ~ beta^2 Var/2 for small budgets), so Newton from the
    small-budget guess converges in a few steps. Each step evaluates KL and Var at the iterate,
    tightens the bracket [lo (feasible), hi (infeasible)], and takes the Newton step, or the
    bracket midpoint when the step is not finite or leaves the bracket. The final iterate, less a
    1e-7 relative margin, is accepted only if it is feasible; the result is the largest feasible
    point evaluated (so KL <= eps holds as evaluated). Shapes: s, r [..., V]; eps, lo, hi [...].
    """
    r_fin = torch.where(torch.isfinite(r), r, torch.zeros((), dtype=r.dtype, device=r.device))
    shape, v = lo.shape, s.shape[-1]
    s, r, r_fin = s.reshape(-1, v), r.reshape(-1, v), r_fin.reshape(-1, v)  # 2-D: one compiled kernel
    eps, lo, hi = eps.reshape(-1), lo.reshape(-1), hi.reshape(-1)
    kl_and_var, kl_at = _KERNELS["kl_and_var"], _KERNELS["kl_at"]
    _, var0 = kl_and_var(s, r_fin, r_fin, torch.zeros_like(lo))
    beta = torch.where(var0 > 0, torch.sqrt(2 * eps / var0.clamp_min(1e-300)), torch.full_like(lo, 0.5))
    # beta = 1 is decided by the KL(pi_T || pi_S) check alone (below 1, tokens the student gives 0
    # stay out of mu); the search stays strictly inside [0, 1) like the bisection does
    beta = beta.clamp(1e-12, 1.0 - 2.0**-SEARCH_ITERS)
    sq_eps = torch.sqrt(eps)
    early_exit = s.device.type == "cpu"  # a host sync is free on CPU; on GPUs the count stays fixed
    converged = torch.zeros_like(lo, dtype=torch.bool)
    for _ in range(iters):
        kl, var = kl_and_var(s, r_fin, r, beta)
        feasible = kl <= eps
        lo = torch.where(feasible, torch.maximum(lo, beta), lo)
        hi = torch.where(feasible, hi, torch.minimum(hi, beta))
        h = torch.sqrt(kl.clamp_min(0))
        nxt = beta - (h - sq_eps) * 2 * h / (beta * var)
        ok = torch.isfinite(nxt) & (nxt > lo) & (nxt < hi)
        # a row whose Newton step has converged keeps its iterate: stepping on would land on hi (an
        # iterate approached from the infeasible side) and fall back to bisecting from lo
        converged = converged | (torch.isfinite(nxt) & ((nxt - beta).abs() <= 1e-12 * beta)) | (hi - lo <= 2.0**-40)
        beta = torch.where(converged, beta, torch.where(ok, nxt, 0.5 * (lo + hi)))
        if early_exit and bool(converged.all()):
            break
    # the answer: the largest feasible of lo, the iterate less a 1e-7 relative margin, and hi less
    # 1e-9 relative (the root approached from above), by the per-token (stable) KL sum
    best = lo
    for cand in (torch.minimum(beta * (1 - 1e-7), hi), hi * (1 - 1e-9)):
        ok = (cand > best) & (cand < 1.0) & (kl_at(s, r, cand) <= eps)
        best = torch.where(ok, cand, best)
    return best.reshape(shape)


def _blend_stats(s: torch.Tensor, t: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z, KL(mu_beta || pi_S)) per row, mu_beta = exp(_mix(s, t, beta) - log Z): the blend's
    normaliser and realised KL without keeping log mu. [..., V] (float64) -> [...], [...]."""
    z = _mix(s, t, beta)
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    return log_z[..., 0], kl_divergence(z - log_z, s)


_KERNELS = {"kl_and_var": _kl_and_var, "kl_at": _kl_at, "blend_stats": _blend_stats, "method": "newton"}


def trust_region_stats(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, eps: float | torch.Tensor,
    rounded_inputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(beta, log Z, KL(mu || pi_S)) of the trust-region blend without materialising log mu:
    log mu(x) = _mix(s, t, beta)(x) - log Z for any token x (see `blend_at`). Same beta and KL as
    `trust_region_blend`; used where only a few tokens' log mu are needed (speculative sampling).
    Shapes: [..., V] -> [...] x 3 (beta, KL float32 rounded down; log Z float64). rounded_inputs:
    float64 inputs that were float32 log-probs (the search keeps the float32 margin)."""
    s, t, beta, out = _trust_region(student_logprobs, teacher_logprobs, eps, rounded_inputs)
    shape, v = s.shape[:-1], s.shape[-1]
    log_z, kl = _KERNELS["blend_stats"](s.reshape(-1, v), t.reshape(-1, v), beta.double().reshape(-1))
    return beta, log_z.reshape(shape), _round_down(kl.reshape(shape), out)


def blend_at(s_x: torch.Tensor, t_x: torch.Tensor, beta: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """log mu_beta(x) from the two models' log-probs of token x, beta and the blend's log Z.
    Shapes: all [...] -> [...] (float32)."""
    z = _mix(s_x.double().unsqueeze(-1), t_x.double().unsqueeze(-1), beta.double())[..., 0]
    return (z - log_z).float()


def set_search_method(method: str) -> None:
    """The default search of trust_region_beta: newton (default) or bisect (the reference;
    benchmarks compare the two)."""
    if method not in ("newton", "bisect"):
        raise ValueError(f"search method must be newton or bisect; got {method!r}")
    _KERNELS["method"] = method


def compile_search(enabled: bool = True) -> None:
    """Use torch.compile'd (fused) kernels for the passes of the Newton search.

    Each pass then reads the vocabulary row once instead of once per elementwise op: 8x faster
    per pass at [8, 49152] float64 on one CPU core, after a one-off compile of ~40 s (cached on
    disk by inductor afterwards). Worth it for long runs and large vocabularies; off by default.
    """
    if enabled:
        _KERNELS["kl_and_var"] = torch.compile(_kl_and_var, dynamic=True)
        _KERNELS["kl_at"] = torch.compile(_kl_at, dynamic=True)
        _KERNELS["blend_stats"] = torch.compile(_blend_stats, dynamic=True)
    else:
        _KERNELS.update(kl_and_var=_kl_and_var, kl_at=_kl_at, blend_stats=_blend_stats)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    too_big = y.double() > x
    return torch.where(too_big, torch.nextafter(y, torch.zeros_like(y)), y)


def trust_region_blend(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, eps: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log mu, beta, KL(mu || pi_S)) of the trust-region behaviour policy, computed in float64.

    Shapes: inputs [..., V]; returns [..., V], [...], [...] in float32 (float64 if given).
    """
    s, t, beta, out = _trust_region(student_logprobs, teacher_logprobs, eps)
    log_mu = blend_logprobs(s, t, beta.double())  # the blend at the recorded (rounded-down) beta
    kl = kl_divergence(log_mu, s)  # against the renormalised student: the constraint as it truly holds
    # the realised KL is rounded towards 0 too, so a recorded KL never exceeds eps
    return log_mu.to(out), beta, _round_down(kl, out)


# ---------------------------------------------------------------------------------------------
# Other samplers of the paper
# ---------------------------------------------------------------------------------------------


def temperature_logprobs(logprobs: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """log_softmax(logprobs / tau): the distribution a sampler at temperature tau draws from.

    Shapes: [..., V] -> [..., V]; temperature: float or [...] (> 0).
    """
    x = _as_work(logprobs)
    tau = torch.as_tensor(temperature, dtype=x.dtype, device=x.device)
    if tau.ndim > 0:
        tau = tau.unsqueeze(-1)
    return torch.log_softmax(x / tau, dim=-1)


def top_p_logprobs(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches top_p, renormalised.

    Shapes: [..., V] -> [..., V]; top_p = 1 returns the input unchanged.
    """
    if top_p >= 1.0:
        return logprobs
    x = _as_work(logprobs)
    sorted_lp, order = x.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p  # the token that crosses top_p is kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(x.masked_fill(drop, NEG_INF), dim=-1)


def topk_mask(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [..., V]: True on each row's top-k tokens (ties broken by torch.topk)."""
    k = min(int(k), logprobs.shape[-1])
    idx = logprobs.topk(k, dim=-1).indices
    mask = torch.zeros_like(logprobs, dtype=torch.bool)
    return mask.scatter_(-1, idx, True)


def skd_behavior_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, top_k: int, teacher_temperature: float
) -> torch.Tensor:
    """Closed-form distribution of SKD's emitted token (docs/method.md section 5).

    The student proposes y ~ pi_S; y is kept when it is in the teacher's top-K, otherwise it is
    replaced by a fresh sample from pi_T at temperature tau_T. Hence
        mu(a) = pi_S(a) 1[a in topK_T] + pi_S(outside topK_T) * pi_T^tau(a).
    Shapes: [..., V] -> [..., V] log-probabilities (float32).
    """
    s = _as_work(student_logprobs)
    t = _as_work(teacher_logprobs).to(s.dtype)
    keep = topk_mask(t, top_k)
    kept = s.masked_fill(~keep, NEG_INF)
    log_out = torch.logsumexp(s.masked_fill(keep, NEG_INF), dim=-1, keepdim=True)  # log P(replace)
    replaced = log_out + temperature_logprobs(t, teacher_temperature)
    return torch.logaddexp(kept, replaced)


def skd_sample(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    top_k: int,
    teacher_temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SKD step: student token, replaced by a teacher sample when outside the teacher top-K.

    Shapes: [..., V] -> (tokens [...] int64, replaced [...] bool).
    """
    proposal = sample_from_logprobs(student_logprobs, generator)
    keep = topk_mask(_as_work(teacher_logprobs), top_k).gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
    teacher_tok = sample_from_logprobs(temperature_logprobs(teacher_logprobs, teacher_temperature), generator)
    return torch.where(keep, proposal, teacher_tok), ~keep


# ---------------------------------------------------------------------------------------------
# Shared stop event and sampling
# ---------------------------------------------------------------------------------------------


_STOP_IDS: dict = {}


def canonicalize_eos(logprobs: torch.Tensor, stop_ids: list[int], canonical_id: int) -> torch.Tensor:
    """Move the mass of every stop id onto one canonical id (docs/method.md section 4).

    Student and teacher may end sequences with different ids; after this both put their whole
    stop probability on `canonical_id` and give 0 to the other stop ids, so blending and the
    loss compare like with like. Shapes: [..., V] -> [..., V]; a no-op for a single stop id.
    """
    others = [i for i in dict.fromkeys(stop_ids) if i != canonical_id]
    if not others:
        return logprobs
    key = (canonical_id, *others, str(logprobs.device))
    ids = _STOP_IDS.get(key)
    if ids is None:  # made once per device: a fresh host-to-device copy every decoding step would sync
        ids = _STOP_IDS[key] = torch.tensor([canonical_id, *others], device=logprobs.device)
    stop_mass = torch.logsumexp(logprobs.index_select(-1, ids), dim=-1)
    out = logprobs.index_fill(-1, ids[1:], NEG_INF)
    return out.index_copy(-1, ids[:1], stop_mass.unsqueeze(-1))


class RowNoise:
    """Per-row noise streams: row g draws from its own generator, seeded from (seed, g), so a row's
    samples depend only on the seed and its global index, not on which rows are decoded together
    (the rollout.max_rows bound, finished rows leaving the batch, the number of data-parallel
    ranks). Every draw of shape [B, ...] takes one [...] draw from each live row's stream.

    rows: the global indices of the rows, in batch order; select(idx) keeps a subset (their
    streams continue where they were); slice(lo, hi) is rows lo..hi-1 as a new RowNoise sharing
    the streams."""

    def __init__(self, seed: int, rows, device, _gens=None):
        import numpy as np

        self.seed, self.rows, self.device = int(seed), [int(r) for r in rows], torch.device(device)
        if _gens is None:
            _gens = []
            for g in self.rows:
                state = np.random.SeedSequence([self.seed, g]).generate_state(2, dtype=np.uint32)
                _gens.append(torch.Generator(device=self.device).manual_seed(int(state[0]) << 31 ^ int(state[1])))
        self.gens = _gens

    def __len__(self) -> int:
        return len(self.gens)

    def rand(self, shape, device) -> torch.Tensor:
        if shape[0] != len(self.gens):
            raise ValueError(f"RowNoise of {len(self.gens)} rows asked for a draw of {shape[0]} rows")
        if not self.gens:
            return torch.empty(tuple(shape), device=device)
        return torch.stack([torch.rand(tuple(shape[1:]), generator=g, device=device, dtype=torch.float32)
                            for g in self.gens])

    def select(self, idx) -> RowNoise:
        idx = idx.tolist() if torch.is_tensor(idx) else list(idx)
        return RowNoise(self.seed, [self.rows[i] for i in idx], self.device, [self.gens[i] for i in idx])

    def slice(self, lo: int, hi: int) -> RowNoise:
        return RowNoise(self.seed, self.rows[lo:hi], self.device, self.gens[lo:hi])


def uniform(shape, generator: torch.Generator | RowNoise | None, device) -> torch.Tensor:
    """float32 uniforms in [0, 1) of `shape` from `generator` (a torch.Generator or a RowNoise)."""
    if isinstance(generator, RowNoise):
        return generator.rand(tuple(shape), device)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def sample_from_logprobs(logprobs: torch.Tensor, generator: torch.Generator | RowNoise | None = None) -> torch.Tensor:
    """Gumbel-max sample from each row of [..., V] log-probabilities -> [...] int64.

    Draws its uniforms from `generator` (on the tensor's device) so runs are reproducible.
    """
    u = uniform(logprobs.shape, generator, logprobs.device)
    gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
    return (_as_work(logprobs) + gumbel.to(_as_work(logprobs).dtype)).argmax(-1)
