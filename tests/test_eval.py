"""Evaluation metrics against brute force, data adapters on fixtures, and `trb eval` artefacts."""

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trb.config import DatasetConfig, DecodingConfig
from trb.data import DatasetError, gold_from, last_boxed, load_rows
from trb.evaluate import aggregate, maj_at_k, pass_at_k

FIX = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert abs(pass_at_k(n, c, k) - brute) < 1e-12


def test_maj_at_k_votes_and_tie_rule():
    assert maj_at_k(["3", "4", "4"], [False, True, True], 3) is True
    assert maj_at_k(["3", "4", "4"], [True, False, False], 3) is False
    assert maj_at_k(["3", "4"], [True, False], 2) is True  # tie: the answer seen first wins
    assert maj_at_k(["4", "3"], [False, True], 2) is False
    assert maj_at_k([None, None, "5"], [False, False, True], 3) is True  # no-answer never wins
    assert maj_at_k([None], [False], 1) is False
    assert maj_at_k(["1", "2", "2"], [True, False, False], 1) is True  # only the first k count


def test_answer_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unbalanced") is None
    assert gold_from("work\n#### 1,200", "gsm8k") == "1200"
    assert gold_from("$\\boxed{2\\sqrt{2}}$.", "boxed") == "2\\sqrt{2}"


def test_adapters_on_fixtures():
    g = load_rows(DatasetConfig(name="gsm8k", path=str(FIX / "gsm8k_tiny.jsonl"), eval_size=0))
    assert [r["gold"] for r in g] == ["7", "1200", "30", "18"]
    m = load_rows(DatasetConfig(name="math", path=str(FIX / "math_tiny.jsonl"), question_field="problem",
                                answer_field="solution", answer_kind="boxed", keep_fields=["type", "level"],
                                eval_size=0))
    assert [r["gold"] for r in m] == ["1024", "2\\sqrt{2}", "6"] and m[0]["type"] == "Algebra"
    m5 = load_rows(DatasetConfig(name="math500", path=str(FIX / "math500_tiny.jsonl"), question_field="problem",
                                 answer_kind="plain", eval_size=2, select="first"))
    assert len(m5) == 2 and m5[0]["gold"] == "\\frac{3}{4}"


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="dataset.path"):
        load_rows(DatasetConfig(name="x", path=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(DatasetError, match="line 2"):
        load_rows(DatasetConfig(name="x", path=str(bad)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_rows(DatasetConfig(name="x", path=str(empty)))
    with pytest.raises(DatasetError, match="question_field"):
        load_rows(DatasetConfig(name="x", path=str(FIX / "math_tiny.jsonl"), eval_size=0))


def test_offline_hub_dataset_fails_fast_naming_the_override():
    import time

    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.time()
    with pytest.raises(DatasetError) as err:
        load_rows(DatasetConfig(name="gsm8k", hub_id="openai/gsm8k", hub_config="main"))
    assert "openai/gsm8k" in str(err.value) and "dataset.path" in str(err.value)
    assert time.time() - t0 < 20


def test_aggregate_agrees_with_samples():
    rng = random.Random(0)
    rows = [{"question": f"q{i}", "gold": str(i), "type": "A" if i % 2 else "B"} for i in range(5)]
    samples = []
    for i in range(5):
        for j in range(4):
            ans = rng.choice([str(i), "x", None])
            samples.append({"problem": i, "sample": j, "extracted": ans, "vote": ans, "correct": ans == str(i),
                            "tokens": 3, "truncated": ans is None, "type": rows[i]["type"]})
    m = aggregate(rows, samples, DecodingConfig(greedy=False, n=4, ks=[1, 2, 4]), 1.0, 60, 0)
    assert abs(m["eval/pass@1"] - sum(s["correct"] for s in samples) / 20) < 1e-12
    assert m["eval/no_answer"] == sum(s["extracted"] is None for s in samples) / 20
    import numpy as np  # the standard error over problems, as lm-evaluation-harness reports it

    per = np.array([np.mean([s["correct"] for s in samples if s["problem"] == i]) for i in range(5)])
    assert abs(m["eval/pass@1_stderr"] - per.std(ddof=1) / np.sqrt(5)) < 1e-12
    assert m["eval/accuracy_stderr"] == m["eval/pass@1_stderr"] and "eval/maj@4_stderr" in m
    for key in ("A", "B"):
        sel = [s["correct"] for s in samples if s["type"] == key]
        assert m[f"eval/type/{key}"] == sum(sel) / len(sel)


@pytest.mark.slow
def test_trb_eval_cli_writes_consistent_results(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_model

    model, tok = tiny_model(scale=3.0)
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck.parent / "train_config.json").write_text("{}")
    (ck.parent / "config.json").write_text("{}")  # a stray config.json must not make the run dir look like a model
    for step in (1, 2):  # a run dir with two checkpoints -> a curve
        model.save_pretrained(ck / f"step_{step:06d}")
        tok.save_pretrained(ck / f"step_{step:06d}")
    out = tmp_path / "eval"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "trb", "eval", f"checkpoint={tmp_path / 'run'}", "dataset=gsm8k",
                        f"dataset.path={FIX / 'gsm8k_tiny.jsonl'}", "prompt=chat_user", "decoding=sampled",
                        "decoding.n=3", "decoding.ks=[1,2,3]", "decoding.max_new_tokens=8",
                        f"hydra.run.dir={out}"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [x["step"] for x in res["results"]] == [1, 2] and len(res["curve"]) == 2
    for entry in res["results"]:
        samples = [json.loads(x) for x in (out / entry["samples"]).read_text().splitlines()]
        assert len(samples) == 4 * 3
        assert all("Please reason step by step" in s["prompt"] for s in samples)
        assert entry["metrics"]["eval/pass@1"] == sum(s["correct"] for s in samples) / len(samples)
        per = [[s for s in samples if s["problem"] == i] for i in range(4)]
        votes = [maj_at_k([s["vote"] for s in ss], [s["correct"] for s in ss], 3) for ss in per]
        assert entry["metrics"]["eval/maj@3"] == sum(votes) / 4  # the vote keys stored are the ones voted on
        assert all(s["extracted"] is not None for s in samples if s["correct"])
        assert entry["metrics"]["eval/problems"] == 4


@pytest.mark.parametrize("args, instruction, n, new_tokens", [
    ([], None, 1, 48),  # the toy: greedy, the bare prompt
    (["dataset=gsm8k"], "Please reason step by step", 32, 8192),  # the dataset's own eval settings
    (["dataset=math500"], "Please reason step by step", 64, 8192),
    (["dataset=gsm8k", "decoding=greedy"], "Please reason step by step", 1, 48),  # a named group wins
    (["dataset=gsm8k", "prompt=bare", "decoding.n=4", "decoding.ks=[1,4]"], None, 4, 8192),  # and keys win
])
def test_dataset_presets_carry_their_eval_settings(args, instruction, n, new_tokens):
    """(decoding.n below a preset's ks is refused: test_ks_above_n_is_refused.)"""
    from hydra import compose, initialize_config_dir

    from trb.cli import CONF_DIR, to_schema
    from trb.config import EvalConfig

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_schema(compose(config_name="eval", overrides=args), EvalConfig)
    assert (cfg.prompt.instruction or "").startswith(instruction or "") and bool(cfg.prompt.instruction) == \
        bool(instruction)
    assert cfg.decoding.n == n and cfg.decoding.max_new_tokens == new_tokens


def test_ks_above_n_is_refused():
    with pytest.raises(ValueError, match=r"decoding.ks=\[1, 8, 32\] asks .* above decoding.n=4 .*decoding.ks=\[1\]"):
        DecodingConfig(greedy=False, n=4, ks=[1, 8, 32])
    assert DecodingConfig(greedy=False, n=8, ks=[1, 8]).ks == [1, 8]
