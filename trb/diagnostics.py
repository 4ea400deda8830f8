"""What a sampler does, measured: the diagnostics of docs/method.md section 7 from a `Rollout`.

Used by every training step (metrics.jsonl / W&B) and by `trb rollout` (summary.json, console
table). All statistics are over response tokens (the mask) unless named per sequence.
"""

from __future__ import annotations

import torch


def quantiles(x: torch.Tensor, qs=(0.5, 0.9)) -> list[float]:
    if x.numel() == 0:
        return [float("nan")] * len(qs)
    return torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64)).tolist()


def sequence_support(ro) -> torch.Tensor:
    """Per-rollout teacher-support score: mean over its tokens of log pi_T - log pi_S. [B]"""
    m = ro.response_mask
    diff = torch.where(m, ro.teacher_logp - ro.student_logp, torch.zeros_like(ro.teacher_logp))
    return diff.sum(1) / m.sum(1).clamp_min(1)


def effective_temperature(sampler) -> float:
    """The temperature the student's distribution is sampled at: the sampler's temperature on
    student-only paths (temperature warmup; trb at eps = 0), 1 where the teacher takes part."""
    return 1.0 if sampler.needs_teacher else sampler.temperature


def rollout_metrics(ro, rewards: list[bool], eps: float, temperature: float = 1.0) -> dict:
    """beta* distribution, realised KL(mu || pi_S) vs eps, teacher entropy and log-prob on the
    visited prefixes, teacher-support score (token mean and per sequence), rollout reward,
    SKD replaced-token rate, lengths, truncation, the sampling temperature."""
    m = ro.response_mask
    beta, kl = ro.beta[m].float(), ro.kl[m].float()
    p50, p90 = quantiles(beta)
    seq = sequence_support(ro).float()
    s_p10, s_p50 = quantiles(seq, (0.1, 0.5))
    lengths = m.sum(1).float()
    spec = {}
    if getattr(ro, "draft_proposed", None) is not None and int(ro.draft_proposed.sum()) > 0:
        spec = {"spec/acceptance": float(ro.draft_accepted.sum() / ro.draft_proposed.sum()),
                "spec/pinsker_bound": 1 - (eps / 2) ** 0.5}
    return {
        "eps": eps,
        "beta/mean": float(beta.mean()),
        "beta/p50": p50,
        "beta/p90": p90,
        "beta/frac_zero": float((beta == 0).float().mean()),
        "beta/frac_one": float((beta == 1).float().mean()),
        "kl_mu_student/mean": float(kl.mean()),
        "kl_mu_student/max": float(kl.max()),
        "teacher/entropy": float(ro.teacher_entropy[m].mean()),
        "teacher/logp": float(ro.teacher_logp[m].mean()),
        # where(), not a product with the mask: positions past a row's end hold NaN teacher records
        "support_score": float(torch.where(m, ro.teacher_logp - ro.student_logp, 0.0).sum() / m.sum()),
        "support_score/seq_mean": float(seq.mean()),
        "support_score/seq_p10": s_p10,
        "support_score/seq_p50": s_p50,
        "rollout/reward": sum(rewards) / len(rewards) if rewards else float("nan"),
        "rollout/length": float(lengths.mean()),
        "rollout/truncated": float((~ro.stopped).float().mean()),
        "rollout/replaced": float(ro.replaced[m].float().mean()),
        "rollout/temperature": temperature,
        **spec,
    }
