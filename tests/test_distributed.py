"""Data-parallel training under torchrun (gloo on CPU): FSDP2-sharded student, per-rank rollouts.

A 2-process run must end with the same weights on both ranks and match a 1-process run with the
same global batch and seed: each row's sampling noise comes from its own stream (RowNoise)
and each rank's loss is rescaled to the global token mean, so the only differences left are
float rounding (padding widths, the order of the gradient reduction). Stated tolerance: 1e-5
absolute on every weight after 3 AdamW steps at lr 1e-3 (measured: 7e-8).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trb.blend import RowNoise, sample_from_logprobs

pytestmark = pytest.mark.slow

COMMON = ["steps=3", "prompts_per_step=4", "rollout.n=2", "eval_every=0", "save_every=2", "logger.kind=none",
          "rollout.max_prompt_tokens=60"]  # toy prompts are <= 39 tokens: nothing is skipped
MICRO = "train.micro_batch_tokens=170"  # about two of the toy's ~80-token sequences per micro-batch
TOL = 1e-5


def _run(args: list[str], cwd: Path, procs: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "trb", *args]
    else:
        cmd = [sys.executable, "-m", "trb", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _evals(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["eval/accuracy"] for r in recs if "eval/accuracy" in r}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_per_row_noise_draws_the_global_batch_samples():
    """A rank holding rows lo..hi of the global batch draws exactly those rows' samples of the 1-process
    run, step after step, without drawing the other rows' noise."""
    logits = torch.randn(6, 50).log_softmax(-1)
    full = RowNoise(3, range(6), "cpu")
    ref = [sample_from_logprobs(logits, full) for _ in range(3)]
    for lo, hi in ((0, 2), (2, 5), (5, 6)):
        part = RowNoise(3, range(lo, hi), "cpu")
        for step in range(3):
            assert torch.equal(sample_from_logprobs(logits[lo:hi], part), ref[step][lo:hi])
    # rows leaving keep the others' streams: drop row 1 after the first draw
    noise = RowNoise(3, range(6), "cpu")
    sample_from_logprobs(logits, noise)
    keep = [0, 2, 3, 4, 5]
    assert torch.equal(sample_from_logprobs(logits[keep], noise.select(keep)), ref[1][keep])


def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    r1 = _run(["train", *COMMON, f"output_dir={one}"], tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # 2 processes with micro-batches (gradient sync on the last; filler micro-batches where a rank has fewer)
    r2 = _run(["train", *COMMON, MICRO, f"output_dir={two}"], tmp_path, procs=2)
    assert r2.returncode == 0, r2.stderr[-3000:]

    s2 = json.loads((two / "summary.json").read_text())
    assert s2["processes"] == 2
    assert len(s2["replica_sha256"]) == 2 and len(set(s2["replica_sha256"])) == 1  # identical on both ranks
    assert json.loads((one / "summary.json").read_text())["processes"] == 1
    recs = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(x["train/micro_batches"] >= 2 and x["train/max_micro_batch_tokens"] <= 170 for x in recs)
    # the 2-process micro-batched run is the 1-process one-shot run up to float rounding
    assert _max_diff(_weights(one, 3), _weights(two, 3)) < TOL
    l1, l2 = _losses(one), _losses(two)
    assert l1.keys() == l2.keys() == {0, 1, 2}
    assert all(abs(l1[k] - l2[k]) < 1e-4 for k in l1)
    # the sharded eval (problems split across ranks, samples gathered) equals the 1-process eval
    assert _evals(one) == _evals(two)
    assert _evals(two).keys() == {0, 3}
    # only rank 0 wrote: one metrics record per step / eval
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 3 + 2

    # the same with the teacher sharded too (every rank decodes in lockstep while the teacher runs)
    r4 = _run(["train", *COMMON, f"output_dir={tmp_path / 'shard'}", "parallel.teacher=shard"], tmp_path, procs=2)
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert "sharded teacher" in r4.stdout
    s4 = json.loads((tmp_path / "shard" / "summary.json").read_text())
    assert s2["teacher_params"]["rank0"] == s2["teacher_params"]["total"]  # replicated: all of it on rank 0
    assert s4["teacher_params"]["rank0"] < 0.6 * s4["teacher_params"]["total"]  # sharded: about half (+ the LM head)
    assert _max_diff(_weights(one, 3), _weights(tmp_path / "shard", 3)) < TOL
    assert _evals(tmp_path / "shard") == _evals(one)

    # resume the 2-process run's step-2 checkpoint (full optimizer state keyed by names) in one process
    r3 = _run(["train", *COMMON, f"output_dir={resumed}", f"resume={two / 'checkpoints' / 'step_000002'}"], tmp_path)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "resuming from" in r3.stdout
    assert _max_diff(_weights(one, 3), _weights(resumed, 3)) < TOL


def test_lora_two_processes_match_one(tmp_path):
    """A LoRA student under FSDP2 (frozen base and trainable adapter in the same sharded layers), with
    micro-batches and activation checkpointing: the adapter after 3 steps equals the 1-process run's, the
    replicas are identical, and the checkpoint's AdamW state covers the adapter only."""
    lora = ["lora.rank=4", "lora.alpha=8", "train.activation_checkpointing=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _run(["train", *COMMON, *lora, f"output_dir={one}"], tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run(["train", *COMMON, *lora, MICRO, f"output_dir={two}"], tmp_path, procs=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(set(json.loads((two / "summary.json").read_text())["replica_sha256"])) == 1
    a1, a2 = (load_file(d / "checkpoints" / "step_000003" / "adapter_model.safetensors") for d in (one, two))
    assert a1 and _max_diff(a1, a2) < TOL
    assert max(float(v.abs().max()) for k, v in a2.items() if "lora_B" in k) > 0  # B left its zero start
    state = torch.load(two / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=True)
    assert sum(v["exp_avg"].numel() for v in state["optimizer"]["state"].values()) == sum(
        v.numel() for v in a2.values())
    assert _evals(one) == _evals(two)


def test_two_processes_in_bf16_with_activation_checkpointing(tmp_path):
    """FSDP2 MixedPrecisionPolicy (bf16 compute, fp32 reduce) + checkpointed layers + micro-batches + a
    bf16 rollout copy: trains, the checkpoint holds the float32 master weights gathered from the
    shards (the toy ties its embeddings), identical replicas."""
    out = tmp_path / "bf16"
    r = _run(["train", "steps=2", "prompts_per_step=4", "rollout.n=2", "eval_every=0", "logger.kind=none",
              "rollout.max_prompt_tokens=60", MICRO, "train.activation_checkpointing=true",
              "train.compute_dtype=bfloat16", "rollout.dtype=bfloat16", f"output_dir={out}"], tmp_path, procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(set(summary["replica_sha256"])) == 1
    w = _weights(out, 2)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())
    assert summary["rollout_copy"]["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000002")
    assert reloaded.dtype == torch.float32  # config.json says float32, as the weights are
    assert torch.equal(reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 2 and all(0 < x["loss"] < 10 and x["grad_norm"] > 0 for x in recs)


def test_prompts_per_step_must_divide_across_processes(tmp_path):
    res = _run(["train", "steps=1", "prompts_per_step=3", f"output_dir={tmp_path / 'run'}", "logger.kind=none"],
               tmp_path, procs=2)
    assert res.returncode != 0
    assert "prompts_per_step=3 is not divisible by the 2 processes" in res.stderr
    assert "trb/train.py" not in res.stderr  # the message, not a traceback (torchrun adds its own summary)


def test_only_train_runs_under_torchrun(tmp_path):
    res = _run(["eval"], tmp_path, procs=2, timeout=120)
    assert res.returncode != 0
    assert "trb eval runs in one process" in res.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_tasks_run_as_ranks(tmp_path):
    """What srun (or Hydra's submitit launcher with tasks_per_node=2) starts: two plain `trb train`
    processes told their rank by SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (TRB_SLURM_RANKS=1)."""
    port = str(_free_port())
    out = tmp_path / "slurm"
    args = ["train", "steps=1", "prompts_per_step=4", "rollout.n=2", "eval_every=0", "logger.kind=none",
            f"output_dir={out}"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "WANDB_MODE": "disabled", "TRB_SLURM_RANKS": "1", "SLURM_PROCID": str(rank),
               "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "trb", *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and len(set(summary["replica_sha256"])) == 1
    assert "x 2 processes (FSDP2 student, replicated teacher)" in outs[0][0]
    assert outs[1][0] == ""  # rank 1 prints nothing


def test_slurm_tasks_without_master_addr_get_a_message(tmp_path):
    env = {**os.environ, "TRB_SLURM_RANKS": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "WANDB_MODE": "disabled"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    res = subprocess.run([sys.executable, "-m", "trb", "train", "steps=1", f"output_dir={tmp_path / 'r'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "needs MASTER_ADDR and MASTER_PORT" in res.stderr and "Traceback" not in res.stderr


def test_slurm_variables_alone_do_not_make_ranks(tmp_path):
    """An sbatch script's own shell carries SLURM_NTASKS > 1 and SLURM_PROCID=0: without
    TRB_SLURM_RANKS=1 trb trains as one process instead of waiting for ranks."""
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "WANDB_MODE": "disabled"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRB_SLURM_RANKS"):
        env.pop(key, None)
    res = subprocess.run([sys.executable, "-m", "trb", "train", "steps=0", "eval_every=0", "dataset.eval_size=4",
                          "logger.kind=none", f"output_dir={tmp_path / 'r'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["processes"] == 1
