"""`trb plan`: the memory model, its shapes, its exit codes and messages, and the check in trb train."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from helpers import cli
from trb.config import EngineConfig, StepConfig, TrainConfig
from trb.plan import ACT_AUTOCAST, ACT_FP32, Shape, plan_memory


def _saved_bytes_per_layer_token(cfg_kw: dict, autocast: bool) -> float:
    """Bytes the autograd graph saves per decoder layer and token (1- vs 2-layer difference), read with
    saved-tensor hooks; parameters and autocast's per-layer weight copies are not per token."""
    out = []
    tokens = 2 * 16
    for layers in (1, 2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen3Config(num_hidden_layers=layers, **cfg_kw)).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t, params=params, seen=seen):
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen[key] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, cfg_kw["vocab_size"], (2, 16))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.model(input_ids=ids, use_cache=False)
        out.append(sum(seen.values()))
    per_layer = out[1] - out[0]
    if autocast:
        s = Shape.from_config(model.config.to_dict())
        per_layer -= 2 * (s.layer_params - 2 * s.hidden - 2 * s.head_dim)  # bf16 copies of the layer's matrices
    return per_layer / tokens


@pytest.mark.parametrize("kw", [
    dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32)])
def test_activation_bytes_match_the_decoder_layer(kw):
    """The plan's per-token activation counts are what transformers' Qwen3 layer really saves."""
    kw = {**kw, "vocab_size": 97}
    shape = Shape.from_config(Qwen3Config(num_hidden_layers=1, **kw).to_dict())
    assert _saved_bytes_per_layer_token(kw, autocast=False) == shape.act_bytes(ACT_FP32)
    assert _saved_bytes_per_layer_token(kw, autocast=True) == shape.act_bytes(ACT_AUTOCAST)


def test_shipped_shapes_have_the_real_parameter_counts():
    from trb.plan import SHAPES

    counts = {p.stem: Shape.from_config(json.loads(p.read_text())).params for p in SHAPES.glob("*.json")}
    assert abs(counts["qwen3-0.6b"] / 1e9 - 0.596) < 0.005  # Qwen3-0.6B: 0.6B with tied embeddings
    assert abs(counts["qwen3-1.7b"] / 1e9 - 1.72) < 0.01
    assert abs(counts["qwen3-4b"] / 1e9 - 4.02) < 0.01
    assert abs(counts["qwen3-8b"] / 1e9 - 8.19) < 0.01
    # and the same as a model built from that config.json
    small = dict(json.loads((SHAPES / "qwen3-0.6b.json").read_text()), num_hidden_layers=1, vocab_size=1000)
    small.pop("_comment")
    model = AutoModelForCausalLM.from_config(Qwen3Config(**small))
    assert Shape.from_config(small).params == sum(p.numel() for p in model.parameters())


def test_kv_cache_bytes_of_the_paper_pair():
    """The issue's measured numbers: 224 KiB of float32 KV per token for Qwen3-0.6B (28 layers x 8 heads x 128)."""
    from trb.plan import SHAPES

    s = Shape.from_config(json.loads((SHAPES / "qwen3-0.6b.json").read_text()))
    assert s.kv_bytes(4) == 224 * 1024
    assert s.act_bytes(ACT_FP32) == 123048  # ~123 KB per token per layer at 0.6B width (float32)


def test_micro_batches_bound_the_update_phase():
    """At a fixed token budget the update's plan does not grow with the number of sequences."""
    base = TrainConfig()
    sizes = []
    for prompts in (8, 32):
        cfg = TrainConfig(prompts_per_step=prompts, train=StepConfig(micro_batch_tokens=2048))
        sizes.append(plan_memory(cfg, world_size=1, device_gb=80).total("update"))
    assert sizes[0] == sizes[1]
    unbounded = [plan_memory(TrainConfig(prompts_per_step=p), world_size=1, device_gb=80).total("update")
                 for p in (8, 32)]
    assert unbounded[1] > unbounded[0]
    assert base.train.micro_batch_tokens == 0


@pytest.mark.parametrize("preset", ["paper_0.6b_4b", "paper_1.7b_8b"])
def test_presets_plan_offline_and_every_phase_fits_on_8_h100(preset, tmp_path):
    r = cli(["plan", f"experiment={preset}", "plan.world_size=8", "plan.device_gb=80", f"output_dir={tmp_path}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {"world_size", "device_gb", "phases", "peak_gb", "fits"} <= plan.keys()
    assert plan["world_size"] == 8 and plan["device_gb"] == 80 and plan["fits"]
    assert set(plan["phases"]) == {"rollout", "student_rollout", "scoring", "update", "eval"}
    assert max(plan["phases"].values()) <= 80 - plan["reserve_gb"]
    assert "Traceback" not in r.stderr and "fits" in r.stdout
    # the decoder's knobs are what make the decoding phases fit: without them (every local row at
    # once, a float32 rollout copy, 64 eval rows) the plan refuses, naming the knobs
    r = cli(["plan", f"experiment={preset}", "plan.world_size=8", "plan.device_gb=80", "rollout.max_rows=0",
             "rollout.dtype=auto", "eval_decoding.batch=64", f"output_dir={tmp_path}"], cwd=tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert r.returncode == 1 and not plan["fits"] and "rollout" in plan["failing"]
    assert "error: the memory plan does not fit" in r.stdout and "rollout.max_rows" in r.stdout
    # and without the update's knobs the update alone would need hundreds of GB per device
    r = cli(["plan", f"experiment={preset}", "plan.world_size=8", "plan.device_gb=80", "train.micro_batch_tokens=0",
             "train.activation_checkpointing=false", "train.compute_dtype=float32", f"output_dir={tmp_path}"],
            cwd=tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["phases"]["update"] > 500


def test_row_bound_and_bf16_copy_bound_the_decoding_phases():
    from trb.config import RolloutConfig

    sizes = {}
    for prompts in (8, 32):
        for max_rows, dtype in ((0, "auto"), (8, "auto"), (8, "bfloat16")):
            cfg = TrainConfig(prompts_per_step=prompts, rollout=RolloutConfig(max_rows=max_rows, dtype=dtype),
                              engine=EngineConfig(kind="hf"))  # trb's decoder (vLLM's terms: the test below)
            p = plan_memory(cfg, world_size=1, device_gb=80)
            sizes[prompts, max_rows, dtype] = p.phases["student_rollout"]["student KV cache"]
    assert sizes[8, 8, "auto"] == sizes[32, 8, "auto"]  # flat in the local rows at a fixed bound
    assert sizes[32, 0, "auto"] == 4 * sizes[8, 0, "auto"]
    assert sizes[32, 8, "bfloat16"] == sizes[32, 8, "auto"] / 2


def test_plan_of_the_toy_default_fits_and_exits_0(tmp_path):
    r = cli(["plan", "engine=hf", "plan.device_gb=80", f"output_dir={tmp_path}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and plan["world_size"] == 1 and plan["peak_gb"] < 1
    assert "peak" in r.stdout and "fits" in r.stdout
    # with vLLM (engine=vllm, or auto where it is installed) the engine takes its share of the device
    r = cli(["plan", "engine=vllm", "plan.device_gb=80", f"output_dir={tmp_path / 'v'}"], cwd=tmp_path)
    plan = json.loads((tmp_path / "v" / "plan.json").read_text())
    assert plan["engine"] == "vllm" and any(k.startswith("vLLM engine (") and v == 24 for k, v in
                                            plan["terms"]["eval"].items())
    assert "vLLM KV space" in r.stdout


def test_plan_without_a_shape_names_the_setting(tmp_path):
    r = cli(["plan", "student.path=Nobody/not-cached", f"output_dir={tmp_path / 'p'}"], cwd=tmp_path)
    assert r.returncode == 2 and "student.shape" in r.stderr and "Traceback" not in r.stderr
    r = cli(["plan", "student.path=Nobody/not-cached", "student.shape=qwen3-9b", f"output_dir={tmp_path / 'p'}"],
            cwd=tmp_path)
    assert r.returncode == 2 and "qwen3-0.6b" in r.stderr  # lists the shipped shapes


def test_train_on_a_gpu_refuses_a_run_that_cannot_fit_before_loading_anything(tmp_path):
    """device=cuda runs the plan at start (here on a CPU machine: the check needs no GPU, only the
    shapes); the paper preset's 64 prompts in one process cannot fit, and nothing is loaded or written."""
    import time

    import shutil

    from trb.plan import SHAPES

    folders = []  # the paper pair's config.json only (no weights: the plan needs shapes, nothing is loaded)
    for role, shape in (("student", "qwen3-0.6b"), ("teacher", "qwen3-4b")):
        (tmp_path / role).mkdir()
        shutil.copy(SHAPES / f"{shape}.json", tmp_path / role / "config.json")
        folders.append(f"{role}.path={tmp_path / role}")
    out = tmp_path / "run"
    t0 = time.time()
    r = cli(["train", "experiment=paper_0.6b_4b", *folders, "dataset.path=unused.jsonl", "eval_dataset.path=x.jsonl",
             "device=cuda", "rollout.max_rows=0", f"output_dir={out}"], cwd=tmp_path)
    assert r.returncode == 2 and "the memory plan does not fit" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists() and time.time() - t0 < 60


def test_plan_vllm_engine_terms():
    """engine=vllm: the engine's budget in the student-only decoding phases instead of trb's KV cache and
    temporaries, a sleeping engine's estimate elsewhere (its full budget when engine.sleep=false)."""
    from trb.plan import ENGINE_ASLEEP_GB

    hf = plan_memory(TrainConfig(engine=EngineConfig(kind="hf")), world_size=1, device_gb=80)
    cfg = TrainConfig(engine=EngineConfig(kind="vllm", gpu_memory_utilization=0.25))
    vl = plan_memory(cfg, world_size=1, device_gb=80)
    assert hf.engine == "hf" and vl.engine == "vllm"
    for phase in ("student_rollout", "eval"):
        terms = vl.phases[phase]
        assert not any("KV cache" in k for k in terms) and abs(terms[next(k for k in terms if "vLLM" in k)] - 20) < 1e-9
    for phase in ("rollout", "scoring", "update"):
        assert abs(vl.total(phase) - hf.total(phase) - ENGINE_ASLEEP_GB) < 1e-9
    awake = plan_memory(TrainConfig(engine=EngineConfig(kind="vllm", gpu_memory_utilization=0.25, sleep=False)),
                        world_size=1, device_gb=80)
    assert abs(awake.total("update") - hf.total("update") - 20) < 1e-9
    kv = plan_memory(TrainConfig(engine=EngineConfig(kind="vllm", kv_cache_gb=2)), world_size=1, device_gb=80)
    term = next(v for k, v in kv.phases["eval"].items() if "vLLM" in k)
    assert term > 2 * 2**30 / 1e9 and any("KV space 2.1 GB" in n for n in kv.notes)
