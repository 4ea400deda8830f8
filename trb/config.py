"""Typed configuration: one dataclass per Hydra config group, validated in __post_init__.

cli.py merges the composed Hydra config onto these schemas (unknown keys and wrong types fail
there, naming the key); everything below train.py sees only these dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

from trb.schedules import Schedule

ESTIMATORS = ("full", "topk", "sampled")  # loss estimators (trb.losses); kept here so configs import no torch
BLEND_KINDS = ("none", "constant", "linear", "cosine", "step")
METHODS = ("opd", "trb", "fixed", "skd", "veto", "temp_warmup", "sft_warmup")
STUDENT_ONLY_METHODS = ("opd", "skd", "veto", "temp_warmup", "sft_warmup")  # no trust-region budget
DTYPES = ("float32", "bfloat16", "float16")


def setting(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING) -> Any:
    """A config field and its one-line doc: the one source `trb <command> --help` and docs/settings.md read."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _finite(obj, prefix: str) -> None:
    """Every float field of a config section is a finite number (NaN passes `x >= 0`-style checks)."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{prefix}{f.name} must be a finite number; got {v}")


@dataclass
class ModelConfig:
    """A student or teacher model."""

    path: str = setting("toy:student", "local HF folder, hub id (must be cached offline), or toy:student / toy:teacher")
    dtype: str = setting("float32", "float32 | bfloat16 | float16")
    trust_remote_code: bool = setting(False, "run a model's own code from its folder (off unless you trust it)")
    shape: Optional[str] = setting(None,
                                   "config.json trb plan uses when the model is not at hand (a file, or a shipped "
                                   "name)")

    def __post_init__(self) -> None:
        _check(bool(self.path), "model path is empty: set student.path / teacher.path")
        _check(self.dtype in DTYPES, f"model dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")


@dataclass
class BlendConfig:
    """The trust-region budget eps_k over optimiser steps (kind=none: vanilla OPD, eps = 0)."""

    kind: str = setting("linear", "none | constant | linear | cosine | step")
    eps0: float = setting(0.01, "eps at step 0 (paper sweep: 0.001 .. 0.05)")
    horizon: int = setting(25, "K: eps reaches 0 at step K (paper: 15, 25, 50); unused by constant")
    milestones: list[int] = setting(factory=list, doc="step shape: steps where eps is multiplied by gamma")
    gamma: float = setting(0.5, "step shape: factor applied at each milestone")

    def __post_init__(self) -> None:
        _finite(self, "blend.")
        _check(self.kind in BLEND_KINDS, f"blend.kind must be one of {', '.join(BLEND_KINDS)}; got {self.kind!r}")
        _check(self.eps0 >= 0, f"blend.eps0 must be >= 0; got {self.eps0}")
        _check(self.horizon >= 0, f"blend.horizon (K) must be >= 0; got {self.horizon}")
        self.schedule()  # validates milestones / gamma with the schedule's own messages

    def schedule(self) -> Schedule:
        if self.kind == "none":
            return Schedule("constant", 0.0, 0)
        return Schedule(self.kind, self.eps0, self.horizon, tuple(self.milestones), self.gamma)


@dataclass
class MethodConfig:
    """Which distillation method (docs/method.md section 5): only the sampler, target or start differs.

    opd: student rollouts. trb: the trust-region blend with the blend schedule (linear, cosine,
    step). fixed: the trust-region blend with a constant eps. skd: student token kept when in the
    teacher's top-K, else a fresh teacher sample at temperature tau_T. veto: student rollouts,
    target q ~ p_T * p_S^B with B decaying linearly to 0. temp_warmup: student rollouts whose
    temperature rises linearly to 1. sft_warmup: SFT on teacher samples, then OPD."""

    name: str = setting("trb", "opd | trb | fixed | skd | veto | temp_warmup | sft_warmup")
    skd_top_k: int = setting(25, "skd: K (paper sweep 15, 25, 50)")
    skd_temperature: float = setting(1.0, "skd: tau_T of the replacing teacher sample (paper sweep 0.2, 0.6, 1.0)")
    veto_b_start: float = setting(0.4, "veto: B at step 0 (paper sweep 0.2 .. 0.8)")
    veto_horizon: int = setting(25, "veto: B reaches 0 at this step")
    temp_start: float = setting(0.9, "temp_warmup: tau_0 (paper sweep 0.8, 0.9, 0.95)")
    temp_horizon: int = setting(25, "temp_warmup: temperature reaches 1.0 at this step (paper 15 or 25)")
    sft_updates: int = setting(25, "sft_warmup: SFT updates before OPD (paper 15, 25, 50); they count as steps")
    sft_prompt_steps: int = setting(50, "sft_warmup: teacher samples for the prompts of this many first steps")
    sft_samples: int = setting(4, "sft_warmup: teacher samples per prompt")

    def __post_init__(self) -> None:
        _finite(self, "method.")
        _check(self.name in METHODS, f"method.name must be one of {', '.join(METHODS)}; got {self.name!r}")
        _check(self.skd_top_k >= 1, f"method.skd_top_k (K) must be >= 1; got {self.skd_top_k}")
        _check(self.skd_temperature > 0, f"method.skd_temperature must be > 0; got {self.skd_temperature}")
        _check(self.veto_b_start >= 0, f"method.veto_b_start must be >= 0; got {self.veto_b_start}")
        _check(self.veto_horizon >= 0, f"method.veto_horizon must be >= 0; got {self.veto_horizon}")
        _check(0 < self.temp_start <= 1, f"method.temp_start (tau_0, rising to 1) must be in (0, 1]; got "
                                          f"{self.temp_start}")
        _check(self.temp_horizon >= 0, f"method.temp_horizon must be >= 0; got {self.temp_horizon}")
        _check(self.sft_updates >= 0, f"method.sft_updates must be >= 0; got {self.sft_updates}")
        _check(self.sft_prompt_steps >= 1, f"method.sft_prompt_steps must be >= 1; got {self.sft_prompt_steps}")
        _check(self.sft_samples >= 1, f"method.sft_samples must be >= 1; got {self.sft_samples}")


@dataclass
class DatasetConfig:
    """Problems with gold answers: the embedded toy task, a local file, or a hub dataset (local cache)."""

    name: str = setting("toy", "label; \"toy\" (without path) generates the embedded arithmetic task")
    hub_id: Optional[str] = setting(None,
                                    "Hugging Face dataset id (or a local dataset folder), read from the local cache "
                                    "only")
    hub_config: Any = setting(None, "hub config name, or a list of them to concatenate (MATH subjects)")
    train_split: Optional[str] = setting("train",
                                         "hub split trb train draws prompts from (null: none, an evaluation-only set)")
    eval_split: Optional[str] = setting("test",
                                        "hub split trb eval and the periodic eval score (null: held out of "
                                        "train_split)")
    path: Optional[str] = setting(None,
                                  "local .jsonl / .json / .parquet with the same fields (overrides hub_id; one "
                                  "source)")
    question_field: str = setting("question", "field with the problem text (dotted paths reach nested fields)")
    answer_field: Optional[str] = setting("answer", "field with the gold answer (None: no gold, e.g. OpenThoughts)")
    answer_kind: str = setting("gsm8k",
                               "gsm8k (after ####) | boxed (last \\boxed{} of a solution) | plain (a list: joined)")
    keep_fields: list[str] = setting(factory=list, doc="extra fields kept per row (MATH: type, level)")
    train_size: int = setting(4000, "training prompts selected (0 = every row; more than there are is refused)")
    eval_size: int = setting(200, "evaluation problems selected (0 = every row; more than there are is refused)")
    select: str = setting("shuffle", "which rows: shuffle (a seeded random subset) | first (file order)")
    seed: Optional[int] = setting(None, "the training rows' shuffle (null: the run's seed)")
    split_seed: int = setting(0,
                              "which rows are held out for eval (one source) and chosen for eval: fixed across run "
                              "seeds")
    # toy task difficulty
    min_ops: int = setting(1, "fewest operations per toy problem")
    max_ops: int = setting(3, "most operations per toy problem")
    max_operand: int = setting(29, "toy operands are drawn from 0..max_operand")
    ops: str = setting("+-", "toy operators")

    def __post_init__(self) -> None:
        _check(self.answer_kind in ("gsm8k", "boxed", "plain"),
               f"dataset.answer_kind must be gsm8k, boxed or plain; got {self.answer_kind!r}")
        _check(self.train_size >= 0, f"dataset.train_size must be >= 0; got {self.train_size}")
        _check(self.eval_size >= 0, f"dataset.eval_size must be >= 0; got {self.eval_size}")
        _check(self.select in ("shuffle", "first"), f"dataset.select must be shuffle or first; got {self.select!r}")
        _check(self.seed is None or self.seed >= 0, f"dataset.seed must be >= 0 or null; got {self.seed}")
        _check(self.split_seed >= 0, f"dataset.split_seed must be >= 0; got {self.split_seed}")
        _check(self.name == "toy" or bool(self.path or self.hub_id),
               f"dataset {self.name!r} needs dataset.path=/path/to/file.jsonl or dataset.hub_id")
        _check(bool(self.path) or self.name == "toy" or bool(self.train_split or self.eval_split),
               f"dataset {self.name!r}: dataset.train_split and dataset.eval_split are both null; name a split")


@dataclass
class PromptConfig:
    """How a problem becomes the prompt text."""

    style: str = setting("chat", "chat (the tokenizer's template) | plain (plain_template, for Base models)")
    instruction: Optional[str] = setting(None, "e.g. the paper's \"Please reason step by step, ...\" (None: none)")
    instruction_role: str = setting("user", "user (appended to the problem) | system (a system message)")
    plain_template: str = setting("Problem: {question}\n{instruction}\nSolution:", "plain style format string")
    enable_thinking: Optional[bool] = setting(None,
                                              "Qwen3 templates' thinking switch: true | false | null (template "
                                              "default)")

    def __post_init__(self) -> None:
        _check(self.style in ("chat", "plain"), f"prompt.style must be chat or plain; got {self.style!r}")
        _check(self.instruction_role in ("user", "system"),
               f"prompt.instruction_role must be user or system; got {self.instruction_role!r}")
        _check(self.enable_thinking is None or self.style == "chat",
               "prompt.enable_thinking switches a chat template's thinking mode: it needs prompt.style=chat "
               "(or prompt.enable_thinking=null)")


@dataclass
class LossConfig:
    """Reverse KL(student || teacher) estimator, token-mean over response tokens."""

    estimator: str = setting("topk", "topk (paper) | full | sampled")
    k: int = setting(16, "topk: size of the student's top-k support")
    topk_baseline: bool = setting(True,
                                  "topk: centre the held log-ratios (renormalised top-k KL); false = literal reading")
    importance_weight: bool = setting(True, "sampled: weight by pi_S(y) / mu(y) on blended rollouts")
    chunk_size: int = setting(1024, "positions per chunk of the vocabulary projection (memory bound)")

    def __post_init__(self) -> None:
        _check(self.estimator in ESTIMATORS, f"loss.estimator must be one of {', '.join(ESTIMATORS)}; "
                                             f"got {self.estimator!r}")
        _check(self.k >= 1, f"loss.k must be >= 1; got {self.k}")
        _check(self.chunk_size >= 1, f"loss.chunk_size must be >= 1; got {self.chunk_size}")


@dataclass
class RolloutConfig:
    """Sampling of training rollouts."""

    n: int = setting(4, "samples per prompt")
    max_new_tokens: int = setting(48, "response length cap")
    temperature: float = setting(1.0, "rollout temperature (paper: 1.0)")
    max_prompt_tokens: int = setting(256, "longer prompts are skipped or truncated (long_prompts), and counted")
    long_prompts: str = setting("skip", "skip | truncate (keep the last max_prompt_tokens tokens, as TRL does)")
    draft_k: int = setting(0,
                           "speculative TRB sampling while eps > 0: student drafts k tokens per teacher pass (0 = "
                           "off)")
    compile_search: bool = setting(False,
                                   "torch.compile the beta search's passes (~40 s once; pays on large vocabularies)")
    static_cache: bool = setting(False, "preallocated KV caches (fixed shapes per decoding step; per-token decoder)")
    compile_step: bool = setting(False,
                                 "decode through torch.compile'd model forwards (needs static_cache; CUDA graphs on "
                                 "GPU)")
    max_rows: int = setting(0,
                            "rows decoded together (whole prompts x n; the rest queued in waves; 0 = all local rows)")
    dtype: str = setting("auto",
                         "the rollout copy that samples and evaluates: auto (the trained weights') | bfloat16 | "
                         "float32")

    def __post_init__(self) -> None:
        _finite(self, "rollout.")
        _check(self.n >= 1, f"rollout.n must be >= 1; got {self.n}")
        _check(self.max_rows >= 0, f"rollout.max_rows must be >= 0; got {self.max_rows}")
        _check(self.dtype in ("auto", *DTYPES), f"rollout.dtype must be auto or one of {', '.join(DTYPES)}; "
                                                 f"got {self.dtype!r}")
        _check(not self.compile_step or self.static_cache,
               "rollout.compile_step=true needs rollout.static_cache=true (a compiled step needs fixed shapes)")
        _check(self.draft_k >= 0, f"rollout.draft_k must be >= 0; got {self.draft_k}")
        _check(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1; got {self.max_new_tokens}")
        _check(self.temperature > 0, f"rollout.temperature must be > 0; got {self.temperature}")
        _check(self.max_prompt_tokens >= 1, f"rollout.max_prompt_tokens must be >= 1; got {self.max_prompt_tokens}")
        _check(self.long_prompts in ("skip", "truncate"),
               f"rollout.long_prompts must be skip or truncate; got {self.long_prompts!r}")


@dataclass
class OptimConfig:
    """AdamW with a cosine warmup, then constant lr (paper: 1e-5, warmup 15) or cosine decay."""

    lr: float = setting(3e-4, "peak learning rate (the toy default; the paper uses 1e-5)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.999, "AdamW beta2")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    grad_clip: float = setting(1.0, "global grad-norm clip (0 = off)")
    warmup_steps: int = setting(15, "lr warmup steps (cosine ramp from 0)")
    decay: str = setting("constant",
                         "after warmup: constant (paper) | cosine (down to min_lr_ratio * lr at the last step)")
    min_lr_ratio: float = setting(0.1, "cosine decay floor as a fraction of lr")

    def __post_init__(self) -> None:
        _finite(self, "optim.")
        _check(self.lr > 0, f"optim.lr must be > 0; got {self.lr}")
        _check(0 <= self.beta1 < 1, f"optim.beta1 must be in [0, 1); got {self.beta1}")
        _check(0 <= self.beta2 < 1, f"optim.beta2 must be in [0, 1); got {self.beta2}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        _check(self.decay in ("constant", "cosine"), f"optim.decay must be constant or cosine; got {self.decay!r}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0; got {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0; got {self.grad_clip}")


@dataclass
class LoggerConfig:
    """Experiment tracking. metrics.jsonl is always written; W&B or TensorBoard on top unless kind=none."""

    kind: str = setting("wandb", "wandb | tensorboard (event files in <run dir>/tensorboard) | none")
    mode: str = setting("auto", "auto (online with credentials, else offline) | online | offline")
    project: str = setting("trb", "W&B project")
    entity: Optional[str] = setting(None, "W&B entity (team or user)")
    group: Optional[str] = setting(None, "W&B group (null: a sweep's dir name; a train run's own dir name, which "
                                         "trb eval of that run dir joins)")
    job_type: str = setting("train", "W&B job type")
    tags: list[str] = setting(factory=list, doc="W&B tags")
    init_timeout: int = setting(30, "seconds W&B may take to reach its server before the run logs offline instead")
    artifact: str = setting("model",
                            "final checkpoint to W&B: model (no trainer state) | full | reference (file://) | none")
    table_every: int = setting(50, "trb train: table of completions (prompt, text, gold, extracted, reward, beta) "
                                   "every N steps (0 = off)")
    table_rows: int = setting(8, "rollouts per completions table (rank 0's first)")
    html_rows: int = setting(64,
                             "trb rollout: completions in the rollouts.html sent to W&B (the run dir's file has all)")

    def __post_init__(self) -> None:
        _check(self.kind in ("wandb", "tensorboard", "none"),
               f"logger.kind must be wandb, tensorboard or none; got {self.kind!r}")
        _check(self.kind != "tensorboard" or _installed("tensorboard"),
               "logger.kind=tensorboard needs the tensorboard package: pip install 'trb[tensorboard]' (or "
               "logger.kind=wandb|none)")
        _check(self.init_timeout >= 1, f"logger.init_timeout must be >= 1 second; got {self.init_timeout}")
        _check(self.artifact in ("model", "full", "reference", "none"),
               f"logger.artifact must be model, full, reference or none; got {self.artifact!r}")
        _check(min(self.table_every, self.table_rows, self.html_rows) >= 0,
               "logger.table_every, logger.table_rows and logger.html_rows must be >= 0")
        _check(self.mode in ("auto", "online", "offline"), f"logger.mode must be auto, online or offline; "
                                                            f"got {self.mode!r}")


@dataclass
class DecodingConfig:
    """Decoding preset for evaluation (student only, no teacher)."""

    greedy: bool = setting(True, "argmax decoding (forces n = 1)")
    temperature: float = setting(1.0, "sampling temperature (paper: 1.0)")
    top_p: float = setting(1.0, "nucleus sampling mass (paper: 1.0)")
    n: int = setting(1, "samples per problem (paper: 32 GSM8K, 64 MATH-500)")
    max_new_tokens: int = setting(48, "completion cap (paper: 8192)")
    batch: int = setting(64,
                         "sequences per wave (hf: decoded together; vllm: submitted together, max_num_seqs at a time)")
    ks: list[int] = setting(factory=lambda: [1], doc="pass@k / maj@k reported for each k <= n")
    seed: int = setting(0, "sampling seed")

    def __post_init__(self) -> None:
        _finite(self, "decoding.")
        if self.greedy:
            self.n = 1
        _check(self.n >= 1, f"decoding.n must be >= 1; got {self.n}")
        _check(self.batch >= 1, f"decoding.batch must be >= 1; got {self.batch}")
        _check(self.max_new_tokens >= 1, f"decoding.max_new_tokens must be >= 1; got {self.max_new_tokens}")
        _check(self.temperature > 0, f"decoding.temperature must be > 0; got {self.temperature}")
        _check(0 < self.top_p <= 1, f"decoding.top_p must be in (0, 1]; got {self.top_p}")
        _check(all(k >= 1 for k in self.ks), f"decoding.ks must be >= 1; got {self.ks}")
        _check(self.seed >= 0, f"decoding.seed must be >= 0; got {self.seed}")
        over = [k for k in self.ks if k > self.n]
        fit = ",".join(str(k) for k in [k for k in self.ks if k <= self.n] or [1])
        _check(not over, f"decoding.ks={self.ks} asks for pass@k / maj@k with k above decoding.n={self.n} samples "
                         f"(k = {', '.join(map(str, over))}): set decoding.ks=[{fit}] or raise decoding.n")


COMPUTE_DTYPES = ("float32", "bfloat16")
ENGINES = ("auto", "hf", "vllm")


@dataclass
class EngineConfig:
    """The engine of every student-only decode (trb eval, the periodic eval, rollouts whose sampler
    needs no teacher); samplers that need the teacher keep trb's dual-model decoder."""

    kind: str = setting("auto",
                        "auto (vllm where it is installed and the device is CUDA, else hf) | hf (trb's decoder) | "
                        "vllm")
    gpu_memory_utilization: float = setting(0.3,
                                            "vllm on CUDA: share of the GPU's memory the engine takes (weights + KV "
                                            "cache)")
    kv_cache_gb: float = setting(0.0,
                                 "vllm: KV cache space in GiB (0: from gpu_memory_utilization on CUDA; 1 GiB on CPU)")
    max_num_seqs: int = setting(256, "vllm: most sequences decoded together")
    max_model_len: int = setting(0, "vllm: longest prompt + completion in tokens (0: the prompt cap + max_new_tokens)")
    tensor_parallel_size: int = setting(1, "vllm: GPUs one engine spans (trb eval; trb train runs one engine per rank)")
    prefix_caching: bool = setting(True,
                                   "vllm: reuse the KV cache of shared prompt prefixes (reset after every weight "
                                   "push)")
    enforce_eager: Optional[bool] = setting(None,
                                            "vllm: no CUDA graphs / compilation (null: true on CPU, false on CUDA)")
    sleep: bool = setting(True,
                          "vllm on CUDA: free its KV cache and weights while the teacher scores and the student "
                          "updates")

    def __post_init__(self) -> None:
        _finite(self, "engine.")
        _check(self.kind in ENGINES, f"engine.kind must be one of {', '.join(ENGINES)}; got {self.kind!r} "
                                     f"(or pick the group: engine=auto|hf|vllm)")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"engine.gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        _check(self.kv_cache_gb >= 0, f"engine.kv_cache_gb must be >= 0; got {self.kv_cache_gb}")
        _check(self.max_num_seqs >= 1, f"engine.max_num_seqs must be >= 1; got {self.max_num_seqs}")
        _check(self.max_model_len >= 0, f"engine.max_model_len must be >= 0; got {self.max_model_len}")
        _check(self.tensor_parallel_size >= 1,
               f"engine.tensor_parallel_size must be >= 1; got {self.tensor_parallel_size}")


@dataclass
class StepConfig:
    """How the update runs: the token budget of every non-decoding forward, activation
    checkpointing, mixed precision. Gradients are the same up to float rounding for any setting."""

    micro_batch_tokens: int = setting(0,
                                      "padded tokens (rows x width) per teacher-scoring / student forward+backward (0"
                                      " = all)")
    activation_checkpointing: bool = setting(False,
                                             "recompute each student decoder layer in the backward (non-reentrant)")
    compute_dtype: str = setting("float32",
                                 "student forward/backward: float32 | bfloat16 (weights and AdamW stay float32)")
    tf32: bool = setting(True, "CUDA: TF32 tensor cores for float32 matmuls")

    def __post_init__(self) -> None:
        _check(self.micro_batch_tokens >= 0, f"train.micro_batch_tokens must be >= 0; got {self.micro_batch_tokens}")
        _check(self.compute_dtype in COMPUTE_DTYPES,
               f"train.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """A LoRA student (PEFT): only the adapter trains; rank 0 trains every weight."""

    rank: int = setting(0, "LoRA rank r (0: off, every student weight trains)")
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = setting(0.0, "dropout on the adapter's input while training (0: the rollouts' and the loss's "
                                  "forwards are the same function)")
    target_modules: list[str] = setting(factory=lambda: list(LORA_TARGETS),
                                        doc="linear layers that get an adapter (default: every attention and MLP "
                                            "projection of Qwen3 / Llama-style models)")
    save_merged: bool = setting(False, "also save each checkpoint's merged weights in its merged/ folder (a plain "
                                       "model folder, as large as the student)")

    def __post_init__(self) -> None:
        _finite(self, "lora.")
        _check(self.rank >= 0, f"lora.rank must be >= 0; got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0; got {self.alpha}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1); got {self.dropout}")
        _check(bool(self.target_modules), "lora.target_modules is empty: name the linear layers to adapt")
        _check(not self.rank or _installed("peft"),
               "lora.rank > 0 needs the peft package: pip install 'trb[lora]' (or lora.rank=0)")


@dataclass
class PlanConfig:
    """`trb plan` (and the check `trb train` runs at start on GPUs): peak memory per device and phase."""

    world_size: int = setting(0, "processes (GPUs) the run uses (0 = the launch's WORLD_SIZE, else 1)")
    device_gb: float = setting(0.0, "memory per device in GB (0 = the visible GPU's, else 80)")
    reserve_gb: float = setting(3.0, "kept free per device: CUDA context, communication buffers, allocator slack")
    check: bool = setting(True, "trb train on GPUs: refuse at start a run the plan says cannot fit")

    def __post_init__(self) -> None:
        _finite(self, "plan.")
        _check(self.world_size >= 0, f"plan.world_size must be >= 0; got {self.world_size}")
        _check(self.device_gb >= 0, f"plan.device_gb must be >= 0; got {self.device_gb}")
        _check(self.reserve_gb >= 0, f"plan.reserve_gb must be >= 0; got {self.reserve_gb}")


@dataclass
class ParallelConfig:
    """Multi-process training (torchrun / Slurm tasks); ignored in one process."""

    teacher: str = setting("replicate",
                           "replicate: a full teacher per rank | shard: FSDP2 shards, ranks decode in lockstep")

    def __post_init__(self) -> None:
        _check(self.teacher in ("replicate", "shard"),
               f"parallel.teacher must be replicate or shard; got {self.teacher!r}")


@dataclass
class TrainConfig:
    """`trb train`: on-policy distillation with a trust-region behaviour policy."""

    student: ModelConfig = setting(factory=ModelConfig, doc="the model trained (student.path, .dtype, ...)")
    teacher: ModelConfig = setting(factory=lambda: ModelConfig(path="toy:teacher"),
                                   doc="the frozen model it learns from")
    method: MethodConfig = setting(factory=MethodConfig,
                                   doc="which distillation method: only the sampler, target or start differs")
    blend: BlendConfig = setting(factory=BlendConfig, doc="the trust-region budget eps_k over steps (trb, fixed)")
    dataset: DatasetConfig = setting(factory=DatasetConfig,
                                     doc="the training prompts (and the eval rows when eval_dataset is unset)")
    eval_dataset: Optional[DatasetConfig] = setting(None, "periodic eval set (None: the dataset's eval rows)")
    eval_overlap: str = setting("refuse", "train prompts repeating an eval problem: refuse | drop | allow")
    prompt: PromptConfig = setting(factory=PromptConfig, doc="how a problem becomes the prompt text")
    loss: LossConfig = setting(factory=LossConfig, doc="the reverse-KL estimator")
    rollout: RolloutConfig = setting(factory=RolloutConfig, doc="sampling of training rollouts")
    optim: OptimConfig = setting(factory=OptimConfig, doc="AdamW and its learning-rate schedule")
    logger: LoggerConfig = setting(factory=LoggerConfig, doc="experiment tracking (metrics.jsonl is always written)")
    parallel: ParallelConfig = setting(factory=ParallelConfig, doc="several processes (torchrun / Slurm tasks)")
    train: StepConfig = setting(factory=StepConfig,
                                doc="how the update runs: token budget per forward, checkpointing, precision")
    plan: PlanConfig = setting(factory=PlanConfig,
                               doc="the memory plan trb train checks at start (and trb plan prints)")
    engine: EngineConfig = setting(factory=EngineConfig, doc="student-only rollouts (eps = 0) and the periodic eval")
    lora: LoraConfig = setting(factory=LoraConfig, doc="train a LoRA adapter of the student instead of every weight")
    steps: int = setting(600, "optimiser steps (one rollout batch each)")
    prompts_per_step: int = setting(16, "prompts per step (x rollout.n samples)")
    eval_every: int = setting(100, "eval (eval_decoding) on the held-out split every N steps (0 = only start and end)")
    log_every: int = setting(10,
                             "a console line every N steps where no progress bar is drawn (not a terminal; 0 = none)")
    eval_decoding: DecodingConfig = setting(factory=DecodingConfig, doc="periodic eval decoding (greedy)")
    save_every: int = setting(0, "checkpoint every N steps (0 = only the final one)")
    keep_last: int = setting(0, "keep only the newest N checkpoints (0 = all)")
    resume: str = setting("auto",
                          "auto: continue from the run dir's last complete checkpoint | never | PATH (a checkpoint)")
    overwrite: bool = setting(False,
                              "a run dir holding another run: move its files aside to <dir>.replaced-<time>/, start "
                              "over")
    seed: int = setting(0, "seeds data order, sampling and init")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    threads: int = setting(1, "torch CPU threads (1 is fastest on small models here)")
    output_dir: Optional[str] = setting(None, "run dir (set by Hydra's run dir when None)")

    def __post_init__(self) -> None:
        _finite(self, "")
        _check(self.steps >= 0, f"steps must be >= 0; got {self.steps}")
        _check(self.prompts_per_step >= 1, f"prompts_per_step must be >= 1; got {self.prompts_per_step}")
        _check(self.eval_every >= 0, f"eval_every must be >= 0; got {self.eval_every}")
        _check(self.log_every >= 0, f"log_every must be >= 0; got {self.log_every}")
        _check(self.save_every >= 0, f"save_every must be >= 0; got {self.save_every}")
        _check(self.keep_last >= 0, f"keep_last must be >= 0; got {self.keep_last}")
        _check(bool(self.resume), "resume must be auto, never or a checkpoint path")
        _check(self.threads >= 1, f"threads must be >= 1; got {self.threads}")
        _check(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        _check(not (self.overwrite and self.resume not in ("auto", "never")),
               "overwrite=true starts a new run: it cannot be combined with resume=PATH")
        _check(self.eval_overlap in ("refuse", "drop", "allow"),
               f"eval_overlap must be refuse, drop or allow; got {self.eval_overlap!r}")
        check_method_blend(self.method, self.blend)
        _check(self.rollout.temperature == 1.0 or self.method.name not in ("trb", "fixed", "skd"),
               f"rollout.temperature={self.rollout.temperature} is not used by method={self.method.name}: "
               + ("SKD samples the student at temperature 1 and the teacher at method.skd_temperature"
                  if self.method.name == "skd" else "the trust-region blend is built from the temperature-1 "
                  "distributions") + "; set rollout.temperature=1 (tempered student sampling: method=opd or "
               "temp_warmup)")
        longest = self.rollout.max_prompt_tokens + self.rollout.max_new_tokens
        _check(not self.train.micro_batch_tokens or self.train.micro_batch_tokens >= longest,
               f"train.micro_batch_tokens={self.train.micro_batch_tokens} is below the longest sequence "
               f"(rollout.max_prompt_tokens + rollout.max_new_tokens = {longest}); a sequence is never split: "
               f"use train.micro_batch_tokens >= {longest} (or 0 for no bound)")
        _check(self.parallel.teacher != "shard" or not self.rollout.max_rows,
               "parallel.teacher=shard decodes in lockstep across ranks, whose waves would differ: use "
               "rollout.max_rows=0 with it (or parallel.teacher=replicate)")
        _check(self.engine.tensor_parallel_size == 1,
               "trb train runs one engine per process (data parallel, like the trainer): engine.tensor_parallel_size "
               "must be 1 (it is for trb eval)")
        _check(self.parallel.teacher != "shard" or self.rollout.draft_k == 0,
               "parallel.teacher=shard runs the per-token decoder in lockstep across ranks; speculative sampling "
               "(rollout.draft_k > 0) needs parallel.teacher=replicate")


def check_method_blend(method: MethodConfig, blend: BlendConfig) -> None:
    """A method and a blend schedule that contradict each other are refused with what to change."""
    name, kind = method.name, blend.kind
    if kind == "none":  # no trust region: a budget set anyway would be silently ignored (allowed: the values of
        # conf/blend/none.yaml and, for configs built in Python, the dataclass defaults)
        plain = BlendConfig.__dataclass_fields__
        unused = [f"blend.{k}={getattr(blend, k)}" for k, preset in (("eps0", 0.0), ("horizon", 0), ("milestones", []))
                  if getattr(blend, k) not in (preset, plain[k].default if k != "milestones" else [])]
        _check(not unused, f"{', '.join(unused)} is not used with blend=none (method={name} samples without a trust "
                           f"region): drop it, or use method=trb / method=fixed")
    _check(name not in STUDENT_ONLY_METHODS or kind == "none",
           f"method={name} samples without a trust region, but blend={kind}: drop the blend override "
           f"(method={name} sets blend=none) or use method=trb / method=fixed")
    _check(name != "trb" or kind not in ("none", "constant"),
           f"method=trb anneals eps with blend=linear|cosine|step; got blend={kind} "
           f"(use method=fixed for a constant eps, method=opd for none)")
    _check(name != "fixed" or kind == "constant",
           f"method=fixed keeps eps constant: it needs blend=constant; got blend={kind}")


@dataclass
class ProbeConfig:
    """Continuation-gain probe (paper Fig. 4): cut sampled completions after t tokens, continue
    with the student and with the teacher, grade, and report the success rate per t."""

    cuts: list[int] = setting(factory=list, doc="prefix lengths t in tokens (empty: no probe)")
    continuations: int = setting(1, "sampled continuations per prefix and continuer")
    max_prefixes: int = setting(64, "probe the first N completions")

    def __post_init__(self) -> None:
        _check(all(t >= 0 for t in self.cuts), f"probe.cuts must be >= 0; got {self.cuts}")
        _check(self.continuations >= 1, f"probe.continuations must be >= 1; got {self.continuations}")
        _check(self.max_prefixes >= 1, f"probe.max_prefixes must be >= 1; got {self.max_prefixes}")


@dataclass
class RolloutRunConfig:
    """`trb rollout`: sample prompts under a method's behaviour policy (no training) and record
    every token's statistics."""

    checkpoint: Optional[str] = setting(None, "the student sampled, named as in trb eval: a model folder, a trb run "
                                              "dir (its last checkpoint) or toy:*; replaces student.path (null: "
                                              "student.path)")
    student: ModelConfig = setting(factory=ModelConfig,
                                   doc="the model sampled (or checkpoint=)")
    teacher: ModelConfig = setting(factory=lambda: ModelConfig(path="toy:teacher"),
                                   doc="the teacher of the blend / SKD / veto samplers")
    method: MethodConfig = setting(factory=MethodConfig, doc="the method whose behaviour policy samples")
    blend: BlendConfig = setting(factory=BlendConfig, doc="the trust-region budget of that method at `step`")
    dataset: DatasetConfig = setting(factory=DatasetConfig, doc="the problems (their eval split)")
    prompt: PromptConfig = setting(factory=PromptConfig, doc="how a problem becomes the prompt text")
    num_prompts: int = setting(16, "prompts taken from the dataset's eval split (0 = all)")
    rollout: RolloutConfig = setting(factory=RolloutConfig, doc="n, max_new_tokens, temperature, draft_k, ...")
    step: int = setting(0, "the training step whose eps / temperature / SKD setting is used")
    batch: int = setting(64, "sequences decoded together")
    probe: ProbeConfig = setting(factory=ProbeConfig, doc="the continuation-gain probe (paper Fig. 4)")
    logger: LoggerConfig = setting(factory=lambda: LoggerConfig(job_type="rollout"),
                                   doc="experiment tracking (the run dir always has the files)")
    seed: int = setting(0, "sampling seed")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    threads: int = setting(1, "torch CPU threads")
    output_dir: Optional[str] = setting(None, "output dir (set by Hydra's run dir when None)")
    overwrite: bool = setting(False, "a dir holding another rollout: move its files aside to <dir>.replaced-<time>/")

    def __post_init__(self) -> None:
        _finite(self, "")
        _check(self.num_prompts >= 0, f"num_prompts must be >= 0; got {self.num_prompts}")
        _check(self.step >= 0, f"step must be >= 0; got {self.step}")
        _check(self.batch >= 1, f"batch must be >= 1; got {self.batch}")
        _check(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        _check(self.rollout.dtype == "auto" and not self.rollout.static_cache and not self.rollout.compile_step,
               "trb rollout decodes with the models as loaded: rollout.dtype, rollout.static_cache and "
               "rollout.compile_step are trb train settings (leave them at auto / false here)")
        check_method_blend(self.method, self.blend)


@dataclass
class EvalConfig:
    """`trb eval`: pass@k / maj@k of checkpoints, graded with math-verify."""

    checkpoint: Any = setting("toy:student", "model folder, run dir (every checkpoint in it), toy:*, or a list")
    dtype: str = setting("float32", "float32 | bfloat16 | float16")
    dataset: DatasetConfig = setting(factory=DatasetConfig, doc="the problems scored (their eval split)")
    datasets: list[str] = setting(factory=list, doc="several presets (NAME or NAME:PATH): each and the average")
    prompt: PromptConfig = setting(factory=PromptConfig, doc="how a problem becomes the prompt text")
    decoding: DecodingConfig = setting(factory=DecodingConfig, doc="sampling: greedy or n samples, pass@k / maj@k")
    engine: EngineConfig = setting(factory=EngineConfig, doc="the decoder: trb's (hf) or vLLM")
    logger: LoggerConfig = setting(factory=lambda: LoggerConfig(job_type="eval"),
                                   doc="experiment tracking (the run dir always has the files)")
    grader_workers: int = setting(1, "math-verify worker processes")
    max_prompt_tokens: int = setting(4096, "longer prompts are skipped and counted (eval/skipped_too_long)")
    seed: int = setting(0, "seeds the dataset draw (toy) and sampling")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    threads: int = setting(1, "torch CPU threads")
    output_dir: Optional[str] = setting(None, "results dir (set by Hydra's run dir when None)")
    overwrite: bool = setting(False, "a dir holding another eval: move its files aside to <dir>.replaced-<time>/")

    def __post_init__(self) -> None:
        _finite(self, "")
        _check(bool(self.checkpoint), "checkpoint is empty: set checkpoint=PATH (a model folder or a run dir)")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        _check(self.grader_workers >= 1, f"grader_workers must be >= 1; got {self.grader_workers}")
        _check(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        _check(self.max_prompt_tokens >= 1, f"max_prompt_tokens must be >= 1; got {self.max_prompt_tokens}")
