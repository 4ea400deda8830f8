"""`trb report` on run dirs with known metrics: the table's numbers are the metrics' numbers."""

import json
import statistics

import pytest

from trb.report import find_runs, markdown_table, report


def fake_run(root, name, method, blend, seed, accs, eps0=0.0, steps=10):
    d = root / name
    d.mkdir(parents=True)
    (d / "train_config.json").write_text(json.dumps({"method": {"name": method}, "blend": {"kind": blend},
                                                     "seed": seed}))
    with (d / "metrics.jsonl").open("w") as f:
        for s in range(steps):
            eps = eps0 * max(0.0, 1 - s / 5)
            f.write(json.dumps({"step": s, "loss": 1.0, "eps": eps, "beta/mean": eps * 50,
                                "kl_mu_student/mean": eps / 2, "rollout/reward": 0.1 * seed}) + "\n")
        for s, a in accs.items():
            f.write(json.dumps({"step": s, "eval/accuracy": a}) + "\n")
    (d / "summary.json").write_text("{}")
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, "0", "opd", "none", 0, {0: 0.2, 5: 0.3, 10: 0.4})
    fake_run(root, "1", "opd", "none", 1, {0: 0.2, 5: 0.5, 10: 0.3})
    fake_run(root, "2", "trb", "linear", 0, {0: 0.2, 5: 0.4, 10: 0.6}, eps0=0.01)
    fake_run(root, "3", "trb", "linear", 1, {0: 0.2, 5: 0.3, 10: 0.5}, eps0=0.01)
    (root / "multirun.yaml").write_text("{}")
    return root


def test_table_numbers_match_the_metrics(sweep):
    lines = []
    summary = report([sweep], band="std", log=lines.append)
    assert list(summary) == ["opd", "trb"]
    opd, trb = summary["opd"], summary["trb"]
    assert opd["seeds"] == [0, 1] and opd["final_step"] == 10
    assert opd["final"] == pytest.approx((0.35, statistics.stdev([0.4, 0.3])))
    assert opd["best"] == pytest.approx((0.45, statistics.stdev([0.4, 0.5])))
    assert opd["mean_over_evals"] == pytest.approx((statistics.fmean([0.3, 1.0 / 3]),
                                                    statistics.stdev([0.3, 1.0 / 3])))
    assert trb["final"] == pytest.approx((0.55, statistics.stdev([0.6, 0.5])))
    assert trb["rollout_reward"] == pytest.approx((0.05, statistics.stdev([0.0, 0.1])))
    assert [c["step"] for c in trb["curve"]] == [0, 5, 10]
    assert trb["curve"][1]["min"] == 0.3 and trb["curve"][1]["max"] == 0.4
    # files: next to the sweep, the table printed and written
    for f in ("report.md", "report.json", "accuracy.png", "schedule.png"):
        assert (sweep / f).exists() and (sweep / f).stat().st_size > 0
    assert (sweep / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    md = (sweep / "report.md").read_text()
    assert "| trb | 2 | 0.200 | 0.550 ± 0.071 (10) |" in md and md.count("\n| ") == 3  # header + 2 groups
    assert markdown_table(summary) in "\n".join(lines)
    saved = json.loads((sweep / "report.json").read_text())["groups"]
    assert saved["trb"]["final"] == pytest.approx(list(trb["final"]))


def test_schedules_split_trb_and_unfinished_runs_are_skipped(tmp_path):
    root = tmp_path / "s"
    fake_run(root, "a", "trb", "linear", 0, {0: 0.1, 10: 0.2}, eps0=0.01)
    fake_run(root, "b", "trb", "cosine", 0, {0: 0.1, 10: 0.3}, eps0=0.01)
    unfinished = fake_run(root, "c", "trb", "cosine", 1, {0: 0.1, 5: 0.9})
    (unfinished / "summary.json").unlink()
    lines = []
    summary = report([root], out_dir=tmp_path / "out", log=lines.append)
    assert list(summary) == ["trb (cosine)", "trb (linear)"]
    assert summary["trb (cosine)"]["seeds"] == [0]
    assert any("skipping 1 unfinished" in x for x in lines)


def test_runs_are_aligned_on_common_steps(tmp_path):
    fake_run(tmp_path, "a", "opd", "none", 0, {0: 0.1, 5: 0.2, 10: 0.3})
    fake_run(tmp_path, "b", "opd", "none", 1, {0: 0.1, 10: 0.5})
    summary = report([tmp_path / "a", tmp_path / "b"], out_dir=tmp_path / "out", log=lambda *_: None)
    assert [c["step"] for c in summary["opd"]["curve"]] == [0, 10]
    assert summary["opd"]["best"][0] == pytest.approx(0.4)


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run dirs"):
        find_runs([tmp_path])
