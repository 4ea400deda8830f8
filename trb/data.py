"""Datasets as data: where the rows come from, which fields hold the problem and the gold answer,
and which rows each role (training prompts, evaluation problems) gets.

Every adapter yields rows {"question": str, "gold": str | None, **kept fields}. Sources: the
embedded toy generator (name=toy), a local jsonl/json/parquet (`path=`, both roles), or a hub
dataset already in the local cache (training rows from `train_split`, evaluation rows from
`eval_split`). Files and hub splits are read through `datasets` into memory-mapped Arrow, and
only the selected rows are materialised, so memory does not grow with the file.

Which rows: `eval_size` evaluation rows chosen with `split_seed` (the same for every run seed),
`train_size` training rows chosen with the run's seed (`select=shuffle`) or in file order
(`select=first`). When one source serves both roles (a local file, a preset without an eval
split, or an explicit choice of the same split), the evaluation rows are held out first and the
training rows come from the rest, without any row whose question repeats an evaluation problem.
"""

from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from trb.config import DatasetConfig, PromptConfig
from trb.errors import UserError
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
    if isinstance(value, (list, tuple)):  # OlympiadBench's final_answer: a list (several answers joined)
        parts = [gold_from(v, kind) for v in value]
        return ", ".join(p for p in parts if p) or None
    if isinstance(value, float) and value.is_integer():  # 27.0 in a numeric column is the answer 27
        value = int(value)
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


_KIND_RULE = {"gsm8k": "the text after ####", "boxed": "the last \\boxed{} of a solution",
              "plain": "the field as is"}
_TAKE_BATCH = 512  # rows materialised at a time while selecting


def normalise(question: str) -> str:
    """The form two problems are compared in: Unicode NFKC, case folded, whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFKC", question).casefold().split())


def question_key(question: str) -> str:
    return hashlib.sha1(normalise(question).encode()).hexdigest()[:16]


@dataclass
class Selection:
    """The rows one role gets from one source, and where they came from."""

    role: str  # train | eval
    source: str  # e.g. "openai/gsm8k (main) split train", or a file path
    setting: str  # the config key that names the source (messages)
    available: int  # rows the source offers this role (after a hold-out)
    indices: list[int]  # each row's position in the source
    rows: list[dict]
    dropped: int = 0  # training rows passed over because they repeat an evaluation problem
    keys: list[str] = field(default_factory=list)  # question_key per row
    select: str = "generated"  # how the rows were chosen: shuffle (seed N) | first | generated (toy)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [question_key(r["question"]) for r in self.rows]

    def fingerprint(self) -> str:
        """sha256 of the rows as used (position, question, gold, in order): equal iff the role's data is."""
        h = hashlib.sha256()
        for i, r in zip(self.indices, self.rows):
            h.update(json.dumps([i, r["question"], r["gold"]]).encode())
            h.update(b"\n")
        return h.hexdigest()

    def record(self) -> dict:
        return {"source": self.source, "setting": self.setting, "select": self.select, "available": self.available,
                "selected": len(self.rows), "dropped_repeating_eval": self.dropped,
                "fingerprint": self.fingerprint(), "rows": [[i, k] for i, k in zip(self.indices, self.keys)]}


class _Source:
    """One table of rows: a file or a hub split, memory-mapped Arrow. `setting` is the config section
    that names it (dataset | eval_dataset), for messages."""

    def __init__(self, cfg: DatasetConfig, split: str | None, setting: str):
        self.cfg, self.split, self.setting = cfg, split, setting
        if cfg.path:
            self.key = ("file", str(Path(cfg.path).expanduser().resolve()))
            self.label = cfg.path
            self.table = _read_local(cfg, setting)
        else:
            configs = cfg.hub_config if isinstance(cfg.hub_config, list) else [cfg.hub_config]
            self.key = ("hub", cfg.hub_id, json.dumps(configs), split)
            conf = f" ({', '.join(str(c) for c in configs)})" if configs != [None] else ""
            self.label = f"{cfg.hub_id}{conf} split {split}"
            self.table = _read_hub(cfg, split, configs)
        self.columns = set(self.table.column_names)
        top = cfg.question_field.split(".")[0]
        if top not in self.columns:
            raise DatasetError(f"{self.label}: no field {cfg.question_field!r} (set {setting}.question_field / "
                               f"{setting}.answer_field; fields there: {sorted(self.columns)[:10]})")
        if cfg.answer_field and cfg.answer_field.split(".")[0] not in self.columns:
            raise DatasetError(f"{self.label}: no field {cfg.answer_field!r} (set {setting}.answer_field, or null "
                               f"for prompts without gold answers; fields there: {sorted(self.columns)[:10]})")
        self.n = len(self.table)
        if not self.n:
            raise DatasetError(f"{self.label} holds no rows")

    def take(self, indices: list[int]) -> list[dict]:
        """The adapted rows at `indices` (only their fields materialised, a batch at a time)."""
        cfg = self.cfg
        tops = {cfg.question_field.split(".")[0]}
        if cfg.answer_field:
            tops.add(cfg.answer_field.split(".")[0])
        tops |= {k for k in cfg.keep_fields if k in self.columns}
        table = self.table.select_columns(sorted(tops))
        out = []
        for lo in range(0, len(indices), _TAKE_BATCH):
            chunk = indices[lo : lo + _TAKE_BATCH]
            batch = table.select(chunk).to_list()
            out += [_adapt_one(rec, cfg, self.label, i) for i, rec in zip(chunk, batch)]
        return out


def _adapt_one(rec, cfg: DatasetConfig, source: str, i: int) -> dict:
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
    return row


def _check_golds(rows: list[dict], cfg: DatasetConfig, source: str, log) -> None:
    missing = sum(r["gold"] is None for r in rows)
    if not cfg.answer_field or not missing:
        return
    other = [k for k in ("gsm8k", "boxed", "plain") if k != cfg.answer_kind]
    fix = f"dataset.answer_kind={'|'.join(other)}"
    if missing == len(rows):
        raise DatasetError(f"{source}: no row has a gold answer under dataset.answer_kind={cfg.answer_kind} "
                           f"({_KIND_RULE[cfg.answer_kind]}); set {fix}")
    log(f"warning: {source}: {missing} of {len(rows)} rows have no gold answer under dataset.answer_kind="
        f"{cfg.answer_kind} ({_KIND_RULE[cfg.answer_kind]}); they count as wrong (or set {fix})")


def _quiet_datasets():
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(50)  # CRITICAL: trb reports a failed read itself, in one line
    datasets.config.HF_HUB_OFFLINE = True  # run commands read the cache only (trb download fetches)
    return datasets


_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _read_local(cfg: DatasetConfig, setting: str = "dataset"):
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DatasetError(f"{setting}.path={cfg.path!r} does not exist")
    if not path.is_file():
        raise DatasetError(f"{setting}.path={cfg.path!r} is a directory: give a .jsonl, .json or .parquet file (a "
                           f"folder in a hub dataset's layout goes in {setting}.hub_id)")
    fmt = _FORMATS.get(path.suffix)
    if fmt is None:
        raise DatasetError(f"{setting}.path={cfg.path!r}: trb reads .jsonl, .json and .parquet files")
    if path.stat().st_size == 0:
        raise DatasetError(f"{cfg.path} holds no rows")
    datasets = _quiet_datasets()
    try:  # converted once into Arrow in the datasets cache (HF_DATASETS_CACHE), then memory-mapped
        return datasets.load_dataset(fmt, data_files=str(path.resolve()), split="train")
    except Exception as err:  # noqa: BLE001 - pyarrow / datasets raise many types
        if fmt == "json":
            _check_json_lines(path)  # a message that names the line, where one is to blame
        cause = err.__cause__ or err
        raise DatasetError(f"{setting}.path={cfg.path!r} could not be read ({type(cause).__name__}: "
                           f"{str(cause).splitlines()[0][:200] if str(cause) else ''}); each row must be an object "
                           f"whose fields keep one type") from None


def _check_json_lines(path: Path) -> None:
    """After datasets failed on a json(l) file: the first line that is not one JSON object (pyarrow's
    own message names no line); streamed, so memory stays bounded."""
    with path.open("rb") as f:
        if path.suffix == ".json" and f.read(1).strip() in (b"[", b"{"):
            return  # one JSON document, not lines
        f.seek(0)
        rows = 0
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rows += 1
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DatasetError(f"{path} line {i + 1} is not JSON ({getattr(err, 'msg', err)}); expected one "
                                   f"object per line") from None
            if not isinstance(rec, dict):
                raise DatasetError(f"{path} line {i + 1} is a {type(rec).__name__}, not an object with fields")
    if not rows:
        raise DatasetError(f"{path} holds no rows")


def _read_hub(cfg: DatasetConfig, split: str, configs: list):
    datasets = _quiet_datasets()
    parts = []
    for conf in configs:
        try:
            parts.append(datasets.load_dataset(cfg.hub_id, conf, split=split))
        except Exception as err:  # noqa: BLE001 - offline and uncached raises many types
            text = str(err).splitlines()[0][:160] if str(err) else ""
            raise DatasetError(
                f"dataset {cfg.hub_id!r}{f' ({conf})' if conf else ''} split {split!r} is not in the local "
                f"Hugging Face cache (trb train / eval never download): fetch it with `trb download` and the same "
                f"overrides, or point dataset.path= at a local jsonl/parquet with fields {cfg.question_field!r}/"
                f"{cfg.answer_field!r} [{type(err).__name__}: {text}]") from None
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _order(n: int, select: str, seed: int):
    import numpy as np

    return np.arange(n) if select == "first" else np.random.default_rng(seed).permutation(n)


def _too_few(cfg: DatasetConfig, role: str, want: int, have: int, label: str, why: str = "") -> DatasetError:
    key = "dataset.train_size" if role == "train" else "dataset.eval_size"
    return DatasetError(f"{key}={want} but {label} has {have} rows{why} for {'training' if role == 'train' else 'eval'}"
                        f"; set {key}<={have}, or 0 for every row")


def _eval_selection(src: _Source, cfg: DatasetConfig, setting: str) -> Selection:
    size = cfg.eval_size or src.n
    if size > src.n:
        raise _too_few(cfg, "eval", size, src.n, src.label)
    idx = sorted(int(i) for i in _order(src.n, cfg.select, cfg.split_seed)[:size])  # scored in file order
    how = "first" if cfg.select == "first" else f"shuffle (split_seed {cfg.split_seed})"
    return Selection("eval", src.label, setting, src.n, idx, src.take(idx), select=how)


def _train_selection(src: _Source, cfg: DatasetConfig, seed: int, setting: str, held_out: list[int],
                     exclude: set[str]) -> Selection:
    """train_size rows of src in the selection order, skipping held-out positions and questions in `exclude`."""
    import numpy as np

    held = held_out
    seed = cfg.seed if cfg.seed is not None else seed
    order = _order(src.n, cfg.select, seed)
    if held:
        order = order[~np.isin(order, np.asarray(held_out))]
    want = cfg.train_size or len(order)  # 0: every row left (fewer where repeats are passed over)
    if want > len(order):
        why = f" left after the {len(held)} held out" if held else ""
        raise _too_few(cfg, "train", want, len(order), src.label, why)
    rows, idx, keys, dropped, pos = [], [], [], 0, 0
    while len(rows) < want and pos < len(order):
        chunk = order[pos : pos + max(_TAKE_BATCH, want - len(rows))].tolist()
        pos += len(chunk)
        for i, r in zip(chunk, src.take(chunk)):
            k = question_key(r["question"])
            if k in exclude:
                dropped += 1
                continue
            if len(rows) < want:
                rows.append(r), idx.append(i), keys.append(k)
    if len(rows) < want and cfg.train_size:
        raise _too_few(cfg, "train", want, len(rows), src.label,
                       f" left after the {len(held)} held out and {dropped} that repeat an eval problem")
    how = "first" if cfg.select == "first" else f"shuffle (seed {seed})"
    return Selection("train", src.label, setting, len(order), idx, rows, dropped, keys, how)


def _toy(cfg: DatasetConfig, seed: int, role: str) -> Selection:
    task = ToyTask(cfg.min_ops, cfg.max_ops, cfg.max_operand, cfg.ops)
    held_out = make_split(task, cfg.eval_size, EVAL_SEED) if cfg.eval_size else []
    if role == "eval":
        rows = [{"question": r["question"], "gold": r["gold"]} for r in held_out]
        return Selection("eval", f"toy task (held-out problems, seed {EVAL_SEED})", "dataset", len(rows),
                         list(range(len(rows))), rows)
    if not cfg.train_size:
        raise DatasetError("dataset=toy generates its training prompts: dataset.train_size must be >= 1")
    # the toy models were built on seed 0; distillation prompts come from other seeds
    gen = make_split(task, cfg.train_size, 10_000 + seed, exclude={r["question"] for r in held_out})
    rows = [{"question": r["question"], "gold": r["gold"]} for r in gen]
    return Selection("train", f"toy task (generated, seed {10_000 + seed})", "dataset", len(rows),
                     list(range(len(rows))), rows)


def _eval_source(cfg: DatasetConfig, setting: str) -> tuple[_Source, bool]:
    """The source of cfg's evaluation rows, and whether they are held out of its training split."""
    if cfg.path or cfg.eval_split:
        return _Source(cfg, cfg.eval_split, setting), False
    return _Source(cfg, cfg.train_split, setting), True


def load_rows(cfg: DatasetConfig, seed: int = 0, role: str = "eval", log=None) -> list[dict]:
    """The rows one role gets from this dataset alone (trb eval, trb rollout: role=eval). Evaluation
    rows of a set without an eval split are the ones a training run on it holds out."""
    return select_role(cfg, seed, role, log).rows


def select_role(cfg: DatasetConfig, seed: int = 0, role: str = "eval", log=None) -> Selection:
    log = log or (lambda m: print(m, file=sys.stderr))
    if cfg.name == "toy" and not cfg.path:
        return _toy(cfg, seed, role)
    if role == "eval":
        src, _ = _eval_source(cfg, "dataset")
        sel = _eval_selection(src, cfg, "dataset")
    else:
        sel = select_data(cfg, None, seed, "allow", log)[0]
    _check_golds(sel.rows, cfg, sel.source, log)
    return sel


def _setting(cfg: DatasetConfig, prefix: str, split: str | None) -> str:
    if cfg.path:
        return f"{prefix}.path={cfg.path}"
    return f"{prefix}={cfg.name} ({prefix}.hub_id={cfg.hub_id}, split {split})"


def select_data(train_cfg: DatasetConfig, eval_cfg: DatasetConfig | None, seed: int, overlap: str = "refuse",
                log=print) -> tuple[Selection, Selection, int]:
    """The training and evaluation rows of a run, never sharing a problem unless overlap=allow.

    Returns (train, eval, overlap count): the training rows that repeat an evaluation problem
    (normalised question text) and were kept (allow) or passed over (drop, one source)."""
    ecfg = eval_cfg or train_cfg
    eprefix = "eval_dataset" if eval_cfg is not None else "dataset"
    toy_train = train_cfg.name == "toy" and not train_cfg.path
    toy_eval = ecfg.name == "toy" and not ecfg.path
    if not ecfg.answer_field:
        raise DatasetError(f"{eprefix}={ecfg.name} has no gold answers ({eprefix}.answer_field=null), so it cannot be "
                           f"the eval set: name one, e.g. dataset@eval_dataset=math500 (or gsm8k, or "
                           f"dataset@eval_dataset=jsonl eval_dataset.path=FILE)")
    if not toy_train and not train_cfg.path and not train_cfg.train_split:
        raise DatasetError(f"dataset={train_cfg.name} is an evaluation set (it has no training split): train on "
                           f"another dataset (e.g. dataset=math_train, gsm8k, openthoughts3), or set "
                           f"dataset.train_split=NAME to train on that split (its eval rows are then held out)")
    if toy_eval:
        ev = _toy(ecfg, seed, "eval")
    else:
        esrc, held = _eval_source(ecfg, eprefix)
        ev = _eval_selection(esrc, ecfg, _setting(ecfg, eprefix, esrc.split))
        _check_golds(ev.rows, ecfg, ev.source, log)
    if toy_train:  # generated without the toy's own held-out problems
        tr = _toy(train_cfg, seed, "train")
        return tr, ev, _overlap(tr, ev, overlap)
    tsrc = _Source(train_cfg, train_cfg.train_split, "dataset")
    same = not toy_eval and tsrc.key == esrc.key
    exclude = set(ev.keys) if same or overlap == "drop" else set()
    tr = _train_selection(tsrc, train_cfg, seed, _setting(train_cfg, "dataset", tsrc.split),
                          ev.indices if same else [], exclude)
    _check_golds(tr.rows, train_cfg, tr.source, log)  # rewards of rows without a gold answer are NaN
    if same:  # held out first; repeats of a held-out question inside the file are passed over too
        if tr.dropped:
            log(f"data: {tr.dropped} training rows of {tsrc.label} repeat a held-out eval problem and were passed over")
        return tr, ev, 0
    if overlap == "drop":
        if tr.dropped:
            log(f"data: eval_overlap=drop: {tr.dropped} training rows that repeat an eval problem were passed over")
        return tr, ev, tr.dropped
    return tr, ev, _overlap(tr, ev, overlap)


def _overlap(tr: Selection, ev: Selection, policy: str) -> int:
    keys = set(ev.keys)
    count = sum(k in keys for k in tr.keys)
    if count and policy == "refuse":
        raise DatasetError(
            f"{count} of {len(tr.rows)} training prompts ({tr.setting}) repeat an eval problem ({ev.setting}; "
            f"normalised question text): training on the eval set makes its accuracy meaningless. Set "
            f"eval_overlap=drop to train without them, eval_overlap=allow to keep them, or choose other data")
    return count


DATA_FILE = "data.json"  # in a run dir: the rows each role used, with fingerprints


def data_record(train: Selection, ev: Selection, overlap: int, policy: str) -> dict:
    return {"train": train.record(), "eval": ev.record(), "overlap": overlap, "eval_overlap": policy}


def check_same_data(path: Path, record: dict) -> None:
    """A resumed run reads the rows it started with: refused naming the source where a role's
    fingerprint differs from the run's data.json (a run from before data.json: not checked)."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path} cannot be read ({err}); it records the rows the run used, so trb cannot check "
                           f"the data is unchanged: restore it, or start a new run (another output_dir)") from None
    for role in ("train", "eval"):
        old, new = saved.get(role) or {}, record[role]
        if old.get("fingerprint") != new["fingerprint"]:
            what = "training prompts" if role == "train" else "eval problems"
            raise DatasetError(
                f"the {what} changed since this run started: {new['setting']} now gives other rows "
                f"({new['selected']} of {new['available']}; the run had {old.get('selected')} of "
                f"{old.get('available')} from {old.get('source')}), so resuming would mix two datasets and compare "
                f"two eval sets; restore the data, or start a new run (another output_dir, or overwrite=true)")


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
    extra = {}
    if prompt.enable_thinking is not None:  # one rendered prompt: the student and the teacher see the same tokens
        if "enable_thinking" not in str(tokenizer.chat_template):
            raise DatasetError(f"prompt.enable_thinking={str(prompt.enable_thinking).lower()}: the model's chat "
                               f"template has no thinking switch; set prompt.enable_thinking=null")
        extra["enable_thinking"] = prompt.enable_thinking
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as err:  # noqa: BLE001 - jinja2's TemplateError / SecurityError, the template's own raise
        raise DatasetError(f"the model's chat template failed on a prompt ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:160] if str(err) else ''}): fix the tokenizer's "
                           f"chat_template, or use prompt=plain") from None


def fit_prompts(tokenizer, rows: list[dict], prompt: PromptConfig, max_tokens: int) -> tuple[list[dict], int]:
    """The rows whose rendered prompt has at most max_tokens tokens, and how many were dropped."""
    kept = [r for r in rows
            if len(tokenizer(render(tokenizer, r["question"], prompt), add_special_tokens=False)["input_ids"])
            <= max_tokens]
    return kept, len(rows) - len(kept)
