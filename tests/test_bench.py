"""`trb bench` runs end to end on the toy pair and reports what it claims (no timing assertions)."""

import json

import pytest

from helpers import cli

pytestmark = pytest.mark.slow


def test_bench_rollout_toy(tmp_path):
    out = tmp_path / "r.json"
    r = cli(["bench", "rollout", "--pair", "toy", "--batch", "4", "--n", "1,2", "--new-tokens", "6", "--repeats", "1",
             "--modes", "student,teacher,blend,spec2,fast,generate", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    cells = {(x["batch"], x["n"], x["mode"]) for x in res["rows"]}
    assert len(cells) == 12
    for x in res["rows"]:
        # fixed-length decoding: every slot is a generated token
        assert x["decode_tok_s"] == pytest.approx(x["slot_tok_s"]) and x["seconds"] > 0
        if x["mode"] == "spec2":
            assert 0 < x["acceptance"] <= 1
        if x["mode"] == "blend":
            assert x["search_ms_per_step"] > 0
        if x["mode"] in ("student", "fast"):
            assert x["search_ms_per_step"] == 0  # eps = 0: no search, no teacher
    assert "speedup spec2 vs blend (batch 4, n 1)" in res["ratios"]
    assert "blend / (student + teacher) (batch 4, n 2)" in res["ratios"]
    assert "speedup spec2 vs blend" in r.stdout


def test_bench_train_toy(tmp_path):
    out = tmp_path / "t.json"
    r = cli(["bench", "train", "--pair", "toy", "--batch", "4", "--new-tokens", "8", "--prompt-len", "8",
             "--repeats", "1", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["teacher_score_tok_s"] > 0 and res["student_update_tok_s"] > 0 and 0 < res["rollout_share"] < 1
    assert res["loss_memory"]["naive"]["chunk"] == 32 and res["loss_memory"]["chunked"]["chunk"] == 128
    assert all("peak_rise_mb" in v for v in res["loss_memory"].values())


def test_unknown_pair_is_a_clean_error(tmp_path):
    r = cli(["bench", "rollout", "--pair", "nope", "--batch", "1", "--n", "1"], cwd=tmp_path)
    assert r.returncode == 2 and "unknown pair" in r.stderr and "Traceback" not in r.stderr
