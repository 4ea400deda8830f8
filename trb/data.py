"""Datasets as data: where the rows come from, which fields hold the problem and the gold answer.

Every adapter yields rows {"question": str, "gold": str | None, **kept fields}. Sources, in
order: the embedded toy generator (name=toy), a local jsonl/parquet (`path=`), or a hub dataset
that is already in the local cache (trb runs with HF_HUB_OFFLINE=1 unless you set it to 0).
"""

from __future__ import annotations

from trb.errors import UserError

import json
import sys
from pathlib import Path

from trb.config import DatasetConfig, PromptConfig
from trb.toy import EVAL_SEED, ToyTask, make_split


class DatasetError(UserError):
    """A dataset could not be loaded; the message names the setting to change."""


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, else None."""
    for macro in ("\\boxed", "\\fbox"):
        start = text.rfind(macro + "{")
        if start < 0:
            continue
        i = start + len(macro) + 1
        depth, j = 1, i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        return text[i : j - 1].strip() if depth == 0 else None
    return None


def gold_from(value, kind: str) -> str | None:
    """The gold answer string from a dataset field: gsm8k (after ####, commas removed), boxed
    (last \\boxed{} of a worked solution), plain (as is)."""
    if value is None:
        return None
    text = str(value)
    if kind == "gsm8k":
        return text.split("####")[-1].strip().replace(",", "") if "####" in text else None
    if kind == "boxed":
        return last_boxed(text)
    return text.strip()


def _field(rec: dict, dotted: str):
    """rec['a']['b'] or rec['a'][0] for dotted paths like 'conversations.0.value'."""
    cur = rec
    for part in dotted.split("."):
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


def _adapt(records, cfg: DatasetConfig, source: str) -> list[dict]:
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DatasetError(f"{source} row {i} is a {type(rec).__name__}, not an object with the fields "
                               f"{cfg.question_field!r} / {cfg.answer_field!r}")
        try:
            q = _field(rec, cfg.question_field)
            a = _field(rec, cfg.answer_field) if cfg.answer_field else None
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise DatasetError(f"{source} row {i}: no field {err} (set dataset.question_field / "
                               f"dataset.answer_field; fields there: {sorted(rec)[:10]})") from None
        if not isinstance(q, str) or not q.strip():
            raise DatasetError(f"{source} row {i}: the question ({cfg.question_field!r}) is {q!r}, not a text; fix "
                               f"or drop that row (or point dataset.question_field at the problem text)")
        row = {"question": q, "gold": gold_from(a, cfg.answer_kind)}
        for k in cfg.keep_fields:
            if k in rec:
                row[k] = rec[k]
        rows.append(row)
    if not rows:
        raise DatasetError(f"{source} holds no rows")
    missing = sum(r["gold"] is None for r in rows)
    if cfg.answer_field and missing:
        other = [k for k in ("gsm8k", "boxed", "plain") if k != cfg.answer_kind]
        fix = f"dataset.answer_kind={'|'.join(other)}"
        if missing == len(rows):
            first = repr(_field(records[0], cfg.answer_field))[:80]
            raise DatasetError(f"{source}: no row has a gold answer under dataset.answer_kind={cfg.answer_kind} "
                               f"({_KIND_RULE[cfg.answer_kind]}; first answer: {first}); set {fix}")
        print(f"warning: {source}: {missing} of {len(rows)} rows have no gold answer under dataset.answer_kind="
              f"{cfg.answer_kind} ({_KIND_RULE[cfg.answer_kind]}); they count as wrong (or set {fix})",
              file=sys.stderr)
    return rows


_KIND_RULE = {"gsm8k": "the text after ####", "boxed": "the last \\boxed{} of a solution",
              "plain": "the field as is"}


def _read_local(cfg: DatasetConfig) -> list[dict]:
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset.path={cfg.path!r} does not exist")
    if not path.is_file():
        raise DatasetError(f"dataset.path={cfg.path!r} is a directory: give a .jsonl or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path} line {i + 1} is not JSON ({err.msg}); expected one object per line") from None
    return records


def _read_hub(cfg: DatasetConfig) -> list[dict]:
    import datasets

    datasets.utils.logging.disable_progress_bar()
    configs = cfg.hub_config if isinstance(cfg.hub_config, list) else [cfg.hub_config]
    records = []
    for conf in configs:
        try:
            ds = datasets.load_dataset(cfg.hub_id, conf, split=cfg.split)
        except Exception as err:  # noqa: BLE001 - offline and uncached raises many types
            raise DatasetError(
                f"dataset {cfg.hub_id!r}{f' ({conf})' if conf else ''} split {cfg.split!r} is not in the local "
                f"Hugging Face cache and trb is offline (HF_HUB_OFFLINE=1). Point dataset.path= at a local "
                f"jsonl/parquet with fields {cfg.question_field!r}/{cfg.answer_field!r}, or download it first "
                f"(HF_HUB_OFFLINE=0). [{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}]"
            ) from None
        records.extend(ds)
    return records


def load_rows(cfg: DatasetConfig, seed: int = 0, role: str = "eval") -> list[dict]:
    """Rows of one dataset. Toy: role=eval gives the held-out problems, role=train the others."""
    if cfg.name == "toy" and not cfg.path:
        task = ToyTask(cfg.min_ops, cfg.max_ops, cfg.max_operand, cfg.ops)
        held_out = make_split(task, cfg.eval_size, EVAL_SEED) if cfg.eval_size else []
        if role == "eval":
            return [{"question": r["question"], "gold": r["gold"]} for r in held_out]
        # the toy models were built on seed 0; distillation prompts come from other seeds
        rows = make_split(task, cfg.train_size, 10_000 + seed, exclude={r["question"] for r in held_out})
        return [{"question": r["question"], "gold": r["gold"]} for r in rows]
    if cfg.path:
        rows = _adapt(_read_local(cfg), cfg, cfg.path)
    elif cfg.hub_id:
        rows = _adapt(_read_hub(cfg), cfg, cfg.hub_id)
    else:
        raise DatasetError(f"dataset {cfg.name!r} has neither dataset.path nor dataset.hub_id")
    limit = cfg.train_size if role == "train" else cfg.eval_size
    return rows[:limit] if limit else rows


def render(tokenizer, question: str, prompt: PromptConfig) -> str:
    """The prompt text for one problem (chat template or plain), exactly as the model sees it."""
    if prompt.style == "plain":
        return prompt.plain_template.format(question=question, instruction=prompt.instruction or "")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError("the tokenizer has no chat template; use prompt=plain for Base models without one")
    if prompt.instruction and prompt.instruction_role == "system":
        msgs = [{"role": "system", "content": prompt.instruction}, {"role": "user", "content": question}]
    elif prompt.instruction:
        msgs = [{"role": "user", "content": f"{question}\n{prompt.instruction}"}]
    else:
        msgs = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def fit_prompts(tokenizer, rows: list[dict], prompt: PromptConfig, max_tokens: int) -> tuple[list[dict], int]:
    """The rows whose rendered prompt has at most max_tokens tokens, and how many were dropped."""
    kept = [r for r in rows
            if len(tokenizer(render(tokenizer, r["question"], prompt), add_special_tokens=False)["input_ids"])
            <= max_tokens]
    return kept, len(rows) - len(kept)
