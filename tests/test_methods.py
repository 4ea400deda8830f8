"""Every method of the paper via one override, and the paper presets, on tiny models through the CLI.

One Hydra multirun trains all seven methods (two seeds) for a few steps; each test reads the
metrics a method leaves and checks the mechanism that defines it."""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, Qwen3Config

from helpers import cli, save_pair
from trb.config import METHODS, TrainConfig
from trb.toy import build_tokenizer
from trb.tracking import read_metrics

pytestmark = pytest.mark.slow

STEPS = 6
KNOBS = ["method.skd_top_k=3", "method.veto_b_start=0.4", "method.veto_horizon=4", "method.temp_start=0.8",
         "method.temp_horizon=4", "method.sft_updates=2", "method.sft_prompt_steps=3", "method.sft_samples=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    s, t = save_pair(root)
    out = root / "sweep"
    r = cli(["train", "-m", f"method={','.join(METHODS)}", "seed=0,1", f"student.path={s}", f"teacher.path={t}",
             f"steps={STEPS}", "prompts_per_step=3", "rollout.n=2", "rollout.max_new_tokens=10",
             "dataset.eval_size=4", "dataset.train_size=40", "eval_every=3", "logger.kind=none", *KNOBS,
             f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${method.name}_${seed}"], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def steps_of(sweep, method, seed=0):
    recs = [x for x in read_metrics(sweep / f"{method}_{seed}") if "loss" in x]
    assert [x["step"] for x in recs] == list(range(STEPS))
    return recs


def test_every_method_leaves_a_summary(sweep):
    for m in METHODS:
        for seed in (0, 1):
            summary = json.loads((sweep / f"{m}_{seed}" / "summary.json").read_text())
            assert summary["method"] == m and summary["accuracy_after"] is not None


def test_opd_samples_from_the_student_only(sweep):
    for x in steps_of(sweep, "opd"):
        assert x["eps"] == 0 and x["beta/mean"] == 0 and x["beta/frac_zero"] == 1 and x["kl_mu_student/max"] == 0
        assert math.isfinite(x["teacher/logp"])


def test_trb_anneals_and_fixed_keeps_eps(sweep):
    trb = steps_of(sweep, "trb")
    assert [x["eps"] for x in trb] == pytest.approx([0.01 * (1 - k / 25) for k in range(STEPS)])
    assert all(x["beta/mean"] > 0 for x in trb)
    fixed = steps_of(sweep, "fixed")
    assert all(x["eps"] == 0.01 for x in fixed)
    for x in trb + fixed:
        assert x["kl_mu_student/max"] <= x["eps"]  # the trust region holds on every token


def test_skd_replaces_tokens_of_a_random_student(sweep):
    recs = steps_of(sweep, "skd")
    assert all(x["rollout/replaced"] > 0 for x in recs)
    assert all(x["eps"] == 0 and x["beta/mean"] == 0 for x in recs)
    for other in ("opd", "trb", "veto"):
        assert all(x["rollout/replaced"] == 0 for x in steps_of(sweep, other))


def test_veto_exponent_decays_linearly(sweep):
    recs = steps_of(sweep, "veto")
    assert [x["veto/b"] for x in recs] == pytest.approx([0.4 * max(0.0, 1 - k / 4) for k in range(STEPS)])
    assert all(x["veto/b"] == 0 for x in steps_of(sweep, "opd"))


def test_temperature_warmup_follows_its_schedule(sweep):
    recs = steps_of(sweep, "temp_warmup")
    expected = [0.8 + 0.2 * min(k / 4, 1.0) for k in range(STEPS)]
    assert [x["rollout/temperature"] for x in recs] == pytest.approx(expected)
    # a temperature below 1 makes the behaviour policy differ from the student's: KL(mu || pi_S) > 0
    assert recs[0]["kl_mu_student/mean"] > 0 and recs[-1]["kl_mu_student/mean"] == 0


def test_sft_warmup_switches_phase(sweep):
    recs = steps_of(sweep, "sft_warmup")
    assert [x["sft/active"] for x in recs] == [1.0, 1.0] + [0.0] * (STEPS - 2)
    assert all("sft/nll" in x and "beta/mean" not in x for x in recs[:2])
    assert all("beta/mean" in x and x["beta/mean"] == 0 for x in recs[2:])
    log = (sweep / "sft_warmup_0" / "train_config.json").read_text()
    assert json.loads(log)["method"]["sft_updates"] == 2


def test_same_prompts_across_methods_at_each_step(sweep):
    # every method consumes the same prompt stream: the epoch counter and the skip count agree
    a, b = steps_of(sweep, "opd"), steps_of(sweep, "sft_warmup")
    assert [x["epoch"] for x in a] == [x["epoch"] for x in b]


def test_inconsistent_method_and_blend_is_refused(tmp_path):
    r = cli(["train", "method=opd", "blend=linear", f"hydra.run.dir={tmp_path / 'x'}"], cwd=tmp_path)
    assert r.returncode == 2 and "method=opd" in r.stderr and "blend" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------
# The paper presets
# --------------------------------------------------------------------------------------------

PRESETS = {  # name: (student hub id, teacher hub id, real shapes: hidden, heads, kv heads, ffn, tied)
    "paper_0.6b_4b": ("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B", (1024, 16, 8, 3072, True), (2560, 32, 8, 9728, True)),
    "paper_1.7b_8b": ("Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B", (2048, 16, 8, 6144, True), (4096, 32, 8, 12288, False)),
}


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trb.cli import CONF_DIR, to_schema

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_schema(hydra_compose("train", overrides=overrides), TrainConfig)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_preset_composes_the_paper_settings(name):
    student_id, teacher_id, _, _ = PRESETS[name]
    for method in METHODS:
        cfg = compose([f"experiment={name}", f"method={method}"])
        assert cfg.method.name == method
    cfg = compose([f"experiment={name}"])
    assert (cfg.student.path, cfg.teacher.path) == (student_id, teacher_id)
    assert cfg.dataset.hub_id == "open-thoughts/OpenThoughts3-1.2M" and cfg.dataset.train_size == 25600
    assert cfg.prompt.instruction_role == "system" and "\\boxed{}" in cfg.prompt.instruction
    o = cfg.optim
    assert (o.lr, o.beta1, o.beta2, o.weight_decay, o.grad_clip, o.warmup_steps, o.decay) == \
        (1e-5, 0.9, 0.999, 0.01, 1.0, 15, "constant")
    assert (cfg.prompts_per_step, cfg.rollout.n, cfg.steps) == (64, 4, 400)
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens, cfg.rollout.temperature) == (1024, 7168, 1.0)
    assert (cfg.loss.estimator, cfg.loss.k) == ("topk", 16)
    assert cfg.eval_every == 20 and cfg.eval_dataset.hub_id == "HuggingFaceH4/MATH-500"
    d = cfg.eval_decoding
    assert (d.greedy, d.n, d.temperature, d.top_p, d.max_new_tokens) == (False, 64, 1.0, 1.0, 8192)
    assert (cfg.blend.kind, cfg.blend.eps0, cfg.blend.horizon) == ("linear", 0.01, 25)
    # command-line values still win over the preset
    assert compose([f"experiment={name}", "steps=3"]).steps == 3


def shrunk_qwen3(shape, tok, layers=2, shrink=32):
    """A Qwen3 config with the real model's layout (GQA ratio, FFN ratio, tying) at 1/shrink width."""
    hidden, heads, kv, ffn, tied = shape
    return Qwen3Config(vocab_size=len(tok), hidden_size=hidden // shrink, intermediate_size=ffn // shrink,
                       num_hidden_layers=layers, num_attention_heads=heads // 4, num_key_value_heads=kv // 4,
                       head_dim=16, tie_word_embeddings=tied, max_position_embeddings=4096,
                       eos_token_id=tok.convert_tokens_to_ids(tok.eos_token), pad_token_id=tok.pad_token_id,
                       bos_token_id=None)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_preset_first_step_runs_on_shrunk_qwen3(name, tmp_path):
    import torch

    _, _, s_shape, t_shape = PRESETS[name]
    paths = {}
    for role, shape, eos in (("student", s_shape, "<|endoftext|>"), ("teacher", t_shape, "<|im_end|>")):
        tok = build_tokenizer(eos)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shrunk_qwen3(shape, tok))
        assert model.config.model_type == "qwen3"
        model.save_pretrained(tmp_path / role)
        tok.save_pretrained(tmp_path / role)
        paths[role] = tmp_path / role
    fixtures = Path(__file__).parent / "fixtures"
    run = tmp_path / "run"
    r = cli(["train", f"experiment={name}", f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
             f"dataset.path={fixtures / 'openthoughts_tiny.jsonl'}",
             f"eval_dataset.path={fixtures / 'math500_tiny.jsonl'}", "dataset.train_size=0",
             "steps=1", "prompts_per_step=2", "rollout.max_new_tokens=8", "eval_decoding.n=2",
             "eval_decoding.max_new_tokens=8", "eval_decoding.ks=[1,2]", "logger.kind=none", f"hydra.run.dir={run}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    step = [x for x in read_metrics(run) if "loss" in x]
    assert len(step) == 1 and math.isfinite(step[0]["loss"]) and step[0]["eps"] == 0.01
    assert step[0]["rollout/reward"] is None  # NaN (null in JSON): OpenThoughts prompts carry no gold answer
    evals = [x for x in read_metrics(run) if "eval/accuracy" in x]
    assert [x["step"] for x in evals] == [0, 1] and evals[0]["eval/samples_per_problem"] == 2
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["optim"]["lr"] == 1e-5 and cfg["rollout"]["n"] == 4 and cfg["prompt"]["instruction_role"] == "system"


# --------------------------------------------------------------------------------------------
# The toy testbed: two regimes, and the demo README describes
# --------------------------------------------------------------------------------------------


def test_weak_prefix_regime_is_one_override_and_builds():
    import dataclasses

    from trb.models import resolve_path

    robust, weak = compose([]), compose(["teacher=toy_clean"])
    assert (robust.teacher.path, weak.teacher.path) == ("toy:teacher", "toy:teacher_clean")
    a, b = dataclasses.asdict(robust), dataclasses.asdict(weak)
    a.pop("teacher"), b.pop("teacher")
    assert a == b  # the override changes the teacher and nothing else
    folders = [Path(resolve_path(c.teacher, "teacher")) for c in (robust, weak)]
    assert all((f / "model.safetensors").exists() for f in folders)
    assert (folders[0] / "model.safetensors").read_bytes() != (folders[1] / "model.safetensors").read_bytes()


def test_demo_settings_are_what_readme_says():
    cfg = compose([])
    readme = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()  # where the demo is told
    line = (f"`make demo` = `trb train` with the defaults: method {cfg.method.name} (blend {cfg.blend.kind}, "
            f"eps0 {cfg.blend.eps0:g}, horizon {cfg.blend.horizon}), {cfg.steps} steps x {cfg.prompts_per_step} "
            f"prompts x {cfg.rollout.n} rollouts, lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps}, "
            f"{cfg.optim.decay}), eval every {cfg.eval_every} steps on {cfg.dataset.eval_size} held-out problems "
            f"({'greedy' if cfg.eval_decoding.greedy else 'sampled'}, {cfg.eval_decoding.max_new_tokens} tokens)")
    assert line in readme, line
