"""One rule for run dirs: a run dir belongs to one run, and one process writes it at a time.

`claim(cfg, run_dir)` runs before anything is loaded or written. It takes an exclusive lock
(`.trb.lock`: pid, host, start time; released on exit; a lock whose process is gone on this host
is stale and taken over) and decides where the run starts:

- a dir without run files (new, empty, or holding unrelated files): a new run, or with
  resume=PATH a continuation of PATH's run (PATH's own train_config.json must match);
- a dir holding a run (train_config.json): the same run (every key equal but the memory and
  decoding knobs of checkpoint._RESUMABLE_IGNORED; `steps` may be raised to extend it) continues
  from its last checkpoint (resume=auto) or from one of its checkpoints (resume=PATH, when no
  later one exists); anything else is refused naming the keys that differ, resume=never included;
  the same run already finished (its last checkpoint at `steps`, summary.json written, no record
  beyond) is done: Claim.done holds its summary and nothing is run or written;
- run files without a train_config.json: refused (trb cannot tell whose they are).

overwrite=true moves the old run's files aside to a sibling `<run dir>.replaced-<time>/` and starts
over. A refusal leaves the dir as it was (the lock removed, a dir created for it removed);
`Claim.commit()` (just before the first write) moves files aside and resets the metrics of a run
that never reached a checkpoint.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from trb.checkpoint import _comparable, checkpoint_step, list_checkpoints
from trb.errors import UserError, started

LOCK = ".trb.lock"
RUN_FILES = ("train_config.json", "data.json", "metrics.jsonl", "summary.json", "checkpoints", "wandb", "wandb_run_id",
             "tensorboard")


class RunDirError(UserError):
    """The run dir cannot be used by this run; the message says why and what to change."""


def _take_lock(run_dir: Path) -> tuple[Path, int, str | None]:
    """An exclusive flock on run_dir/.trb.lock (the kernel drops it when the process dies, however it
    dies: SIGKILL, SIGTERM, preemption, another host's restart); the pid / host / start time in the
    file are only for the message. Returns (path, open fd, a note when a previous holder's record
    was taken over)."""
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _read_lock(fd)
            os.close(fd)
            raise RunDirError(_in_use(run_dir, held)) from None
        try:  # the file may have been removed and re-created by its previous holder meanwhile
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        old = _read_lock(fd)
        note = (f"took over the lock of trb pid {old.get('pid')} on {old.get('host')} (that process is gone)"
                if old.get("pid") else None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return path, fd, note
    raise RunDirError(f"could not take the lock {path}: other processes keep re-creating it")


def write_atomic(path: Path, text: str) -> None:
    """path's new content, or its old one: written to <path>.tmp, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def busy(run_dir: Path) -> str | None:
    """The refusal message when another live process holds run_dir's lock, else None; touches nothing
    (the CLI asks before Hydra writes its job log and .hydra/ into a dir another run is writing)."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _in_use(Path(run_dir), _read_lock(fd))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _in_use(run_dir: Path, held: dict) -> str:
    return (f"output_dir {run_dir} is in use by trb pid {held.get('pid')} on {held.get('host')} since "
            f"{held.get('started')}: a second process would mix both runs; wait for it or use another "
            f"output_dir (the lock is released when that process ends; delete {run_dir / LOCK} only if the file "
            f"system does not support locks)")


def _read_lock(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _run_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn line: resume handles it
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _config_diff(saved: dict, now: dict, last_step: int) -> list[str]:
    """Keys in which two run configs differ (ignoring the resumable knobs); a raised `steps` is an
    extension, not a difference, when the lr schedule does not depend on it. A section a run saved
    before it existed (e.g. lora) counts as its default."""
    saved, now = _comparable(saved), _comparable(now)
    from trb.config import TrainConfig

    defaults = _comparable(json.loads(json.dumps(dataclasses.asdict(TrainConfig()))))
    saved = {**{k: v for k, v in defaults.items() if k not in saved and k in now}, **saved}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    # `steps` may move (an extension, or back after a failed one) as long as no checkpoint lies beyond it
    # and the lr schedule does not depend on it
    if "steps" in diff and now.get("steps", 0) >= last_step and now.get("optim", {}).get("decay") == "constant":
        diff.remove("steps")
    return diff


@dataclasses.dataclass
class Claim:
    run_dir: Path
    resume_from: Path | None
    lock: Path | None
    created: bool
    aside: list[str]  # run files to move aside on commit (overwrite=true)
    reset_metrics: bool  # the same run, restarted before its first checkpoint
    notes: list[str]
    fd: int | None = None  # the open, flocked lock file
    done: dict | None = None  # the run already finished (its summary.json): a re-run does nothing

    def commit(self) -> Path | None:
        """Just before the first write: move the old run aside (overwrite), drop the metrics of a run
        that never reached a checkpoint. Returns the folder the old run went to, if any."""
        moved = None
        if self.aside:
            moved = self.run_dir.with_name(f"{self.run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            moved.mkdir(parents=True)
            for name in self.aside:
                os.replace(self.run_dir / name, moved / name)
            self.aside = []
        if self.reset_metrics:  # its records are redone, in a new W&B run
            for name in ("metrics.jsonl", "wandb_run_id"):
                (self.run_dir / name).unlink(missing_ok=True)
        started()
        return moved

    def write_config(self, config: dict) -> None:
        """train_config.json, atomically: the run dir's owner record."""
        write_atomic(self.run_dir / "train_config.json", json.dumps(config, indent=1))

    def release(self) -> None:
        if self.fd is not None:
            if self.lock is not None:
                self.lock.unlink(missing_ok=True)  # while still holding it (see _take_lock's inode check)
            os.close(self.fd)
            self.fd, self.lock = None, None

    def abort(self) -> None:
        """A refusal: the dir as it was (lock removed, a dir created for this run removed if empty)."""
        self.release()
        if self.created:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass


def lock_dir(out_dir: Path) -> Claim:
    """An output dir created if need be and locked, as a Claim that decides nothing yet (trb eval and
    trb rollout decide what their dir may hold themselves); RunDirError if it cannot be used."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"output_dir {out_dir} is a file, not a directory: use another output_dir")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create output_dir {out_dir}: {err.strerror}; use another output_dir") from None
    try:
        lock, fd, note = _take_lock(out_dir)
    except (OSError, RunDirError) as err:
        if created:
            out_dir.rmdir()
        if isinstance(err, RunDirError):
            raise
        raise RunDirError(f"cannot write into output_dir {out_dir}: {err.strerror}; use another output_dir") from None
    return Claim(out_dir, None, lock, created, [], False, [note] if note else [], fd)


def _step_of(ckpt: Path) -> int:
    step = checkpoint_step(ckpt)
    if step is None:
        raise RunDirError(f"resume={ckpt} is not a checkpoint folder named step_NNNNNN (a trb run's "
                          f"checkpoints/step_NNNNNN)")
    return step


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} cannot be read ({err}): the run dir's owner record is damaged; use another "
                          f"output_dir, or overwrite=true to move the old run aside") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is not a trb train_config.json; use another output_dir or overwrite=true")
    return data


def claim(cfg, run_dir: Path) -> Claim:
    """Lock run_dir and decide where the run starts (see the module docstring); RunDirError if it
    cannot be used. Call abort() on a later refusal, release() at the end."""
    c = lock_dir(Path(run_dir))
    try:
        _decide(cfg, c)
    except BaseException:
        c.abort()
        raise
    return c


def _decide(cfg, c: Claim) -> None:
    run_dir, now = c.run_dir, json.loads(json.dumps(dataclasses.asdict(cfg)))
    files = _run_files(run_dir)
    ckpts = [p for p in list_checkpoints(run_dir) if (p / "trainer_state.pt").exists()]
    path = None if cfg.resume in ("auto", "never") else Path(cfg.resume).expanduser()
    if path is not None and not (path / "trainer_state.pt").exists():
        raise RunDirError(f"resume={cfg.resume!r} is not a trb checkpoint (no trainer_state.pt); give a "
                          f"run_dir/checkpoints/step_NNNNNN folder, resume=auto or resume=never")
    aside_hint = f"overwrite=true to move the old run aside to {run_dir.name}.replaced-<time>/ and start over"
    if files and cfg.overwrite:
        if path is not None:
            raise RunDirError("overwrite=true starts a new run: it cannot be combined with resume=PATH")
        c.aside = files
        return
    if files and not (run_dir / "train_config.json").exists():
        raise RunDirError(f"output_dir {run_dir} holds run files ({', '.join(files)}) but no train_config.json, so "
                          f"trb cannot tell which run they belong to: use another output_dir, or {aside_hint}")
    if not files:  # a new run here
        if path is not None:
            source = path.parent.parent / "train_config.json"
            if source.exists():
                diff = _config_diff(_read_config(source), now, _step_of(path))
                if diff:
                    raise RunDirError(f"resume={path} belongs to a different run (its run dir's train_config.json "
                                      f"differs in: {', '.join(diff)}); resume it with its own settings")
            c.resume_from = path
        return
    saved = _read_config(run_dir / "train_config.json")
    last = _step_of(ckpts[-1]) if ckpts else 0
    diff = _config_diff(saved, now, last)
    if diff:
        raise RunDirError(f"output_dir {run_dir} holds a different run (its train_config.json differs in: "
                          f"{', '.join(diff)}); use another output_dir, or {aside_hint}")
    if cfg.resume == "never":
        raise RunDirError(f"output_dir {run_dir} already holds this run ({len(ckpts)} checkpoint(s), last step "
                          f"{last}); resume=never would start over on top of it: resume=auto continues it, or "
                          f"{aside_hint}, or use another output_dir")
    if path is not None and not ckpts and saved.get("resume") == cfg.resume:
        c.resume_from = path  # the same continuation of PATH, stopped before its first checkpoint: again
        c.reset_metrics = True
        return
    if path is not None:
        if path.resolve().parent != (run_dir / "checkpoints").resolve():
            raise RunDirError(f"resume={path} is a checkpoint of another run dir, but output_dir {run_dir} holds a "
                              f"run of its own: give one of its checkpoints, or a new output_dir to continue {path} "
                              f"there")
        later = [p.name for p in ckpts if _step_of(p) > _step_of(path)]
        if later:
            raise RunDirError(f"output_dir {run_dir} has checkpoints after {path.name} ({', '.join(later)}): "
                              f"resuming from step {_step_of(path)} would mix them with the new steps; resume from "
                              f"the last one (resume=auto), or move them out of {run_dir / 'checkpoints'}")
        c.resume_from = path
        return
    c.resume_from = ckpts[-1] if ckpts else None
    if ckpts and last == cfg.steps and saved.get("steps") == cfg.steps and (run_dir / "summary.json").exists():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            beyond = any(r.get("step", 0) > cfg.steps for r in _records(run_dir / "metrics.jsonl"))
        except (OSError, ValueError):
            summary = None  # unreadable: the final step is redone, which rewrites it
        # (records past the last step: an extension was started and abandoned; the resume drops them)
        if isinstance(summary, dict) and summary.get("steps") == cfg.steps and not beyond:
            c.done = summary  # finished: the final eval, checkpoint and summary exist
            return
    c.reset_metrics = not ckpts  # the same run, killed before its first checkpoint: its records are redone
    if not ckpts and saved.get("resume") not in (None, "auto", "never"):  # a continuation of another checkpoint
        c.resume_from = Path(saved["resume"]).expanduser()
        if not (c.resume_from / "trainer_state.pt").exists():
            raise RunDirError(f"output_dir {run_dir} continues {c.resume_from}, which is gone; give resume=PATH, or "
                              f"{aside_hint}")


