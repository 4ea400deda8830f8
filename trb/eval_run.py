"""`trb eval`: evaluate one or more checkpoints and write results.json, samples.jsonl, a curve.

    trb eval checkpoint=outputs/train/RUN                       # every checkpoint of a run
    trb eval checkpoint=DIR dataset=gsm8k prompt=chat_user decoding=paper_gsm8k
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from trb.checkpoint import checkpoint_step, list_checkpoints
from trb.config import EvalConfig, LoggerConfig, ModelConfig
from trb.lora import adapter_base, is_adapter_folder
from trb.data import DATA_FILE, fit_prompts, load_rows, question_key, render
from trb.download import eval_items, model_items, require_cached
from trb.evaluate import evaluate
from trb.grading import Grader
from trb.engine import check_temperature, make_engine, resolve_kind
from trb.models import (ModelLoadError, check_folder, check_positions, load_model, pick_device, prepare_run,
                        resolve_path, stop_spec)
from trb.rundir import Claim, RunDirError, lock_dir, write_atomic
from trb.tracking import metrics_records
from trb.tracking import Tracker


def resolve_checkpoints(spec) -> list[str]:
    """A model folder (a LoRA adapter folder too), a run dir (its checkpoints/step_* in order), toy:*, a hub id,
    or a list of these."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out: list[str] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if p.is_dir() and ((p / "checkpoints").is_dir() or not ((p / "config.json").exists()
                                                                 or is_adapter_folder(p))):
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


EVAL_FILES = ("eval_config.json", "results.json", "metrics.jsonl")
# settings that do not change what an eval computes: an eval dir resumed with other values is the same eval
_EVAL_BOOKKEEPING = ("checkpoint", "output_dir", "logger", "threads", "device", "grader_workers", "overwrite",
                     "datasets")


def _comparable(config: dict) -> dict:
    out = {k: v for k, v in config.items() if k not in _EVAL_BOOKKEEPING}
    out["engine"] = {"kind": (config.get("engine") or {}).get("kind")}  # the rest are memory / speed knobs
    out["decoding"] = {k: v for k, v in (config.get("decoding") or {}).items() if k != "batch"}
    return out


def checkpoint_id(ckpt: str) -> str:
    """What a checkpoint is, for reusing its results: the folder and its files' sizes and times (a
    checkpoint rewritten in place is another one)."""
    folder = Path(resolve_path(ModelConfig(path=ckpt), "checkpoint")).expanduser()
    if not folder.is_dir():
        return f"hub:{ckpt}"
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".json"))
    return hashlib.sha256(json.dumps([str(folder.resolve()), files]).encode()).hexdigest()[:16]


def claim_eval_dir(cfg: EvalConfig, out_dir: Path) -> tuple[Claim, dict[str, dict]]:
    """Lock an eval's output dir and decide what it holds: nothing (a new eval), the same eval (its
    evaluated checkpoints are reused), or something else (refused unless overwrite=true, which moves
    it aside). Returns the claim and the reusable records by checkpoint id."""
    claim = lock_dir(out_dir)
    try:
        if (out_dir / "train_config.json").exists():
            raise RunDirError(f"output_dir {out_dir} holds a trb train run: an eval writes into a dir of its own "
                              f"(e.g. output_dir={out_dir}/eval_<dataset>)")
        files = [n for n in EVAL_FILES if (out_dir / n).exists()]
        files += sorted(p.name for p in out_dir.glob("samples*.jsonl"))
        if files and cfg.overwrite:
            claim.aside = files
            return claim, {}
        if not files:
            return claim, {}
        aside = f"overwrite=true to move the old eval aside to {out_dir.name}.replaced-<time>/"
        if not (out_dir / "eval_config.json").exists():
            raise RunDirError(f"output_dir {out_dir} holds eval files ({', '.join(files)}) but no eval_config.json, "
                              f"so trb cannot tell which eval they are: use another output_dir, or {aside}")
        try:
            saved = json.loads((out_dir / "eval_config.json").read_text())
        except (OSError, ValueError) as err:
            raise RunDirError(f"{out_dir / 'eval_config.json'} cannot be read ({err}); use another output_dir, or "
                              f"{aside}") from None
        a, b = _comparable(saved), _comparable(json.loads(json.dumps(dataclasses.asdict(cfg))))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise RunDirError(f"output_dir {out_dir} holds another eval (its eval_config.json differs in: "
                              f"{', '.join(diff)}); use another output_dir, or {aside}")
        done = {r["checkpoint_id"]: r for r in metrics_records(out_dir / "metrics.jsonl")
                if r.get("checkpoint_id") and (out_dir / str(r.get("samples"))).is_file()}
        return claim, done
    except BaseException:
        claim.abort()
        raise


def train_runs_of(checkpoints: list) -> dict | None:
    """The trb train run all these checkpoints come from ({run_dir, group, wandb_run_id}), else None. Its
    W&B group is the one this eval joins (job_type eval), next to the train run."""
    from trb.train import train_group

    dirs = set()
    for ckpt in checkpoints:
        parent = Path(str(ckpt)).parent
        if parent.name != "checkpoints" or not (parent.parent / "train_config.json").is_file():
            return None
        dirs.add(parent.parent.resolve())
    if len(dirs) != 1:
        return None
    (run,) = dirs
    try:
        saved = json.loads((run / "train_config.json").read_text()).get("logger") or {}
        logger = LoggerConfig(**{k: v for k, v in saved.items() if k in ("group", "kind")})
    except (OSError, ValueError, TypeError):
        return None
    run_id = run / "wandb_run_id"
    return {"run_dir": str(run), "group": train_group(logger, run),
            "wandb_run_id": run_id.read_text().strip() if run_id.is_file() else None}


def run_eval(cfg: EvalConfig, out_dir: Path | str, log=print) -> dict:
    """Evaluate every checkpoint of cfg into out_dir (a dir of this eval's own: locked; an earlier run
    of the same eval there is continued, its evaluated checkpoints reused)."""
    require_cached(required(cfg))
    checkpoints = resolve_checkpoints(cfg.checkpoint)
    for ckpt in checkpoints:  # every checkpoint readable and whole before the first is decoded
        check_folder(ckpt, "checkpoint")
    rows = load_rows(cfg.dataset, cfg.seed, role="eval", log=log)
    device = pick_device(cfg.device)
    kind = resolve_kind(cfg.engine.kind, device)
    check_temperature(kind, cfg.decoding.temperature, "decoding.temperature", cfg.decoding.greedy)
    out_dir = Path(out_dir)
    claim, done = claim_eval_dir(cfg, out_dir)

    def commit() -> None:
        """The first write, once the first checkpoint to decode has loaded and passed its checks (a
        refusal before it leaves the dir as it was)."""
        if claim.fd is None or getattr(commit, "done", False):
            return
        commit.done = True
        moved = claim.commit()
        if moved is not None:
            log(f"overwrite=true: the previous eval's files moved to {moved}")
        write_atomic(out_dir / "eval_config.json", json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        for tmp in out_dir.glob("*.tmp"):  # a write cut by a kill: never a record
            tmp.unlink()
        if (out_dir / "metrics.jsonl").exists():  # only whole records whose samples are there (a torn line goes)
            write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in done.values()))

    try:
        return _evaluate_all(cfg, out_dir, checkpoints, rows, kind, done, commit, log)
    except BaseException:
        if not getattr(commit, "done", False):
            claim.abort()
        raise
    finally:
        claim.release()


def _evaluate_all(cfg: EvalConfig, out_dir: Path, checkpoints: list[str], rows: list[dict], kind: str,
                  done: dict, commit, log) -> dict:
    out_dir, device = prepare_run(out_dir, cfg.threads, cfg.device)
    n_seq = len(rows) * cfg.decoding.n
    ids = [checkpoint_id(c) for c in checkpoints]
    todo = [c for c, i in zip(checkpoints, ids) if i not in done]
    reused = len(checkpoints) - len(todo)
    log(f"trb eval: {len(checkpoints)} checkpoint(s) x {len(rows)} problems x n={cfg.decoding.n} on {device} "
        f"({'vLLM' if kind == 'vllm' else 'trb decoder'})" +
        (f"; {reused} already evaluated here with these settings (reused)" if reused else ""))
    if not todo:
        commit()
    tracker = None
    results = []
    from tqdm import tqdm

    with Grader(workers=cfg.grader_workers) as grader:
        for idx, (ckpt, cid) in enumerate(zip(checkpoints, ids)):
            step = checkpoint_step(ckpt)
            if cid in done:
                rec = done[cid]
                results.append({"checkpoint": ckpt, "step": step, "samples": rec["samples"],
                                "metrics": {k: v for k, v in rec.items() if k.startswith("eval/")}})
                continue
            mcfg = ModelConfig(path=ckpt, dtype=cfg.dtype)
            # with vLLM the transformers copy only gives the tokenizer, the stop ids and (to a running
            # engine) the weights: it stays on the CPU
            try:
                model, tok = load_model(mcfg, "checkpoint", device if kind == "hf" else torch.device("cpu"),
                                        setting="checkpoint")
            except ModelLoadError as err:
                if results:  # the earlier checkpoints' results are kept: a rerun here continues after the fix
                    raise ModelLoadError(f"{err} (the {len(results)} checkpoint(s) before it are evaluated and kept "
                                         f"in {out_dir}; a rerun there without it, or after fixing it, continues)") \
                        from None
                raise
            seen = trained_on(ckpt, rows)
            if seen:  # scored anyway (a user may mean it), but never silently
                log(f"warning: {seen} of {len(rows)} eval problems were training prompts of the run that saved "
                    f"{ckpt} (its data.json); its score on them is not held-out accuracy")
            rows_k, too_long = fit_prompts(tok, rows, cfg.prompt, cfg.max_prompt_tokens)
            if not rows_k:
                raise ValueError(f"no problem's prompt fits max_prompt_tokens={cfg.max_prompt_tokens}; raise it")
            longest = max(len(p) for p in tok([render(tok, r["question"], cfg.prompt) for r in rows_k],
                                              add_special_tokens=False)["input_ids"])
            check_positions([model], longest + cfg.decoding.max_new_tokens,
                            "the longest prompt + decoding.max_new_tokens")
            commit()
            if tracker is None:
                trained = train_runs_of(checkpoints)
                tracker = Tracker(cfg.logger, out_dir, {**dataclasses.asdict(cfg), "train_run": trained},
                                  name=out_dir.name,
                                  group=cfg.logger.group or (trained["group"] if trained else None))
            if too_long:
                log(f"warning: {too_long} of {len(rows)} problems have prompts over max_prompt_tokens="
                    f"{cfg.max_prompt_tokens} tokens and are skipped (eval/skipped_too_long)")
            t0 = time.time()
            max_len = cfg.engine.max_model_len
            if kind == "vllm" and not max_len:  # the longest prompt kept + the completion cap
                max_len = cfg.decoding.max_new_tokens + longest
            # a running engine gets this checkpoint's weights pushed (version None: always); a new one loads them
            # (a LoRA adapter: a new engine starts from its base's folder and gets the merged weights pushed)
            adapter = is_adapter_folder(ckpt)
            engine = make_engine(kind, model, adapter_base(ckpt) if adapter else resolve_path(mcfg, "checkpoint"),
                                 model.dtype, cfg.engine, max_len, cfg.seed, device, weights_from_path=not adapter,
                                 trust_remote_code=mcfg.trust_remote_code, setting="checkpoint", log=log)
            with tqdm(total=n_seq, desc=Path(ckpt).name, dynamic_ncols=True, disable=None) as bar:
                metrics, samples = evaluate(engine, tok, rows_k, stop_spec(model, tok), grader, cfg.prompt,
                                            cfg.decoding, progress=bar.update)
            metrics["eval/seconds"] = time.time() - t0
            metrics["eval/skipped_too_long"] = too_long
            metrics["eval/trained_on"] = seen
            if len(checkpoints) == 1:
                name = "samples.jsonl"
            else:
                name = f"samples_step_{step:06d}.jsonl" if step is not None else f"samples_{cid[:8]}.jsonl"
            write_atomic(out_dir / name, "".join(json.dumps(s) + "\n" for s in samples))
            results.append({"checkpoint": ckpt, "step": step, "samples": name, "metrics": metrics})
            # the metrics line is the checkpoint's record (written after its samples file is whole): a killed
            # eval rerun in this dir reuses it
            tracker.log(metrics, step if step is not None else idx,
                        record={"checkpoint": ckpt, "checkpoint_id": cid, "samples": name})
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
    write_atomic(out_dir / "results.json", json.dumps(out, indent=1, default=str))
    if tracker is not None:
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
        for ckpt in resolve_checkpoints(c.checkpoint):
            check_folder(ckpt, "checkpoint")
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
