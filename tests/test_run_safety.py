"""Run safety: no checkpoint runs code, a run dir belongs to one run and one process, non-finite
training stops, and every user-fixable failure is one `error:` line that leaves the output dir as
it was (no stray dir either)."""

import contextlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import cli, save_pair, train_config
from trb.config import BlendConfig, RolloutConfig, TrainConfig
from trb.errors import UserError

FIX = Path(__file__).parent / "fixtures"
FAST = ["steps=1", "prompts_per_step=2", "rollout.n=1", "rollout.max_new_tokens=6", "eval_every=0",
        "logger.kind=none", "dataset.eval_size=4", "dataset.train_size=20"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("models"))


def _snapshot(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def config(pair, **kw):
    return train_config(pair, 20, 1, 6, **{"steps": 2, "save_every": 1, "eval_every": 0, **kw})


def quiet(*_a, **_k):
    return None


def refused(args, tmp_path, *needles, command="train", timeout=180):
    """Run a CLI command that must be refused: exit 2, one `error:` line naming the problem, no
    traceback, output dir (and cwd) as they were."""
    out = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("output_dir=")), None)
    before, cwd_before = _snapshot(out) if out else None, sorted(os.listdir(tmp_path))
    existed = out.exists() if out else None
    res = cli([command, *args], cwd=tmp_path, timeout=timeout)
    assert res.returncode == 2, (res.returncode, res.stdout[-1500:], res.stderr[-3000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    if out is not None:
        assert out.exists() == existed and _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == cwd_before  # no stray outputs/<command>/<time>/
    return errors[0]


# --- checkpoints never run code ------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TRB_TEST_MARKER']}",))


def test_a_planted_pickle_payload_is_refused_not_run(pair, tmp_path, monkeypatch):
    from trb.checkpoint import CheckpointReadError
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair), run, log=quiet)
    marker = tmp_path / "marker"
    monkeypatch.setenv("TRB_TEST_MARKER", str(marker))
    state = run / "checkpoints" / "step_000002" / "trainer_state.pt"
    with state.open("wb") as f:
        pickle.dump({"step": 2, "evil": _Payload()}, f)
    with pytest.raises(CheckpointReadError, match="holds objects other than tensors"):  # resume=PATH, a new dir
        train(config(pair, resume=str(state.parent)), tmp_path / "other", log=quiet)
    with pytest.raises(CheckpointReadError, match="holds objects other than tensors"):  # resume=auto
        train(config(pair, steps=3), run, log=quiet)
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "other").exists() and not (run / ".trb.lock").exists()


def test_trainer_state_is_plain_tensors_and_resume_restores_every_rng(pair, tmp_path):
    import random

    import numpy as np

    from trb.checkpoint import load_trainer_state, restore_rng, rng_state

    random.random(), np.random.rand(), torch.rand(1)
    saved = rng_state()
    torch.save({"rng": saved}, tmp_path / "s.pt")
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    (tmp_path / "c").mkdir()
    os.replace(tmp_path / "s.pt", tmp_path / "c" / "trainer_state.pt")
    restore_rng(load_trainer_state(tmp_path / "c"))  # weights_only=True
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expect


def test_a_truncated_trainer_state_is_one_line(tmp_path):
    from trb.checkpoint import CheckpointReadError, load_trainer_state

    torch.save({"step": 1, "x": torch.zeros(1000)}, tmp_path / "trainer_state.pt")
    data = (tmp_path / "trainer_state.pt").read_bytes()
    (tmp_path / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="corrupt or truncated"):
        load_trainer_state(tmp_path)


# --- one run per run dir -------------------------------------------------------------------------


def _args(pair, out, *extra):
    return [f"student.path={pair[0]}", f"teacher.path={pair[1]}", *FAST, f"output_dir={out}", *extra]


def test_resume_path_into_another_runs_dir_is_refused(pair, tmp_path):
    from trb.train import train

    train(config(pair), tmp_path / "a", log=quiet)
    train(config(pair, optim=config(pair).optim.__class__(decay="cosine")), tmp_path / "b", log=quiet)
    b_before = _snapshot(tmp_path / "b")
    with pytest.raises(UserError, match="holds a different run.*optim"):
        train(config(pair, resume=str(tmp_path / "a" / "checkpoints" / "step_000001")), tmp_path / "b", log=quiet)
    with pytest.raises(UserError, match="checkpoint of another run dir"):  # even with b's own settings
        train(config(pair, optim=config(pair).optim.__class__(decay="cosine"),
                     resume=str(tmp_path / "a" / "checkpoints" / "step_000001")), tmp_path / "b", log=quiet)
    assert _snapshot(tmp_path / "b") == b_before
    # a checkpoint may continue its run into a new dir, with its own settings only
    with pytest.raises(UserError, match="belongs to a different run.*seed"):
        train(config(pair, seed=3, resume=str(tmp_path / "a" / "checkpoints" / "step_000001")), tmp_path / "c",
              log=quiet)
    assert not (tmp_path / "c").exists()
    out = train(config(pair, resume=str(tmp_path / "a" / "checkpoints" / "step_000001")), tmp_path / "c", log=quiet)
    assert out["resumed_from"].endswith("step_000001")


def test_resume_never_refuses_a_used_dir_and_overwrite_moves_it_aside(pair, tmp_path):
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair, steps=3), run, log=quiet)
    before = _snapshot(run)
    with pytest.raises(UserError, match="resume=never would start over"):
        train(config(pair, steps=3, resume="never"), run, log=quiet)
    with pytest.raises(UserError, match="holds a different run.*steps"):  # fewer steps: a different run
        train(config(pair, steps=2), run, log=quiet)
    assert _snapshot(run) == before
    out = train(config(pair, steps=2, overwrite=True), run, log=quiet)
    assert out["resumed_from"] is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and {k: v for k, v in _snapshot(aside[0]).items()} == before
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [0, 1]  # only the new run's records
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    # extending the finished run (steps raised, nothing else) continues it
    out = train(config(pair, steps=4), run, log=quiet)
    assert out["resumed_from"].endswith("step_000002")
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r] \
        == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_finished_run_rerun_is_a_no_op(pair, tmp_path):
    """The same command again on a finished run: exit 0, "already done", not one byte of the run dir
    changed (no second final eval, checkpoint, W&B upload, Hydra job log or .hydra/ rewrite)."""
    s, t = pair
    args = ["train", f"student.path={s}", f"teacher.path={t}", *FAST, f"output_dir={tmp_path / 'run'}"]
    assert cli(args, cwd=tmp_path).returncode == 0
    before = _snapshot(tmp_path / "run")
    assert "summary.json" in before and any(k.startswith(".hydra/") for k in before)
    res = cli(args, cwd=tmp_path)
    assert res.returncode == 0 and "already done" in res.stdout + res.stderr, res.stderr[-2000:]
    assert _snapshot(tmp_path / "run") == before
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_an_abandoned_extension_is_not_already_done_and_old_configs_resume(pair, tmp_path):
    """A finished run whose extension (steps raised) died before its next checkpoint, re-run with the old
    steps: not "already done" (the extension's records and config are there): it resumes, dropping them.
    A train_config.json saved before a section existed (here lora) resumes as if it held the defaults."""
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair, steps=2), run, log=quiet)
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**saved, "steps": 4}))  # the extension's record...
    with (run / "metrics.jsonl").open("a") as f:  # ... and a step it logged before dying
        f.write(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    out = train(config(pair, steps=2), run, log=quiet)
    assert not out.get("already_done") and out["resumed_from"].endswith("step_000002")
    assert json.loads((run / "train_config.json").read_text())["steps"] == 2
    assert all(r["step"] <= 2 and r.get("loss") != 1.0 for r in map(json.loads, (run / "metrics.jsonl")
                                                                    .read_text().splitlines()))
    done = train(config(pair, steps=2), run, log=quiet)
    assert done["already_done"]
    saved = json.loads((run / "train_config.json").read_text())
    del saved["lora"]  # a run dir from before LoRA existed
    (run / "train_config.json").write_text(json.dumps(saved))
    out = train(config(pair, steps=3), run, log=quiet)
    assert out["resumed_from"].endswith("step_000002")


def test_resume_path_with_later_checkpoints_is_refused(pair, tmp_path):
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair, steps=3), run, log=quiet)
    with pytest.raises(UserError, match="has checkpoints after step_000001 .step_000002, step_000003"):
        train(config(pair, steps=3, resume=str(run / "checkpoints" / "step_000001")), run, log=quiet)


@contextlib.contextmanager
def holding_lock(out: Path, pid: int, host: str, started: str):
    """This test process holds out's run-dir lock (the flock a live trb process would hold) with the
    record a trb process writes; released on exit, as a dying process's lock is."""
    import fcntl

    out.mkdir(exist_ok=True)
    lock = out / ".trb.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host, "started": started}))
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield lock
    finally:
        os.close(held)


def test_a_second_process_on_a_run_dir_stops_at_once(pair, tmp_path):
    """A held lock (this test process holds the flock) stops a second run in seconds; a lock file left
    by a process that is gone (SIGKILL, SIGTERM, another host) is taken over with a note."""
    out = tmp_path / "out"
    t0 = time.time()
    with holding_lock(out, 424242, "elsewhere", "earlier") as lock:
        err = refused(_args(pair, out), tmp_path, "is in use by trb pid 424242 on elsewhere", "output_dir")
    assert time.time() - t0 < 60 and "since earlier" in err
    res = cli(["train", *_args(pair, out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "took over the lock of trb pid 424242 on elsewhere" in res.stdout and not lock.exists()


def test_resume_path_into_a_new_dir_can_be_retried(pair, tmp_path, monkeypatch):
    """A continuation of a checkpoint in a new dir that stops before its first checkpoint is retried
    by the same command (and by resume=auto), from that checkpoint, its partial records dropped."""
    import trb.train as train_mod
    from trb.train import train

    train(config(pair, steps=2), tmp_path / "a", log=quiet)
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_000001")
    real = train_mod.opd_step

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "opd_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train(config(pair, steps=2, resume=ckpt), tmp_path / "b", log=quiet)
    assert (tmp_path / "b" / "train_config.json").exists() and not (tmp_path / "b" / ".trb.lock").exists()
    monkeypatch.setattr(train_mod, "opd_step", real)
    out = train(config(pair, steps=2), tmp_path / "b", log=quiet)  # resume=auto
    assert out["resumed_from"] == ckpt
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and min(steps) == 1


def test_a_damaged_train_config_is_named(pair, tmp_path):
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair, steps=1), run, log=quiet)
    (run / "train_config.json").write_text("")
    with pytest.raises(UserError, match="train_config.json cannot be read"):
        train(config(pair, steps=1), run, log=quiet)


def test_two_concurrent_runs_one_refused(pair, tmp_path):
    """A second trb train on a run dir that a running one holds stops at once; the first goes on
    (one writer: its records stay in order) and, interrupted, releases the lock."""
    import signal

    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = [sys.executable, "-m", "trb", "train", *_args(pair, out)]
    # its output goes to a file: an unread pipe fills up and blocks the run (then Ctrl-C cannot end it)
    console = (tmp_path / "first.out").open("w")
    # Ctrl-C as in a terminal: SIGINT's default disposition (a shell's background job, e.g. CI started with `&`,
    # passes SIGINT ignored to its children, and Python then never raises KeyboardInterrupt)
    first = subprocess.Popen([a if not a.startswith("steps=") else "steps=100000" for a in args], cwd=tmp_path,
                             env=env, stdout=console, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120  # until the first run is inside its training loop
        while time.time() < deadline and not (
                (out / ".trb.lock").exists() and (out / "metrics.jsonl").exists()
                and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            time.sleep(0.2)
        log_before, hydra_before = (out / "train.log").read_text(), _snapshot(out / ".hydra")
        second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "is in use by trb pid" in second.stderr, second.stderr[-2000:]
        # the refused process wrote nothing there: the running run's log only grew, its .hydra/ is its own
        assert (out / "train.log").read_text().startswith(log_before) and "trb train:" in log_before
        assert _snapshot(out / ".hydra") == hydra_before and hydra_before
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
            console.close()
            raise AssertionError("Ctrl-C did not end the run within 120 s; its output ends: "
                                 + (tmp_path / "first.out").read_text()[-2000:]) from None
        console.close()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) >= 3 and steps == sorted(steps)  # one writer
    assert not (out / ".trb.lock").exists()  # released on Ctrl-C


# --- non-finite training stops -------------------------------------------------------------------


def test_non_finite_weights_after_a_step_stop_the_run_keeping_the_last_checkpoint(pair, tmp_path, monkeypatch):
    from trb.train import train

    calls = []
    real = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:  # the second step writes NaN into one weight
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite weights after the optimiser step at step 1"):
        train(config(pair, steps=3), run, log=quiet)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    assert not (run / ".trb.lock").exists()


def test_a_student_with_nan_weights_is_refused(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in Path(pair[0]).iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    w = load_file(str(bad / "model.safetensors"))
    first = sorted(w)[0]
    w[first] = torch.full_like(w[first], float("nan"))
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    refused([f"student.path={bad}", f"teacher.path={pair[1]}", *FAST, f"output_dir={tmp_path / 'o'}"], tmp_path,
            "student's weights hold NaN or inf", "student.path=")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoint_files_follow_the_umask(umask, mode, tmp_path):
    """safetensors writes its weights 0600; a checkpoint's files get what the umask allows, like every other
    file a process writes (readable by the group on a shared file system under 022 / 002)."""
    from helpers import tiny_model
    from trb.checkpoint import save_checkpoint

    model, tok = tiny_model()
    old = os.umask(umask)
    try:
        folder = save_checkpoint(tmp_path, 1, model, tok)
    finally:
        os.umask(old)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert "model.safetensors" in [p.name for p in files]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


def test_a_full_disk_leaves_no_partial_checkpoint(pair, tmp_path, monkeypatch):
    from trb import checkpoint
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair, steps=1), run, log=quiet)

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointWriteError, match="the disk is full; no partial checkpoint"):
        train(config(pair, steps=2), run, log=quiet)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]


# --- every poorer case: one error line, the output dir as it was ----------------------------------


@pytest.mark.parametrize("section, kw, needle", [
    ("blend", {"gamma": float("nan")}, "blend.gamma must be a finite number"),
    ("blend", {"eps0": float("inf")}, "blend.eps0 must be a finite number"),
    ("optim", {"lr": float("inf")}, "optim.lr must be a finite number"),
    ("optim", {"beta1": 1.0}, "optim.beta1 must be in [0, 1)"),
    ("optim", {"beta2": -0.1}, "optim.beta2 must be in [0, 1)"),
    ("optim", {"weight_decay": -1.0}, "optim.weight_decay must be >= 0"),
    ("method", {"temp_start": 2.0}, "method.temp_start (tau_0, rising to 1) must be in (0, 1]"),
    ("method", {"veto_b_start": float("nan")}, "method.veto_b_start must be a finite number"),
    ("rollout", {"temperature": float("inf")}, "rollout.temperature must be a finite number"),
    ("decoding", {"top_p": float("nan")}, "decoding.top_p must be a finite number"),
    ("plan", {"device_gb": float("inf")}, "plan.device_gb must be a finite number"),
    ("top", {"seed": -1}, "seed must be >= 0"),
])
def test_every_float_is_finite_and_in_range(section, kw, needle):
    """The checks themselves (the CLI cases below show they reach the user as one line)."""
    from trb.config import DecodingConfig, MethodConfig, OptimConfig, PlanConfig

    make = {"blend": BlendConfig, "optim": OptimConfig, "method": MethodConfig, "rollout": RolloutConfig,
            "decoding": DecodingConfig, "plan": PlanConfig, "top": TrainConfig}[section]
    with pytest.raises(ValueError) as err:
        make(**kw)
    assert needle in str(err.value)


@pytest.mark.parametrize("extra, needle", [
    ("blend.gamma=nan", "blend.gamma must be a finite number"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("method.temp_start=2", "method.temp_start (tau_0, rising to 1) must be in (0, 1]"),
    ("device=banana", "device='banana' is not a device"),
    ("method=opd blend.eps0=0.5", "blend.eps0=0.5 is not used with blend=none"),
    ("rollout.max_prompt_tokens=1", "training prompts fits rollout.max_prompt_tokens=1"),
    ("resume=never overwrite=true", None),  # a new dir: fine (checked below: no refusal)
])
def test_poorer_cases_table(pair, tmp_path, extra, needle):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "me.txt").write_text("x")
    args = [f"student.path={pair[0]}", f"teacher.path={pair[1]}", *FAST, *extra.split(), f"output_dir={out}"]
    if needle is None:
        assert cli(["train", *args], cwd=tmp_path).returncode == 0
        return
    refused(args, tmp_path, needle)


def test_device_cuda_on_a_cpu_build(pair, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    refused(_args(pair, tmp_path / "o", "device=cuda"), tmp_path, "device=cuda but")


def test_output_dir_that_is_a_file(pair, tmp_path):
    (tmp_path / "f").write_text("x")
    refused(_args(pair, tmp_path / "f"), tmp_path, "is a file, not a directory")


def test_foreign_run_files_without_train_config(pair, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    refused(_args(pair, out), tmp_path, "holds run files (metrics.jsonl) but no train_config.json", "overwrite=true")


@pytest.mark.parametrize("what, needle", [
    ("config", "the folder could not be loaded"),
    ("weights", "the folder could not be loaded"),
    ("file", "is a file; give the model's folder"),
])
def test_broken_model_folders(pair, tmp_path, what, needle):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in Path(pair[0]).iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    if what == "config":
        (bad / "config.json").write_text("{not json")
    elif what == "weights":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    else:
        bad = bad / "model.safetensors"
    refused([f"student.path={bad}", f"teacher.path={pair[1]}", *FAST, f"output_dir={tmp_path / 'o'}"], tmp_path,
            needle, "student.path=")


@pytest.mark.parametrize("content, needle, extra", [
    ('{"question": "What is 2+2?", "answer": "4"}\n' * 3, "no row has a gold answer under dataset.answer_kind=gsm8k",
     ["dataset.answer_kind=boxed|plain"]),
    ('{"question": null, "answer": "#### 4"}\n', "row 0: the question ('question') is None", []),
    ('{"question": "x", "answer": "#### 4"}\n5\n', "line 2 is a int", []),
])
def test_data_checks(pair, tmp_path, content, needle, extra):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    fast = [a for a in FAST if not a.startswith("dataset.")]
    refused([f"student.path={pair[0]}", f"teacher.path={pair[1]}", *fast, "dataset=jsonl", f"dataset.path={data}",
             "dataset.eval_size=1", "dataset.train_size=0", f"output_dir={tmp_path / 'o'}"], tmp_path, needle, *extra)


def test_a_directory_as_dataset_path(pair, tmp_path):
    refused([f"student.path={pair[0]}", f"teacher.path={pair[1]}", *FAST, "dataset=jsonl", f"dataset.path={tmp_path}",
             f"output_dir={tmp_path / 'o'}"], tmp_path, "is a directory")


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_by_report(pair, tmp_path):
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair, steps=2), run, log=quiet)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # a process killed mid-write
    out = train(config(pair, steps=3), run, log=quiet)
    assert out["resumed_from"].endswith("step_000002")
    res = cli(["report", str(run), "--out", str(tmp_path / "rep")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "garbage")
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    res = cli(["report", str(run), "--out", str(tmp_path / "rep2")], cwd=tmp_path)
    assert res.returncode == 2 and "metrics.jsonl line 2 is not a metrics record" in res.stderr


def test_eval_skips_prompts_over_its_bound(pair, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1? " * 20_000, "answer": "#### 2"}) + "\n"
                    + json.dumps({"question": "What is 1+1?", "answer": "#### 2"}) + "\n")
    out = tmp_path / "e"
    res = cli(["eval", f"checkpoint={pair[0]}", "dataset=jsonl", f"dataset.path={data}", "decoding.max_new_tokens=4",
               "logger.kind=none", f"output_dir={out}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "results.json").read_text())["results"][0]["metrics"]
    assert metrics["eval/skipped_too_long"] == 1 and metrics["eval/problems"] == 1
    assert (out / ".hydra").is_dir()  # output_dir is Hydra's run dir too: one dir holds the run
    assert not (tmp_path / "outputs").exists()


def test_trb_rollout_holds_a_rollout_section(pair, tmp_path):
    base = [f"student.path={pair[0]}", f"teacher.path={pair[1]}", "num_prompts=2", "rollout.n=1",
            "rollout.max_new_tokens=4", "logger.kind=none"]
    refused([*base, "rollout.long_prompts=banana", f"output_dir={tmp_path / 'r'}"], tmp_path,
            "rollout.long_prompts must be skip or truncate", command="rollout")
    refused([*base, "rollout.max_prompt_tokens=2", f"output_dir={tmp_path / 'r'}"], tmp_path,
            "no prompt fits rollout.max_prompt_tokens=2", command="rollout")
    res = cli(["rollout", *base, "rollout.max_prompt_tokens=2", "rollout.long_prompts=truncate",
               f"output_dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(x) for x in (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()]
    assert all(len(r["prompt_ids"]) == 2 for r in recs)  # truncated to the last 2 tokens, not skipped
    res = cli(["rollout", *base, "long_prompts=truncate", f"output_dir={tmp_path / 'r2'}"], cwd=tmp_path)
    assert res.returncode != 0 and "long_prompts" in res.stderr  # the setting exists once: rollout.long_prompts


@pytest.mark.parametrize("code, text", [(28, "No space left on device"), (30, "Read-only file system")])
def test_a_full_or_read_only_disk_mid_run_is_one_line(code, text):
    from trb.cli import _run_user_task
    from trb.errors import RunStopped

    def write():
        raise OSError(code, text, "/runs/x/metrics.jsonl")

    with pytest.raises(RunStopped, match=f"could not write /runs/x/metrics.jsonl: {text}"):
        _run_user_task(write)
    with pytest.raises(OSError):  # anything else an OSError can be stays a bug with its traceback
        _run_user_task(lambda: (_ for _ in ()).throw(OSError(5, "Input/output error")))
