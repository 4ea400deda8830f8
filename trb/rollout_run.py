"""`trb rollout`: look at what a behaviour policy does, token by token, without training.

    trb rollout                                         # TRB at step 0 (eps = 0.01) on the toy pair
    trb rollout method=fixed blend.eps0=0.05 n=4
    trb rollout method=skd method.skd_top_k=5 num_prompts=32
    trb rollout 'probe.cuts=[0,8,16,24]'                # + the continuation-gain probe
    trb rollout -m method=opd,trb,skd 'probe.cuts=[0,8,16]'   # compare samplers

Writes rollouts.jsonl (one completion per line with per-token records and its grade),
rollouts.html (tokens coloured by beta*, teacher-replaced tokens outlined; opens in a browser
with no server), summary.json (the diagnostics of every training step, plus the probe), and
prints the summary as a table.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import time
from pathlib import Path

import torch

from trb.blend import compile_search
from trb.config import RolloutRunConfig
from trb.data import load_rows
from trb.download import eval_items, model_items, require_cached
from trb.errors import has_started
from trb.rundir import write_atomic
from trb.diagnostics import effective_temperature, rollout_metrics, sequence_support
from trb.evaluate import decode_completions
from trb.grading import Grader
from trb.models import check_positions, check_pair, load_model, prepare_run
from trb.rollout import TOKEN_FIELDS, Sampler, StopSpec, concat_rollouts, rollout, teacher_scores
from trb.tracking import Tracker
from trb.methods import Method
from trb.train import encode_batch, seed_everything


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def continuation_probe(cfg: RolloutRunConfig, student, teacher, tok, stop: StopSpec, records: list[dict],
                       grader: Grader, gen: torch.Generator, device) -> dict:
    """Success rate of continuing sampled prefixes with each model, per cut length t.

    Each of the first `probe.max_prefixes` completions that is still running after t tokens is
    cut there; `probe.continuations` samples (temperature 1) from the student and from the
    teacher complete it within the same total budget (max_new_tokens); the full text is graded.
    Returns {t: {"prefixes": k, "student": rate, "teacher": rate, "gain": teacher - student}}.
    """
    probe = cfg.probe
    recs = records[: probe.max_prefixes]
    out: dict = {}
    for t in sorted(set(probe.cuts)):
        alive = [r for r in recs if len(r["token_ids"]) > t]
        if not alive:
            out[str(t)] = {"prefixes": 0, "student": None, "teacher": None, "gain": None}
            continue
        owners = [r for r in alive for _ in range(probe.continuations)]
        seqs = [r["prompt_ids"] + r["token_ids"][:t] for r in owners]
        heads = [tok.decode(r["token_ids"][:t], skip_special_tokens=True) for r in owners]
        golds = [r["gold"] if r["gold"] is not None else "" for r in owners]
        rates = {}
        for name, model in (("student", student), ("teacher", teacher)):
            oks: list[bool] = []
            for i in range(0, len(seqs), cfg.batch):
                ids, mask = _left_pad(seqs[i : i + cfg.batch], stop.pad_id, device)
                ro = rollout(model, None, ids, mask, max_new_tokens=cfg.rollout.max_new_tokens - t,
                             sampler=Sampler("student"), stop=stop, generator=gen)
                conts = decode_completions(tok, ro.tokens, ro.response_mask)
                oks += grader.grade([h + c for h, c in zip(heads[i : i + cfg.batch], conts)], golds[i : i + cfg.batch])
            rates[name] = sum(oks) / len(oks)
        out[str(t)] = {"prefixes": len(alive), **rates, "gain": rates["teacher"] - rates["student"]}
    return out


def _colour(beta: float) -> str:
    a = 0.0 if not math.isfinite(beta) else max(0.0, min(1.0, beta))
    return f"rgba(230,120,0,{0.08 + 0.8 * a:.3f})" if a > 0 else "transparent"


_SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>")
_CHAT_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)


def readable_prompt(prompt: str) -> str:
    """The prompt as a reader wants it: chat turns as `role: text`, special tokens hidden."""
    turns = [(role, text.strip()) for role, text in _CHAT_TURN.findall(prompt)]
    if turns:
        return "\n".join(f"{role}: {text}" if text else f"{role}:" for role, text in turns)
    return _SPECIAL.sub("", prompt).strip()


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "nan"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;max-width:72em}h1{font-size:1.3em;margin:.2em 0}"
    ".bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}"
    ".bar label{margin-right:1em}.legend{display:inline-flex;align-items:center;gap:.4em;margin-left:1em}"
    ".scale{width:14em;height:.9em;border:1px solid #aaa;display:inline-block}"
    ".g{margin:1.2em 0}.q{background:#f4f4f4;border-radius:6px;padding:.5em;white-space:pre-wrap}"
    ".c{border:1px solid #ccc;border-radius:6px;padding:.6em;margin:.6em 0 .6em 1.5em;white-space:pre-wrap;"
    "font-family:ui-monospace,monospace;font-size:13px}.h{font-family:system-ui,sans-serif;margin-bottom:.3em}"
    ".ok{color:#080;font-weight:600}.bad{color:#b00;font-weight:600}.t.r{outline:2px solid #1565c0}"
    "table{border-collapse:collapse}td{padding:.1em .8em}details{margin:.5em 0}"
)
# colour scales per mode: (label, attribute, low, high, css gradient, JS colour of a value in [0, 1])
_MODES = {
    "beta": ("beta* (blend weight toward the teacher)", "b", 0.0, 1.0,
             "linear-gradient(90deg,rgba(230,120,0,.08),rgba(230,120,0,.88))", "`rgba(230,120,0,${.08+.8*u})`"),
    "tlogp": ("log pi_T of the token (low: the teacher would not write it)", "t", -10.0, 0.0,
              "linear-gradient(90deg,rgba(200,0,0,.85),rgba(200,0,0,.02))", "`rgba(200,0,0,${.85-.83*u})`"),
    "kl": ("KL(mu || pi_S) at the prefix", "k", 0.0, None,
           "linear-gradient(90deg,rgba(90,0,160,.02),rgba(90,0,160,.85))", "`rgba(90,0,160,${.02+.83*u})`"),
    "gap": ("log pi_S - log pi_T (blue: student more sure, red: teacher more sure)", "d", -3.0, 3.0,
            "linear-gradient(90deg,rgba(200,0,0,.8),rgba(255,255,255,0),rgba(0,80,200,.8))",
            "u<.5?`rgba(200,0,0,${.8*(1-2*u)})`:`rgba(0,80,200,${.8*(2*u-1)})`"),
}
_JS = """
const M = %s;
Object.values(M).forEach(m => { m.f = new Function('u', 'return ' + m.col); });
function paint(){
  const m = M[document.querySelector('input[name=mode]:checked').value];
  const spans = document.querySelectorAll('.t');
  let hi = m.hi;
  if (hi === null) { hi = 1e-12; spans.forEach(s => { hi = Math.max(hi, +s.dataset[m.attr] || 0); }); }
  spans.forEach(s => {
    const v = +s.dataset[m.attr];
    if (!isFinite(v)) { s.style.background = 'transparent'; return; }
    const u = Math.max(0, Math.min(1, (v - m.lo) / (hi - m.lo)));
    s.style.background = m.f(u);
  });
  document.getElementById('scale').style.background = m.grad;
  document.getElementById('lo').textContent = m.lo;
  document.getElementById('hi').textContent = (+hi).toPrecision(3);
  document.getElementById('what').textContent = m.label;
}
function filter(){
  const f = document.querySelector('input[name=show]:checked').value;
  document.querySelectorAll('.c').forEach(c => {
    c.style.display = (f === 'all' || c.dataset.ok === (f === 'correct' ? '1' : '0')) ? '' : 'none';
  });
  document.querySelectorAll('.g').forEach(g => {
    g.style.display = [...g.querySelectorAll('.c')].some(c => c.style.display !== 'none') ? '' : 'none';
  });
}
document.querySelectorAll('input[name=mode]').forEach(i => i.addEventListener('change', paint));
document.querySelectorAll('input[name=show]').forEach(i => i.addEventListener('change', filter));
new URLSearchParams(location.hash.slice(1)).forEach((v, k) => {  // e.g. rollouts.html#mode=kl&show=wrong
  const i = document.querySelector(`input[name=${k}][value=${v}]`); if (i) i.checked = true; });
paint(); filter();
"""


def render_html(records: list[dict], summary: dict, title: str) -> str:
    """A self-contained page to look at a sampler with: a short header (the full metrics folded
    away), a legend for the colour scale, a selector for what colours the tokens (beta*, log pi_T,
    KL(mu || pi_S), log pi_S - log pi_T), a filter (all / correct / wrong), one prompt header per
    group of samples (chat markup hidden), extracted vs gold answer per sample. One <span class="t">
    per completion token (background: beta* until the page's script repaints it; a solid outline:
    replaced by the teacher, SKD; hover: the token's numbers)."""
    n_ok = sum(bool(r["correct"]) for r in records)
    betas = [b for r in records for b in r["beta"] if math.isfinite(b)]
    head = (f"{len(records)} completions of {len({r['prompt_index'] for r in records})} prompts, "
            f"{n_ok} correct ({n_ok / max(len(records), 1):.0%}), mean beta* "
            f"{(sum(betas) / len(betas)) if betas else 0:.3f}")
    modes = {k: {"label": label, "attr": attr, "lo": lo, "hi": hi, "grad": grad, "col": col}
             for k, (label, attr, lo, hi, grad, col) in _MODES.items()}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><div>{html.escape(head)}</div>",
             "<details><summary>all metrics</summary><table>"]
    for k, v in summary.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"<tr><td>{html.escape(k)}</td><td>{_num(float(v))}</td></tr>")
    parts.append("</table></details><div class='bar'><b>colour</b> ")
    for i, (k, (label, *_)) in enumerate(_MODES.items()):
        short = {"beta": "beta*", "tlogp": "log pi_T", "kl": "KL(mu||pi_S)", "gap": "log pi_S - log pi_T"}[k]
        parts.append(f"<label title='{html.escape(label, quote=True)}'><input type='radio' name='mode' value='{k}'"
                     f"{' checked' if i == 0 else ''}> {short}</label>")
    parts.append("<span class='legend'><span id='lo'>0</span><span class='scale' id='scale' "
                 f"style='background:{_MODES['beta'][4]}'></span><span id='hi'>1</span></span> "
                 "<span id='what'></span><br><b>show</b> ")
    for i, k in enumerate(("all", "correct", "wrong")):
        parts.append(f"<label><input type='radio' name='show' value='{k}'{' checked' if i == 0 else ''}> {k}</label>")
    parts.append("<span style='color:#555'> blue outline: a token the teacher replaced (SKD); hover a token "
                 "for its numbers</span></div>")
    by_prompt: dict[int, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    for idx, group in by_prompt.items():
        parts.append(f"<div class='g'><div class='q'><b>prompt {idx}</b> (gold {html.escape(str(group[0]['gold']))})"
                     f"\n{html.escape(readable_prompt(group[0]['prompt']))}</div>")
        for r in group:
            mark = "<span class='ok'>correct</span>" if r["correct"] else "<span class='bad'>wrong</span>"
            parts.append(f"<div class='c' data-ok='{int(bool(r['correct']))}'><div class='h'>sample {r['sample']}: "
                         f"{mark}, answer {html.escape(str(r.get('extracted')))} vs gold "
                         f"{html.escape(str(r['gold']))}; {len(r['token_ids'])} tokens, support score "
                         f"{_num(r['support_score'])}</div>")
            for i, piece in enumerate(r["token_text"]):
                s_lp, t_lp, kl = r["student_logp"][i], r["teacher_logp"][i], r["kl"][i]
                tip = (f"log pi_S {s_lp:.3f} | log pi_T {t_lp:.3f} | log mu {r['behavior_logp'][i]:.3f} | "
                       f"beta {r['beta'][i]:.3f} | KL {kl:.2e}")
                cls = "t r" if r["replaced"][i] else "t"
                parts.append(f"<span class='{cls}' data-b='{_num(r['beta'][i])}' data-t='{_num(t_lp)}' "
                             f"data-k='{_num(kl)}' data-d='{_num(s_lp - t_lp)}' "
                             f"style='background:{_colour(r['beta'][i])}' "
                             f"title='{html.escape(tip, quote=True)}'>{html.escape(piece)}</span>")
            parts.append("</div>")
        parts.append("</div>")
    parts.append(f"<script>{_JS % json.dumps(modes)}</script></body></html>")
    return "".join(parts)


def run_rollout(cfg: RolloutRunConfig, out_dir: Path | str, log=print) -> dict:
    """Sample, record, grade, probe; write rollouts.jsonl / rollouts.html / summary.json."""
    if cfg.checkpoint:  # the student as trb eval names it: a run dir stands for its last checkpoint
        from trb.eval_run import resolve_checkpoints

        path = resolve_checkpoints(cfg.checkpoint)[-1]
        if path != cfg.checkpoint:
            log(f"checkpoint={cfg.checkpoint}: sampling its last checkpoint, {path}")
        cfg = dataclasses.replace(cfg, checkpoint=None, student=dataclasses.replace(cfg.student, path=path))
    require_cached(model_items(cfg.student, "student.path") + model_items(cfg.teacher, "teacher.path") +
                   eval_items(cfg.dataset))
    rows = load_rows(cfg.dataset, cfg.seed, role="eval", log=log)  # before any weight is loaded
    claim = claim_rollout_dir(cfg, Path(out_dir))
    try:
        return _run_rollout(cfg, Path(out_dir), rows, claim, log)
    except BaseException:
        if not has_started():
            claim.abort()
        raise
    finally:
        claim.release()


ROLLOUT_FILES = ("summary.json", "rollouts.jsonl", "rollouts.html", "metrics.jsonl")
_ROLLOUT_BOOKKEEPING = ("output_dir", "logger", "threads", "device", "batch", "overwrite")


def claim_rollout_dir(cfg: RolloutRunConfig, out_dir: Path):
    """Lock a rollout's output dir. It may hold nothing of a rollout, or this same rollout (rerun: its
    files are replaced; the sampling is seeded), anything else is refused unless overwrite=true (moved
    aside to <dir>.replaced-<time>/)."""
    from trb.rundir import RunDirError, lock_dir

    claim = lock_dir(out_dir)
    try:
        if (out_dir / "train_config.json").exists() or (out_dir / "eval_config.json").exists():
            raise RunDirError(f"output_dir {out_dir} holds a trb train run or eval: a rollout writes into a dir of "
                              f"its own")
        files = [n for n in ROLLOUT_FILES if (out_dir / n).exists()]
        if not files:
            return claim
        if cfg.overwrite:
            claim.aside = files
            return claim
        try:
            saved = json.loads((out_dir / "summary.json").read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
        now = json.loads(json.dumps(dataclasses.asdict(cfg)))
        same = saved is not None and all(saved.get(k) == now.get(k) for k in set(saved) | set(now)
                                         if k not in _ROLLOUT_BOOKKEEPING)
        if not same:
            raise RunDirError(f"output_dir {out_dir} holds another rollout ({', '.join(files)}); use another "
                              f"output_dir, or overwrite=true to move it aside to {out_dir.name}.replaced-<time>/")
        claim.reset_metrics = True  # the same rollout again: its records are redone (at the first write)
        return claim
    except BaseException:
        claim.abort()
        raise


def _run_rollout(cfg: RolloutRunConfig, out_dir: Path, rows: list[dict], claim, log) -> dict:
    out_dir, device = prepare_run(out_dir, cfg.threads, cfg.device)
    gen = seed_everything(cfg.seed)
    if device.type == "cuda":
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    ro_cfg = cfg.rollout
    if ro_cfg.compile_search:
        compile_search(True)
    student, tok = load_model(cfg.student, "student", device)
    teacher, t_tok = load_model(cfg.teacher, "teacher", device)
    student.eval()
    teacher.eval()
    stop = check_pair(student, tok, teacher, t_tok)
    check_positions((student, teacher), cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens,
                    "rollout.max_prompt_tokens + rollout.max_new_tokens")
    if cfg.num_prompts:
        rows = rows[: cfg.num_prompts]
    eps = cfg.blend.schedule()(cfg.step)
    sampler = Method(cfg.method, cfg.blend, ro_cfg.temperature, ro_cfg.draft_k).sampler(cfg.step)
    log(f"trb rollout: method={cfg.method.name} at step {cfg.step} (eps {eps:g}), {len(rows)} prompts x "
        f"n={ro_cfg.n}")

    t0 = time.time()
    per_batch = max(1, cfg.batch // ro_cfg.n)
    parts, kept, prompt_ids, skipped = [], [], [], 0
    for i in range(0, len(rows), per_batch):
        chunk, ids, mask, sk = encode_batch(tok, rows[i : i + per_batch], cfg.prompt, ro_cfg.max_prompt_tokens,
                                            device, truncate=ro_cfg.long_prompts == "truncate")
        skipped += sk
        if not chunk:
            continue
        ro = rollout(student, teacher, ids, mask, max_new_tokens=ro_cfg.max_new_tokens, sampler=sampler, stop=stop,
                     generator=gen, n=ro_cfg.n, max_rows=ro_cfg.max_rows)
        teacher_scores(teacher, ro, stop)  # teacher log-probs / entropy for student-only samplers
        parts.append(ro)
        kept += [(r, j) for r in chunk for j in range(ro_cfg.n)]
        prompt_ids += [row[m.bool()].tolist() for row, m in zip(ro.prompt_ids, ro.prompt_mask)]
    if not parts:
        raise ValueError(f"no prompt fits rollout.max_prompt_tokens={ro_cfg.max_prompt_tokens}; raise it or set "
                         f"rollout.long_prompts=truncate")
    seconds = time.time() - t0

    merged = concat_rollouts(parts, stop.pad_id)
    st = {name: getattr(merged, name) for name in (*TOKEN_FIELDS, "stopped")}
    texts = decode_completions(tok, st["tokens"], st["response_mask"])
    with Grader(workers=1) as grader:
        golds = [r["gold"] for r, _ in kept]
        judged = grader.judge(texts, [g if g is not None else "" for g in golds])
        correct = [j.correct and g is not None for j, g in zip(judged, golds)]
        support = sequence_support(merged).tolist()
        records = []
        index = {id(r): k for k, r in enumerate(rows)}
        for b, ((row, j), text) in enumerate(zip(kept, texts)):
            m = st["response_mask"][b]
            ids_b = st["tokens"][b][m].tolist()
            rec = {"prompt_index": index[id(row)], "sample": j, "prompt": tok.decode(prompt_ids[b]),
                   "prompt_ids": prompt_ids[b], "completion": text, "token_ids": ids_b,
                   "token_text": [tok.decode([x]) for x in ids_b], "gold": row["gold"],
                   "extracted": judged[b].extracted, "correct": correct[b], "stopped": bool(st["stopped"][b]),
                   "support_score": support[b]}
            for name in ("student_logp", "teacher_logp", "behavior_logp", "beta", "kl", "teacher_entropy"):
                rec[name] = [float(x) for x in st[name][b][m].tolist()]
            rec["replaced"] = [bool(x) for x in st["replaced"][b][m].tolist()]
            records.append(rec)
        summary = {"method": cfg.method.name, "step": cfg.step, "completions": len(records),
                   "prompts_skipped_too_long": skipped, "seconds": seconds,
                   **rollout_metrics(merged, correct if all(g is not None for g in golds) else [], eps,
                                     effective_temperature(sampler))}
        if cfg.probe.cuts:
            summary["probe"] = continuation_probe(cfg, student, teacher, tok, stop, records, grader, gen, device)

    moved = claim.commit()  # the first write
    if moved is not None:
        log(f"overwrite=true: the previous rollout's files moved to {moved}")
    write_atomic(out_dir / "rollouts.jsonl", "".join(json.dumps(rec) + "\n" for rec in records))
    title = (f"trb rollout: student {cfg.student.path}, teacher {cfg.teacher.path}, method={cfg.method.name}, "
             f"step {cfg.step}, eps {eps:g}")
    write_atomic(out_dir / "rollouts.html", render_html(records, summary, title))
    write_atomic(out_dir / "summary.json", json.dumps(_finite({"config": dataclasses.asdict(cfg), **summary}),
                                                       indent=1))

    tracker = Tracker(cfg.logger, out_dir, dataclasses.asdict(cfg), name=out_dir.name)
    probe = {f"probe/{k}@{t}": r[k] for t, r in summary.get("probe", {}).items() if r["prefixes"]
             for k in ("student", "teacher", "gain")}  # success rates of the continuations from each cut t
    tracker.log({**{k: v for k, v in summary.items() if isinstance(v, (int, float))}, **probe}, cfg.step)
    if "probe" in summary:
        tracker.table("rollout/probe", ["cut", "prefixes", "student", "teacher", "gain"],
                      [[int(t), r["prefixes"], r["student"], r["teacher"], r["gain"]]
                       for t, r in summary["probe"].items()], cfg.step)
    # a sample of the rows: the page grows with rows x length (~70 MB at the paper's)
    tracker.html("rollouts", lambda: render_html(
        records[: cfg.logger.html_rows], summary,
        f"{title} (first {min(cfg.logger.html_rows, len(records))} of {len(records)} completions)"))
    tracker.finish()
    print_summary(summary, log)
    log(f"wrote {out_dir / 'rollouts.jsonl'}, {out_dir / 'rollouts.html'}, {out_dir / 'summary.json'}")
    return summary


def _finite(x):
    """NaN / inf -> None, so summary.json is strict JSON (e.g. no reward without gold answers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def print_summary(summary: dict, log=print) -> None:
    keys = ["eps", "beta/mean", "beta/p50", "beta/p90", "beta/frac_one", "kl_mu_student/mean", "kl_mu_student/max",
            "teacher/entropy", "teacher/logp", "support_score/seq_mean", "rollout/reward", "rollout/replaced",
            "rollout/temperature", "rollout/length", "rollout/truncated", "spec/acceptance", "spec/pinsker_bound"]
    keys = [k for k in keys if k in summary]
    log(f"{'diagnostic':<24}{'value':>12}")
    for k in keys:
        v = summary.get(k)
        log(f"{k:<24}{v:>12.4g}" if isinstance(v, (int, float)) and v == v else f"{k:<24}{'-':>12}")
    if "probe" in summary:
        log(f"{'cut t':>6}{'prefixes':>10}{'student':>10}{'teacher':>10}{'gain':>8}")
        for t, r in summary["probe"].items():
            if r["prefixes"]:
                log(f"{t:>6}{r['prefixes']:>10}{r['student']:>10.3f}{r['teacher']:>10.3f}{r['gain']:>8.3f}")
            else:
                log(f"{t:>6}{0:>10}{'-':>10}{'-':>10}{'-':>8}")
