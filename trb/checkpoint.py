"""Checkpoints: HF folders (model + tokenizer, loadable with from_pretrained) + trainer state.

Written atomically: into a temporary sibling folder, fsynced, then renamed into place, so a
folder named step_NNNNNN is always complete.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trb.errors import RunStopped, UserError
from trb.tracking import metrics_records


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
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "rng": rng_state(),
        **(extra or {}),
    }
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if state_dict:
            dtype = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
            conf = json.loads((tmp / "config.json").read_text())
            conf.update({k: dtype for k in ("dtype", "torch_dtype") if k in conf})
            (tmp / "config.json").write_text(json.dumps(conf, indent=2))
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")
        share_like_umask(tmp)
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as err:  # a full or read-only disk: no partial folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(final, err) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _umask() -> int:
    try:  # read, not set: os.umask would change it for every thread for a moment
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(folder: Path) -> None:
    """Files readable as the umask allows (0644 under the usual 022, 0664 under 002): safetensors writes
    its weights 0600, which teammates on a shared file system could not read."""
    mode = 0o666 & ~_umask()
    for p in Path(folder).rglob("*"):
        if p.is_file():
            try:
                os.chmod(p, mode)
            except OSError:  # a file system without modes (some FUSE / CIFS / object-store mounts): as written
                return


def checkpoint_step(path) -> int | None:
    """The step of a checkpoint folder named step_NNNNNN (as save_checkpoint names them), else None."""
    m = re.fullmatch(r"step_(\d+)", Path(str(path).rstrip("/")).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp"))


class CheckpointWriteError(RunStopped):
    def __init__(self, final: Path, err: Exception):
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left" in str(err)
        super().__init__(f"could not write the checkpoint {final}: {'the disk is full' if full else reason}; "
                         f"no partial checkpoint was left behind and the earlier checkpoints are intact (free space "
                         f"or use another output_dir, then run the same command to resume)")


class CheckpointReadError(UserError):
    """A checkpoint that cannot be loaded safely or at all."""


def rng_state() -> dict:
    """Every RNG state as tensors and plain numbers (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state saved next to a checkpoint's weights (optimizer, RNG states, step, ...),
    read with torch.load(weights_only=True): tensors, numbers, strings and containers only, so a
    planted pickle payload is refused instead of run."""
    path = Path(ckpt) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointReadError(
            f"{path} holds objects other than tensors and plain data, so trb does not load it (a pickled payload "
            f"would run code; checkpoints of trb before this version stored numpy RNG states this way): "
            f"{str(err).splitlines()[0][:160]}") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointReadError(f"{path} cannot be read ({str(err).splitlines()[0][:160]}): the checkpoint is "
                                  f"corrupt or truncated; resume from another one (resume=PATH) or move it away") \
            from None


def restore_rng(state: dict) -> None:
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = rng["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))


# ---------------------------------------------------------------------------------------------
# resume bookkeeping
# ---------------------------------------------------------------------------------------------

# memory knobs (train: micro-batches, checkpointing, compute dtype; plan) may change on resume: a run that ran
# out of memory continues with a smaller budget
_RESUMABLE_IGNORED = ("resume", "overwrite", "keep_last", "log_every", "save_every", "logger", "output_dir", "threads",
                      "device", "parallel", "train", "plan", "eval_overlap")
# ... and inside sections: how rollouts are decoded (the same tokens: per-row noise) and evaluated
_RESUMABLE_IGNORED_FIELDS = {"rollout": ("max_rows", "dtype", "static_cache", "compile_step", "compile_search"),
                             "eval_decoding": ("batch",), "lora": ("save_merged",)}


def _comparable(config: dict) -> dict:
    out = {k: v for k, v in config.items() if k not in _RESUMABLE_IGNORED}
    for section, fields in _RESUMABLE_IGNORED_FIELDS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in fields}
    return out


def truncate_metrics(run_dir: Path, step: int, final: bool) -> list[dict]:
    """Drop metrics.jsonl records written after the checkpoint at `step` (they are recomputed);
    return the eval records kept. The eval at `step` itself was logged before that checkpoint was
    saved, unless `step` is the final one (its eval runs after the loop)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    keep, evals = [], []
    for rec, line in metrics_records(path, with_lines=True):
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

