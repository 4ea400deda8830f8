"""Real vocabularies: embedding tables padded past the tokenizer, and bf16 models end to end."""

import pytest
import torch

from helpers import save_pair, tiny_model
from trb.config import BlendConfig, DatasetConfig, LoggerConfig, LossConfig, ModelConfig, RolloutConfig, TrainConfig
from trb.tracking import read_metrics
from trb.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(student, teacher) and the same teacher with its embedding table padded by 61 rows whose LM-head
    rows are large: sampled or counted, they would change everything."""
    root = tmp_path_factory.mktemp("vocab")
    s, t = save_pair(root)
    teacher, tok = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=3.0)
    v = teacher.config.vocab_size
    teacher.resize_token_embeddings(v + 61, mean_resizing=False)
    with torch.no_grad():
        teacher.get_output_embeddings().weight[v:] = 5.0
    assert teacher.config.vocab_size == v + 61
    teacher.generation_config.eos_token_id = teacher.config.eos_token_id
    teacher.save_pretrained(root / "t_padded")
    tok.save_pretrained(root / "t_padded")
    return s, t, str(root / "t_padded")


def _run(tmp_path, name, s, t, estimator, **kw):
    student, teacher = ModelConfig(path=s, **kw.pop("student", {})), ModelConfig(path=t, **kw.pop("teacher", {}))
    cfg = TrainConfig(student=student, teacher=teacher, loss=LossConfig(estimator=estimator, k=8),
                      dataset=DatasetConfig(train_size=20, eval_size=4), rollout=RolloutConfig(n=2, max_new_tokens=10),
                      blend=BlendConfig(kind="linear", eps0=0.05, horizon=4), logger=LoggerConfig(kind="none"), steps=2,
                      prompts_per_step=2, **kw)
    out = train(cfg, tmp_path / name, log=lambda *_: None)
    return out, [x for x in read_metrics(tmp_path / name) if "loss" in x]


@pytest.mark.parametrize("estimator", ["full", "topk", "sampled"])
def test_padded_teacher_trains_exactly_like_the_unpadded_one(pairs, tmp_path, estimator):
    s, t, t_pad = pairs
    ref, ref_recs = _run(tmp_path, "ref", s, t, estimator)
    pad, pad_recs = _run(tmp_path, "pad", s, t_pad, estimator)
    for a, b in zip(ref_recs, pad_recs):
        for key in ("loss", "kl_estimate", "beta/mean", "kl_mu_student/max", "teacher/logp", "teacher/entropy"):
            assert torch.isfinite(torch.tensor(b[key])), key
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(ref["student"].parameters(),
                                                                    pad["student"].parameters()))
    assert diff < 1e-6


def test_bf16_teacher_and_student_end_to_end(pairs, tmp_path):
    """A bf16 teacher (the presets' dtype) with a float32 student, and both in bf16: rollouts under the
    trust region, loss, update, records all finite, the trust region holding on every token."""
    s, t, _ = pairs
    for name, student in (("t16", {}), ("both16", {"dtype": "bfloat16"})):
        out, recs = _run(tmp_path, name, s, t, "topk", teacher={"dtype": "bfloat16"}, student=student)
        assert len(recs) == 2
        for x in recs:
            for key in ("loss", "grad_norm", "kl_mu_student/max", "teacher/logp", "beta/mean"):
                assert torch.isfinite(torch.tensor(x[key])), (name, key)
            assert x["kl_mu_student/max"] <= x["eps"]
        assert any(x["beta/mean"] > 0 for x in recs)
        want = torch.bfloat16 if student else torch.float32
        assert all(p.dtype == want for p in out["student"].parameters())
