"""The dual-model decoder against `generate`, the trust region, and the fast path."""

import math

import pytest
import torch

from helpers import prompts, tiny_model
from trb.blend import blend_logprobs, kl_divergence
from trb.models import check_pair
from trb.microbatch import pack, response_hidden
from trb.rollout import Sampler, StopSpec, rollout, score_tokens


def _stop(model, tok, teacher=None):
    ids = [model.config.eos_token_id] + ([teacher.config.eos_token_id] if teacher is not None else [])
    return StopSpec(stop_ids=ids, emit_id=model.config.eos_token_id, pad_id=tok.pad_token_id)


def test_greedy_student_equals_generate():
    model, tok = tiny_model(scale=30.0)  # peaked: greedy paths that stop at different lengths
    ids, mask = prompts(tok)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    ro = rollout(model, None, ids, mask, max_new_tokens=20, sampler=Sampler("trb", eps=0.0, greedy=True),
                 stop=_stop(model, tok))
    gen = ref[:, ids.shape[1]:]
    for i in range(ids.shape[0]):
        n = int(ro.response_mask[i].sum())
        assert torch.equal(ro.tokens[i, :n], gen[i, :n]), i
        assert n == ro.tokens.shape[1] or ro.tokens[i, n - 1] == model.config.eos_token_id


def test_fast_path_never_calls_teacher():
    student, tok = tiny_model()

    class Exploding(torch.nn.Module):
        config = student.config

        def forward(self, *a, **k):
            raise AssertionError("teacher must not run at eps = 0")

    ids, mask = prompts(tok)
    ro = rollout(student, Exploding(), ids, mask, max_new_tokens=8, sampler=Sampler("trb", eps=0.0),
                 stop=_stop(student, tok), generator=torch.Generator().manual_seed(0))
    assert not ro.teacher_decoded and torch.isnan(ro.teacher_logp).all()
    assert (ro.beta == 0).all() and (ro.kl == 0).all()


def test_trust_region_records_are_consistent():
    student, tok = tiny_model(seed=0, scale=5.0)
    teacher, _ = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=5.0)
    ids, mask = prompts(tok)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # n = 4 samples per prompt
    eps = 0.05
    ro = rollout(student, teacher, ids, mask, max_new_tokens=12, sampler=Sampler("trb", eps=eps),
                 stop=_stop(student, tok, teacher), generator=torch.Generator().manual_seed(0))
    m = ro.response_mask
    assert ro.teacher_decoded
    assert (ro.kl[m] <= eps).all() and (ro.kl[m] > 0).any()
    assert ((ro.beta[m] > 0) & (ro.beta[m] <= 1)).all()
    # the recorded log mu(y) is the blend of the recorded student/teacher log-probs at beta: check
    # via re-scoring the same prefixes with both models and re-blending
    stop = _stop(student, tok, teacher)
    mb = pack(ro, list(range(m.shape[0])), stop.pad_id)  # right-padded, no attention mask, rows in order
    assert torch.equal(ro.tokens[mb.rows, mb.cols], ro.tokens[m])
    hs, ht = response_hidden(student, mb), response_hidden(teacher, mb)
    s_lp, _ = score_tokens(student.lm_head, hs, ro.tokens[m], stop)
    t_lp, _ = score_tokens(teacher.lm_head, ht, ro.tokens[m], stop)
    assert torch.allclose(s_lp, ro.student_logp[m], atol=1e-4)
    assert torch.allclose(t_lp, ro.teacher_logp[m], atol=1e-4)
    from trb.rollout import _logprobs

    s_full = _logprobs(student.lm_head(hs), stop)
    t_full = _logprobs(teacher.lm_head(ht), stop)
    log_mu = blend_logprobs(s_full, t_full, ro.beta[m])
    assert torch.allclose(log_mu.gather(-1, ro.tokens[m][:, None])[:, 0], ro.behavior_logp[m], atol=1e-4)
    assert torch.allclose(kl_divergence(log_mu, s_full), ro.kl[m], atol=1e-5)


def test_large_eps_samples_from_the_teacher():
    """eps >= KL(pi_T || pi_S) everywhere: beta = 1, the per-token distribution is the teacher's."""
    student, tok = tiny_model(seed=0, scale=10.0)
    teacher, _ = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=10.0)
    ids, mask = prompts(tok, questions=("What is 5+5?",))
    n = 4000
    ro = rollout(student, teacher, ids.expand(n, -1), mask.expand(n, -1), max_new_tokens=1,
                 sampler=Sampler("trb", eps=1e6), stop=_stop(student, tok, teacher),
                 generator=torch.Generator().manual_seed(0))
    assert (ro.beta == 1).all()
    assert torch.allclose(ro.behavior_logp, ro.teacher_logp)
    # empirical first-token distribution vs the teacher's
    from trb.rollout import _CachedModel, _logprobs

    t = _logprobs(_CachedModel(teacher, ids, mask).logits, _stop(student, tok, teacher))[0].exp()
    freq = torch.bincount(ro.tokens[:, 0], minlength=t.shape[0]).float() / n
    s = _logprobs(_CachedModel(student, ids, mask).logits, _stop(student, tok, teacher))[0].exp()
    tv = 0.5 * (freq - t).abs().sum()
    assert tv < 0.05, tv
    assert 0.5 * (freq - s).abs().sum() > 0.3  # and the student would have been distinguishable


def test_eos_mapping_emits_student_eos():
    """A teacher that always stops with <|im_end|>: at beta = 1 the emitted token is the student's EOS."""
    student, tok = tiny_model(seed=0)
    teacher, _ = tiny_model(eos="<|im_end|>", seed=1)
    im_end = teacher.config.eos_token_id
    with torch.no_grad():
        teacher.lm_head.weight.zero_()
        teacher.lm_head.weight[im_end] = 0.0
        teacher.model.norm.weight.zero_()
        teacher.lm_head.weight.data[:] = 0
    # make logits huge on im_end through the bias-free head: set a constant hidden direction
    teacher.model.norm.weight.data.fill_(1.0)
    teacher.lm_head.weight.data[im_end] = 50.0 * torch.sign(torch.randn(teacher.config.hidden_size))
    ids, mask = prompts(tok)
    ro = rollout(student, teacher, ids, mask, max_new_tokens=5, sampler=Sampler("teacher"),
                 stop=_stop(student, tok, teacher), generator=torch.Generator().manual_seed(0))
    assert not (ro.tokens == im_end).any()
    assert math.isfinite(float(ro.behavior_logp[ro.response_mask].sum()))


def test_encode_batch_skips_and_counts_long_prompts():
    from trb.config import PromptConfig
    from trb.train import encode_batch

    _, tok = tiny_model()
    rows = [{"question": "What is 1+2?"}, {"question": "What is " + "1+" * 40 + "1?"}, {"question": "What is 3?"}]
    kept, ids, mask, skipped = encode_batch(tok, rows, PromptConfig(), 40, "cpu")
    assert skipped == 1 and [r["question"] for r in kept] == ["What is 1+2?", "What is 3?"]
    assert ids.shape == mask.shape and ids.shape[1] == int(mask.sum(1).max()) <= 40
    assert mask[:, -1].all()  # still left-padded: every kept prompt ends at the last column
    kept, ids, _, skipped = encode_batch(tok, rows, PromptConfig(), 1000, "cpu")
    assert skipped == 0 and len(kept) == 3


@pytest.mark.parametrize("kind,eps,k", [("student", 0.0, 0), ("trb", 0.05, 0), ("trb", 0.05, 3), ("skd", 0.0, 0)])
def test_prefix_sharing_equals_repeated_prompts(kind, eps, k):
    """rollout(n=4) prefills each prompt once and replicates its caches: same samples, same records
    as repeating the prompt rows beforehand (same generator state)."""
    s, tok = tiny_model(scale=3.0)
    t, ttok = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=3.0)
    stop = check_pair(s, tok, t, ttok)
    ids, mask = prompts(tok)
    sampler = Sampler(kind, eps=eps, draft_k=k, skd_top_k=3)
    shared = rollout(s, t, ids, mask, max_new_tokens=12, sampler=sampler, stop=stop,
                     generator=torch.Generator().manual_seed(5), n=4)
    rep = rollout(s, t, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), max_new_tokens=12,
                  sampler=sampler, stop=stop, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shared.tokens, rep.tokens) and torch.equal(shared.response_mask, rep.response_mask)
    assert torch.equal(shared.prompt_ids, rep.prompt_ids)
    m = rep.response_mask
    for name in ("student_logp", "behavior_logp", "beta", "kl"):
        torch.testing.assert_close(getattr(shared, name)[m], getattr(rep, name)[m], atol=1e-5, rtol=0)


def _pair():
    s, tok = tiny_model(scale=3.0)
    t, ttok = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=3.0)
    return s, t, tok, check_pair(s, tok, t, ttok)


def _same_rollouts(a, b, tol=1e-5):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.response_mask, b.response_mask)
    for name in ("student_logp", "teacher_logp", "behavior_logp", "beta", "kl", "teacher_entropy"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x.nan_to_num(), y.nan_to_num(), atol=tol), name


@pytest.mark.parametrize("kind, eps", [("student", 0.0), ("trb", 0.05), ("skd", 0.0), ("teacher", 0.0)])
@pytest.mark.parametrize("n", [1, 3])
def test_static_caches_decode_like_dynamic_ones(kind, eps, n):
    """Preallocated caches (a full-width mask, slots written in place) give the dynamic caches'
    samples and records, with left padding and prefix sharing."""
    s, t, tok, stop = _pair()
    ids, mask = prompts(tok)
    runs = [rollout(s, t, ids, mask, max_new_tokens=14, sampler=Sampler(kind, eps=eps), stop=stop,
                    generator=torch.Generator().manual_seed(5), n=n, static_cache=static) for static in (False, True)]
    _same_rollouts(*runs)


@pytest.mark.slow
def test_compiled_step_decodes_like_eager():
    """rollout.compile_step: both models decode through torch.compile'd forwards (one graph per
    shape) and produce the eager decoder's tokens and records."""
    s, t, tok, stop = _pair()
    ids, mask = prompts(tok)
    runs = [rollout(s, t, ids, mask, max_new_tokens=10, sampler=Sampler("trb", eps=0.05), stop=stop,
                    generator=torch.Generator().manual_seed(7), n=2, static_cache=True, compile_step=compiled)
            for compiled in (False, True)]
    _same_rollouts(*runs, tol=1e-4)
    with pytest.raises(ValueError, match="compile_step needs static_cache"):
        rollout(s, t, ids, mask, max_new_tokens=4, sampler=Sampler("student"), stop=stop, compile_step=True)


@pytest.mark.parametrize("kind, eps, static", [("student", 0.0, False), ("trb", 0.05, True), ("skd", 0.0, False)])
def test_checking_for_the_end_less_often_changes_nothing(kind, eps, static):
    """check_every=k (GPUs: 8) tests "all rows stopped" only every k steps; the rows that stopped
    meanwhile emit masked padding that is trimmed, so samples and records are the same."""
    s, t, tok, stop = _pair()
    ids, mask = prompts(tok)
    runs = [rollout(s, t, ids, mask, max_new_tokens=100, sampler=Sampler(kind, eps=eps), stop=stop, n=2,
                    generator=torch.Generator().manual_seed(11), static_cache=static, check_every=every)
            for every in (1, 5)]
    assert bool(runs[0].stopped.any())  # some rows stop early, so the trimming is exercised
    _same_rollouts(*runs)
