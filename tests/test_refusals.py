"""Every command owns its output and refuses what it cannot trust: an eval dir belongs to one eval
(locked, never overwritten or appended to by another, a killed eval continued), weights that do not
fill their config or hold NaN, lengths beyond the models' positions or the machine's memory, a
refused process that must not touch a running run's files, ranks that never come."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli, save_pair
from test_run_safety import _snapshot, config, holding_lock, quiet, refused

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def run2(pair, tmp_path_factory):
    """A finished training run with checkpoints at steps 1 and 2."""
    from trb.train import train

    run = tmp_path_factory.mktemp("run2") / "run"
    train(config(pair, steps=2), run, log=quiet)
    return run


EVAL = ["dataset.eval_size=4", "decoding.max_new_tokens=6", "logger.kind=none", "engine=hf"]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


# --- 1. an eval dir belongs to one eval -------------------------------------------------------------


def test_eval_dir_rerun_reuses_other_settings_refused_overwrite_moves_aside(run2, tmp_path):
    out = tmp_path / "ev"
    first = cli(["eval", f"checkpoint={run2}", *EVAL, f"output_dir={out}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2] and all(r["checkpoint_id"] for r in recs)
    # the same eval again: nothing recomputed, nothing appended
    again = cli(["eval", f"checkpoint={run2}", *EVAL, f"output_dir={out}", "decoding.batch=2"], cwd=tmp_path)
    assert again.returncode == 0 and "2 already evaluated here" in again.stdout, again.stderr[-2000:]
    assert _metrics(out) == recs
    assert json.loads((out / "results.json").read_text())["results"] == \
        json.loads(before["results.json"])["results"]
    # another eval into the same dir: refused, the dir as it was (eval.log and .hydra/ included)
    snap = _snapshot(out)
    refused([f"checkpoint={run2}", *[a for a in EVAL if not a.startswith("dataset.")], "dataset.eval_size=3",
             f"output_dir={out}"], tmp_path, "holds another eval", "dataset", "overwrite=true", command="eval")
    assert _snapshot(out) == snap
    # overwrite=true moves the old eval aside and starts over
    res = cli(["eval", f"checkpoint={run2}", *EVAL[1:], "dataset.eval_size=3", f"output_dir={out}",
               "overwrite=true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ev.replaced-")]
    assert len(aside) == 1 and (aside[0] / "results.json").read_bytes() == snap["results.json"]
    assert json.loads((out / "results.json").read_text())["problems"] == 3


def test_a_killed_multi_checkpoint_eval_continues_without_duplicates(run2, tmp_path):
    out = tmp_path / "ev"
    res = cli(["eval", f"checkpoint={run2}", *EVAL, f"output_dir={out}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    full = _metrics(out)
    # as if killed while the second checkpoint's samples were being written: its record never committed
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    (out / "samples_step_000002.jsonl").rename(out / "samples_step_000002.jsonl.tmp")
    (out / "results.json").unlink()
    res = cli(["eval", f"checkpoint={run2}", *EVAL, f"output_dir={out}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 already evaluated here" in res.stdout
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2] and recs[0] == full[0]
    assert recs[1]["eval/pass@1"] == full[1]["eval/pass@1"]  # seeded: the same result
    assert not list(out.glob("*.tmp"))


def test_two_evals_into_one_dir_one_refused(run2, tmp_path):
    out = tmp_path / "ev"
    with holding_lock(out, 31337, "here", "now"):
        refused([f"checkpoint={run2}", *EVAL, f"output_dir={out}"], tmp_path, "in use by trb pid 31337",
                command="eval")


def test_eval_into_a_train_run_dir_is_refused(run2, tmp_path):
    refused([f"checkpoint={run2}", *EVAL, f"output_dir={run2}"], tmp_path, "holds a trb train run", command="eval")


# --- 2. weights that do not fill their config, 3. NaN weights ------------------------------------------


def _with_layers(src: str, dst: Path, layers: int) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    if "layer_types" in cfg:
        cfg["layer_types"] = [cfg["layer_types"][0]] * layers
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_or_unexpected_weights_refused_everywhere(pair, tmp_path):
    layers = json.loads((Path(pair[0]) / "config.json").read_text())["num_hidden_layers"]
    more = _with_layers(pair[0], tmp_path / "more", layers + 2)  # config asks for layers the file lacks
    fewer = _with_layers(pair[1], tmp_path / "fewer", layers - 1)  # the file holds a layer the config lacks
    refused([f"checkpoint={more}", *EVAL, f"output_dir={tmp_path / 'e1'}"], tmp_path,
            "weights do not match its config.json", "missing (they would be random)", command="eval")
    refused([f"checkpoint=[{pair[0]},{fewer}]", *EVAL, f"output_dir={tmp_path / 'e2'}"], tmp_path,
            "unexpected, e.g. model.layers", command="eval")  # found before the first checkpoint is decoded
    refused([f"student.path={pair[0]}", f"teacher.path={fewer}", "steps=1", "logger.kind=none",
             "dataset.eval_size=4", "dataset.train_size=20", f"output_dir={tmp_path / 't'}"], tmp_path,
            "teacher.path=", "unexpected")
    refused([f"student.path={more}", f"teacher.path={pair[1]}", "num_prompts=2", "logger.kind=none",
             f"output_dir={tmp_path / 'r'}"], tmp_path, "student.path=", "missing", command="rollout")


def test_eval_refuses_nan_weights(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(pair[0], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    refused([f"checkpoint={bad}", *EVAL, f"output_dir={tmp_path / 'e'}"], tmp_path,
            "weights hold NaN or inf", command="eval")


# --- 4. lengths -----------------------------------------------------------------------------------


def test_lengths_beyond_positions_or_memory_are_refused_in_seconds(pair, tmp_path):
    t0 = time.time()
    refused(["rollout.max_new_tokens=100000000", "logger.kind=none", f"output_dir={tmp_path / 'a'}"], tmp_path,
            "on the CPU", "the memory plan does not fit", "rollout.max_new_tokens")
    assert time.time() - t0 < 120  # (was: 22.9 GB and the OOM killer after 69 s)
    refused(["rollout.max_new_tokens=600", "logger.kind=none", f"output_dir={tmp_path / 'b'}"], tmp_path,
            "beyond the 512 positions")
    refused(["checkpoint=toy:student", "decoding.max_new_tokens=600", "dataset.eval_size=2", "logger.kind=none",
             f"output_dir={tmp_path / 'c'}"], tmp_path, "decoding.max_new_tokens", "512 positions", command="eval")


# --- 6. ranks that never come ---------------------------------------------------------------------


def test_stray_cluster_variables_fail_in_bounded_time(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TRB_RENDEZVOUS_TIMEOUT": "3", "WANDB_MODE": "disabled"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "trb", "train", f"output_dir={tmp_path / 'o'}"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and time.time() - t0 < 60, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "did not join within 3 s" in errors[0] and "MASTER_PORT" in errors[0]
    assert not (tmp_path / "o").exists()
    env.pop("MASTER_ADDR")
    res = subprocess.run([sys.executable, "-m", "trb", "train"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "MASTER_ADDR" in res.stderr and "Traceback" not in res.stderr


# --- the poorer groups ------------------------------------------------------------------------------


@pytest.mark.parametrize("command, arg, needle", [
    ("train", "stepz=3", "stepz is not a setting of trb train (did you mean steps?)"),
    ("train", "decodng.n=4", "did you mean eval_decoding.n"),
    ("train", "method=foo", "method=foo: no such option"),
    ("train", "method=opd,trbb", "did you mean method=trb?"),
    ("train", "eval_dataset=math500", "dataset@eval_dataset=math500"),
    ("train", "eval_dataset.path=x.jsonl", "choose one first, e.g. dataset@eval_dataset=jsonl"),
    ("eval", "steps=3", "steps is not a setting of trb eval"),
    ("plan", "stepz=3", "did you mean steps?"),
])
def test_typos_are_one_line_with_the_nearest_key(tmp_path, command, arg, needle):
    res = cli([command, arg, f"output_dir={tmp_path / 'o'}"], cwd=tmp_path, timeout=120)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and needle in errors[0], res.stderr[-2000:]
    assert "+" + arg.split("=")[0] not in res.stderr  # no Hydra advice to add the key
    assert os.listdir(tmp_path) == []  # nothing written, no outputs/<command>/<time>/


def test_tracebacks_become_one_line(pair, tmp_path, run2):
    res = cli(["train", f"output_dir={tmp_path / ('a' * 300)}"], cwd=tmp_path)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and "longer than the file system allows" in errors[0]
    assert "Traceback" not in res.stderr and os.listdir(tmp_path) == []
    (tmp_path / "afile").write_text("")
    refused([f"output_dir={tmp_path / 'afile' / 'x'}"], tmp_path, "is a file, not a directory")
    # trb report names the file it cannot read
    bad = tmp_path / "bad_run"
    shutil.copytree(run2, bad)
    (bad / "train_config.json").write_text("{bad")
    res = cli(["report", str(bad), "--out", str(tmp_path / "rep")], cwd=tmp_path)
    assert res.returncode == 2 and f"{bad / 'train_config.json'} is not valid JSON" in res.stderr, res.stderr[-2000:]
    # a chat template the sandbox refuses
    sneaky = tmp_path / "sneaky"
    shutil.copytree(pair[0], sneaky)
    tc = json.loads((sneaky / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ messages.__class__.__mro__ }}"
    (sneaky / "tokenizer_config.json").write_text(json.dumps(tc))
    for extra in list(sneaky.glob("chat_template.*")):
        extra.unlink()
    refused([f"checkpoint={sneaky}", *EVAL, f"output_dir={tmp_path / 'e'}"], tmp_path,
            "chat template failed", "prompt=plain", command="eval")


def test_sweep_job_dirs_stay_inside_and_are_bounded(tmp_path):
    sweep = tmp_path / "sweep" / "inner"
    long = "p" * 300
    res = cli(["train", "-m", f"logger.project=../../escape,{long}", "steps=0", "logger.kind=none",
               "dataset.eval_size=4", "eval_decoding.max_new_tokens=4", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
              timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all(len(j.encode()) <= 200 for j in jobs) and "escape" in jobs[0]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "sweep" / "escape").exists()
    assert all((sweep / j / "summary.json").exists() for j in jobs)


def test_settings_that_would_be_ignored_are_refused(tmp_path):
    refused(["method=trb", "rollout.temperature=0.7", f"output_dir={tmp_path / 'o'}"], tmp_path,
            "rollout.temperature=0.7 is not used by method=trb")
    refused(["method=skd", "rollout.temperature=0.7", f"output_dir={tmp_path / 'o'}"], tmp_path,
            "method.skd_temperature")
    refused(["checkpoint=toy:student", "decoding=sampled", "decoding.n=4", f"output_dir={tmp_path / 'o'}"], tmp_path,
            "decoding.ks=[1, 4, 8] asks", "decoding.ks=[1,4]", command="eval")
    res = cli(["plan", "plan.world_size=3", f"output_dir={tmp_path / 'p'}"], cwd=tmp_path)
    assert res.returncode == 2 and "do not divide prompts_per_step=16" in res.stderr, res.stderr[-2000:]


def test_bookkeeping_keys_do_not_change_a_runs_identity(pair, tmp_path):
    from trb.train import train

    run = tmp_path / "run"
    train(config(pair, steps=2), run, log=quiet)
    out = train(config(pair, steps=3, save_every=2), run, log=quiet)  # another save_every: the same run
    assert out["resumed_from"].endswith("step_000002")
    # an extension that failed after rewriting train_config.json (steps=5 there, last checkpoint 3): the
    # original command (steps=3) is the same run again
    saved = json.loads((run / "train_config.json").read_text())
    saved["steps"] = 5
    (run / "train_config.json").write_text(json.dumps(saved))
    out = train(config(pair, steps=3, save_every=2), run, log=quiet)
    assert out["resumed_from"].endswith("step_000003")


def test_a_reused_report_dir_keeps_no_stale_plot(run2, tmp_path):
    out = tmp_path / "rep"
    other = tmp_path / "other"
    shutil.copytree(run2, other)
    cfg = json.loads((other / "train_config.json").read_text())
    cfg["method"]["name"], cfg["blend"]["kind"] = "opd", "none"
    (other / "train_config.json").write_text(json.dumps(cfg))
    res = cli(["report", str(run2), str(other), "--out", str(out)], cwd=tmp_path)
    assert res.returncode == 0 and (out / "difference.png").exists(), res.stderr[-2000:]
    res = cli(["report", str(run2), "--out", str(out), "--baseline", ""], cwd=tmp_path)
    assert res.returncode == 0 and not (out / "difference.png").exists(), res.stderr[-2000:]


def test_rollout_dir_rules(tmp_path):
    out = tmp_path / "ro"
    args = ["num_prompts=2", "logger.kind=none", "rollout.max_new_tokens=8", f"output_dir={out}"]
    assert cli(["rollout", *args], cwd=tmp_path).returncode == 0
    first = (out / "summary.json").read_text()
    res = cli(["rollout", *args], cwd=tmp_path)  # the same rollout again: replaced, seeded, the same
    assert res.returncode == 0 and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["completions"] == json.loads(first)["completions"]
    refused(["num_prompts=3", "logger.kind=none", "rollout.max_new_tokens=8", f"output_dir={out}"], tmp_path,
            "holds another rollout", "overwrite=true", command="rollout")
