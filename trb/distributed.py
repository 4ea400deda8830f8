"""Data-parallel training under torchrun: FSDP2 for the student, helpers for ranks.

    torchrun --nproc_per_node 8 -m trb train experiment=paper_0.6b_4b

Layout (one process per device; gloo on CPU, NCCL on GPUs, same code):
  - the student is sharded with FSDP2: `fully_shard` on every decoder layer, then on the module
    that computes the loss (embeddings, final norm and LM head form the root group); parameters,
    gradients and AdamW state live as shards;
  - every rank also keeps a full, frozen copy of the student (the *rollout copy*) that samples
    rollouts and runs eval without collectives, so ranks can finish decoding at different
    lengths; it is refreshed from the shards after every update (one all-gather per step) and is
    what checkpoints save (the full state in HF format);
  - the teacher is replicated (parallel.teacher=replicate, the default) or sharded with FSDP2
    (parallel.teacher=shard, when it does not fit on one device): then every teacher forward is a
    collective, so while the teacher decodes (eps > 0, SKD, SFT samples) all ranks keep stepping
    until every rank's rows are done;
  - each step's global prompt batch is split into contiguous per-rank slices; the sampling noise
    of every row is drawn for the whole global batch from a per-step seed (`RowSlice`), so a row's
    tokens do not depend on how many ranks share the batch;
  - each rank's token-mean loss is rescaled by (its tokens x world / global tokens), so the
    gradient FSDP averages is the global token-mean gradient;
  - metrics are gathered and logged on rank 0 only, which also writes metrics.jsonl, W&B and
    checkpoints; eval problems are split across ranks and their graded samples gathered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def slice(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [start, stop) of n items (n divisible by size)."""
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per


def _slurm_env() -> None:
    """With TRB_SLURM_RANKS=1, Slurm tasks (srun, or Hydra's submitit launcher with
    tasks_per_node > 1) are the ranks: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are mapped onto
    torchrun's RANK / WORLD_SIZE / LOCAL_RANK. Opt-in, because an sbatch script's own shell also
    carries SLURM_NTASKS > 1 and SLURM_PROCID=0 and would otherwise wait for ranks that never come."""
    if os.environ.get("TRB_SLURM_RANKS") != "1" or "WORLD_SIZE" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise ValueError("a Slurm job with several tasks runs data-parallel and needs MASTER_ADDR and MASTER_PORT: "
                         "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) "
                         "MASTER_PORT=29500 (or launch one task per node running torchrun)")
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def launched() -> bool:
    """True in a process that is one of several ranks (torchrun, or Slurm tasks)."""
    _slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


RENDEZVOUS_TIMEOUT_S = 300  # TRB_RENDEZVOUS_TIMEOUT: how long ranks outside torchrun wait for each other


def _rendezvous_store():
    """Outside torchrun (Slurm tasks, or cluster variables left in a shell): rank 0 hosts the store
    and every rank waits at most TRB_RENDEZVOUS_TIMEOUT seconds for the others, so a missing peer
    ends the run with a message instead of hanging (the process group's own timeout, which bounds
    every collective, stays torch's default). Under torchrun its agent holds the store: None."""
    from datetime import timedelta

    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ.get(k) for k in names}
    missing = [k for k in names if not env[k]]
    if missing:
        raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} asks for several processes, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun (or set RANK, "
                         f"MASTER_ADDR, MASTER_PORT for every rank), or unset WORLD_SIZE for one process")
    try:
        rank, size, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    except ValueError:
        raise ValueError(f"RANK={env['RANK']}, WORLD_SIZE={env['WORLD_SIZE']} and MASTER_PORT={env['MASTER_PORT']} "
                         f"must be integers") from None
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1={size - 1}")
    wait = float(os.environ.get("TRB_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT_S))
    try:
        return dist.TCPStore(env["MASTER_ADDR"], port, size, rank == 0, timeout=timedelta(seconds=wait),
                             wait_for_workers=True)
    except Exception as err:  # noqa: BLE001 - DistStoreError, RuntimeError, OSError by platform
        what = "the other ranks did not join" if rank == 0 else "rank 0 could not be reached"
        raise ValueError(f"{what} within {wait:g} s (WORLD_SIZE={size}, RANK={rank}, MASTER_ADDR="
                         f"{env['MASTER_ADDR']}, MASTER_PORT={port}; TRB_RENDEZVOUS_TIMEOUT sets the wait): start "
                         f"every rank (torchrun --nproc_per_node N -m trb train ...), or unset WORLD_SIZE / RANK / "
                         f"MASTER_ADDR / MASTER_PORT for one process [{type(err).__name__}]") from None


def init(device: str = "auto") -> World:
    """Join the process group torchrun (or Slurm) describes (no-op for a single process)."""
    if not launched():
        return World()
    if not dist.is_initialized():
        store = _rendezvous_store()
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # NCCL for CUDA tensors, gloo for CPU ones (device=cpu on a GPU machine, CPU-side reductions)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
        _OWN[0] = True
    return current()


_OWN = [False]  # whether trb created the process group (an in-process vLLM engine makes its own one-rank group)


def current() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def finish(barrier: bool = True) -> None:
    """Leave the process group: barrier first (without it about one run in seven aborts at exit;
    barrier=False after an error, when the other ranks may never reach it)."""
    if dist.is_available() and dist.is_initialized() and (_OWN[0] or launched()):
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
        _OWN[0] = False


def shared_now() -> datetime:
    """Rank 0's clock, so every rank resolves Hydra's ${now:...} run dir to the same folder."""
    now = [datetime.now()]
    if dist.is_initialized():
        dist.broadcast_object_list(now, src=0)
    return now[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj) -> list:
    """Every rank's `obj` on every rank (pickled; for metrics and eval samples)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def decoder_layers(model) -> list[torch.nn.Module]:
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP2")
    return list(layers)


def shard(objective: torch.nn.Module, student: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2: fully_shard every decoder layer of `student`, then `objective` (the root that holds it).
    compute_dtype (e.g. bfloat16): parameters are all-gathered in that dtype for the forward and
    backward, gradients reduced in float32 into the float32 shards (MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if compute_dtype is not None and compute_dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(student):
        fully_shard(layer, **kw)
    fully_shard(objective, **kw)


def shard_frozen(model: torch.nn.Module) -> None:
    """FSDP2 for the frozen teacher (parallel.teacher=shard): every decoder layer, then the body
    (embeddings, final norm). The LM head stays whole on every rank (untied from the embeddings
    first when tied) because trb applies it to hidden states outside the model's forward.
    Every forward is then a collective: all ranks must run the same number of them."""
    from torch.distributed.fsdp import fully_shard

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model.get_decoder() if hasattr(model, "get_decoder") else model.model)


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (a MIN all-reduce)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def copy_full_params(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's parameters <- src's (all-gathering FSDP2 shards; every rank must call it)."""
    from torch.distributed.tensor import DTensor

    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        dst_params[name].copy_(full)


def full_model_state(model: torch.nn.Module, prefix: str = "") -> dict:
    """The full (unsharded) state dict of `model` on CPU, `prefix` stripped from the keys (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter names (collective; world-size independent)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state` (every rank holds the full state and keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
