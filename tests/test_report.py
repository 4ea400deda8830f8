"""`trb report` on run dirs with known metrics: groups, seeds, statistics and intervals recomputed here
independently of trb.report's code (numpy, and Student's t from its density)."""

import json
import math

import numpy as np
import pytest

from trb.report import ReportError, find_runs, markdown_table, report, t975


def fake_run(root, name, method, blend, seed, accs, eps0=0.0, steps=10, extra=None, problems=1000):
    """A finished run dir: train_config.json in trb's nested layout, metrics.jsonl, summary.json."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"method": {"name": method, "skd_top_k": 25}, "blend": {"kind": blend, "eps0": 0.01, "horizon": 25},
           "optim": {"lr": 1e-3}, "seed": seed, "output_dir": str(d), "logger": {"kind": "none"},
           "dataset": {"name": "toy", "split": "test", "eval_size": problems},
           "eval_decoding": {"greedy": True, "n": 1, "max_new_tokens": 48}, "eval_dataset": None}
    for key, value in (extra or {}).items():  # "blend.eps0": 0.005
        head, tail = key.split(".")
        cfg[head][tail] = value
    (d / "train_config.json").write_text(json.dumps(cfg))
    with (d / "metrics.jsonl").open("w") as f:
        for s in range(steps):
            eps = eps0 * max(0.0, 1 - s / 5)
            f.write(json.dumps({"step": s, "loss": 1.0, "eps": eps, "beta/mean": eps * 50,
                                "kl_mu_student/mean": eps / 2, "rollout/reward": 0.1 * seed}) + "\n")
        for s, a in accs.items():
            f.write(json.dumps({"step": s, "eval/accuracy": a, "eval/problems": float(problems),  # as trb logs it
                                "eval/samples_per_problem": 1}) + "\n")
    (d / "summary.json").write_text("{}")
    return d


def t_cdf(x, df, n=20000):
    """Student's t CDF from its density (Simpson's rule on [0, x]); independent of trb's table."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    xs = np.linspace(0.0, x, n + 1)
    f = c * (1 + xs ** 2 / df) ** (-(df + 1) / 2)
    h = x / n
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


@pytest.mark.parametrize("df", [1, 2, 4, 9, 19, 30, 40, 60])
def test_t_quantile_is_the_975_point(df):
    assert t_cdf(t975(df), df) == pytest.approx(0.975, abs=2e-4)


def auc(steps, accs):
    s, a = np.asarray(steps, float), np.asarray(accs, float)
    return float(((s[1:] - s[:-1]) * (a[1:] + a[:-1]) / 2).sum() / (s[-1] - s[0]))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, "0", "opd", "none", 0, {0: 0.2, 5: 0.3, 10: 0.4})
    fake_run(root, "1", "opd", "none", 1, {0: 0.2, 5: 0.5, 10: 0.3})
    fake_run(root, "2", "opd", "none", 2, {0: 0.2, 5: 0.35, 10: 0.45})
    fake_run(root, "3", "trb", "linear", 0, {0: 0.2, 5: 0.4, 10: 0.6}, eps0=0.01)
    fake_run(root, "4", "trb", "linear", 1, {0: 0.2, 5: 0.3, 10: 0.5}, eps0=0.01)
    fake_run(root, "5", "trb", "linear", 2, {0: 0.2, 5: 0.45, 10: 0.42}, eps0=0.01)
    (root / "multirun.yaml").write_text("{}")
    return root


def test_numbers_and_paired_intervals_recomputed(sweep):
    lines = []
    summary = report([sweep], band="std", log=lines.append)
    assert list(summary) == ["opd", "trb"]  # blend.kind follows the method: not in the labels
    opd, trb = summary["opd"], summary["trb"]
    assert opd["seeds"] == [0, 1, 2] and opd["final_step"] == 10
    steps = [0, 5, 10]
    accs = {"opd": [[0.2, 0.3, 0.4], [0.2, 0.5, 0.3], [0.2, 0.35, 0.45]],
            "trb": [[0.2, 0.4, 0.6], [0.2, 0.3, 0.5], [0.2, 0.45, 0.42]]}
    for name, g in (("opd", opd), ("trb", trb)):
        a = np.array(accs[name])
        assert g["final"]["mean"] == pytest.approx(a[:, -1].mean())
        assert g["final"]["std"] == pytest.approx(a[:, -1].std(ddof=1))
        assert g["best"]["mean"] == pytest.approx(a[:, 1:].max(1).mean())
        assert g["auc"]["mean"] == pytest.approx(np.mean([auc(steps, r) for r in a]))
    # paired by seed: trb - opd per seed, t-interval with n - 1 = 2 dof
    for metric, per_run in (("final", lambda r: r[-1]), ("best", lambda r: max(r[1:])),
                            ("auc", lambda r: auc(steps, r))):
        d = np.array([per_run(t) - per_run(o) for t, o in zip(accs["trb"], accs["opd"])])
        half = 4.302653 * d.std(ddof=1) / math.sqrt(3)
        got = trb["vs_baseline"][metric]
        assert got["n"] == 3 and got["diffs"] == pytest.approx(list(d))
        assert (got["mean"], got["lo"], got["hi"]) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    assert trb["vs_baseline"]["curve"][1]["mean"] == pytest.approx(np.mean([0.1, -0.2, 0.1]))
    assert opd["vs_baseline"] is None and trb["baseline"] == "opd"
    # files: next to the sweep, the table printed and written, the caption says what the eval was
    for f in ("report.md", "report.json", "accuracy.png", "difference.png", "schedule.png"):
        assert (sweep / f).exists() and (sweep / f).stat().st_size > 0
    assert (sweep / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    md = (sweep / "report.md").read_text()
    assert "1000 held-out toy problems (test split), greedy, up to 48 new tokens" in md
    assert "standard error at most 1.6 points" in md
    assert md.count("\n| ") == 3 and "| opd | 3 | 0.200 ± 0.000 | 0.383 ± 0.076 (10) |" in md
    assert "(baseline)" in md and "Δ final vs opd [95% CI]" in md
    assert markdown_table(summary, "opd") in "\n".join(lines)
    saved = json.loads((sweep / "report.json").read_text())
    assert saved["groups"]["trb"]["final"]["mean"] == pytest.approx(trb["final"]["mean"])
    assert saved["interval"] == "paired t, 95%"


def test_groups_by_every_differing_key_and_labels_only_what_splits(tmp_path):
    root = tmp_path / "grid"
    for seed in (0, 1):
        fake_run(root, f"opd{seed}", "opd", "none", seed, {0: 0.2, 10: 0.3})
        for eps0 in (0.005, 0.02):
            for horizon in (15, 50):
                fake_run(root, f"trb{eps0}_{horizon}_{seed}", "trb", "linear", seed, {0: 0.2, 10: 0.3 + eps0},
                         extra={"blend.eps0": eps0, "blend.horizon": horizon})
    summary = report([root], log=lambda *_: None)
    assert sorted(summary) == ["opd", "trb blend.eps0=0.005 blend.horizon=15", "trb blend.eps0=0.005 blend.horizon=50",
                               "trb blend.eps0=0.02 blend.horizon=15", "trb blend.eps0=0.02 blend.horizon=50"]
    assert all(g["seeds"] == [0, 1] for g in summary.values())
    g = summary["trb blend.eps0=0.02 blend.horizon=50"]
    assert g["baseline"] == "opd" and g["vs_baseline"]["final"]["diffs"] == pytest.approx([0.02, 0.02])


def test_baseline_is_matched_on_the_non_method_keys(tmp_path):
    root = tmp_path / "lr"
    for lr, acc in ((1e-3, 0.3), (3e-4, 0.5)):
        for seed in (0, 1):
            fake_run(root, f"opd{lr}{seed}", "opd", "none", seed, {0: 0.2, 10: acc}, extra={"optim.lr": lr})
            fake_run(root, f"skd{lr}{seed}", "skd", "none", seed, {0: 0.2, 10: acc + 0.1 * (1 + seed)},
                     extra={"optim.lr": lr})
    summary = report([root], log=lambda *_: None)
    assert set(summary) == {"opd optim.lr=0.001", "opd optim.lr=0.0003", "skd optim.lr=0.001", "skd optim.lr=0.0003"}
    g = summary["skd optim.lr=0.0003"]
    assert g["baseline"] == "opd optim.lr=0.0003"
    assert g["vs_baseline"]["final"]["diffs"] == pytest.approx([0.1, 0.2])


def test_duplicate_seeds_in_a_group_are_refused(tmp_path):
    fake_run(tmp_path, "a", "opd", "none", 0, {0: 0.1, 10: 0.2})
    fake_run(tmp_path, "b", "opd", "none", 0, {0: 0.1, 10: 0.3})
    with pytest.raises(ReportError, match="2 runs with seed 0"):
        report([tmp_path], out_dir=tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_duplicate_seeds_cli_is_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from trb.cli import app

    fake_run(tmp_path, "a", "opd", "none", 3, {0: 0.1, 10: 0.2})
    fake_run(tmp_path, "b", "opd", "none", 3, {0: 0.1, 10: 0.3})
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith("error: group 'all runs' holds 2 runs with seed 3")


def test_best_excludes_the_untrained_model_and_one_seed_has_no_std(tmp_path):
    fake_run(tmp_path, "a", "opd", "none", 0, {0: 0.9, 5: 0.2, 10: 0.4})
    lines = []
    summary = report([tmp_path / "a"], out_dir=tmp_path / "out", log=lines.append)
    g = summary["all runs"]
    assert g["best"]["mean"] == pytest.approx(0.4) and g["best"]["std"] is None
    assert g["start"]["mean"] == pytest.approx(0.9)
    assert g["auc"]["mean"] == pytest.approx(auc([0, 5, 10], [0.9, 0.2, 0.4]))
    table = "\n".join(lines)
    assert "±" not in table and "| all runs | 1 | 0.900 | 0.400 (10) | 0.400 |" in table


def test_one_seed_pair_gives_no_interval(tmp_path):
    fake_run(tmp_path, "a", "opd", "none", 0, {0: 0.2, 10: 0.4})
    fake_run(tmp_path, "b", "trb", "linear", 0, {0: 0.2, 10: 0.5})
    summary = report([tmp_path], out_dir=tmp_path / "out", log=lambda *_: None)
    v = summary["trb"]["vs_baseline"]["final"]
    assert v["n"] == 1 and v["lo"] is None and v["mean"] == pytest.approx(0.1)
    assert "(n=1, no interval)" in (tmp_path / "out" / "report.md").read_text()


def test_unfinished_runs_are_skipped(tmp_path):
    root = tmp_path / "s"
    fake_run(root, "a", "trb", "linear", 0, {0: 0.1, 10: 0.2}, eps0=0.01)
    unfinished = fake_run(root, "c", "trb", "linear", 1, {0: 0.1, 5: 0.9})
    (unfinished / "summary.json").unlink()
    lines = []
    summary = report([root], out_dir=tmp_path / "out", log=lines.append)
    assert summary["all runs"]["seeds"] == [0]
    assert any("skipping 1 unfinished" in x for x in lines)


def test_runs_are_aligned_on_common_steps(tmp_path):
    fake_run(tmp_path, "a", "opd", "none", 0, {0: 0.1, 5: 0.2, 10: 0.3})
    fake_run(tmp_path, "b", "opd", "none", 1, {0: 0.1, 10: 0.5})
    summary = report([tmp_path / "a", tmp_path / "b"], out_dir=tmp_path / "out", log=lambda *_: None)
    assert [c["step"] for c in summary["all runs"]["curve"]] == [0, 10]
    assert summary["all runs"]["best"]["mean"] == pytest.approx(0.4)


def test_int_and_float_settings_are_one_setting_and_one_run_named_twice_is_one_run(tmp_path):
    a = fake_run(tmp_path, "a", "opd", "none", 0, {0: 0.1, 10: 0.2}, extra={"optim.lr": 1})
    fake_run(tmp_path, "b", "opd", "none", 1, {0: 0.1, 10: 0.4}, extra={"optim.lr": 1.0})
    summary = report([tmp_path, a, tmp_path / ".." / tmp_path.name / "a"], out_dir=tmp_path / "out",
                     log=lambda *_: None)
    assert list(summary) == ["all runs"] and summary["all runs"]["seeds"] == [0, 1]


def test_knobs_a_method_never_reads_do_not_split_its_runs(tmp_path):
    # a cross sweep method=opd,skd method.skd_top_k=15,25: opd ran twice per seed with a knob it ignores
    for k in (15, 25):
        for seed in (0, 1):
            fake_run(tmp_path, f"opd{k}{seed}", "opd", "none", seed, {0: 0.2, 10: 0.3 + 0.01 * seed},
                     extra={"method.skd_top_k": k})
            fake_run(tmp_path, f"skd{k}{seed}", "skd", "none", seed, {0: 0.2, 10: 0.3 + k / 1000},
                     extra={"method.skd_top_k": k})
    with pytest.raises(ReportError, match="2 runs with seed 0"):  # the opd pairs are the same run twice
        report([tmp_path], out_dir=tmp_path / "out", log=lambda *_: None)
    # opd runs whose unused blend.eps0 differs (one built in Python, one from the YAML) are one group
    root = tmp_path / "eps"
    fake_run(root, "o0", "opd", "none", 0, {0: 0.2, 10: 0.3}, extra={"blend.eps0": 0.0})
    fake_run(root, "o1", "opd", "none", 1, {0: 0.2, 10: 0.35}, extra={"blend.eps0": 0.01})
    for seed in (0, 1):
        fake_run(root, f"t{seed}", "trb", "linear", seed, {0: 0.2, 10: 0.4}, extra={"blend.eps0": 0.01})
    summary = report([root], out_dir=tmp_path / "out", log=lambda *_: None)
    assert list(summary) == ["opd", "trb"]
    assert summary["trb"]["vs_baseline"]["final"]["diffs"] == pytest.approx([0.1, 0.05])


def test_no_shared_trained_step_gives_no_difference_and_says_so(tmp_path):
    for seed in (0, 1, 2):
        fake_run(tmp_path, f"o{seed}", "opd", "none", seed, {0: 0.2, 10: 0.3, 20: 0.4})
        fake_run(tmp_path, f"t{seed}", "trb", "linear", seed, {0: 0.2, 5: 0.5, 15: 0.6})
    fake_run(tmp_path, "t9", "trb", "linear", 9, {0: 0.2, 5: 0.5, 15: 0.6})
    summary = report([tmp_path], out_dir=tmp_path / "out", log=lambda *_: None)
    v = summary["trb"]["vs_baseline"]
    assert v["final"]["n"] == 0 and v["steps"] == [] and v["unpaired"] == 4
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Paired on fewer runs than the group holds: trb (4 of 4 runs without a partner" in md


def test_runs_without_evals_are_skipped_and_all_without_is_an_error(tmp_path):
    fake_run(tmp_path, "a", "opd", "none", 0, {0: 0.1, 10: 0.2})
    fake_run(tmp_path, "b", "opd", "none", 1, {})
    lines = []
    summary = report([tmp_path], out_dir=tmp_path / "out", log=lines.append)
    assert summary["all runs"]["seeds"] == [0] and any("without an eval: b" in x for x in lines)
    with pytest.raises(ReportError, match="no eval accuracy"):
        report([tmp_path / "b"], out_dir=tmp_path / "out2", log=lambda *_: None)


def test_best_counts_a_first_eval_after_step_0(tmp_path):
    fake_run(tmp_path, "a", "opd", "none", 0, {5: 0.9, 10: 0.4})  # e.g. resumed into a new dir at step 5
    summary = report([tmp_path / "a"], out_dir=tmp_path / "out", log=lambda *_: None)
    assert summary["all runs"]["best"]["mean"] == pytest.approx(0.9)


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run dirs"):
        find_runs([tmp_path])
