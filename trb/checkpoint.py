"""Checkpoints: HF folders (model + tokenizer, loadable with from_pretrained) + trainer state.

Written atomically: into a temporary sibling folder, fsynced, then renamed into place, so a
folder named step_NNNNNN is always complete.
"""

from __future__ import annotations

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
                    extra: dict | None = None, keep_last: int = 0) -> Path:
    """Write run_dir/checkpoints/step_{step:06d}/ and return it; keep_last > 0 then deletes all
    but the newest keep_last complete checkpoints.

    optimizer_state: the full optimizer state keyed by parameter names
    (trb.distributed.optimizer_state), so a run can resume with another number of processes."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
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
