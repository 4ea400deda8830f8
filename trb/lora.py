"""LoRA students (lora.rank > 0) through PEFT: only the adapter trains, the base weights stay frozen.

The adapter is injected into the student in place (`peft.get_peft_model(...).get_base_model()` is
the same module tree with LoRA layers on the target linears), so every path that takes the student
(micro-batched update, activation checkpointing, bf16 autocast, FSDP2, trb's decoder) runs it as it
is: the LoRA layer computes base(x) + scale * B(A(x)) exactly. What needs plain weights gets them
merged, W + scale * B @ A, under the plain names: the vLLM push (`plain_weights`), `lora.save_merged`
and `trb eval` of an adapter (`load_adapter`).

Checkpoints are PEFT's format (adapter_config.json + adapter_model.safetensors, base model named in
the config) and load with `PeftModel.from_pretrained(base, folder)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"  # lora.save_merged: the merged model inside the checkpoint folder
_PREFIX = "base_model.model."  # PEFT's key prefix (the PeftModel wrapping the plain model)


def peft_config(lora, base_path: str | None = None):
    import peft

    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
                           base_model_name_or_path=base_path)


def apply_lora(model: torch.nn.Module, lora, base_path: str | None = None):
    """Inject LoRA layers into `model` in place (its base weights frozen); returns the PeftModel wrapper
    (for saving). A target module name that matches nothing is refused naming lora.target_modules."""
    import peft

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise ValueError(f"lora.target_modules: {', '.join(missing)} match no linear layer of the student (its "
                         f"linear layers: {', '.join(sorted(names))})")
    import warnings

    with warnings.catch_warnings():  # PEFT renames the base to the path the model was loaded from: reset below
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed")
        wrapper = peft.get_peft_model(model, peft_config(lora, base_path))
    assert wrapper.get_base_model() is model
    if base_path is not None:  # PEFT records the path as the model was loaded (maybe relative): the base as named
        wrapper.peft_config["default"].base_model_name_or_path = base_path
    return wrapper


def is_lora(model: torch.nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in model.named_parameters())


def _lora_layers(model: torch.nn.Module) -> dict:
    """{plain weight name: the PEFT LoRA layer} of every injected linear."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if getattr(module, "fan_in_fan_out", False):
                raise ValueError(f"LoRA on {name}: fan_in_fan_out layers are not supported")
            out[f"{name}.weight"] = module
    return out


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def plain_weights(model: torch.nn.Module):
    """(plain name, tensor) of every weight of the model as if the adapters were merged: W + scale * B @ A
    for each LoRA linear (computed in float32 or W's wider dtype, returned in W's dtype), the other
    parameters as they are, tied ones under each of their names. One tensor at a time; FSDP2 shards
    are all-gathered in turn (a collective: every rank must iterate the same way)."""
    layers = _lora_layers(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if ".base_layer." in name:
            plain = name.replace(".base_layer.", ".")
            layer = layers.get(plain)
            if layer is not None and name.endswith(".weight"):
                w = _full(p).detach()
                (adapter,) = layer.active_adapters
                acc = torch.promote_types(w.dtype, torch.float32)  # bf16 weights merge in float32
                a = _full(layer.lora_A[adapter].weight).detach().to(acc)
                b = _full(layer.lora_B[adapter].weight).detach().to(acc)
                yield plain, (w.to(acc) + layer.scaling[adapter] * (b @ a)).to(w.dtype)
                continue
            yield plain, _full(p).detach()
            continue
        yield name, _full(p).detach()


def adapter_state(wrapper, model_state: dict) -> dict:
    """The adapter's tensors in PEFT's saved format from a full state dict of the plain (injected) model."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(
        wrapper, state_dict={_PREFIX + k: v for k, v in model_state.items()}).items()}


class AdapterFolder:
    """What save_checkpoint writes for a LoRA student (it calls save_pretrained): the adapter in PEFT's format,
    and with `merged` (a plain state dict) the merged model in <folder>/merged/ (config.json and weights,
    the tokenizer is added by the caller's save of the checkpoint; the merged folder gets its own)."""

    def __init__(self, wrapper, adapter: dict, merged: dict | None = None, tokenizer=None):
        self.wrapper, self.adapter, self.merged, self.tokenizer = wrapper, adapter, merged, tokenizer

    def save_pretrained(self, folder, safe_serialization: bool = True, state_dict=None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        self.wrapper.peft_config["default"].save_pretrained(str(folder))
        save_file(self.adapter, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if self.merged is not None:
            model = self.wrapper.get_base_model()
            _save_plain(model, self.merged, folder / MERGED_DIR)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder / MERGED_DIR)


def _save_plain(model: torch.nn.Module, state: dict, folder: Path) -> None:
    """A plain HF folder (config.json, model.safetensors) of `state` (plain names) for `model`'s class."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    seen, tensors = {}, {}
    for name, t in state.items():  # tied tensors once (safetensors refuses shared storage), as HF saves them
        key = (t.data_ptr(), t.shape)
        if key in seen:
            continue
        seen[key] = name
        tensors[name] = t.contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def is_adapter_folder(path) -> bool:
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def adapter_base(path) -> str:
    """The base model an adapter folder names (its adapter_config.json)."""
    try:
        base = json.loads((Path(str(path)).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {ADAPTER_CONFIG} is unreadable ({err})") from None
    if not base:
        raise ValueError(f"{path}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    return str(base)


def load_adapter_weights(wrapper, folder) -> None:
    """Set the injected adapter's weights from a checkpoint folder (every adapter tensor must be there)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    try:
        result = set_peft_model_state_dict(wrapper, state)
    except RuntimeError as err:  # tensors of another shape: another rank
        raise ValueError(f"{folder}: its adapter does not fit the run's lora settings (lora.rank / "
                         f"lora.target_modules): {str(err).splitlines()[0][:160]}") from None
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if missing:
        raise ValueError(f"{folder}: the adapter lacks {len(missing)} LoRA tensors the run's lora settings need "
                         f"(e.g. {missing[0]}); it was trained with other lora.rank / lora.target_modules")


def merge(wrapper) -> torch.nn.Module:
    """The plain model with the adapter merged into its weights (PEFT's merge_and_unload)."""
    return wrapper.merge_and_unload()
