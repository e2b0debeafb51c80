"""Tests of ``ddc-bench-report`` on a fabricated results tree (fast, no training)."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from ddc_bench import results
from ddc_bench.report import NoFinishedRunsError, build_report, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS, LOG_EVERY, EVAL_EVERY = 200, 10, 40
SEEDS = (0, 1, 2)
# task -> (size, metric names, unit, target metric, target value)
TASKS = {
    "mnist": ("small", ("loss", "acc"), "samples", "val_acc", 0.8),
    "tinylm": ("small", ("loss", "ppl"), "tokens", "val_loss", 4.0),
}
# optimizer -> (convergence time constant in steps, step time in ms)
OPTIMIZERS = {"adamw": (45.0, 10.0), "sgd": (90.0, 8.0), "ddc": (35.0, 12.0)}
LRS = {"adamw": (1e-3,), "sgd": (0.1,), "ddc": (1e-3, 3e-3)}
DIVERGED = ("tinylm", "sgd", 0.1, 1)  # task, optimizer, lr, seed


def _lrs(task: str, opt: str) -> tuple[float, ...]:
    return LRS[opt] if task == "mnist" else LRS[opt][:1]  # the lr sweep is on mnist only


def _curves(task: str, opt: str, lr: float, seed: int) -> list[dict]:
    """Plausible metrics.jsonl records of one run (NaN after divergence)."""
    size, names, unit, _, _ = TASKS[task]
    tau, step_ms = OPTIMIZERS[opt]
    rng = random.Random(f"{task}{opt}{lr}{seed}")
    tau *= (1.0 if lr == LRS[opt][0] else 1.4) * rng.uniform(0.85, 1.15)
    l0, floor = (2.30, 0.25) if task == "mnist" else (7.0, 3.2)
    floor *= rng.uniform(0.9, 1.1)
    diverge_at = 120 if (task, opt, lr, seed) == DIVERGED else None
    step_ms *= rng.uniform(0.95, 1.05)
    records = []
    for step in range(0, STEPS + 1, LOG_EVERY):
        t = step * step_ms / 1000.0
        base = {"step": step, "train_time_s": round(t, 4), "lr": lr}
        loss = floor + (l0 - floor) * math.exp(-step / tau)
        broken = diverge_at is not None and step >= diverge_at
        if step > 0:
            records.append({**base, "loss": None if broken else loss * rng.uniform(0.93, 1.07),
                            "units_per_s": 128 * 1000.0 / step_ms})
        if step % EVAL_EVERY == 0:
            if broken:
                ev = {f"{split}_{m}": None for split in ("train_eval", "val") for m in names}
                ev["gap_loss"] = None
            else:
                tr = loss * rng.uniform(0.97, 1.0)
                va = loss * rng.uniform(1.02, 1.08)
                ev = {"train_eval_loss": tr, "val_loss": va, "gap_loss": va - tr}
                if "acc" in names:
                    ev["train_eval_acc"] = min(1.0, 1 - 0.9 * tr / l0 + 0.05)
                    ev["val_acc"] = min(1.0, 1 - 0.9 * va / l0 + 0.02)
                if "ppl" in names:
                    ev["train_eval_ppl"] = math.exp(tr)
                    ev["val_ppl"] = math.exp(va)
            records.append({**base, **ev})
    return records


def _summary(task: str, opt: str, lr: float, seed: int, records: list[dict]) -> dict:
    size, names, unit, tmetric, tvalue = TASKS[task]
    evals = [r for r in records if "val_loss" in r]
    keys = [k for k in evals[0] if k not in ("step", "train_time_s", "lr")]
    higher = {k: k.endswith("acc") for k in keys}
    final = dict((k, evals[-1][k]) for k in keys)
    best = {}
    for k in keys:
        vals = [r[k] for r in evals if r[k] is not None]
        best[k] = (max(vals) if higher[k] else min(vals)) if vals else None
    hit = next((r for r in evals if r[tmetric] is not None and
                (r[tmetric] >= tvalue if higher[tmetric] else r[tmetric] <= tvalue)), None)
    diverged = (task, opt, lr, seed) == DIVERGED
    steps_done = 120 if diverged else STEPS
    train_time = next(r["train_time_s"] for r in records if r["step"] == steps_done)
    return {
        "task": task, "task_size": size, "optimizer": opt, "lr": lr, "weight_decay": 0.01,
        "seed": seed, "variant": results.default_variant(lr), "steps": STEPS,
        "steps_done": steps_done, "status": "diverged" if diverged else "finished",
        "diverged": diverged, "final": final, "best": best,
        "target": {"metric": tmetric, "value": tvalue,
                   "step": hit["step"] if hit else None,
                   "time_s": hit["train_time_s"] if hit else None},
        "wall_time_s": train_time * 1.3 + 2.0, "train_time_s": train_time,
        "step_time_ms": 1000.0 * train_time / steps_done,
        "units_per_s": next(r["units_per_s"] for r in records if "units_per_s" in r),
        "unit": unit, "peak_memory_mb": 123.0,
        "overrides": [f"optimizer={opt}", f"optimizer.lr={lr}"],
        "provenance": {"git_commit": "abc1234", "git_dirty": False, "packages": {},
                       "device": "cpu", "python": "3.11", "hostname": "test",
                       "started_at": "2025-01-01T00:00:00"},
    }


def make_tree(root: Path) -> list[dict]:
    """A results tree: 2 tasks × 3 optimizers × 3 seeds (ddc at two lrs on mnist), one
    diverged run, one unfinished run and one moved-aside interrupted run."""
    summaries = []
    for task, (size, *_rest) in TASKS.items():
        for opt in OPTIMIZERS:
            for lr in _lrs(task, opt):
                for seed in SEEDS:
                    folder = results.run_dir(root, task, size, opt,
                                             results.default_variant(lr), seed)
                    folder.mkdir(parents=True)
                    records = _curves(task, opt, lr, seed)
                    (folder / results.CONFIG_FILE).write_text(f"optimizer: {opt}\n")
                    with results.MetricsWriter(folder) as w:
                        for r in records:
                            w.write(r)
                    summary = _summary(task, opt, lr, seed, records)
                    results.write_json(folder / results.SUMMARY_FILE, summary)
                    summaries.append({**summary, "path": str(folder)})
    # An unfinished run and an interrupted one: metrics but no summary.json -> ignored.
    for folder in (results.run_dir(root, "mnist", "small", "adamw", "lr0.001", 3),
                   results.run_dir(root, "mnist", "small", "adamw", "lr0.001", 4)
                   .with_name("seed4.interrupted-1")):
        folder.mkdir(parents=True)
        (folder / results.CONFIG_FILE).write_text("optimizer: adamw\n")
        with results.MetricsWriter(folder) as w:
            for r in _curves("mnist", "adamw", 1e-3, 9)[:5]:
                w.write(r)
    return summaries


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the task folders (run folders included) with mtime and size."""
    out = {}
    for task, (size, *_rest) in TASKS.items():
        for p in (root / f"{task}-{size}").rglob("*"):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    summaries = make_tree(root)
    before = _snapshot(root)
    written = build_report(root)
    return root, summaries, written, before


# ---- helpers -----------------------------------------------------------------------------

def _groups(summaries: list[dict]) -> dict[tuple[str, str, float], list[dict]]:
    out: dict[tuple[str, str, float], list[dict]] = {}
    for s in summaries:
        out.setdefault((f"{s['task']}-{s['task_size']}", s["optimizer"], s["lr"]), []).append(s)
    return out


def _md_tables(text: str, which: str = "All settings") -> dict[str, list[dict[str, str]]]:
    """Each '## task' section's '### <which>' pipe table as a list of {header: cell} rows."""
    tables = {}
    for section in text.split("\n## ")[1:]:
        name, _, body = section.partition("\n")
        if f"### {which}" not in body:
            continue
        body = body.split(f"### {which}", 1)[1].split("\n### ", 1)[0]
        lines = [ln for ln in body.splitlines() if ln.startswith("|")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
        tables[name.strip()] = [dict(zip(header, r)) for r in rows]
    return tables


def _column(row: dict[str, str], prefix: str) -> str:
    [key] = [k for k in row if k.startswith(prefix)]
    return row[key]


def _parse_mean_std(cell: str) -> tuple[float, float | None, float]:
    """'**0.4321 ± 0.0123**' -> (mean, std, rounding tolerance)."""
    text = cell.replace("*", "").replace(",", "")
    mean, _, std = text.partition(" ± ")
    decimals = len(mean.partition(".")[2])
    tol = 0.5 * 10 ** -decimals + 1e-12
    return float(mean), (float(std) if std else None), tol


def _check(cell: str, values: list[float], with_std: bool = True) -> None:
    mean, std, tol = _parse_mean_std(cell)
    assert mean == pytest.approx(statistics.mean(values), abs=tol), cell
    if not with_std:
        assert std is None
    elif len(values) > 1:
        assert std == pytest.approx(statistics.stdev(values), abs=tol), cell
    else:
        assert std is None


def _row(table: list[dict[str, str]], opt: str, lr: float) -> dict[str, str]:
    rows = [r for r in table if r["optimizer"].strip("*").removesuffix(" ★") == opt
            and r["lr"] == f"{lr:g}"]
    assert len(rows) == 1, (opt, lr, table)
    return rows[0]


# ---- tests -------------------------------------------------------------------------------

def test_written_files(tree):
    root, _, written, _ = tree
    assert set(written) == {"summary.csv", "report.md", "summary.tex",
                            "plots/mnist-small_curves.png", "plots/mnist-small_lr.png",
                            "plots/tinylm-small_curves.png", "plots/performance_profile.png"}
    for rel, path in written.items():
        assert path == root / rel and path.is_file() and path.stat().st_size > 0
    assert not list(root.rglob("*.tmp"))


def test_run_folders_untouched(tree):
    root, _, _, before = tree
    assert _snapshot(root) == before


def test_summary_csv(tree):
    root, summaries, _, _ = tree
    with open(root / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(summaries) == 2 * 3 * 3 + 3  # + ddc's second lr on mnist
    assert set(by_path) == {s["path"] for s in summaries}  # unfinished runs left out
    for s in summaries:
        r = by_path[s["path"]]
        for k in ("task", "task_size", "optimizer", "variant", "status"):
            assert r[k] == str(s[k])
        assert float(r["lr"]) == s["lr"] and int(r["seed"]) == s["seed"]
        assert float(r["step_time_ms"]) == pytest.approx(s["step_time_ms"])
        assert float(r["units_per_s"]) == pytest.approx(s["units_per_s"])
        assert float(r["wall_time_s"]) == pytest.approx(s["wall_time_s"])
        for kind in ("final", "best"):
            for m, v in s[kind].items():
                if v is None:
                    assert r[f"{kind}_{m}"] == ""
                else:
                    assert float(r[f"{kind}_{m}"]) == pytest.approx(v)
        step = s["target"]["step"]
        assert r["target_step"] == ("" if step is None else str(step))
    assert "final_val_acc" in rows[0] and "final_val_ppl" in rows[0]
    assert sum(r["status"] == "diverged" for r in rows) == 1


def test_report_tables(tree):
    root, summaries, written, _ = tree
    text = (root / "report.md").read_text()
    tables = _md_tables(text)
    assert set(tables) == {"mnist-small", "tinylm-small"}
    groups = _groups(summaries)
    assert len(tables["mnist-small"]) == 4 and len(tables["tinylm-small"]) == 3
    partial = False
    for (task, opt, lr), runs in groups.items():
        row = _row(tables[task], opt, lr)
        ok = [s for s in runs if not s["diverged"]]
        assert row["seeds"] == str(len(runs)) == "3"
        assert row["diverged"] == str(len(runs) - len(ok))
        metrics = ["val_loss"] + (["val_acc"] if task.startswith("mnist") else ["val_ppl"])
        for m in metrics:
            _check(_column(row, f"final {m} "), [s["final"][m] for s in ok])
            _check(_column(row, f"best {m} "), [s["best"][m] for s in ok])
        _check(_column(row, "gap"), [s["final"]["gap_loss"] for s in ok])
        reached = [s for s in ok if s["target"]["step"] is not None]
        assert row["reached"] == f"{len(reached)}/{len(runs)}"
        partial |= 0 < len(reached) < len(runs)
        steps_cell = _column(row, "steps to ").replace("*", "").replace(",", "")
        if reached:
            assert float(steps_cell) == pytest.approx(
                statistics.mean(s["target"]["step"] for s in reached), abs=0.5)
        else:
            assert steps_cell == "—"
        _check(_column(row, "step time"), [s["step_time_ms"] for s in ok], with_std=False)
        _check(_column(row, "throughput (samples/s)" if task.startswith("mnist")
                       else "throughput (tokens/s)"),
               [s["units_per_s"] for s in ok], with_std=False)
    assert partial, "the fixture should have a configuration that reached the target k<n times"

    # The diverged run: counted, listed, excluded.
    assert _row(tables["tinylm-small"], "sgd", 0.1)["diverged"] == "1"
    assert "excluded from every mean" in text
    assert "sgd lr=0.1 seed 1: stopped at step 120 of 200 (`tinylm-small/sgd/lr0.1/seed1`)" \
        in text
    # Headers name the targets; the best final val_acc is bold.
    assert "steps to val_acc ≥ 0.8" in text and "steps to val_loss ≤ 4" in text
    best = max((k for k in groups if k[0] == "mnist-small"),
               key=lambda k: statistics.mean(s["final"]["val_acc"] for s in groups[k]))
    cell = _column(_row(tables["mnist-small"], best[1], best[2]), "final val_acc ")
    assert cell.startswith("**") and cell.endswith("**")
    # Plots are linked.
    for rel in written:
        if rel.startswith("plots/"):
            assert f"]({rel})" in text


def test_latex(tree):
    root, _, _, _ = tree
    tex = (root / "summary.tex").read_text()
    # per task: the selected-settings table and the all-settings table
    assert tex.count(r"\begin{table}") == 4 and tex.count(r"\end{tabular}") == 4
    assert r"$\pm$" in tex and r"\textbf{" in tex and r"val\_acc" in tex
    assert tex.isascii() and not re.search(r"(?<!\\)_", tex)  # symbols and _ escaped


def test_plots(tree):
    root, _, written, _ = tree
    pngs = sorted((root / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["mnist-small_curves.png", "mnist-small_lr.png",
                                      "performance_profile.png", "tinylm-small_curves.png"]
    assert not (root / "plots" / "tinylm-small_lr.png").exists()  # tinylm: one lr each
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert 10_000 < p.stat().st_size < 2_000_000
        h, w, *_ = mpimg.imread(p).shape
        assert 600 <= w <= 4000 and 300 <= h <= 2000


def _expected_target_step(path: str, metric: str, value: float) -> float | None:
    for r in results.read_metrics(path):
        v = r.get(metric)
        if v is not None and (v >= value if metric.endswith("acc") else v <= value):
            return r["step"]
    return None


def test_target_override_and_regeneration(tmp_path):
    summaries = make_tree(tmp_path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "gone-task_curves.png").write_bytes(PNG_MAGIC)  # stale
    (tmp_path / "plots" / "mine.png").write_bytes(PNG_MAGIC)  # not ours: kept
    target = {"val_acc": 0.6, "val_loss": 5.0}  # mnist uses val_acc, tinylm val_loss
    build_report(tmp_path, target)
    assert not (tmp_path / "plots" / "gone-task_curves.png").exists()
    assert (tmp_path / "plots" / "mine.png").exists()
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    changed = 0
    for s in summaries:
        metric = "val_acc" if s["task"] == "mnist" else "val_loss"
        r = rows[s["path"]]
        assert r["target_metric"] == metric and float(r["target_value"]) == target[metric]
        step = _expected_target_step(s["path"], metric, target[metric])
        assert r["target_step"] == ("" if step is None else str(step))
        changed += step != s["target"]["step"]
    assert changed > 0
    text = (tmp_path / "report.md").read_text()
    assert "Targets from `--target`: val_acc ≥ 0.6, val_loss ≤ 5" in text
    assert "steps to val_acc ≥ 0.6" in text
    build_report(tmp_path)  # regenerated from the runs' own targets
    assert "steps to val_acc ≥ 0.8" in (tmp_path / "report.md").read_text()


def test_no_finished_runs(tmp_path):
    with pytest.raises(NoFinishedRunsError, match=str(tmp_path)):
        build_report(tmp_path)
    unfinished = results.run_dir(tmp_path, "mnist", "small", "sgd", "lr0.1", 0)
    unfinished.mkdir(parents=True)
    (unfinished / results.METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(NoFinishedRunsError):
        build_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-small"]  # nothing written


def _script() -> str:
    exe = Path(sys.executable).with_name("ddc-bench-report")
    path = str(exe) if exe.exists() else shutil.which("ddc-bench-report")
    assert path, "console script missing: run `pip install --no-deps -e .`"
    return path


def test_console_script(tmp_path):
    make_tree(tmp_path)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = subprocess.run([_script(), str(tmp_path), "--target", "val_acc=0.7"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "report.md") in out.stdout
    assert out.stdout.count(".png") == 4
    assert "val_acc ≥ 0.7" in (tmp_path / "report.md").read_text()


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2  # no finished runs: one line naming PATH, exit 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err
    assert main([str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    run = make_tree(tmp_path)[0]["path"]
    assert main([run]) == 2  # a run folder: refused, nothing written into it
    assert "run folder" in capsys.readouterr().err
    assert sorted(p.name for p in Path(run).iterdir()) == ["config.yaml", "metrics.jsonl",
                                                           "summary.json"]
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--target", "val_acc"])
    assert exc.value.code == 2 and "METRIC=VALUE" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Bad input (issue 20): damaged runs listed, unknown targets, wrong PATHs
# --------------------------------------------------------------------------------------

def test_runs_without_metrics_or_with_a_torn_last_line_are_skipped_and_listed(tmp_path):
    summaries = make_tree(tmp_path)
    missing, torn = Path(summaries[0]["path"]), Path(summaries[1]["path"])
    (missing / results.METRICS_FILE).unlink()
    text = (torn / results.METRICS_FILE).read_text()
    (torn / results.METRICS_FILE).write_text(text[:-20])  # a crash mid-line
    build_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "**Skipped 2 unreadable runs**" in report
    assert f"`{missing}: metrics.jsonl is missing`" in report
    assert f"{torn}: metrics.jsonl line" in report and "truncated or damaged" in report
    with open(tmp_path / "summary.csv", newline="") as f:
        paths = {r["path"] for r in csv.DictReader(f)}
    assert str(missing) not in paths and str(torn) not in paths
    assert len(paths) == len(summaries) - 2


def test_an_unknown_target_metric_is_refused(tmp_path, capsys):
    make_tree(tmp_path)
    assert main([str(tmp_path), "--target", "val_acuracy=0.9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--target val_acuracy: no run logs it; the runs log" in err and "val_acc" in err
    assert not (tmp_path / "report.md").exists()


def test_a_file_as_path_and_a_folder_without_runs_of_its_own_are_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "notes.txt")]) == 2
    assert "(not a folder)" in capsys.readouterr().err
    make_tree(tmp_path / "results" / "sweep")  # like the repository root above results/
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no runs of its own" in err
    assert str(Path("results") / "sweep") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results"]  # nothing written
    assert main([str(tmp_path / "results" / "sweep")]) == 0  # the results folder itself
    capsys.readouterr()


def test_the_target_mode_of_the_summary_decides_not_the_metric_name(tmp_path):
    """A target on val_loss declared ``mode: max`` (say, a loss that must rise above a
    floor): the report's recomputation follows the declared mode."""
    summaries = make_tree(tmp_path)
    for s in summaries:
        if s["task"] == "tinylm":
            path = Path(s["path"]) / results.SUMMARY_FILE
            data = json.loads(path.read_text())
            data["target"]["mode"] = "max"
            results.write_json(path, data)
    build_report(tmp_path, {"val_loss": 100.0})  # max: no loss is ever >= 100
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "tinylm"]
    assert rows and all(r["target_mode"] == "max" and r["target_step"] == "" for r in rows)
    build_report(tmp_path, {"val_loss": 0.0})  # max: every logged loss is >= 0 at once
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "tinylm"]
    first_eval = min(r["step"] for r in results.read_metrics(rows[0]["path"]) if "val_loss" in r)
    assert all(r["target_step"] == str(first_eval) for r in rows if r["status"] == "finished")


def test_the_table_target_uses_the_declared_mode():
    """A target's declared mode wins over the direction its metric name suggests."""
    import pandas as pd

    from ddc_bench.report.loading import target_text
    from ddc_bench.report.tables import _target_of

    df = pd.DataFrame({"target_metric": ["val_acc"], "target_value": [0.5], "target_mode": ["min"]})
    assert _target_of(df) == ("val_acc", 0.5, "min")
    assert target_text(*_target_of(df)) == "val_acc ≤ 0.5"
    assert target_text(*_target_of(df.assign(target_mode=[None]))) == "val_acc ≥ 0.5"
