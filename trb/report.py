"""`trb report`: compare training runs across methods, settings and seeds.

    trb report outputs/multirun/2026-11-28_10-47-34            # a sweep dir (its run dirs)
    trb report RUN_A RUN_B ... --out outputs/report/mine --baseline opd

Runs are directories holding metrics.jsonl and train_config.json (the given paths and their
children). Grouping and statistics:

  groups     runs are grouped by every config key whose value differs among them (method, blend
             kind, eps0, horizon, lr, ...), except the seed, the keys that only say where or how a
             run is kept, shown or fitted in memory (BOOKKEEPING), and knobs the run's method never
             reads (blend.* without a blend, another method's method.*); 1 and 1.0 are one value.
             Runs without an eval are skipped (named). A group's label names only the keys that tell it
             apart (`trb blend.eps0=0.005 blend.horizon=15`). Seeds come from each run's config; a
             group holding two runs with one seed is an error.
  per run    start = eval accuracy at the first eval step the compared runs share (step 0 for fresh
             runs); final = at the last shared step; best = the best of the shared steps after step
             0 (trained checkpoints only, never the untrained model); AUC = area under the
             accuracy-vs-step curve over the shared steps (trapezoid) divided by their span, i.e.
             the step-averaged accuracy.
  per group  mean over seeds; "± std" (sample std) only with >= 2 seeds.
  vs base    for each group, the baseline group (`--baseline`, a method name) with the same values of
             every differing key outside method.* and blend.*; runs paired by seed (one seed = the
             same prompts in the same order, the same start); mean paired difference with a
             two-sided 95% Student-t interval over the seed pairs (n - 1 degrees of freedom), over
             the eval steps both groups share (none without a shared trained step; unpaired runs are
             named). The eval
             problems are held fixed: the interval covers run-to-run variation, not the choice of
             problems (whose binomial standard error the caption gives).

Files: report.md (caption + table), report.json (every number, per group and per run),
accuracy.png (one panel per group against the baseline), difference.png (paired difference to the
baseline vs step, 95% band), schedule.png (eps, mean beta*, realised KL(mu || pi_S) with each
group's eps drawn as its bound, the teacher's log-prob of the sampled tokens).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from trb.errors import UserError
from trb.tracking import read_metrics

METHOD_ORDER = ("opd", "trb", "fixed", "skd", "veto", "temp_warmup", "sft_warmup")
# keys that never change what a run computes: where it is written, how it is logged or checkpointed,
# how its resources are planned; device / threads change float rounding only
BOOKKEEPING = ("output_dir", "resume", "overwrite", "logger", "log_every", "save_every", "keep_last", "plan",
               "threads", "device", "parallel", "train.micro_batch_tokens", "train.activation_checkpointing",
               "rollout.max_rows", "rollout.static_cache", "rollout.compile_step", "rollout.compile_search",
               "eval_decoding.batch")
# method knobs only their own method reads (a sweep over one must not split the other methods' runs)
_KNOB_OWNER = {"method.skd_": "skd", "method.veto_": "veto", "method.temp_": "temp_warmup", "method.sft_": "sft_warmup"}
# the keys that make a method what it is: a group's baseline may differ from it only in these
METHOD_KEYS = ("method", "blend")
KEY_ORDER = ("method.name", "blend.kind")  # label order: these first, the rest alphabetically


class ReportError(UserError):
    """A set of runs that cannot be compared as given; the message says why."""


# 97.5% quantiles of Student's t for 1..30 degrees of freedom, then at 40, 60, 120
_T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]
_T975_TAIL = ((40, 2.021075), (60, 2.000298), (120, 1.979930))


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom (table; between rows the row
    below, which is larger: the interval errs on the wide side)."""
    if df < 1:
        raise ValueError("t quantile needs df >= 1")
    if df <= 30:
        return _T975[df - 1]
    below = _T975[-1]
    for cut, q in _T975_TAIL:
        if df == cut:
            return q
        if df < cut:
            return below
        below = q
    return below


def t_interval(xs: list[float]) -> dict:
    """Mean and two-sided 95% t-interval of a sample (n >= 2 for an interval)."""
    n = len(xs)
    mean = statistics.fmean(xs) if xs else None
    if n < 2:
        return {"n": n, "mean": mean, "lo": None, "hi": None, "sd": None}
    sd = statistics.stdev(xs)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


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
    return list(dict.fromkeys(c.resolve() for c in out))  # one run named twice is one run


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text (hashable, comparable)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def _bookkeeping(key: str) -> bool:
    return any(key == b or key.startswith(b + ".") for b in BOOKKEEPING)


def _unused(key: str, flat: dict) -> bool:
    """A knob this run's method never reads: blend.* without a blend, another method's method.*."""
    if key.startswith("blend.") and key != "blend.kind" and flat.get("blend.kind", "none") == "none":
        return True
    owner = next((m for prefix, m in _KNOB_OWNER.items() if key.startswith(prefix)), None)
    return owner is not None and flat.get("method.name") != owner


def canon(v):
    """One form per value, so 1 and 1.0 (a Python-built config next to a YAML one) are one setting."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    return int(v) if float(v).is_integer() else float(v)


def _ckey(v) -> str:
    return json.dumps(canon(v))


def load_run(path: Path) -> dict:
    try:
        cfg = json.loads((path / "train_config.json").read_text())
    except ValueError as err:
        raise ValueError(f"{path / 'train_config.json'} is not valid JSON ({err}): restore it, or leave that run "
                         f"out of the report") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path / 'train_config.json'} is not a trb train_config.json")
    flat = {k: canon(v) for k, v in flatten(cfg).items() if not _bookkeeping(k)}
    blend = flat.get("blend.kind", "none")
    if not flat.get("method.name"):  # configs from before the method group: name it from the blend
        flat["method.name"] = {"none": "opd", "constant": "fixed"}.get(blend, "trb")
    flat = {k: v for k, v in flat.items() if not _unused(k, flat)}
    recs = read_metrics(path)
    evals = {r["step"]: r["eval/accuracy"] for r in recs if r.get("eval/accuracy") is not None}
    eval_meta = next((r for r in reversed(recs) if r.get("eval/accuracy") is not None), {})
    steps = {r["step"]: r for r in recs if "loss" in r}
    return {"path": str(path), "config": flat, "method": flat["method.name"], "seed": flat.pop("seed", None),
            "evals": evals, "steps": steps, "eval_problems": eval_meta.get("eval/problems"), "raw_config": cfg}


def _key_order(key: str) -> tuple:
    return (KEY_ORDER.index(key) if key in KEY_ORDER else len(KEY_ORDER), key)


def differing_keys(runs: list[dict]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]}, key=_key_order)
    return [k for k in keys if len({_ckey(r["config"].get(k)) for r in runs}) > 1]


def _show(v) -> str:
    return "null" if v is None else (repr(v) if isinstance(v, float) else str(v))  # repr: no two floats alike


def group_runs(runs: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """{label: runs} over every differing key, and those keys. Labels name only the keys that
    split the runs agreeing with the group on the keys named before (so `opd` does not carry the
    eps0 that only the trb runs vary)."""
    keys = differing_keys(runs)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        cells[tuple(_ckey(r["config"].get(k)) for k in keys)].append(r)
    labelled: dict[str, list[dict]] = {}
    for members in cells.values():
        cohort, parts = runs, []
        for k in keys:
            mine = members[0]["config"].get(k)
            if len({_ckey(r["config"].get(k)) for r in cohort}) > 1:
                parts.append(_show(mine) if k == "method.name" else f"{k}={_show(mine)}")
                cohort = [r for r in cohort if _ckey(r["config"].get(k)) == _ckey(mine)]
        label = " ".join(parts) or "all runs"
        if label in labelled:  # cannot happen with canonical values; never merge two groups silently
            raise ReportError(f"two groups of runs print as {label!r}; report them separately")
        labelled[label] = members
    for label, members in labelled.items():
        seeds = [r["seed"] for r in members]
        if None in seeds:
            raise ReportError(f"group {label!r}: {members[seeds.index(None)]['path']} has no seed in its "
                              "train_config.json")
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            same = [r["path"] for r in members if r["seed"] == dup[0]]
            raise ReportError(f"group {label!r} holds {len(same)} runs with seed {dup[0]} and the same config "
                              f"({', '.join(same)}): report one of them, or give them different seeds")
    return labelled, keys


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def shared_steps(runs: list[dict]) -> list[int]:
    return sorted(set.intersection(*(set(r["evals"]) for r in runs))) if runs else []


def run_metrics(run: dict, steps: list[int]) -> dict | None:
    """start / final / best (trained checkpoints only) / AUC of one run over the given eval steps."""
    if not steps:
        return None
    accs = [run["evals"][s] for s in steps]
    trained = [a for s, a in zip(steps, accs) if s > 0]  # never the untrained model
    if len(steps) > 1:
        area = sum((b - a) * (x + y) / 2 for a, b, x, y in zip(steps, steps[1:], accs, accs[1:]))
        auc = area / (steps[-1] - steps[0])
    else:
        auc = accs[0]
    return {"start": accs[0], "final": accs[-1], "best": max(trained) if trained else None, "auc": auc}


def _mean_std(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def find_baseline(label: str, groups: dict[str, list[dict]], keys: list[str], baseline: str) -> str | None:
    """The baseline group for `label`: method `baseline`, the same values outside method.* / blend.*."""
    others = [k for k in keys if k.split(".")[0] not in METHOD_KEYS]
    mine = groups[label][0]["config"]
    cands = [lab for lab, rs in groups.items() if rs[0]["method"] == baseline
             and all(_ckey(rs[0]["config"].get(k)) == _ckey(mine.get(k)) for k in others)]
    return cands[0] if len(cands) == 1 else None


def summarise(runs: list[dict], baseline: str | None = "opd") -> dict[str, dict]:
    """Per group: seeds, the eval curve (per-step mean/std/min/max), start/final/best/AUC over seeds,
    and the paired differences to the baseline group."""
    groups, keys = group_runs(runs)

    def order(label: str) -> tuple:
        m = groups[label][0]["method"]
        return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), label)

    out: dict[str, dict] = {}
    for label in sorted(groups, key=order):
        members = sorted(groups[label], key=lambda r: r["seed"])
        common = shared_steps(members)
        curve = []
        for s in common:
            vals = [r["evals"][s] for r in members]
            curve.append({"step": s, "mean": statistics.fmean(vals),
                          "std": statistics.stdev(vals) if len(vals) > 1 else None,
                          "min": min(vals), "max": max(vals)})
        per_run = [{"path": r["path"], "seed": r["seed"], **(run_metrics(r, common) or {})} for r in members]
        rewards = [statistics.fmean(x["rollout/reward"] for x in r["steps"].values()
                                    if x.get("rollout/reward") is not None)
                   for r in members if any(x.get("rollout/reward") is not None for x in r["steps"].values())]
        g = {"runs": [r["path"] for r in members], "seeds": [r["seed"] for r in members],
             "method": members[0]["method"], "config": {k: members[0]["config"].get(k) for k in keys},
             "curve": curve, "final_step": common[-1] if common else None, "per_run": per_run,
             "rollout_reward": _mean_std(rewards)}
        for m in ("start", "final", "best", "auc"):
            g[m] = _mean_std([p.get(m) for p in per_run])
        out[label] = g
    if baseline:
        for label, g in out.items():
            base = find_baseline(label, groups, keys, baseline)
            g["baseline"] = base
            g["vs_baseline"] = None if base is None or base == label else paired(groups[label], groups[base])
    return out


def paired(runs: list[dict], base: list[dict]) -> dict:
    """Paired-by-seed differences (run - baseline) of final / best / AUC over the steps all of them
    share, and of the accuracy at every shared step, each with a 95% t-interval."""
    by_seed = {r["seed"]: r for r in base}
    pairs = [(r, by_seed[r["seed"]]) for r in sorted(runs, key=lambda r: r["seed"]) if r["seed"] in by_seed]
    steps = shared_steps([x for p in pairs for x in p])
    if len(steps) < 2 or steps[-1] <= 0:  # no trained step in common: nothing to compare
        pairs, steps = [], []
    res: dict = {"seeds": [r["seed"] for r, _ in pairs], "steps": steps, "unpaired": len(runs) - len(pairs)}
    metrics = [(run_metrics(r, steps), run_metrics(b, steps)) for r, b in pairs]
    for m in ("final", "best", "auc"):
        diffs = [mr[m] - mb[m] for mr, mb in metrics if mr[m] is not None and mb[m] is not None]
        res[m] = {**t_interval(diffs), "diffs": diffs}
    res["curve"] = [{"step": s, **t_interval([r["evals"][s] - b["evals"][s] for r, b in pairs])} for s in steps]
    return res


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _ms(x: dict | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x['mean']:.{digits}f}" + (f" ± {x['std']:.{digits}f}" if x.get("std") is not None else "")


def _diff(d: dict | None) -> str:
    if d is None or d.get("mean") is None:
        return "-"
    if d.get("lo") is None:
        return f"{d['mean']:+.3f} (n={d['n']}, no interval)"
    mark = " *" if d["lo"] > 0 or d["hi"] < 0 else ""
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{mark}"


def eval_caption(runs: list[dict]) -> str:
    """What the accuracy is: which problems, how many, which decoding (from the runs' configs)."""
    descs = []
    for r in runs:
        cfg = r["raw_config"]
        ds = cfg.get("eval_dataset") or cfg.get("dataset") or {}
        dec = cfg.get("eval_decoding") or {}
        n = int(r["eval_problems"] or ds.get("eval_size") or 0) or "?"
        how = "greedy" if dec.get("greedy", True) else (f"sampled at T={dec.get('temperature')}, "
                                                        f"top-p {dec.get('top_p')}, n={dec.get('n')}")
        kind = "held-out toy" if ds.get("name") == "toy" and not ds.get("path") else ds.get("name", "?")
        descs.append(f"{n} {kind} problems ({ds.get('split', 'test')} split), {how}, "
                     f"up to {dec.get('max_new_tokens')} new tokens")
    uniq = list(dict.fromkeys(descs))
    nums = [r["eval_problems"] for r in runs if r["eval_problems"]]
    se = f"; binomial standard error at most {50 / math.sqrt(min(nums)):.1f} points per eval" if nums else ""
    return "Eval: " + " | ".join(uniq) + se


def markdown_table(summary: dict[str, dict], baseline: str | None = "opd") -> str:
    have_base = baseline and any(g.get("vs_baseline") for g in summary.values())
    head = ["group", "seeds", "start", "final (step)", "best (trained)", "AUC"]
    if have_base:
        head += [f"Δ final vs {baseline} [95% CI]", f"Δ best vs {baseline}", f"Δ AUC vs {baseline}"]
    head.append("rollout reward")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, g in summary.items():
        row = [label, str(len(g["seeds"])), _ms(g["start"]), f"{_ms(g['final'])} ({g['final_step']})",
               _ms(g["best"]), _ms(g["auc"])]
        if have_base:
            v = g.get("vs_baseline")
            if label == g.get("baseline"):
                row += ["(baseline)"] * 3
            else:
                row += [_diff(v and v["final"]), _diff(v and v["best"]), _diff(v and v["auc"])]
                if v and v["unpaired"] and v["final"]["n"]:
                    row[-3] += f" (n={v['final']['n']} of {len(g['seeds'])})"
        row.append(_ms(g["rollout_reward"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    return plt, MaxNLocator


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, max(1, n))
    return math.ceil(n / cols), cols


def _panels(n: int, height: float):
    """A grid of n small panels sharing both axes, with integer step ticks: (plt, fig, axes in order)."""
    plt, MaxNLocator = _plt()
    rows, cols = _grid(n)
    fig, grid = plt.subplots(rows, cols, figsize=(3.6 * cols, height * rows + 0.7), sharex=True, sharey=True,
                             squeeze=False)
    for j in range(n, rows * cols):
        grid[j // cols][j % cols].set_visible(False)
    for c in range(cols):  # the lowest panel of every column carries the step axis
        r = max(r for r in range(rows) if r * cols + c < n) if c < n else 0
        grid[r][c].xaxis.set_tick_params(labelbottom=True)
        grid[r][c].set_xlabel("optimiser step")
    axes = [grid[j // cols][j % cols] for j in range(n)]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return plt, fig, grid, axes


def _save_panels(plt, fig, grid, path: Path, ylabel: str, caption: str) -> None:
    for row in grid:
        row[0].set_ylabel(ylabel)
    fig.text(0.01, 0.005, caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.06 if len(grid) == 1 else 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _band(curve: list[dict], band: str):
    if band == "std":
        return ([c["mean"] - (c["std"] or 0) for c in curve], [c["mean"] + (c["std"] or 0) for c in curve])
    return [c["min"] for c in curve], [c["max"] for c in curve]


def plot_accuracy(summary: dict[str, dict], path: Path, band: str, caption: str) -> bool:
    """Small multiples: one panel per group, its seed mean and band, the baseline's in grey."""
    labels = [lab for lab, g in summary.items() if g["curve"]]
    if not labels:
        return False
    plt, fig, grid, axes = _panels(len(labels), 2.9)
    for ax, label in zip(axes, labels):
        g = summary[label]
        colour = f"C{list(summary).index(label) % 10}"  # the group's colour in every plot
        base = summary.get(g.get("baseline") or "")
        if base and base is not g and base["curve"]:
            xs = [c["step"] for c in base["curve"]]
            ax.plot(xs, [c["mean"] for c in base["curve"]], color="0.35", lw=1.2, ls="--",
                    label=f"{g['baseline']} (n={len(base['seeds'])})")
            ax.fill_between(xs, *_band(base["curve"], band), color="0.5", alpha=0.15)
        xs = [c["step"] for c in g["curve"]]
        ax.plot(xs, [c["mean"] for c in g["curve"]], color=colour, marker="o", ms=2.5, lw=1.6,
                label=f"{label} (n={len(g['seeds'])})")
        ax.fill_between(xs, *_band(g["curve"], band), color=colour, alpha=0.2)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    band_txt = "±1 std over seeds" if band == "std" else "min..max over seeds"
    _save_panels(plt, fig, grid, path, "eval accuracy", f"{caption}. Line: mean over seeds; band: {band_txt}.")
    return True


def plot_difference(summary: dict[str, dict], path: Path, baseline: str, caption: str) -> bool:
    """Small multiples of the paired difference to the baseline vs step, 95% t band."""
    items = [(lab, g) for lab, g in summary.items() if g.get("vs_baseline") and g["vs_baseline"]["curve"]]
    if not items:
        return False
    plt, fig, grid, axes = _panels(len(items), 2.7)
    for ax, (label, g) in zip(axes, items):
        cur = g["vs_baseline"]["curve"]
        xs = [c["step"] for c in cur]
        colour = f"C{list(summary).index(label) % 10}"
        ax.axhline(0, color="0.3", lw=0.8)
        ax.plot(xs, [c["mean"] for c in cur], color=colour, marker="o", ms=2.5,
                label=f"n={len(g['vs_baseline']['seeds'])} seed pairs")
        if all(c["lo"] is not None for c in cur):
            ax.fill_between(xs, [c["lo"] for c in cur], [c["hi"] for c in cur], color=colour, alpha=0.2)
        ax.set_title(f"{label} − {g['baseline']}", fontsize=9)
        ax.legend(fontsize=7)
    _save_panels(plt, fig, grid, path, f"accuracy − {baseline}",
                 f"{caption}. Paired by seed; band: 95% t-interval over seed pairs.")
    return True


def early_series(runs: list[dict], key: str, early: int) -> list[tuple[int, float]]:
    """Seed-mean of a per-step metric over the first `early` steps."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for s, rec in r["steps"].items():
            if s < early and rec.get(key) is not None and math.isfinite(rec[key]):
                by_step[s].append(rec[key])
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]


def plot_schedule(runs_by_label: dict[str, list[dict]], path: Path, early: int = 50) -> None:
    plt, MaxNLocator = _plt()
    keys = [("eps", "eps (trust-region budget)"), ("beta/mean", "mean beta*"),
            ("kl_mu_student/mean", "realised KL(mu || pi_S), mean; dashed: eps"),
            ("teacher/logp", "teacher log-prob of the sampled tokens")]
    colour = {label: f"C{i % 10}" for i, label in enumerate(runs_by_label)}  # one colour per group everywhere
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    for ax, (key, title) in zip(axes, keys):
        for label, runs in runs_by_label.items():
            series = early_series(runs, key, early)
            if series and (key == "teacher/logp" or any(v != 0 for _, v in series)):  # all-0 groups left out
                ax.plot([s for s, _ in series], [v for _, v in series], label=label, color=colour[label], lw=1.3)
                if key == "kl_mu_student/mean":
                    eps = early_series(runs, "eps", early)
                    if eps and any(v != 0 for _, v in eps):
                        ax.plot([s for s, _ in eps], [v for _, v in eps], color=colour[label], ls="--", lw=0.9)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.text(0.01, 0.01, f"Seed means per step over the first {early} steps; groups that stay 0 are left out. "
             "The realised KL of the sampler to the student must stay at or under eps; the teacher's log-prob of "
             "what was sampled says how far the visited prefixes are from the teacher's support.", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


REPORT_FILES = ("report.md", "report.json", "accuracy.png", "difference.png", "schedule.png")


def report(paths: list[Path | str], out_dir: Path | str | None = None, band: str = "minmax", early: int = 50,
           baseline: str | None = "opd", log=print) -> dict:
    """Write report.md, report.json, accuracy.png, difference.png and schedule.png; print the table."""
    if band not in ("minmax", "std"):
        raise ReportError(f"--band must be minmax or std; got {band!r}")
    run_dirs = find_runs(paths)
    unfinished = [p for p in run_dirs if not (p / "summary.json").exists()]
    if unfinished and len(unfinished) < len(run_dirs):
        log(f"skipping {len(unfinished)} unfinished run(s) (no summary.json): {', '.join(p.name for p in unfinished)}")
        run_dirs = [p for p in run_dirs if p not in unfinished]
    runs = [load_run(p) for p in run_dirs]
    no_evals = [r for r in runs if not r["evals"]]
    if no_evals:
        if len(no_evals) == len(runs):
            raise ReportError(f"no eval accuracy in {len(runs)} run(s): nothing to compare (eval_every=0 and steps=0?)")
        log(f"skipping {len(no_evals)} run(s) without an eval: {', '.join(Path(r['path']).name for r in no_evals)}")
        runs = [r for r in runs if r["evals"]]
    if baseline and not any(r["method"] == baseline for r in runs):
        log(f"note: no {baseline} runs among these: no differences to a baseline (--baseline METHOD)")
        baseline = None
    summary = summarise(runs, baseline)
    if out_dir is None:
        first = Path(paths[0])
        out_dir = first if len(paths) == 1 and first not in run_dirs else Path("outputs/report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:  # a reused --out: no plot of an earlier report survives beside this one
        (out / name).unlink(missing_ok=True)
    table = markdown_table(summary, baseline)
    caption = eval_caption(runs)
    label_of = {p: label for label, g in summary.items() for p in g["runs"]}
    runs_by_label = {label: [r for r in runs if label_of[r["path"]] == label] for label in summary}  # same order
    has_acc = plot_accuracy(summary, out / "accuracy.png", band, caption)
    has_diff = bool(baseline) and plot_difference(summary, out / "difference.png", baseline, caption)
    plot_schedule(runs_by_label, out / "schedule.png", early)
    unmatched = [lab for lab, g in summary.items() if baseline and g.get("baseline") is None]
    short = [f"{lab} ({len(g['seeds']) - g['vs_baseline']['final']['n']} of {len(g['seeds'])} runs without a "
             "partner: no baseline run with its seed, or no trained eval step in common)"
             for lab, g in summary.items() if g.get("vs_baseline") and g["vs_baseline"]["final"]["n"] < len(g["seeds"])]
    no_common = [lab for lab, g in summary.items() if not g["curve"]]
    notes = [
        f"{caption}.",
        "Runs are grouped by every config key that differs among them except the seed and bookkeeping "
        f"({', '.join(BOOKKEEPING)}) and the knobs a run's method never reads (blend.* without a blend, another "
        "method's method.*). Start / final = eval accuracy at the first / last step every run of the "
        "group evaluated; best = the best of those steps after step 0 (trained checkpoints only); AUC = "
        "area under the accuracy-vs-step curve divided by its span (the step-averaged accuracy). Mean over "
        "seeds, ± sample std where a group has >= 2 seeds.",
    ]
    if baseline:
        notes.append(
            f"Δ vs {baseline}: runs paired by seed with the {baseline} group that shares every setting outside "
            "method.* and blend.*; mean paired difference with a two-sided 95% Student-t interval over the "
            "seed pairs (n - 1 degrees of freedom); * = the interval excludes 0 (unadjusted: of many such "
            "intervals about one in twenty excludes 0 by chance alone). The eval problems are held "
            "fixed, so the interval covers run-to-run variation, not the choice of problems.")
        if unmatched:
            notes.append(f"No single {baseline} group to pair with: {', '.join(unmatched)}.")
        if short:
            notes.append("Paired on fewer runs than the group holds: " + "; ".join(short) + ".")
    if no_common:
        notes.append(f"No eval step shared by all runs of: {', '.join(no_common)} (left out of the plots).")
    notes.append("Rollout reward: mean over all steps of the fraction of training rollouts graded correct "
                 "(not comparable across samplers: TRB, fixed and SKD rollouts are not the student's own).")
    figs = (("![accuracy](accuracy.png)\n\n" if has_acc else "")
            + ("![difference](difference.png)\n\n" if has_diff else "") + "![schedule](schedule.png)\n")
    (out / "report.md").write_text(
        f"# trb report\n\n{len(runs)} runs from {', '.join(map(str, paths))}\n\n{table}\n\n"
        + "\n\n".join(notes) + "\n\n" + figs)
    (out / "report.json").write_text(json.dumps(
        {"paths": list(map(str, paths)), "baseline": baseline, "caption": caption, "interval": "paired t, 95%",
         "groups": summary}, indent=1))
    log(table)
    log(f"wrote {out / 'report.md'}, {out / 'accuracy.png'}, " + (f"{out / 'difference.png'}, " if has_diff else "")
        + f"{out / 'schedule.png'}, {out / 'report.json'}")
    return summary
