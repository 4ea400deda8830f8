"""`trb rollout` on tiny models: the records it writes agree with a re-scoring of the same
sequences, the HTML has one coloured span per token, and the summary matches the records."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import cli, save_pair
from trb.blend import blend_logprobs, canonicalize_eos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("models"))


def run(pair, tmp_path, *args):
    s, t = pair
    out = tmp_path / "out"
    r = cli(["rollout", f"student.path={s}", f"teacher.path={t}", "num_prompts=3", "rollout.n=2",
             "rollout.max_new_tokens=12", "logger.kind=none", f"hydra.run.dir={out}", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    return out, recs, json.loads((out / "summary.json").read_text()), r.stdout


class Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tokens, self.replaced, self.coloured = 0, 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "span" and "t" in classes:
            self.tokens += 1
            self.replaced += "r" in classes
            self.coloured += "background:" in (a.get("style") or "")


def rescore(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_trb_records_match_a_rescoring(pair, tmp_path):
    out, recs, summary, stdout = run(pair, tmp_path, "method=fixed", "blend.eps0=0.05", "probe.cuts=[0,3]")
    assert len(recs) == 6 and {r["prompt_index"] for r in recs} == {0, 1, 2}
    s_path, t_path = pair
    stop_ids = [AutoTokenizer.from_pretrained(s_path).eos_token_id, AutoTokenizer.from_pretrained(t_path).eos_token_id]
    for r in recs[:3]:
        n = len(r["token_ids"])
        for key in ("student_logp", "teacher_logp", "behavior_logp", "beta", "kl", "replaced", "token_text"):
            assert len(r[key]) == n
        ids = r["prompt_ids"] + r["token_ids"]
        p = len(r["prompt_ids"])
        s_lp, t_lp = rescore(s_path, ids)[p - 1 : p - 1 + n], rescore(t_path, ids)[p - 1 : p - 1 + n]
        s_lp, t_lp = canonicalize_eos(s_lp, stop_ids, stop_ids[0]), canonicalize_eos(t_lp, stop_ids, stop_ids[0])
        tok = torch.tensor(r["token_ids"])
        torch.testing.assert_close(s_lp.gather(-1, tok[:, None])[:, 0], torch.tensor(r["student_logp"]),
                                   atol=2e-4, rtol=0)
        torch.testing.assert_close(t_lp.gather(-1, tok[:, None])[:, 0], torch.tensor(r["teacher_logp"]),
                                   atol=2e-4, rtol=0)
        # log mu is the blend of the two distributions at the recorded beta
        mu = blend_logprobs(s_lp, t_lp, torch.tensor(r["beta"]))
        torch.testing.assert_close(mu.gather(-1, tok[:, None])[:, 0], torch.tensor(r["behavior_logp"]),
                                   atol=2e-4, rtol=0)
        assert all(k <= 0.05 for k in r["kl"]) and any(b > 0 for b in r["beta"])
        assert r["support_score"] == pytest.approx(
            sum(t - s for t, s in zip(r["teacher_logp"], r["student_logp"])) / n, abs=1e-5)
    # the summary is computed from the same records
    betas = [b for r in recs for b in r["beta"]]
    assert summary["beta/mean"] == pytest.approx(sum(betas) / len(betas), rel=1e-5)
    assert summary["kl_mu_student/max"] == pytest.approx(max(k for r in recs for k in r["kl"]), rel=1e-5)
    assert summary["rollout/reward"] == pytest.approx(sum(r["correct"] for r in recs) / len(recs))
    assert summary["eps"] == 0.05 and summary["completions"] == 6
    # probe: every completion is alive at t = 0; rates are fractions
    assert summary["probe"]["0"]["prefixes"] == 6
    for res in summary["probe"].values():
        if res["prefixes"]:
            assert 0 <= res["student"] <= 1 and 0 <= res["teacher"] <= 1
            assert res["gain"] == pytest.approx(res["teacher"] - res["student"])
    assert "beta/mean" in stdout and "gain" in stdout
    spans = Spans()
    spans.feed((out / "rollouts.html").read_text())
    assert spans.tokens == sum(len(r["token_ids"]) for r in recs) == spans.coloured
    assert spans.replaced == 0


def test_skd_rollout_marks_replaced_tokens(pair, tmp_path):
    out, recs, summary, _ = run(pair, tmp_path, "method=skd", "method.skd_top_k=3")
    replaced = sum(sum(r["replaced"]) for r in recs)
    assert replaced > 0
    assert summary["rollout/replaced"] == pytest.approx(replaced / sum(len(r["token_ids"]) for r in recs))
    spans = Spans()
    spans.feed((out / "rollouts.html").read_text())
    assert spans.replaced == replaced and spans.tokens == sum(len(r["token_ids"]) for r in recs)


def test_opd_rollout_is_student_only(pair, tmp_path):
    _, recs, summary, _ = run(pair, tmp_path, "method=opd")
    for r in recs:
        assert r["behavior_logp"] == r["student_logp"] and set(r["beta"]) == {0.0}
        assert all(x == x for x in r["teacher_logp"])  # scored after decoding: no NaN
    assert summary["beta/mean"] == 0 and summary["eps"] == 0


def test_wandb_gets_a_small_page_and_eval_tables_per_checkpoint(pair, tmp_path):
    """trb rollout sends W&B the first logger.html_rows completions (the run dir's page has all) and
    the probe's rates (scalars and a table); trb eval logs one samples table per checkpoint, in the
    W&B group of the train run it scores."""
    from helpers import wandb_offline

    s, t = pair
    out = tmp_path / "out"
    r = cli(["rollout", f"checkpoint={s}", f"teacher.path={t}", "num_prompts=3", "rollout.n=2",
             "rollout.max_new_tokens=6", "logger.html_rows=2", "probe.cuts=[0,2]", f"hydra.run.dir={out}"],
            cwd=tmp_path, wandb_mode="offline")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["student"]["path"] == s  # checkpoint= names the student
    w = wandb_offline(out)
    logged = {k: v for h in w["history"] for k, v in h.items()}
    for cut in ("0", "2"):
        for k in ("student", "teacher", "gain"):
            assert logged[f"probe/{k}@{cut}"] == pytest.approx(summary["probe"][cut][k])
    probe = json.loads(next((out / "wandb").glob("offline-run-*/files/media/table/rollout/probe_*.table.json"))
                       .read_text())
    assert probe["columns"] == ["cut", "prefixes", "student", "teacher", "gain"] and len(probe["data"]) == 2
    assert f"student {s}, teacher {t}" in (out / "rollouts.html").read_text()
    pages = list((out / "wandb").glob("offline-run-*/files/media/html/*.html"))
    assert len(pages) == 1 and "first 2 of 6 completions" in pages[0].read_text()
    assert (out / "rollouts.html").read_text().count("class='c'") > pages[0].read_text().count("class='c'")
    assert not (out / "rollouts_wandb.html").exists()
    # trb eval: a run dir with two checkpoints -> two tables
    from helpers import tiny_model

    model, tok = tiny_model()
    ck = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        model.save_pretrained(ck / f"step_{step:06d}")
        tok.save_pretrained(ck / f"step_{step:06d}")
    (tmp_path / "run" / "train_config.json").write_text("{}")
    ev = tmp_path / "ev"
    r = cli(["eval", f"checkpoint={tmp_path / 'run'}", "dataset.eval_size=3", "decoding.max_new_tokens=4",
             f"output_dir={ev}"], cwd=tmp_path, wandb_mode="offline")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((ev / "wandb").glob("offline-run-*/files/media/table/eval/samples_*.table.json"))) == 2
    e = wandb_offline(ev)
    assert e["run"]["group"] == "run" and e["run"]["job_type"] == "eval"  # the train run dir's name


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no headless Chromium here (apt-get install -y chromium)")
def test_the_page_works_in_a_real_browser(pair, tmp_path):
    """Headless Chromium runs the page's script: #mode=tlogp repaints every token by log pi_T,
    #show=correct hides the wrong samples and the prompt groups left empty; a screenshot renders."""
    out, recs, _, _ = run(pair, tmp_path, "method=fixed", "blend.eps0=0.05")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    page = (out / "rollouts.html").as_uri()
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"{page}#mode=tlogp&show=correct"], capture_output=True, text=True, timeout=120).stdout
    wrong = sum(not r["correct"] for r in recs)
    assert dom.count('data-ok="0" style="display: none;"') == wrong
    assert dom.count('data-ok="1" style=""') + dom.count('data-ok="1">') == len(recs) - wrong
    spans = re.findall(r'class="t[^"]*" data-b="[^"]*" data-t="([^"]*)"[^>]*style="background: ([^;"]*)', dom)
    assert len(spans) == sum(len(r["token_ids"]) for r in recs)
    assert all(bg.startswith("rgba(200, 0, 0") for t, bg in spans if t != "nan")  # log pi_T's red scale
    shot = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,1000", page], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
