"""Tiny random models, prompts and a CLI runner for tests (no downloads)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trb.toy import ToyModelRecipe, _config, build_tokenizer, render_prompt


def tiny_model(eos="<|endoftext|>", hidden=32, layers=2, seed=0, scale=1.0):
    tok = build_tokenizer(eos)
    torch.manual_seed(seed)
    recipe = ToyModelRecipe(hidden, layers, 2, 1, 64, eos, steps=0, lr=0.0)
    model = AutoModelForCausalLM.from_config(_config(recipe, tok)).eval()
    if scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def prompts(tok, questions=("What is 1+2?", "What is 12+30-4?", "What is 7?")):
    enc = tok([render_prompt(tok, q) for q in questions], return_tensors="pt", padding=True,
              add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def save_pair(root: Path) -> tuple[str, str]:
    """A tiny student (EOS <|endoftext|>) and a wider teacher (EOS <|im_end|>) saved as HF folders."""
    s, tok = tiny_model(scale=3.0)
    s.save_pretrained(root / "s")
    tok.save_pretrained(root / "s")
    t, ttok = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=3.0)
    t.save_pretrained(root / "t")
    ttok.save_pretrained(root / "t")
    return str(root / "s"), str(root / "t")


def cli(args, cwd, wandb_mode="disabled", timeout=600):
    """Run `python -m trb ARGS` in a subprocess."""
    env = {**os.environ, "WANDB_MODE": wandb_mode}
    return subprocess.run([sys.executable, "-m", "trb", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_config(pair, train_size: int, n: int, new_tokens: int, **kw):
    """A TrainConfig of the tiny pair: TRB (eps0 0.05, K 3), 4 eval problems, 2 prompts per step,
    W&B off; keyword arguments override any field."""
    from trb.config import BlendConfig, DatasetConfig, LoggerConfig, ModelConfig, RolloutConfig, TrainConfig

    s, t = pair
    base = dict(student=ModelConfig(path=s), teacher=ModelConfig(path=t), blend=BlendConfig(eps0=0.05, horizon=3),
                dataset=DatasetConfig(train_size=train_size, eval_size=4),
                rollout=RolloutConfig(n=n, max_new_tokens=new_tokens), logger=LoggerConfig(kind="none"),
                prompts_per_step=2)
    base.update(kw)
    return TrainConfig(**base)


def read_wandb(path) -> list:
    """The records of an offline W&B run file (run-*.wandb), parsed with wandb's own protobuf schema: the
    file is a LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks, each chunk with a 7-byte header
    crc32 / length / kind, kinds full 1, first 2, middle 3, last 4). wandb 0.31 ships no reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_offline(run_dir) -> dict:
    """What an offline W&B run under run_dir/wandb recorded: {run: {id, group, job_type, config},
    history: [{key: value}], artifacts: [{name, type, aliases, metadata}]}."""
    import json

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    out = {"run": None, "history": [], "artifacts": []}
    for rec in read_wandb(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"id": r.run_id, "group": r.run_group, "job_type": r.job_type,
                          "config": {u.key: json.loads(u.value_json) for u in r.config.update}}
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in rec.history.item})
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                     "metadata": json.loads(a.metadata) if a.metadata else {}})
    return out
