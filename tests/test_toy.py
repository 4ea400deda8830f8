"""The embedded default: task generator, tokenizer, deterministic model builds."""

import dataclasses
import hashlib
import json
import random

from trb.toy import (
    ASSETS,
    EVAL_SEED,
    ToyModelRecipe,
    ToyRecipe,
    ToyTask,
    build,
    build_tokenizer,
    make_problem,
    make_split,
)


def test_problems_are_correct_and_in_gsm8k_schema():
    rng = random.Random(0)
    for _ in range(500):
        row = make_problem(rng, ToyTask())
        expr = row["question"].removeprefix("What is ").removesuffix("?")
        # left-to-right evaluation equals Python's for + and - only
        assert int(row["gold"]) == eval(expr)  # noqa: S307 - our own generated digits and +/-
        assert row["answer"].endswith(f"#### {row['gold']}")
        assert row["solution"].endswith(f"\\boxed{{{row['gold']}}}")
        assert int(row["gold"]) >= 0


def test_held_out_split_is_disjoint_and_seeded():
    task = ToyTask()
    held = make_split(task, 200, EVAL_SEED)
    train = make_split(task, 2000, 0, exclude={r["question"] for r in held})
    assert not {r["question"] for r in held} & {r["question"] for r in train}
    assert make_split(task, 50, 3) == make_split(task, 50, 3)


def test_tokenizer_roundtrip_and_specials():
    tok = build_tokenizer("<|im_end|>")
    text = "What is 12+3?\\boxed{15} \u00e9\u4e2d"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    digits = tok("1234", add_special_tokens=False)["input_ids"]
    assert len(digits) == 4  # one token per digit
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert build_tokenizer("<|endoftext|>").get_vocab() == tok.get_vocab()


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.safetensors"))}


def test_build_is_deterministic(tmp_path):
    tiny = ToyRecipe(
        teacher=ToyModelRecipe(32, 1, 2, 1, 64, "<|im_end|>", steps=3, lr=1e-3, batch=4, seed=1, corrupt=0.5),
        teacher_clean=ToyModelRecipe(32, 1, 2, 1, 64, "<|im_end|>", steps=3, lr=1e-3, batch=4, seed=1),
        student=ToyModelRecipe(16, 1, 1, 1, 32, "<|endoftext|>", steps=2, lr=1e-3, batch=4, seed=2),
        train_problems=100,
    )
    a = build(tmp_path / "a", tiny, log=lambda *_: None)
    b = build(tmp_path / "b", tiny, log=lambda *_: None)
    for sub in ("teacher", "teacher_clean", "student"):
        assert _digest(a / sub) == _digest(b / sub)
    # the two teachers differ by the corrupted solutions alone
    assert _digest(a / "teacher") != _digest(a / "teacher_clean")
    assert json.loads((a / "recipe.json").read_text())["digest"] == tiny.digest()


def test_shipped_models_match_the_default_recipe():
    meta = json.loads((ASSETS / "recipe.json").read_text())
    assert meta["digest"] == ToyRecipe().digest()
    assert meta["greedy_accuracy_200"]["teacher"] >= 0.9
    assert meta["greedy_accuracy_200"]["teacher_clean"] >= 0.9
    for name in ("teacher", "teacher_clean", "student"):
        assert (ASSETS / name / "model.safetensors").exists()
    assert meta["greedy_accuracy_200"]["student"] <= meta["greedy_accuracy_200"]["teacher"] - 0.2  # clearly below
    assert dataclasses.asdict(ToyRecipe())["teacher"]["steps"] == meta["teacher"]["steps"]
