"""`trb report`: compare training runs across methods and seeds.

    trb report outputs/multirun/2026-11-28_10-47-34            # a sweep dir (its run dirs)
    trb report RUN_A RUN_B ... --out outputs/report/mine

Runs are found as directories holding metrics.jsonl and train_config.json (the given paths and
their children). They are grouped by method (TRB runs also by schedule when several schedules
are present), aligned by step, and summarised as:
  accuracy.png   eval accuracy vs step: mean over seeds, band = min..max (or +-1 std)
  schedule.png   eps, mean beta* and realised KL(mu || pi_S) over the first steps (seed means)
  report.md      a markdown table: method, seeds, accuracy at step 0, final and best accuracy
                 (mean +- std over seeds), mean accuracy over the eval points, rollout reward
  report.json    the same numbers, per group and per run
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from trb.tracking import read_metrics

METHOD_ORDER = ("opd", "trb", "fixed", "skd", "veto", "temp_warmup", "sft_warmup")


def find_runs(paths: list[Path | str]) -> list[Path]:
    """Run dirs among `paths` and their children (a run dir has metrics.jsonl + train_config.json)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: give trb report run dirs or a sweep dir")
        cands = [p] + sorted(c for c in p.iterdir() if c.is_dir()) if p.is_dir() else []
        out += [c for c in cands if (c / "metrics.jsonl").exists() and (c / "train_config.json").exists()]
    if not out:
        where = ", ".join(map(str, paths))
        raise FileNotFoundError(f"no run dirs (with metrics.jsonl and train_config.json) in {where}")
    return list(dict.fromkeys(out))


def load_run(path: Path) -> dict:
    cfg = json.loads((path / "train_config.json").read_text())
    blend = cfg.get("blend", {}).get("kind", "none")
    method = cfg.get("method", {}).get("name") or {"none": "opd", "constant": "fixed"}.get(blend, "trb")
    recs = read_metrics(path)
    evals = {r["step"]: r["eval/accuracy"] for r in recs if r.get("eval/accuracy") is not None}
    steps = {r["step"]: r for r in recs if "loss" in r}
    return {"path": str(path), "method": method, "schedule": blend, "seed": cfg.get("seed"), "evals": evals,
            "steps": steps}


def _label(run: dict, trb_schedules: set[str]) -> str:
    if run["method"] == "trb" and len(trb_schedules) > 1:
        return f"trb ({run['schedule']})"
    return run["method"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per group: seeds, aligned eval steps, per-step mean/std/min/max, final/best/mean accuracy."""
    trb_schedules = {r["schedule"] for r in runs if r["method"] == "trb"}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_label(r, trb_schedules)].append(r)

    def order(label: str) -> tuple:
        base = label.split(" ")[0]
        return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)

    out: dict[str, dict] = {}
    for label in sorted(groups, key=order):
        members = sorted(groups[label], key=lambda r: (r["seed"] is None, r["seed"]))
        common = sorted(set.intersection(*(set(r["evals"]) for r in members)))
        curve = []
        for s in common:
            vals = [r["evals"][s] for r in members]
            m, sd = _mean_std(vals)
            curve.append({"step": s, "mean": m, "std": sd, "min": min(vals), "max": max(vals)})
        finals = [r["evals"][common[-1]] for r in members] if common else []
        bests = [max(r["evals"][s] for s in common) for r in members] if common else []
        avgs = [statistics.fmean(r["evals"][s] for s in common) for r in members] if common else []
        rewards = [statistics.fmean(x["rollout/reward"] for x in r["steps"].values()
                                    if x.get("rollout/reward") is not None)
                   for r in members if any(x.get("rollout/reward") is not None for x in r["steps"].values())]
        out[label] = {
            "runs": [r["path"] for r in members],
            "seeds": [r["seed"] for r in members],
            "curve": curve,
            "start": _mean_std([r["evals"][common[0]] for r in members]) if common else None,
            "final_step": common[-1] if common else None,
            "final": _mean_std(finals) if finals else None,
            "best": _mean_std(bests) if bests else None,
            "mean_over_evals": _mean_std(avgs) if avgs else None,
            "rollout_reward": _mean_std(rewards) if rewards else None,
            "per_run": [{"path": r["path"], "seed": r["seed"], "final": f, "best": b}
                        for r, f, b in zip(members, finals, bests)],
        }
    return out


def _fmt(ms) -> str:
    return "-" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def markdown_table(summary: dict[str, dict]) -> str:
    lines = ["| method | seeds | step 0 | final (step) | best | mean over evals | rollout reward |",
             "|---|---|---|---|---|---|---|"]
    for label, g in summary.items():
        start = "-" if g["start"] is None else f"{g['start'][0]:.3f}"
        lines.append(f"| {label} | {len(g['seeds'])} | {start} | {_fmt(g['final'])} ({g['final_step']}) | "
                     f"{_fmt(g['best'])} | {_fmt(g['mean_over_evals'])} | {_fmt(g['rollout_reward'])} |")
    return "\n".join(lines)


def plot_accuracy(summary: dict[str, dict], path: Path, band: str = "minmax") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, g) in enumerate(summary.items()):
        if not g["curve"]:
            continue
        xs = [c["step"] for c in g["curve"]]
        mean = [c["mean"] for c in g["curve"]]
        if band == "std":
            lo = [c["mean"] - c["std"] for c in g["curve"]]
            hi = [c["mean"] + c["std"] for c in g["curve"]]
        else:
            lo, hi = [c["min"] for c in g["curve"]], [c["max"] for c in g["curve"]]
        (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={len(g['seeds'])})", color=f"C{i % 10}")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("eval accuracy")
    ax.set_title(f"eval accuracy: mean over seeds, band = {'±1 std' if band == 'std' else 'min..max'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def early_series(runs: list[dict], key: str, early: int) -> list[tuple[int, float]]:
    """Seed-mean of a per-step metric over the first `early` steps."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for s, rec in r["steps"].items():
            if s < early and rec.get(key) is not None and math.isfinite(rec[key]):
                by_step[s].append(rec[key])
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]


def plot_schedule(runs_by_label: dict[str, list[dict]], path: Path, early: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("eps", "eps"), ("beta/mean", "mean beta*"), ("kl_mu_student/mean", "realised KL(mu || pi_S), mean")]
    colour = {label: f"C{i % 10}" for i, label in enumerate(runs_by_label)}  # one colour per group everywhere
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, keys):
        for label, runs in runs_by_label.items():
            series = early_series(runs, key, early)
            if series and any(v != 0 for _, v in series):  # groups that are 0 throughout are left out
                ax.plot([s for s, _ in series], [v for _, v in series], label=label, color=colour[label])
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: list[Path | str], out_dir: Path | str | None = None, band: str = "minmax", early: int = 50,
           log=print) -> dict:
    """Write report.md, report.json, accuracy.png and schedule.png; print the table."""
    if band not in ("minmax", "std"):
        raise ValueError(f"--band must be minmax or std; got {band!r}")
    run_dirs = find_runs(paths)
    unfinished = [p for p in run_dirs if not (p / "summary.json").exists()]
    if unfinished and len(unfinished) < len(run_dirs):
        log(f"skipping {len(unfinished)} unfinished run(s) (no summary.json): {', '.join(p.name for p in unfinished)}")
        run_dirs = [p for p in run_dirs if p not in unfinished]
    runs = [load_run(p) for p in run_dirs]
    summary = summarise(runs)
    if out_dir is None:
        first = Path(paths[0])
        out_dir = first if len(paths) == 1 and first not in run_dirs else Path("outputs/report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary)
    label_of = {p: label for label, g in summary.items() for p in g["runs"]}
    runs_by_label = {label: [r for r in runs if label_of[r["path"]] == label] for label in summary}  # same order
    plot_accuracy(summary, out / "accuracy.png", band)
    plot_schedule(runs_by_label, out / "schedule.png", early)
    (out / "report.md").write_text(
        f"# trb report\n\n{len(runs)} runs from {', '.join(map(str, paths))}\n\n{table}\n\n"
        "Accuracy: the runs' periodic eval (`eval/accuracy`), aligned on the steps every run of a group "
        "evaluated; final = last common step; best = each run's best over those steps; mean +- sample std over "
        "seeds. Rollout reward: mean over all steps of the fraction of training rollouts graded correct.\n\n"
        "![accuracy](accuracy.png)\n\n![schedule](schedule.png)\n")
    (out / "report.json").write_text(json.dumps({"paths": list(map(str, paths)), "groups": summary}, indent=1))
    log(table)
    log(f"wrote {out / 'report.md'}, {out / 'accuracy.png'}, {out / 'schedule.png'}, {out / 'report.json'}")
    return summary
