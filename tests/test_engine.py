"""The student-only decode through vLLM (trb.engine) against trb's own decoder and the true
distributions: same greedy completions, same sampling distribution, current weights after every
push (prefix cache reset), the engine used exactly where the sampler needs no teacher.

One vLLM engine serves the whole test session in this process (trb.engine keeps one per process
and pushes each model's weights into it): every in-process test uses ENGINE, the same settings."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from trb.config import EngineConfig
from trb.engine import EngineError, VLLMEngine, make_engine, resolve_kind, serves, vllm_installed
from trb.rollout import Sampler, StopSpec, rollout, student_records

needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (make vllm-deps)")
ENGINE = EngineConfig(kind="vllm", max_model_len=512, max_num_seqs=256)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy():
    from trb.config import ModelConfig
    from trb.models import load_model, resolve_path, stop_spec

    cfg = ModelConfig(path="toy:student")
    model, tok = load_model(cfg, "student", CPU)
    return model, tok, stop_spec(model, tok), resolve_path(cfg, "student")


def _engine(model, path, version=None):
    return make_engine("vllm", model, path, model.dtype, ENGINE, 512, 0, CPU, version=version)


def _problems(tok, count, seed=0):
    from trb.config import DatasetConfig, PromptConfig
    from trb.data import load_rows
    from trb.evaluate import encode_prompts
    from trb.data import render

    rows = load_rows(DatasetConfig(eval_size=count), seed, role="eval")
    ids, mask = encode_prompts(tok, [render(tok, r["question"], PromptConfig()) for r in rows], CPU)
    return rows, ids, mask


def _true_logprobs(model, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of the model's logits at every position of ids."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].double()
    return torch.log_softmax(logits, -1)


def test_resolve_kind_and_refusals(monkeypatch):
    assert resolve_kind("auto", CPU) == "hf"  # auto is vLLM only on CUDA
    assert resolve_kind("hf", CPU) == "hf"
    monkeypatch.setattr("trb.engine.vllm_installed", lambda: False)
    assert resolve_kind("auto", torch.device("cuda")) == "hf"
    with pytest.raises(EngineError, match=r"engine=vllm but vLLM is not installed: pip install 'trb\[vllm\]'"):
        resolve_kind("vllm", CPU)
    with pytest.raises(ValueError, match="engine.kind must be one of auto, hf, vllm"):
        EngineConfig(kind="sglang")
    from trb.config import TrainConfig

    with pytest.raises(ValueError, match="engine.tensor_parallel_size must be 1"):
        TrainConfig(engine=EngineConfig(tensor_parallel_size=2))
    from trb.engine import check_temperature

    with pytest.raises(EngineError, match=r"^decoding.temperature=2.5 but vLLM samples at temperatures up to 2"):
        check_temperature("vllm", 2.5, "decoding.temperature")
    check_temperature("vllm", 2.5, "decoding.temperature", greedy=True)  # greedy ignores it
    check_temperature("hf", 2.5, "decoding.temperature")
    # which samplers an engine may serve: those that need no teacher
    assert serves(Sampler("student", temperature=0.7)) and serves(Sampler("trb", eps=0.0))
    assert not serves(Sampler("trb", eps=0.01)) and not serves(Sampler("skd")) and not serves(Sampler("teacher"))


def test_eval_without_vllm_is_one_line_error(tmp_path, monkeypatch):
    from trb.config import DatasetConfig, EvalConfig, LoggerConfig
    from trb.eval_run import run_eval

    monkeypatch.setattr("trb.engine.vllm_installed", lambda: False)
    cfg = EvalConfig(engine=EngineConfig(kind="vllm"), dataset=DatasetConfig(eval_size=2),
                     logger=LoggerConfig(kind="none"))
    with pytest.raises(EngineError) as err:
        run_eval(cfg, tmp_path / "ev", log=lambda *_: None)
    assert "\n" not in str(err.value) and "make vllm-deps" in str(err.value)
    assert not (tmp_path / "ev" / "results.json").exists()


@needs_vllm
def test_greedy_equals_trb_decoder_on_1000_problems(toy):
    """Greedy completions through vLLM equal trb's decoder on >= 99% of 1,000 toy problems; every
    difference starts at a near tie of the two most likely tokens (float rounding decides)."""
    model, tok, stop, path = toy
    engine = _engine(model, path)
    rows, ids, mask = _problems(tok, 1000)
    greedy = Sampler("student", greedy=True)
    from trb.blend import RowNoise

    noise = RowNoise(0, range(len(rows)), CPU)
    ours = rollout(model, None, ids, mask, max_new_tokens=48, sampler=greedy, stop=stop, generator=noise, max_rows=250)
    theirs = engine.sample(ids, mask, n=1, max_new_tokens=48, sampler=greedy, stop=stop, noise=noise)
    differ = []
    for i in range(len(rows)):
        a = ours.tokens[i][ours.response_mask[i]].tolist()
        b = theirs.tokens[i][theirs.response_mask[i]].tolist()
        if a != b:
            differ.append((i, a, b))
    assert len(differ) <= 10, f"{len(differ)} of 1000 greedy completions differ"
    for i, a, b in differ:  # explained: the first differing position is a near tie under the model
        t = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
        prompt = ids[i][mask[i].bool()].tolist()
        lp = _true_logprobs(model, prompt + a[:t])[-1]
        top2 = lp.topk(2).values
        assert float(top2[0] - top2[1]) < 1e-3, (i, t, float(top2[0] - top2[1]))
    assert torch.equal(ours.stopped, theirs.stopped) or differ


def _chi2_sf(stat: float, dof: int) -> float:
    """P(X > stat) for X ~ chi-square(dof): the regularised upper incomplete gamma Q(dof/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; categories with an expected count under 5 are pooled."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return _chi2_sf(stat, int(keep.sum()) - 1)


def _homogeneity_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that two count vectors come from one distribution (categories pooled as above)."""
    total = a + b
    big = total * min(a.sum(), b.sum()) / total.sum() >= 5
    a = np.append(a[big], a[~big].sum())
    b = np.append(b[big], b[~big].sum())
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    table = np.stack([a, b]).astype(float)
    exp = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return _chi2_sf(float(((table - exp) ** 2 / exp).sum()), table.shape[1] - 1)


def _spread_prefix(model, tok, stop) -> list[int]:
    """Prompt + greedy completion up to the position of highest entropy among 20 toy problems: a
    next-token distribution with several likely tokens (the first token of a toy answer is peaked)."""
    from trb.blend import RowNoise

    _, ids, mask = _problems(tok, 20, seed=3)
    ro = rollout(model, None, ids, mask, max_new_tokens=48, sampler=Sampler("student", greedy=True), stop=stop,
                 generator=RowNoise(0, range(20), CPU))
    best, where = -1.0, None
    for i in range(20):
        seq = ids[i][mask[i].bool()].tolist() + ro.tokens[i][ro.response_mask[i]].tolist()
        p = int(mask[i].sum())
        lp = _true_logprobs(model, seq)[p - 1 : -1]
        ent = -(lp.exp() * lp).sum(-1)
        t = int(ent.argmax())
        if float(ent[t]) > best:
            best, where = float(ent[t]), seq[: p + t]
    return where


@needs_vllm
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (1.6, 1.0), (1.6, 0.8)])
def test_sampling_distribution_matches_true_distribution(toy, temperature, top_p):
    """4,000 first tokens of one prompt through vLLM and through trb's decoder, each against the
    true distribution (float64 softmax of the student's logits at that temperature and nucleus):
    chi-square p-values above 1e-3; and the two engines' counts against each other."""
    from trb.blend import RowNoise, top_p_logprobs

    model, tok, stop, path = toy
    engine = _engine(model, path)
    prompt = _spread_prefix(model, tok, stop)
    ids, mask = torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long)
    lp = _true_logprobs(model, prompt)[-1] / temperature
    lp = top_p_logprobs(torch.log_softmax(lp, -1), top_p)
    probs = lp.exp().numpy()
    n = 4000
    sampler = Sampler("student", temperature=temperature, top_p=top_p)
    noise = RowNoise(11, range(n), CPU)
    theirs = engine.sample(ids[:1], mask[:1], n=n, max_new_tokens=1, sampler=sampler, stop=stop, noise=noise)
    ours = rollout(model, None, ids[:1], mask[:1], max_new_tokens=1, sampler=sampler, stop=stop,
                   generator=RowNoise(11, range(n), CPU), n=n)
    v = probs.shape[0]
    c_vllm = np.bincount(theirs.tokens[:, 0].numpy(), minlength=v)
    c_ours = np.bincount(ours.tokens[:, 0].numpy(), minlength=v)
    assert (probs > 0.01).sum() >= 3, "the test needs a position with several likely tokens"
    assert c_vllm[probs == 0].sum() == 0 and c_ours[probs == 0].sum() == 0  # nothing outside the nucleus
    assert _chi2_pvalue(c_vllm, probs) > 1e-3
    assert _chi2_pvalue(c_ours, probs) > 1e-3
    assert _homogeneity_pvalue(c_vllm, c_ours) > 1e-3
    # the test has power: the same counts reject the distribution at a nearby other temperature
    wrong = 1.3 if temperature == 1.0 else 1.0
    lp_w = top_p_logprobs(torch.log_softmax(_true_logprobs(model, prompt)[-1] / wrong, -1), top_p)
    assert _chi2_pvalue(c_vllm, lp_w.exp().numpy()) < 1e-3
    # the sampled token's log-prob vLLM reports is the temperature-1 one (trb's student_logp record)
    t1 = _true_logprobs(model, prompt)[-1]
    assert torch.allclose(theirs.student_logp[:, 0].double(), t1[theirs.tokens[:, 0]], atol=1e-4)


@needs_vllm
def test_samples_reproducible_for_a_seed_and_independent_of_batching(toy):
    from trb.blend import RowNoise

    model, tok, stop, path = toy
    engine = _engine(model, path)
    _, ids, mask = _problems(tok, 6)
    s = Sampler("student")
    a = engine.sample(ids, mask, n=2, max_new_tokens=48, sampler=s, stop=stop, noise=RowNoise(5, range(12), CPU))
    b = engine.sample(ids[3:], mask[3:], n=2, max_new_tokens=48, sampler=s, stop=stop,
                      noise=RowNoise(5, range(6, 12), CPU))
    c = engine.sample(ids, mask, n=2, max_new_tokens=48, sampler=s, stop=stop, noise=RowNoise(6, range(12), CPU))
    def rows(ro):
        return [ro.tokens[i][ro.response_mask[i]].tolist() for i in range(ro.tokens.shape[0])]

    assert rows(a)[6:] == rows(b)  # rows 6-11 drew the same samples in a batch of 12 and of 6
    assert rows(a) != rows(c)  # another seed, other samples


@needs_vllm
def test_push_then_fresh_logprobs_and_prefix_cache_reset(toy):
    """After a push the engine's log-probs are the new weights' (<= 1e-4, float32), including for a
    prompt whose KV the prefix cache holds from the old weights (the reset is what makes this
    hold: without it the cached prompt blocks keep the old weights' keys and values)."""
    from trb.blend import RowNoise

    model, tok, stop, path = toy
    engine = _engine(model, path)
    engine.sync(model, ("test", 0))
    _, ids, mask = _problems(tok, 2, seed=7)
    long_q = tok.apply_chat_template([{"role": "user", "content": "+".join(str(i % 10) for i in range(140))}],
                                     tokenize=False, add_generation_prompt=True)
    prompt = tok(long_q, add_special_tokens=False)["input_ids"]
    assert len(prompt) >= 2 * engine.llm.llm_engine.vllm_config.cache_config.block_size  # whole blocks get cached
    p_ids, p_mask = torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long)
    greedy = Sampler("student", greedy=True)
    engine.sample(p_ids, p_mask, n=1, max_new_tokens=8, sampler=greedy, stop=stop, noise=RowNoise(0, [0], CPU))
    other = type(model)(model.config).eval()  # different weights, same architecture
    torch.manual_seed(1)
    with torch.no_grad():
        for p, q in zip(other.parameters(), model.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    try:
        seconds = engine.sync(other, ("test", 1))
        assert seconds > 0 and engine.sync(other, ("test", 1)) == 0.0  # the same version is not pushed twice
        ro = engine.sample(p_ids, p_mask, n=1, max_new_tokens=8, sampler=greedy, stop=stop,
                           noise=RowNoise(0, [0], CPU))
        seq = prompt + ro.tokens[0][ro.response_mask[0]].tolist()
        ref = _true_logprobs(other, seq)
        want = torch.stack([ref[len(prompt) - 1 + k, t] for k, t in enumerate(seq[len(prompt):])])
        assert (ro.student_logp[0][ro.response_mask[0]].double() - want).abs().max() <= 1e-4
        fixed = ids[0][mask[0].bool()].tolist() + [19, 15, 25, 31, 22]
        ref = _true_logprobs(other, fixed)
        want = torch.stack([ref[k, t] for k, t in enumerate(fixed[1:])])
        assert (engine.score(fixed).double() - want).abs().max() <= 1e-4
    finally:
        engine.sync(model, ("test", 2))


@needs_vllm
def test_a_lora_student_is_pushed_merged(toy):
    """A LoRA student (PEFT layers, random B) pushed to the engine: its log-probs are the LoRA model's own
    (base + scale * B @ A), and a second adapter state pushed after an update replaces the first."""
    import copy

    from trb import lora
    from trb.config import LoraConfig

    model, tok, stop, path = toy
    engine = _engine(model, path)
    student = copy.deepcopy(model)
    lora.apply_lora(student, LoraConfig(rank=4, alpha=8.0))
    _, ids, mask = _problems(tok, 1, seed=3)
    seq = ids[0][mask[0].bool()].tolist() + [19, 15, 25, 31, 22]
    try:
        for version, seed in ((("lora", 0), 0), (("lora", 1), 1)):
            torch.manual_seed(seed)
            with torch.no_grad():
                for name, p in student.named_parameters():
                    if ".lora_" in name:
                        p.copy_(0.2 * torch.randn_like(p))
            assert engine.sync(student, version) > 0
            ref = _true_logprobs(student, seq)
            want = torch.stack([ref[k, t] for k, t in enumerate(seq[1:])])
            plain = _true_logprobs(model, seq)
            assert (torch.stack([plain[k, t] for k, t in enumerate(seq[1:])]) - want).abs().max() > 1e-2
            assert (engine.score(seq).double() - want).abs().max() <= 1e-4
    finally:
        engine.sync(model, ("test", 9))


@needs_vllm
def test_records_rescored_equal_engine_logprobs_and_several_stop_ids(toy):
    """student_records (trb's forward over the finished sequences) reproduces vLLM's temperature-1
    log-probs; with two stop ids either ends a sample, recorded as the student's EOS."""
    from trb.blend import RowNoise

    model, tok, stop, path = toy
    engine = _engine(model, path)
    engine.sync(model, ("records", 0))
    _, ids, mask = _problems(tok, 8, seed=2)
    s = Sampler("student")
    ro = engine.sample(ids, mask, n=2, max_new_tokens=48, sampler=s, stop=stop, noise=RowNoise(1, range(16), CPU))
    assert engine.exact_records(s, stop)
    vllm_lp = ro.student_logp.clone()
    student_records(model, ro, s, stop, micro_batch_tokens=300)
    m = ro.response_mask
    assert (vllm_lp[m] - ro.student_logp[m]).abs().max() <= 1e-4
    assert torch.equal(ro.behavior_logp[m], ro.student_logp[m]) and float(ro.kl[m].abs().max()) == 0.0
    # temperature: behaviour log-probs and KL(mu || pi_S) as trb's decoder records them
    warm = Sampler("student", temperature=0.8)
    assert not engine.exact_records(warm, stop)
    ro_w = engine.sample(ids, mask, n=1, max_new_tokens=48, sampler=warm, stop=stop, noise=RowNoise(2, range(8), CPU))
    student_records(model, ro_w, warm, stop)
    for i in range(2):
        seq = ids[i][mask[i].bool()].tolist() + ro_w.tokens[i][ro_w.response_mask[i]].tolist()
        p = len(seq) - int(ro_w.response_mask[i].sum())
        lp = _true_logprobs(model, seq)[p - 1 : -1]
        mu = torch.log_softmax(lp / 0.8, -1)
        want = mu.gather(-1, torch.tensor(seq[p:])[:, None])[:, 0]
        assert (ro_w.behavior_logp[i][ro_w.response_mask[i]].double() - want).abs().max() <= 1e-4
        kl = (mu.exp() * (mu - lp)).sum(-1)
        assert (ro_w.kl[i][ro_w.response_mask[i]].double() - kl).abs().max() <= 1e-4
    # two stop ids: <|im_end|> (2) also ends a sample; recorded as the emit id
    two = StopSpec(stop_ids=[stop.emit_id, 2], emit_id=stop.emit_id, pad_id=stop.pad_id, vocab=stop.vocab)
    assert not engine.exact_records(s, two)
    ro2 = engine.sample(ids, mask, n=4, max_new_tokens=48, sampler=Sampler("student", temperature=2.0), stop=two,
                        noise=RowNoise(3, range(32), CPU))
    ends = [int(ro2.tokens[i][ro2.response_mask[i]][-1]) for i in range(32) if ro2.stopped[i]]
    assert ends and set(ends) == {stop.emit_id}
    assert not (ro2.tokens[ro2.response_mask] == 2).any()


@needs_vllm
def test_engine_restart_only_for_another_architecture(toy):
    model, tok, stop, path = toy
    a = _engine(model, path)
    b = _engine(model, path)
    assert a is b  # one engine per process, reused


def _train_cfg(tmp_path, **kw):
    from trb.config import DatasetConfig, DecodingConfig, LoggerConfig, RolloutConfig, TrainConfig

    base = dict(dataset=DatasetConfig(train_size=200, eval_size=20), rollout=RolloutConfig(n=2),
                eval_decoding=DecodingConfig(batch=20), logger=LoggerConfig(kind="none"), prompts_per_step=4,
                steps=6, eval_every=3, engine=ENGINE, output_dir=str(tmp_path))
    base.update(kw)
    return TrainConfig(**base)


class _Watch:
    """Wraps VLLMEngine.sample: before every engine decode, the engine's log-probs of a fixed
    sequence against the trained student's own (the model its last sync pushed)."""

    def __init__(self, monkeypatch, seq):
        self.seq, self.diffs, self.model = seq, [], None
        orig_sync, orig_sample = VLLMEngine.sync, VLLMEngine.sample
        watch = self

        def sync(engine, model, version):
            watch.model = model
            return orig_sync(engine, model, version)

        def sample(engine, *a, **k):
            ref = _true_logprobs(watch.model, watch.seq)
            want = torch.stack([ref[i, t] for i, t in enumerate(watch.seq[1:])])
            watch.diffs.append(float((engine.score(watch.seq).double() - want).abs().max()))
            return orig_sample(engine, *a, **k)

        monkeypatch.setattr(VLLMEngine, "sync", sync)
        monkeypatch.setattr(VLLMEngine, "sample", sample)


@needs_vllm
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_train_uses_engine_exactly_when_no_teacher_decodes_and_weights_are_current(toy, tmp_path, monkeypatch,
                                                                                   lora_rank):
    """TRB with K = 3: steps 0-2 (eps > 0) on trb's dual-model decoder, steps 3-5 (eps = 0) and every
    periodic eval on vLLM, with the current weights before every engine decode (<= 1e-4); then a
    resume to step 9 whose engine decodes also see the checkpoint's and later weights. With a LoRA
    student (lora_rank 4) the engine holds the merged weights of the current adapter: its log-probs are
    the LoRA model's own."""
    from trb.config import BlendConfig, LoraConfig, OptimConfig
    from trb.train import train

    model, tok, stop, path = toy
    _, ids, mask = _problems(tok, 1, seed=9)
    watch = _Watch(monkeypatch, ids[0][mask[0].bool()].tolist() + [19, 15, 25, 31, 22, 14, 223])
    cfg = _train_cfg(tmp_path / "run", blend=BlendConfig(eps0=0.05, horizon=3), save_every=3,
                     lora=LoraConfig(rank=lora_rank, alpha=8.0), optim=OptimConfig(lr=3e-3 if lora_rank else 3e-4))
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    assert [steps[k]["rollout/engine_vllm"] for k in range(6)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert [steps[k]["eps"] > 0 for k in range(6)] == [True, True, True, False, False, False]
    # engine decodes: eval at 0, 3, 6 (3 evals) + rollouts at 3, 4, 5
    assert len(watch.diffs) == 6 and max(watch.diffs) <= 1e-4, watch.diffs
    assert summary["engine"]["kind"] == "vllm" and summary["engine"]["pushes"] >= 4
    # resume from step 6 to step 9: the engine serves every step, from the checkpoint's weights on
    watch.diffs.clear()
    train(dataclasses.replace(cfg, steps=9), tmp_path / "run", log=lambda *_: None)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/engine_vllm"] for r in recs if "loss" in r and r["step"] >= 6] == [1.0, 1.0, 1.0]
    assert len(watch.diffs) == 4 and max(watch.diffs) <= 1e-4, watch.diffs
    if lora_rank:  # the engine served a trained adapter, not the base
        from trb import lora

        assert lora.is_lora(watch.model)
        b = [p for n, p in watch.model.named_parameters() if ".lora_B." in n]
        assert b and max(float(p.abs().max()) for p in b) > 0


@needs_vllm
@pytest.mark.parametrize("method,expect", [("skd", [0.0, 0.0]), ("temp_warmup", [1.0, 1.0]),
                                            ("sft_warmup", [None, 1.0])])
def test_engine_serves_only_student_only_samplers(toy, tmp_path, method, expect):
    from trb.config import BlendConfig, MethodConfig
    from trb.train import train

    cfg = _train_cfg(tmp_path / method, method=MethodConfig(name=method, sft_updates=1, sft_prompt_steps=1,
                                                            sft_samples=1),
                     blend=BlendConfig(kind="none", eps0=0.0, horizon=0), steps=2, eval_every=0)
    train(cfg, tmp_path / method, log=lambda *_: None)
    recs = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    served = [r.get("rollout/engine_vllm") for r in recs if "loss" in r]
    assert served == expect
    if method == "temp_warmup":  # rescored records: the behaviour is the tempered student (tau 0.9), KL > 0
        r = next(r for r in recs if "loss" in r)
        assert r["kl_mu_student/mean"] > 0 and r["rollout/temperature"] < 1


@needs_vllm
def test_eval_vllm_matches_hf_within_sampling_error(tmp_path):
    """trb eval engine=vllm vs engine=hf on the toy student, 200 problems x n = 4 sampled: the pass@1
    difference is within 3 paired standard errors (per-problem differences)."""
    from trb.config import DatasetConfig, DecodingConfig, EvalConfig, LoggerConfig
    from trb.eval_run import run_eval

    out = {}
    for kind in ("hf", "vllm"):
        engine = ENGINE if kind == "vllm" else EngineConfig(kind="hf")
        cfg = EvalConfig(engine=engine, dataset=DatasetConfig(eval_size=200),
                         decoding=DecodingConfig(greedy=False, n=4, ks=[1, 4], batch=200),
                         logger=LoggerConfig(kind="none"), output_dir=str(tmp_path / kind))
        out[kind] = run_eval(cfg, tmp_path / kind, log=lambda *_: None)
    per = {}
    for kind in out:
        samples = [json.loads(x) for x in (tmp_path / kind / "samples.jsonl").read_text().splitlines()]
        acc = np.zeros(200)
        for s in samples:
            acc[s["problem"]] += s["correct"] / 4
        per[kind] = acc
        assert set(samples[0]) >= {"problem", "sample", "completion", "extracted", "gold", "correct", "truncated"}
    d = per["vllm"] - per["hf"]
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert abs(d.mean()) <= 3 * se + 1e-9, (d.mean(), se)
    assert abs(out["vllm"]["results"][0]["metrics"]["eval/pass@1"] - per["vllm"].mean()) < 1e-9


@needs_vllm
def test_cli_train_then_eval_with_vllm(tmp_path):
    """`trb train engine=vllm` and `trb eval engine=vllm` from the command line on the toy: every OPD step
    sampled by vLLM, the checkpoints scored by vLLM (one engine for both checkpoints of the run)."""
    from helpers import cli

    run = tmp_path / "run"
    r = cli(["train", "engine=vllm", "method=opd", "steps=2", "save_every=1", "eval_every=0", "prompts_per_step=4",
             "rollout.n=2", "dataset.eval_size=20", "logger.kind=none", f"output_dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vLLM engine started" in r.stdout
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["rollout/engine_vllm"] for x in recs if "loss" in x] == [1.0, 1.0]
    assert json.loads((run / "summary.json").read_text())["engine"]["kind"] == "vllm"
    r = cli(["eval", "engine=vllm", f"checkpoint={run}", "dataset.eval_size=20", "logger.kind=none",
             f"output_dir={tmp_path / 'ev'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("vLLM engine started") == 1  # the second checkpoint's weights were pushed
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [x["step"] for x in res["results"]] == [1, 2] and res["config"]["engine"]["kind"] == "vllm"
    assert all(0 <= x["metrics"]["eval/pass@1"] <= 1 for x in res["results"])


def test_cli_engine_refusals(tmp_path):
    from helpers import cli

    r = cli(["train", "engine=vllm", "engine.tensor_parallel_size=2", f"output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "engine.tensor_parallel_size must be 1" in r.stderr
    assert not (tmp_path / "a").exists()
    r = cli(["eval", "engine=sglang", f"output_dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert r.returncode != 0 and not (tmp_path / "b" / "results.json").exists()


def test_engine_refuses_cpu_ranks_and_unknown_folders(tmp_path):
    with pytest.raises(EngineError, match="on CPU processes use engine=hf"):
        make_engine("vllm", None, "toy", torch.float32, ENGINE, 512, 0, CPU, distributed=True)
    with pytest.raises(EngineError, match="neither one nor a hub id in the Hugging Face cache"):
        make_engine("vllm", None, str(tmp_path / "nothing"), torch.float32, ENGINE, 512, 0, CPU)
    with pytest.raises(EngineError, match="neither one nor a hub id"):
        make_engine("vllm", None, "Nobody/not-cached", torch.float32, ENGINE, 512, 0, CPU)


@needs_vllm
def test_several_stop_ids_are_one_stop_event_like_trb(toy):
    """With two stop ids both likely, vLLM samples trb's distribution: the stop ids' probabilities
    merged onto the emit id before the temperature (not each tempered apart), chi-square against the
    true merged distribution for vLLM and for trb's decoder, and greedy picks the merged stop event."""
    from trb.blend import RowNoise

    model, tok, stop, path = toy
    engine = _engine(model, path)
    engine.sync(model, ("stops", 0))
    prompt = _spread_prefix(model, tok, stop)
    ids, mask = torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long)
    lp = _true_logprobs(model, prompt)[-1]
    a, b = lp.topk(2).indices.tolist()  # the two most likely next tokens become the stop ids, emitted as a
    two = StopSpec(stop_ids=[a, b], emit_id=a, pad_id=stop.pad_id, vocab=stop.vocab)
    merged = lp.clone()
    merged[a], merged[b] = torch.logsumexp(lp[[a, b]], 0), float("-inf")
    temperature, n = 1.6, 4000
    probs = torch.softmax(merged / temperature, -1).numpy()
    sampler = Sampler("student", temperature=temperature)
    theirs = engine.sample(ids, mask, n=n, max_new_tokens=1, sampler=sampler, stop=two,
                           noise=RowNoise(4, range(n), CPU))
    ours = rollout(model, None, ids, mask, max_new_tokens=1, sampler=sampler, stop=two,
                   generator=RowNoise(4, range(n), CPU), n=n)
    v = probs.shape[0]
    c_vllm = np.bincount(theirs.tokens[:, 0].numpy(), minlength=v)
    c_ours = np.bincount(ours.tokens[:, 0].numpy(), minlength=v)
    assert c_vllm[b] == 0 and c_ours[b] == 0 and bool(theirs.stopped[theirs.tokens[:, 0] == a].all())
    assert _chi2_pvalue(c_vllm, probs) > 1e-3 and _chi2_pvalue(c_ours, probs) > 1e-3
    # each stop id tempered apart (what vLLM does without trb's logits processor) is another distribution
    apart = torch.softmax(lp / temperature, -1)
    apart[a], apart[b] = apart[a] + apart[b], 0.0
    assert abs(float(apart[a]) - float(probs[a])) > 0.02  # the case tells the two apart ...
    assert _chi2_pvalue(c_vllm, apart.numpy()) < 1e-3  # ... and the counts reject it
    greedy = engine.sample(ids, mask, n=1, max_new_tokens=1, sampler=Sampler("student", greedy=True), stop=two,
                           noise=RowNoise(0, [0], CPU))
    assert int(greedy.tokens[0, 0]) == int(merged.argmax())
    # a shared vocabulary smaller than the model's embedding (padding rows): those ids are never sampled
    # and the rest keep their relative probabilities
    k = max(a, b)  # ids k.. are cut: one of the two likeliest tokens among them
    cut = StopSpec(stop_ids=[stop.emit_id], emit_id=stop.emit_id, pad_id=stop.pad_id, vocab=k)
    assert float(lp.exp()[k:].sum()) > 0.05  # the cut removes real mass here
    ro = engine.sample(ids, mask, n=n, max_new_tokens=1, sampler=sampler, stop=cut, noise=RowNoise(5, range(n), CPU))
    c_cut = np.bincount(ro.tokens[:, 0].numpy(), minlength=v)
    assert c_cut[k:].sum() == 0
    assert _chi2_pvalue(c_cut[:k], torch.softmax(lp[:k] / temperature, -1).numpy()) > 1e-3
