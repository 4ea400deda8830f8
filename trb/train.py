"""On-policy distillation with Trust-Region behavior Blending: the training loop.

    trb train                                   # the embedded default (toy pair, CPU, minutes)
    trb train method=opd                        # vanilla OPD (also fixed, skd, veto, temp_warmup, sft_warmup)
    trb train blend=cosine blend.eps0=0.02 blend.horizon=50
    trb train -m method=opd,trb seed=0,1,2      # a sweep, one Hydra dir per job; then trb report

One step, top to bottom: eps_k from the schedule -> rollouts of prompts x n under the method's
behaviour policy (per-token records) -> rewards from math-verify -> teacher and student forwards
over the finished sequences -> chunked reverse-KL loss (Veto: to the Veto target) -> AdamW ->
metrics -> (every eval_every steps) eval -> (every save_every steps) checkpoint. sft_warmup
first samples the teacher on the prompts of its first steps and runs sft_updates supervised
steps on them (they count as steps), then OPD.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from trb import distributed
from trb.blend import RowSlice, compile_search
from trb.checkpoint import list_checkpoints, load_trainer_state, restore_rng, save_checkpoint
from trb.config import MethodConfig, TrainConfig
from trb.data import load_rows, render
from trb.distributed import World
from trb.evaluate import aggregate, decode_completions, encode_prompts, evaluate
from trb.grading import Grader
from trb.losses import chunked_distill_loss, chunked_nll_loss
from trb.models import check_pair, load_model, prepare_run
from trb.diagnostics import effective_temperature, rollout_metrics
from trb.rollout import Sampler, response_hidden, rollout, teacher_scores
from trb.tracking import Tracker


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_factor(step: int, warmup: int, total: int = 0, decay: str = "constant", floor: float = 0.1) -> float:
    """Cosine ramp from 0 to 1 over `warmup` steps, then constant (the paper) or a cosine decay
    that reaches `floor` at the last step."""
    if step < warmup:
        return 0.5 * (1 - math.cos(math.pi * (step + 1) / (warmup + 1)))
    if decay == "constant" or total <= warmup + 1:
        return 1.0
    frac = (step - warmup) / (total - 1 - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def prompt_batches(rows: list[dict], per_step: int, seed: int):
    """Endless per-epoch shuffles of the training rows, `per_step` at a time."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order) - per_step + 1, per_step):
            yield epoch, [rows[j] for j in order[i : i + per_step]]
        epoch += 1
        if len(order) < per_step:
            yield epoch, [rows[j] for j in (order * per_step)[:per_step]]


def encode_batch(tok, rows: list[dict], prompt, max_prompt_tokens: int, device, truncate: bool = False):
    """Render and left-pad a batch of prompts; those longer than max_prompt_tokens are dropped, or
    with truncate=True cut to their last max_prompt_tokens tokens (the end holds the question's
    last words and the assistant header).

    Returns (kept rows, ids [B, P], mask [B, P], number too long)."""
    ids, mask = encode_prompts(tok, [render(tok, r["question"], prompt) for r in rows], device)
    keep = mask.sum(1) <= max_prompt_tokens
    if bool(keep.all()):
        return rows, ids, mask, 0
    if truncate:
        return rows, ids[:, -max_prompt_tokens:], mask[:, -max_prompt_tokens:], int((~keep).sum())
    rows = [r for r, k in zip(rows, keep.tolist()) if k]
    ids, mask = ids[keep], mask[keep]
    width = int(mask.sum(1).max()) if rows else 0
    return rows, ids[:, ids.shape[1] - width :], mask[:, mask.shape[1] - width :], int((~keep).sum())


def make_sampler(method: MethodConfig, temperature: float, step: int, eps: float, draft_k: int = 0) -> Sampler:
    """The behaviour policy of `method` at optimiser step `step` (eps from the blend schedule,
    `temperature` the rollout temperature, draft_k > 0: speculative TRB sampling)."""
    if method.name == "skd":
        return Sampler("skd", skd_top_k=method.skd_top_k, skd_temperature=method.skd_temperature)
    if method.name in ("trb", "fixed"):
        return Sampler("trb", eps=eps, temperature=temperature, draft_k=draft_k)
    return Sampler("student", temperature=temperature * method.temperature(step))


def set_lr(cfg: TrainConfig, opt, step: int) -> None:
    for g in opt.param_groups:
        g["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.steps, cfg.optim.decay,
                                           cfg.optim.min_lr_ratio)


def step_seed(seed: int, step: int, phase: int = 0) -> int:
    """The sampling seed of one step: each step's rollouts draw from a fresh, fixed stream, so a
    row's samples depend only on (seed, step, its index in the global batch)."""
    return int(np.random.SeedSequence([seed, phase, step]).generate_state(1)[0])


class StudentObjective(torch.nn.Module):
    """The student and a loss on its response hidden states in one forward, so FSDP2 gathers the
    LM head (in the root group) for the chunked loss and reduces its gradient.

    forward(seq, mask, prompt_len, response_mask, loss_fn) -> loss_fn(hidden [N, H], head)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, seq, smask, prompt_len: int, response_mask, loss_fn):
        h_s = response_hidden(self.student, seq, smask, prompt_len, response_mask)
        return loss_fn(h_s, self.student.get_output_embeddings())


@dataclasses.dataclass
class _Run:
    """What every step needs. objective: the trainable student (FSDP2-sharded under torchrun);
    policy: the model that samples, evaluates and is saved (the student itself in one process, its
    full rollout copy under torchrun)."""

    cfg: TrainConfig
    world: World
    objective: StudentObjective
    policy: torch.nn.Module
    teacher: torch.nn.Module
    tok: object
    opt: torch.optim.Optimizer
    stop: object
    grader: Grader
    gen: torch.Generator
    device: torch.device

    def local_batch(self, rows: list[dict], seed: int, n: int):
        """This rank's share of a global prompt batch, encoded, and the noise source for its rows
        (n samples per prompt; the global batch's noise, sliced: see RowSlice). Returns
        ((rows, ids, mask, noise) or None, number of prompts too long); None when some rank has no
        prompt left after skipping long ones (every rank then skips the step)."""
        lo, hi = self.world.slice(len(rows))
        cfg = self.cfg
        rows, ids, mask, too_long = encode_batch(self.tok, rows[lo:hi], cfg.prompt, cfg.rollout.max_prompt_tokens,
                                                 self.device, truncate=cfg.rollout.long_prompts == "truncate")
        counts = distributed.gather(len(rows))
        if min(counts) == 0:
            return None, too_long
        self.gen.manual_seed(seed)
        noise = self.gen
        if self.world.distributed:
            noise = RowSlice(self.gen, n * sum(counts[: self.world.rank]), n * sum(counts))
        return (rows, ids, mask, noise), too_long

    @property
    def lockstep(self):
        """For a sharded teacher: every rank keeps decoding until all ranks' rows are done."""
        if self.world.distributed and self.cfg.parallel.teacher == "shard":
            return lambda finished: distributed.all_true(finished, self.device)
        return None

    def refresh_policy(self) -> None:
        if self.policy is not self.objective.student:
            distributed.copy_full_params(self.objective.student, self.policy)


def _update(run: _Run, loss: torch.Tensor, local_tokens: int, step: int) -> tuple[float, float]:
    """Backward + clip + AdamW on the token-mean `loss` of this rank's `local_tokens`, scaled so
    that the gradient FSDP averages over ranks is the global token-mean gradient. Returns
    (global loss, grad norm)."""
    world = run.world
    total = distributed.all_sum([float(local_tokens), float(loss.detach()) * local_tokens], run.device)
    global_loss = total[1] / max(total[0], 1.0)
    if not math.isfinite(global_loss):
        raise FloatingPointError(f"non-finite loss at step {step}: training stopped; the checkpoints written so far "
                                 f"are intact (lower optim.lr, check the models' dtypes, or resume from the last one)")
    if world.distributed:
        loss = loss * (local_tokens * world.size / max(total[0], 1.0))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(run.objective.parameters(), run.cfg.optim.grad_clip or float("inf"))
    if isinstance(gnorm, DTensor):
        gnorm = gnorm.full_tensor()
    run.opt.step()
    run.refresh_policy()
    return global_loss, float(gnorm)


def build_sft_pool(run: _Run, train_rows, log) -> list:
    """sft_warmup: teacher samples (method.sft_samples per prompt) for the prompts of the first
    method.sft_prompt_steps steps (the same prompt stream the other methods see), one entry per
    step: (sequence ids, attention mask, prompt length, response mask); this rank's share."""
    cfg, m = run.cfg, run.cfg.method
    t0 = time.time()
    stream = prompt_batches(train_rows, cfg.prompts_per_step, cfg.seed)
    pool = []
    for k in range(min(m.sft_prompt_steps, max(m.sft_updates, 1))):
        _, rows = next(stream)
        batch, _ = run.local_batch(rows, step_seed(cfg.seed, k, phase=1), m.sft_samples)
        if batch is None:
            continue
        rows, ids, mask, noise = batch
        ro = rollout(run.policy, run.teacher, ids, mask, max_new_tokens=cfg.rollout.max_new_tokens,
                     sampler=Sampler("teacher", temperature=cfg.rollout.temperature), stop=run.stop,
                     generator=noise, n=m.sft_samples, lockstep=run.lockstep)
        seq, smask = ro.sequences()
        pool.append((seq, smask, ids.shape[1], ro.response_mask))
    n_seq = sum(distributed.gather(sum(p[0].shape[0] for p in pool)))
    log(f"sft_warmup: {n_seq} teacher samples for the prompts of {len(pool)} steps in {time.time() - t0:.1f} s; "
        f"{m.sft_updates} SFT updates, then OPD")
    return pool


def sft_step(run: _Run, batch, step: int) -> dict:
    """One supervised update on teacher samples (token-mean NLL of the teacher's tokens)."""
    t0 = time.time()
    cfg, stop = run.cfg, run.stop
    seq, smask, prompt_len, m = batch
    run.objective.train()
    set_lr(cfg, run.opt, step)
    targets = seq[:, prompt_len:][m]

    def nll(h_s, head):
        return chunked_nll_loss(h_s, head, targets, stop_ids=stop.stop_ids, canonical_stop=stop.emit_id,
                                chunk_size=cfg.loss.chunk_size)

    loss = run.objective(seq, smask, prompt_len, m, nll)
    loss_value, gnorm = _update(run, loss, int(m.sum()), step)
    return {"loss": loss_value, "sft/nll": loss_value, "sft/active": 1.0, "eps": 0.0,
            "grad_norm": gnorm, "lr": run.opt.param_groups[0]["lr"], "time/step": time.time() - t0,
            "rollout/length": float(m.sum(1).float().mean()), "_tokens": int(m.sum())}


def opd_step(run: _Run, rows: list[dict], step: int, eps: float, veto_b: float) -> dict:
    """One on-policy distillation step under the method's sampler: rollouts (this rank's share of
    the prompts), rewards, teacher scores, loss, update. Returns the step's metrics for this rank
    ({"_skipped_step": True, ...} when a rank had no prompt that fits max_prompt_tokens)."""
    t0 = time.time()
    cfg, stop, teacher = run.cfg, run.stop, run.teacher
    batch, too_long = run.local_batch(rows, step_seed(cfg.seed, step), cfg.rollout.n)
    if batch is None:
        return {"_skipped_step": True, "_too_long": too_long}
    rows, ids, mask, noise = batch
    n = cfg.rollout.n
    golds = [r["gold"] for r in rows for _ in range(n)]

    # 1. rollouts under the behaviour policy (each prompt prefilled once for its n samples)
    run.policy.eval()
    sampler = make_sampler(cfg.method, cfg.rollout.temperature, step, eps, cfg.rollout.draft_k)
    ro = rollout(run.policy, teacher, ids, mask, max_new_tokens=cfg.rollout.max_new_tokens, sampler=sampler,
                 stop=stop, generator=noise, n=n, lockstep=run.lockstep, static_cache=cfg.rollout.static_cache,
                 compile_step=cfg.rollout.compile_step)
    t_roll = time.time()
    # rollout reward (a diagnostic; OPD itself needs no gold answers, e.g. OpenThoughts3 prompts)
    rewards = (run.grader.grade(decode_completions(run.tok, ro.tokens, ro.response_mask), golds)
               if all(g is not None for g in golds) else [])
    t_grade = time.time()

    # 2. teacher forward over the finished sequences (one prefill; fills in the teacher's records
    # when the sampler did not decode with it)
    seq, smask = ro.sequences()
    m = ro.response_mask
    tokens = ro.tokens[m]
    h_t = teacher_scores(teacher, ro, stop)
    t_teacher = time.time()

    # 3. student forward + loss + update
    run.objective.train()
    set_lr(cfg, run.opt, step)

    def distill(h_s, head):  # -> (loss, detached estimator value)
        return chunked_distill_loss(
            h_s, head, h_t, teacher.get_output_embeddings(),
            estimator=cfg.loss.estimator, k=cfg.loss.k, topk_baseline=cfg.loss.topk_baseline, tokens=tokens,
            behavior_logprobs=ro.behavior_logp[m], importance_weight=cfg.loss.importance_weight, veto_b=veto_b,
            stop_ids=stop.stop_ids, canonical_stop=stop.emit_id, chunk_size=cfg.loss.chunk_size,
        )

    loss, kl_value = run.objective(seq, smask, ids.shape[1], m, distill)
    n_tok = int(m.sum())
    loss_value, gnorm = _update(run, loss, n_tok, step)
    t_end = time.time()

    return {
        "loss": loss_value,
        "kl_estimate": float(kl_value),
        "grad_norm": gnorm,
        "lr": run.opt.param_groups[0]["lr"],
        **rollout_metrics(ro, rewards, sampler.eps, effective_temperature(sampler)),
        "veto/b": veto_b,
        "sft/active": 0.0,
        "time/rollout": t_roll - t0,
        "time/grade": t_grade - t_roll,
        "time/teacher": t_teacher - t_grade,
        "time/update": t_end - t_teacher,
        "time/step": t_end - t0,
        "throughput/rollout_tok_s": n_tok / max(t_roll - t0, 1e-9),
        "throughput/train_tok_s": int(smask.sum()) / max(t_end - t_grade, 1e-9),
        "_too_long": too_long,
        "_tokens": n_tok,
    }


def reduce_metrics(metrics: dict) -> dict:
    """One record from every rank's step metrics: token-weighted mean of kl_estimate, sums of the
    throughputs, the slowest rank's times, rank 0's value of the keys that are already global
    (loss, grad_norm, lr, eps, ...), the plain mean of the rest. Single process: the metrics
    without private keys."""
    parts = distributed.gather(metrics)
    if len(parts) == 1:
        return {k: v for k, v in metrics.items() if not k.startswith("_")}
    tokens = [p.get("_tokens", 0) for p in parts]
    out = {}
    for key, value in metrics.items():
        if key.startswith("_") or not isinstance(value, (int, float)):
            continue
        vals = [float(p[key]) for p in parts if key in p]
        if key in ("loss", "grad_norm", "lr", "eps", "veto/b", "sft/active", "sft/nll"):
            out[key] = vals[0]
        elif key == "kl_estimate":
            out[key] = sum(v * w for v, w in zip(vals, tokens)) / max(sum(tokens), 1)
        elif key.startswith("throughput/"):
            out[key] = sum(vals)
        elif key.startswith("time/"):
            out[key] = max(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out


_TEACHER_MODE = {"replicate": "replicated", "shard": "sharded"}
_RESUMABLE_IGNORED = ("resume", "keep_last", "logger", "output_dir", "threads", "device", "parallel")


def find_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: resume=PATH, or (auto) the run dir's last complete one.

    A run dir whose train_config.json describes a different run (in any key but those of
    _RESUMABLE_IGNORED: resume, keep_last, logger, output_dir, threads, device, parallel) is
    refused rather than mixed with this one."""
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
        diff = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_IGNORED and saved.get(k) != now.get(k))
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


def train(cfg: TrainConfig, run_dir: Path | str, log=print) -> dict:
    """Run distillation; write metrics.jsonl, checkpoints and summary.json into run_dir.

    Under torchrun or Slurm tasks (WORLD_SIZE > 1) every rank runs this with the same arguments:
    data-parallel, the student sharded with FSDP2 (see trb.distributed); rank 0 logs and writes.
    Returns the summary (also in summary.json) plus the trained model under "student"."""
    own_group = distributed.launched() and not torch.distributed.is_initialized()
    ok = False
    try:
        summary = _train(cfg, run_dir, log)
        ok = True
        return summary
    finally:
        if own_group:  # the process group was joined here (not by the CLI): leave it
            distributed.finish(barrier=ok)


def _train(cfg: TrainConfig, run_dir: Path | str, log) -> dict:
    world = distributed.init(cfg.device)
    if world.distributed:
        if cfg.prompts_per_step % world.size:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the {world.size} "
                             f"processes: each rank samples prompts_per_step / world size prompts")
        if not world.main:
            log = _quiet
        run_dir = distributed.gather(str(run_dir))[0]  # rank 0's run dir
    run_dir, device = prepare_run(run_dir, cfg.threads, cfg.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    seed_everything(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    if cfg.rollout.compile_search:
        compile_search(True)
    resume_from = find_resume(cfg, run_dir)
    if resume_from is not None:  # the student's weights come from the checkpoint
        student, tok = load_model(dataclasses.replace(cfg.student, path=str(resume_from)), "checkpoint", device)
    else:
        student, tok = load_model(cfg.student, "student", device)
    teacher, t_tok = load_model(cfg.teacher, "teacher", device)
    teacher.requires_grad_(False)
    stop = check_pair(student, tok, teacher, t_tok)
    vocab = student.config.vocab_size
    if cfg.loss.estimator == "topk" and cfg.loss.k > vocab:
        raise ValueError(f"loss.k={cfg.loss.k} exceeds the vocabulary size {vocab}; use loss.k <= {vocab} "
                         f"(or loss=full for the exact KL)")
    if cfg.method.name == "skd" and cfg.method.skd_top_k > vocab:
        raise ValueError(f"method.skd_top_k={cfg.method.skd_top_k} exceeds the vocabulary size {vocab}")
    train_rows = load_rows(cfg.dataset, cfg.seed, role="train")
    eval_rows = load_rows(cfg.eval_dataset or cfg.dataset, cfg.seed, role="eval")
    render(tok, train_rows[0]["question"], cfg.prompt)  # a prompt format the tokenizer cannot render fails now,
    # before anything is written into the run dir
    procs = f" x {world.size} processes (FSDP2 student, {_TEACHER_MODE[cfg.parallel.teacher]} teacher)"
    log(f"trb train: {len(train_rows)} train / {len(eval_rows)} eval prompts, {cfg.steps} steps, device {device}"
        f"{procs if world.distributed else ''}, run dir {run_dir}")

    policy = student
    if world.distributed:  # the rollout copy samples and evaluates; the shards train
        policy = copy.deepcopy(student).requires_grad_(False)
    objective = StudentObjective(student)
    if world.distributed:
        distributed.shard(objective, student)
        if cfg.parallel.teacher == "shard":
            distributed.shard_frozen(teacher)
    opt = torch.optim.AdamW(objective.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    schedule = cfg.blend.schedule()
    start, skipped_long, evals = 0, 0, []  # evals: one record per eval run {"step": k, "eval/...": ...}
    state = None
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        start, skipped_long = int(state["step"]), int(state.get("skipped_long", 0))
        distributed.load_optimizer_state(objective, opt, state["optimizer"])
        if world.main:
            evals = truncate_metrics(run_dir, start, final=start >= cfg.steps)
        log(f"resuming from {resume_from} (step {start})")
    tracker = Tracker(cfg.logger, run_dir, dataclasses.asdict(cfg), name=run_dir.name) if world.main else None
    if world.main:
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    grader = Grader(workers=1)
    run = _Run(cfg, world, objective, policy, teacher, tok, opt, stop, grader, gen, device)
    batches = prompt_batches(train_rows, cfg.prompts_per_step, cfg.seed)
    for _ in range(start):  # the data order continues where the checkpoint left it
        next(batches)

    def run_eval(step: int) -> None:
        t0 = time.time()
        res = evaluate_sharded(run, eval_rows)
        if res and world.main:
            res["time/eval"] = time.time() - t0
            tracker.log(res, step)
            log(f"step {step:5d}  eval accuracy {res['eval/accuracy']:.3f}")
            evals.append({"step": step, **res})

    def checkpoint(step: int, eps: float) -> Path:
        opt_state = distributed.optimizer_state(objective, opt)  # collective
        path = None
        if world.main:
            path = save_checkpoint(run_dir, step, policy, tok, opt_state,
                                   {"eps": eps, "gen": gen.get_state(), "skipped_long": skipped_long}, cfg.keep_last)
        distributed.barrier()
        return path

    method = cfg.method
    sft_pool = build_sft_pool(run, train_rows, log) if method.name == "sft_warmup" and start < method.sft_updates \
        else []
    veto = method.veto_schedule() if method.name == "veto" else None

    if state is not None:  # after every deterministic rebuild above: the RNG streams as saved
        restore_rng(state)
        gen.set_state(state["gen"])
    else:
        run_eval(0)
    t_start = time.time()
    from tqdm import tqdm

    bar = tqdm(range(start, cfg.steps), desc="train", dynamic_ncols=True, disable=None if world.main else True,
               initial=start, total=cfg.steps)
    for step in bar:
        epoch, rows = next(batches)  # every method sees the same prompts at the same step
        if sft_pool and step < method.sft_updates:  # SFT phase; update k uses the samples of step k mod pool
            metrics = sft_step(run, sft_pool[step % len(sft_pool)], step)
        else:
            metrics = opd_step(run, rows, step, schedule(step), veto(step) if veto else 0.0)
        too_long = int(distributed.all_sum([float(metrics.pop("_too_long", 0))], device)[0])
        skipped_long += too_long if cfg.rollout.long_prompts == "skip" else 0
        if metrics.pop("_skipped_step", False):
            log(f"step {step}: skipped (a process had no prompt within rollout.max_prompt_tokens)")
            continue
        metrics = reduce_metrics(metrics)
        metrics.update({"epoch": epoch, "prompts/skipped_too_long": skipped_long,
                        "prompts/too_long": too_long})
        if world.main:
            tracker.log(metrics, step)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", eps=f"{metrics['eps']:.4f}",
                        reward=f"{metrics.get('rollout/reward', float('nan')):.2f}",
                        acc=f"{evals[-1]['eval/accuracy']:.2f}" if evals else "-")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            run_eval(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            checkpoint(done, metrics["eps"])

    bar.close()
    if cfg.steps:
        run_eval(cfg.steps)
    ckpt = checkpoint(cfg.steps, schedule(cfg.steps))
    grader.close()
    replicas = distributed.gather(param_digest(policy))  # every rank's final weights, hashed
    summary = {
        "run_dir": str(run_dir),
        "method": method.name,
        "blend": cfg.blend.kind,
        "checkpoint": str(ckpt or list_checkpoints(run_dir)[-1]),
        "steps": cfg.steps,
        "processes": world.size,
        "replica_sha256": replicas,
        "teacher_params": {"total": sum(p.numel() for p in teacher.parameters()),  # held by rank 0 (sharded: less)
                           "rank0": sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                                        for p in teacher.parameters())},
        "train_seconds": time.time() - t_start,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "accuracy_before": evals[0]["eval/accuracy"] if evals else None,
        "accuracy_after": evals[-1]["eval/accuracy"] if evals else None,
        "eval": evals,
        "grading": dataclasses.asdict(grader.stats),
    }
    if world.main:
        tracker.log_artifact(ckpt, f"student-{run_dir.name}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        tracker.finish()
        log(f"done: accuracy {summary['accuracy_before']} -> {summary['accuracy_after']}; checkpoint {ckpt}")
    summary["student"] = policy  # in-process callers (tests, notebooks) get the trained model (full weights)
    return summary


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters (names and bytes, in order): equal digests, equal weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _quiet(*_args, **_kwargs) -> None:
    return None


def evaluate_sharded(run: _Run, rows: list[dict]) -> dict:
    """The periodic eval: problems split round-robin across ranks, graded samples gathered and
    aggregated on rank 0 (other ranks return {})."""
    world, cfg = run.world, run.cfg
    if not world.distributed:
        res, _ = evaluate(run.policy, run.tok, rows, run.stop, run.grader, cfg.prompt, cfg.eval_decoding)
        return res
    t0 = time.time()
    timeouts0 = run.grader.stats.timeouts
    mine = rows[world.rank :: world.size]
    _, samples = evaluate(run.policy, run.tok, mine, run.stop, run.grader, cfg.prompt, cfg.eval_decoding)
    for s in samples:  # local problem index -> global
        s["problem"] = world.rank + s["problem"] * world.size
    parts = distributed.gather((samples, run.grader.stats.timeouts - timeouts0))
    if not world.main or not rows:
        return {}
    merged = [s for part, _ in parts for s in part]
    return aggregate(rows, merged, cfg.eval_decoding, time.time() - t0, sum(s["tokens"] for s in merged),
                     sum(t for _, t in parts))
