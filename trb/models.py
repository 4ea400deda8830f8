"""Load the student and teacher (toy, local folder, or cached hub id); check they can be paired."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from trb import download
from trb.config import ModelConfig
from trb.errors import UserError
from trb.rollout import StopSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; the message says which setting to change."""


def resolve_path(cfg: ModelConfig, role: str) -> str:
    """toy:student / toy:teacher / toy:teacher_clean -> the toy folder (built on first use); else the
    path as given."""
    if cfg.path.startswith("toy:"):
        from trb.toy import MODELS, ensure_built

        which = cfg.path.split(":", 1)[1]
        if which not in MODELS:
            raise ModelLoadError(f"{role}.path={cfg.path!r}: the toy models are "
                                 + ", ".join(f"toy:{m}" for m in MODELS))

        return str(ensure_built() / which)
    return cfg.path


def load_model(cfg: ModelConfig, role: str, device: torch.device, setting: str | None = None):
    """(model, tokenizer) from a local folder or the offline HF cache, safetensors only. `setting`
    is the config key the messages name (default `<role>.path`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = setting or f"{role}.path"
    path = resolve_path(cfg, role)
    from trb import lora

    if lora.is_adapter_folder(path):  # a LoRA checkpoint: its base with the adapter merged in
        return _load_adapter(cfg, path, role, device, key)
    local = Path(path).expanduser().exists()
    if not local and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise ModelLoadError(f"{key}={path!r} does not exist; give a model folder or a hub id like Qwen/Qwen3-4B")
    if local and not Path(path).expanduser().is_dir():
        raise ModelLoadError(f"{key}={path!r} is a file; give the model's folder (with config.json and "
                             f".safetensors weights)")
    if local and not any(Path(path).expanduser().glob("*.safetensors")):
        raise ModelLoadError(f"{key}={path!r} holds no .safetensors weights: trb loads safetensors only (pickled "
                             f".bin / .pt weights can run code when loaded); convert the folder, e.g. load it "
                             f"yourself and call save_pretrained(folder, safe_serialization=True)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=not local or None,
                                            trust_remote_code=cfg.trust_remote_code)
        # on a GPU the weights go straight from the safetensors files to the device (no full copy in host RAM
        # per rank: 8 ranks x (student + teacher) would otherwise pass through the CPU at once)
        placement = {"device_map": str(device)} if device.type == "cuda" else {}
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its MISSING / UNEXPECTED table: trb refuses those below, in one line
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=_DTYPES[cfg.dtype], use_safetensors=True, local_files_only=True,
                trust_remote_code=cfg.trust_remote_code, output_loading_info=True, **placement,
            )
        finally:
            hf_logging.set_verbosity(level)
    except Exception as err:  # noqa: BLE001 - transformers / safetensors / json raise many types
        text = str(err).splitlines()[0][:200] if str(err) else ""
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{role} model {path!r} needs its own Python code (auto_map in its config), which "
                                 f"trb does not run unless you set {role}.trust_remote_code=true (only for code you "
                                 f"trust)") from None
        if local:
            raise ModelLoadError(f"{key}={path!r}: the folder could not be loaded ({type(err).__name__}: {text}); "
                                 f"its config.json, tokenizer or weights are invalid or truncated") from None
        if isinstance(err, OSError):
            raise ModelLoadError(
                f"{role} model {path!r} is not a local folder and is not in the Hugging Face cache (trb never "
                f"downloads at run time). Fetch it with `{download.HINT}` or set {key}=/path/to/folder. "
                f"({type(err).__name__}: {text})") from None
        raise
    check_loaded(info, key, path)
    bad = nonfinite_names(model)
    if bad:
        raise ModelLoadError(f"the {role}'s weights hold NaN or inf ({len(bad)} parameter tensors, e.g. {bad[0]}): "
                             f"{key}={path!r} is broken (a checkpoint: use an earlier one)")
    return model.to(device).eval(), tok


def _load_adapter(cfg: ModelConfig, path: str, role: str, device: torch.device, key: str):
    """A PEFT adapter folder (trb's LoRA checkpoints): the base its adapter_config.json names, loaded as any
    model, the adapter applied with PeftModel.from_pretrained and merged into the weights; the tokenizer is
    the adapter folder's (trb saves it there)."""
    import dataclasses

    from trb import lora

    try:
        base = lora.adapter_base(path)
        from peft import PeftModel
    except ValueError as err:
        raise ModelLoadError(f"{key}={path!r} is a LoRA adapter: {err}") from None
    except ImportError:
        raise ModelLoadError(f"{key}={path!r} is a LoRA adapter, which needs the peft package: pip install "
                             f"'trb[lora]'") from None
    model, tok = load_model(dataclasses.replace(cfg, path=base), role, torch.device("cpu"),
                            setting=f"{key} (its adapter's base_model_name_or_path)")
    if any(Path(path).glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    try:
        merged = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
    except Exception as err:  # noqa: BLE001 - peft / safetensors raise many types
        raise ModelLoadError(f"{key}={path!r}: the adapter could not be applied to its base {base!r} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})") from None
    bad = nonfinite_names(merged)
    if bad:
        raise ModelLoadError(f"the {role}'s weights hold NaN or inf after merging the adapter ({bad[0]}): "
                             f"{key}={path!r} is broken (a checkpoint: use an earlier one)")
    return merged.to(device).eval(), tok


def nonfinite_names(model) -> list[str]:
    """The parameters holding NaN or inf."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def check_positions(models, longest: int, settings: str) -> None:
    """The longest sequence a command can build must fit every model's positions (max_position_embeddings)."""
    limits = [int(n) for m in models if (n := getattr(m.config, "max_position_embeddings", None))]
    if limits and longest > min(limits):
        raise ModelLoadError(f"{settings} = {longest:,} tokens, beyond the {min(limits):,} positions of the model "
                             f"(config.json max_position_embeddings): lower them")


def check_loaded(info: dict, key: str, path: str) -> None:
    """Refuse weights that do not fill the architecture its config.json describes: missing tensors
    (transformers would initialise them at random), unexpected ones (dropped), or other shapes."""
    parts = []
    for kind, what in (("missing_keys", "missing (they would be random)"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "of another shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or [])
        if names:
            parts.append(f"{len(names)} {what}, e.g. {names[0]}")
    if parts:
        raise ModelLoadError(f"{key}={path!r}: its weights do not match its config.json ({'; '.join(parts)}): the "
                             f"checkpoint is incomplete, or config.json is another model's")


def check_folder(path: str, key: str) -> None:
    """Before anything is decoded: a model folder trb can load (config.json, safetensors weights whose
    headers read, each file whole); hub ids and toy names are checked when loaded."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if path.startswith(("toy:",)) or (path.count("/") == 1 and not path.startswith((".", "/", "~"))):
            return
        raise ModelLoadError(f"{key}={path!r} does not exist")
    from trb import lora

    if lora.is_adapter_folder(folder):  # a LoRA checkpoint: its adapter whole, its base a model folder
        try:
            base = lora.adapter_base(folder)
        except ValueError as err:
            raise ModelLoadError(f"{key}={path!r}: {err}") from None
        weights = folder / lora.ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ModelLoadError(f"{key}={path!r} is a LoRA adapter without {lora.ADAPTER_WEIGHTS}")
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt") as h:
                h.keys()
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError
            raise ModelLoadError(f"{key}={path!r}: {weights.name} cannot be read ({str(err).splitlines()[0][:120]})"
                                 f": the file is truncated or not safetensors") from None
        check_folder(resolve_path(ModelConfig(path=base), "base"), f"{key} (its adapter's base {base!r})")
        return
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{key}={path!r} has no config.json: not a model folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{key}={path!r} holds no .safetensors weights")
    from safetensors import safe_open

    stored: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                stored |= set(h.keys())
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError
            raise ModelLoadError(f"{key}={path!r}: {f.name} cannot be read ({str(err).splitlines()[0][:120]}): the "
                                 f"file is truncated or not safetensors") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # the tensors config.json's architecture has, on the meta device (no memory): every one stored?
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - remote code, unknown architectures: checked when loaded
        return
    aliases: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    known = {n for names in aliases.values() for n in names} | {n for n, _ in skeleton.named_buffers()}
    missing = sorted(names[0] for names in aliases.values() if not stored & set(names))
    unexpected = sorted(stored - known)
    if missing or unexpected:
        info = {"missing_keys": missing, "unexpected_keys": unexpected}
        check_loaded(info, key, path)


def _eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return list(dict.fromkeys(ids))


def _vocab(tok, *models) -> int:
    """Token ids the tokenizer can produce and every model has a row for: embedding tables are
    often padded past the tokenizer (Qwen2.5 0.5B-3B: 151,936 rows, 7B-32B: 152,064, one
    tokenizer); the padding rows are impossible tokens."""
    return min(len(tok), *(m.config.vocab_size for m in models))


def stop_spec(model, tok) -> StopSpec:
    """The stop event of a model on its own (evaluation): all its EOS ids, emitted as the first."""
    eos = _eos_ids(model, tok)
    if not eos:
        raise ModelLoadError("the model has no EOS token (tokenizer eos_token or generation_config.eos_token_id)")
    return StopSpec(stop_ids=eos, emit_id=eos[0], pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
                    vocab=_vocab(tok, model))


def check_pair(student, s_tok, teacher, t_tok) -> StopSpec:
    """Refuse pairs whose tokenizers differ beyond their EOS ids; return the shared stop event,
    whose vocab is the shared vocabulary (embedding tables of different sizes are fine: the rows
    past the tokenizer are padding)."""
    a, b = s_tok.get_vocab(), t_tok.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:5]
        raise ModelLoadError(
            f"teacher and student tokenizers map tokens to different ids (e.g. {diff}): trb needs a shared "
            f"vocabulary; pick a teacher of the same family")
    own = stop_spec(student, s_tok)
    return StopSpec(stop_ids=list(dict.fromkeys(own.stop_ids + _eos_ids(teacher, t_tok))), emit_id=own.emit_id,
                    pad_id=own.pad_id, vocab=_vocab(s_tok, student, teacher))


def activation_checkpointing(model, on: bool = True) -> None:
    """Recompute each decoder layer in the backward (non-reentrant), or stop doing so: transformers
    5.20+ names it activation_checkpointing_*, earlier 5.x releases gradient_checkpointing_*."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def pick_device(name: str) -> torch.device:
    """auto (a GPU when one is visible, else the CPU), cpu, cuda, cuda:N; a GPU asked for where none
    is visible is refused naming the setting."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ModelLoadError(f"device={name!r} is not a device: use device=auto, cpu, cuda or cuda:N")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ModelLoadError(f"device={name} but {why}: use device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def prepare_run(run_dir, threads: int, device: str) -> tuple[Path, torch.device]:
    """Create the run dir, set torch's CPU threads, quiet transformers' progress bars, pick the device."""
    from transformers.utils import logging as hf_logging

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    return run_dir, pick_device(device)
