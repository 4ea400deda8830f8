"""Bad input: each case ends within seconds with a one-paragraph message naming what to change,
no traceback, and leaves what was already in the output dir untouched."""

import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from helpers import cli, save_pair, tiny_model
from trb.config import LoggerConfig
from trb.train import encode_batch

FAST = ["steps=1", "prompts_per_step=2", "rollout.n=1", "eval_every=0", "logger.kind=none",
        "dataset.eval_size=8"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def out_dir(tmp_path):
    """An output dir that already holds files (not a run's: those make it another run's dir, which
    is refused before these checks)."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "x.txt").write_text("1\n")
    (out / "notes.txt").write_text("keep me\n")
    return out


def _fails_cleanly(args, tmp_path, out_dir, *needles, timeout=120):
    before = _snapshot(out_dir)
    t0 = time.time()
    res = cli(["train", *args, f"output_dir={out_dir}"], cwd=tmp_path, timeout=timeout)
    seconds = time.time() - t0
    assert res.returncode != 0, res.stdout[-2000:]
    for needle in needles:
        assert needle in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert _snapshot(out_dir) == before  # nothing overwritten or added
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in out_dir.iterdir()
                                                               if p.name in ("data", "notes.txt"))
    assert not (tmp_path / "outputs").exists()  # no stray Hydra dir
    return res, seconds


@pytest.mark.parametrize("override, needle", [
    ("blend.eps0=-0.1", "blend.eps0 must be >= 0"),
    ("blend.horizon=-1", "blend.horizon (K) must be >= 0"),
    ("rollout.n=0", "rollout.n must be >= 1"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1"),
    ("rollout.max_prompt_tokens=-3", "rollout.max_prompt_tokens must be >= 1"),
    ("rollout.long_prompts=cut", "rollout.long_prompts must be skip or truncate"),
    ("steps=many", "key: steps"),
    ("loss.k=100000", "loss.k=100000 exceeds the vocabulary size"),
    ("method.skd_top_k=100000", "method.skd_top_k=100000 exceeds the vocabulary size"),
    ("student.path=/nonexistent/model", "student.path='/nonexistent/model' does not exist"),
    ("teacher.path=Qwen/Qwen3-4B", "not in the local Hugging Face cache ("),
    ("resume=/nonexistent/ckpt", "is not a trb checkpoint"),
    ("dataset.path=/nonexistent.jsonl", "dataset.path='/nonexistent.jsonl' does not exist"),
])
def test_bad_values_and_paths(override, needle, tmp_path, out_dir):
    extra = ["method=skd"] if override.startswith("method.skd") else []
    _, seconds = _fails_cleanly([*FAST, *extra, override], tmp_path, out_dir, needle)
    assert seconds < 60


def test_unknown_group_option_lists_the_valid_ones(tmp_path, out_dir):
    res, _ = _fails_cleanly(["method=nope"], tmp_path, out_dir, "method=nope: no such option")
    for option in ("opd", "trb", "fixed", "skd", "veto", "temp_warmup", "sft_warmup"):
        assert option in res.stderr


@pytest.mark.parametrize("content, needle", [("", "holds no rows"),
                                             ('{"question": "1+1?", "answer": "2"}\nnot json\n',
                                              "line 2 is not JSON")])
def test_empty_or_malformed_dataset(content, needle, tmp_path, out_dir):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    _fails_cleanly([*FAST, f"dataset.path={data}", "dataset.name=mine", "prompt=plain"], tmp_path, out_dir, needle)


def test_tokenizers_that_differ_are_refused(tmp_path, out_dir):
    """A teacher whose tokenizer has a token the student's lacks (embedding table padded to match or
    not) is refused; padding rows alone are accepted (tests/test_vocab.py)."""
    s_path, _ = save_pair(tmp_path)
    t, ttok = tiny_model(eos="<|im_end|>", hidden=48, seed=1)
    ttok.add_tokens(["<|teacher_only|>"])
    t.resize_token_embeddings(t.config.vocab_size + 8)
    t.save_pretrained(tmp_path / "t_big")
    ttok.save_pretrained(tmp_path / "t_big")
    _fails_cleanly([*FAST, f"student.path={s_path}", f"teacher.path={tmp_path / 't_big'}"], tmp_path, out_dir,
                   "teacher and student tokenizers map tokens to different ids")


def test_chat_prompt_without_a_chat_template(tmp_path, out_dir):
    s_path, t_path = save_pair(tmp_path)
    for path in (s_path, t_path):
        cfg = Path(path) / "tokenizer_config.json"
        conf = json.loads(cfg.read_text())
        conf.pop("chat_template", None)
        cfg.write_text(json.dumps(conf))
        (Path(path) / "chat_template.jinja").unlink(missing_ok=True)
    _fails_cleanly([*FAST, f"student.path={s_path}", f"teacher.path={t_path}", "prompt=chat_user"], tmp_path,
                   out_dir, "the tokenizer has no chat template; use prompt=plain")


def test_pickled_weights_are_refused(tmp_path, out_dir):
    s_path, t_path = save_pair(tmp_path)
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    for f in Path(s_path).iterdir():  # the same model with its weights pickled instead
        if f.name == "model.safetensors":
            torch.save(load_file(f), folder / "pytorch_model.bin")
        else:
            (folder / f.name).write_bytes(f.read_bytes())
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    _fails_cleanly([*FAST, f"student.path={tmp_path / 'bin'}", f"teacher.path={t_path}"], tmp_path, out_dir,
                   "holds no .safetensors weights")


def test_remote_code_needs_trust_remote_code(tmp_path, out_dir):
    s_path, t_path = save_pair(tmp_path)
    cfg = Path(t_path) / "config.json"
    conf = json.loads(cfg.read_text())
    conf["model_type"] = "trb_custom_arch"  # an architecture transformers does not ship: only its own code can load it
    conf["auto_map"] = {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}
    cfg.write_text(json.dumps(conf))
    (Path(t_path) / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    res, _ = _fails_cleanly([*FAST, f"student.path={s_path}", f"teacher.path={t_path}"], tmp_path, out_dir,
                            "teacher.trust_remote_code=true")
    assert "remote code ran" not in res.stderr + res.stdout


def test_long_prompts_are_skipped_or_truncated_and_counted():
    _, tok = tiny_model()
    rows = [{"question": "What is 1+2?"}, {"question": "What is " + "+".join(["12"] * 20) + "?"}]
    from trb.config import PromptConfig

    prompt = PromptConfig()
    _, full_ids, full_mask, n0 = encode_batch(tok, rows, prompt, 10_000, "cpu")
    assert n0 == 0
    lengths = full_mask.sum(1).tolist()
    limit = (lengths[0] + lengths[1]) // 2
    kept, ids, mask, n = encode_batch(tok, rows, prompt, limit, "cpu")
    assert n == 1 and kept == rows[:1] and int(mask.sum()) == lengths[0]
    kept, ids, mask, n = encode_batch(tok, rows, prompt, limit, "cpu", truncate=True)
    assert n == 1 and kept == rows and ids.shape[1] == limit
    # the truncated row keeps its last `limit` tokens (the end of the prompt, with the assistant header)
    assert torch.equal(ids[1], full_ids[1, -limit:])
    assert torch.equal(ids[0][mask[0].bool()], full_ids[0][full_mask[0].bool()])


def test_long_prompts_counted_in_training_metrics(tmp_path):
    for mode in ("skip", "truncate"):
        run = tmp_path / mode
        res = cli(["train", "steps=2", "prompts_per_step=4", "rollout.n=1", "eval_every=0", "logger.kind=none",
                   "dataset.eval_size=4", "rollout.max_prompt_tokens=35", f"rollout.long_prompts={mode}",
                   f"output_dir={run}"], cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "loss" in r]
        if mode == "truncate":  # nothing skipped, every step trained
            assert len(steps) == 2 and steps[-1]["prompts/skipped_too_long"] == 0
            assert sum(r["prompts/too_long"] for r in steps) > 0
        else:  # toy prompts are 32-39 tokens: some are skipped, the rest train
            assert steps and steps[-1]["prompts/skipped_too_long"] >= sum(r["prompts/too_long"] for r in steps) > 0


def test_unreachable_wandb_falls_back_to_offline(tmp_path, monkeypatch):
    from trb.tracking import Tracker

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(LoggerConfig(mode="online", init_timeout=5), tmp_path, {"a": 1}, name="x")
    try:
        assert any("W&B is unreachable" in str(w.message) and "logging offline" in str(w.message) for w in caught)
        assert tracker.run is not None and tracker.run.settings.mode == "offline"
        tracker.log({"loss": 1.0}, 0)
    finally:
        tracker.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0
    assert (tmp_path / "wandb_run_id").exists()
