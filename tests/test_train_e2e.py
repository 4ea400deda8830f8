"""`trb train` end to end on tiny models, asserting on the artefacts it leaves."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli as _cli
from helpers import save_pair
from trb.config import (
    BlendConfig,
    DatasetConfig,
    LoggerConfig,
    MethodConfig,
    ModelConfig,
    RolloutConfig,
    TrainConfig,
)
from trb.tracking import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("models"))


SMALL = ["steps=6", "prompts_per_step=3", "rollout.n=2", "rollout.max_new_tokens=10", "dataset.eval_size=4",
         "dataset.train_size=50", "optim.warmup_steps=2"]


def test_train_cli_artefacts(pair, tmp_path):
    s, t = pair
    run = tmp_path / "run"
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "blend=linear", "blend.eps0=0.05",
              "blend.horizon=4", "save_every=3", f"hydra.run.dir={run}", *SMALL], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(run)
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == list(range(6))
    required = ["loss", "lr", "eps", "beta/mean", "beta/p50", "beta/p90", "beta/frac_zero", "beta/frac_one",
                "kl_mu_student/mean", "kl_mu_student/max", "teacher/entropy", "teacher/logp", "rollout/reward",
                "rollout/length", "throughput/rollout_tok_s", "throughput/train_tok_s", "time/rollout", "support_score",
                "time/teacher", "time/update"]
    for x in steps:
        for k in required:
            assert k in x and x[k] is not None and math.isfinite(x[k]), (k, x.get(k))
        # the schedule: linear 0.05 -> 0 over K = 4, then 0
        assert math.isclose(x["eps"], 0.05 * max(0.0, 1 - x["step"] / 4), abs_tol=1e-12)
        assert x["kl_mu_student/max"] <= x["eps"]  # the trust region holds on every token
        if x["eps"] == 0:
            assert x["beta/frac_zero"] == 1.0
    assert any(x["beta/mean"] > 0 for x in steps if x["eps"] > 0)
    evals = [x for x in recs if "eval/accuracy" in x]
    assert [x["step"] for x in evals] == [0, 6]
    # checkpoints (intermediate + final) and the Hydra config echo
    assert (run / "checkpoints" / "step_000003" / "trainer_state.pt").exists()
    final = run / "checkpoints" / "step_000006"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert (run / ".hydra" / "config.yaml").exists()
    assert json.loads((run / "summary.json").read_text())["checkpoint"] == str(final)


def test_checkpoint_reloads_with_same_logits(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from trb.train import train

    s, t = pair
    cfg = TrainConfig(student=ModelConfig(path=s), teacher=ModelConfig(path=t), method=MethodConfig(name="fixed"),
                      blend=BlendConfig(kind="constant", eps0=0.02), dataset=DatasetConfig(train_size=20, eval_size=0),
                      rollout=RolloutConfig(n=2, max_new_tokens=8), logger=LoggerConfig(kind="none"),
                      steps=3, prompts_per_step=2)
    out = train(cfg, tmp_path / "run", log=lambda *_: None)
    trained = out["student"].eval()
    loaded = AutoModelForCausalLM.from_pretrained(out["checkpoint"]).eval()
    before = AutoModelForCausalLM.from_pretrained(s).eval()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)
        assert not torch.allclose(before(ids).logits, trained(ids).logits)  # training changed the weights
    recs = read_metrics(tmp_path / "run")
    assert all(x["eps"] == 0.02 for x in recs if "loss" in x)  # fixed budget


def test_vanilla_opd_scores_teacher_after_decoding(pair, tmp_path):
    s, t = pair
    run = tmp_path / "run"
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "method=opd", "loss=full",
              f"hydra.run.dir={run}", *SMALL], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [x for x in read_metrics(run) if "loss" in x]
    assert all(x["beta/mean"] == 0 and x["kl_mu_student/max"] == 0 for x in steps)
    assert all(math.isfinite(x["teacher/logp"]) for x in steps)  # one teacher prefill filled them in


def test_multirun_leaves_one_dir_per_job_grouped_in_wandb(pair, tmp_path):
    s, t = pair
    sweep = tmp_path / "sweep"
    r = _cli(["train", "-m", f"student.path={s}", f"teacher.path={t}", "seed=0,1", "steps=2",
              "prompts_per_step=2", "rollout.n=1", "rollout.max_new_tokens=6", "dataset.eval_size=2",
              "dataset.train_size=10", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, wandb_mode="offline")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [f"{i}_dataset.eval_size-2+dataset.train_size-10+prompts_per_step-2+rollout.max_new_tokens-6+"
                    f"rollout.n-1+seed-{i}+steps-2" for i in (0, 1)]  # no '=' or ',': pastes into checkpoint=
    r = _cli(["eval", f"checkpoint={sweep / jobs[0]}", "--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 0 and f"checkpoint: {sweep / jobs[0]}" in r.stdout, r.stderr[-2000:]
    for job in jobs:
        assert len([x for x in read_metrics(sweep / job) if "loss" in x]) == 2
        # W&B ran offline into the job's dir, grouped by the sweep
        assert list((sweep / job / "wandb").glob("offline-run-*"))
        assert json.loads((sweep / job / "train_config.json").read_text())["logger"]["group"] == "sweep"


def test_bad_config_fails_with_named_setting(pair, tmp_path):
    s, t = pair
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "blend.eps0=-1", f"hydra.run.dir={tmp_path / 'x'}"],
             cwd=tmp_path)
    assert r.returncode != 0
    assert "blend.eps0" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["train", "teacher.path=Nobody/not-a-model", f"student.path={s}", f"hydra.run.dir={tmp_path / 'y'}"],
             cwd=tmp_path)
    assert r.returncode != 0 and "teacher.path" in r.stderr and "Traceback" not in r.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    r = _cli(["train", "--cfg", "job", "blend=cosine"], cwd=tmp_path)
    assert r.returncode == 0 and "kind: cosine" in r.stdout


def test_console_script_help():
    exe = Path(sys.executable).parent / "trb"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout
    r = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "blend           constant | cosine | [linear] | none | step" in r.stdout


def test_paper_model_presets_fail_fast_offline(tmp_path):
    import time

    t0 = time.time()
    r = _cli(["train", "student=qwen3-0.6b-base", "teacher=qwen3-4b", f"hydra.run.dir={tmp_path / 'q'}"], cwd=tmp_path)
    assert r.returncode != 0 and "Qwen/Qwen3-0.6B-Base" in r.stderr and "student.path" in r.stderr
    assert "Traceback" not in r.stderr and time.time() - t0 < 60


def test_speculative_rollouts_in_training(pair, tmp_path):
    s, t = pair
    run = tmp_path / "run"
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "blend.eps0=0.05", "blend.horizon=4",
              "rollout.draft_k=3", f"hydra.run.dir={run}", *SMALL], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [x for x in read_metrics(run) if "loss" in x]
    for x in steps:
        assert x["kl_mu_student/max"] <= x["eps"]
        if x["eps"] > 0:  # speculative while the budget is positive, with its acceptance logged
            assert 0 < x["spec/acceptance"] <= 1 and x["spec/pinsker_bound"] == pytest.approx(1 - (x["eps"] / 2) ** 0.5)
        else:
            assert "spec/acceptance" not in x


def test_topk_larger_than_vocab_is_refused(pair, tmp_path):
    s, t = pair
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "loss.k=100000", f"hydra.run.dir={tmp_path / 'k'}"],
             cwd=tmp_path)
    assert r.returncode == 2 and "loss.k=100000 exceeds the vocabulary size" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "k" / "checkpoints").exists()


def test_non_finite_loss_stops_with_the_step(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s, t = pair
    bad = AutoModelForCausalLM.from_pretrained(t)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    bad.save_pretrained(tmp_path / "nan_teacher")
    AutoTokenizer.from_pretrained(t).save_pretrained(tmp_path / "nan_teacher")
    args = ["train", f"student.path={s}", f"teacher.path={tmp_path / 'nan_teacher'}", "method=opd",
            f"hydra.run.dir={tmp_path / 'n'}", *SMALL]
    r = _cli(args, cwd=tmp_path)  # refused at load, before a step
    assert r.returncode == 2 and "teacher's weights hold NaN or inf" in r.stderr and "Traceback" not in r.stderr
    # with the load check out of the way, the first step's loss is the guard
    code = ("import sys; import trb.models as m; m.nonfinite_names = lambda *a, **k: []; from trb.cli import main; "
            "sys.argv = ['trb', *sys.argv[1:]]; main()")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 2 and "non-finite loss at step 0" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["train", "--help"], ["train", "--cfg", "job"], ["eval", "--help"],
                                  ["rollout", "--cfg", "job"]])
def test_help_and_cfg_never_import_torch(args, tmp_path):
    """What makes them fast (was ~3 s here, 11 s on a busy machine): torch and transformers load only
    after the config is composed and a run is about to start."""
    code = ("import sys\nfrom trb.cli import main\nsys.argv = ['trb', *sys.argv[1:]]\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "TORCH False False", r.stdout[-1000:] + r.stderr[-1000:]


def test_lines_without_a_terminal_and_the_run_log(pair, tmp_path):
    """No TTY (Slurm, nohup, CI): one line every log_every steps with loss, eps, beta, reward,
    tokens/s, ETA; the run dir's train.log holds the same lines as the console."""
    s, t = pair
    out = tmp_path / "r"
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "steps=4", "log_every=2", "prompts_per_step=2",
              "rollout.n=1", "rollout.max_new_tokens=6", "eval_every=0", "dataset.eval_size=2", "logger.kind=none",
              f"output_dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("step ") and "/4" in x]
    assert [x.split()[1] for x in lines] == ["2/4", "4/4"]
    for key in ("loss ", "eps ", "beta ", "reward ", "train tok/s", "ETA "):
        assert all(key in x for x in lines), lines
    assert (out / "train.log").read_text().splitlines() == r.stdout.splitlines()


@pytest.mark.parametrize("command, schema, own, foreign", [
    ("train", "TrainConfig", ["method", "blend", "loss", "eval_decoding", "experiment"], []),
    ("eval", "EvalConfig", ["dataset", "prompt", "decoding"], ["method", "blend", "loss", "student"]),
    ("rollout", "RolloutRunConfig", ["method", "blend", "dataset"], ["loss", "decoding", "experiment"]),
])
def test_help_lists_the_commands_groups_and_every_setting_with_its_doc(command, schema, own, foreign, tmp_path):
    import trb.config as config
    from trb.helptext import schema_docs

    r = _cli([command, "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    groups = r.stdout.split("Config groups")[1].split("Settings")[0]
    listed = {line.split()[0] for line in groups.splitlines()[1:] if line.strip()}
    assert set(own) <= listed and not (set(foreign) & listed), listed
    settings = r.stdout.split("Settings")[1]
    docs = schema_docs(getattr(config, schema))
    for key, (doc, is_section) in docs.items():
        if is_section:
            continue
        if key.startswith("eval_dataset."):  # an unset optional section is one line
            continue
        line = next((x for x in settings.splitlines() if x.strip().startswith(f"{key}=")), None)
        assert line is not None, key
        assert doc, f"{schema}.{key} has no doc (trb.config.setting)"
    assert not (tmp_path / "outputs").exists()  # help writes nothing
    r = _cli([command, "rollout.n=7" if command != "eval" else "decoding.n=7", "--help"], cwd=tmp_path)
    assert ("rollout.n=7" if command != "eval" else "decoding.n=7") in r.stdout  # values as composed


def test_wandb_gets_a_real_model_artifact_and_completion_tables(pair, tmp_path):
    """Offline W&B (the run file read back with wandb's own protobuf schema, tests/helpers.read_wandb):
    the final model is uploaded as files (weights, config, tokenizer; no trainer state, no file://
    reference) with its step, accuracy and config as metadata; a table of training completions (with
    the gold and extracted answers) every logger.table_every steps; the run is grouped under its run
    dir's name, where `trb eval` of the run dir joins it."""
    from helpers import wandb_offline

    s, t = pair
    out = tmp_path / "r-wandb"
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "steps=2", "prompts_per_step=2", "rollout.n=1",
              "rollout.max_new_tokens=6", "eval_every=0", "dataset.eval_size=2", "logger.table_every=1",
              "logger.table_rows=2", f"output_dir={out}"], cwd=tmp_path, wandb_mode="offline")
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (out / "wandb").glob("offline-run-*")
    tables = sorted((run / "files" / "media" / "table" / "train").glob("completions_*.table.json"))
    assert len(tables) == 2  # steps 0 and 1
    data = json.loads(tables[0].read_text())
    assert data["columns"] == ["step", "prompt", "completion", "gold", "extracted", "reward", "mean_beta"]
    assert len(data["data"]) == 2
    assert all(isinstance(row[2], str) and "What is" in row[1] and row[3] for row in data["data"])
    log = next(run.glob("run-*.wandb")).read_bytes()
    assert b"model.safetensors" in log and b"tokenizer.json" in log and b"config.json" in log
    assert b"trainer_state.pt" not in log and b"file://" not in log
    w = wandb_offline(out)
    assert w["run"]["group"] == "r-wandb" and w["run"]["job_type"] == "train"
    (model,) = [a for a in w["artifacts"] if a["type"] == "model"]
    summary = json.loads((out / "summary.json").read_text())
    meta = model["metadata"]
    assert model["name"] == "student-r-wandb" and "step-2" in model["aliases"]
    assert meta["step"] == 2 and meta["accuracy_after"] == summary["accuracy_after"] is not None
    assert meta["config"]["student"]["path"] == s and meta["method"] == "trb"
    assert [h["loss"] for h in w["history"] if "loss" in h] == [
        x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    # trb eval of the run dir: an eval job in the train run's group, linked to its W&B run id
    ev = tmp_path / "ev"
    r = _cli(["eval", f"checkpoint={out}", "dataset.eval_size=2", "decoding.max_new_tokens=4",
              f"output_dir={ev}"], cwd=tmp_path, wandb_mode="offline")
    assert r.returncode == 0, r.stderr[-2000:]
    e = wandb_offline(ev)
    assert e["run"]["group"] == "r-wandb" and e["run"]["job_type"] == "eval"
    assert e["run"]["config"]["train_run"]["wandb_run_id"] == w["run"]["id"]


def test_tensorboard_gets_scalars_tables_and_the_checkpoint(pair, tmp_path):
    """logger.kind=tensorboard: event files under <run dir>/tensorboard hold every metric as a scalar
    (the same values as metrics.jsonl), the completions table as text, the config and the final
    checkpoint's path; read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s, t = pair
    out = tmp_path / "r"
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "steps=2", "prompts_per_step=2", "rollout.n=1",
              "rollout.max_new_tokens=6", "eval_every=0", "dataset.eval_size=2", "logger.table_every=1",
              "logger.kind=tensorboard", f"output_dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "wandb").exists()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(x["step"], x["loss"]) for x in records if "loss" in x]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("loss")] == losses
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2]
    texts = set(acc.Tags()["tensors"])
    assert {"train/completions/text_summary", "config/text_summary", "checkpoint/text_summary"} <= texts
    table = acc.Tensors("train/completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| step | prompt | completion | gold | extracted | reward | mean_beta |")
    ckpt = acc.Tensors("checkpoint/text_summary")[0].tensor_proto.string_val[0].decode()
    assert ckpt.endswith("checkpoints/step_000002")
    # extended to 3 steps: the resumed run purges from step 2 and replays the eval kept there; each step once
    r = _cli(["train", f"student.path={s}", f"teacher.path={t}", "steps=3", "prompts_per_step=2", "rollout.n=1",
              "rollout.max_new_tokens=6", "eval_every=0", "dataset.eval_size=2", "logger.table_every=1",
              "logger.kind=tensorboard", f"output_dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("loss")] == [x["step"] for x in records if "loss" in x] == [0, 1, 2]
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [
        (x["step"], pytest.approx(x["eval/accuracy"])) for x in records if "eval/accuracy" in x]
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2, 3]


def test_under_a_terminal_a_bar_and_lines_above_it(pair, tmp_path):
    """Under a (pseudo-)terminal: tqdm bars for training and the periodic eval, the other lines
    printed whole above them (each at a line start), no per-step lines."""
    import os
    import pty
    import select

    s, t = pair
    out = tmp_path / "r"
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "trb", "train", f"student.path={s}", f"teacher.path={t}",
                             "steps=4", "log_every=1", "eval_every=2", "prompts_per_step=2", "rollout.n=1",
                             "rollout.max_new_tokens=6", "dataset.eval_size=2", "logger.kind=none",
                             f"output_dir={out}"], cwd=tmp_path, stdout=slave, stderr=slave,
                            env={**os.environ, "WANDB_MODE": "disabled", "COLUMNS": "120"})
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "train:" in text and ("it/s" in text or "s/it" in text), text[-2000:]  # the bar drew
    lines = text.replace("\r", "\n").splitlines()
    for step in (0, 2, 4):
        assert any(x.startswith(f"step {step:5d}  eval accuracy") for x in lines), text[-3000:]
    assert not any(x.startswith("step 1/4") for x in lines)  # per-step lines only without a terminal
    assert "eval @ 2" in text  # the periodic eval's bar
