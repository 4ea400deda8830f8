"""`trb bench data`: host memory of loading a large prompt file, as trb does it (datasets, memory-
mapped Arrow, only the selected rows materialised) and as a whole-file reader would (every line
parsed, then sliced: trb's loader before the data rework), each in a fresh process.

The file has OpenThoughts3's layout (a `conversations` list whose first turn is the prompt and
second a long answer), so most of its bytes are never needed. Peak RSS (VmHWM) counts the file
pages mapped from the Arrow cache, which the kernel can drop at will; private (anonymous) memory
is what the process itself holds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_file(path: Path, mb: int, seed: int = 0) -> int:
    """An OpenThoughts3-shaped jsonl of about `mb` MB; returns its rows."""
    rng = random.Random(seed)
    size, n = 0, 0
    with path.open("w") as f:
        while size < mb * 1_000_000:
            a, b = rng.randint(1, 10**6), rng.randint(1, 10**6)
            q = f"Problem {n}: compute {a} + {b}. " + "x" * rng.randint(100, 600)
            answer = "Let me think. " * rng.randint(60, 250) + f"\\boxed{{{a + b}}}"
            turns = [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]
            line = json.dumps({"conversations": turns}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


_CHILD = r"""
import json, sys, time
mode, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
def status():
    out = {}  # VmHWM: peak resident; RssAnon: private memory now; RssFile: file pages mapped now
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(line.split()[1]) / 1024
    return out
t0 = time.time()
from trb.config import DatasetConfig
from trb import data
base = status()
cfg = DatasetConfig(name="bench", path=path, question_field="conversations.0.value", answer_field=None,
                    answer_kind="plain", train_size=size, eval_size=0)
if mode == "trb":
    import datasets  # noqa: F401  (its import is part of the baseline below)
    base = status()
    sel = data._train_selection(data._Source(cfg, None, "dataset.path"), cfg, 0, "dataset.path", [], set())
    rows = sel.rows
else:  # the whole file parsed, every row adapted, then the first `size` rows kept
    records = [json.loads(line) for line in open(path).read().splitlines() if line.strip()]
    rows = [data._adapt_one(r, cfg, path, i) for i, r in enumerate(records)][:size]
end = status()
print(json.dumps({"rows": len(rows), "seconds": time.time() - t0, "base": base, "end": end}))
"""


def _measure(mode: str, path: Path, size: int, cache: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_DATASETS_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, str(path), str(size)], capture_output=True, text=True,
                       env=env, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"bench child failed: {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"mode": mode, "rows": out["rows"], "seconds": round(out["seconds"], 2),
            "peak_rss_mb": round(out["end"]["VmHWM"]), "baseline_rss_mb": round(out["base"]["VmHWM"]),
            "anon_end_mb": round(out["end"]["RssAnon"]), "file_mapped_end_mb": round(out["end"]["RssFile"]),
            "private_growth_mb": round(out["end"]["RssAnon"] - out["base"]["RssAnon"])}


def bench_data(mb: int = 200, sizes=(1000, 25600), workdir: Path | None = None, log=print) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="trb_bench_data_"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"prompts_{mb}mb.jsonl"
    t0 = time.time()
    n = write_file(path, mb)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB, {n} rows) in {time.time() - t0:.0f} s")
    cache = workdir / "datasets_cache"
    rows = []
    for size in sizes:
        for mode, fresh in (("trb", True), ("trb", False), ("whole_file", False)):
            if mode == "trb" and fresh and cache.exists():
                import shutil

                shutil.rmtree(cache)  # the first read converts the file into Arrow
            r = _measure(mode, path, size, cache)
            r.update(train_size=size, first_read=fresh)
            rows.append(r)
            log(f"{mode:<10} train_size {size:>6} {'first read' if fresh else 'cached    '}  peak RSS "
                f"{r['peak_rss_mb']:>5} MB (after imports {r['baseline_rss_mb']} MB); private memory +"
                f"{r['private_growth_mb']} MB; mapped file pages {r['file_mapped_end_mb']} MB  {r['seconds']:.1f} s")
    by = {(r["mode"], r["train_size"], r["first_read"]): r for r in rows}
    ratios = {f"whole_file/trb peak at {s}": round(by[("whole_file", s, False)]["peak_rss_mb"] /
                                                    by[("trb", s, False)]["peak_rss_mb"], 2) for s in sizes}
    for s in sizes:
        ratios[f"whole_file/trb private growth at {s}"] = round(by[("whole_file", s, False)]["private_growth_mb"] /
                                                              max(1, by[("trb", s, False)]["private_growth_mb"]), 1)
    ratios[f"trb peak {sizes[-1]}/{sizes[0]}"] = round(by[("trb", sizes[-1], False)]["peak_rss_mb"] /
                                                       by[("trb", sizes[0], False)]["peak_rss_mb"], 2)
    log("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    from trb.bench import machine

    return {"kind": "data", "pair": f"{mb}mb", "file_mb": round(path.stat().st_size / 1e6), "file_rows": n,
            "rows": rows, "ratios": ratios, "machine": machine()}
