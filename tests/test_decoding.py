"""Decoding at scale: rows decoded together are bounded (waves), finished rows leave the batch, a bf16
rollout copy, eval with prefix sharing. With per-row noise streams nothing of this changes a token."""

import pytest
import torch

from helpers import prompts, tiny_model
from trb.blend import RowNoise
from trb.rollout import Sampler, StopSpec, rollout

RECORDS = ("student_logp", "teacher_logp", "behavior_logp", "beta", "kl", "teacher_entropy")


@pytest.fixture(scope="module")
def pair():
    student, tok = tiny_model(seed=0, scale=5.0)
    teacher, _ = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=5.0)
    stop = StopSpec(stop_ids=[tok.eos_token_id, teacher.config.eos_token_id], emit_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id)
    for model, eos in ((student, tok.eos_token_id), (teacher, teacher.config.eos_token_id)):
        # random models rarely stop: raise the stop logit so lengths vary (1 .. 14 tokens)
        def lift(module, args, out, eos=eos):
            out = out.clone()
            out[..., eos] += 4.0
            return out

        model.lm_head.register_forward_hook(lift)
    q = ("What is 1+2?", "What is 12+30-4?", "What is 7?", "What is 5-3?", "What is 9+9+9?")
    ids, mask = prompts(tok, q)
    return student, teacher, stop, ids, mask


class RowCounter:
    """Wraps a model's forward to record the batch size of every decoding step."""

    def __init__(self, model):
        self.model, self.sizes = model, []
        self.orig = model.forward

        def forward(*a, **k):
            ids = k.get("input_ids", a[0] if a else None)
            self.sizes.append(int(ids.shape[0]))
            return self.orig(*a, **k)

        model.forward = forward

    def close(self):
        self.model.forward = self.orig


def _run(pair, sampler, n, max_rows=0, reference=False, seed=7, max_new=14):
    student, teacher, stop, ids, mask = pair
    noise = RowNoise(seed, range(ids.shape[0] * n), "cpu")
    # the reference: every row decodes to the end in one batch (a lockstep that changes nothing
    # turns rows leaving off): the decoder as it was, fed the same per-row noise
    lock = (lambda finished: finished) if reference else None
    return rollout(student, teacher, ids, mask, max_new_tokens=max_new, sampler=sampler, stop=stop, generator=noise,
                   n=n, max_rows=max_rows, lockstep=lock)


def _same(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.replaced, b.replaced) and torch.equal(a.stopped, b.stopped)
    m = a.response_mask
    for name in RECORDS:
        x, y = getattr(a, name)[m], getattr(b, name)[m]
        assert torch.allclose(x, y, atol=1e-5, equal_nan=True), name


SAMPLERS = [Sampler("student"), Sampler("trb", eps=0.05), Sampler("skd", skd_top_k=3), Sampler("teacher"),
            Sampler("student", temperature=0.7)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["student", "trb", "skd", "teacher", "temp0.7"])
@pytest.mark.parametrize("n", [1, 3])
def test_bounded_rows_and_rows_leaving_change_no_token(pair, sampler, n):
    ref = _run(pair, sampler, n, reference=True)
    assert ref.response_mask.sum(1).min() < ref.response_mask.sum(1).max()  # rows of different lengths
    _same(_run(pair, sampler, n), ref)  # rows leave the batch
    for max_rows in (n, 2 * n, 4, 2):  # one prompt, two prompts, 4 rows, a bound below one prompt's n rows
        _same(_run(pair, sampler, n, max_rows=max_rows), ref)


def test_finished_rows_leave_both_caches(pair):
    student, teacher = pair[0], pair[1]
    counters = [RowCounter(student), RowCounter(teacher)]
    try:
        ro = _run(pair, Sampler("trb", eps=0.05), 3)
    finally:
        for c in counters:
            c.close()
    lengths = ro.response_mask.sum(1)
    for c in counters:
        steps = c.sizes[1:]  # after the prefill (one row per prompt)
        assert c.sizes[0] == pair[3].shape[0]
        assert steps[0] == 15 and steps[-1] < 15 and steps == sorted(steps, reverse=True)
        # each step runs exactly the rows that are still decoding
        assert steps[-1] == int((lengths == lengths.max()).sum())


def test_rows_bound_is_respected_and_waves_queue_the_rest(pair):
    student = pair[0]
    c = RowCounter(student)
    try:
        _run(pair, Sampler("student"), 3, max_rows=6)
    finally:
        c.close()
    assert max(c.sizes) <= 6


def test_speculative_under_the_bound(pair):
    ro = _run(pair, Sampler("trb", eps=0.05, draft_k=3), 2, max_rows=4)
    m = ro.response_mask
    assert ro.tokens.shape[0] == 10 and (ro.kl[m] <= 0.05).all()
    assert 0 < float(ro.draft_accepted.sum()) <= float(ro.draft_proposed.sum())


def test_eval_prefix_sharing_and_samples_independent_of_the_batch(pair):
    from trb.config import DecodingConfig, PromptConfig
    from trb.evaluate import evaluate
    from trb.grading import Grader

    student, _, stop, _, _ = pair
    _, tok = tiny_model(seed=0)
    rows = [{"question": q, "gold": "3"} for q in ("What is 1+2?", "What is 5-2?", "What is 9-6?")]
    grader = Grader(workers=1)
    try:
        out = {}
        for batch in (2, 4, 64):
            c = RowCounter(student)
            try:
                dec = DecodingConfig(greedy=False, n=4, max_new_tokens=10, batch=batch, ks=[1, 4], seed=3)
                _, samples = evaluate(student, tok, rows, stop, grader, PromptConfig(), dec)
            finally:
                c.close()
            prefill_rows = [n for n, first in zip(c.sizes, [True] + [False] * len(c.sizes)) if first]
            out[batch] = ([(s["problem"], s["sample"], s["completion"]) for s in samples], c.sizes, prefill_rows)
        assert out[2][0] == out[4][0] == out[64][0]  # the samples do not depend on decoding.batch
        assert max(out[4][1]) <= 4 and max(out[2][1]) <= 2  # a batch below n splits a prompt's samples
        # prefix sharing: the first forward of batch=64 prefills each of the 3 prompts once, not 12 rows
        assert out[64][1][0] == 3
    finally:
        grader.close()


@pytest.mark.slow
def test_bf16_rollout_copy_is_refreshed_and_checkpoints_keep_the_master(tmp_path):
    from helpers import save_pair
    from safetensors.torch import load_file

    from trb.config import BlendConfig, DatasetConfig, LoggerConfig, ModelConfig, RolloutConfig, TrainConfig
    from trb.train import train

    s, t = save_pair(tmp_path)
    cfg = TrainConfig(student=ModelConfig(path=s), teacher=ModelConfig(path=t),
                      dataset=DatasetConfig(train_size=20, eval_size=4), logger=LoggerConfig(kind="none"),
                      rollout=RolloutConfig(n=2, max_new_tokens=10, dtype="bfloat16", max_rows=3),
                      blend=BlendConfig(kind="linear", eps0=0.05, horizon=4), steps=3, prompts_per_step=3)
    out = train(cfg, tmp_path / "run", log=lambda *_: None)
    copy = out["rollout_copy"]
    assert copy == {"dtype": "bfloat16", "separate": True, "max_abs_diff_to_master": 0.0}
    master = out["student"]
    assert all(p.dtype == torch.float32 for p in master.parameters())
    saved = load_file(f"{out['checkpoint']}/model.safetensors")
    assert all(v.dtype == torch.float32 for v in saved.values())
    ref = dict(master.named_parameters())
    assert all(torch.equal(v, ref[k].detach()) for k, v in saved.items() if k in ref)
