"""Run tracking: metrics.jsonl in the run dir (always) and W&B on top (unless logger.kind=none)."""

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
    """log(metrics, step) to metrics.jsonl and W&B; finish() closes both."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str | None = None):
        started()  # the run writes from here on: a failure is no longer a refusal
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self.run = None
        if cfg.kind == "wandb":
            mode = _wandb_mode(cfg)
            if mode != "disabled":
                import wandb

                # one W&B run per run dir: a resumed run continues the same W&B run id
                id_file = Path(run_dir) / "wandb_run_id"
                run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()

                def start(mode: str):
                    return wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group,
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

    def log_artifact(self, path: Path, name: str, kind: str = "model", what: str = "model") -> None:
        """The checkpoint folder as a W&B artifact: model (its files but trainer_state.pt: weights,
        config, tokenizer, so a teammate's `artifact.download()` gets a loadable folder), full (all
        files), reference (a file:// pointer: nothing uploaded, usable only on this file system), none."""
        if self.run is None or what == "none":
            return
        import wandb

        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:128], type=kind)  # W&B's allowed characters
        if what == "reference":
            art.add_reference(Path(path).resolve().as_uri())
        else:
            for f in sorted(Path(path).iterdir()):
                if f.is_file() and (what == "full" or f.name != "trainer_state.pt"):
                    art.add_file(str(f), name=f.name)
        self.run.log_artifact(art)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """A W&B table (no-op without W&B)."""
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish()


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

