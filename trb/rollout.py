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

from collections.abc import Callable

import inspect
import time
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from trb.microbatch import MicroBatch, Sequences, response_hidden, split
from trb.blend import (
    blend_at,
    blend_logprobs,
    canonicalize_eos,
    kl_divergence,
    RowNoise,
    renormalise,
    safe_prod,
    sample_from_logprobs,
    uniform,
    skd_behavior_logprobs,
    skd_sample,
    temperature_logprobs,
    top_p_logprobs,
    trust_region_blend,
    trust_region_stats,
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
    draft_k: int = 0  # trb with eps > 0: speculative sampling, the student drafts k tokens per teacher pass

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampler kind must be one of {', '.join(SAMPLERS)}; got {self.kind!r}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0; got {self.eps}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.draft_k < 0:
            raise ValueError(f"draft_k must be >= 0; got {self.draft_k}")

    @property
    def speculative(self) -> bool:
        return self.kind == "trb" and self.eps > 0 and self.draft_k > 0 and not self.greedy

    @property
    def needs_teacher(self) -> bool:
        return self.kind in ("skd", "teacher") or (self.kind == "trb" and self.eps > 0)


@dataclass
class StopSpec:
    """The shared stop event: every id in `stop_ids` is one event, emitted as `emit_id`."""

    stop_ids: list[int]
    emit_id: int  # the student's own EOS
    pad_id: int
    vocab: int | None = None  # tokens both models share: logits past it (embedding padding rows) are dropped


@dataclass
class Rollout(Sequences):
    """A batch of sampled completions and per-token records. T = generated length. The Sequences
    fields: prompt_ids [B, P] left-padded, prompt_mask [B, P], tokens [B, T] (pad after the stop
    token), response_mask [B, T] bool (True up to and including the stop token)."""
    student_logp: torch.Tensor  # [B, T] log pi_S(y_t | h_t), temperature 1, canonical EOS
    teacher_logp: torch.Tensor  # [B, T] log pi_T(y_t | h_t) (NaN until scored if not decoded)
    behavior_logp: torch.Tensor  # [B, T] log mu(y_t | h_t)
    beta: torch.Tensor  # [B, T] trust-region beta* at the prefix (0 for other samplers)
    kl: torch.Tensor  # [B, T] KL(mu || pi_S) at the prefix
    replaced: torch.Tensor  # [B, T] bool, SKD replaced the student's token
    teacher_entropy: torch.Tensor  # [B, T] H(pi_T(.|h_t)) (NaN until scored if not decoded)
    stopped: torch.Tensor  # [B] bool, ended with the stop token (else truncated)
    teacher_decoded: bool = False
    draft_accepted: torch.Tensor | None = None  # [B] speculative: accepted draft tokens per row
    draft_proposed: torch.Tensor | None = None  # [B] speculative: drafted tokens per row

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


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(model, mode: str):
    """One torch.compile'd forward per model, reused across rollouts."""
    if model not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        # one graph per (batch, cache capacity): allow more than dynamo's default of 8 before it
        # silently falls back to eager
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _COMPILED[model] = torch.compile(model.forward, mode=mode, dynamic=False)
    return _COMPILED[model]


def _repeat_cache(cache, repeat: int) -> None:
    """Replicate every row of a KV cache `repeat` times in place (rows i*repeat .. i*repeat+repeat-1)."""
    if isinstance(cache, StaticCache):
        for layer in cache.layers:  # transformers' static layers have no batch_repeat_interleave
            layer.keys = layer.keys.repeat_interleave(repeat, 0)
            layer.values = layer.values.repeat_interleave(repeat, 0)
            layer.batch_size = layer.keys.shape[0]
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
    else:
        cache.batch_repeat_interleave(repeat)


class _CachedModel:
    """One model's incremental decoding state: a KV cache, its attention mask and per-row
    positions counting valid tokens only (left padding, and in speculative sampling rejected
    draft slots that stay in the cache masked out of attention). `logits` holds the next-token
    logits after the last call."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, repeat: int = 1, capacity: int = 0):
        """capacity > 0: a static cache of that many slots per row (prompt + new tokens), allocated
        once, so every decoding step has the same shapes and buffer addresses (what torch.compile
        and CUDA graphs need); 0: a dynamic cache that grows by concatenation."""
        self.model = model
        self.key = _cache_kwarg(model)
        self.cache = StaticCache(config=model.config, max_cache_len=capacity) if capacity else \
            DynamicCache(config=model.config)
        self.mask = mask.long()
        self.logits = None
        self.step_fn = self.model  # decoding steps (compile_step: a torch.compile'd forward)
        if ids.shape[1]:  # prefill, once per distinct prompt
            self.logits = self._run(self.model, ids, positions_from_mask(self.mask), logits_to_keep=1)[:, -1]
            if repeat > 1:  # prefix sharing: replicate the prompt caches for the n samples
                _repeat_cache(self.cache, repeat)
                self.logits = self.logits.repeat_interleave(repeat, 0)
        self.mask = self.mask.repeat_interleave(repeat, 0)
        self.length = self.mask.sum(1)  # [B] valid tokens so far = position of the next token
        self.written = self.mask.shape[1]  # slots used
        if capacity:  # a full-width mask from the start: every step sees the same shapes
            self.mask = torch.cat([self.mask, self.mask.new_zeros(self.mask.shape[0], capacity - self.written)], 1)

    def compile_step(self) -> None:
        """Decode through a torch.compile'd forward (static caches only: fixed shapes, one graph;
        on CUDA mode=reduce-overhead captures it as a CUDA graph)."""
        cuda = next(self.model.parameters()).device.type == "cuda"
        self.step_fn = _compiled(self.model, "reduce-overhead" if cuda else "default")

    def _run(self, fn, ids, positions, logits_to_keep):
        out = fn(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                 logits_to_keep=logits_to_keep, **{self.key: self.cache})
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B, n] (all valid); returns logits [B, n, V] after each of them."""
        n = tokens.shape[1]
        positions = self.length[:, None] + torch.arange(n, device=tokens.device)
        if isinstance(self.cache, StaticCache):
            self.mask[:, self.written : self.written + n] = 1
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.written += n
        self.length = self.length + n
        logits = self._run(self.step_fn, tokens, positions, logits_to_keep=n)
        self.logits = logits[:, -1]
        return logits

    def select(self, idx: torch.Tensor) -> None:
        """Keep only rows `idx` (dynamic caches): finished rows leave the batch."""
        self.cache.batch_select_indices(idx)
        self.mask, self.length = self.mask[idx], self.length[idx]
        if self.logits is not None:
            self.logits = self.logits[idx]

    def drop_last(self, keep: torch.Tensor, n: int) -> None:
        """Of the last n slots, keep the first keep[b] of row b; mask out the rest."""
        idx = torch.arange(n, device=keep.device)
        dead = idx[None, :] >= keep[:, None]
        lo, hi = self.written - n, self.written
        self.mask[:, lo:hi] = self.mask[:, lo:hi].masked_fill(dead, 0)
        self.length = self.length - dead.sum(1)


class _Clock:
    """Accumulates seconds into `timings[name]` between calls (no-op when timings is None)."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.cuda = timings, device.type == "cuda"
        self.t = time.perf_counter() if timings is not None else 0.0
        if timings is not None:
            timings.setdefault("prefill", 0.0)
            timings.setdefault("search", 0.0)
            timings.setdefault("steps", 0)

    def add(self, name: str | None) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if name is not None:
            self.timings[name] += now - self.t
        self.t = now

    def count(self, name: str, n: int = 1) -> None:
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0) + n


def _logprobs(logits: torch.Tensor, stop: StopSpec) -> torch.Tensor:
    """Log-probs over the shared vocabulary (padding rows dropped), EOS canonicalised."""
    if stop.vocab is not None and logits.shape[-1] > stop.vocab:
        logits = logits[..., : stop.vocab]
    return canonicalize_eos(torch.log_softmax(logits.float(), dim=-1), stop.stop_ids, stop.emit_id)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -safe_prod(logp.exp(), logp).sum(-1)


# ---------------------------------------------------------------------------------------------
# Behaviour policies: one pure step function per sampler, in a registry
# ---------------------------------------------------------------------------------------------


@dataclass
class BehaviourStep:
    """One decoding step of a behaviour policy for B rows: log mu [B, V] and, where the policy
    decides them itself, the token [B], beta* [B], KL(mu || pi_S) [B], and SKD's replaced flags [B]
    (None: the token is drawn from log mu, beta is 0, the KL is computed, nothing replaced)."""

    log_mu: torch.Tensor
    token: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    replaced: torch.Tensor | None = None


def _student_step(s, t, sampler: Sampler, generator) -> BehaviourStep:
    log_mu = s if sampler.temperature == 1.0 else temperature_logprobs(s, sampler.temperature)
    return BehaviourStep(top_p_logprobs(log_mu, sampler.top_p))


def _trb_step(s, t, sampler: Sampler, generator) -> BehaviourStep:
    log_mu, beta, kl = trust_region_blend(s, t, sampler.eps)
    return BehaviourStep(log_mu, beta=beta, kl=kl)


def _skd_step(s, t, sampler: Sampler, generator) -> BehaviourStep:
    log_mu = skd_behavior_logprobs(s, t, sampler.skd_top_k, sampler.skd_temperature)
    if sampler.greedy:
        return BehaviourStep(log_mu)
    tok, replaced = skd_sample(s, t, sampler.skd_top_k, sampler.skd_temperature, generator)
    return BehaviourStep(log_mu, token=tok, replaced=replaced)


def _teacher_step(s, t, sampler: Sampler, generator) -> BehaviourStep:
    return BehaviourStep(t)


# sampler kind -> step(s, t, sampler, generator) from both models' log-probs [B, V] (t is None when
# the teacher does not decode: trb at eps = 0 then takes the student's step). A new sampler is one
# function here plus its name in SAMPLERS (and, if it needs the teacher, Sampler.needs_teacher).
BEHAVIOURS: dict[str, Callable[..., BehaviourStep]] = {
    "student": _student_step, "trb": _trb_step, "skd": _skd_step, "teacher": _teacher_step}


# the per-token fields of a Rollout, each [B, T], and what a position past a row's end holds
TOKEN_FIELDS = {"tokens": None, "response_mask": False, "student_logp": 0.0, "teacher_logp": float("nan"),
                "behavior_logp": 0.0, "beta": 0.0, "kl": 0.0, "replaced": False, "teacher_entropy": float("nan")}


class Recorder:
    """The per-token records of B rows x up to T tokens, keyed by Rollout's own field names; the
    per-token and speculative decoders write into it, `finish` makes the Rollout."""

    def __init__(self, b: int, t: int, pad_id: int, device):
        self.fields = {}
        for name, fill in TOKEN_FIELDS.items():
            if name == "tokens":
                self.fields[name] = torch.full((b, t), pad_id, dtype=torch.long, device=device)
            elif isinstance(fill, bool):
                self.fields[name] = torch.zeros((b, t), dtype=torch.bool, device=device)
            else:
                self.fields[name] = torch.full((b, t), fill, device=device)

    def write(self, rows: torch.Tensor, cols, **values: torch.Tensor) -> None:
        for name, v in values.items():
            dst = self.fields[name]
            dst[rows, cols] = v.to(dst.dtype)

    def finish(self, width: int, prompt_ids, prompt_mask, stop: StopSpec, **extra) -> Rollout:
        f = {k: v[:, :width] for k, v in self.fields.items()}
        stopped = ((f["tokens"] == stop.emit_id) & f["response_mask"]).any(1)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, stopped=stopped, **f, **extra)


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
    timings: dict | None = None,
    n: int = 1,
    lockstep: Callable[[bool], bool] | None = None,
    static_cache: bool = False,
    compile_step: bool = False,
    check_every: int | None = None,
    max_rows: int = 0,
) -> Rollout:
    """Sample n completions per row of the left-padded prompts under `sampler`.

    Args: prompt_ids, prompt_mask [B, P]; n: samples per prompt (each prompt is prefilled once and
    its KV cache replicated; the result has B * n rows, prompt i's samples at rows i*n .. i*n+n-1);
    teacher may be None when `sampler.needs_teacher` is False; timings: a dict that receives
    seconds of prefill and of the trust-region search, and the number of decoding steps
    (benchmarks; it synchronises CUDA around the timed parts); lockstep: for a teacher sharded
    across ranks, called each step with "all my rows are done" and returning whether that holds on
    every rank, so every rank runs the same number of teacher forwards; static_cache: preallocated
    KV caches of prompt + max_new_tokens slots (fixed shapes per step; the per-token decoder
    only, speculative sampling keeps dynamic caches); compile_step (needs static_cache): decode
    through each model's torch.compile'd forward (compiled once per model); check_every: test
    for "every row has stopped" (a host sync) only every that many steps (None: every step on
    CPU, every 8 on GPUs); rows that stopped keep emitting masked padding until then, and the
    result is the same; max_rows > 0: at most that many rows (rounded down to whole prompts x n, at
    least one prompt) decode together, the prompts queued in waves. With a `RowNoise` generator
    a row's tokens and records do not depend on max_rows, and rows that stopped leave the batch
    (both models' dynamic KV caches shrink to the live rows) at every check; with a plain
    torch.Generator every row stays to the end, as the draws depend on the batch. (The
    speculative sampler draws the same distribution under any bound, but how many drafts a round
    takes depends on its batch, so its tokens do.) Returns a `Rollout`.
    """
    if max_rows and prompt_ids.shape[0] * n > max_rows:
        if lockstep is not None:
            raise ValueError("rollout.max_rows with a teacher sharded across ranks is not supported (the ranks' "
                             "waves would differ): use rollout.max_rows=0 or parallel.teacher=replicate")
        # waves: whole prompts x n, or (max_rows < n) each prompt's samples in groups of max_rows, the
        # prompt prefilled once per group
        per = max(1, max_rows // n)
        groups = [(i, i + per, 0, n) for i in range(0, prompt_ids.shape[0], per)] if max_rows >= n else \
            [(i, i + 1, j, min(n, j + max_rows)) for i in range(prompt_ids.shape[0]) for j in range(0, n, max_rows)]
        parts = []
        for lo, hi, j0, j1 in groups:
            noise = generator
            if isinstance(generator, RowNoise):
                noise = generator.slice(lo * n, hi * n) if j1 - j0 == n else generator.slice(lo * n + j0, lo * n + j1)
            parts.append(rollout(student, teacher, prompt_ids[lo:hi], prompt_mask[lo:hi],
                                 max_new_tokens=max_new_tokens, sampler=sampler, stop=stop, generator=noise,
                                 timings=timings, n=j1 - j0, static_cache=static_cache, compile_step=compile_step,
                                 check_every=check_every))
        return concat_rollouts(parts, stop.pad_id)
    if compile_step and not static_cache:
        raise ValueError("compile_step needs static_cache=True (a compiled step needs fixed shapes)")
    if sampler.needs_teacher and teacher is None:
        raise ValueError(f"sampler {sampler.kind!r} with eps={sampler.eps} needs a teacher model")
    if sampler.speculative:
        return speculative_rollout(student, teacher, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                   eps=sampler.eps, k=sampler.draft_k, stop=stop, generator=generator,
                                   timings=timings, n=n)
    dev = prompt_ids.device
    clock = _Clock(timings, dev)
    # static caches: capacity rounded up to a multiple of 64 slots, so prompts of similar widths
    # share one compiled decoding graph
    capacity = -(-(prompt_ids.shape[1] + max_new_tokens) // 64) * 64 if static_cache else 0
    s_step = _CachedModel(student, prompt_ids, prompt_mask, repeat=n, capacity=capacity)
    t_step = _CachedModel(teacher, prompt_ids, prompt_mask, repeat=n, capacity=capacity) \
        if sampler.needs_teacher else None
    if compile_step:
        for m in (s_step, t_step):
            if m is not None:
                m.compile_step()
    if n > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
    b = prompt_ids.shape[0]
    clock.add("prefill")

    rec = Recorder(b, max_new_tokens, stop.pad_id, dev)
    rows = torch.arange(b, device=dev)  # the batch rows still decoding, in the records' row order
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    # rows leave the batch only when that changes nothing: per-row noise streams, dynamic caches, no
    # lockstep (a sharded teacher keeps every rank's batch)
    compact = isinstance(generator, RowNoise) and not static_cache and lockstep is None
    if check_every is None:
        check_every = 1 if dev.type == "cpu" else 8
    step_fn = BEHAVIOURS[sampler.kind if t_step is not None else "student"]
    steps_run = 0
    for step in range(max_new_tokens):
        s = _logprobs(s_step.logits, stop)
        t = _logprobs(t_step.logits, stop) if t_step is not None else None
        clock.add(None)
        bs = step_fn(s, t, sampler, generator)
        clock.add("search" if sampler.kind == "trb" and t is not None else None)
        tok = bs.token
        if tok is None:
            tok = bs.log_mu.argmax(-1) if sampler.greedy else sample_from_logprobs(bs.log_mu, generator)
        live = ~done
        tok = torch.where(live, tok, torch.full_like(tok, stop.pad_id))
        kl = bs.kl
        if kl is None:
            kl = kl_divergence(bs.log_mu, s) if bs.log_mu is not s else torch.zeros(tok.shape[0], device=dev)
        rec.write(rows, step, tokens=tok, response_mask=live, student_logp=s.gather(-1, tok[:, None])[:, 0],
                  behavior_logp=bs.log_mu.gather(-1, tok[:, None])[:, 0], kl=kl)
        if bs.beta is not None:
            rec.write(rows, step, beta=bs.beta)
        if bs.replaced is not None:
            rec.write(rows, step, replaced=bs.replaced & live)
        if t is not None:
            rec.write(rows, step, teacher_logp=t.gather(-1, tok[:, None])[:, 0], teacher_entropy=_entropy(t))
        done = done | (tok == stop.emit_id)
        steps_run = step + 1
        clock.count("steps")
        if (step + 1) % check_every == 0 or step + 1 == max_new_tokens:
            finished = bool(done.all())
            if lockstep is not None and t_step is not None:
                finished = lockstep(finished)
            if finished:
                break
            if compact and bool(done.any()):  # finished rows leave both models' caches
                keep = (~done).nonzero()[:, 0]
                for m in (s_step, t_step):
                    if m is not None:
                        m.select(keep)
                generator = generator.select(keep)
                rows, done, tok = rows[keep], done[keep], tok[keep]
        s_step.extend(tok[:, None])
        if t_step is not None:
            t_step.extend(tok[:, None])

    live = rec.fields["response_mask"][:, :steps_run]
    # < steps when the loop ran past every row's stop (check_every > 1, or lockstep across ranks)
    width = int(live.any(0).nonzero().max()) + 1 if b and steps_run else 0
    return rec.finish(width, prompt_ids, prompt_mask, stop, teacher_decoded=t_step is not None)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of consecutive row blocks as one: prompts left-padded and completions right-padded
    to the widest."""
    width = max(p.tokens.shape[1] for p in parts)
    p_width = max(p.prompt_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, value, to: int, left: bool = False) -> torch.Tensor:
        extra = to - x.shape[1]
        if extra == 0:
            return x
        fill = x.new_full((x.shape[0], extra), value)
        return torch.cat([fill, x] if left else [x, fill], 1)

    fields = {name: torch.cat([pad(getattr(p, name), pad_id if fill is None else fill, width) for p in parts])
              for name, fill in TOKEN_FIELDS.items()}
    spec = [p for p in parts if p.draft_accepted is not None]
    return Rollout(prompt_ids=torch.cat([pad(p.prompt_ids, pad_id, p_width, left=True) for p in parts]),
                   prompt_mask=torch.cat([pad(p.prompt_mask, 0, p_width, left=True) for p in parts]),
                   stopped=torch.cat([p.stopped for p in parts]), teacher_decoded=parts[0].teacher_decoded,
                   draft_accepted=torch.cat([p.draft_accepted for p in spec]) if spec else None,
                   draft_proposed=torch.cat([p.draft_proposed for p in spec]) if spec else None, **fields)


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
def score_micro_batch(teacher, ro: Rollout, mb: MicroBatch, stop: StopSpec) -> torch.Tensor:
    """The teacher's hidden states at the completion positions of one micro-batch [N, H] (for the
    loss); fills those positions of ro.teacher_logp / ro.teacher_entropy when the sampler did not
    decode with the teacher."""
    h_t = response_hidden(teacher, mb)
    if not ro.teacher_decoded and mb.weight:
        t_lp, t_ent = score_tokens(teacher.get_output_embeddings(), h_t, ro.tokens[mb.rows, mb.cols], stop)
        ro.teacher_logp[mb.rows, mb.cols] = t_lp.to(ro.teacher_logp.dtype)
        ro.teacher_entropy[mb.rows, mb.cols] = t_ent.to(ro.teacher_entropy.dtype)
    return h_t


@torch.no_grad()
def student_records(model, ro: Rollout, sampler: Sampler, stop: StopSpec, micro_batch_tokens: int = 0,
                    chunk: int = 1024) -> None:
    """The student's records of a rollout sampled elsewhere (an inference engine): log pi_S(y_t) at
    temperature 1, log mu(y_t) of the student-only sampler (temperature, nucleus) and KL(mu || pi_S)
    at every completion position, exactly as trb's decoder records them (shared vocabulary,
    canonical EOS), from one forward of `model` over the finished sequences, a micro-batch of at
    most `micro_batch_tokens` padded tokens and `chunk` positions of vocabulary at a time."""
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    for mb in split(ro, micro_batch_tokens, stop.pad_id):
        hidden = response_hidden(model, mb)
        tokens = ro.tokens[mb.rows, mb.cols]
        parts = []
        for i in range(0, hidden.shape[0], chunk):
            s = _logprobs(head(hidden[i : i + chunk]), stop)
            log_mu = _student_step(s, None, sampler, None).log_mu
            tok = tokens[i : i + chunk, None]
            kl = kl_divergence(log_mu, s) if log_mu is not s else torch.zeros(s.shape[0], device=s.device)
            parts.append(torch.stack([s.gather(-1, tok)[:, 0], log_mu.gather(-1, tok)[:, 0], kl.float()]))
        if parts:
            s_lp, mu_lp, kl = torch.cat(parts, 1)
            ro.student_logp[mb.rows, mb.cols] = s_lp.to(ro.student_logp.dtype)
            ro.behavior_logp[mb.rows, mb.cols] = mu_lp.to(ro.behavior_logp.dtype)
            ro.kl[mb.rows, mb.cols] = kl.to(ro.kl.dtype)
    model.train(was_training)


@torch.no_grad()
def teacher_scores(teacher, ro: Rollout, stop: StopSpec, micro_batch_tokens: int = 0) -> None:
    """Teacher log-probs and entropies of a rollout's tokens (for samplers that did not decode with
    the teacher), one micro-batch of at most `micro_batch_tokens` padded tokens at a time."""
    if ro.teacher_decoded:
        return
    for mb in split(ro, micro_batch_tokens, stop.pad_id):
        score_micro_batch(teacher, ro, mb, stop)


# ---------------------------------------------------------------------------------------------
# Speculative TRB sampling
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def speculative_rollout(student, teacher, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                        max_new_tokens: int, eps: float, k: int, stop: StopSpec,
                        generator: torch.Generator | None = None, timings: dict | None = None,
                        n: int = 1) -> Rollout:
    """Exact samples from the trust-region blend mu_beta by speculative sampling.

    Per round: the student drafts d_1..d_k from pi_S (k cheap steps); the teacher scores the k + 1
    positions in one forward; at each position beta*, mu_beta come from the two models' log-probs;
    d_i is accepted with probability min(1, mu_i(d_i) / pi_S,i(d_i)); the first rejection is
    replaced by a sample of normalise(max(0, mu_i - pi_S,i)), and when all k are accepted a bonus
    token is drawn from mu_{k+1}. Every emitted token is therefore distributed as mu_beta given its
    prefix, exactly as in the per-token decoder, and its records (log pi_S, log pi_T, log mu, beta,
    KL, teacher entropy) are those of its prefix. Acceptance per token is 1 - TV(mu, pi_S) >=
    1 - sqrt(eps / 2). Rows advance by different amounts: rejected draft slots stay in the caches,
    masked out of attention, and positions count only valid tokens.
    """
    dev = prompt_ids.device
    clock = _Clock(timings, dev)
    # prefill (once per distinct prompt, caches replicated n times): student on the whole prompt
    # (its next-token distribution), teacher one token behind
    s_model = _CachedModel(student, prompt_ids[:, :-1], prompt_mask[:, :-1], repeat=n)
    t_model = _CachedModel(teacher, prompt_ids[:, :-1], prompt_mask[:, :-1], repeat=n)
    if n > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
    b = prompt_ids.shape[0]
    s_next = _logprobs(s_model.extend(prompt_ids[:, -1:])[:, -1], stop)
    pending = prompt_ids[:, -1]  # the last valid token the teacher has not seen yet
    clock.add("prefill")

    rec = Recorder(b, max_new_tokens, stop.pad_id, dev)
    written = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    accepted = torch.zeros(b, dtype=torch.long, device=dev)
    proposed = torch.zeros(b, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)
    while not bool(done.all()):
        # 1. draft kr <= k tokens with the student (kr forwards; s_all holds pi_S at positions 1..kr+1);
        # no row can use more than its remaining budget
        kr = max(1, min(k, int((max_new_tokens - written)[~done].max()) - 1))
        s_list, drafts = [s_next], []
        for _ in range(kr):
            d = sample_from_logprobs(s_list[-1], generator)
            drafts.append(d)
            s_list.append(_logprobs(s_model.extend(d[:, None])[:, -1], stop))
        draft = torch.stack(drafts, 1)  # [B, k]
        # float64, exactly normalised (a float32 log-softmax over a large vocabulary is not): the
        # accept ratio mu(x) / pi_S(x) and the residual need the true pi_S
        s_all = renormalise(torch.stack(s_list, 1))  # [B, k+1, V]
        # 2. one teacher forward over [pending, d_1..d_k] -> pi_T at positions 1..k+1
        t_all = renormalise(_logprobs(t_model.extend(torch.cat([pending[:, None], draft], 1)), stop))
        clock.add(None)
        # beta*, the blend's normaliser and KL at every position; log mu only where it is needed
        beta, log_z, kl = trust_region_stats(s_all, t_all, eps, rounded_inputs=True)
        clock.add("search")
        # 3. accept / reject
        lp_s_d = s_all[:, :kr].gather(-1, draft[..., None])[..., 0]
        lp_t_d = t_all[:, :kr].gather(-1, draft[..., None])[..., 0]
        lp_mu_d = blend_at(lp_s_d, lp_t_d, beta[:, :kr], log_z[:, :kr])
        u = uniform((b, kr), generator, dev)
        ok = u < (lp_mu_d - lp_s_d).exp()
        n_acc = ok.long().cumprod(1).sum(1)  # leading accepts, [B]
        s_j, t_j = s_all[rows, n_acc], t_all[rows, n_acc]
        mu_j = blend_logprobs(s_j, t_j, beta[rows, n_acc])  # [B, V] at the first rejected (or bonus) position
        resid = (mu_j.exp() - s_j.exp()).clamp_min(0)
        bonus = n_acc == kr
        use_mu = bonus | (resid.sum(-1) <= 0)  # all accepted, or mu == pi_S up to rounding
        y = torch.where(use_mu, sample_from_logprobs(mu_j, generator),
                        sample_from_logprobs(resid.clamp_min(1e-38).log().masked_fill(resid <= 0, float("-inf")),
                                             generator))
        cand = torch.cat([draft, torch.zeros_like(draft[:, :1])], 1).scatter(1, n_acc[:, None], y[:, None])
        count = n_acc + 1  # tokens emitted this round, before EOS / length limits
        # 4. records of the emitted tokens (at most k + 1 per row)
        t_ent = _entropy(t_all)
        lp = {"student_logp": s_all, "teacher_logp": t_all}
        pos = torch.arange(kr + 1, device=dev)[None, :]
        is_stop = (cand == stop.emit_id) & (pos < count[:, None])
        first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, count)
        n_emit = torch.minimum(first_stop, max_new_tokens - written)
        n_emit = torch.where(done, torch.zeros_like(n_emit), n_emit)
        live = pos < n_emit[:, None]  # [B, kr+1]
        r_idx, p_idx = live.nonzero(as_tuple=True)
        dst = written[r_idx] + p_idx
        tok_sel = cand[r_idx, p_idx]
        rec.write(r_idx, dst, tokens=tok_sel, response_mask=torch.ones_like(tok_sel, dtype=torch.bool),
                  **{name: full[r_idx, p_idx].gather(-1, tok_sel[:, None])[:, 0] for name, full in lp.items()})
        # log mu of the emitted tokens: accepted drafts from blend_at, the last one from mu_j
        cand_mu = torch.cat([lp_mu_d, torch.zeros_like(lp_mu_d[:, :1])], 1)
        cand_mu = cand_mu.scatter(1, n_acc[:, None], mu_j.gather(-1, y[:, None]).float())
        rec.write(r_idx, dst, behavior_logp=cand_mu[r_idx, p_idx], beta=beta[r_idx, p_idx], kl=kl[r_idx, p_idx],
                  teacher_entropy=t_ent[r_idx, p_idx])
        # acceptance bookkeeping: one accept/reject decision per drafted position reached and used
        decided = torch.minimum(torch.minimum(n_acc + 1, torch.full_like(n_acc, kr)), n_emit)
        accepted += torch.minimum(n_acc, n_emit)
        proposed += decided
        written += n_emit
        clock.count("steps")  # one round
        done = done | (is_stop & live).any(1) | (written >= max_new_tokens)
        if bool(done.all()):
            break
        # 5. roll back the caches to the accepted prefix; feed y to the student, keep it pending for the teacher
        s_model.drop_last(n_acc, kr)
        t_model.drop_last(n_acc + 1, kr + 1)
        s_next = _logprobs(s_model.extend(y[:, None])[:, -1], stop)
        pending = y

    width = int(written.max()) if b else 0
    return rec.finish(width, prompt_ids, prompt_mask, stop, teacher_decoded=True, draft_accepted=accepted,
                      draft_proposed=proposed)
