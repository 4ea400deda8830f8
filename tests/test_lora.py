"""LoRA students (lora.rank > 0, PEFT): only the adapter trains; its gradient is autograd's through the
merged weights; micro-batches change nothing; checkpoints are PEFT's format and reload to the same
log-probs; resume is bit-exact; trb eval scores adapters; trb plan counts the adapter's parameters."""

import copy
import json

import pytest
import torch
from torch.nn.utils import parametrize

from helpers import prompts, save_pair, tiny_model, train_config
from test_microbatch import Capture, _rel, _rollout, _run
from trb.config import LoraConfig
from trb.rollout import Sampler

pytest.importorskip("peft")
LORA = LoraConfig(rank=3, alpha=6.0)


def _lora_student(student, seed=0):
    """student with LoRA layers (float64), B drawn at random (PEFT starts it at 0: no gradient to A)."""
    from trb import lora

    model = copy.deepcopy(student)
    wrapper = lora.apply_lora(model, LORA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, wrapper


class _LowRank(torch.nn.Module):
    """weight -> weight + scale * B @ A: a linear's merged weight as a function of the adapter's A and B."""

    def __init__(self, a, b, scale):
        super().__init__()
        self.a, self.b, self.scale = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()), scale

    def forward(self, w):
        return w + self.scale * self.b @ self.a


def _merged_reference(student, lora_model):
    """A plain copy of `student` whose adapted linears compute their weight as W + s * B @ A from leaf A, B
    (torch parametrization): autograd through the merged weights. {lora param name: its leaf}."""
    ref = copy.deepcopy(student).requires_grad_(False)
    leaves = {}
    modules = dict(ref.named_modules())
    for name, layer in lora_model.named_modules():
        if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {}):
            low = _LowRank(layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
                           layer.scaling["default"])
            parametrize.register_parametrization(modules[name], "weight", low)
            leaves[f"{name}.lora_A.default.weight"] = low.a
            leaves[f"{name}.lora_B.default.weight"] = low.b
    return ref, leaves


def _adapter_grads(run, ro, names):
    from trb.losses import Target
    from trb.train import distill_loss, update

    target = Target(tuple(run.stop.stop_ids), run.stop.emit_id, run.method.veto_b(0))
    up = update(run, ro, distill_loss(run, ro, target), 0)
    return dict(zip(names, run.opt.grads)), up


@pytest.mark.parametrize("estimator", ["topk", "full"])
def test_adapter_gradient_is_autograd_through_the_merged_weights(models, estimator):
    """float64: trb's update of a LoRA student gives A and B the gradient that autograd gives them through
    W + s * B @ A in a plain copy of the model (1e-9 relative); micro-batched equals one-shot; the frozen
    base gets none."""
    student, teacher, tok = models
    lora_model, _ = _lora_student(student)
    ro = _rollout(lora_model, teacher, tok, Sampler("trb", eps=0.05))  # the same rollout for every run

    def grads(model, budget=0, leaves=None):
        run = _run(model, teacher, tok, budget=budget, estimator=estimator)
        if leaves is None:
            named = [(n, p) for n, p in run.objective.student.named_parameters() if p.requires_grad]
        else:
            named = list(leaves.items())
        run.opt = Capture([p for _, p in named])
        return _adapter_grads(run, ro, [n for n, _ in named])

    g_lora, up = grads(lora_model)
    assert set(g_lora) == {n for n, p in lora_model.named_parameters() if ".lora_" in n}  # only the adapter
    assert all(p.grad is None for n, p in lora_model.named_parameters() if ".lora_" not in n)
    ref, leaves = _merged_reference(student, lora_model)
    g_ref, up_ref = grads(ref, leaves=leaves)
    assert set(g_ref) == set(g_lora)
    names = sorted(g_lora)
    assert _rel([g_lora[n] for n in names], [g_ref[n] for n in names]) < 1e-9
    assert abs(up.loss - up_ref.loss) < 1e-6 * max(1.0, abs(up_ref.loss))
    assert max(float(g.abs().max()) for g in g_lora.values()) > 0
    lengths = (ro.prompt_mask.sum(1) + ro.response_mask.sum(1)).tolist()
    g_mb, up_mb = grads(lora_model, budget=max(max(lengths) + 2, 42))
    assert up_mb.micro_batches >= 5
    assert _rel([g_mb[n] for n in names], [g_lora[n] for n in names]) < 1e-6


def test_merged_weights_are_pefts_merge_under_the_plain_names(models):
    """plain_weights (the vLLM push, lora.save_merged) = PEFT's merge_and_unload, name for name, tied head
    included; the rollout copy of a LoRA student samples exactly what the merged model samples."""
    from trb import lora

    student, _, tok = models
    lora_model, wrapper = _lora_student(student, seed=3)
    mine = dict(lora.plain_weights(lora_model))
    plain_names = [n for n, _ in student.named_parameters(remove_duplicate=False)]
    assert list(mine) == plain_names
    merged = copy.deepcopy(wrapper).merge_and_unload()
    for name, p in merged.named_parameters(remove_duplicate=False):
        assert torch.allclose(mine[name], p, rtol=0, atol=1e-12), name
    ids, mask = prompts(tok)
    with torch.no_grad():
        a = lora_model(ids, attention_mask=mask, use_cache=False).logits
        b = merged(ids, attention_mask=mask, use_cache=False).logits
    assert (a - b).abs().max() < 1e-10


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("models"))


def _cfg(pair, **kw):
    return train_config(pair, 20, 2, 8, **{"steps": 3, "save_every": 1, "eval_every": 0,
                                            "lora": LoraConfig(rank=4, alpha=8.0), **kw})


def _quiet(*_a, **_k):
    return None


@pytest.mark.slow
def test_lora_run_checkpoints_resume_reload_and_eval(pair, tmp_path):
    """A LoRA run of the tiny pair: PEFT-format checkpoints (no full weights), AdamW state for the adapter
    only, the base weights untouched; the adapter reloads with PeftModel.from_pretrained to the training
    model's log-probs, and its merged folder to the same; stopping after step 1 and resuming gives the
    adapter bytes of the uninterrupted run; trb eval scores the adapter checkpoints and the merged one alike."""
    import subprocess
    import sys

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trb.train import train

    s, _ = pair
    run = tmp_path / "run"
    out = train(_cfg(pair, lora=LoraConfig(rank=4, alpha=8.0, save_merged=True)), run, log=_quiet)
    ckpt = run / "checkpoints" / "step_000003"
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "merged"} <= set(names)
    assert "model.safetensors" not in names
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.model.") and ".lora_" in k for k in adapter)
    base = AutoModelForCausalLM.from_pretrained(s)
    trained = out["student"]
    n_adapter = sum(p.numel() for n, p in trained.named_parameters() if ".lora_" in n)
    assert sum(t.numel() for t in adapter.values()) == n_adapter
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) == len(adapter) and sum(v["exp_avg"].numel() for v in state.values()) == n_adapter
    for name, p in base.named_parameters():  # frozen: the base weights are the student's as loaded
        key = name if name in dict(trained.named_parameters()) else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(dict(trained.named_parameters())[key], p), name
    from transformers import AutoTokenizer

    ids, mask = prompts(AutoTokenizer.from_pretrained(s))
    with torch.no_grad():
        want = torch.log_softmax(trained(ids, attention_mask=mask, use_cache=False).logits.double(), -1)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s), ckpt).eval()
        got = torch.log_softmax(peft_model(ids, attention_mask=mask, use_cache=False).logits.double(), -1)
        merged = AutoModelForCausalLM.from_pretrained(ckpt / "merged").eval()
        got_merged = torch.log_softmax(merged(ids, attention_mask=mask, use_cache=False).logits.double(), -1)
        before = torch.log_softmax(base(ids, attention_mask=mask, use_cache=False).logits.double(), -1)
    assert (got - want).abs().max() < 1e-5 and (got_merged - want).abs().max() < 1e-5
    assert float((want - before).abs().max()) > 1e-4  # the adapter changed the model

    # resume: 1 step, stopped, then the same run to 3 steps: the same adapter bytes
    split = tmp_path / "split"
    train(_cfg(pair, steps=1), split, log=_quiet)
    resumed = train(_cfg(pair), split, log=_quiet)
    assert resumed["resumed_from"].endswith("step_000001")
    whole = tmp_path / "whole"
    train(_cfg(pair), whole, log=_quiet)
    a = load_file(split / "checkpoints" / "step_000003" / "adapter_model.safetensors")
    b = load_file(whole / "checkpoints" / "step_000003" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # trb eval: the run dir (adapter checkpoints, base from adapter_config.json) and the merged folder
    def evaluate(spec, out_dir):
        r = subprocess.run([sys.executable, "-m", "trb", "eval", f"checkpoint={spec}", "dataset.eval_size=6",
                            "decoding.max_new_tokens=8", "logger.kind=none", f"output_dir={out_dir}"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out_dir / "results.json").read_text())["results"]

    by_adapter = evaluate(run, tmp_path / "ev")
    assert [r["step"] for r in by_adapter] == [1, 2, 3]
    by_merged = evaluate(ckpt / "merged", tmp_path / "ev_merged")
    one = evaluate(ckpt, tmp_path / "ev_one")  # one adapter checkpoint folder
    assert one[0]["metrics"]["eval/pass@1"] == by_merged[0]["metrics"]["eval/pass@1"]
    samples = [json.loads(x)["completion"] for x in (tmp_path / "ev" / by_adapter[-1]["samples"]).read_text()
               .splitlines()]
    merged_samples = [json.loads(x)["completion"] for x in (tmp_path / "ev_merged" / "samples.jsonl").read_text()
                      .splitlines()]
    assert samples == merged_samples and by_adapter[-1]["metrics"]["eval/pass@1"] == \
        by_merged[0]["metrics"]["eval/pass@1"]


def test_the_adapter_names_its_base_as_given(tmp_path, monkeypatch):
    """A student loaded from a relative path: adapter_config.json names the base trb passes (absolute), not
    the relative path PEFT would record, so trb eval finds it from any directory."""
    from transformers import AutoModelForCausalLM

    from trb import lora

    model, _ = tiny_model()
    model.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained("base")
    wrapper = lora.apply_lora(loaded, LORA, base_path=str(tmp_path / "base"))
    wrapper.peft_config["default"].save_pretrained(str(tmp_path / "adapter"))
    assert lora.adapter_base(tmp_path / "adapter") == str(tmp_path / "base")
    with pytest.raises(ValueError, match="lora.target_modules: qkv_proj"):
        lora.apply_lora(tiny_model()[0], LoraConfig(rank=2, target_modules=["qkv_proj"]))


def test_plan_counts_the_adapter_not_the_student(tmp_path):
    """trb plan's LoRA parameter count is PEFT's own (a tiny config, counted after injection); AdamW state and
    gradients scale with it while the frozen student weights stay."""
    import dataclasses

    from trb import lora
    from trb.config import ModelConfig, TrainConfig
    from trb.plan import Shape, lora_params, plan_memory

    model, _ = tiny_model(hidden=32, layers=2)
    for cfg in (LoraConfig(rank=4), LoraConfig(rank=8, target_modules=["q_proj", "v_proj"])):
        m = copy.deepcopy(model)
        lora.apply_lora(m, cfg)
        peft_count = sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n)
        assert lora_params(Shape.from_config(model.config.to_dict()), cfg) == peft_count
    base = TrainConfig(student=ModelConfig(path="x", shape="qwen3-0.6b"),
                       teacher=ModelConfig(path="y", shape="qwen3-4b"))
    full = plan_memory(base, world_size=1, device_gb=80)
    with_lora = plan_memory(dataclasses.replace(base, lora=LoraConfig(rank=16)), world_size=1, device_gb=80)
    n = lora_params(Shape.from_config(json.loads(_shape_file("qwen3-0.6b"))), LoraConfig(rank=16))
    terms_full, terms = full.phases["update"], with_lora.phases["update"]
    assert terms["student weights"] == terms_full["student weights"]
    assert terms["AdamW state"] == pytest.approx(2 * n * 4 / 1e9, rel=1e-3)
    assert terms["gradients"] == pytest.approx(n * 4 / 1e9, rel=1e-3)
    assert with_lora.peak_gb < full.peak_gb


def _shape_file(name: str) -> str:
    from trb.plan import SHAPES

    return (SHAPES / f"{name}.json").read_text()
