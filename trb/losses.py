"""Distillation losses: reverse-KL estimators, forward KL, the Veto target, and a chunked driver.

All per-position functions take rows of log-probabilities [N, V] (one row per response
position) and return per-row tensors [N]: a *surrogate* whose gradient is the estimator's
gradient, and the estimator's *value* (detached) for logging. The caller averages over
response tokens (token-mean, docs/method.md section 1).

Estimators of KL(pi_theta(.|h) || pi_T(.|h)):
  full     exact sum over the vocabulary.
  topk     the paper's actor-side top-k support S_k (default k = 16): weights w_a = student
           probability renormalised over S_k, gradient sum_a w_a (s_a - t_a - b) grad s_a with w
           and the log-ratio held constant, b their weighted mean (see reverse_kl_topk for why).
           Equals `full` in value and gradient when k = V.
  sampled  single-sample estimator log pi_S(y) - log pi_T(y) used as a stop-gradient advantage
           in a policy-gradient loss (never as a direct loss: its expected gradient is zero),
           optionally importance-weighted by pi_S(y) / mu(y) for tokens a blended sampler drew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from trb.blend import canonicalize_eos, safe_prod
from trb.config import ESTIMATORS



def reverse_kl_full(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor):
    """Exact KL(pi_S || pi_T) per row. [N, V] -> (surrogate [N], value [N])."""
    kl = safe_prod(student_logprobs.exp(), student_logprobs - teacher_logprobs).sum(-1)
    return kl, kl.detach()


def reverse_kl_topk(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, k: int = 16,
                    baseline: bool = True):
    """Student top-k truncated reverse KL per row. [N, V] -> (surrogate [N], value [N]).

    value = sum_{a in S_k} w_a (s_a - t_a). Gradient: sum_a w_a (r_a - b) grad s_a with
    r_a = s_a - t_a held constant and b = sum_a w_a r_a (baseline=True) or b = 0 (the literal
    reading). Both equal the exact gradient when k = V (sum_a p_a grad s_a = 0). For k < V the
    baseline matters: without it, when every candidate has r_a > 0 the step lowers all of S_k
    at once and pushes mass onto tokens outside S_k that the estimator never sees (on the toy
    pair it raised the exact KL of a fixed batch from 5.0 to 8.4 in 25 AdamW steps, while the
    baseline version lowered it). With the baseline the gradient is exactly that of
    KL(p_S|S_k || p_T|S_k), both renormalised on S_k.
    """
    k = min(int(k), student_logprobs.shape[-1])
    s_det = student_logprobs.detach()
    idx = s_det.topk(k, dim=-1).indices
    s_k = student_logprobs.gather(-1, idx)
    t_k = teacher_logprobs.detach().gather(-1, idx)
    w = torch.softmax(s_det.gather(-1, idx), dim=-1)
    log_ratio = s_k.detach() - t_k
    value = safe_prod(w, log_ratio).sum(-1)
    centred = log_ratio - value.unsqueeze(-1) if baseline else log_ratio
    # gradient: sum_a w_a (r_a - b) grad s_a; s_k masked first, so a -inf candidate (w = 0) sends no
    # 0 * inf into the backward
    score = (safe_prod(w, centred) * torch.where(w > 0, s_k, torch.zeros_like(s_k))).sum(-1)
    surrogate = value + score - score.detach()
    return surrogate, value


def reverse_kl_sampled(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tokens: torch.Tensor,
    behavior_logprobs: torch.Tensor | None = None,
    importance_weight: bool = True,
    max_weight: float = 10.0,
):
    """Policy-gradient single-sample estimator per row.

    Args: student/teacher log-probs [N, V]; tokens [N] the sampled ids y; behavior_logprobs [N]
    log mu(y) of the sampler that drew y (None = the student itself); importance weights
    pi_S(y) / mu(y) are clipped at `max_weight`. Returns (surrogate [N], value [N]).
    """
    s_y = student_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    t_y = teacher_logprobs.detach().gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_ratio = s_y.detach() - t_y
    weight = torch.ones_like(log_ratio)
    if importance_weight and behavior_logprobs is not None:
        weight = (s_y.detach() - behavior_logprobs.to(s_y.dtype)).exp().clamp(max=max_weight)
    value = weight * log_ratio
    score = weight * log_ratio * s_y
    return value + score - score.detach(), value


def forward_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor):
    """Exact KL(pi_T || pi_S) per row (supervised direction). [N, V] -> (surrogate, value)."""
    kl = safe_prod(teacher_logprobs.detach().exp(), teacher_logprobs.detach() - student_logprobs).sum(-1)
    return kl, kl.detach()


def veto_target(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, b: float) -> torch.Tensor:
    """Veto's target log q, q proportional to p_T * p_S^B with p_S held constant. [N, V] -> [N, V]."""
    if b == 0:
        return teacher_logprobs
    return torch.log_softmax(teacher_logprobs + b * student_logprobs.detach(), dim=-1)


@dataclass(frozen=True)
class Estimator:
    """One reverse-KL estimator, built once from `LossConfig`: s, t [N, V] -> (surrogate [N], value [N]).

    kind: full | topk | sampled | forward (forward KL, the supervised direction); k / topk_baseline
    for topk; importance_weight for sampled (tokens and behaviour log-probs are then required)."""

    kind: str = "topk"
    k: int = 16
    topk_baseline: bool = True
    importance_weight: bool = True

    def __post_init__(self) -> None:
        if self.kind not in (*ESTIMATORS, "forward"):
            raise ValueError(f"loss.estimator must be one of {', '.join(ESTIMATORS)} or 'forward'; got {self.kind!r}")

    @classmethod
    def from_config(cls, loss) -> Estimator:
        return cls(loss.estimator, loss.k, loss.topk_baseline, loss.importance_weight)

    def __call__(self, student_logprobs, teacher_logprobs, tokens=None, behavior_logprobs=None):
        if self.kind == "full":
            return reverse_kl_full(student_logprobs, teacher_logprobs)
        if self.kind == "topk":
            return reverse_kl_topk(student_logprobs, teacher_logprobs, self.k, self.topk_baseline)
        if self.kind == "sampled":
            if tokens is None:
                raise ValueError("loss estimator 'sampled' needs the sampled tokens")
            return reverse_kl_sampled(student_logprobs, teacher_logprobs, tokens, behavior_logprobs,
                                      self.importance_weight)
        return forward_kl(student_logprobs, teacher_logprobs)


@dataclass(frozen=True)
class Target:
    """What both models' log-prob rows go through before the estimator: EOS canonicalisation (every
    id in stop_ids becomes one event at canonical_stop) and, for Veto, the target q ~ p_T p_S^B."""

    stop_ids: tuple[int, ...] = ()
    canonical_stop: int | None = None
    veto_b: float = 0.0
    vocab: int | None = None  # shared vocabulary: logits past it (embedding padding rows) are impossible tokens

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """A model's logits over the shared vocabulary, float32."""
        if self.vocab is not None and x.shape[-1] > self.vocab:
            x = x[..., : self.vocab]
        return x.float()

    def student(self, s: torch.Tensor) -> torch.Tensor:
        if self.stop_ids and self.canonical_stop is not None:
            s = canonicalize_eos(s, list(self.stop_ids), self.canonical_stop)
        return s

    def teacher(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The target log-probs given the teacher's t and the (canonicalised) student's s."""
        t = self.student(t)
        return veto_target(s, t, self.veto_b) if self.veto_b else t


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_hidden: torch.Tensor,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    estimator: Estimator = Estimator(),
    target: Target = Target(),
    *,
    tokens: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    chunk_size: int = 1024,
    denominator: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distillation loss over N response positions, one chunk of positions at a time.

    Args:
        student_hidden: [N, Hs] final hidden states at response positions (requires grad).
        student_head / teacher_head: hidden -> logits (the models' output embeddings).
        teacher_hidden: [N, Ht] (no grad).
        estimator, target: see `Estimator`, `Target`.
        tokens, behavior_logprobs: [N] for the `sampled` estimator.
        chunk_size: positions per chunk. Each chunk's float32 logits are recomputed in the
            backward pass (activation checkpointing), so at most one chunk of [chunk, V] logits
            per model is alive at a time instead of [N, V] for both models.
        denominator: the sums are divided by it (default N: the token mean of these positions; a
            micro-batch passes the whole batch's token count, so micro-batch gradients add up).
    Returns:
        (loss, value): the scalar surrogate to backpropagate and the detached estimator value,
        both summed over positions and divided by `denominator`.
    """
    n = student_hidden.shape[0]
    denominator = float(n if denominator is None else denominator)
    if n == 0:
        zero = student_hidden.sum() * 0.0
        return zero, zero.detach()

    def chunk_terms(h_s: torch.Tensor, h_t: torch.Tensor, tok, blp) -> tuple[torch.Tensor, torch.Tensor]:
        s = target.student(torch.log_softmax(target.logits(student_head(h_s)), dim=-1))
        with torch.no_grad():
            t = torch.log_softmax(target.logits(teacher_head(h_t)), dim=-1)
        t = target.teacher(t, s)
        sur, val = estimator(s, t, tok, blp)
        return sur.sum(), val.sum()

    total = student_hidden.new_zeros((), dtype=torch.float32)
    total_value = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for sur, val in _over_chunks(chunk_terms, chunk_size, student_hidden, teacher_hidden, tokens, behavior_logprobs):
        total = total + sur
        total_value = total_value + val.detach()
    return total / denominator, total_value / denominator


def _over_chunks(fn, chunk_size: int, hidden: torch.Tensor, *others):
    """fn(hidden[chunk], *others[chunk]) for each chunk of rows (None passes through), under
    activation checkpointing when gradients flow and there is more than one chunk, so only one
    chunk's [chunk, V] logits are alive at a time. Yields fn's results."""
    n = hidden.shape[0]
    ckpt = torch.is_grad_enabled() and hidden.requires_grad and n > chunk_size
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], *(x[sl] if x is not None else None for x in others))
        yield checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)


def chunked_nll_loss(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    target: Target = Target(),
    *,
    chunk_size: int = 1024,
    denominator: float | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of `tokens` [N] (SFT on teacher samples), summed and divided by
    `denominator` (default N), chunked and checkpointed like `chunked_distill_loss`. The target's
    EOS canonicalisation makes any stop id count as the student's own EOS."""
    n = student_hidden.shape[0]
    denominator = float(n if denominator is None else denominator)
    if n == 0:
        return student_hidden.sum() * 0.0

    def chunk_nll(h: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        s = target.student(torch.log_softmax(target.logits(student_head(h)), dim=-1))
        return -s.gather(-1, tok[:, None]).sum()

    total = student_hidden.new_zeros((), dtype=torch.float32)
    for part in _over_chunks(chunk_nll, chunk_size, student_hidden, tokens):
        total = total + part
    return total / denominator
