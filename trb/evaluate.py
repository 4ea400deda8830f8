"""Scoring a student: student-only decoding, math-verify grading, pass@k / maj@k and breakdowns.

    trb eval checkpoint=outputs/train/RUN/checkpoints/step_000150 dataset=gsm8k decoding=sampled
    trb eval checkpoint=outputs/train/RUN            # every checkpoint of a run: an accuracy curve

The same `evaluate` serves the periodic eval inside `trb train`.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
import torch

from trb.config import DecodingConfig
from trb.data import render
from trb.grading import Grader
from trb.blend import RowNoise
from trb.rollout import Sampler, StopSpec


def encode_prompts(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, P] ids and attention mask (chat templates carry their own special tokens)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def decode_completions(tokenizer, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Completion text per row (stop and pad tokens dropped)."""
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(tokens, mask)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k) for c correct out of n samples (k <= n)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples; got n={n}")
    if n - c < k:
        return 1.0
    # product form avoids huge binomials
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """The mean over problems and its standard error (sample std, ddof 1, over sqrt(problems); 0 for
    one problem): the per-problem values are the unit, as in lm-evaluation-harness, so the error
    of pass@k with n samples per problem includes the problems' spread, not only the sampling's."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> bool:
    """Majority vote over the first k answers' vote keys (the grader's parsed answers, so `0.5` and
    `\\frac{1}{2}` vote together; None never wins); ties go to the answer seen first. The vote is
    correct when a sample carrying the winning answer was graded correct."""
    votes = [a for a in answers[:k] if a is not None]
    if not votes:
        return False
    counts = Counter(votes)
    best = max(counts.values())
    winner = next(a for a in votes if counts[a] == best)
    return any(ok for a, ok in zip(answers[:k], correct[:k]) if a == winner)


def evaluate(engine, tokenizer, rows: list[dict], stop: StopSpec, grader: Grader, prompt, decoding: DecodingConfig,
             progress=None, problem_ids: list[int] | None = None) -> tuple[dict, list[dict]]:
    """Decode n completions per row with `engine` (trb.engine: trb's decoder or vLLM; a plain model
    means trb's decoder on it), grade them, and aggregate.

    Each prompt is prefilled once for its n samples (prefix sharing; once per group of
    decoding.batch samples when decoding.batch < n); at most decoding.batch rows decode together,
    finished rows leaving the batch; sample j of problem i draws
    from its own noise stream keyed by (decoding.seed, problem_ids[i] * n + j), so the samples do
    not depend on decoding.batch (nor, in training, on how problems are split across ranks).

    Returns (metrics, samples): metrics keyed "eval/..." (pass@k, maj@k, no-answer, truncation,
    grading timeouts, tokens/s, per-type/level accuracy when rows carry them); one sample dict per
    completion (prompt, completion, extracted answer and its vote key, gold, correct).
    """
    if not rows:
        return {}, []
    if isinstance(engine, torch.nn.Module):
        from trb.engine import HFEngine

        engine = HFEngine(engine)
    device = engine.device if engine.name == "vllm" else next(engine.model.parameters()).device
    problem_ids = list(range(len(rows))) if problem_ids is None else list(problem_ids)
    sampler = Sampler("student", temperature=decoding.temperature, top_p=decoding.top_p, greedy=decoding.greedy)
    prompts = [render(tokenizer, r["question"], prompt) for r in rows]
    n = decoding.n
    per = max(1, decoding.batch // n)  # prompts per wave
    samples: list[dict] = []
    t0, timeouts0 = time.time(), grader.stats.timeouts
    gen_tokens = 0
    for start in range(0, len(rows), per):
        idx = list(range(start, min(start + per, len(rows))))
        chunk = [(i, j) for i in idx for j in range(n)]
        ids, mask = encode_prompts(tokenizer, [prompts[i] for i in idx], device)
        noise = RowNoise(decoding.seed, [problem_ids[i] * n + j for i, j in chunk], device)
        ro = engine.sample(ids, mask, n=n, max_new_tokens=decoding.max_new_tokens, sampler=sampler, stop=stop,
                           noise=noise, max_rows=decoding.batch)
        texts = decode_completions(tokenizer, ro.tokens, ro.response_mask)
        golds = [rows[i]["gold"] for i, _ in chunk]
        judged = grader.judge(texts, [g if g is not None else "" for g in golds])
        lengths = ro.response_mask.sum(1).tolist()
        gen_tokens += sum(lengths)
        for (i, j), text, jd, n_tok, stopped in zip(chunk, texts, judged, lengths, ro.stopped.tolist()):
            samples.append({"problem": i, "sample": j, "prompt": prompts[i], "completion": text,
                            "extracted": jd.extracted, "vote": jd.key, "gold": rows[i]["gold"],
                            "correct": jd.correct and rows[i]["gold"] is not None, "tokens": int(n_tok),
                            "truncated": not stopped,
                            **{k: rows[i][k] for k in ("type", "level", "subject") if k in rows[i]}})
        if progress is not None:
            progress(len(chunk))
    seconds = time.time() - t0
    return aggregate(rows, samples, decoding, seconds, gen_tokens, grader.stats.timeouts - timeouts0), samples


def aggregate(rows: list[dict], samples: list[dict], decoding: DecodingConfig, seconds: float, gen_tokens: int,
              timeouts: int) -> dict:
    """Metrics from graded samples (pure: recomputable from samples.jsonl)."""
    by_problem: dict[int, list[dict]] = defaultdict(list)
    for s in samples:
        by_problem[s["problem"]].append(s)
    per_problem = [sorted(by_problem[i], key=lambda s: s["sample"]) for i in range(len(rows))]
    metrics: dict = {}
    for k in decoding.ks:
        for name, values in (
                (f"pass@{k}", [pass_at_k(len(ss), sum(s["correct"] for s in ss), k) for ss in per_problem]),
                (f"maj@{k}", [float(maj_at_k([s["vote"] for s in ss], [s["correct"] for s in ss], k))
                              for ss in per_problem])):
            metrics[f"eval/{name}"], metrics[f"eval/{name}_stderr"] = mean_stderr(values)
    metrics["eval/accuracy"] = metrics["eval/pass@1"]
    metrics["eval/accuracy_stderr"] = metrics["eval/pass@1_stderr"]
    metrics["eval/no_answer"] = sum(s["extracted"] is None for s in samples) / len(samples)
    metrics["eval/truncated"] = sum(s["truncated"] for s in samples) / len(samples)
    metrics["eval/length"] = sum(s["tokens"] for s in samples) / len(samples)
    metrics["eval/grading_timeouts"] = timeouts
    metrics["eval/tokens_per_s"] = gen_tokens / max(seconds, 1e-9)
    metrics["eval/problems"] = len(rows)
    metrics["eval/samples_per_problem"] = decoding.n
    for key in ("type", "subject", "level"):
        groups: dict = defaultdict(list)
        for s in samples:
            if key in s:
                groups[s[key]].append(s["correct"])
        for name, oks in sorted(groups.items(), key=lambda kv: str(kv[0])):
            metrics[f"eval/{key}/{name}"] = sum(oks) / len(oks)
    return metrics
