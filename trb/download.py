"""`trb download`: fetch exactly the hub models and datasets a config needs into the Hugging Face
cache, and the check every run command makes at start that they are there.

trb train / eval / rollout never download (whatever HF_HUB_OFFLINE says): a cluster's ranks do not
race to fetch gigabytes, and a run does not stall on the network. A missing item is refused at
start with the list of every missing item and the `trb download` command that fetches them.

    trb download experiment=paper_0.6b_4b              # the two models, OpenThoughts3, MATH-500
    trb download --eval gsm8k,aime24 --dry-run         # what it would fetch, and what is cached
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trb.errors import UserError

# what a model folder needs: weights (safetensors only), config, tokenizer, generation config, chat template
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


HINT = "trb download"  # the command that fetches what a run lacks; the CLI adds the run's own overrides


class MissingError(UserError):
    """Hub items a run needs are not in the local cache."""


@dataclass
class Item:
    kind: str  # model | dataset
    repo: str  # hub id
    setting: str  # the config key that names it
    config: str | None = None  # dataset config
    split: str | None = None  # dataset split
    shape: str | None = None  # model: the shipped shape (size estimate without the network)

    def label(self) -> str:
        if self.kind == "model":
            return f"model {self.repo} ({self.setting})"
        conf = f" ({self.config})" if self.config else ""
        return f"dataset {self.repo}{conf} split {self.split} ({self.setting})"

    def key(self) -> tuple:
        return self.kind, self.repo, self.config, self.split


def _hub_id(text: str) -> bool:
    local = text.startswith((".", "/", "~", "toy:")) or Path(text).expanduser().exists()
    return not local and text.count("/") == 1


def model_items(model, setting: str) -> list[Item]:
    return [Item("model", model.path, setting, shape=model.shape)] if _hub_id(model.path) else []


def dataset_items(ds, setting: str, splits: list[str | None]) -> list[Item]:
    if ds is None or ds.path or not ds.hub_id or (ds.name == "toy" and not ds.hub_id) or \
            Path(ds.hub_id).expanduser().exists():
        return []
    configs = ds.hub_config if isinstance(ds.hub_config, list) else [ds.hub_config]
    return [Item("dataset", ds.hub_id, setting, c, s) for c in configs for s in dict.fromkeys(splits) if s]


def train_items(cfg) -> list[Item]:
    """Every hub item `trb train` with this config reads."""
    items = model_items(cfg.student, "student.path") + model_items(cfg.teacher, "teacher.path")
    items += dataset_items(cfg.dataset, "dataset", [cfg.dataset.train_split] +
                           ([] if cfg.eval_dataset else [cfg.dataset.eval_split or cfg.dataset.train_split]))
    if cfg.eval_dataset is not None:
        e = cfg.eval_dataset
        items += dataset_items(e, "eval_dataset", [e.eval_split or e.train_split])
    return _unique(items)


def eval_items(dataset, setting: str = "dataset") -> list[Item]:
    return dataset_items(dataset, setting, [dataset.eval_split or dataset.train_split])


def _unique(items: list[Item]) -> list[Item]:
    seen, out = set(), []
    for it in items:
        if it.key() not in seen:
            seen.add(it.key())
            out.append(it)
    return out


def _offline_libraries() -> None:
    """Run commands read the cache only, whatever HF_HUB_OFFLINE says."""
    try:
        import datasets
        import huggingface_hub.constants as hc

        datasets.config.HF_HUB_OFFLINE = True
        hc.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def is_cached(item: Item) -> bool:
    if item.kind == "model":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(item.repo, "config.json")
        if not isinstance(hit, str):
            return False
        snapshot = Path(hit).parent
        return any(snapshot.glob("*.safetensors"))
    import datasets

    datasets.utils.logging.set_verbosity(50)
    datasets.utils.logging.disable_progress_bar()
    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        builder = datasets.load_dataset_builder(item.repo, item.config)
        splits = builder.info.splits or {}
        return item.split in splits and Path(builder.cache_dir).is_dir()
    except Exception:  # noqa: BLE001 - not cached raises many types
        return False
    finally:
        datasets.config.HF_HUB_OFFLINE = was


def require_cached(items: list[Item], command: str | None = None) -> None:
    """Refuse at start, naming every missing item and the command that fetches them."""
    command = command or HINT
    if not items:  # local folders and the toy: nothing to look up (and no hub library to import)
        return
    _offline_libraries()
    missing = [it for it in items if not is_cached(it)]
    if missing:
        raise MissingError(f"not in the local Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}"
                           f"): {'; '.join(it.label() for it in missing)}. Fetch them with `{command}` (on a machine "
                           f"with network, same HF_HOME), or point the settings named at local copies")


def estimate_gb(item: Item) -> float | None:
    """Without the network: a model's bf16 weights from its shipped shape; else None."""
    if item.kind != "model" or not item.shape:
        return None
    from trb.plan import SHAPES, Shape, _read_config

    f = Path(item.shape).expanduser()
    f = f if f.suffix == ".json" else SHAPES / f"{item.shape}.json"
    return Shape.from_config(_read_config(f)).params * 2 / 1e9 if f.exists() else None


def hub_gb(item: Item) -> float | None:
    """With the network: the files that would be fetched (models: MODEL_FILES; datasets: the repo)."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    api = HfApi()
    try:
        if item.kind == "model":
            info = api.model_info(item.repo, files_metadata=True)
            files = [s for s in info.siblings if any(fnmatch(s.rfilename, p) for p in MODEL_FILES)]
        else:
            info = api.dataset_info(item.repo, files_metadata=True)
            files = info.siblings
        return sum(s.size or 0 for s in files) / 1e9
    except Exception:  # noqa: BLE001 - a size is informative only
        return None


def fetch(item: Item) -> None:
    if item.kind == "model":
        from huggingface_hub import snapshot_download

        snapshot_download(item.repo, allow_patterns=MODEL_FILES)
        return
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.load_dataset(item.repo, item.config, split=item.split)  # downloads and prepares the Arrow files


def run_download(items: list[Item], dry_run: bool, log=print) -> int:
    """Print the plan (each item, cached or not, its size); fetch the missing ones unless dry_run.
    Returns the number still missing."""
    if not items:
        log("nothing to download: every model and dataset of this config is local (a path, the toy) ")
        return 0
    online = not dry_run
    rows = []
    for it in items:
        cached = is_cached(it)
        gb = hub_gb(it) if online and not cached else estimate_gb(it)
        size = f"{gb:.2f} GB" if gb is not None else ("size known online" if not online else "size unknown")
        est = " (bf16 weights, from its shape)" if gb is not None and (not online or cached) and it.kind == "model" \
            else ""
        rows.append((it, cached, f"{size}{est}"))
        log(f"{'cached ' if cached else 'missing'}  {it.label()}  {size}{est}")
    todo = [it for it, cached, _ in rows if not cached]
    if dry_run:
        log(f"{len(todo)} of {len(items)} to fetch (--dry-run: nothing fetched)")
        return len(todo)
    for it in todo:
        log(f"fetching {it.label()} ...")
        try:
            fetch(it)
        except Exception as err:  # noqa: BLE001 - network, auth, gated repos
            raise UserError(f"could not fetch {it.label()}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    still = [it for it in todo if not is_cached(it)]
    log(f"fetched {len(todo) - len(still)} of {len(todo)}; cache: {os.environ.get('HF_HOME', '~/.cache/huggingface')}")
    return len(still)
