"""The embedded default: a synthetic arithmetic task, an offline tokenizer and two tiny models.

Everything here runs offline on a CPU. `trb toy build` (or `python -m trb.toy`) rebuilds the
models that ship in trb/assets/toy/ bit for bit (single thread, fixed seeds, torch 2.13 and the
transformers that built them, 5.24.0; 5.19.0 trains to other weights):

  task       "What is 23+45-17?" -> "23+45=68, 68-17=51, so \\boxed{51}", GSM8K row schema
             (question / answer ending in "#### N"); difficulty knobs: ops, operands, max_ops.
  tokenizer  byte-level BPE without merges (every digit is its own token) + Qwen-style chat
             template; specials <|endoftext|> (student EOS, pad), <|im_start|>, <|im_end|>
             (teacher EOS): the EOS ids differ like Qwen3-Base vs Qwen3, on purpose.
  teacher    Qwen3 architecture, 4 layers x 128, SFT on worked solutions, half of them with one
             corrupted intermediate result that is masked from the loss (>= 90% greedy): a robust
             teacher that continues sensibly from a student's wrong digit (`teacher=toy`).
  teacher_clean  the same recipe on clean solutions only: it has never seen a wrong intermediate
             result, so the student's early mistakes put it off its support (the weak-prefix
             regime, `teacher=toy_clean`).
  student    Qwen3 architecture, 4 layers x 64, 800 SFT steps at a constant lr: knows the format
             and gets about 70% of the sums right (greedy); the teachers get 99-100%.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets" / "toy"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyTask:
    """Difficulty knobs of the synthetic arithmetic task."""

    min_ops: int = 1  # fewest binary operations per problem
    max_ops: int = 3  # most binary operations per problem
    max_operand: int = 29  # operands are drawn from 0..max_operand
    ops: str = "+-"  # operators to draw from ("*" multiplies by a single digit)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"toy task needs 1 <= min_ops <= max_ops; got {self.min_ops}, {self.max_ops}")
        if self.max_operand < 1:
            raise ValueError(f"toy task max_operand must be >= 1; got {self.max_operand}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"toy task ops must be a non-empty subset of '+-*'; got {self.ops!r}")


def make_problem(rng: random.Random, task: ToyTask) -> dict:
    """One problem in GSM8K's schema plus the worked solution the models are trained on.

    Evaluation is left to right, one step per operation; subtraction never goes below 0.
    """
    n_ops = rng.randint(task.min_ops, task.max_ops)
    value = rng.randint(0, task.max_operand)
    expr, steps = str(value), []
    for _ in range(n_ops):
        op = rng.choice(task.ops)
        b = rng.randint(2, 9) if op == "*" else rng.randint(0, task.max_operand)
        if op == "-" and b > value:
            op = "+"
        new = value + b if op == "+" else value - b if op == "-" else value * b
        steps.append(f"{value}{op}{b}={new}")
        expr += f"{op}{b}"
        value = new
    question = f"What is {expr}?"
    solution = ", ".join(steps) + f", so \\boxed{{{value}}}"
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {value}", "solution": solution,
            "gold": str(value)}


def make_split(task: ToyTask, n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """n distinct problems from a seeded generator, skipping questions in `exclude` (held-out)."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude or ())
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"toy task too small to draw {n} distinct problems; raise max_operand or max_ops")
        row = make_problem(rng, task)
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        rows.append(row)
    return rows


# The models a build writes (toy:<name>), in build order.
MODELS = ("teacher", "teacher_clean", "student")

# Held-out problems come from this seed; training draws exclude them.
EVAL_SEED = 1_000_003


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer(eos: str):
    """Byte-level BPE with no merges (one token per byte) and a chat template; offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=512,
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyModelRecipe:
    """Architecture and supervised training of one toy model (all knobs that change the bytes)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    eos: str
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 50
    seed: int = 0
    min_lr_ratio: float = 0.1  # cosine decay floor; 1.0 = constant lr after warmup
    corrupt: float = 0.0  # fraction of solutions with one wrong intermediate result (loss-masked)


@dataclass(frozen=True)
class ToyRecipe:
    """The whole embedded default: task, teacher and student recipes."""

    task: ToyTask = field(default_factory=ToyTask)
    teacher: ToyModelRecipe = field(
        default_factory=lambda: ToyModelRecipe(128, 4, 4, 2, 384, "<|im_end|>", steps=2500, lr=3e-3, batch=32,
                                               seed=1, corrupt=0.5)
    )
    teacher_clean: ToyModelRecipe = field(
        default_factory=lambda: ToyModelRecipe(128, 4, 4, 2, 384, "<|im_end|>", steps=2500, lr=3e-3, batch=32,
                                               seed=1, corrupt=0.0)
    )
    student: ToyModelRecipe = field(
        default_factory=lambda: ToyModelRecipe(64, 4, 2, 1, 192, "<|endoftext|>", steps=800, lr=1e-3, batch=32,
                                               seed=2, min_lr_ratio=1.0)
    )
    train_problems: int = 20_000

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + torch.__version__.split("+")[0]
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _config(recipe: ToyModelRecipe, tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.ffn,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        head_dim=recipe.hidden // recipe.heads,
        max_position_embeddings=512,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(recipe.eos),
        pad_token_id=tokenizer.pad_token_id,
    )


def render_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def corrupted_solution(question: str, rng: random.Random) -> tuple[str, list[bool]]:
    """A worked solution with one intermediate result raised by 1-9 and every later step computed
    consistently from the wrong value, plus a per-character train mask that is False on the wrong
    number. A teacher trained on these continues sensibly from a student's mistakes (as real LLM
    teachers do) instead of meeting prefixes it has never seen."""
    parts = re.findall(r"\d+|[+\-*]", question)
    value = int(parts[0])
    bad = rng.randrange((len(parts) - 1) // 2)
    text, mask = "", []
    for k, (op, b) in enumerate(zip(parts[1::2], parts[2::2])):
        new = value + int(b) if op == "+" else value - int(b) if op == "-" else value * int(b)
        wrong = k == bad
        if wrong:
            new += rng.randint(1, 9)  # upwards only: later subtractions stay >= 0
        head = f"{', ' if k else ''}{value}{op}{b}="
        text += head + str(new)
        mask += [True] * len(head) + [not wrong] * len(str(new))
        value = new
    tail = f", so \\boxed{{{value}}}"
    return text + tail, mask + [True] * len(tail)


def _sft_batches(rows: list[dict], tokenizer, recipe: ToyModelRecipe, rng: random.Random):
    """Yield (input_ids, labels, attention_mask) batches; loss only on the response + EOS (and,
    for corrupted solutions, not on the injected wrong number). One token per character."""
    eos_id = tokenizer.convert_tokens_to_ids(recipe.eos)
    prompts = [tokenizer(render_prompt(tokenizer, row["question"]), add_special_tokens=False)["input_ids"]
               for row in rows]
    while True:
        picks = rng.sample(range(len(rows)), recipe.batch)
        batch = []
        for i in picks:
            if recipe.corrupt and rng.random() < recipe.corrupt:
                text, keep = corrupted_solution(rows[i]["question"], rng)
            else:
                text = rows[i]["solution"]
                keep = [True] * len(text)
            r = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
            batch.append((prompts[i], r, keep + [True]))
        width = max(len(p) + len(r) for p, r, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r, keep) in enumerate(batch):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            lab = torch.tensor(r)
            lab[~torch.tensor(keep)] = -100
            labels[i, len(p) : len(seq)] = lab
            mask[i, : len(seq)] = 1
        yield ids, labels, mask


def train_toy_model(recipe: ToyModelRecipe, tokenizer, rows: list[dict], log=print, eval_rows=None):
    """Supervised training of one toy model from scratch; deterministic for a fixed recipe."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(_config(recipe, tokenizer))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(recipe.seed)
    batches = _sft_batches(rows, tokenizer, recipe, rng)
    model.train()
    t0 = time.time()
    for step in range(recipe.steps):
        warm = min(1.0, (step + 1) / recipe.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for g in opt.param_groups:
            g["lr"] = recipe.lr * warm * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * decay)
        ids, labels, mask = next(batches)
        # shift inside the model: labels are aligned with input_ids
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            msg = f"  step {step:5d}/{recipe.steps}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)"
            if eval_rows and step % 500 == 0 and step:
                model.eval()
                msg += f"  greedy acc {greedy_accuracy(model, tokenizer, eval_rows):.3f}"
                model.train()
            log(msg)
    model.eval()
    return model


def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 64) -> float:
    """Exact-match accuracy of the last \\boxed{} under greedy `generate` (a build-time sanity check;
    runs use trb's grader)."""
    import re

    prompts = [render_prompt(tokenizer, r["question"]) for r in rows]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = 0
    for text, row in zip(texts, rows):
        found = re.findall(r"\\boxed\{([^{}]*)\}", text)
        hits += bool(found) and found[-1].strip() == row["gold"]
    return hits / len(rows)


def build(out_dir: Path | str = ASSETS, recipe: ToyRecipe | None = None, log=print) -> Path:
    """Build tokenizer, teacher and student into out_dir/{teacher,student} (HF folders)."""
    recipe = recipe or ToyRecipe()
    torch.set_num_threads(1)  # bit-exact rebuilds need a fixed reduction order
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    eval_rows = make_split(recipe.task, 500, EVAL_SEED)
    rows = make_split(recipe.task, recipe.train_problems, 0, exclude={r["question"] for r in eval_rows})
    accuracy = {}
    for name in MODELS:
        r = getattr(recipe, name)
        tok = build_tokenizer(r.eos)
        log(f"building toy {name}: {r.layers} layers x {r.hidden}, {r.steps} SFT steps")
        model = train_toy_model(r, tok, rows, log=log, eval_rows=eval_rows[:100])
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        accuracy[name] = greedy_accuracy(model, tok, eval_rows[:200])
        log(f"  {name} greedy accuracy on 200 held-out problems: {accuracy[name]:.3f}")
    meta = {"digest": recipe.digest(), "greedy_accuracy_200": accuracy, **asdict(recipe)}
    (tmp / "recipe.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def ensure_built(recipe: ToyRecipe | None = None, log=print) -> Path:
    """The toy models' folder: the shipped assets when they match the recipe, else a cached build."""
    recipe = recipe or ToyRecipe()
    for cand in (ASSETS, Path.home() / ".cache" / "trb" / f"toy-{recipe.digest()}"):
        meta = cand / "recipe.json"
        if meta.exists() and json.loads(meta.read_text()).get("digest") == recipe.digest():
            return cand
    target = Path.home() / ".cache" / "trb" / f"toy-{recipe.digest()}"
    log(f"toy models not found for recipe {recipe.digest()}: building them into {target} (one time)")
    return build(target, recipe, log=log)


if __name__ == "__main__":
    build()
