"""The dual-model decoder: student and teacher advance together on KV caches.

At each decoding step both models' next-token log-probs go through EOS canonicalisation and a
behaviour policy (student, trust-region blend, SKD, teacher), one token is drawn per row, and the
per-token statistics the loss and the diagnostics need are recorded. With eps = 0 (or any
student-only sampler) the teacher is neither run nor given a cache: its scores come afterwards
from one forward pass over the finished sequences (`score_tokens`).

Left padding with per-row positions (cumsum of the attention mask), n samples per prompt by
repeating rows, stop at the canonical EOS or `max_new_tokens`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from trb.blend import (
    canonicalize_eos,
    kl_divergence,
    safe_prod,
    sample_from_logprobs,
    skd_behavior_logprobs,
    skd_sample,
    temperature_logprobs,
    top_p_logprobs,
    trust_region_blend,
)

SAMPLERS = ("student", "trb", "skd", "teacher")


@dataclass
class Sampler:
    """The behaviour policy of one rollout call."""

    kind: str = "trb"  # student | trb | skd | teacher
    eps: float = 0.0  # trust-region budget for kind=trb (0 = student-only fast path)
    temperature: float = 1.0  # student sampling temperature (temperature warmup); loss stays at 1
    top_p: float = 1.0  # student-only nucleus sampling (evaluation presets)
    skd_top_k: int = 25  # SKD: keep the student token when it is in the teacher's top-K
    skd_temperature: float = 1.0  # SKD: temperature of the replacing teacher sample
    greedy: bool = False  # argmax of the behaviour distribution instead of sampling

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampler kind must be one of {', '.join(SAMPLERS)}; got {self.kind!r}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0; got {self.eps}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")

    @property
    def needs_teacher(self) -> bool:
        return self.kind in ("skd", "teacher") or (self.kind == "trb" and self.eps > 0)


@dataclass
class StopSpec:
    """The shared stop event: every id in `stop_ids` is one event, emitted as `emit_id`."""

    stop_ids: list[int]
    emit_id: int  # the student's own EOS
    pad_id: int


@dataclass
class Rollout:
    """A batch of sampled completions and per-token records. T = generated length."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, T] (pad after the stop token)
    response_mask: torch.Tensor  # [B, T] bool, True up to and including the stop token
    student_logp: torch.Tensor  # [B, T] log pi_S(y_t | h_t), temperature 1, canonical EOS
    teacher_logp: torch.Tensor  # [B, T] log pi_T(y_t | h_t) (NaN until scored if not decoded)
    behavior_logp: torch.Tensor  # [B, T] log mu(y_t | h_t)
    beta: torch.Tensor  # [B, T] trust-region beta* at the prefix (0 for other samplers)
    kl: torch.Tensor  # [B, T] KL(mu || pi_S) at the prefix
    replaced: torch.Tensor  # [B, T] bool, SKD replaced the student's token
    teacher_entropy: torch.Tensor  # [B, T] H(pi_T(.|h_t)) (NaN until scored if not decoded)
    stopped: torch.Tensor  # [B] bool, ended with the stop token (else truncated)
    teacher_decoded: bool = False

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, P+T], attention mask [B, P+T]) of prompt + completion."""
        ids = torch.cat([self.prompt_ids, self.tokens], dim=1)
        mask = torch.cat([self.prompt_mask.bool(), self.response_mask], dim=1).long()
        return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions for left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _cache_kwarg(model) -> str:
    """transformers 5.x calls the KV cache `cache`; older releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Stepper:
    """One model's incremental decoding state (cache + running positions)."""

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.model = model
        self.key = _cache_kwarg(model)
        self.mask = prompt_mask.long()
        positions = positions_from_mask(self.mask)
        self.pos = positions[:, -1:]
        self.cache = DynamicCache(config=model.config)
        self._forward(prompt_ids, positions)  # prefill

    def advance(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos + 1
        self._forward(tokens[:, None], self.pos)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **{self.key: self.cache})
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        self.logits = out.logits[:, -1]


def _logprobs(logits: torch.Tensor, stop: StopSpec) -> torch.Tensor:
    return canonicalize_eos(torch.log_softmax(logits.float(), dim=-1), stop.stop_ids, stop.emit_id)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -safe_prod(logp.exp(), logp).sum(-1)


@torch.no_grad()
def rollout(
    student,
    teacher,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    sampler: Sampler,
    stop: StopSpec,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one completion per row of the left-padded prompts under `sampler`.

    Args: prompt_ids, prompt_mask [B, P] (repeat rows beforehand for n samples per prompt);
    teacher may be None when `sampler.needs_teacher` is False. Returns a `Rollout`.
    """
    if sampler.needs_teacher and teacher is None:
        raise ValueError(f"sampler {sampler.kind!r} with eps={sampler.eps} needs a teacher model")
    b = prompt_ids.shape[0]
    dev = prompt_ids.device
    s_step = _Stepper(student, prompt_ids, prompt_mask)
    t_step = _Stepper(teacher, prompt_ids, prompt_mask) if sampler.needs_teacher else None

    cols: dict[str, list[torch.Tensor]] = {k: [] for k in
                                           ("tok", "live", "s", "t", "mu", "beta", "kl", "rep", "ent")}
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    nan = torch.full((b,), float("nan"), device=dev)
    for _ in range(max_new_tokens):
        s = _logprobs(s_step.logits, stop)
        t = _logprobs(t_step.logits, stop) if t_step is not None else None
        replaced = torch.zeros(b, dtype=torch.bool, device=dev)
        beta = torch.zeros(b, device=dev)
        tok, kl = None, None
        if sampler.kind == "teacher":
            log_mu = t
        elif sampler.kind == "skd":
            log_mu = skd_behavior_logprobs(s, t, sampler.skd_top_k, sampler.skd_temperature)
            if not sampler.greedy:
                tok, replaced = skd_sample(s, t, sampler.skd_top_k, sampler.skd_temperature, generator)
        elif t is not None:  # trb with eps > 0
            log_mu, beta, kl = trust_region_blend(s, t, sampler.eps)
        else:  # student (or trb at eps = 0): temperature only
            log_mu = s if sampler.temperature == 1.0 else temperature_logprobs(s, sampler.temperature)
            log_mu = top_p_logprobs(log_mu, sampler.top_p)
        if tok is None:
            tok = log_mu.argmax(-1) if sampler.greedy else sample_from_logprobs(log_mu, generator)
        live = ~done
        tok = torch.where(live, tok, torch.full_like(tok, stop.pad_id))
        cols["tok"].append(tok)
        cols["live"].append(live)
        cols["s"].append(s.gather(-1, tok[:, None])[:, 0])
        cols["t"].append(t.gather(-1, tok[:, None])[:, 0] if t is not None else nan)
        cols["mu"].append(log_mu.gather(-1, tok[:, None])[:, 0])
        cols["beta"].append(beta)
        if kl is None:
            kl = kl_divergence(log_mu, s) if log_mu is not s else torch.zeros(b, device=dev)
        cols["kl"].append(kl)
        cols["rep"].append(replaced & live)
        cols["ent"].append(_entropy(t) if t is not None else nan)
        done = done | (tok == stop.emit_id)
        if bool(done.all()):
            break
        s_step.advance(tok)
        if t_step is not None:
            t_step.advance(tok)

    st = {k: torch.stack(v, dim=1) for k, v in cols.items()}
    mask = st["live"]
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        tokens=st["tok"],
        response_mask=mask,
        student_logp=st["s"],
        teacher_logp=st["t"],
        behavior_logp=st["mu"],
        beta=st["beta"],
        kl=st["kl"],
        replaced=st["rep"],
        teacher_entropy=st["ent"],
        stopped=(st["tok"] == stop.emit_id).any(dim=1),
        teacher_decoded=t_step is not None,
    )


def response_hidden(model, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states predicting each response token: [N, H] for the True entries of
    response_mask [B, T] (position P-1+j predicts token j)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).last_hidden_state
    t = response_mask.shape[1]
    return hidden[:, prompt_len - 1 : prompt_len - 1 + t][response_mask]


@torch.no_grad()
def score_tokens(head, hidden: torch.Tensor, tokens: torch.Tensor, stop: StopSpec,
                 chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token), entropy) per row of hidden [N, H] under `head`, chunked over rows."""
    lps, ents = [], []
    for i in range(0, hidden.shape[0], chunk):
        lp = _logprobs(head(hidden[i : i + chunk]), stop)
        lps.append(lp.gather(-1, tokens[i : i + chunk, None])[:, 0])
        ents.append(_entropy(lp))
    if not lps:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(lps), torch.cat(ents)


@torch.no_grad()
def teacher_scores(teacher, ro: Rollout, stop: StopSpec) -> torch.Tensor:
    """One teacher forward over the finished sequences: its hidden states at the response
    positions [N, H] (for the loss); fills ro.teacher_logp / ro.teacher_entropy in place when the
    sampler did not decode with the teacher."""
    seq, smask = ro.sequences()
    m = ro.response_mask
    h_t = response_hidden(teacher, seq, smask, ro.prompt_ids.shape[1], m)
    if not ro.teacher_decoded:
        t_lp, t_ent = score_tokens(teacher.get_output_embeddings(), h_t, ro.tokens[m], stop)
        ro.teacher_logp[m] = t_lp.to(ro.teacher_logp.dtype)
        ro.teacher_entropy[m] = t_ent.to(ro.teacher_entropy.dtype)
    return h_t
