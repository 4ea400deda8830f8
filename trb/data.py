"""Prompts and gold answers: the embedded toy task or a local jsonl in GSM8K's schema."""

from __future__ import annotations

import json
from pathlib import Path

from trb.config import DatasetConfig
from trb.toy import EVAL_SEED, ToyTask, make_split


def gold_from_answer(answer: str) -> str:
    """GSM8K style: the number after '####', commas removed; otherwise the text itself, stripped."""
    if "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    return answer.strip()


def _toy_rows(cfg: DatasetConfig, seed: int) -> tuple[list[dict], list[dict]]:
    task = ToyTask(cfg.min_ops, cfg.max_ops, cfg.max_operand, cfg.ops)
    eval_rows = make_split(task, cfg.eval_size, EVAL_SEED) if cfg.eval_size else []
    # The toy models were built on training seed 0; distillation prompts come from another seed.
    train = make_split(task, cfg.train_size, 10_000 + seed, exclude={r["question"] for r in eval_rows})
    return train, eval_rows


def _jsonl_rows(cfg: DatasetConfig) -> list[dict]:
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"dataset.path={cfg.path!r} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rows.append({"question": rec[cfg.question_field], "gold": gold_from_answer(str(rec[cfg.answer_field]))})
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{cfg.path} line {i + 1}: expected JSON with fields "
                             f"{cfg.question_field!r} and {cfg.answer_field!r} ({err})") from None
    if not rows:
        raise ValueError(f"dataset.path={cfg.path!r} holds no rows")
    return rows


def load_splits(cfg: DatasetConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows), each row with at least `question` and `gold`."""
    if cfg.name == "toy":
        return _toy_rows(cfg, seed)
    rows = _jsonl_rows(cfg)
    n_eval = min(cfg.eval_size, len(rows) // 2)
    return rows[n_eval:][: cfg.train_size], rows[:n_eval]


def render(tokenizer, question: str, system_prompt: str | None) -> str:
    """The prompt text: the tokenizer's chat template with an optional system message."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; pick a model that has one")
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

