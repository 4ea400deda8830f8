"""The toy default with and without a LoRA student (same seed, same data): accuracy at each eval, seconds
per step, peak memory (max RSS of the training process, a fresh process each), checkpoint size, trained
parameters and AdamW state. One run of each, one after the other on the same machine.

    python benchmarks/lora_toy.py [--steps 600] [--out benchmarks/results/lora_toy_cpu.json] [EXTRA_OVERRIDES...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

LORA = ["lora.rank=16", "lora.alpha=32", "optim.lr=3e-3"]  # the usual 10x lr of a LoRA run (toy full: 3e-4)


def run(name: str, extra: list[str], steps: int, root: Path, overrides: list[str]) -> dict:
    out = root / name
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "trb", "train", f"steps={steps}", "logger.kind=none",
           f"output_dir={out}", *extra, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step_s = [x["time/step"] for x in recs if "time/step" in x]
    ckpt = max((out / "checkpoints").iterdir())
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    adam = sum(t.numel() * t.element_size() for v in state.values() for t in v.values() if torch.is_tensor(t)
               and t.dim() > 0)
    return {"extra": extra, "evals": {x["step"]: x["eval/accuracy"] for x in recs if "eval/accuracy" in x},
            "seconds_per_step": sum(step_s) / len(step_s), "wall_seconds": time.time() - t0,
            "max_rss_mb": rss_kb / 1024, "checkpoint_mb": size / 1e6, "weights_mb": weights / 1e6,
            "adam_state_mb": adam / 1e6, "trained_params": sum(v["exp_avg"].numel() for v in state.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="benchmarks/results/lora_toy_cpu.json")
    ap.add_argument("--root", default="/tmp/trb_lora_toy")
    args, overrides = ap.parse_known_args()
    root = Path(args.root)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    res = {"machine": f"{platform.node()} ({os.cpu_count()} vCPU), torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "overrides": overrides,
           "full": run("full", [], args.steps, root, overrides),
           "lora": run("lora", LORA, args.steps, root, overrides)}
    Path(args.out).write_text(json.dumps(res, indent=1))
    f, lo = res["full"], res["lora"]
    print(f"{'':<22}{'full':>12}{'LoRA r16':>12}{'ratio':>8}")
    for key in ("seconds_per_step", "max_rss_mb", "checkpoint_mb", "adam_state_mb", "trained_params"):
        print(f"{key:<22}{f[key]:>12.4g}{lo[key]:>12.4g}{lo[key] / f[key]:>8.3f}")
    print("eval accuracy (step: full / LoRA):", ", ".join(f"{k}: {f['evals'][k]:.3f} / {lo['evals'][k]:.3f}"
                                                          for k in f["evals"]))


if __name__ == "__main__":
    main()
