"""On-policy distillation with Trust-Region behavior Blending: the training loop.

    trb train                                   # the embedded default (toy pair, CPU, minutes)
    trb train method=opd                        # vanilla OPD (also fixed, skd, veto, temp_warmup, sft_warmup)
    trb train blend=cosine blend.eps0=0.02 blend.horizon=50
    trb train -m method=opd,trb seed=0,1,2      # a sweep, one Hydra dir per job; then trb report
    torchrun --nproc_per_node 8 -m trb train experiment=paper_0.6b_4b

One step, top to bottom (`opd_step`): the method gives step k's sampler (eps_k from the blend
schedule) -> rollouts of this rank's prompts x n under it, with per-token records -> rewards from
math-verify -> `update`: the finished sequences in micro-batches of at most
train.micro_batch_tokens padded tokens; per micro-batch one teacher forward (no KV cache; it also
fills the teacher's records when the sampler did not decode with it), then the student's forward
and the chunked reverse-KL loss to the method's target (Veto: q ~ p_T p_S^B) and its backward,
gradients accumulating as the global token mean -> one clipped AdamW step -> metrics -> (every
eval_every steps) eval -> (every save_every steps) checkpoint. sft_warmup first samples the
teacher on the prompts of its first steps and runs sft_updates supervised steps on them (they
count as steps), then OPD.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from trb import distributed, rundir
from trb.blend import RowNoise, compile_search
from trb.checkpoint import (CheckpointWriteError, list_checkpoints, load_trainer_state, restore_rng, save_checkpoint,
                            truncate_metrics)
from trb import lora
from trb.config import LoggerConfig, TrainConfig
from trb.download import require_cached, train_items
from trb.data import DATA_FILE, check_same_data, data_record, fit_prompts, render, select_data
from trb.diagnostics import effective_temperature, rollout_metrics
from trb.distributed import World
from trb.errors import RunStopped, nothing_done
from trb.rundir import Claim
from trb.evaluate import aggregate, decode_completions, encode_prompts, evaluate
from trb.grading import Grader
from trb.losses import Estimator, Target, chunked_distill_loss, chunked_nll_loss
from trb.methods import Method
from trb.microbatch import MicroBatch, Sequences, filler, response_hidden, split
from trb.engine import check_temperature, make_engine, resolve_kind, serves
from trb.models import check_positions, activation_checkpointing, check_pair, load_model, prepare_run, resolve_path
from trb.rollout import Sampler, rollout, score_micro_batch, student_records
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


def set_lr(cfg: TrainConfig, opt, step: int) -> None:
    for g in opt.param_groups:
        g["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.steps, cfg.optim.decay,
                                           cfg.optim.min_lr_ratio)


def step_seed(seed: int, step: int, phase: int = 0) -> int:
    """The sampling seed of one step: each step's rollouts draw from a fresh, fixed stream, so a
    row's samples depend only on (seed, step, its index in the global batch)."""
    return int(np.random.SeedSequence([seed, phase, step]).generate_state(1)[0])


class StudentObjective(torch.nn.Module):
    """The student and a loss on its hidden states at one micro-batch's completion positions in
    one forward, so FSDP2 gathers the LM head (in the root group) for the chunked loss and reduces
    its gradient.

    forward(mb, loss_fn) -> loss_fn(hidden [N, H], head)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, mb: MicroBatch, loss_fn):
        return loss_fn(response_hidden(self.student, mb), self.student.get_output_embeddings())


@dataclasses.dataclass
class StepResult:
    """What one training step hands the loop: metrics of this rank, the prompts it found too long,
    and whether the step was skipped (some rank had no prompt left)."""

    metrics: dict
    too_long: int = 0
    skipped: bool = False
    samples: list | None = None  # a few of this rank's rollouts, for the W&B completions table


@dataclasses.dataclass
class Update:
    """The result of `update`: global token-mean loss and estimator value, grad norm, seconds spent
    in teacher forwards and in the rest of the update, micro-batches run."""

    loss: float
    value: float
    grad_norm: float
    t_teacher: float
    t_student: float
    micro_batches: int
    max_padded_tokens: int  # the largest micro-batch's rows x width (<= train.micro_batch_tokens when set)


@dataclasses.dataclass
class _Run:
    """What every step needs. objective: the trainable student (FSDP2-sharded under torchrun);
    policy: the model that samples, evaluates and is saved (the student itself in one process, its
    full rollout copy under torchrun); method: which sampler / target / SFT phase at each step."""

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
    method: Method
    estimator: Estimator
    engine: object = None  # trb.engine: trb's decoder (hf) or vLLM, for the student-only decodes
    version: tuple = ()  # (this run, optimiser steps taken): which weights the engine must hold
    adapter: object = None  # lora.rank > 0: the PEFT wrapper of the student's adapter

    def tracker_wants_table(self, step: int) -> bool:
        """Rank 0 with W&B or TensorBoard on logs a table of training completions every logger.table_every
        steps."""
        lg = self.cfg.logger
        return (self.world.main and lg.kind != "none" and lg.table_every > 0 and lg.table_rows > 0
                and step % lg.table_every == 0)

    def local_batch(self, rows: list[dict], seed: int, n: int):
        """This rank's share of a global prompt batch, encoded, and the noise source for its rows
        (n samples per prompt; one stream per row of the global batch, see RowNoise). Returns
        ((rows, ids, mask, noise) or None, number of prompts too long); None when some rank has no
        prompt left after skipping long ones (every rank then skips the step)."""
        lo, hi = self.world.slice(len(rows))
        cfg = self.cfg
        rows, ids, mask, too_long = encode_batch(self.tok, rows[lo:hi], cfg.prompt, cfg.rollout.max_prompt_tokens,
                                                 self.device, truncate=cfg.rollout.long_prompts == "truncate")
        counts = distributed.gather(len(rows))
        if min(counts) == 0:
            return None, too_long
        first = n * sum(counts[: self.world.rank])
        noise = RowNoise(seed, range(first, first + n * len(rows)), self.device)
        return (rows, ids, mask, noise), too_long

    @property
    def lockstep(self):
        """For a sharded teacher: every rank keeps decoding until all ranks' rows are done."""
        if self.world.distributed and self.cfg.parallel.teacher == "shard":
            return lambda finished: distributed.all_true(finished, self.device)
        return None

    def autocast(self):
        """One process with train.compute_dtype=bfloat16: autocast the student's forward (under
        FSDP2 the MixedPrecisionPolicy casts instead)."""
        if self.cfg.train.compute_dtype == "float32" or self.world.distributed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def refresh_policy(self) -> None:
        if self.policy is not self.objective.student:
            distributed.copy_full_params(self.objective.student, self.policy)

    @property
    def vllm(self) -> bool:
        return getattr(self.engine, "name", "hf") == "vllm"

    def sync_engine(self) -> float:
        """The engine gets the current weights (pushed from the trained student, FSDP2 shards one tensor at a
        time; a collective under torchrun, which every rank reaches at the same step); seconds spent."""
        return self.engine.sync(self.objective.student, self.version) if self.vllm else 0.0


def distill_loss(run: _Run, ro, target: Target):
    """make_loss for `update` on a rollout: per micro-batch one teacher forward (filling the
    teacher's records when the sampler did not decode with it), then the chunked reverse-KL loss of
    the student's hidden states to `target`."""
    teacher_head = run.teacher.get_output_embeddings()

    def make_loss(mb: MicroBatch, denominator: float):
        h_t = score_micro_batch(run.teacher, ro, mb, run.stop)
        tokens, behavior = ro.tokens[mb.rows, mb.cols], ro.behavior_logp[mb.rows, mb.cols]
        return lambda h_s, head: chunked_distill_loss(h_s, head, h_t, teacher_head, run.estimator, target,
                                                      tokens=tokens, behavior_logprobs=behavior,
                                                      chunk_size=run.cfg.loss.chunk_size, denominator=denominator)
    return make_loss


def update(run: _Run, seqs: Sequences, make_loss, step: int) -> Update:
    """Forward + backward per micro-batch of `seqs` (at most train.micro_batch_tokens padded tokens
    each), then one clipped AdamW step.

    make_loss(mb, denominator) -> loss_fn(h_s, head) -> (loss, value): the loss of one micro-batch,
    summed over its completion tokens and divided by `denominator`, so the accumulated gradient is
    the token-mean gradient of the whole global batch (under FSDP2, which averages over ranks,
    denominator = global tokens / world size). Every rank runs as many micro-batches as the rank
    with the most (zero-weight filler ones), since each FSDP2 forward is a collective; gradients
    are reduced across ranks only in the last backward. make_loss may run the teacher (its
    seconds are timed separately)."""
    cfg, world, dev = run.cfg, run.world, run.device
    mbs = split(seqs, cfg.train.micro_batch_tokens, run.stop.pad_id)
    total_tokens = distributed.all_sum([float(seqs.num_tokens)], dev)[0]
    n_mb = distributed.all_max(len(mbs), dev)
    denominator = max(total_tokens, 1.0) / world.size
    set_lr(cfg, run.opt, step)
    run.objective.train()
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    t_teacher, widest = 0.0, 0
    t0 = time.time()
    fill = filler(seqs, run.stop.pad_id) if n_mb > len(mbs) else None
    for i in range(n_mb):
        mb = mbs[i] if i < len(mbs) else fill
        widest = max(widest, mb.padded_tokens)
        if world.distributed:
            run.objective.set_requires_gradient_sync(i == n_mb - 1)
        t1 = time.time()
        loss_fn = make_loss(mb, denominator)
        t_teacher += time.time() - t1
        with run.autocast():
            loss, value = run.objective(mb, loss_fn)
        (loss * mb.weight).backward()
        sums += torch.stack([loss.detach(), value.detach()]).double() * mb.weight
    totals = distributed.all_sum(sums.tolist(), dev)
    global_loss, global_value = totals[0] / world.size, totals[1] / world.size
    gnorm = torch.nn.utils.clip_grad_norm_(run.objective.parameters(), cfg.optim.grad_clip or float("inf"))
    if isinstance(gnorm, DTensor):
        gnorm = gnorm.full_tensor()
    gnorm = float(gnorm)
    if not (math.isfinite(global_loss) and math.isfinite(gnorm)):
        run.opt.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(global_loss) else "gradient norm"
        raise FloatingPointError(f"non-finite {what} at step {step}: training stopped; the checkpoints written so "
                                 f"far are intact (lower optim.lr, check the models' dtypes, or resume from the "
                                 f"last one)")
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)  # no gradients are held while the next step decodes
    bad = nonfinite_params(run.objective.parameters(), dev)
    if bad:
        raise FloatingPointError(f"non-finite weights after the optimiser step at step {step} ({bad} parameter "
                                 f"tensors): training stopped; the checkpoints written so far are intact (lower "
                                 f"optim.lr, check the models' dtypes, or resume from the last one)")
    run.refresh_policy()
    run.version = (run.version[0], step + 1) if run.version else ()
    return Update(global_loss, global_value, gnorm, t_teacher, time.time() - t0 - t_teacher, n_mb, widest)


def nonfinite_params(params, device, across_ranks: bool = True) -> int:
    """How many parameter tensors hold a NaN or inf, summed over ranks (FSDP2: each rank's shards;
    across_ranks=False: this rank's full copy); one norm per tensor, no copy of the weights."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    local = [p.detach() for p in local if p.numel()]
    bad = float((~torch.isfinite(torch.stack(torch._foreach_norm(local)))).sum()) if local else 0.0  # one sync
    return int(distributed.all_sum([bad], device)[0]) if across_ranks else int(bad)


def build_sft_pool(run: _Run, train_rows, log) -> list[Sequences]:
    """sft_warmup: teacher samples (method.sft_samples per prompt) for the prompts of the first
    method.sft_prompt_steps steps (the same prompt stream the other methods see), one entry per
    step; this rank's share."""
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
                     generator=noise, n=m.sft_samples, lockstep=run.lockstep, max_rows=cfg.rollout.max_rows)
        pool.append(Sequences(ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.response_mask))
    n_seq = sum(distributed.gather(sum(p.tokens.shape[0] for p in pool)))
    log(f"sft_warmup: {n_seq} teacher samples for the prompts of {len(pool)} steps in {time.time() - t0:.1f} s; "
        f"{m.sft_updates} SFT updates, then OPD")
    return pool


def sft_step(run: _Run, seqs: Sequences, step: int) -> StepResult:
    """One supervised update on teacher samples (token-mean NLL of the teacher's tokens)."""
    t0 = time.time()
    target = Target(tuple(run.stop.stop_ids), run.stop.emit_id, vocab=run.stop.vocab)

    def make_loss(mb: MicroBatch, denominator: float):
        tokens = seqs.tokens[mb.rows, mb.cols]

        def nll(h_s, head):
            loss = chunked_nll_loss(h_s, head, tokens, target, chunk_size=run.cfg.loss.chunk_size,
                                    denominator=denominator)
            return loss, loss.detach()
        return nll

    up = update(run, seqs, make_loss, step)
    return StepResult({"loss": up.loss, "sft/nll": up.loss, "sft/active": 1.0, "eps": 0.0, "grad_norm": up.grad_norm,
                       "lr": run.opt.param_groups[0]["lr"], "time/step": time.time() - t0,
                       "train/micro_batches": up.micro_batches, "train/max_micro_batch_tokens": up.max_padded_tokens,
                       "rollout/length": float(seqs.response_mask.sum(1).float().mean())})


def opd_step(run: _Run, rows: list[dict], step: int) -> StepResult:
    """One on-policy distillation step under the method's sampler: rollouts (this rank's share of
    the prompts), rewards, then `update` (teacher scoring and the student's loss, micro-batch by
    micro-batch)."""
    t0 = time.time()
    cfg, stop, teacher = run.cfg, run.stop, run.teacher
    batch, too_long = run.local_batch(rows, step_seed(cfg.seed, step), cfg.rollout.n)
    if batch is None:
        return StepResult({}, too_long=too_long, skipped=True)
    rows, ids, mask, noise = batch
    golds = [r["gold"] for r in rows for _ in range(cfg.rollout.n)]

    # 1. rollouts under the behaviour policy (each prompt prefilled once for its n samples): the engine
    # when the sampler needs no teacher and the engine is vLLM, else trb's (dual-model) decoder
    run.policy.eval()
    sampler = run.method.sampler(step)
    on_engine = run.vllm and serves(sampler)
    t_push = 0.0
    if on_engine:
        t_push = run.sync_engine()
        ro = run.engine.sample(ids, mask, n=cfg.rollout.n, max_new_tokens=cfg.rollout.max_new_tokens,
                               sampler=sampler, stop=stop, noise=noise)
        run.engine.sleep()  # CUDA: its KV cache and weights are freed for the teacher and the update
        if not run.engine.exact_records(sampler, stop):  # temperature / nucleus / several stop ids
            student_records(run.policy, ro, sampler, stop, cfg.train.micro_batch_tokens)
    else:
        ro = rollout(run.policy, teacher, ids, mask, max_new_tokens=cfg.rollout.max_new_tokens, sampler=sampler,
                     stop=stop, generator=noise, n=cfg.rollout.n, lockstep=run.lockstep,
                     static_cache=cfg.rollout.static_cache, compile_step=cfg.rollout.compile_step,
                     max_rows=cfg.rollout.max_rows)
    t_roll = time.time()
    # rollout reward (a diagnostic; OPD itself needs no gold answers, e.g. OpenThoughts3 prompts)
    graded, table = all(g is not None for g in golds), run.tracker_wants_table(step)
    texts = decode_completions(run.tok, ro.tokens, ro.response_mask) if graded or table else []
    judged = run.grader.judge(texts, golds) if graded else []
    rewards = [j.correct for j in judged]
    t_grade = time.time()
    samples = None
    if table:
        rows_shown = range(min(run.cfg.logger.table_rows, len(texts)))
        mask = ro.response_mask.float()
        beta = ((ro.beta.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
        samples = [[step, run.tok.decode(ro.prompt_ids[b][ro.prompt_mask[b].bool()]), texts[b], golds[b],
                    judged[b].extracted if judged else None, float(rewards[b]) if rewards else None, beta[b]]
                   for b in rows_shown]

    # 2. per micro-batch: teacher forward (fills the teacher's records when it did not decode), then
    # the student's loss to the method's target; one optimiser step
    target = Target(tuple(stop.stop_ids), stop.emit_id, run.method.veto_b(step), stop.vocab)
    up = update(run, ro, distill_loss(run, ro, target), step)
    t_end = time.time()
    n_tok = int(ro.response_mask.sum())
    seq_tokens = int(ro.prompt_mask.sum()) + n_tok
    return StepResult({
        "loss": up.loss,
        "kl_estimate": up.value,
        "grad_norm": up.grad_norm,
        "lr": run.opt.param_groups[0]["lr"],
        **rollout_metrics(ro, rewards, sampler.eps, effective_temperature(sampler)),
        "veto/b": target.veto_b,
        "sft/active": 0.0,
        "rollout/engine_vllm": float(on_engine),  # which decoder sampled this step (1: vLLM, 0: trb's)
        "time/weight_push": t_push,
        "train/micro_batches": up.micro_batches,
        "train/max_micro_batch_tokens": up.max_padded_tokens,
        "time/rollout": t_roll - t0 - t_push,
        "time/grade": t_grade - t_roll,
        "time/teacher": up.t_teacher,
        "time/update": up.t_student,
        "time/step": t_end - t0,
        "throughput/rollout_tok_s": n_tok / max(t_roll - t0 - t_push, 1e-9),
        "throughput/train_tok_s": seq_tokens / max(t_end - t_grade, 1e-9),
    }, too_long=too_long, samples=samples)


def reduce_metrics(result: StepResult) -> dict:
    """One record from every rank's step metrics: sums of the throughputs, the slowest rank's
    times, rank 0's value of the keys that are already global (loss, kl_estimate, grad_norm, lr,
    eps, ...), the plain mean of the rest. Single process: the metrics."""
    parts = distributed.gather(result.metrics)
    if len(parts) == 1:
        return dict(result.metrics)
    out = {}
    for key, value in result.metrics.items():
        if not isinstance(value, (int, float)):
            continue
        vals = [float(p[key]) for p in parts if key in p]
        if key in ("loss", "kl_estimate", "grad_norm", "lr", "eps", "veto/b", "sft/active", "sft/nll",
                   "train/micro_batches"):
            out[key] = vals[0]
        elif key.startswith("throughput/"):
            out[key] = sum(vals)
        elif key.startswith("time/") or key == "train/max_micro_batch_tokens":
            out[key] = max(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out


_TEACHER_MODE = {"replicate": "replicated", "shard": "sharded"}


def train(cfg: TrainConfig, run_dir: Path | str, log=print) -> dict:
    """Run distillation; write metrics.jsonl, checkpoints and summary.json into run_dir.

    Under torchrun or Slurm tasks (WORLD_SIZE > 1) every rank runs this with the same arguments:
    data-parallel, the student sharded with FSDP2 (see trb.distributed); rank 0 logs and writes.
    Returns the summary (also in summary.json) plus the trained model under "student". A run dir whose
    run already finished these steps is left as it is: the saved summary comes back with already_done
    = true (and no "student")."""
    own_group = distributed.launched() and not torch.distributed.is_initialized()
    ok = False
    try:
        world = distributed.init(cfg.device)
        if world.distributed:
            if cfg.prompts_per_step % world.size:
                raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the {world.size} "
                                 f"processes: each rank samples prompts_per_step / world size prompts")
            if not world.main:
                log = _quiet
            run_dir = distributed.gather(str(run_dir))[0]  # rank 0's run dir
        require_cached(train_items(cfg))  # every hub model and dataset of the run, all named at once if missing
        check_plan(cfg, world, log)
        claim = claim_run_dir(cfg, world, Path(run_dir))
        if claim.done is not None:
            claim.release()
            nothing_done()
            summary = claim.done
            log(f"already done: {run_dir} finished all {cfg.steps} steps (accuracy {summary.get('accuracy_before')} "
                f"-> {summary.get('accuracy_after')}; checkpoint {summary.get('checkpoint')}); nothing was run or "
                f"written. Raise steps= to train further, or overwrite=true to start over")
            ok = True
            return {**summary, "already_done": True}
        try:
            try:
                session = build(cfg, world, Path(run_dir), claim, log)
            except BaseException:
                if claim is not None:
                    claim.abort()  # a refusal: the run dir as it was
                raise
            loop(session, log)
            summary = finish(session, log)
        finally:
            if claim is not None:
                claim.release()
        ok = True
        return summary
    finally:
        if own_group:  # the process group was joined here (not by the CLI): leave it
            distributed.finish(barrier=ok)


def _base_name(cfg: TrainConfig) -> str:
    """The base model a LoRA checkpoint names (adapter_config.json): a local folder as an absolute path, a hub
    id as it is."""
    path = resolve_path(cfg.student, "student")
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


def train_group(logger: LoggerConfig, run_dir: Path) -> str:
    """A train run's W&B group: logger.group (a sweep's dir name), else the run dir's name, which the evals of
    the run dir (`trb eval checkpoint=RUN_DIR`) join."""
    return logger.group or Path(run_dir).name


COMPLETION_COLUMNS = ["step", "prompt", "completion", "gold", "extracted", "reward", "mean_beta"]  # W&B / TB table
_PROMPT_SAMPLE = 2000  # training prompts whose length is checked at start


def claim_run_dir(cfg: TrainConfig, world: World, run_dir: Path) -> Claim:
    """Rank 0 locks the run dir and decides where the run starts (trb.rundir); every rank gets the
    same decision (or the same refusal). Other ranks return a Claim without a lock."""
    claim, refusal = None, None
    if world.main:
        try:
            claim = rundir.claim(cfg, run_dir)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            if not world.distributed:
                raise
            refusal = err
    decision = (str(refusal) if refusal else None, type(refusal).__name__ if refusal else None,
                str(claim.resume_from) if claim and claim.resume_from else None, claim.done if claim else None)
    message, kind, resume, done = distributed.gather(decision)[0]
    if message:
        raise rundir.RunDirError(message) if kind == "RunDirError" else RuntimeError(f"rank 0: {kind}: {message}")
    return claim or rundir.Claim(run_dir, Path(resume) if resume else None, None, False, [], False, [], done=done)


def _host_available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


CPU_RESERVE_GB = 0.5  # kept free of the host's available memory when a CPU run is planned


def check_plan(cfg: TrainConfig, world: World, log) -> None:
    """plan.check: the memory plan of this run, refused in seconds if it cannot fit, before any
    weight is loaded or anything is written: per GPU on GPUs; on the CPU against the host memory
    available now (shared by the processes), with trb's decoder (engine=auto there)."""
    if not cfg.plan.check:
        return
    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    from trb.plan import PlanError, plan_memory

    device_gb, where = 0.0, "per device"
    if not on_gpu:  # (whether a GPU asked for exists is checked when the device is picked)
        avail = _host_available_gb()
        if avail is None:
            return
        device_gb, where = avail / world.size, f"of the host's {avail:.1f} GB available now"
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, kind=resolve_kind(
            cfg.engine.kind, torch.device("cpu"))), plan=dataclasses.replace(cfg.plan, reserve_gb=min(
                cfg.plan.reserve_gb, CPU_RESERVE_GB)))
    try:
        plan = plan_memory(cfg, world_size=world.size, device_gb=device_gb)
    except (PlanError, ValueError, OSError) as err:  # (a broken config.json is named when the model loads)
        log(f"warning: no memory plan ({str(err).splitlines()[0] if str(err) else type(err).__name__}); starting "
            f"without the check")
        return
    if not plan.fits:
        raise ValueError(plan.refusal() if on_gpu else f"on the CPU ({where}): {plan.refusal()}")
    if on_gpu:
        log(f"memory plan: peak {plan.peak_gb:.1f} GB of {plan.device_gb:.0f} GB per device ({plan.peak_phase})")


@dataclasses.dataclass
class _Session:
    """A built run and its loop state."""

    run: _Run
    run_dir: Path
    tracker: Tracker | None
    train_rows: list
    eval_rows: list
    start: int
    skipped_long: int
    evals: list  # one record per eval run {"step": k, "eval/...": ...}
    state: dict | None
    resume_from: Path | None
    sft_pool: list
    t_start: float = 0.0
    engine_at_start: tuple = (0, 0.0)  # the engine's (pushes, push seconds) before this run (a reused engine)


def build(cfg: TrainConfig, world: World, run_dir: Path, claim: Claim, log) -> _Session:
    """Load the models, shard them, build the optimiser and method, restore a checkpoint; nothing is
    written into the run dir before everything a user could get wrong has been checked."""
    run_dir, device = prepare_run(run_dir, cfg.threads, cfg.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda" and cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    if cfg.rollout.compile_search:
        compile_search(True)
    for note in claim.notes:
        log(note)
    resume_from = claim.resume_from
    # the data first (seconds, no weights): which rows each role gets, never shared silently, and on resume
    # the same rows as the run used so far
    train_sel, eval_sel, overlap = select_data(cfg.dataset, cfg.eval_dataset, cfg.seed, cfg.eval_overlap, log)
    data = data_record(train_sel, eval_sel, overlap, cfg.eval_overlap)
    if resume_from is not None:
        check_same_data(Path(resume_from).parent.parent / DATA_FILE, data)
    train_rows, eval_rows = train_sel.rows, eval_sel.rows
    adapter = None  # lora.rank > 0: the PEFT wrapper of the student's adapter (for saving)
    if cfg.lora.rank:  # the base from student.path, the adapter fresh or (on resume) the checkpoint's
        student, tok = load_model(cfg.student, "student", device)
        adapter = lora.apply_lora(student, cfg.lora, base_path=_base_name(cfg))
        if resume_from is not None:
            lora.load_adapter_weights(adapter, resume_from)
    elif resume_from is not None:  # the student's weights come from the checkpoint
        student, tok = load_model(dataclasses.replace(cfg.student, path=str(resume_from)), "checkpoint", device,
                                 setting="resume")
    else:
        student, tok = load_model(cfg.student, "student", device)
    teacher, t_tok = load_model(cfg.teacher, "teacher", device)
    teacher.requires_grad_(False)
    # (load_model refused weights with NaN / inf, or that do not fill their config.json)
    stop = check_pair(student, tok, teacher, t_tok)
    longest = cfg.rollout.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval_decoding.max_new_tokens)
    check_positions((student, teacher), longest, "rollout.max_prompt_tokens + rollout.max_new_tokens (or "
                                                 "eval_decoding.max_new_tokens)")
    vocab = stop.vocab
    if cfg.loss.estimator == "topk" and cfg.loss.k > vocab:
        raise ValueError(f"loss.k={cfg.loss.k} exceeds the vocabulary size {vocab}; use loss.k <= {vocab} "
                         f"(or loss=full for the exact KL)")
    if cfg.method.name == "skd" and cfg.method.skd_top_k > vocab:
        raise ValueError(f"method.skd_top_k={cfg.method.skd_top_k} exceeds the vocabulary size {vocab}")
    render(tok, train_rows[0]["question"], cfg.prompt)  # a prompt format the tokenizer cannot render fails now,
    # before anything is written into the run dir
    if cfg.rollout.long_prompts == "skip":  # a run whose every step would be skipped trains nothing
        sample = train_rows[:_PROMPT_SAMPLE]  # bounded: rendering 100k chat prompts would take minutes
        fitting, too_long = fit_prompts(tok, sample, cfg.prompt, cfg.rollout.max_prompt_tokens)
        of = f"the first {len(sample)}" if len(sample) < len(train_rows) else f"{len(sample)}"
        if not fitting:
            raise ValueError(f"none of {of} training prompts fits rollout.max_prompt_tokens="
                             f"{cfg.rollout.max_prompt_tokens}: every step would be skipped; raise it or set "
                             f"rollout.long_prompts=truncate")
        if too_long:
            log(f"warning: {too_long} of {of} training prompts exceed rollout.max_prompt_tokens="
                f"{cfg.rollout.max_prompt_tokens} and are skipped when drawn (prompts/skipped_too_long)")
    eval_rows, eval_too_long = fit_prompts(tok, eval_rows, cfg.prompt, cfg.rollout.max_prompt_tokens)
    if eval_too_long:  # the periodic eval obeys the same prompt bound as the rollouts
        if not eval_rows:
            raise ValueError(f"no eval problem fits rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}; "
                             f"raise it")
        log(f"warning: {eval_too_long} eval problems exceed rollout.max_prompt_tokens="
            f"{cfg.rollout.max_prompt_tokens} and are left out of the periodic eval")
    procs = f" x {world.size} processes (FSDP2 student, {_TEACHER_MODE[cfg.parallel.teacher]} teacher)"
    log(f"trb train: {len(train_rows)} train / {len(eval_rows)} eval prompts, {cfg.steps} steps, device {device}"
        f"{procs if world.distributed else ''}, run dir {run_dir}")
    log(f"data: train {train_sel.source} ({len(train_rows)} of {train_sel.available} rows); eval "
        f"{eval_sel.source} ({len(eval_sel.rows)} of {eval_sel.available}); "
        f"{overlap} training prompts repeat an eval problem (eval_overlap={cfg.eval_overlap})")

    policy = student
    policy_dtype = getattr(torch, cfg.rollout.dtype) if cfg.rollout.dtype != "auto" else student.dtype
    if world.distributed or policy_dtype != student.dtype:  # the rollout copy samples and evaluates
        policy = copy.deepcopy(student).to(policy_dtype).requires_grad_(False)
    if cfg.train.activation_checkpointing:
        activation_checkpointing(student)
    objective = StudentObjective(student)
    if world.distributed:
        distributed.shard(objective, student, getattr(torch, cfg.train.compute_dtype))
        if cfg.parallel.teacher == "shard":
            distributed.shard_frozen(teacher)
    # (a LoRA student: only the adapter's parameters get gradients and AdamW state)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    start, skipped_long, evals, state = 0, 0, [], None
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        start, skipped_long = int(state["step"]), int(state.get("skipped_long", 0))
        distributed.load_optimizer_state(objective, opt, state["optimizer"])
    # the engine of the student-only decodes; vLLM starts from the folder the student's weights came from
    # (the checkpoint on resume), in the rollout copy's dtype
    version = (uuid.uuid4().hex, start)
    kind = resolve_kind(cfg.engine.kind, device, setting="engine")
    check_temperature(kind, cfg.rollout.temperature, "rollout.temperature")
    check_temperature(kind, cfg.eval_decoding.temperature, "eval_decoding.temperature", cfg.eval_decoding.greedy)
    max_len = cfg.engine.max_model_len or cfg.rollout.max_prompt_tokens + max(cfg.rollout.max_new_tokens,
                                                                              cfg.eval_decoding.max_new_tokens)
    engine = make_engine(kind, policy, str(resume_from) if resume_from is not None and adapter is None else
                         resolve_path(cfg.student, "student"), policy.dtype, cfg.engine, max_len, cfg.seed, device,
                         version=version, trust_remote_code=cfg.student.trust_remote_code,
                         distributed=world.distributed, training=True, setting="student.path", log=log,
                         # (a resumed LoRA student: the base folder holds other weights, the merged ones are pushed)
                         weights_from_path=adapter is None or resume_from is None)
    engine.sleep()  # CUDA: nothing of it stays awake until its first decode (the sync then pushes the weights)
    if world.main:  # the first write into the run dir
        moved = claim.commit()
        if moved is not None:
            log(f"overwrite=true: the previous run's files moved to {moved}")
        claim.write_config(dataclasses.asdict(cfg))  # the run dir's owner record, before anything else of the run
        rundir.write_atomic(run_dir / DATA_FILE, json.dumps(data))  # the rows this run trains and evaluates on
        if resume_from is not None:
            evals = truncate_metrics(run_dir, start, final=start >= cfg.steps)
    if resume_from is not None:
        log(f"resuming from {resume_from} (step {start})")
    tracker = Tracker(cfg.logger, run_dir, dataclasses.asdict(cfg), name=run_dir.name,
                      group=train_group(cfg.logger, run_dir), start_step=start) if world.main else None
    if tracker is not None:
        for rec in evals:
            if rec["step"] >= start:  # the eval at the resumed step, logged before its checkpoint
                tracker.replay(rec)
    method = Method(cfg.method, cfg.blend, cfg.rollout.temperature, cfg.rollout.draft_k)
    run = _Run(cfg, world, objective, policy, teacher, tok, opt, stop, Grader(workers=1), gen, device, method,
               Estimator.from_config(cfg.loss), engine, version, adapter)
    sft_pool = build_sft_pool(run, train_rows, log) if method.sft(start) else []
    if state is not None:  # after every deterministic rebuild above: the RNG streams as saved
        restore_rng(state)
        gen.set_state(state["gen"])
    return _Session(run, run_dir, tracker, train_rows, eval_rows, start, skipped_long, evals, state, resume_from,
                    sft_pool, engine_at_start=(getattr(engine, "pushes", 0), getattr(engine, "push_seconds", 0.0)))


def _run_eval(s: _Session, step: int, log) -> None:
    from tqdm import tqdm

    t0 = time.time()
    total = len(s.eval_rows) * s.run.cfg.eval_decoding.n
    with tqdm(total=total, desc=f"eval @ {step}", leave=False, dynamic_ncols=True,
              disable=None if s.run.world.main else True) as bar:  # a bar under a terminal only
        res = evaluate_sharded(s.run, s.eval_rows, progress=bar.update)
    if res and s.run.world.main:
        res["time/eval"] = time.time() - t0
        s.tracker.log(res, step)
        log(f"step {step:5d}  eval accuracy {res['eval/accuracy']:.3f}")
        s.evals.append({"step": step, **res})


def _checkpoint(s: _Session, step: int) -> Path | None:
    """Save the trained (master) weights: the student itself in one process, the rollout copy under
    torchrun when it has the master dtype, else the full state gathered from the shards."""
    run = s.run
    opt_state = distributed.optimizer_state(run.objective, run.opt)  # collective
    model, weights = run.policy, None
    if run.adapter is not None:  # LoRA: the adapter in PEFT's format (+ the merged model with lora.save_merged)
        full = (distributed.full_model_state(run.objective, prefix="student.") if run.world.distributed
                else run.objective.student.state_dict())  # collective under torchrun
        merged = None
        if run.cfg.lora.save_merged:  # every rank iterates (all-gathers are collectives); rank 0 keeps, on the CPU
            merged = {}
            for name, tensor in lora.plain_weights(run.objective.student):
                if run.world.main:
                    merged[name] = tensor.cpu()
        model = lora.AdapterFolder(run.adapter, lora.adapter_state(run.adapter, full), merged, run.tok)
    elif not run.world.distributed:
        model = run.objective.student
    elif run.policy.dtype != _master_dtype(run):
        weights = distributed.full_model_state(run.objective, prefix="student.")  # collective
    path, failed = None, None
    if run.world.main:
        try:
            path = save_checkpoint(s.run_dir, step, model, run.tok, opt_state,
                                   {"eps": run.method.eps(step), "gen": run.gen.get_state(),
                                    "skipped_long": s.skipped_long}, run.cfg.keep_last, state_dict=weights)
        except CheckpointWriteError as err:
            if not run.world.distributed:
                raise
            failed = str(err)
    failed = distributed.gather(failed)[0] if run.world.distributed else None  # every rank stops, none waits
    if failed:
        raise RunStopped(failed)
    distributed.barrier()
    return path


def loop(s: _Session, log) -> None:
    """Steps start .. cfg.steps: one SFT or OPD step each, then the eval and checkpoint due."""
    run, cfg = s.run, s.run.cfg
    batches = prompt_batches(s.train_rows, cfg.prompts_per_step, cfg.seed)
    for _ in range(s.start):  # the data order continues where the checkpoint left it
        next(batches)
    if s.state is None:
        _run_eval(s, 0, log)
    s.t_start = time.time()
    from tqdm import tqdm

    bar = tqdm(range(s.start, cfg.steps), desc="train", dynamic_ncols=True,
               disable=None if run.world.main else True, initial=s.start, total=cfg.steps)
    if not bar.disable:  # a terminal: other lines print above the bar instead of through it
        log = _above(bar, log)
    for step in bar:
        epoch, rows = next(batches)  # every method sees the same prompts at the same step
        if s.sft_pool and run.method.sft(step):  # SFT phase; update k uses the samples of step k mod pool
            result = sft_step(run, s.sft_pool[step % len(s.sft_pool)], step)
        else:
            result = opd_step(run, rows, step)
        too_long = int(distributed.all_sum([float(result.too_long)], run.device)[0])
        s.skipped_long += too_long if cfg.rollout.long_prompts == "skip" else 0
        if result.skipped:
            log(f"step {step}: skipped (a process had no prompt within rollout.max_prompt_tokens)")
        else:
            metrics = reduce_metrics(result)
            metrics.update({"epoch": epoch, "prompts/skipped_too_long": s.skipped_long,
                            "prompts/too_long": too_long})
            if run.world.main:
                s.tracker.log(metrics, step)
                if result.samples:
                    s.tracker.table("train/completions", COMPLETION_COLUMNS, result.samples, step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", eps=f"{metrics['eps']:.4f}",
                            reward=f"{metrics.get('rollout/reward', float('nan')):.2f}",
                            acc=f"{s.evals[-1]['eval/accuracy']:.2f}" if s.evals else "-")
            if bar.disable and cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                log(step_line(step, cfg.steps, metrics, s.start, time.time() - s.t_start))  # no terminal: lines
        done = step + 1  # a skipped step still counts: the eval and checkpoint due at it run
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            _run_eval(s, done, log)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            _checkpoint(s, done)
    bar.close()


def _above(bar, log):
    def write(msg: str) -> None:
        bar.write(msg)
        if getattr(log, "file", None) is not None:  # the run dir's log still gets the line
            log.file(msg)
    return write


def step_line(step: int, steps: int, m: dict, start: int, elapsed: float) -> str:
    """One console line per log_every steps where no progress bar is drawn (Slurm logs, nohup, CI)."""
    done = step + 1 - start
    eta = elapsed / max(done, 1) * (steps - step - 1)
    parts = [f"step {step + 1}/{steps}", f"loss {m['loss']:.4f}", f"eps {m.get('eps', 0.0):.4g}"]
    if "beta/mean" in m:
        parts.append(f"beta {m['beta/mean']:.3f}")
    if "rollout/reward" in m:
        parts.append(f"reward {m['rollout/reward']:.3f}")
    if "throughput/train_tok_s" in m:
        parts.append(f"{m['throughput/train_tok_s']:.0f} train tok/s")
    parts.append(f"{elapsed / max(done, 1):.2f} s/step, ETA {_clock(eta)}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def finish(s: _Session, log) -> dict:
    """The final eval and checkpoint, summary.json; returns the summary (+ the trained model)."""
    run, cfg, world = s.run, s.run.cfg, s.run.world
    if cfg.steps:
        _run_eval(s, cfg.steps, log)
    ckpt = _checkpoint(s, cfg.steps)
    run.grader.close()
    replicas = distributed.gather(param_digest(run.policy))  # every rank's final weights, hashed
    teacher = run.teacher
    copy_info = {"dtype": str(run.policy.dtype).removeprefix("torch."),
                 "separate": run.policy is not run.objective.student}
    if copy_info["separate"] and not world.distributed:  # the copy is the master rounded to its dtype
        copy_info["max_abs_diff_to_master"] = max(
            float((p.detach().to(q.dtype) - q).abs().max()) for p, q in
            zip(run.objective.student.parameters(), run.policy.parameters()))
    summary = {
        "run_dir": str(s.run_dir),
        "method": run.method.name,
        "blend": cfg.blend.kind,
        "checkpoint": str(ckpt or list_checkpoints(s.run_dir)[-1]),
        "steps": cfg.steps,
        "processes": world.size,
        "rollout_copy": copy_info,
        "engine": {"kind": getattr(run.engine, "name", "hf"),  # weight pushes of this run (this process)
                   "pushes": getattr(run.engine, "pushes", 0) - s.engine_at_start[0],
                   "push_seconds": getattr(run.engine, "push_seconds", 0.0) - s.engine_at_start[1]},
        "replica_sha256": replicas,
        "teacher_params": {"total": sum(p.numel() for p in teacher.parameters()),  # held by rank 0 (sharded: less)
                           "rank0": sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                                        for p in teacher.parameters())},
        "train_seconds": time.time() - s.t_start,
        "resumed_from": str(s.resume_from) if s.resume_from is not None else None,
        "accuracy_before": s.evals[0]["eval/accuracy"] if s.evals else None,
        "accuracy_after": s.evals[-1]["eval/accuracy"] if s.evals else None,
        "eval": s.evals,
        "grading": dataclasses.asdict(run.grader.stats),
    }
    if world.main:
        meta = {"step": cfg.steps, "method": run.method.name, "blend": cfg.blend.kind, "student": cfg.student.path,
                "teacher": cfg.teacher.path, "dataset": cfg.dataset.name, "run_dir": str(s.run_dir),
                "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
                "eval": s.evals[-1] if s.evals else None, "config": dataclasses.asdict(cfg)}
        s.tracker.log_artifact(ckpt, f"student-{s.run_dir.name}", what=cfg.logger.artifact,
                               aliases=[f"step-{cfg.steps}"], metadata=meta)
        (s.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        s.tracker.finish()
        log(f"done: accuracy {summary['accuracy_before']} -> {summary['accuracy_after']}; checkpoint {ckpt}")
    # in-process callers (tests, notebooks) get the trained model (full weights; one process: the master)
    summary["student"] = run.policy if world.distributed else run.objective.student
    return summary


def _master_dtype(run: _Run) -> torch.dtype:
    p = next(run.objective.parameters())
    return (p.to_local() if isinstance(p, DTensor) else p).dtype


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters (names and bytes, in order): equal digests, equal weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _quiet(*_args, **_kwargs) -> None:
    return None


def evaluate_sharded(run: _Run, rows: list[dict], progress=None) -> dict:
    """The periodic eval: problems split round-robin across ranks, graded samples gathered and
    aggregated on rank 0 (other ranks return {})."""
    decoder = run.engine if run.vllm else run.policy
    run.sync_engine()
    try:
        return _evaluate_sharded(run, decoder, rows, progress)
    finally:
        if run.vllm:
            run.engine.sleep()


def _evaluate_sharded(run: _Run, decoder, rows: list[dict], progress=None) -> dict:
    world, cfg = run.world, run.cfg
    if not world.distributed:
        res, _ = evaluate(decoder, run.tok, rows, run.stop, run.grader, cfg.prompt, cfg.eval_decoding,
                          progress=progress)
        return res
    t0 = time.time()
    timeouts0 = run.grader.stats.timeouts
    mine = rows[world.rank :: world.size]
    _, samples = evaluate(decoder, run.tok, mine, run.stop, run.grader, cfg.prompt, cfg.eval_decoding,
                          problem_ids=list(range(len(rows)))[world.rank :: world.size],
                          progress=(lambda k: progress(k * world.size)) if progress else None)  # rank 0's share
    for s in samples:  # local problem index -> global
        s["problem"] = world.rank + s["problem"] * world.size
    parts = distributed.gather((samples, run.grader.stats.timeouts - timeouts0))
    if not world.main or not rows:
        return {}
    merged = [s for part, _ in parts for s in part]
    return aggregate(rows, merged, cfg.eval_decoding, time.time() - t0, sum(s["tokens"] for s in merged),
                     sum(t for _, t in parts))
