"""``build_report`` and the ``ddc-bench-report`` command: loading → selection → tables,
plots and the performance profile → ``report.md``, ``summary.csv``, ``summary.tex``,
``plots/``. See :mod:`ddc_bench.report` for what each file holds.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ddc_bench import results
from ddc_bench.report import profile
from ddc_bench.report.loading import finite, load_runs, normalise_target, target_text, task_label
from ddc_bench.report.plots import colors_for, plot_curves, plot_diagnostics, plot_lr, save_png
from ddc_bench.report.selection import (aggregate_task, compare_to_best, rank_selected,
                                        select_best, selection_metric)
from ddc_bench.report.tables import (SELECTED_MARK, all_settings_table, fmt_lr,
                                     selected_table, tex, to_latex, to_markdown)

SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"
SUMMARY_TEX = "summary.tex"
PLOTS_DIR = "plots"
PROFILE_PNG = "performance_profile.png"
#: Suffixes of the plot files this package writes (stale ones are removed on regeneration).
_PLOT_SUFFIXES = ("_curves.png", "_lr.png", PROFILE_PNG)


class ReportError(ValueError):
    """The report cannot be built (no finished runs, PATH is not a results folder, or the
    report cannot be written there)."""


class NoFinishedRunsError(ReportError):
    """PATH holds no finished run."""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _check_root(root: Path, df: pd.DataFrame) -> None:
    if results.is_finished(root):
        raise ReportError(f"{root} is a run folder; point ddc-bench-report at a folder "
                          f"above it (report files are never written into run folders)")
    # A run lives at <results_dir>/<task>-<size>/<optimizer>/<variant>/seed<S>: PATH must be
    # a results_dir or a folder inside one, not a folder that merely contains results
    # folders (the repository root): the report's files would land among other things.
    here = root.resolve()
    homes = sorted({Path(p).resolve().parents[3] for p in df["path"]})
    if not any(here == home or home in here.parents for home in homes):
        shown = ", ".join(str(h.relative_to(here)) if here in h.parents else str(h)
                          for h in homes[:3])
        raise NoFinishedRunsError(
            f"{root} holds no runs of its own (runs are in results folders below it: "
            f"{shown}{', ...' if len(homes) > 3 else ''}); point ddc-bench-report at one of them")
    plots = (root / PLOTS_DIR).resolve()
    for p in df["path"]:
        rp = Path(p).resolve()
        if rp == plots or plots in rp.parents:
            raise ReportError(f"{root / PLOTS_DIR} holds runs; it cannot be used for plots "
                              f"(point ddc-bench-report at a folder above it)")


def _check_target_metrics(override: dict[str, float],
                          metrics_cache: dict[str, list[dict[str, Any]]]) -> None:
    """Every ``--target`` metric must be one that some run logs (a misspelt metric would
    otherwise change nothing)."""
    logged = {k for records in metrics_cache.values() for r in records for k in r
              if k not in ("step", "train_time_s", "lr", "loss", "units_per_s")}
    unknown = [m for m in override if m not in logged]
    if unknown:
        raise ReportError(f"--target {', '.join(unknown)}: no run logs it; the runs log "
                          f"{', '.join(sorted(logged)) or 'no evaluation metric'}")


def _intro(root: Path, df: pd.DataFrame, override: dict[str, float]) -> list[str]:
    n_div = int(df["diverged"].sum())
    md = ["# ddc-bench report", "",
          f"Results: `{root}` — {len(df)} finished run{'s' * (len(df) != 1)} "
          f"({n_div} diverged), {df['task_label'].nunique()} task(s), "
          f"optimizers: {', '.join(sorted(df['optimizer'].astype(str).unique()))}. "
          f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `ddc-bench-report`.",
          "",
          "How to read it:",
          "",
          "- A *setting* is one optimizer configuration: the keys a sweep varied (e.g. "
          "`lr_mult`, `optimizer.weight_decay`); *lr* is the effective learning rate "
          "(the optimizer's own lr × `lr_mult`). Its seeds are repetitions.",
          "- **Selection**: per task and optimizer, the setting with the best mean (over "
          "seeds) final **validation** metric named in the task's section; settings with a "
          "diverged seed only when all have one. Test splits are never used to select; test "
          "numbers appear for the selected settings only.",
          "- *Selected settings* table: one row per optimizer, best first: mean ± std over "
          "seeds (sample std, ddof=1), a 95% Student-t confidence interval of the mean, and "
          "a Welch t-test of the difference to the best optimizer: *within seed noise* when "
          "p ≥ 0.05, i.e. the seeds do not separate the two. The selected mean is "
          "slightly optimistic: the same seeds chose the setting.",
          f"- *All settings* table: every setting; {SELECTED_MARK} marks the selected ones. "
          "*final* is the last evaluation, *best* the best one. ↓ lower is better, ↑ higher "
          "is better; **bold** marks the best value of each column.",
          "- **Diverged runs** are counted in *diverged*, listed below each table, and "
          "**excluded from every mean and std**.",
          "- *steps/time to target*: mean over the non-diverged seeds that reached the "
          "target; *reached* = k/n of all seeds. Time is training time (evaluation excluded). "
          "The cross-task *time to target* and performance profile follow AlgoPerf (see its "
          "section).",
          "- Per-run values: "
          f"[`{SUMMARY_CSV}`]({SUMMARY_CSV}); LaTeX tables: [`{SUMMARY_TEX}`]({SUMMARY_TEX}).",
          ""]
    if override:
        md += ["Targets from `--target`: " + ", ".join(target_text(m, v)
                                                       for m, v in override.items())
               + " (steps and time to target recomputed from `metrics.jsonl`).", ""]
        unused = [m for m in override if m not in set(df["target_metric"].dropna())]
        if unused:
            md += [f"No run logs {', '.join(f'`{m}`' for m in unused)}: that target was "
                   f"not applied.", ""]
    return md


def _diverged_lines(root: Path, task_df: pd.DataFrame) -> list[str]:
    div = task_df[task_df["diverged"].astype(bool)]
    if not len(div):
        return []
    md = ["Diverged runs (excluded from the means):", ""]
    for _, r in div.iterrows():
        stop = (f"stopped at step {int(r['steps_done'])}"
                if finite(r["steps_done"]) else "stopped")
        planned = f" of {int(r['steps'])}" if finite(r["steps"]) else ""
        where = Path(r["path"])
        if where.is_relative_to(root):
            where = where.relative_to(root)
        md.append(f"- {r['optimizer']} lr={fmt_lr(r['lr'])} seed {r['seed']}: "
                  f"{stop}{planned} (`{where.as_posix()}`)")
    return md + [""]


def _task_section(root: Path, task: str, task_df: pd.DataFrame, plots_dir: Path,
                  metrics_cache: dict[str, list[dict[str, Any]]], colors: dict[str, str],
                  written: dict[str, Path]) -> tuple[list[str], list[str]]:
    """The Markdown and LaTeX of one task (its plots are written on the way)."""
    agg = aggregate_task(task_df)
    metric = selection_metric(task_df)
    chosen = select_best(agg, metric)
    table, mask, notes = all_settings_table(task_df, agg, chosen)
    n_div = int(task_df["diverged"].sum())
    md = [f"## {task}", "",
          " ".join([f"{len(task_df)} finished run{'s' * (len(task_df) != 1)}, "
                    f"{n_div} diverged, {len(agg)} setting{'s' * (len(agg) != 1)}."] + notes),
          ""]
    stem = _safe_name(task)
    tex_out = []
    if chosen:
        ranked = rank_selected(agg, chosen, metric)
        comparisons = compare_to_best(task_df, agg, chosen, metric)
        sel, sel_mask = selected_table(agg, chosen, ranked, metric, comparisons)
        md += [f"### Selected settings (best mean final {metric} on validation)", "",
               to_markdown(sel, sel_mask), ""]
        if len(ranked) > 1:
            cmp = comparisons[ranked[1]]
            verdict = ("too few seeds to tell them apart" if cmp.within_noise is None else
                       f"the difference is within seed noise (Welch t-test p = "
                       f"{cmp.p_value:.2g}, 95% CI of the difference [{cmp.ci95[0]:.4g}, "
                       f"{cmp.ci95[1]:.4g}])" if cmp.within_noise else
                       f"the difference exceeds seed noise (Welch t-test p = "
                       f"{cmp.p_value:.2g}, 95% CI of the difference [{cmp.ci95[0]:.4g}, "
                       f"{cmp.ci95[1]:.4g}])")
            md += [f"Best: **{ranked[0]}**; runner-up {ranked[1]}: {verdict}.", ""]
        tex_out.append(to_latex(sel, sel_mask, caption=tex(
            f"{task}: each optimizer's selected setting (best mean final {metric} on "
            f"validation); mean ± std and 95% CI over seeds; Welch t-test against the best."),
            label=f"tab:ddc-bench-{stem}-selected"))
    else:
        md += ["No setting has a finite validation metric to select on.", ""]
    md += ["### All settings", "", to_markdown(table, mask), ""]
    md += _diverged_lines(root, task_df)
    curves = plot_curves(task, task_df, agg, chosen, metric, metrics_cache, colors,
                         plots_dir / f"{stem}_curves.png")
    lr_plot = plot_lr(task, task_df, agg, chosen, colors, plots_dir / f"{stem}_lr.png")
    diag_plot = plot_diagnostics(task, task_df, agg, chosen, metrics_cache, colors,
                                 plots_dir / f"{stem}_diagnostics.png")
    for p, alt in ((curves, "learning curves of the selected settings"),
                   (lr_plot, "final metric vs effective learning rate"),
                   (diag_plot, "dead-direction diagnostics over steps")):
        if p is not None:
            rel = p.relative_to(root).as_posix()
            written[rel] = p
            md += [f"![{task}: {alt}]({rel})", ""]
    tex_out.append(to_latex(table, mask, caption=tex(
        f"{task}: every setting, mean ± std over seeds (diverged runs excluded); "
        f"{SELECTED_MARK} = selected. " + " ".join(notes)), label=f"tab:ddc-bench-{stem}"))
    return md, tex_out


def _profile_section(root: Path, df: pd.DataFrame, plots_dir: Path, colors: dict[str, str],
                     written: dict[str, Path]) -> list[str]:
    """AlgoPerf-style time and steps to target per task, and the performance profile."""
    if not df["target_metric"].notna().any():
        return []
    times = profile.time_to_target(df, "target_time_s")
    steps = profile.time_to_target(df, "target_step")
    md = ["## Time to target across tasks (AlgoPerf-style)", "",
          "Per task and optimizer: the fastest of its settings, where a setting's time is "
          "the median over its seeds of the training time (steps) at which the task's "
          "target was first reached; a diverged or never-reaching seed counts as ∞ "
          "(AlgoPerf, arXiv 2306.07179). — : the task has no target.", ""]

    def fmt(x: float, unit: str) -> str:
        if pd.isna(x):
            return "—"
        return "∞" if x == float("inf") else f"{x:,.0f}" if unit == "steps" else f"{x:.3g}"

    head = "| task | " + " | ".join(f"{o}: time (s) / steps" for o in times.columns) + " |"
    md += [head, "|" + "---|" * (len(times.columns) + 1)]
    for task in times.index:
        cells = [f"{fmt(times.loc[task, o], 's')} / {fmt(steps.loc[task, o], 'steps')}"
                 for o in times.columns]
        md.append(f"| {task} | " + " | ".join(cells) + " |")
    md.append("")
    if len(times.columns) < 2:
        return md + ["One optimizer only: no performance profile (it compares optimizers).",
                     ""]
    ratios, dropped = profile.performance_ratios(times)
    if dropped:
        md += ["Left out of the profile (no target, or no optimizer reached it): "
               + ", ".join(f"`{t}`" for t in dropped) + ".", ""]
    if ratios.empty:
        return md + ["No task has an optimizer that reached its target: no profile.", ""]
    areas = {o: profile.profile_area(ratios[o]) for o in ratios.columns}
    path = profile.plot_profile(ratios, areas, colors, plots_dir / PROFILE_PNG, save_png)
    rel = path.relative_to(root).as_posix()
    written[rel] = path
    md += [f"Performance profile over {len(ratios)} task(s): ρ(τ) = fraction of tasks on "
           f"which the optimizer reaches the target within τ × the fastest optimizer's "
           f"time. Area = normalised area under ρ on [1, {profile.TAU_MAX:g}] (1: fastest "
           f"everywhere; 0: never within {profile.TAU_MAX:g}×).", "",
           "| optimizer | profile area ↑ |", "|---|---:|"]
    for o in sorted(areas, key=lambda o: -areas[o]):
        md.append(f"| {o} | {areas[o]:.3f} |")
    md += ["", f"![performance profile]({rel})", ""]
    return md


def build_report(root: str | os.PathLike, target: dict | None = None) -> dict[str, Path]:
    """Aggregate the finished runs under ``root``; return what was written.

    Keys of the returned dict are the written files' paths relative to ``root``
    (``"summary.csv"``, ``"report.md"``, ``"summary.tex"``, ``"plots/<task>_curves.png"``,
    ``"plots/<task>_lr.png"``, ``"plots/performance_profile.png"``). ``target``
    (``{metric: value}``; the first metric a run logs applies to it) replaces the runs' own
    targets. Runs that cannot be read are skipped and listed in ``report.md``. Raises
    :class:`NoFinishedRunsError` when ``root`` holds no readable finished run, and
    :class:`ReportError` when the report cannot be written there.
    """
    root = Path(root)
    if not root.is_dir():
        why = "not a folder" if root.exists() else "no such folder"
        raise NoFinishedRunsError(f"no finished runs under {root} ({why})")
    override = normalise_target(target)
    metrics_cache: dict[str, list[dict[str, Any]]] = {}
    skipped: list[str] = []
    df = load_runs(root, override, metrics_cache, skipped)
    if df.empty:
        extra = f" ({len(skipped)} unreadable: {skipped[0]})" if skipped else ""
        raise NoFinishedRunsError(f"no finished runs under {root}{extra}")
    _check_root(root, df)
    _check_target_metrics(override, metrics_cache)
    try:
        return _write(root, df, override, metrics_cache, skipped)
    except PermissionError as exc:
        raise ReportError(f"cannot write the report into {root}: {exc.strerror} "
                          f"({exc.filename}); make it writable or copy the results "
                          f"elsewhere") from None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
            raise ReportError(f"cannot write the report into {root}: {exc.strerror}") from None
        raise


def _write(root: Path, df: pd.DataFrame, override: dict[str, float],
           metrics_cache: dict[str, list[dict[str, Any]]], skipped: list[str]
           ) -> dict[str, Path]:
    written: dict[str, Path] = {}
    csv_path = root / SUMMARY_CSV
    results.atomic_write_text(csv_path, df.to_csv(index=False))
    written[SUMMARY_CSV] = csv_path
    plots_dir = root / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    colors = colors_for(df["optimizer"].astype(str))
    df = df.assign(task_label=[task_label(t, s) for t, s in zip(df["task"], df["task_size"])])

    md = _intro(root, df, override)
    if skipped:
        md += [f"**Skipped {len(skipped)} unreadable run{'s' * (len(skipped) != 1)}** "
               "(left out of every table and plot):", ""]
        md += [f"- `{line}`" for line in skipped] + [""]
    tex_out = ["% ddc-bench report tables, generated by ddc-bench-report.",
               r"% Requires \usepackage{booktabs} and \usepackage{graphicx}.",
               "% Mean $\\pm$ std over seeds; diverged runs excluded from the means.", ""]
    for task, task_df in df.groupby("task_label", sort=True):
        task_md, task_tex = _task_section(root, str(task), task_df, plots_dir, metrics_cache,
                                          colors, written)
        md += task_md
        tex_out += task_tex
    md += _profile_section(root, df, plots_dir, colors, written)

    # Plots of tasks no longer present are stale derived files: remove them.
    for p in plots_dir.iterdir():
        if p.name.endswith(_PLOT_SUFFIXES) and p.relative_to(root).as_posix() not in written:
            p.unlink()
    md_path, tex_path = root / REPORT_MD, root / SUMMARY_TEX
    results.atomic_write_text(md_path, "\n".join(md).rstrip("\n") + "\n")
    results.atomic_write_text(tex_path, "\n".join(tex_out))
    written[REPORT_MD] = md_path
    written[SUMMARY_TEX] = tex_path
    return written


def _parse_target(text: str) -> tuple[str, float]:
    metric, sep, value = text.partition("=")
    try:
        if not sep or not metric.strip():
            raise ValueError
        return metric.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected METRIC=VALUE (e.g. val_acc=0.9), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """The ``ddc-bench-report`` command; returns the exit code (2 on a report error)."""
    parser = argparse.ArgumentParser(
        prog="ddc-bench-report",
        description="Aggregate the finished runs under PATH into summary.csv, report.md, "
                    "summary.tex and plots/ (all regenerated; run folders are only read).")
    parser.add_argument("path", metavar="PATH", type=Path, help="a results folder")
    parser.add_argument("--target", metavar="METRIC=VALUE", type=_parse_target,
                        action="append", default=[],
                        help="time-to-target threshold replacing the runs' own (e.g. "
                             "val_acc=0.9; repeatable: the first metric a run logs applies)")
    args = parser.parse_args(argv)
    try:
        written = build_report(args.path, dict(args.target) or None)
    except ReportError as exc:
        print(f"ddc-bench-report: {exc}", file=sys.stderr)
        return 2
    print(f"report: {written[REPORT_MD]}")
    print(f"table:  {written[SUMMARY_CSV]}  {written[SUMMARY_TEX]}")
    for key, path in written.items():
        if key.startswith(f"{PLOTS_DIR}/"):
            print(f"plot:   {path}")
    return 0
