"""`trb plan`: the peak memory per device of each phase of a training step, from model shapes alone.

    trb plan experiment=paper_0.6b_4b plan.world_size=8 plan.device_gb=80
    trb plan train.micro_batch_tokens=16384 ...     # the same overrides as trb train

No weights are loaded: the shapes come from the models' config.json (a local folder, the Hugging
Face cache, the toy models, or the small shape files shipped in trb/assets/shapes that the paper
presets name in student.shape / teacher.shape). The plan is a model of trb's code, phase by phase:

  rollout          both models decode (eps > 0, SKD, SFT teacher samples): KV caches of the rows
                   decoded together (rollout.max_rows, else every local row) at full length (the
                   worst case: finished rows leave, but one long row keeps its slot), in the rollout
                   copy's dtype (rollout.dtype), vocabulary-wide blend temporaries, one prefill
  student_rollout  the student decodes alone (eps = 0)
  scoring          one teacher forward over a micro-batch (no KV cache), while the gradients of the
                   update are held
  update           the student's forward + backward over one micro-batch: saved activations (all
                   layers, or the layer inputs with activation checkpointing plus one recomputed
                   layer), the chunked loss's [chunk, V] temporaries, gradients
  eval             the periodic eval: eval_decoding.batch rows of the rollout copy decoding

With the vLLM engine (engine=vllm, or auto where vLLM is installed), student_rollout and eval hold
the engine awake instead of trb's decoder: its whole budget (engine.gpu_memory_utilization of the
device, or the weights + engine.kv_cache_gb); in the other phases it sleeps (engine.sleep: KV cache
and weights freed; a fixed estimate of what a sleeping engine keeps is planned).

Every phase also holds the persistent state: student weights (FSDP2 shards), AdamW state, the
rollout copy (several processes), the teacher (replicated or sharded). Byte counts per token of
the saved activations were read off transformers' Qwen3 decoder layer with saved-tensor hooks
(tests/test_plan.py re-derives them); other architectures are planned with the same counts.
`trb bench memory` checks the plan against measured peaks.
"""

from __future__ import annotations

from trb.errors import UserError

import json
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9
SHAPES = Path(__file__).parent / "assets" / "shapes"
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# saved activations of one Qwen3 decoder layer per token, in bytes, as coefficients of
# (hidden, q width = heads x head_dim, kv width = kv_heads x head_dim, ffn, heads, kv_heads, 1)
ACT_FP32 = (24, 16, 16, 16, 8, 4, 8)  # float32 weights and compute
ACT_AUTOCAST = (26, 10, 10, 8, 8, 4, 8)  # float32 weights under bf16 autocast (one process)
ACT_BF16 = (16, 10, 10, 8, 6, 6, 8)  # bf16 parameters (FSDP2 MixedPrecisionPolicy)
# [chunk, V] float32 temporaries alive at the peak of one loss chunk's recompute + backward, and
# [rows, V] float64-equivalent temporaries of one decoding step (log-softmax, blend, search)
LOSS_VOCAB_TENSORS = 6
SCORE_VOCAB_TENSORS = 3  # teacher log-probs + entropy of 1,024 positions when the teacher did not decode
DECODE_VOCAB_TENSORS = {"blend": 10, "student": 4}


class PlanError(UserError):
    """The plan cannot be made (a model's shape is unknown); the message says what to set."""


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model's config.json."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> Shape:
        heads = c["num_attention_heads"]
        return cls(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, ffn=c["intermediate_size"],
                   tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden
        return 2 * h * self.q + 2 * h * self.kv + 3 * h * self.ffn + 2 * h + 2 * self.head_dim

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.head_params * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    def kv_bytes(self, dtype_bytes: int) -> int:
        """KV cache bytes per token (all layers)."""
        return self.layers * 2 * self.kv * dtype_bytes

    def act_bytes(self, coef) -> float:
        """Saved activations of one decoder layer per token."""
        return sum(a * x for a, x in zip(coef, (self.hidden, self.q, self.kv, self.ffn, self.heads,
                                                self.kv_heads, 1)))


def _read_config(path: Path) -> dict:
    return json.loads(path.read_text())


def load_shape(model, role: str) -> Shape:
    """The shape of `model` (a ModelConfig): its folder's or the HF cache's config.json, else
    model.shape (a config.json path or a name in trb/assets/shapes)."""
    path = model.path
    if path.startswith("toy:"):
        from trb.models import resolve_path

        path = resolve_path(model, role)
    folder = Path(path).expanduser()
    if (folder / "config.json").exists():
        return Shape.from_config(_read_config(folder / "config.json"))
    if not path.startswith((".", "/", "~")) and path.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001 (no hub library or a malformed id: fall through to model.shape)
            hit = None
        if isinstance(hit, str):
            return Shape.from_config(_read_config(Path(hit)))
    if model.shape:
        f = Path(model.shape).expanduser()
        f = f if f.suffix == ".json" else SHAPES / f"{model.shape}.json"
        if not f.exists():
            names = ", ".join(sorted(p.stem for p in SHAPES.glob("*.json")))
            raise PlanError(f"{role}.shape={model.shape!r} is neither a config.json file nor a shipped shape "
                            f"({names})")
        return Shape.from_config(_read_config(f))
    raise PlanError(f"no config.json for {role}.path={model.path!r} (not a local folder, not in the Hugging Face "
                    f"cache): set {role}.shape=/path/to/config.json or one of the shipped shapes")


@dataclass
class Plan:
    world_size: int
    device_gb: float
    reserve_gb: float
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> term -> GB
    skipped: dict[str, str] = field(default_factory=dict)  # phase -> why it never runs in this config
    engine: str = "hf"  # the student-only decoder planned: hf (trb's) | vllm
    notes: list[str] = field(default_factory=list)  # lines printed under the table

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak_gb(self) -> float:
        return self.total(self.peak_phase)

    @property
    def usable_gb(self) -> float:
        return self.device_gb - self.reserve_gb

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.usable_gb

    def failing(self) -> list[str]:
        return [p for p in self.phases if self.total(p) > self.usable_gb]

    def to_json(self) -> dict:
        return {"world_size": self.world_size, "device_gb": self.device_gb, "reserve_gb": self.reserve_gb,
                "phases": {p: round(self.total(p), 3) for p in self.phases},
                "terms": {p: {k: round(v, 3) for k, v in t.items()} for p, t in self.phases.items()},
                "skipped": self.skipped, "peak_phase": self.peak_phase, "peak_gb": round(self.peak_gb, 3),
                "fits": self.fits, "failing": self.failing(), "engine": self.engine, "notes": self.notes}

    def table(self) -> str:
        lines = [f"memory plan per device: {self.world_size} process(es), {self.device_gb:g} GB per device "
                 f"({self.reserve_gb:g} GB kept free)", f"{'phase':<16} {'GB':>8}  fits  main terms (GB)"]
        for p in self.phases:
            terms = sorted(self.phases[p].items(), key=lambda kv: -kv[1])
            main = ", ".join(f"{k} {v:.2f}" for k, v in terms if v >= 0.005)
            ok = "yes " if self.total(p) <= self.usable_gb else "NO  "
            lines.append(f"{p:<16} {self.total(p):8.2f}  {ok}  {main}")
        for p, why in self.skipped.items():
            lines.append(f"{p:<16} {'-':>8}  -     not run: {why}")
        lines += self.notes
        lines.append(f"peak {self.peak_gb:.2f} GB ({self.peak_phase}): "
                     + ("fits" if self.fits else f"does NOT fit in {self.usable_gb:g} GB"))
        return "\n".join(lines)

    def refusal(self) -> str:
        bad = self.failing()
        knobs = []
        if self.engine == "vllm" and ("student_rollout" in bad or "eval" in bad):
            knobs.append("engine.gpu_memory_utilization or engine.kv_cache_gb (smaller), engine=hf")
        if "update" in bad or "scoring" in bad:
            knobs.append("train.micro_batch_tokens (smaller), train.activation_checkpointing=true, "
                         "train.compute_dtype=bfloat16, loss.chunk_size (smaller)")
        if "rollout" in bad or "student_rollout" in bad:
            knobs.append("rollout.max_rows (fewer rows decoded together), rollout.dtype=bfloat16, "
                         "rollout.max_new_tokens, parallel.teacher=shard, more processes (torchrun --nproc_per_node)")
        if "eval" in bad:
            knobs.append("eval_decoding.batch, eval_decoding.max_new_tokens")
        worst = ", ".join(f"{p} {self.total(p):.1f} GB" for p in bad)
        return (f"the memory plan does not fit: {worst} per device > {self.usable_gb:g} GB usable "
                f"({self.device_gb:g} GB - plan.reserve_gb); change {'; '.join(knobs)} "
                f"(see `trb plan` with the same overrides; plan.check=false skips this check)")


def _gb(x: float) -> float:
    return x / GB


def lora_params(shape: Shape, lora) -> int:
    """LoRA parameters of a student of `shape`: rank x (in + out features) per adapted linear of every layer."""
    h, q, kv, ffn = shape.hidden, shape.q, shape.kv, shape.ffn
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, ffn),
            "up_proj": (h, ffn), "down_proj": (ffn, h)}
    unknown = [t for t in lora.target_modules if t not in dims]
    if unknown:
        raise PlanError(f"lora.target_modules {', '.join(unknown)}: trb plan knows the Qwen3 / Llama projections "
                        f"({', '.join(dims)}) only")
    return shape.layers * lora.rank * sum(sum(dims[t]) for t in lora.target_modules)


def plan_memory(cfg, world_size: int = 0, device_gb: float = 0.0, student: Shape | None = None,
                teacher: Shape | None = None) -> Plan:
    """The plan of a TrainConfig `cfg` (see the module docstring). world_size / device_gb: 0 takes
    cfg.plan's, then the launch's WORLD_SIZE (else 1) and the visible GPU's memory (else 80 GB)."""
    import os

    w = world_size or cfg.plan.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.prompts_per_step % w:
        raise PlanError(f"{w} processes do not divide prompts_per_step={cfg.prompts_per_step} (each rank takes an "
                        f"equal share; trb train refuses this run): set plan.world_size to a divisor of "
                        f"{cfg.prompts_per_step}, or change prompts_per_step")
    dev_gb = device_gb or cfg.plan.device_gb or _visible_gpu_gb() or 80.0
    s = student or load_shape(cfg.student, "student")
    t = teacher or load_shape(cfg.teacher, "teacher")
    plan = Plan(world_size=w, device_gb=dev_gb, reserve_gb=cfg.plan.reserve_gb)
    b_s, b_t = _BYTES[cfg.student.dtype], _BYTES[cfg.teacher.dtype]
    bf16 = cfg.train.compute_dtype == "bfloat16"
    dist = w > 1
    ro = cfg.rollout
    rows = cfg.prompts_per_step // w * ro.n
    prompts = cfg.prompts_per_step // w
    dec_rows = min(rows, ro.max_rows) if ro.max_rows else rows  # rows decoded together
    dec_prompts = max(1, min(prompts, dec_rows // ro.n))  # prompts prefilled together
    length = ro.max_prompt_tokens + ro.max_new_tokens
    batch_tokens = rows * length  # the largest padded batch of a step
    mb = min(cfg.train.micro_batch_tokens or batch_tokens, batch_tokens)
    mb_rows = max(1, mb // length) if cfg.train.micro_batch_tokens else rows
    n_resp = mb_rows * ro.max_new_tokens  # completion tokens in one micro-batch (at most)

    # persistent state
    policy_b = b_s if ro.dtype == "auto" else _BYTES[ro.dtype]  # the rollout copy (and its KV caches)
    # trained parameters: every student weight, or (lora.rank > 0) the adapter's, in float32 (PEFT keeps adapters
    # float32 on a bf16 base), while the base stays resident, frozen
    trained, b_tr = (lora_params(s, cfg.lora), 4) if cfg.lora.rank else (s.params, b_s)
    base = {"student weights": _gb(s.params * b_s / w)}
    if cfg.lora.rank:
        base[f"LoRA adapter (rank {cfg.lora.rank}, {trained / 1e6:.1f}M params)"] = _gb(trained * b_tr / w)
    base["AdamW state"] = _gb(2 * trained * b_tr / w)
    if dist or policy_b != b_s:
        base["rollout copy"] = _gb((s.params + (trained if cfg.lora.rank else 0)) * policy_b)
    if dist and cfg.parallel.teacher == "shard":
        head = t.head_params * b_t
        base["teacher weights"] = _gb((t.params * b_t - (0 if t.tied else head)) / w + head)
    else:
        base["teacher weights"] = _gb(t.params * b_t)
    grads = {"gradients": _gb(trained * 4 / w)}
    if dist and cfg.train.micro_batch_tokens and mb < batch_tokens:  # no reduce-scatter until the last micro-batch
        grads["unsharded gradients (accumulating)"] = _gb(trained * 4)
    if dist:  # FSDP2 all-gathers the current and the prefetched layer, and the root (embeddings + head)
        gathered = 2 * s.layer_params + s.head_params * (1 if s.tied else 2)
        grads[f"gathered {'bf16' if bf16 else 'fp32'} layers + root"] = _gb((2 if bf16 else b_s) * gathered)
    elif bf16:
        grads["autocast bf16 weight copies"] = _gb(2 * s.params)

    # decoding phases
    def decode(kv_terms: dict, vocab_rows: int, kind: str, prefill_rows: int) -> dict:
        widest = max(s.hidden, t.hidden if kind == "blend" else 0)
        ffn = max(s.ffn, t.ffn if kind == "blend" else 0)
        if kind == "blend" and ro.draft_k:  # speculative: k + 1 positions of float64 log-probs per row and round
            vocab_rows *= ro.draft_k + 1
        return {**base, **kv_terms,
                "vocabulary temporaries": _gb(DECODE_VOCAB_TENSORS[kind] * vocab_rows * s.vocab * 8),
                "prefill activations": _gb(prefill_rows * ro.max_prompt_tokens * (4 * widest + 3 * ffn) * 4)}

    kv_s = dec_rows * length * s.kv_bytes(policy_b)
    kv_t = dec_rows * length * t.kv_bytes(b_t)
    teacher_decodes = cfg.method.name in ("trb", "fixed", "skd", "sft_warmup") and (
        cfg.method.name != "trb" or cfg.blend.kind != "none")
    if teacher_decodes:
        plan.phases["rollout"] = decode({"student KV cache": _gb(kv_s), "teacher KV cache": _gb(kv_t)}, dec_rows,
                                        "blend", dec_prompts)
    else:
        plan.skipped["rollout"] = f"method={cfg.method.name} never decodes with the teacher"
    plan.phases["student_rollout"] = decode({"student KV cache": _gb(kv_s)}, dec_rows, "student", dec_prompts)

    # teacher scoring of one micro-batch (inference: one layer's temporaries at a time), gradients held
    score = {**base, **grads,
             "teacher layer temporaries": _gb(mb * (4 * t.hidden + t.q + 2 * t.kv + 3 * t.ffn) * b_t),
             "teacher hidden states": _gb(mb * t.hidden * b_t + n_resp * t.hidden * b_t),
             "teacher scoring logits": _gb(SCORE_VOCAB_TENSORS * min(n_resp, 1024) * t.vocab * 4)}
    plan.phases["scoring"] = score

    # the student's forward + backward of one micro-batch
    res_b = 2 if (bf16 and dist) else b_s  # the residual stream's dtype
    coef = (ACT_BF16 if dist else ACT_AUTOCAST) if bf16 else ACT_FP32
    if cfg.train.activation_checkpointing:
        acts = {"checkpointed layer inputs": _gb(s.layers * mb * s.hidden * res_b),
                "one recomputed layer": _gb(mb * s.act_bytes(coef))}
    else:
        acts = {"saved activations": _gb(s.layers * mb * s.act_bytes(coef))}
    chunk = min(cfg.loss.chunk_size, n_resp)
    update = {**base, **grads, **acts,
              "backward working set": _gb(mb * (2 * s.ffn + 4 * s.hidden) * 4),
              "final norm + hidden states": _gb(mb * 3 * s.hidden * 4 + n_resp * (s.hidden * 4 + t.hidden * b_t)),
              "loss chunk [chunk, V]": _gb(LOSS_VOCAB_TENSORS * chunk * s.vocab * 4)}
    plan.phases["update"] = update

    # periodic eval: decoding.batch rows of the rollout copy (each prompt prefilled once per wave),
    # prompts up to max_prompt_tokens
    d = cfg.eval_decoding
    eval_rows = d.batch
    eval_prompts = max(1, eval_rows // d.n)
    kv_eval = eval_rows * (ro.max_prompt_tokens + d.max_new_tokens) * s.kv_bytes(policy_b)
    plan.phases["eval"] = decode({"student KV cache": _gb(kv_eval)}, eval_rows, "student", eval_prompts)
    if _plans_vllm(cfg.engine.kind):
        _vllm_terms(plan, cfg, s, policy_b, base)
    return plan


ENGINE_ASLEEP_GB = 0.5  # what a sleeping vLLM engine keeps (CUDA graph pool, buffers): an estimate, not measured
ENGINE_WORKSPACE_GB = 1.0  # activations of one scheduled batch beside weights + KV with engine.kv_cache_gb


def _plans_vllm(kind: str) -> bool:
    import importlib.util

    return kind == "vllm" or (kind == "auto" and importlib.util.find_spec("vllm") is not None)


def _vllm_terms(plan: Plan, cfg, s: Shape, policy_b: int, base: dict) -> None:
    """The engine replaces trb's decoder in student_rollout and eval; it sleeps in the other phases."""
    e = cfg.engine
    plan.engine = "vllm"
    weights = s.params * policy_b
    if e.kv_cache_gb:
        awake, kv = weights + e.kv_cache_gb * 2**30 + ENGINE_WORKSPACE_GB * GB, e.kv_cache_gb * 2**30
        label = f"vLLM engine (weights + engine.kv_cache_gb {e.kv_cache_gb:g} + workspace)"
    else:
        awake = e.gpu_memory_utilization * plan.device_gb * GB
        kv = max(0.0, awake - weights - ENGINE_WORKSPACE_GB * GB)
        label = f"vLLM engine (engine.gpu_memory_utilization {e.gpu_memory_utilization:g} of the device)"
    for phase in ("student_rollout", "eval"):
        plan.phases[phase] = {**base, label: _gb(awake)}
    asleep = {"vLLM engine asleep": ENGINE_ASLEEP_GB} if e.sleep else {label: _gb(awake)}
    for phase in ("rollout", "scoring", "update"):
        if phase in plan.phases:
            plan.phases[phase] = {**plan.phases[phase], **asleep}
    ro = cfg.rollout
    seq = ro.max_prompt_tokens + max(ro.max_new_tokens, cfg.eval_decoding.max_new_tokens)
    tokens = kv / max(s.kv_bytes(policy_b), 1)
    plan.notes.append(f"vLLM KV space {_gb(kv):.1f} GB = {tokens:,.0f} tokens = {tokens / seq:.1f} full-length "
                      f"sequences at once ({seq:,} tokens each); the engine {'sleeps' if e.sleep else 'stays awake'} "
                      f"while the teacher scores and the student updates")
    if tokens < seq:
        plan.notes.append(f"warning: the engine's KV space holds less than one {seq:,}-token sequence: raise "
                          f"engine.gpu_memory_utilization or engine.kv_cache_gb")


def _visible_gpu_gb() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GB
    except Exception:  # noqa: BLE001
        return 0.0
    return 0.0


def run_plan(cfg, out_dir: Path | str, log=print) -> int:
    """`trb plan`: print the table, write plan.json into out_dir; 0 when it fits, 1 otherwise."""
    plan = plan_memory(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    log(plan.table())
    if not plan.fits:
        log(f"error: {plan.refusal()}")
        return 1
    return 0
