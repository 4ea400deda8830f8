"""Data: which rows each role gets (training never shares a problem with the eval set silently),
seeded selection, loading that materialises only the selected rows, the run's data record and
resume refusal, presets parsing their datasets' schemas (through the hub cache layout too),
`trb download`, several benchmarks in one `trb eval`, the chat template's thinking switch."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import cli, save_pair
from trb import data as data_mod
from trb.config import DatasetConfig, EvalConfig, PromptConfig, TrainConfig
from trb.data import DatasetError, gold_from, load_rows, normalise, render, select_data

FIX = Path(__file__).parent / "fixtures"
EVAL_PRESETS = {"gsm8k": "gsm8k_tiny", "math500": "math500_tiny", "aime24": "aime24_tiny", "aime25": "aime25_tiny",
                "amc23": "amc23_tiny", "olympiadbench": "olympiadbench_tiny"}


def compose(name, overrides, schema=TrainConfig):
    from trb.cli import compose as cli_compose

    return cli_compose(name, overrides, schema)


def rows_file(path: Path, questions, answers=None) -> Path:
    answers = answers or [f"#### {i}" for i in range(len(questions))]
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers)))
    return path


def fake_hub_dataset(cache: Path, repo: str, config, splits: dict) -> None:
    """A dataset as `datasets` leaves it in HF_DATASETS_CACHE after a download (the prepared Arrow
    files under <ns>___<name>/<config>/<version>/<hash>/), built offline from rows."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    tmp = Path(tempfile.mkdtemp())
    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=str(tmp / "build"))
    builder.download_and_prepare()
    ns, name = repo.split("/")
    snake = camelcase_to_snakecase(name)
    out = cache / f"{ns}___{snake}" / (config or "default") / "0.0.0" / ("0" * 16)
    out.mkdir(parents=True)
    info = json.loads(Path(builder.cache_dir, "dataset_info.json").read_text())
    info.update(config_name=config or "default", dataset_name=snake)
    (out / "dataset_info.json").write_text(json.dumps(info))
    for split in splits:
        shutil.copy(Path(builder.cache_dir, f"json-{split}.arrow"), out / f"{snake}-{split}.arrow")
    shutil.rmtree(tmp)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf_datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def _read(name):
    return [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text().splitlines()]


def test_gold_from_lists_and_numbers():
    assert gold_from(["$-2$", "$2$"], "plain") == "$-2$, $2$"
    assert gold_from(27.0, "plain") == "27" and gold_from(2.5, "plain") == "2.5" and gold_from(70, "plain") == "70"
    assert normalise("  What IS\t1+1?\n") == normalise("what is 1+1?")


def test_every_eval_preset_parses_its_dataset_through_the_hub_cache(hub_cache):
    """Each preset's hub id, config and split, as `trb download` leaves them in the cache (fixture
    rows in the hub dataset's own schema): every row parses, with a gold answer."""
    for name, fixture in EVAL_PRESETS.items():
        ds = compose("eval", [f"dataset={name}"], EvalConfig).dataset
        fake_hub_dataset(hub_cache, ds.hub_id, ds.hub_config, {ds.eval_split: _read(fixture)})
        rows = load_rows(ds)
        assert len(rows) == len(_read(fixture)) and all(r["gold"] for r in rows), (name, rows)
    ob = load_rows(compose("eval", ["dataset=olympiadbench"], EvalConfig).dataset)
    assert sorted(r["gold"] for r in ob) == ["$-2$, $2$", "$7$"]
    amc = load_rows(compose("eval", ["dataset=amc23"], EvalConfig).dataset)
    assert sorted(r["gold"] for r in amc) == ["21", "27"]
    # the same presets read a local copy in the same schema (dataset.path=)
    for name, fixture in EVAL_PRESETS.items():
        ds = compose("eval", [f"dataset={name}", f"dataset.path={FIX / (fixture + '.jsonl')}"], EvalConfig).dataset
        assert all(r["gold"] for r in load_rows(ds)), name
    # and their decoding is the paper's: n and temperature per benchmark
    ns = {name: compose("eval", [f"dataset={name}"], EvalConfig).decoding.n for name in EVAL_PRESETS}
    assert ns == {"gsm8k": 32, "math500": 64, "aime24": 512, "aime25": 512, "amc23": 512, "olympiadbench": 64}


def test_training_presets_read_train_splits_and_refuse_the_eval_set(hub_cache):
    train_rows = [{"question": f"Train problem {i}?", "answer": f"#### {i}"} for i in range(30)]
    test_rows = [{"question": f"Test problem {i}?", "answer": f"#### {i}"} for i in range(10)]
    test_rows.append({"question": "  TRAIN problem 3? ", "answer": "#### 3"})  # a repeat, up to case and spaces
    fake_hub_dataset(hub_cache, "openai/gsm8k", "main", {"train": train_rows, "test": test_rows})
    cfg = compose("train", ["dataset=gsm8k"])
    with pytest.raises(DatasetError, match=r"1 of 30 training prompts .* repeat an eval problem") as err:
        select_data(cfg.dataset, cfg.eval_dataset, 0, cfg.eval_overlap, log=lambda m: None)
    assert "eval_overlap=drop" in str(err.value) and "eval_overlap=allow" in str(err.value)
    tr, ev, n = select_data(cfg.dataset, None, 0, "allow", log=lambda m: None)
    assert n == 1 and len(tr.rows) == 30 and len(ev.rows) == 11
    assert {r["question"] for r in tr.rows} == {r["question"] for r in train_rows}  # the train split only
    assert {r["question"] for r in ev.rows} == {r["question"] for r in test_rows}  # the test split only
    tr, ev, n = select_data(cfg.dataset, None, 0, "drop", log=lambda m: None)
    assert n == 1 and len(tr.rows) == 29 and "Train problem 3?" not in {r["question"] for r in tr.rows}
    # an evaluation-only preset is refused as training data, naming the setting
    fake_hub_dataset(hub_cache, "HuggingFaceH4/MATH-500", None, {"test": _read("math500_tiny")})
    with pytest.raises(DatasetError, match="dataset.train_split"):
        c = compose("train", ["dataset=math500"])
        select_data(c.dataset, None, 0, "refuse")
    # a set without gold answers cannot be the eval set
    with pytest.raises(DatasetError, match="eval_dataset=math500"):
        c = compose("train", ["dataset=openthoughts3", f"dataset.path={FIX / 'openthoughts_tiny.jsonl'}"])
        select_data(c.dataset, None, 0, "refuse")


def _questions(n, dup_every=0):
    qs = [f"Problem number {i}: what is {i} + {2 * i}?" for i in range(n)]
    if dup_every:  # repeats in the file (other case / spacing): never on both sides of the split
        qs += [qs[i].upper() + "  " for i in range(0, n, dup_every)]
    return qs


def test_one_file_serves_both_roles_disjointly(tmp_path):
    path = rows_file(tmp_path / "d.jsonl", _questions(300, dup_every=7))
    cfg = compose("train", ["dataset=jsonl", f"dataset.path={path}", "dataset.eval_size=50"])
    logs = []
    tr, ev, n = select_data(cfg.dataset, cfg.eval_dataset, 0, "refuse", log=logs.append)
    assert len(ev.rows) == 50 and n == 0
    assert not {normalise(r["question"]) for r in tr.rows} & {normalise(r["question"]) for r in ev.rows}
    assert not set(tr.indices) & set(ev.indices)
    assert tr.dropped > 0 and any("repeat a held-out eval problem" in m for m in logs)
    assert len(tr.rows) == tr.available - tr.dropped  # train_size 0: every other row
    # the same file named as the eval set explicitly is the same source: the same split
    cfg2 = compose("train", ["dataset=jsonl", f"dataset.path={path}", "dataset.eval_size=50",
                             "dataset@eval_dataset=jsonl", f"eval_dataset.path={path}", "eval_dataset.eval_size=50"])
    tr2, ev2, _ = select_data(cfg2.dataset, cfg2.eval_dataset, 0, "refuse", log=lambda m: None)
    assert ev2.indices == ev.indices and tr2.indices == tr.indices
    # two files that share problems: refused with the count
    other = rows_file(tmp_path / "e.jsonl", [q for q in _questions(300)[::10]] + ["An unrelated problem?"])
    cfg3 = compose("train", ["dataset=jsonl", f"dataset.path={path}", "dataset.eval_size=0",
                             "dataset@eval_dataset=jsonl", f"eval_dataset.path={other}", "eval_dataset.eval_size=0"])
    with pytest.raises(DatasetError, match=r"^\d+ of \d+ training prompts"):
        select_data(cfg3.dataset, cfg3.eval_dataset, 0, "refuse")


def test_selection_is_seeded_reproducible_and_eval_rows_fixed_across_seeds(tmp_path):
    path = rows_file(tmp_path / "d.jsonl", _questions(400))

    def pick(seed, *extra):
        cfg = compose("train", ["dataset=jsonl", f"dataset.path={path}", "dataset.eval_size=40",
                                "dataset.train_size=30", *extra])
        return select_data(cfg.dataset, None, seed, "refuse", log=lambda m: None)

    a, b, c = pick(0), pick(0), pick(1)
    assert a[0].indices == b[0].indices and a[0].fingerprint() == b[0].fingerprint()
    assert a[0].indices != c[0].indices  # another run seed: other training prompts
    assert a[1].indices == c[1].indices  # ... scored on the same eval problems
    assert pick(0, "dataset.seed=5")[0].indices == pick(3, "dataset.seed=5")[0].indices
    assert pick(0, "dataset.split_seed=1")[1].indices != a[1].indices
    first = pick(0, "dataset.select=first")
    assert first[1].indices == list(range(40)) and first[0].indices == list(range(40, 70))
    with pytest.raises(DatasetError, match=r"dataset.train_size=1000 but .* has 360 rows left after the 40 held out"):
        pick(0, "dataset.train_size=1000")
    with pytest.raises(DatasetError, match="dataset.eval_size=500 .* 400 rows"):
        pick(0, "dataset.eval_size=500")


def test_loading_materialises_only_the_selected_rows(tmp_path, monkeypatch):
    """The bound on loading memory: rows are adapted (made Python objects) only for the selection,
    a batch at a time, however long the file."""
    path = rows_file(tmp_path / "big.jsonl", _questions(20_000))
    seen = []
    real = data_mod._adapt_one
    monkeypatch.setattr(data_mod, "_adapt_one", lambda rec, cfg, src, i: seen.append(i) or real(rec, cfg, src, i))
    cfg = compose("train", ["dataset=jsonl", f"dataset.path={path}", "dataset.eval_size=20", "dataset.train_size=30"])
    tr, ev, _ = select_data(cfg.dataset, None, 0, "refuse", log=lambda m: None)
    assert len(tr.rows) == 30 and len(ev.rows) == 20
    assert len(seen) <= 20 + data_mod._TAKE_BATCH  # the eval rows, then one batch of training candidates


def test_enable_thinking_is_a_prompt_setting():
    from transformers import AutoTokenizer

    from trb.toy import ASSETS, ensure_built

    tok = AutoTokenizer.from_pretrained(ensure_built() / "student")
    assert ASSETS.exists()
    with pytest.raises(DatasetError, match="prompt.enable_thinking=false: the model's chat template has no"):
        render(tok, "What is 1+1?", PromptConfig(enable_thinking=False))
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
                         "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    off = render(tok, "What is 1+1?", PromptConfig(enable_thinking=False))
    on = render(tok, "What is 1+1?", PromptConfig(enable_thinking=True))
    default = render(tok, "What is 1+1?", PromptConfig())
    assert off.endswith("<think></think>") and on == default and not on.endswith("</think>")
    with pytest.raises(ValueError, match="prompt.style=chat"):
        PromptConfig(style="plain", enable_thinking=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("models"))


FAST = ["steps=2", "prompts_per_step=2", "rollout.n=1", "rollout.max_new_tokens=6", "eval_every=0", "save_every=1",
        "logger.kind=none", "dataset=jsonl", "dataset.eval_size=8", "dataset.train_size=40"]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_records_its_rows_and_refuses_resume_on_changed_data(pair, tmp_path):
    s, t = pair
    path = rows_file(tmp_path / "d.jsonl", [f"What is {i}+{i % 7}?" for i in range(120)],
                     [f"#### {i + i % 7}" for i in range(120)])
    out = tmp_path / "run"
    args = [*FAST, f"student.path={s}", f"teacher.path={t}", f"dataset.path={path}", f"output_dir={out}"]
    res = cli(["train", *args], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((out / "data.json").read_text())
    assert rec["train"]["selected"] == 40 and rec["eval"]["selected"] == 8 and rec["overlap"] == 0
    lines = path.read_text().splitlines()
    used = {i for i, _ in rec["train"]["rows"]}
    # trb eval of this run's checkpoint on the whole file says how many problems it trained on
    from trb.eval_run import trained_on

    every = load_rows(DatasetConfig(name="f", path=str(path), eval_size=0))
    ckpt = str(out / "checkpoints" / "step_000002")
    assert trained_on(ckpt, every) == 40 and trained_on(ckpt, [every[i] for i in range(120) if i not in used]) == 0
    assert not used & {i for i, _ in rec["eval"]["rows"]}
    # an eval row rewritten: the extension is refused, naming the file, the run dir untouched
    eval_row = rec["eval"]["rows"][0][0]
    changed = list(lines)
    changed[eval_row] = json.dumps({"question": "What is 1000+1?", "answer": "#### 1001"})
    path.write_text("\n".join(changed) + "\n")
    before = _tree(out)
    res = cli(["train", *[a for a in args if a != "steps=2"], "steps=3"], cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "eval problems changed since this run started" in errors[0] and str(path) in errors[0]
    assert _tree(out) == before
    # the data restored and a memory knob changed: it resumes
    path.write_text("\n".join(lines) + "\n")
    res = cli(["train", *[a for a in args if a != "steps=2"], "steps=3", "train.micro_batch_tokens=4096"],
              cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stdout and (out / "checkpoints" / "step_000003").is_dir()
    # a row outside the selection changed: the run's data is the same, so it may go on
    unused = next(i for i in range(120) if i not in used and i not in {j for j, _ in rec["eval"]["rows"]})
    edited = list(lines)
    edited[unused] = json.dumps({"question": "What is 5000+1?", "answer": "#### 5001"})
    path.write_text("\n".join(edited) + "\n")
    res = cli(["train", *[a for a in args if a != "steps=2"], "steps=4"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_overlap_refused_before_anything_is_loaded_or_written(pair, tmp_path):
    s, t = pair
    qs = [f"What is {i}+{i % 5}?" for i in range(60)]
    train = rows_file(tmp_path / "train.jsonl", qs)
    test = rows_file(tmp_path / "test.jsonl", qs[:3] + ["What is 99+99?"])
    out = tmp_path / "run"
    res = cli(["train", *FAST, f"student.path={s}", f"teacher.path={t}", f"dataset.path={train}",
               "dataset.train_size=0", "dataset@eval_dataset=jsonl", f"eval_dataset.path={test}",
               "eval_dataset.eval_size=0", f"output_dir={out}"], cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "3 of 60 training prompts" in errors[0] and "eval_overlap=drop" in errors[0]
    assert not out.exists() and "Traceback" not in res.stderr


def test_download_plan_offline_and_every_missing_item_named(tmp_path, monkeypatch):
    env_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(env_home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(env_home / "datasets"))
    res = cli(["download", "experiment=paper_0.6b_4b", "--dry-run"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [x for x in res.stdout.splitlines() if x.startswith(("missing", "cached"))]
    assert [x.split("  ")[1] for x in lines] == [
        "model Qwen/Qwen3-0.6B-Base (student.path)", "model Qwen/Qwen3-4B (teacher.path)",
        "dataset open-thoughts/OpenThoughts3-1.2M split train (dataset)",
        "dataset HuggingFaceH4/MATH-500 split test (eval_dataset)"]
    assert "1.19 GB" in lines[0] and "8.04 GB" in lines[1] and all(x.startswith("missing") for x in lines)
    # a cached item is reported as such (the dataset as a download leaves it)
    fake_hub_dataset(env_home / "datasets", "HuggingFaceH4/MATH-500", None, {"test": _read("math500_tiny")})
    res = cli(["download", "--eval", "math500,aime24", "--dry-run"], cwd=tmp_path, timeout=300)
    assert "cached   dataset HuggingFaceH4/MATH-500 split test (--eval math500)" in res.stdout
    assert "missing  dataset HuggingFaceH4/aime_2024 split train" in res.stdout
    # a run refuses at start naming every missing item and the command; nothing written
    res = cli(["train", "experiment=paper_0.6b_4b", f"output_dir={tmp_path / 'run'}", "device=cpu"],
              cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and not (tmp_path / "run").exists()
    err = [x for x in res.stderr.splitlines() if x.startswith("error: ")][0]
    for item in ("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B", "open-thoughts/OpenThoughts3-1.2M"):
        assert item in err
    assert "MATH-500" not in err  # cached
    assert "`trb download experiment=paper_0.6b_4b device=cpu`" in err
    # downloading is refused when the user asked for offline mode
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli(["download", "--eval", "aime24"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "needs the network" in res.stderr


def test_eval_several_benchmarks_reports_each_and_the_average(tmp_path):
    out = tmp_path / "ev"
    res = cli(["eval", "checkpoint=toy:student", "engine=hf", "decoding=greedy", "decoding.max_new_tokens=40",
               "prompt=bare", "logger.kind=none", f"output_dir={out}",
               f"datasets=[gsm8k:{FIX / 'gsm8k_tiny.jsonl'},math500:{FIX / 'math500_tiny.jsonl'}]"],
              cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    each = {n: json.loads((out / n / "results.json").read_text()) for n in ("gsm8k", "math500")}
    scores = {n: each[n]["results"][0]["metrics"]["eval/pass@1"] for n in each}
    row = summary["table"][0]
    assert row["pass@1"] == scores and row["average"] == pytest.approx(sum(scores.values()) / 2)
    assert each["gsm8k"]["problems"] == 4 and each["math500"]["problems"] == 3
    assert "average" in res.stdout
    # each benchmark keeps its own preset's decoding unless overridden: here greedy for both
    assert each["math500"]["config"]["decoding"]["greedy"] is True
    bad = cli(["eval", "checkpoint=toy:student", "datasets=[gsm8k,nosuch]", f"output_dir={tmp_path / 'x'}"],
              cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "nosuch" in bad.stderr and not (tmp_path / "x" / "gsm8k").exists()


def test_toy_eval_problems_fixed_across_seeds():
    """The toy generator keeps its own rule: held-out problems from a fixed seed, training prompts
    generated from the run's seed without any of them."""
    cfg = compose("train", ["dataset.train_size=300", "dataset.eval_size=100"])
    tr, ev, n = select_data(cfg.dataset, None, 0, "refuse", log=lambda m: None)
    tr1, ev1, _ = select_data(cfg.dataset, None, 1, "refuse", log=lambda m: None)
    assert n == 0 and [r["question"] for r in ev.rows] == [r["question"] for r in ev1.rows]
    assert [r["question"] for r in tr.rows] != [r["question"] for r in tr1.rows]
