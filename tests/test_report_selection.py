"""``ddc-bench-report``: selection on validation, confidence intervals, Welch tests,
time-to-target profiles, grouping by swept keys, and bad input, on small fabricated
results trees (no training; each test a second or two)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ddc_bench import results
from ddc_bench.report import build_report, main
from ddc_bench.report import profile
from ddc_bench.report.stats import seed_stats, welch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, *, task: str = "lm", opt: str = "adamw", base_lr: float = 1e-3,
             lr_mult: float = 1.0, seed: int = 0, final: dict | None = None,
             variant_keys: dict | None = None, target: tuple | None = None,
             diverged: bool = False, weight_decay: float = 0.1) -> Path:
    """One finished run with the fields ddc-bench writes (``summary.json`` per
    :class:`ddc_bench.results.Summary`) and a two-line ``metrics.jsonl``."""
    lr = base_lr * lr_mult
    keys = {"lr_mult": lr_mult} if variant_keys is None else variant_keys
    variant = results.default_variant(lr) + "".join(f",{k}={v}" for k, v in sorted(keys.items()))
    folder = results.run_dir(root, task, "small", opt, variant, seed)
    folder.mkdir(parents=True)
    final = final or {"val_loss": 2.0}
    tmetric, tvalue, tstep, ttime = target or ("val_loss", None, None, None)
    records = [{"step": 0, "train_time_s": 0.0, "lr": lr, **{k: 5.0 for k in final}},
               {"step": 100, "train_time_s": 10.0, "lr": lr, **final}]
    with results.MetricsWriter(folder) as w:
        for r in records:
            w.write(r)
    summary = {
        "task": task, "task_size": "small", "optimizer": opt, "lr": lr, "base_lr": base_lr,
        "lr_mult": lr_mult, "weight_decay": weight_decay, "seed": seed, "variant": variant,
        "variant_keys": keys, "steps": 100, "steps_done": 60 if diverged else 100,
        "status": "diverged" if diverged else "finished", "diverged": diverged,
        "final": final, "best": final,
        "target": None if tvalue is None else {"metric": tmetric, "value": tvalue,
                                               "step": tstep, "time_s": ttime},
        "wall_time_s": 12.0, "train_time_s": 10.0, "step_time_ms": 100.0,
        "units_per_s": 1000.0, "unit": "tokens", "peak_memory_mb": 1.0, "overrides": [],
        "provenance": {"git_commit": "abc", "device": "cpu"},
    }
    results.write_json(folder / results.SUMMARY_FILE, summary)
    return folder


def section(text: str, title: str) -> str:
    return text.split(f"### {title}", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def table_rows(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip().replace("*", "") for c in ln.strip("|").split("|"))))
            for ln in lines[2:]]


# ------------------------------------------------------------------------------ selection

def test_selection_is_on_validation_not_train_and_test_shows_for_selected_only(tmp_path):
    """lr_mult=1 has the lower *training* loss and the better *test* accuracy, lr_mult=2 the
    lower *validation* loss: lr_mult=2 is selected, and test numbers appear only for it."""
    for seed, jitter in enumerate((0.0, 0.01, -0.01)):
        make_run(tmp_path, lr_mult=1.0, seed=seed,
                 final={"val_loss": 2.5 + jitter, "train_eval_loss": 1.0 + jitter,
                        "test_acc": 0.9})
        make_run(tmp_path, lr_mult=2.0, seed=seed,
                 final={"val_loss": 2.0 + jitter, "train_eval_loss": 1.8 + jitter,
                        "test_acc": 0.5})
    build_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    [selected] = table_rows(section(text, "Selected settings"))
    assert selected["selected setting"] == "lr_mult=2" and selected["lr"] == "0.002"
    assert selected["final test_acc ↑ (test)"].startswith("0.5000")
    rows = table_rows(section(text, "All settings"))
    marked = [r for r in rows if r["optimizer"].endswith("★")]
    assert [r["setting"] for r in marked] == ["lr_mult=2"]
    assert not any("test_acc" in k for k in rows[0])  # test split: selected table only
    assert "lr" in rows[0] and "lr_mult" not in rows[0]  # the setting names lr_mult


def test_diverged_settings_are_not_selected_while_a_clean_one_exists(tmp_path):
    for seed in range(2):
        make_run(tmp_path, lr_mult=4.0, seed=seed, final={"val_loss": 1.0},
                 diverged=seed == 1)
        make_run(tmp_path, lr_mult=1.0, seed=seed, final={"val_loss": 2.0 + seed * 0.1})
    build_report(tmp_path)
    [selected] = table_rows(section((tmp_path / "report.md").read_text(),
                                    "Selected settings"))
    assert selected["selected setting"] == "lr_mult=1"


def test_confidence_interval_and_welch_verdicts(tmp_path):
    vals = {"adamw": [2.0, 2.2, 2.4], "ddc": [2.05, 2.25, 2.45], "sgd": [3.0, 3.1, 3.2]}
    for opt, vs in vals.items():
        for seed, v in enumerate(vs):
            make_run(tmp_path, opt=opt, seed=seed, final={"val_loss": v})
    build_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    rows = {r["optimizer"]: r for r in table_rows(section(text, "Selected settings"))}
    assert list(rows) == ["adamw", "ddc", "sgd"]  # best first
    half = sps.t.ppf(0.975, 2) * 0.2 / math.sqrt(3)
    assert rows["adamw"]["95% CI"] == f"[{2.2 - half:.3f}, {2.2 + half:.3f}]"
    assert rows["adamw"]["final val_loss ↓"] == "2.200 ± 0.200"
    p_ddc = sps.ttest_ind(vals["ddc"], vals["adamw"], equal_var=False).pvalue
    p_sgd = sps.ttest_ind(vals["sgd"], vals["adamw"], equal_var=False).pvalue
    assert p_ddc > 0.05 > p_sgd
    assert rows["ddc"]["vs best (Welch t-test)"] == f"within seed noise (p={p_ddc:.2f})"
    assert rows["sgd"]["vs best (Welch t-test)"].startswith("worse (p=")
    assert "runner-up ddc: the difference is within seed noise" in text


def test_seed_stats_and_welch_match_scipy():
    s = seed_stats([1.0, 2.0, 4.0, float("nan"), None])
    assert (s.n, s.mean) == (3, pytest.approx(7 / 3))
    assert s.std == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert s.ci95 == pytest.approx(sps.t.ppf(0.975, 2) * s.std / math.sqrt(3))
    assert math.isnan(seed_stats([1.0]).ci95)
    a, b = [1.0, 1.5, 2.2, 1.7], [2.0, 2.9, 2.4]
    cmp = welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert cmp.p_value == pytest.approx(ref.pvalue) and cmp.diff == pytest.approx(
        np.mean(a) - np.mean(b))
    assert cmp.ci95[0] < cmp.diff < cmp.ci95[1]
    assert welch([1.0], [2.0, 3.0]).within_noise is None


# ----------------------------------------------------------------------------- profiles

def test_profile_area_is_the_exact_integral():
    r = pd.Series([1.0, 2.0, math.inf])
    # rho = 1/3 on [1,2), 2/3 on [2,4]: area = (1/3 * 1 + 2/3 * 2) / 3
    assert profile.profile_area(r) == pytest.approx((1 / 3 + 4 / 3) / 3)
    taus = np.linspace(1, 4, 30001)
    numeric = np.trapezoid(profile.profile_curve(r, taus), taus) / 3
    assert profile.profile_area(r) == pytest.approx(numeric, abs=1e-3)
    assert profile.profile_area(pd.Series([1.0, 1.0])) == 1.0
    assert profile.profile_area(pd.Series([5.0, math.inf])) == 0.0


def test_time_to_target_median_over_seeds_with_failures_infinite(tmp_path):
    # adamw: one setting reaches at 10/20 s in 2 of 3 seeds (median 20), another never;
    # sgd: 1 of 3 seeds reaches (median inf); ddc diverges in one of its 3 seeds.
    spec = {("adamw", 1.0): [10.0, 20.0, None], ("adamw", 2.0): [None, None, None],
            ("sgd", 1.0): [5.0, None, None], ("ddc", 1.0): [30.0, 30.0, "div"]}
    for task in ("lm", "grok"):
        for (opt, mult), times in spec.items():
            for seed, t in enumerate(times):
                hit = isinstance(t, float)
                make_run(tmp_path, task=task, opt=opt, lr_mult=mult, seed=seed,
                         final={"val_loss": 2.0}, diverged=t == "div",
                         target=("val_loss", 2.5, 50 if hit else None, t if hit else None))
    written = build_report(tmp_path)
    df = pd.read_csv(tmp_path / "summary.csv")
    df["task_label"] = df["task"] + "-" + df["task_size"]
    times = profile.time_to_target(df)
    assert times.loc["lm-small"].to_dict() == {"adamw": 20.0, "ddc": 30.0, "sgd": math.inf}
    ratios, dropped = profile.performance_ratios(times)
    assert dropped == [] and ratios.loc["grok-small", "ddc"] == 1.5
    png = written["plots/performance_profile.png"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = (tmp_path / "report.md").read_text()
    area = profile.profile_area(pd.Series([1.0, 1.0]))
    assert f"| adamw | {area:.3f} |" in text and "| sgd | 0.000 |" in text
    assert f"| ddc | {profile.profile_area(pd.Series([1.5, 1.5])):.3f} |" in text
    assert "| lm-small | 20 / 50 | 30 / 50 | ∞ / ∞ |" in text


def test_one_optimizer_report_has_no_profile(tmp_path):
    for seed in range(2):
        make_run(tmp_path, seed=seed, final={"val_loss": 2.0 + seed},
                 target=("val_loss", 2.5, 50, 5.0))
    written = build_report(tmp_path)
    assert "plots/performance_profile.png" not in written
    assert not (tmp_path / "plots" / "performance_profile.png").exists()
    assert "One optimizer only: no performance profile" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------- grouping, bad input

def test_settings_are_grouped_by_the_swept_keys(tmp_path):
    """A weight-decay sweep at one lr: two settings, named by their swept key."""
    for wd in (0.0, 0.1):
        for seed in range(2):
            make_run(tmp_path, seed=seed, weight_decay=wd, final={"val_loss": 2 + wd + seed / 10},
                     variant_keys={"optimizer.weight_decay": wd})
    build_report(tmp_path)
    rows = table_rows(section((tmp_path / "report.md").read_text(), "All settings"))
    assert sorted(r["setting"] for r in rows) == ["optimizer.weight_decay=0",
                                                  "optimizer.weight_decay=0.1"]
    assert all(r["seeds"] == "2" for r in rows)


def test_summaries_without_variant_keys_group_by_lr(tmp_path):
    """Summaries written before lr_mult (no base_lr/lr_mult/variant_keys) still work."""
    for lr in (1e-3, 3e-3):
        folder = make_run(tmp_path, base_lr=lr, final={"val_loss": 2.0 + lr})
        s = json.loads((folder / results.SUMMARY_FILE).read_text())
        for k in ("base_lr", "lr_mult", "variant_keys"):
            del s[k]
        results.write_json(folder / results.SUMMARY_FILE, s)
    build_report(tmp_path)
    rows = table_rows(section((tmp_path / "report.md").read_text(), "All settings"))
    assert sorted(r["lr"] for r in rows) == ["0.001", "0.003"]


def test_unreadable_runs_are_skipped_and_listed(tmp_path):
    good = make_run(tmp_path, seed=0)
    bad = {}
    for seed, content in ((1, b"[1, 2]"), (2, b'"text"'), (3, b"{not json")):
        folder = make_run(tmp_path, seed=seed)
        (folder / results.SUMMARY_FILE).write_bytes(content)
        bad[folder] = content
    binary = make_run(tmp_path, seed=4)
    with open(binary / results.METRICS_FILE, "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "Skipped 4 unreadable runs" in text
    assert f"`{binary}: metrics.jsonl has undecodable bytes`" in text
    for folder in list(bad)[:2]:
        assert f"`{folder}: summary.json is not a JSON object`" in text
    assert "summary.json is not valid JSON" in text
    assert "1 finished run," in text and str(good) in (tmp_path / "summary.csv").read_text()


def test_only_unreadable_runs_is_one_line(tmp_path, capsys):
    folder = make_run(tmp_path)
    (folder / results.SUMMARY_FILE).write_bytes(b"[]")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a JSON object" in err


def test_unwritable_report_folder_is_one_line(tmp_path, capsys, monkeypatch):
    make_run(tmp_path)

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    # (chmod does not stop root, who runs some CI containers: refuse the write instead)
    monkeypatch.setattr(results, "atomic_write_text", refuse)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the report into" in err
    assert "Permission denied" in err


def test_saturated_accuracy_tie_goes_to_the_earlier_target_not_to_val_loss_noise(tmp_path):
    """val_acc 1.0 at two lrs: the tie is broken by steps-to-target (the stated rule), not
    by a validation loss near 1e-7; a tie on both is reported and the smaller lr taken."""
    from ddc_bench.report.loading import load_runs
    from ddc_bench.report.selection import aggregate_task, select_best, selection_ties

    for mult, step, loss in ((1.0, 400, 1e-7), (2.0, 200, 3e-7), (4.0, 200, 2e-7)):
        for seed in (0, 1):
            make_run(tmp_path, task="grok", opt="muon", lr_mult=mult, seed=seed,
                     final={"val_acc": 1.0, "val_loss": loss},
                     target=("val_acc", 0.99, step, float(step)))
    agg = aggregate_task(load_runs(tmp_path))
    chosen = select_best(agg, "val_acc")
    assert agg.loc[chosen["muon"], "lr_mult"] == 2.0  # 200 steps beats 400; loss ignored
    ties = selection_ties(agg, chosen, "val_acc")
    assert [agg.loc[i, "lr_mult"] for i in ties["muon"]] == [4.0]


def test_selection_on_the_best_value_over_the_run(tmp_path):
    """stat="best" selects on the minimum validation loss over the run, so a setting
    that learned more and then over-fitted is not beaten by one that learned less."""
    from ddc_bench.report.loading import load_runs
    from ddc_bench.report.selection import aggregate_task, select_best

    for mult, final, best in ((0.5, 3.0, 3.0), (2.0, 3.5, 2.0)):
        for seed in (0, 1):
            folder = make_run(tmp_path, opt="adamw", lr_mult=mult, seed=seed,
                              final={"val_loss": final})
            summary = json.loads((folder / results.SUMMARY_FILE).read_text())
            summary["best"] = {"val_loss": best}
            results.write_json(folder / results.SUMMARY_FILE, summary)
    agg = aggregate_task(load_runs(tmp_path))
    assert agg.loc[select_best(agg, "val_loss")["adamw"], "lr_mult"] == 0.5
    assert agg.loc[select_best(agg, "val_loss", "best")["adamw"], "lr_mult"] == 2.0
    with pytest.raises(ValueError, match="accepted final, best"):
        select_best(agg, "val_loss", "median")


def test_fisher_counts_and_hedges_g_match_scipy_and_the_formula():
    from ddc_bench.report.stats import cohens_d, fisher_counts

    t = fisher_counts(5, 5, 0, 5)
    assert t.p_greater == pytest.approx(1 / math.comb(10, 5))  # 0.004: < 0.01 reachable
    assert t.min_p_greater == pytest.approx(t.p_greater)
    assert fisher_counts(10, 11, 0, 11).p_greater < 1e-4
    assert t.p_two_sided == pytest.approx(
        sps.fisher_exact([[5, 0], [0, 5]], alternative="two-sided").pvalue)
    assert fisher_counts(2, 4, 2, 4).p_greater == pytest.approx(
        sps.fisher_exact([[2, 2], [2, 2]], alternative="greater").pvalue)
    with pytest.raises(ValueError):
        fisher_counts(6, 5, 0, 5)
    a, b = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]
    assert cohens_d(a, b) == pytest.approx(-1.0 * (1 - 3 / (4 * 6 - 9)))
    assert math.isnan(cohens_d([1.0], b)) and cohens_d([1, 1], [0, 0]) == math.inf
