"""The `trb` command: a Typer app whose subcommands hand their arguments to Hydra.

    trb train [overrides]        distil (see `trb train --help`)
    trb eval [overrides]         score checkpoints (see `trb eval --help`)
    trb rollout [overrides]      sample under a behaviour policy, no training (`trb rollout --help`)
    trb plan [overrides]         memory per device of each phase of a step (no weights loaded)
    trb download [overrides]     fetch the hub models and datasets a config needs (run commands never download)
    trb report RUN_OR_SWEEP...   compare runs grouped by their differing settings: paired intervals, plots, a table
    trb toy build [--out DIR]    rebuild the embedded toy models (bit for bit with transformers 5.24.0)

Only this file knows Hydra and OmegaConf: it composes conf/<command>.yaml with the overrides,
merges the result onto the typed schema (trb.config) and calls the pure-Python entry point.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand

from trb import __version__
from trb.errors import RunStopped, UserError, has_started, was_nothing_done

# One thread is several times faster than torch's default on small models on 2-vCPU machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trb's run commands never download (trb download does): hub ids resolve from the cache or fail at once
# with a message, instead of after 20-45 s of retries.
_USER_OFFLINE = os.environ.get("HF_HUB_OFFLINE")  # as the user set it (trb download refuses to run offline)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])

# The YAML config groups: conf/ at the top of the repository, shipped inside the wheel as trb/conf (pyproject
# maps the package trb.conf onto conf/), so an installed trb finds them from any directory. TRB_CONF_DIR points
# trb at a copy of the tree instead.
_PKG = Path(__file__).resolve().parent
CONF_DIR = Path(os.environ.get("TRB_CONF_DIR") or (_PKG / "conf" if (_PKG / "conf").is_dir() else _PKG.parent / "conf"))


class _HydraCommand(TyperCommand):
    """A command that takes Hydra overrides: shell completion offers its settings (`key=`), config groups
    and their options (`group=option`)."""

    CONFS = {"train": ("train", "TrainConfig"), "plan": ("train", "TrainConfig"), "download": ("train", "TrainConfig"),
             "eval": ("eval", "EvalConfig"), "rollout": ("rollout", "RolloutRunConfig")}

    def shell_complete(self, ctx, incomplete: str):
        from click.shell_completion import CompletionItem

        import trb.config as config
        from trb.helptext import complete_overrides

        conf, schema = self.CONFS[self.name]
        words = list(getattr(ctx, "args", []) or [])
        return [CompletionItem(c) for c in complete_overrides(CONF_DIR, conf, getattr(config, schema), words,
                                                              incomplete)]


HYDRA_ARGS = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True,
                                   "help_option_names": []}, "add_help_option": False, "cls": _HydraCommand}

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode="markdown",
                  help="trb: on-policy distillation with Trust-Region behavior Blending (TRB).")
toy_app = typer.Typer(help="The embedded toy task and models.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"trb {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def to_schema(cfg, schema):
    """Merge a composed DictConfig onto a dataclass schema; errors name the offending key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise UserError(f"invalid config: {str(err).splitlines()[0]} (key: {key})") from None
    except ValueError as err:
        raise UserError(f"invalid config: {err}") from None


def sweep_subdir(num, name) -> str:
    """A sweep job's dir name: NUM_<overrides> with path separators and `..` replaced (a value such as
    ../x must not write outside the sweep dir), at most 200 bytes (longer: cut, plus a hash of the whole)."""
    import hashlib
    import re

    safe = re.sub(r"[/\\\x00-\x1f]", "_", str(name or "")).replace("..", "__")
    full = f"{num}_{safe}" if safe else str(num)
    if len(full.encode()) > 200:
        full = full.encode()[:180].decode(errors="ignore") + "-" + hashlib.sha1(full.encode()).hexdigest()[:12]
    return full


def _unusable_dir(path: Path) -> str | None:
    """Why a run dir cannot be made or written (a name too long, no write permission), else None."""
    text = str(path)
    too_long = [part for part in Path(text).parts if len(part.encode()) > 255]
    if too_long or len(os.fsencode(os.path.abspath(text))) > 4000:
        return (f"output_dir {text[:80]}...: a name in it is longer than the file system allows; use a shorter "
                f"output_dir")
    probe = Path(os.path.abspath(text))
    while not probe.exists():
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == Path(os.path.abspath(text)):
            return f"the run dir {text} is a file, not a directory: use another output_dir"
        return f"output_dir {text}: {probe} is a file, not a directory; use another output_dir"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output_dir {text}: {probe} is not writable; fix its permissions or use another output_dir"
    return None


def run_hydra(config_name: str, args: list[str], task) -> None:
    """Run `task(cfg_dict, run_dir)` under Hydra with conf/<config_name>.yaml and `args`."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("trb_subdir"):
        OmegaConf.register_new_resolver("trb_subdir", sweep_subdir)

    failures: list[str] = []
    multirun = any(a in ("-m", "--multirun") for a in args)
    named = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("hydra.run.dir=")), None)
    problem = _unusable_dir(named) if named is not None else None
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(code=2)
    if named is not None and not multirun:
        from trb.rundir import busy

        held = busy(named)
        if held:  # another live process writes there: refuse before Hydra adds its job log and .hydra/
            typer.echo(f"error: {held}", err=True)
            raise typer.Exit(code=2)
    before = _DirState.capture(named) if named is not None and not multirun else None

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def _entry(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            task(cfg, run_dir)
            if not multirun and was_nothing_done() and _rank() == 0 and before is not None:
                before.restore()  # it wrote nothing (a finished run, re-run): nor does Hydra's job log
        except UserError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            failures.append(str(err))
            typer.echo(f"error: {err}", err=True)
            if not multirun and not isinstance(err, RunStopped) and not has_started() and _rank() == 0:
                (before or _DirState(run_dir, existed=False)).restore()  # a refusal: the run dir as it was

    launched = _launched()
    if launched:  # under torchrun: one run dir for all ranks, written by rank 0
        from trb import distributed

        _join_ranks()
        if distributed.current().rank != 0:
            args = [*args, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    argv = sys.argv
    sys.argv = [f"trb {config_name}", *args]
    ok = False
    try:
        _entry()
        ok = not failures
    finally:
        sys.argv = argv
        if launched or "torch.distributed" in sys.modules:  # (help and --cfg never import torch)
            from trb import distributed

            distributed.finish(barrier=ok)
    if failures:
        raise typer.Exit(code=2)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _DirState:
    """What Hydra writes into a run dir before trb runs (.hydra/, the job log), captured before the
    command so that a refusal can put it back; a dir that did not exist is removed again."""

    _HYDRA = (".hydra",)

    def __init__(self, path: Path, existed: bool, files: dict | None = None):
        self.path, self.existed, self.files = Path(path), existed, files or {}

    @classmethod
    def capture(cls, path: Path) -> _DirState:
        path = Path(path)
        if not path.is_dir():
            return cls(path, existed=False)
        files = {p: p.read_bytes() for p in path.glob(".hydra/*") if p.is_file()}
        files.update({p: p.read_bytes() for p in path.glob("*.log") if p.is_file()})
        return cls(path, existed=True, files=files)

    def restore(self) -> None:
        import shutil

        if not self.path.is_dir():
            return
        if not self.existed:
            extra = [p for p in self.path.iterdir() if p.name not in self._HYDRA and p.suffix != ".log"]
            if not extra:  # only what Hydra wrote: the dir goes
                shutil.rmtree(self.path, ignore_errors=True)
            return
        for p in [*self.path.glob(".hydra/*"), *self.path.glob("*.log")]:
            if p.is_file() and p not in self.files:
                p.unlink(missing_ok=True)
        for p, data in self.files.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        hydra_dir = self.path / ".hydra"
        if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()


def _launched() -> bool:
    """Whether this process is one of several ranks (torchrun or Slurm tasks); a Slurm job that
    lacks the rendezvous address ends with a message. Decided from the environment first, so that
    `--help` and `--cfg` of a single process never import torch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and os.environ.get("TRB_SLURM_RANKS") != "1":
        return False
    from trb import distributed

    try:
        return distributed.launched()
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None


def _join_ranks() -> None:
    """torchrun: join the process group before Hydra composes; TRB_RUN_STAMP (rank 0's clock) names
    the run / sweep dir in conf/train.yaml, so every rank uses the same folder."""
    import torch

    from trb import distributed

    try:
        distributed.init("auto" if torch.cuda.is_available() else "cpu")
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    os.environ["TRB_RUN_STAMP"] = distributed.shared_now().strftime("%Y-%m-%d_%H-%M-%S")


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def cfg_sweep_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().sweep.dir


@app.command("train", **HYDRA_ARGS)
def train_cmd(ctx: typer.Context) -> None:
    """Distil a student from a teacher under the trust-region behaviour policy (Hydra overrides;
    `trb train --help` lists the config groups)."""

    from trb.config import TrainConfig

    _hydra_command("train", ctx, TrainConfig, "trb.train:train")


def _hydra_command(name: str, ctx: typer.Context, schema, entry: str) -> None:
    """Compose conf/<name>.yaml with the overrides, type it as `schema`, run `entry(cfg, run_dir)`;
    output_dir overrides Hydra's run dir, and a sweep's runs share one W&B group."""

    if _launched() and name != "train":
        typer.echo(f"error: trb {name} runs in one process: launch it without torchrun (only trb train is "
                   f"data-parallel)", err=True)
        raise typer.Exit(code=2)

    _maybe_help(name, name, schema, list(ctx.args))
    _check_overrides(name, schema, list(ctx.args))

    def task(cfg, run_dir: Path) -> None:
        typed = to_schema(cfg, schema)
        _download_hint(name, typed, list(ctx.args))
        if typed.output_dir:
            run_dir = Path(typed.output_dir)
        if typed.logger.group is None and _is_multirun():
            typed.logger.group = Path(cfg_sweep_dir()).name
        module, fn = entry.split(":")
        run = getattr(importlib.import_module(module), fn)  # torch and transformers load only now
        if name == "eval" and typed.datasets:  # several benchmarks, each with its own preset
            from trb.eval_run import run_eval_suite

            suite = _eval_suite(typed, list(ctx.args))
            _run_user_task(lambda: run_eval_suite(suite, run_dir, log=_Echo(run_dir / f"{name}.log")))
            return
        _run_user_task(lambda: run(typed, run_dir, log=_Echo(run_dir / f"{name}.log")))

    run_hydra(name, _run_dir_args(list(ctx.args)), task)


def _eval_suite(typed, args: list[str]) -> list:
    """datasets=[a,b:FILE,...]: one eval config per entry, composed with its own dataset preset (and
    that preset's prompt / decoding) under the command's other overrides."""
    from trb.config import EvalConfig

    over = _user_overrides(args)
    if any(a.startswith(("dataset=", "dataset.")) for a in over):
        raise UserError("datasets=[...] composes each benchmark's own preset: drop dataset= / dataset.* (a local "
                        "copy of one benchmark: datasets=[NAME:FILE,...])")
    over = [a for a in over if not a.startswith("datasets=")]
    suite, seen = [], set()
    for entry in typed.datasets:
        name, _, path = str(entry).partition(":")
        if name in seen:
            raise UserError(f"datasets lists {name} twice")
        seen.add(name)
        c = compose("eval", [*over, f"dataset={name}", *([f"dataset.path={path}"] if path else [])], EvalConfig)
        c.datasets, c.output_dir = [], None
        suite.append((name, c))
    return suite


def _download_hint(command: str, typed, args: list[str]) -> None:
    """The `trb download ...` a missing-items refusal of this command names."""
    import shlex

    from trb import download

    over = [a for a in _user_overrides(args) if command == "train" or not a.startswith(("checkpoint=", "dataset"))]
    parts = ["trb download"]
    if command == "train":
        parts += over
    else:
        names = getattr(typed, "datasets", None) or [typed.dataset.name]
        parts.append("--eval " + ",".join(n.split(":", 1)[0] for n in names))
        if command == "eval":
            models = typed.checkpoint if isinstance(typed.checkpoint, (list, tuple)) else [typed.checkpoint]
        else:  # rollout
            models = [typed.student.path, typed.teacher.path]
        parts += [f"--model {m}" for m in models if download._hub_id(str(m))]
    download.HINT = " ".join([parts[0], *(p if p.startswith("--") else shlex.quote(p) for p in parts[1:])])


class _Echo:
    """The console lines of a run, also appended to <run dir>/<command>.log (Slurm logs, nohup and a
    later look at the run dir show the same lines)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        typer.echo(msg)
        self.file(msg)

    def file(self, msg: str) -> None:
        try:
            with self.path.open("a") as f:
                f.write(msg + "\n")
        except OSError:  # a log line is never worth a failed run
            pass


def _maybe_help(command: str, conf_name: str, schema, args: list[str]) -> None:
    """--help / -h: this command's groups and every setting with its value and doc (trb.helptext);
    Hydra's own flags stay under --hydra-help."""
    if any(a in ("-sc", "--shell-completion") or a.startswith(("-sc=", "--shell-completion=")) for a in args):
        typer.echo("error: Hydra's -sc does not reach trb's commands: `trb --install-completion` installs trb's "
                   "own completion (commands, every key=, every group=option)", err=True)
        raise typer.Exit(code=2)
    if not any(a in ("--help", "-h") for a in args):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trb.helptext import render_help

    try:
        typer.echo(render_help(command, conf_name, schema, CONF_DIR, [a for a in args if a not in ("--help", "-h")]),
                   nl=False)
    except (HydraException, OmegaConfBaseException) as err:
        typer.echo(f"error: {str(err).splitlines()[0]}", err=True)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=0)


def _check_overrides(conf_name: str, schema, args: list[str]) -> None:
    """A typo'd key or group option: one line naming the nearest valid ones, exit 2, before Hydra runs
    (its own message spans lines and suggests `+key=`, which would add a key nothing reads)."""
    from trb.helptext import check_overrides

    problem = check_overrides(conf_name, schema, CONF_DIR, args)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(code=2)


def _run_dir_args(args: list[str]) -> list[str]:
    """output_dir=X (one run) is Hydra's run dir too: .hydra/ and the log live with the run, and no
    stray outputs/<command>/<time>/ is made."""
    out = next((a.split("=", 1)[1] for a in args if a.startswith("output_dir=")), None)
    if out and out != "null" and not any(a in ("-m", "--multirun") for a in args) and \
            not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={out}"]
    return args


@app.command("plan", **HYDRA_ARGS)
def plan_cmd(ctx: typer.Context) -> None:
    """Predict the peak memory per device of each phase of a training step (the same overrides as
    trb train; no weights loaded): a table and plan.json; exit 0 if it fits, 1 if not."""
    from trb.config import TrainConfig

    _maybe_help("plan", "train", TrainConfig, list(ctx.args))
    _check_overrides("train", TrainConfig, list(ctx.args))
    from trb.plan import PlanError, run_plan

    codes: list[int] = []

    def task(cfg, run_dir: Path) -> None:
        typed = to_schema(cfg, TrainConfig)
        try:
            codes.append(run_plan(typed, Path(typed.output_dir) if typed.output_dir else run_dir, log=typer.echo))
        except PlanError as err:
            raise UserError(str(err)) from None

    args = _run_dir_args(list(ctx.args))
    if not any(a.startswith(("hydra.run.dir=", "output_dir=")) for a in args):
        args.append("hydra.run.dir=outputs/plan/${now:%Y-%m-%d_%H-%M-%S}")
    run_hydra("train", args, task)
    if codes and max(codes):
        raise typer.Exit(code=1)


def compose(config_name: str, overrides: list[str], schema):
    """The typed config of conf/<config_name>.yaml with these overrides, without a run dir (Hydra's
    compose API); a bad override is a UserError."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra run (trb eval datasets=[...])
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(str(err).splitlines()[0]) from None
    return to_schema(cfg, schema)


def _user_overrides(args: list[str]) -> list[str]:
    """The config overrides of a command line (no Hydra flags, run dirs or sweep switches)."""
    return [a for a in args if not a.startswith(("-", "hydra.", "hydra/", "output_dir="))]


@app.command("download", cls=_HydraCommand,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def download_cmd(
    ctx: typer.Context,
    eval_sets: str = typer.Option("", "--eval", help="Evaluation presets to fetch too, comma-separated (e.g. "
                                                     "gsm8k,math500,aime24,aime25,amc23,olympiadbench)."),
    models: list[str] = typer.Option([], "--model", help="A hub model id to fetch too (repeatable), e.g. a "
                                                         "checkpoint for trb eval."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be fetched and what is cached; fetch "
                                                          "nothing (works offline)."),
) -> None:
    """Fetch the hub models and datasets a config needs into the Hugging Face cache (the same overrides
    as trb train; trb train / eval / rollout never download): trb download experiment=paper_0.6b_4b"""
    if not dry_run and _USER_OFFLINE in ("1", "true", "TRUE", "True", "yes", "YES", "on", "ON"):
        typer.echo(f"error: HF_HUB_OFFLINE={_USER_OFFLINE} is set: trb download needs the network; unset it (or "
                   f"use --dry-run)", err=True)
        raise typer.Exit(code=2)
    if not dry_run:  # only this command goes online (the libraries read these at import)
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "0"
    from trb.config import DatasetConfig, EvalConfig, ModelConfig, TrainConfig
    from trb.download import eval_items, model_items, run_download, train_items

    def run() -> int:
        overrides = _user_overrides(list(ctx.args))
        names = [n.strip() for n in eval_sets.split(",") if n.strip()]
        items = []
        if overrides or not (names or models):
            items += train_items(compose("train", overrides, TrainConfig))
        for name in names:
            ds = compose("eval", [f"dataset={name}"], EvalConfig).dataset
            items += eval_items(ds if isinstance(ds, DatasetConfig) else DatasetConfig(**ds), f"--eval {name}")
        for m in models:
            items += model_items(ModelConfig(path=m), "--model")
        return run_download(list({it.key(): it for it in items}.values()), dry_run, log=typer.echo)

    try:
        missing = run()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    if missing and not dry_run:
        raise typer.Exit(code=1)


@app.command("eval", **HYDRA_ARGS)
def eval_cmd(ctx: typer.Context) -> None:
    """Score checkpoints: pass@k / maj@k graded with math-verify (Hydra overrides; `trb eval --help`)."""
    from trb.config import EvalConfig

    _hydra_command("eval", ctx, EvalConfig, "trb.eval_run:run_eval")


@app.command("rollout", **HYDRA_ARGS)
def rollout_cmd(ctx: typer.Context) -> None:
    """Sample prompts under a method's behaviour policy without training: per-token records,
    an HTML view coloured by beta, diagnostics, a continuation-gain probe (`trb rollout --help`)."""
    from trb.config import RolloutRunConfig

    _hydra_command("rollout", ctx, RolloutRunConfig, "trb.rollout_run:run_rollout")


@app.command("report")
def report_cmd(
    paths: list[Path] = typer.Argument(..., help="Run dirs and/or sweep dirs (their run dirs are found)."),
    out: Path = typer.Option(None, help="Output folder (default: the sweep dir when one is given, "
                                        "else outputs/report)."),
    band: str = typer.Option("minmax", help="Band around the seed mean: minmax or std (+-1 std)."),
    early: int = typer.Option(50, help="Steps shown in schedule.png (eps, mean beta*, realised KL)."),
    baseline: str = typer.Option("opd", help="Method every group is compared with: paired-by-seed differences "
                                             "with 95% t-intervals ('' for none)."),
) -> None:
    """Compare runs grouped by every config key that differs among them: report.md (table with final, best,
    AUC and paired differences to the baseline), report.json, accuracy.png, difference.png, schedule.png."""
    from trb.report import report

    try:
        report(paths, out, band=band, early=early, baseline=baseline or None, log=typer.echo)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None


bench_app = typer.Typer(help="Benchmarks: rollout and training-step speed as ratios measured in one run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@bench_app.command("rollout")
def bench_rollout_cmd(
    pair: str = typer.Option("toy", help="toy | vocab32k | smollm2 | gpu-0.6b-4b"),
    batch: str = typer.Option("1,8,32,64", help="Batch sizes (sequences), comma-separated."),
    n: str = typer.Option("1,4", help="Samples per prompt, comma-separated."),
    modes: str = typer.Option(",".join(("student", "teacher", "blend", "spec2", "spec4", "spec8", "fast",
                                        "generate")), help="Modes, comma-separated (specK: draft length K)."),
    new_tokens: int = typer.Option(64, help="New tokens per sequence (no stop token)."),
    eps: float = typer.Option(0.01, help="Trust-region budget for blend / spec modes."),
    repeats: int = typer.Option(3, help="Timed repeats per cell (median reported)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: int = typer.Option(1, help="torch CPU threads."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the beta search (one-off ~40 s)."),
    search: str = typer.Option("newton", help="Beta search: newton (default) or bisect (the previous one)."),
    compile_step: bool = typer.Option(False, "--compile-step", help="Per-token modes decode with static caches "
                                      "through torch.compile'd forwards (rollout.compile_step)."),
    out: Path = typer.Option(None, help="JSON output (default benchmarks/results/rollout_PAIR_TIME.json)."),
) -> None:
    """Decode speed of every sampler: tokens/s, prefill, beta-search time, acceptance, peak memory."""
    from trb.bench import bench_rollout, write_result

    try:
        res = bench_rollout(pair, _ints(batch), _ints(n), [m for m in modes.split(",") if m], new_tokens, eps,
                            repeats, device, threads, compile, search, compile_step=compile_step, log=typer.echo)
    except (RuntimeError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {write_result(res, out)}")


@bench_app.command("train")
def bench_train_cmd(
    pair: str = typer.Option("vocab32k", help="toy | vocab32k | smollm2 | gpu-0.6b-4b"),
    batch: int = typer.Option(16, help="Sequences per step."),
    prompt_len: int = typer.Option(32, help="Prompt tokens per sequence."),
    new_tokens: int = typer.Option(64, help="Response tokens per sequence."),
    repeats: int = typer.Option(3, help="Timed repeats (median reported)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: int = typer.Option(1, help="torch CPU threads."),
    out: Path = typer.Option(None, help="JSON output (default benchmarks/results/train_PAIR_TIME.json)."),
) -> None:
    """Training-step speed (teacher scoring, student forward+backward, rollout share) and the loss's
    peak memory chunked vs naive."""
    from trb.bench import bench_train, write_result

    try:
        res = bench_train(pair, batch, prompt_len, new_tokens, repeats, device, threads, log=typer.echo)
    except (RuntimeError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {write_result(res, out)}")


@bench_app.command("decoding")
def bench_decoding_cmd(
    rows: int = typer.Option(32, help="Rows (prompts x 4) of the variable-length workload."),
    new_tokens: int = typer.Option(200, help="Response cap of the variable-length workload."),
    repeats: int = typer.Option(3, help="Timed repeats (median)."),
    out: Path = typer.Option(None, help="JSON output (default benchmarks/results/decoding_TIME.json)."),
) -> None:
    """Rows leaving the batch vs held (variable lengths), eval prefix sharing (n = 8), speculative
    sampling under rollout.max_rows: ratios measured in one run."""
    from trb.bench import bench_decoding, write_result

    typer.echo(f"wrote {write_result(bench_decoding(rows, new_tokens, repeats=repeats, log=typer.echo), out)}")


@bench_app.command("memory")
def bench_memory_cmd(
    cases: str = typer.Option("", help="Cases, comma-separated (default: all of trb.bench.MEMORY_CASES)."),
    out: Path = typer.Option(None, help="JSON output (default benchmarks/results/memory_TIME.json)."),
) -> None:
    """Measured peak memory of each phase (tiny models, a fresh process each, VmHWM) against trb plan:
    measured / planned per phase, and the update's peak for 32 vs 8 sequences at one token budget."""
    from trb.bench import bench_memory, write_result

    try:
        res = bench_memory([c for c in cases.split(",") if c] or None, log=typer.echo)
    except (RuntimeError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {write_result(res, out)}")


@bench_app.command("engine")
def bench_engine_cmd(
    pairs: str = typer.Option("toy,smollm2", help="Models: toy, smollm2 (real SmolLM2-135M; make bench-deps)."),
    batches: str = typer.Option("8,32,128", help="Sequences decoded together, comma-separated."),
    new_tokens: str = typer.Option("128,512", help="New tokens per sequence (capped by the model's positions)."),
    repeats: int = typer.Option(3, help="Timed repeats per cell, engines interleaved (median); 1 for cells over 60 s."),
    max_cell_tokens: int = typer.Option(40000, help="Skip cells of more batch x new tokens (recorded as skipped)."),
    eval_problems: int = typer.Option(1000, help="trb eval on this many toy problems with each engine (0: skip)."),
    eval_n: int = typer.Option(8, help="Samples per problem in the eval section."),
    train_steps: int = typer.Option(10, help="OPD steps of the toy default with each engine (0: skip)."),
    out: Path = typer.Option(None, help="JSON output (default benchmarks/results/engine_TIME.json)."),
) -> None:
    """vLLM vs trb's decoder on student-only decoding: tokens/s (interleaved, ratios in one run), weight-push
    seconds, trb eval wall time, per-step seconds of a short OPD run."""
    from trb.bench_engine import bench_engine
    from trb.bench import write_result

    try:
        res = bench_engine([p for p in pairs.split(",") if p], _ints(batches), _ints(new_tokens), repeats,
                           max_cell_tokens, eval_problems, eval_n, train_steps, log=typer.echo)
    except (RuntimeError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    res.update(kind="engine", pair="+".join(p for p in pairs.split(",") if p))
    typer.echo(f"wrote {write_result(res, out)}")


@bench_app.command("data")
def bench_data_cmd(
    mb: int = typer.Option(200, help="Size of the generated prompt file (OpenThoughts3's layout), MB."),
    sizes: str = typer.Option("1000,25600", help="train_size values, comma-separated."),
    workdir: Path = typer.Option(None, help="Where the file and its Arrow cache go (default: a temporary dir)."),
    out: Path = typer.Option(None, help="JSON output (default benchmarks/results/data_TIME.json)."),
) -> None:
    """Host memory of loading a large prompt file: trb's loader (memory-mapped Arrow, selected rows only) vs
    a whole-file reader, peak RSS per train_size, each in a fresh process."""
    from trb.bench import write_result
    from trb.bench_data import bench_data

    typer.echo(f"wrote {write_result(bench_data(mb, _ints(sizes), workdir, log=typer.echo), out)}")


@bench_app.command("grading")
def bench_grading_cmd(
    items: int = typer.Option(400, help="Items per set (toy solutions; GSM8K/MATH-style completions)."),
    workers: int = typer.Option(1, help="Grading worker processes."),
    out: Path = typer.Option(None, help="JSON output (default benchmarks/results/grading_TIME.json)."),
) -> None:
    """Grading throughput (items/s) of math-verify in trb's worker processes."""
    from trb.bench import bench_grading, write_result

    typer.echo(f"wrote {write_result(bench_grading(items, workers, log=typer.echo), out)}")


def _run_user_task(fn) -> None:
    """Turn the errors a user can fix (bad paths, configs, offline hub ids) into one-paragraph messages."""

    try:
        fn()
    except UserError:
        raise
    except FloatingPointError as err:
        raise RunStopped(str(err)) from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):  # the disk, not trb
            raise RunStopped(f"could not write {err.filename or 'a file'}: {err.strerror}; free space or use "
                             f"another output_dir (the checkpoints written so far are intact)") from None
        if err.errno == errno.EACCES:
            raise UserError(f"permission denied: {err.filename or err}; fix the permissions or use another "
                            f"path") from None
        if isinstance(err, FileNotFoundError):
            raise UserError(str(err)) from None
        raise
    except ValueError as err:
        raise UserError(str(err)) from None


@toy_app.command("build")
def toy_build(out: Path = typer.Option(None, help="Output folder (default: the shipped trb/assets/toy).")) -> None:
    """Rebuild the toy teachers (robust: toy:teacher; clean solutions only: toy:teacher_clean) and
    the student (about 25 minutes on one CPU core; bit-identical to the shipped ones with torch 2.13
    on one thread and transformers 5.24.0, which built them; other transformers releases train to
    other weights)."""
    from trb.toy import ASSETS, build

    path = build(out or ASSETS, log=typer.echo)
    typer.echo(f"toy models written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
