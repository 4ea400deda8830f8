"""Run tracking: metrics.jsonl in the run dir (always), and W&B or TensorBoard on top (logger.kind)."""

from __future__ import annotations

from trb.errors import UserError, started

import json
import math
import re
import os
import secrets
import string
import warnings
from pathlib import Path

from trb.config import LoggerConfig


def _wandb_mode(cfg: LoggerConfig) -> str:
    """W&B mode: WANDB_MODE wins; auto = online with credentials, offline otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class Tracker:
    """log(metrics, step) to metrics.jsonl and the chosen tracker (logger.kind: wandb | tensorboard | none);
    tables, the model artifact and HTML pages go where the tracker has a place for them; finish() closes all.

    group: the W&B group (default logger.group); train runs use their run dir's name when logger.group is
    unset, so that `trb eval` of a run dir joins the train run's group. start_step: a resumed run's first
    step (TensorBoard drops what an earlier attempt logged from there on, as metrics.jsonl does)."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str | None = None,
                 group: str | None = None, start_step: int | None = None):
        started()  # the run writes from here on: a failure is no longer a refusal
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self.run = None  # the W&B run
        self.tb = None  # the TensorBoard writer
        if cfg.kind == "tensorboard":
            self.tb = _tensorboard(Path(run_dir) / TENSORBOARD_DIR, start_step)
            self.tb.add_text("config", "```json\n" + json.dumps(config, indent=1, default=str) + "\n```",
                             global_step=start_step or 0)
        if cfg.kind == "wandb":
            mode = _wandb_mode(cfg)
            if mode != "disabled":
                import wandb

                # one W&B run per run dir: a resumed run continues the same W&B run id
                id_file = Path(run_dir) / "wandb_run_id"
                run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()

                def start(mode: str):
                    return wandb.init(project=cfg.project, entity=cfg.entity, group=group or cfg.group,
                                      job_type=cfg.job_type, tags=list(cfg.tags), config=config, name=name,
                                      dir=str(run_dir), mode=mode, reinit="finish_previous", id=run_id,
                                      resume="allow", settings=wandb.Settings(init_timeout=cfg.init_timeout))

                try:
                    try:
                        self.run = start(mode)
                    except Exception as err:  # noqa: BLE001 - an unreachable server must not kill a run
                        if mode != "online":
                            raise
                        why = str(err).splitlines()[0] if str(err) else type(err).__name__
                        warnings.warn(f"W&B is unreachable ({why}); logging offline instead: upload later with "
                                      f"`wandb sync {Path(run_dir) / 'wandb'}`", stacklevel=2)
                        wandb.teardown()  # the failed online attempt still holds the run id in wandb's service
                        self.run = start("offline")
                    id_file.write_text(run_id)
                except Exception as err:  # noqa: BLE001 - tracking must not kill a run
                    warnings.warn(f"W&B init failed ({err}); continuing with metrics.jsonl only", stacklevel=2)
                    self.run = None

    def replay(self, record: dict) -> None:
        """A kept metrics.jsonl record at a resumed run's first step, again into TensorBoard (whose purge on
        resume drops every event from that step on, the eval the checkpoint kept included)."""
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, float(v), global_step=record["step"])
            self.tb.flush()

    @property
    def wants_tables(self) -> bool:
        """Whether tables go anywhere (W&B or TensorBoard on)."""
        return self.run is not None or self.tb is not None

    def log(self, metrics: dict, step: int, record: dict | None = None) -> None:
        """`record`: extra fields for metrics.jsonl only (what the line is about, e.g. a checkpoint path)."""
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        rec = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in clean.items()}, **(record or {})}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log(clean, step=step)
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, global_step=step)
            self.tb.flush()

    def log_artifact(self, path: Path, name: str, kind: str = "model", what: str = "model",
                     metadata: dict | None = None, aliases: list[str] | None = None) -> None:
        """The checkpoint folder as a W&B artifact: model (its files but trainer_state.pt: weights,
        config, tokenizer, so a teammate's `artifact.download()` gets a loadable folder), full (all
        files), reference (a file:// pointer: nothing uploaded, usable only on this file system), none.
        metadata (step, accuracy, the run's config) is shown with the artifact. TensorBoard has no
        artifacts: the checkpoint's path is logged as text."""
        if what == "none":
            return
        if self.tb is not None:
            self.tb.add_text("checkpoint", f"{Path(path).resolve()}", global_step=(metadata or {}).get("step", 0))
            self.tb.flush()
        if self.run is None:
            return
        import wandb

        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:128], type=kind,  # W&B's allowed characters
                             metadata=json.loads(json.dumps(metadata or {}, default=str)))
        if what == "reference":
            art.add_reference(Path(path).resolve().as_uri())
        else:
            for f in sorted(Path(path).iterdir()):
                if f.is_file() and (what == "full" or f.name != "trainer_state.pt"):
                    art.add_file(str(f), name=f.name)
        self.run.log_artifact(art, aliases=["latest", *(aliases or [])])

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """A W&B table; in TensorBoard a markdown table under the text tab (no-op with neither)."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)
        if self.tb is not None:
            self.tb.add_text(key, markdown_table(columns, rows), global_step=step)
            self.tb.flush()

    def html(self, key: str, page) -> None:
        """An HTML page (page() builds it only when a tracker shows pages: W&B)."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Html(page())})

    def finish(self) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish()
        if self.tb is not None:
            self.tb.close()


TENSORBOARD_DIR = "tensorboard"  # logger.kind=tensorboard: the event files, under the run dir


def _tensorboard(log_dir: Path, start_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # LoggerConfig checks the package first; a broken install still says what
        raise UserError(f"logger.kind=tensorboard: {err}; pip install 'trb[tensorboard]' or use "
                        f"logger.kind=wandb|none") from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        text = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def read_metrics(run_dir: Path | str) -> list[dict]:
    """The records of a run's metrics.jsonl (see metrics_records)."""
    return metrics_records(Path(run_dir) / "metrics.jsonl")


def metrics_records(path: Path, with_lines: bool = False) -> list:
    """The records of a metrics.jsonl. A torn last line (a process killed mid-write) is dropped;
    any other line that is not a JSON object is an error naming the file and line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or "step" not in rec:
            if i == len(lines) - 1 and rec is None:
                break  # torn by a crash; recomputed on resume
            raise UserError(f"{path} line {i + 1} is not a metrics record ({line[:60]!r}): the file was "
                                      f"edited or mixed; repair or remove that line")
        out.append((rec, line) if with_lines else rec)
    return out

