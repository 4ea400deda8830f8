"""Exact resume: a run interrupted after a checkpoint and restarted ends bit-identical to an
uninterrupted one; checkpoints prune with keep_last; a run dir of another run is refused."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from helpers import save_pair, train_config
from trb.config import BlendConfig, LoggerConfig, MethodConfig, TrainConfig
from trb.tracking import read_metrics
from trb.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("models"))


def config(pair, **kw):
    return train_config(pair, 30, 2, 8, **{"steps": 6, "save_every": 2, "eval_every": 2, **kw})


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k


@pytest.mark.parametrize("method,blend", [("trb", "linear"), ("sft_warmup", "none")])
def test_resume_after_a_lost_tail_is_bit_identical(pair, tmp_path, method, blend):
    kw = {"method": MethodConfig(name=method, sft_updates=3, sft_prompt_steps=3, sft_samples=2)}
    if blend == "none":
        kw["blend"] = BlendConfig(kind="none")
    full = tmp_path / "full"
    train(config(pair, **kw), full, log=lambda *_: None)
    cut = tmp_path / "cut"
    train(config(pair, **kw), cut, log=lambda *_: None)
    # as if killed after the step-2 checkpoint: later checkpoints and metrics are lost
    import shutil

    for step in (4, 6):
        shutil.rmtree(cut / "checkpoints" / f"step_{step:06d}")
    (cut / "summary.json").unlink()
    out = train(config(pair, **kw), cut, log=lambda *_: None)
    assert out["resumed_from"].endswith("step_000002")
    assert_same(weights(full, 6), weights(cut, 6))
    # the metrics log is the same sequence of steps (no duplicates from the lost tail)
    a = [(r["step"], "loss" in r) for r in read_metrics(full)]
    b = [(r["step"], "loss" in r) for r in read_metrics(cut)]
    assert a == b
    losses = [r["loss"] for r in read_metrics(full) if "loss" in r]
    assert losses == [r["loss"] for r in read_metrics(cut) if "loss" in r]


def test_sigkill_mid_run_then_same_command(pair, tmp_path):
    s, t = pair
    args = [sys.executable, "-m", "trb", "train", f"student.path={s}", f"teacher.path={t}", "blend.eps0=0.05",
            "blend.horizon=4", "steps=10", "prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
            "dataset.train_size=40", "dataset.eval_size=4", "save_every=2", "eval_every=0", "logger.kind=none"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    ref = subprocess.run(args + [f"output_dir={tmp_path / 'ref'}"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(args + [f"output_dir={run}"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (run / "checkpoints" / "step_000010").exists():
        pytest.skip("the run finished before it could be killed")
    again = subprocess.run(args + [f"output_dir={run}"], env=env, capture_output=True, text=True, cwd=tmp_path,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    assert_same(weights(tmp_path / "ref", 10), weights(run, 10))


def test_keep_last_and_a_different_run_dir(pair, tmp_path):
    run = tmp_path / "run"
    train(config(pair, keep_last=2), run, log=lambda *_: None)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    with pytest.raises(ValueError, match="holds a different run.*seed"):
        train(config(pair, seed=1), run, log=lambda *_: None)
    out = train(config(pair, seed=1, resume="never"), tmp_path / "other", log=lambda *_: None)
    assert out["resumed_from"] is None


def test_wandb_resumes_the_same_run_id(pair, tmp_path):
    from helpers import cli

    s, t = pair
    args = ["train", f"student.path={s}", f"teacher.path={t}", "prompts_per_step=2", "rollout.n=1",
            "rollout.max_new_tokens=6", "dataset.eval_size=2", "dataset.train_size=10", f"output_dir={tmp_path / 'r'}"]
    for steps in (2, 3):  # the finished run, then extended (a resume: the same W&B run continues)
        r = cli([*args, f"steps={steps}"], cwd=tmp_path, wandb_mode="offline")
        assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((tmp_path / "r" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "r" / "wandb_run_id").read_text()
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)


def test_decoding_knobs_may_change_on_resume(tmp_path):
    """A run that ran out of memory continues with a smaller row bound or micro-batch budget; a
    change of what it trains on (here the learning rate) is still refused."""
    from trb.rundir import claim

    base = TrainConfig(logger=LoggerConfig(kind="none"))
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "trainer_state.pt").write_bytes(b"")
    (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(base)))
    changed = dataclasses.replace(base, rollout=dataclasses.replace(base.rollout, max_rows=8, dtype="bfloat16"),
                                  train=dataclasses.replace(base.train, micro_batch_tokens=4096),
                                  eval_decoding=dataclasses.replace(base.eval_decoding, batch=8))
    c = claim(changed, run)
    assert c.resume_from == run / "checkpoints" / "step_000002"
    c.release()
    with pytest.raises(ValueError, match="optim"):
        claim(dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=0.5)), run)
    assert not (run / ".trb.lock").exists()  # a refusal leaves no lock behind
