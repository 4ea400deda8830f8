"""Checkpoints: HF folders (model + tokenizer, loadable with from_pretrained) + trainer state.

Written atomically: into a temporary sibling folder, fsynced, then renamed into place, so a
folder named step_NNNNNN is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer_state: dict | None = None,
                    extra: dict | None = None, keep_last: int = 0, state_dict: dict | None = None) -> Path:
    """Write run_dir/checkpoints/step_{step:06d}/ and return it; keep_last > 0 then deletes all
    but the newest keep_last complete checkpoints.

    optimizer_state: the full optimizer state keyed by parameter names
    (trb.distributed.optimizer_state), so a run can resume with another number of processes.
    state_dict: weights to save instead of the model's own (the float32 master weights gathered
    from FSDP2 shards when the model is a bf16 rollout copy); config.json then records their dtype."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if state_dict:
        dtype = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
        conf = json.loads((tmp / "config.json").read_text())
        conf.update({k: dtype for k in ("dtype", "torch_dtype") if k in conf})
        (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    tokenizer.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        **(extra or {}),
    }
    torch.save(state, tmp / "trainer_state.pt")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp"))


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state saved next to a checkpoint's weights (optimizer, RNG states, step, ...)."""
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=False)


def restore_rng(state: dict) -> None:
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


# ---------------------------------------------------------------------------------------------
# resume bookkeeping
# ---------------------------------------------------------------------------------------------

# memory knobs (train: micro-batches, checkpointing, compute dtype; plan) may change on resume: a run that ran
# out of memory continues with a smaller budget
_RESUMABLE_IGNORED = ("resume", "keep_last", "logger", "output_dir", "threads", "device", "parallel", "train", "plan")
# ... and inside sections: how rollouts are decoded (the same tokens: per-row noise) and evaluated
_RESUMABLE_IGNORED_FIELDS = {"rollout": ("max_rows", "dtype", "static_cache", "compile_step", "compile_search"),
                             "eval_decoding": ("batch",)}


def _comparable(config: dict) -> dict:
    out = {k: v for k, v in config.items() if k not in _RESUMABLE_IGNORED}
    for section, fields in _RESUMABLE_IGNORED_FIELDS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in fields}
    return out


def find_resume(cfg, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: resume=PATH, or (auto) the run dir's last complete one.

    A run dir whose train_config.json describes a different run (in any key but those of
    _RESUMABLE_IGNORED, and the decoding knobs of _RESUMABLE_IGNORED_FIELDS) is refused rather than
    mixed with this one."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume).expanduser()
        if not (path / "trainer_state.pt").exists():
            raise FileNotFoundError(f"resume={cfg.resume!r} is not a trb checkpoint (no trainer_state.pt); give a "
                                    f"run_dir/checkpoints/step_NNNNNN folder, resume=auto or resume=never")
        return path
    ckpts = [c for c in list_checkpoints(run_dir) if (c / "trainer_state.pt").exists()]
    if not ckpts:
        return None
    saved_path = run_dir / "train_config.json"
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        now = json.loads(json.dumps(dataclasses.asdict(cfg)))
        saved, now = _comparable(saved), _comparable(now)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(f"the run dir {run_dir} holds a different run (its train_config.json differs in: "
                             f"{', '.join(diff)}); use another output_dir / hydra.run.dir, or resume=never to "
                             f"overwrite it")
    return ckpts[-1]


def truncate_metrics(run_dir: Path, step: int, final: bool) -> list[dict]:
    """Drop metrics.jsonl records written after the checkpoint at `step` (they are recomputed);
    return the eval records kept. The eval at `step` itself was logged before that checkpoint was
    saved, unless `step` is the final one (its eval runs after the loop)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    keep, evals = [], []
    for line in path.read_text().splitlines():
        if not line:
            continue
        rec = json.loads(line)
        is_eval = "eval/accuracy" in rec
        if (is_eval and (rec["step"] < step or (rec["step"] == step and not final))) or \
                (not is_eval and rec["step"] < step):
            keep.append(line)
            if is_eval:
                evals.append(rec)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)
    return evals
