"""`trb eval`: evaluate one or more checkpoints and write results.json, samples.jsonl, a curve.

    trb eval checkpoint=outputs/train/RUN                       # every checkpoint of a run
    trb eval checkpoint=DIR dataset=gsm8k prompt=chat_user decoding=paper_gsm8k
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from trb.checkpoint import checkpoint_step, list_checkpoints
from trb.config import EvalConfig, ModelConfig
from trb.data import DATA_FILE, fit_prompts, load_rows, question_key, render
from trb.download import eval_items, model_items, require_cached
from trb.evaluate import evaluate
from trb.grading import Grader
from trb.engine import check_temperature, make_engine, resolve_kind
from trb.models import ModelLoadError, load_model, prepare_run, resolve_path, stop_spec
from trb.tracking import Tracker


def resolve_checkpoints(spec) -> list[str]:
    """A model folder, a run dir (its checkpoints/step_* in order), toy:*, a hub id, or a list of these."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out: list[str] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if p.is_dir() and ((p / "checkpoints").is_dir() or not (p / "config.json").exists()):
            ckpts = list_checkpoints(p)
            if not ckpts:
                raise ModelLoadError(f"checkpoint={item!r} is a folder with neither a model (config.json) nor "
                                     f"checkpoints/step_*; point it at a model folder or a trb run dir")
            out += [str(c) for c in ckpts]
        else:
            out.append(str(item))
    return out


def trained_on(ckpt: str, rows: list[dict]) -> int:
    """How many of `rows` the trb run that saved `ckpt` trained on (its run dir's data.json); 0 when
    the checkpoint is not a trb run's."""
    record = Path(ckpt).expanduser().parent.parent / DATA_FILE
    try:
        keys = {k for _, k in json.loads(record.read_text())["train"]["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return sum(question_key(r["question"]) in keys for r in rows)


def required(cfg: EvalConfig) -> list:
    """The hub items (checkpoints given as hub ids, the dataset) this eval reads."""
    ckpts = cfg.checkpoint if isinstance(cfg.checkpoint, (list, tuple)) else [cfg.checkpoint]
    items = [it for c in ckpts for it in model_items(ModelConfig(path=str(c)), "checkpoint")]
    return items + eval_items(cfg.dataset)


def run_eval(cfg: EvalConfig, out_dir: Path | str, log=print) -> dict:
    require_cached(required(cfg))
    out_dir, device = prepare_run(out_dir, cfg.threads, cfg.device)
    checkpoints = resolve_checkpoints(cfg.checkpoint)
    rows = load_rows(cfg.dataset, cfg.seed, role="eval", log=log)
    n_seq = len(rows) * cfg.decoding.n
    kind = resolve_kind(cfg.engine.kind, device)
    check_temperature(kind, cfg.decoding.temperature, "decoding.temperature", cfg.decoding.greedy)
    log(f"trb eval: {len(checkpoints)} checkpoint(s) x {len(rows)} problems x n={cfg.decoding.n} on {device} "
        f"({'vLLM' if kind == 'vllm' else 'trb decoder'})")
    tracker = Tracker(cfg.logger, out_dir, dataclasses.asdict(cfg), name=out_dir.name)
    results = []
    from tqdm import tqdm

    with Grader(workers=cfg.grader_workers) as grader:
        for idx, ckpt in enumerate(checkpoints):
            mcfg = ModelConfig(path=ckpt, dtype=cfg.dtype)
            # with vLLM the transformers copy only gives the tokenizer, the stop ids and (to a running
            # engine) the weights: it stays on the CPU
            model, tok = load_model(mcfg, "checkpoint", device if kind == "hf" else torch.device("cpu"),
                                    setting="checkpoint")
            seen = trained_on(ckpt, rows)
            if seen:  # scored anyway (a user may mean it), but never silently
                log(f"warning: {seen} of {len(rows)} eval problems were training prompts of the run that saved "
                    f"{ckpt} (its data.json); its score on them is not held-out accuracy")
            rows_k, too_long = fit_prompts(tok, rows, cfg.prompt, cfg.max_prompt_tokens)
            if not rows_k:
                raise ValueError(f"no problem's prompt fits max_prompt_tokens={cfg.max_prompt_tokens}; raise it")
            if too_long:
                log(f"warning: {too_long} of {len(rows)} problems have prompts over max_prompt_tokens="
                    f"{cfg.max_prompt_tokens} tokens and are skipped (eval/skipped_too_long)")
            t0 = time.time()
            max_len = cfg.engine.max_model_len
            if kind == "vllm" and not max_len:  # the longest prompt kept + the completion cap
                max_len = cfg.decoding.max_new_tokens + max(len(p) for p in tok(
                    [render(tok, r["question"], cfg.prompt) for r in rows_k], add_special_tokens=False)["input_ids"])
            # a running engine gets this checkpoint's weights pushed (version None: always); a new one loads them
            engine = make_engine(kind, model, resolve_path(mcfg, "checkpoint"), model.dtype, cfg.engine, max_len,
                                 cfg.seed, device, trust_remote_code=mcfg.trust_remote_code, setting="checkpoint",
                                 log=log)
            with tqdm(total=n_seq, desc=Path(ckpt).name, dynamic_ncols=True, disable=None) as bar:
                metrics, samples = evaluate(engine, tok, rows_k, stop_spec(model, tok), grader, cfg.prompt,
                                            cfg.decoding, progress=bar.update)
            metrics["eval/seconds"] = time.time() - t0
            metrics["eval/skipped_too_long"] = too_long
            metrics["eval/trained_on"] = seen
            step = checkpoint_step(ckpt)
            if len(checkpoints) == 1:
                name = "samples.jsonl"
            else:
                name = f"samples_step_{step:06d}.jsonl" if step is not None else f"samples_{idx}.jsonl"
            with (out_dir / name).open("w") as f:
                for s in samples:
                    f.write(json.dumps(s) + "\n")
            results.append({"checkpoint": ckpt, "step": step, "samples": name, "metrics": metrics})
            tracker.log(metrics, step if step is not None else idx)
            cols = ["problem", "sample", "prompt", "completion", "extracted", "vote", "gold", "correct"]
            tracker.table("eval/samples", cols, [[s[c] for c in cols] for s in samples[:1000]],
                          step if step is not None else idx)  # one table per checkpoint
            ks = " ".join(f"pass@{k} {metrics[f'eval/pass@{k}']:.3f}±{metrics[f'eval/pass@{k}_stderr']:.3f} "
                          f"maj@{k} {metrics[f'eval/maj@{k}']:.3f}"
                          for k in cfg.decoding.ks)
            log(f"{ckpt}: {ks}  no-answer {metrics['eval/no_answer']:.3f}  truncated "
                f"{metrics['eval/truncated']:.3f}  timeouts {metrics['eval/grading_timeouts']}  "
                f"{metrics['eval/tokens_per_s']:.0f} tok/s")
            del model
        grading = dataclasses.asdict(grader.stats)
    out = {"config": dataclasses.asdict(cfg), "dataset": cfg.dataset.name, "problems": len(rows),
           "results": results, "grading": grading,
           "curve": [{"step": r["step"], "pass@1": r["metrics"]["eval/pass@1"]} for r in results]}
    (out_dir / "results.json").write_text(json.dumps(out, indent=1, default=str))
    tracker.finish()
    if len(results) > 1:
        log("step      pass@1")
        for r in results:
            log(f"{str(r['step']):>8}  {r['metrics']['eval/pass@1']:.3f}")
    log(f"results: {out_dir / 'results.json'}")
    return out


def run_eval_suite(suite: list[tuple[str, EvalConfig]], out_dir: Path | str, log=print) -> dict:
    """Several benchmarks (name, config) over the same checkpoints, each in <out_dir>/<name>/ as a
    `trb eval` of its own, then results.json with each benchmark's pass@1 and their unweighted
    average per checkpoint (the paper's table). Everything is checked before anything is decoded."""
    out_dir = Path(out_dir)
    require_cached([it for _, c in suite for it in required(c)])
    for _name, c in suite:  # every dataset readable, every checkpoint found, before the first decode
        load_rows(c.dataset, c.seed, role="eval", log=lambda m: None)
        resolve_checkpoints(c.checkpoint)
    longest = max(c.max_prompt_tokens + c.decoding.max_new_tokens for _, c in suite)
    per: dict[str, dict] = {}
    for name, c in suite:
        if not c.engine.max_model_len:  # one vLLM engine serves every benchmark
            c.engine.max_model_len = longest
        if c.logger.group is None:
            c.logger.group = out_dir.name
        log(f"== {name}")
        per[name] = run_eval(c, out_dir / name, log=log)
    names = list(per)
    table = []
    for i, r in enumerate(per[names[0]]["results"]):
        scores = {n: per[n]["results"][i]["metrics"]["eval/pass@1"] for n in names}
        table.append({"checkpoint": r["checkpoint"], "step": r["step"], "pass@1": scores,
                      "average": sum(scores.values()) / len(scores)})
    out = {"datasets": {n: {"problems": per[n]["problems"], "n": suite[k][1].decoding.n,
                            "results": f"{n}/results.json"} for k, n in enumerate(names)},
           "table": table}
    (out_dir / "results.json").write_text(json.dumps(out, indent=1, default=str))
    width = max(8, *(len(n) for n in names))
    labels = [str(r["step"]) if r["step"] is not None else Path(r["checkpoint"]).name for r in table]
    first = max(6, *(len(x) for x in labels))
    log(f"{'pass@1':<{first}}  " + "  ".join(f"{n:>{width}}" for n in [*names, "average"]))
    for label, row in zip(labels, table):
        log(f"{label:<{first}}  " + "  ".join(f"{row['pass@1'][n]:>{width}.3f}" for n in names) +
            f"  {row['average']:>{width}.3f}")
    log(f"results: {out_dir / 'results.json'}")
    return out
