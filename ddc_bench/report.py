"""``ddc-bench-report PATH``: aggregate the finished runs under PATH into tables and plots.

Writes, next to the runs (every file atomically; all of them are derived, so they are
regenerated on each call; run folders are only ever read):

* ``PATH/summary.csv``  one row per finished run (the flattened ``summary.json``);
* ``PATH/report.md``    per task, one row per optimizer (and per learning rate / variant
  when those differ): seeds, mean ± std over seeds of the final and best validation
  metrics, the final validation−train gap, steps and time to the target, diverged count,
  step time and throughput; plus the plots;
* ``PATH/summary.tex``  the same tables as LaTeX (``booktabs`` and ``graphicx``);
* ``PATH/plots/*.png``  per task, learning curves (mean over seeds, ±1 std band) and,
  where an optimizer was run at several learning rates, final metric against lr.

Conventions: statistics are over seeds; diverged runs are counted and listed but excluded
from every mean; losses, perplexities and gaps are better when lower, accuracies when
higher. The results layout is known only to :mod:`ddc_bench.results`.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
from matplotlib.transforms import blended_transform_factory

from ddc_bench import results
from ddc_bench.results import higher_is_better

SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"
SUMMARY_TEX = "summary.tex"
PLOTS_DIR = "plots"
#: Suffixes of the plot files this module writes (stale ones are removed on regeneration).
_PLOT_SUFFIXES = ("_curves.png", "_lr.png")

#: Leading columns of summary.csv, in order; metric columns follow, then the rest.
_ID_COLUMNS = ["task", "task_size", "optimizer", "variant", "lr", "weight_decay", "seed",
               "status", "diverged", "steps", "steps_done"]
_TAIL_COLUMNS = ["target_metric", "target_value", "target_step", "target_time_s",
                 "step_time_ms", "units_per_s", "unit", "train_time_s", "wall_time_s",
                 "peak_memory_mb", "git_commit", "device", "path"]
_GROUP_KEYS = ["optimizer", "variant", "lr", "weight_decay"]


class ReportError(ValueError):
    """The report cannot be built (no finished runs, or PATH is not a results folder)."""


class NoFinishedRunsError(ReportError):
    """PATH holds no finished run."""


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

def _metric_sort_key(metric: str) -> tuple[int, int, str]:
    """val_* first (loss, acc, ppl, others), then gap_*, then train_eval_*, then the rest."""
    base_order = {"loss": 0, "acc": 1, "ppl": 2}
    for rank, prefix in enumerate(("val_", "gap_", "train_eval_")):
        if metric.startswith(prefix):
            base = metric[len(prefix):]
            return rank, base_order.get(base, 3), base
    return 3, 0, metric


def _reached(value: float, threshold: float, metric: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value >= threshold if higher_is_better(metric) else value <= threshold


def _target_text(metric: str, value: float) -> str:
    return f"{metric} {'≥' if higher_is_better(metric) else '≤'} {value:g}"


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def _normalise_target(target: dict | None) -> dict[str, float]:
    """``{metric: value}``; ``{"metric": m, "value": v}`` (the summary's shape) also works."""
    if not target:
        return {}
    if set(target) == {"metric", "value"}:
        return {str(target["metric"]): float(target["value"])}
    return {str(k): float(v) for k, v in target.items()}


def _target_from_metrics(records: list[dict[str, Any]], target: dict[str, float]
                         ) -> dict[str, Any] | None:
    """Recompute a run's target from its evaluation lines.

    The first metric of ``target`` that the run logs applies (so one call can give, e.g.,
    ``val_acc`` for classification tasks and ``val_ppl`` for language models).
    """
    for metric, value in target.items():
        lines = [r for r in records if metric in r]
        if not lines:
            continue
        for r in lines:
            if _reached(r[metric], value, metric):
                return {"metric": metric, "value": value, "step": r.get("step"),
                        "time_s": r.get("train_time_s")}
        return {"metric": metric, "value": value, "step": None, "time_s": None}
    return None


def _flatten(summary: dict[str, Any], target_override: dict[str, float],
             records: list[dict[str, Any]] | None) -> dict[str, Any]:
    row: dict[str, Any] = {k: summary.get(k) for k in _ID_COLUMNS}
    row["diverged"] = bool(summary.get("diverged")) or summary.get("status") == "diverged"
    for kind in ("final", "best"):
        for metric, value in (summary.get(kind) or {}).items():
            row[f"{kind}_{metric}"] = value
    target = summary.get("target") or {}
    if target_override:
        target = _target_from_metrics(records or [], target_override) or {}
    row["target_metric"] = target.get("metric")
    row["target_value"] = target.get("value")
    row["target_step"] = target.get("step")
    row["target_time_s"] = target.get("time_s") if target.get("step") is not None else None
    for k in ("step_time_ms", "units_per_s", "unit", "train_time_s", "wall_time_s",
              "peak_memory_mb"):
        row[k] = summary.get(k)
    provenance = summary.get("provenance") or {}
    row["git_commit"] = provenance.get("git_commit")
    row["device"] = provenance.get("device")
    row["path"] = summary["path"]
    return row


def load_runs(root: str | os.PathLike, target: dict | None = None,
              metrics: dict[str, list[dict[str, Any]]] | None = None) -> pd.DataFrame:
    """One row per finished run under ``root`` (the flattened ``summary.json``).

    ``target`` (``{metric: value}``) replaces the runs' own targets; steps and time to it
    are then recomputed from ``metrics.jsonl``. ``metrics``, when given, is a cache
    (run path → records) filled as a side effect.
    """
    override = _normalise_target(target)
    cache = metrics if metrics is not None else {}
    rows = []
    for folder in results.iter_finished_runs(root):
        try:
            summary = results.read_summary(folder)
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping {folder}: unreadable summary ({exc})", stacklevel=2)
            continue
        records = None
        if override:
            records = cache.setdefault(str(folder), results.read_metrics(folder))
        rows.append(_flatten(summary, override, records))
    if not rows:
        return pd.DataFrame(columns=_ID_COLUMNS + _TAIL_COLUMNS)
    df = pd.DataFrame(rows)
    metric_cols = sorted((c for c in df.columns if c.startswith(("final_", "best_"))),
                         key=lambda c: (c.startswith("best_"),
                                        _metric_sort_key(c.split("_", 1)[1])))
    for c in metric_cols + ["lr", "weight_decay", "target_value", "target_time_s",
                            "step_time_ms", "units_per_s", "train_time_s", "wall_time_s",
                            "peak_memory_mb"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("seed", "steps", "steps_done", "target_step"):  # integers, NA where missing
        col = pd.to_numeric(df[c], errors="coerce")
        if (col.dropna() % 1 == 0).all():
            df[c] = col.astype("Int64")
    df = df[_ID_COLUMNS + metric_cols + _TAIL_COLUMNS]
    df = df.sort_values(["task", "task_size", "optimizer", "lr", "variant", "seed"],
                        na_position="last", kind="stable").reset_index(drop=True)
    return df


def _task_label(task: Any, size: Any) -> str:
    return f"{task}-{size}" if size not in (None, "") and not pd.isna(size) else str(task)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# --------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------

def _val_metrics(task_df: pd.DataFrame) -> list[str]:
    """The validation metrics the runs of a task report (val_loss, val_acc, val_ppl, ...)."""
    names = {c.split("_", 1)[1] for c in task_df.columns
             if c.startswith("final_") and task_df[c].notna().any()}
    return sorted((m for m in names if m.startswith("val_")), key=_metric_sort_key)


def aggregate_task(task_df: pd.DataFrame) -> pd.DataFrame:
    """Numeric per-configuration statistics of one task (one row per group of seeds).

    A group is one optimizer × variant × lr × weight decay (the configuration identity;
    seeds are its repetitions). Means, stds (ddof=1) and target statistics use the
    non-diverged runs only; ``seeds`` counts all runs and ``diverged`` the diverged ones.
    """
    metrics = _val_metrics(task_df)
    gap = "final_gap_loss" if "final_gap_loss" in task_df and \
        task_df["final_gap_loss"].notna().any() else None
    value_cols = [f"{k}_{m}" for m in metrics for k in ("final", "best")]
    if gap:
        value_cols.append(gap)
    out = []
    for key, g in task_df.groupby(_GROUP_KEYS, dropna=False, sort=True):
        ok = g[~g["diverged"].astype(bool)]
        row: dict[str, Any] = dict(zip(_GROUP_KEYS, key))
        row["seeds"] = len(g)
        row["diverged"] = int(g["diverged"].astype(bool).sum())
        row["unit"] = next((u for u in g["unit"] if isinstance(u, str) and u), None)
        for c in value_cols:
            vals = ok[c].dropna()
            row[f"{c}__mean"] = vals.mean() if len(vals) else np.nan
            row[f"{c}__std"] = vals.std(ddof=1) if len(vals) > 1 else np.nan
            row[f"{c}__n"] = len(vals)
        reached = ok[ok["target_step"].notna()]
        row["target_reached"] = len(reached)
        row["target_steps__mean"] = reached["target_step"].mean() if len(reached) else np.nan
        row["target_time_s__mean"] = (reached["target_time_s"].mean()
                                      if reached["target_time_s"].notna().any() else np.nan)
        for c in ("step_time_ms", "units_per_s", "wall_time_s"):
            vals = ok[c].dropna()
            row[f"{c}__mean"] = vals.mean() if len(vals) else np.nan
        out.append(row)
    agg = pd.DataFrame(out)
    agg.attrs["value_cols"] = value_cols
    agg.attrs["metrics"] = metrics
    return agg


def _task_target(task_df: pd.DataFrame) -> tuple[str, float] | None | str:
    """The task's single target, None when no run has one, "mixed" when runs disagree."""
    t = task_df[task_df["target_metric"].notna()]
    pairs = {(m, float(v)) for m, v in zip(t["target_metric"], t["target_value"])}
    if not pairs:
        return None
    if len(pairs) > 1:
        return "mixed"
    return next(iter(pairs))


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------

def _decimals(x: float, sig: int = 4) -> int:
    if not _finite(x) or x == 0:
        return sig - 1
    return int(min(max(sig - 1 - math.floor(math.log10(abs(x))), 0), 8))


def _fmt_mean_std(mean: float, std: float) -> str:
    if not _finite(mean):
        return "—"
    d = _decimals(mean)
    text = f"{mean:.{d}f}"
    if _finite(std):
        text += f" ± {std:.{d}f}"
    return text


def _fmt_num(x: float, sig: int = 3) -> str:
    if not _finite(x):
        return "—"
    if abs(x) >= 10 ** sig:
        return f"{x:,.0f}"
    return f"{x:.{_decimals(x, sig)}f}"


def _fmt_lr(x: float) -> str:
    return f"{x:g}" if _finite(x) else "—"


def _fmt_lr_tick(x: float) -> str:
    """Compact lr tick label: 3e-4, 0.01, 0.3, 1."""
    if 0 < x < 0.01:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{x:g}"


def _best_mask(values: pd.Series, higher: bool) -> pd.Series:
    """True where ``values`` holds the best finite value (only with two or more values)."""
    finite = values[np.isfinite(values.astype(float))]
    if len(finite) < 2:
        return pd.Series(False, index=values.index)
    best = finite.max() if higher else finite.min()
    return values.astype(float) == best


def _display_table(task_df: pd.DataFrame, agg: pd.DataFrame
                   ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The human table of one task: cell texts, a same-shaped bold mask, and notes."""
    notes: list[str] = []
    cells: dict[str, list[str]] = {}
    bold: dict[str, pd.Series] = {}
    false = pd.Series(False, index=agg.index)

    cells["optimizer"] = list(agg["optimizer"].astype(str))
    custom = [v for v, lr in zip(agg["variant"], agg["lr"])
              if _finite(lr) and v != results.default_variant(float(lr))]
    if custom:
        cells["variant"] = list(agg["variant"].astype(str))
    cells["lr"] = [_fmt_lr(x) for x in agg["lr"]]
    if agg["weight_decay"].nunique(dropna=False) > 1:
        cells["wd"] = [_fmt_lr(x) for x in agg["weight_decay"]]
    cells["seeds"] = [str(n) for n in agg["seeds"]]
    cells["diverged"] = [str(n) for n in agg["diverged"]]

    for c in agg.attrs["value_cols"]:
        kind, metric = c.split("_", 1)
        arrow = "↑" if higher_is_better(metric) else "↓"
        header = f"gap (val−train loss) {arrow}" if metric == "gap_loss" \
            else f"{kind} {metric} {arrow}"
        cells[header] = [_fmt_mean_std(m, s) for m, s in
                         zip(agg[f"{c}__mean"], agg[f"{c}__std"])]
        bold[header] = _best_mask(agg[f"{c}__mean"], higher_is_better(metric))

    target = _task_target(task_df)
    if target is not None:
        if target == "mixed":
            t = task_df[task_df["target_metric"].notna()]
            pairs = sorted({(m, float(v)) for m, v in
                            zip(t["target_metric"], t["target_value"])})
            notes.append("Runs of this task were given different targets ("
                         + "; ".join(_target_text(m, v) for m, v in pairs)
                         + "); pass `--target METRIC=VALUE` to compare them on one.")
            name = "target"
        else:
            name = _target_text(*target)
            notes.append(f"Target: {name}.")
        steps_h, time_h = f"steps to {name}", "time to target (s)"
        cells[steps_h] = [f"{x:,.0f}" if _finite(x) else "—" for x in agg["target_steps__mean"]]
        cells[time_h] = [_fmt_num(x) for x in agg["target_time_s__mean"]]
        cells["reached"] = [f"{k}/{n}" for k, n in zip(agg["target_reached"], agg["seeds"])]
        bold[steps_h] = _best_mask(agg["target_steps__mean"], higher=False)
        bold[time_h] = _best_mask(agg["target_time_s__mean"], higher=False)

    cells["step time (ms) ↓"] = [_fmt_num(x) for x in agg["step_time_ms__mean"]]
    bold["step time (ms) ↓"] = _best_mask(agg["step_time_ms__mean"], higher=False)
    units = {u for u in agg["unit"] if isinstance(u, str)}
    thr = f"throughput ({units.pop()}/s) ↑" if len(units) == 1 else "throughput (units/s) ↑"
    cells[thr] = [_fmt_num(x) for x in agg["units_per_s__mean"]]
    bold[thr] = _best_mask(agg["units_per_s__mean"], higher=True)

    table = pd.DataFrame(cells, index=agg.index)
    mask = pd.DataFrame({c: bold.get(c, false) for c in table.columns}, index=agg.index)
    return table, mask.fillna(False).astype(bool), notes


def _to_markdown(table: pd.DataFrame, mask: pd.DataFrame) -> str:
    shown = table.copy()
    for c in table.columns:
        shown[c] = [f"**{t}**" if b else t for t, b in zip(table[c], mask[c])]
    align = ["left" if c in ("optimizer", "variant") else "right" for c in shown.columns]
    # disable_numparse: cells are already formatted ("0.9080" must not become "0.908").
    return shown.to_markdown(index=False, colalign=align, disable_numparse=True)


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}
_TEX_SYMBOLS = {"±": r"$\pm$", "—": "--", "−": "$-$", "≥": r"$\geq$", "≤": r"$\leq$",
                "↑": r"$\uparrow$", "↓": r"$\downarrow$", "×": r"$\times$"}


def _tex(text: str) -> str:
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))
    for sym, rep in _TEX_SYMBOLS.items():
        out = out.replace(sym, rep)
    return out


def _to_latex(table: pd.DataFrame, mask: pd.DataFrame, caption: str, label: str) -> str:
    shown = pd.DataFrame({_tex(c): [rf"\textbf{{{_tex(t)}}}" if b else _tex(t)
                                    for t, b in zip(table[c], mask[c])]
                          for c in table.columns})
    fmt = "".join("l" if c in ("optimizer", "variant") else "r" for c in table.columns)
    try:
        body = shown.to_latex(index=False, escape=False, column_format=fmt)
    except ImportError:  # DataFrame.to_latex needs jinja2; fall back to hand formatting
        lines = [rf"\begin{{tabular}}{{{fmt}}}", r"\toprule",
                 " & ".join(shown.columns) + r" \\", r"\midrule"]
        lines += [" & ".join(row) + r" \\" for row in shown.itertuples(index=False)]
        lines += [r"\bottomrule", r"\end{tabular}", ""]
        body = "\n".join(lines)
    return "\n".join([r"\begin{table}[htbp]", r"\centering", r"\small",
                      r"\resizebox{\textwidth}{!}{%", body.rstrip("\n") + "%", "}",
                      rf"\caption{{{caption}}}", rf"\label{{{label}}}", r"\end{table}", ""])


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#7f7f7f", "#bcbd22"]


def _colors(optimizers: Iterable[str]) -> dict[str, str]:
    return {opt: _PALETTE[i % len(_PALETTE)] for i, opt in enumerate(sorted(set(optimizers)))}


def _series(records: list[dict[str, Any]], metric: str) -> pd.Series:
    """``metric`` against step over the lines that log it (null → NaN), last line wins."""
    pairs = [(r["step"], r[metric]) for r in records if metric in r and "step" in r]
    if not pairs:
        return pd.Series(dtype=float)
    steps, vals = zip(*pairs)
    s = pd.Series(pd.to_numeric(pd.Series(vals), errors="coerce").to_numpy(dtype=float),
                  index=pd.Index(steps, name="step"))
    s = s[~s.index.duplicated(keep="last")].sort_index()
    return s.replace([np.inf, -np.inf], np.nan)


def _primary_metric(metrics: list[str]) -> str:
    """The metric that ranks configurations: val_acc when there is one, else val_loss."""
    for m in ("val_acc", "val_loss", "val_ppl"):
        if m in metrics:
            return m
    return metrics[0] if metrics else "val_loss"


def _group_label(row: pd.Series, multi: bool) -> str:
    label = str(row["optimizer"])
    if multi:
        lr = row["lr"]
        custom = _finite(lr) and row["variant"] != results.default_variant(float(lr))
        label += f" {row['variant']}" if custom else f" lr={_fmt_lr(lr)}"
    return label


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=110)
    results.atomic_write_bytes(path, buf.getvalue())


def _limits(lows: list[float], highs: list[float], log: bool) -> tuple[float, float] | None:
    lo = [x for x in lows if _finite(x) and (x > 0 or not log)]
    hi = [x for x in highs if _finite(x) and (x > 0 or not log)]
    if not lo or not hi:
        return None
    a, b = min(lo), max(hi)
    if log:
        la, lb = math.log10(a), math.log10(b)
        pad = 0.05 * (lb - la) or 0.05
        return 10 ** (la - pad), 10 ** (lb + pad)
    pad = 0.05 * (b - a) or 0.05 * abs(b) or 0.05
    return a - pad, b + pad


def _legend_below(fig: Figure, axes: Any) -> None:
    """One legend for the figure, under the panels, so it never hides a curve."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center",
                   ncol=min(len(labels), 4), fontsize=9, frameon=False)


def _log_y(ax: Any, lim: tuple[float, float] | None) -> None:
    """Log y axis with plain tick labels (0.3, 0.5, 1, 2) instead of 3×10⁻¹."""
    ax.set_yscale("log")
    decades = math.log10(lim[1] / lim[0]) if lim else 3.0
    subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0) if decades > 1.2 else \
        (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator() if len(subs) > 1 else
                               LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_curves(task: str, task_df: pd.DataFrame, agg: pd.DataFrame,
                 metrics: dict[str, list[dict[str, Any]]], colors: dict[str, str],
                 path: Path) -> Path | None:
    """Validation loss, training loss and the other validation metrics against step."""
    records = {p: metrics.setdefault(p, results.read_metrics(p)) for p in task_df["path"]}
    logged = {k for recs in records.values() for r in recs for k in r}
    train_key = "train_eval_loss" if "train_eval_loss" in logged else "loss"
    panels = [("val_loss", "validation loss"),
              (train_key, "training loss" + (" (fixed train subset)"
                                             if train_key == "train_eval_loss"
                                             else " (minibatch)"))]
    panels += [(m, f"validation {m[4:]}") for m in agg.attrs["metrics"]
               if m not in ("val_loss", "val_ppl")]  # ppl = exp(loss): no new information
    panels = [(m, t) for m, t in panels if m in logged]
    if not panels:
        return None

    # One line per optimizer: the best of its configurations when it has several.
    primary = _primary_metric(agg.attrs["metrics"])
    score = agg.get(f"final_{primary}__mean", pd.Series(np.nan, index=agg.index))
    chosen, notes = [], []
    for opt, g in agg.groupby("optimizer", sort=True):
        if len(g) > 1:
            s = score[g.index]
            best = (s.idxmax() if higher_is_better(primary) else s.idxmin()) \
                if s.notna().any() else g.index[0]
            chosen.append((best, True))
            notes.append(opt)
        else:
            chosen.append((g.index[0], False))

    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, panels):
        lows, highs, ends, diverged_pts = [], [], [], []
        for idx, multi in chosen:
            row = agg.loc[idx]
            sel = task_df
            for k in _GROUP_KEYS:
                sel = sel[(sel[k] == row[k]) | (sel[k].isna() & pd.isna(row[k]))]
            color = colors[row["optimizer"]]
            ok = sel[~sel["diverged"].astype(bool)]
            runs = {p: _series(records[p], metric) for p in ok["path"]}
            runs = {p: s for p, s in runs.items() if len(s)}
            if runs:
                frame = pd.concat(runs, axis=1).sort_index()
                mean = frame.mean(axis=1)
                std = frame.std(axis=1, ddof=1)
                label = _group_label(row, multi) + f" (n={len(runs)})"
                ax.plot(mean.index, mean.to_numpy(), color=color, lw=1.8, label=label)
                if len(runs) > 1:
                    ax.fill_between(mean.index, (mean - std).to_numpy(),
                                    (mean + std).to_numpy(), color=color, alpha=0.2, lw=0)
                    lows.extend((mean - std).tolist())
                    highs.extend((mean + std).tolist())
                else:
                    lows.extend(mean.tolist())
                    highs.extend(mean.tolist())
                ends.append((mean.dropna().iloc[-1] if mean.notna().any() else np.nan, color))
            for p in sel[sel["diverged"].astype(bool)]["path"]:
                s = _series(records[p], metric).dropna()
                if len(s):
                    ax.plot(s.index, s.to_numpy(), color=color, lw=0.9, ls=":", alpha=0.8)
                    diverged_pts.append((s.index[-1], s.iloc[-1], color))
        log = metric.endswith(("loss", "ppl")) and all(x > 0 for x in lows if _finite(x)) \
            and _finite(max((x for x in highs if _finite(x)), default=np.nan)) \
            and max(x for x in highs if _finite(x)) / max(
                min((x for x in lows if _finite(x) and x > 0), default=1e-12), 1e-12) > 5
        lim = _limits(lows, highs, log)
        if lim:
            ax.set_ylim(*lim)
        if log:
            _log_y(ax, lim)
        for step, val, color in diverged_pts:
            y = min(max(val, lim[0]), lim[1]) if lim else val
            ax.plot([step], [y], marker="x", ms=9, mew=2, color=color, ls="none",
                    clip_on=False)
        if diverged_pts:
            ax.plot([], [], color="0.3", ls=":", marker="x", label="diverged run (excluded)")
        if not lows:
            ax.text(0.5, 0.5, "no non-diverged run logs this metric", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    _legend_below(fig, axes)
    sub = "mean over seeds, band = ±1 std; diverged runs dotted, excluded from the mean"
    if notes:
        sub += f"\nbest configuration of {', '.join(notes)} (by final {primary})"
    fig.suptitle(f"{task}: learning curves\n{sub}", fontsize=11)
    _save(fig, path)
    return path


def _plot_lr(task: str, task_df: pd.DataFrame, agg: pd.DataFrame, colors: dict[str, str],
             path: Path) -> Path | None:
    """Final validation metrics against learning rate, one line per optimizer."""
    if not (task_df.groupby("optimizer")["lr"].nunique() > 1).any():
        return None
    metrics = ["val_loss"] + [m for m in agg.attrs["metrics"] if m not in ("val_loss", "val_ppl")]
    metrics = [m for m in metrics if f"final_{m}__mean" in agg]
    if not metrics:
        return None
    wd_varies = agg["weight_decay"].nunique(dropna=False) > 1
    lines = list(agg.groupby(["optimizer", "weight_decay"], dropna=False, sort=True))
    # Lines sharing an lr would hide each other: shift each a little along the log x axis.
    dodge = {key: 10 ** (0.03 * (i - (len(lines) - 1) / 2)) for i, (key, _) in
             enumerate(lines)}
    tested = sorted(x for x in agg["lr"].unique() if _finite(x) and x > 0)
    fig = Figure(figsize=(5.4 * len(metrics), 4.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        top = blended_transform_factory(ax.transData, ax.transAxes)
        any_all_diverged = False
        for (opt, wd), g in lines:
            g = g.sort_values("lr")
            color = colors[opt]
            label = opt + (f" wd={_fmt_lr(wd)}" if wd_varies else "")
            mean, std = g[f"final_{metric}__mean"], g[f"final_{metric}__std"]
            xs = g["lr"] * dodge[(opt, wd)]
            ax.errorbar(xs, mean, yerr=std.fillna(0), color=color, marker="o", ms=5,
                        capsize=4, lw=1.6, label=label)
            for lr, m, d, n in zip(xs, mean, g["diverged"], g["seeds"]):
                if d and _finite(m):
                    ax.annotate(f"{d}/{n} div.", (lr, m), textcoords="offset points",
                                xytext=(5, 5), fontsize=7, color=color)
                elif d and not _finite(m):
                    any_all_diverged = True
                    ax.plot([lr], [0.97], transform=top, marker="x", ms=10, mew=2.2,
                            color=color, ls="none", clip_on=False)
        if any_all_diverged:
            ax.plot([], [], color="0.3", marker="x", ls="none", label="all seeds diverged")
        ax.set_xscale("log")
        ax.set_xticks(tested, [_fmt_lr_tick(x) for x in tested],
                      rotation=30 if len(tested) > 6 else 0)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(tested) > 1:
            span = math.log10(tested[-1] / tested[0])
            pad = 10 ** max(0.1 * span, 0.15)
            ax.set_xlim(tested[0] / pad, tested[-1] * pad)
        arrow = "higher is better" if higher_is_better(metric) else "lower is better"
        ax.set_title(f"final {metric} ({arrow})")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(f"final {metric}")
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    _legend_below(fig, axes)
    fig.suptitle(f"{task}: learning-rate sensitivity\nmean over non-diverged seeds, "
                 f"error bars = ±1 std\n(points shifted slightly along x to stay visible)",
                 fontsize=11)
    _save(fig, path)
    return path


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

def _check_root(root: Path, df: pd.DataFrame) -> None:
    if results.is_finished(root):
        raise ReportError(f"{root} is a run folder; point ddc-bench-report at a folder "
                          f"above it (report files are never written into run folders)")
    plots = (root / PLOTS_DIR).resolve()
    for p in df["path"]:
        rp = Path(p).resolve()
        if rp == plots or plots in rp.parents:
            raise ReportError(f"{root / PLOTS_DIR} holds runs; it cannot be used for plots "
                              f"(point ddc-bench-report at a folder above it)")


def build_report(root: str | os.PathLike, target: dict | None = None) -> dict[str, Path]:
    """Aggregate the finished runs under ``root``; return what was written.

    Keys of the returned dict are the written files' paths relative to ``root``
    (``"summary.csv"``, ``"report.md"``, ``"summary.tex"``, ``"plots/<task>_curves.png"``,
    ``"plots/<task>_lr.png"``). ``target`` (``{metric: value}``; the first metric a run
    logs applies to it) replaces the runs' own targets. Raises :class:`NoFinishedRunsError`
    when ``root`` holds no finished run.
    """
    root = Path(root)
    if not root.is_dir():
        raise NoFinishedRunsError(f"no finished runs under {root} (no such folder)")
    override = _normalise_target(target)
    metrics_cache: dict[str, list[dict[str, Any]]] = {}
    df = load_runs(root, override, metrics_cache)
    if df.empty:
        raise NoFinishedRunsError(f"no finished runs under {root}")
    _check_root(root, df)

    written: dict[str, Path] = {}
    csv_path = root / SUMMARY_CSV
    results.atomic_write_text(csv_path, df.to_csv(index=False))
    written[SUMMARY_CSV] = csv_path

    plots_dir = root / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    colors = _colors(df["optimizer"].astype(str))
    df = df.assign(task_label=[_task_label(t, s) for t, s in zip(df["task"], df["task_size"])])

    n_div = int(df["diverged"].sum())
    md = ["# ddc-bench report", "",
          f"Results: `{root}` — {len(df)} finished run{'s' * (len(df) != 1)} "
          f"({n_div} diverged), {df['task_label'].nunique()} task(s), "
          f"optimizers: {', '.join(sorted(df['optimizer'].astype(str).unique()))}. "
          f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `ddc-bench-report`.",
          "",
          "How to read the tables:",
          "",
          "- One row per optimizer configuration (optimizer × learning rate, and × variant "
          "or weight decay where those differ); *seeds* counts all its finished runs.",
          "- Metrics are **mean ± std over seeds** (sample std, ddof=1; no ± with a single "
          "seed); *final* is the last evaluation, *best* the best one. ↓ lower is better, "
          "↑ higher is better; **bold** marks the best value of each column.",
          "- **Diverged runs** (status `diverged`) are counted in *diverged* and listed below "
          "each table, and are **excluded from every mean and std** (their final metrics "
          "may be undefined).",
          "- *steps/time to target*: mean over the non-diverged seeds that reached the "
          "target; *reached* = k/n of all seeds (a diverged seed counts as not reached). "
          "Time is training time (evaluation excluded).",
          "- *gap* is the final validation loss minus the training loss on a fixed train "
          "subset. Step time and throughput are means over the non-diverged seeds.",
          "- Unfinished runs (no `summary.json`) are ignored. Per-run values: "
          f"[`{SUMMARY_CSV}`]({SUMMARY_CSV}); LaTeX tables: [`{SUMMARY_TEX}`]({SUMMARY_TEX}).",
          ""]
    if override:
        md += ["Targets from `--target`: " + ", ".join(_target_text(m, v)
                                                       for m, v in override.items())
               + " (steps and time to target recomputed from `metrics.jsonl`).", ""]
        unused = [m for m in override if m not in set(df["target_metric"].dropna())]
        if unused:
            md += [f"No run logs {', '.join(f'`{m}`' for m in unused)}: that target was "
                   f"not applied.", ""]
    tex = ["% ddc-bench report tables, generated by ddc-bench-report.",
           r"% Requires \usepackage{booktabs} and \usepackage{graphicx}.",
           "% Mean $\\pm$ std over seeds; diverged runs excluded from the means.", ""]

    for task, task_df in df.groupby("task_label", sort=True):
        agg = aggregate_task(task_df)
        table, mask, notes = _display_table(task_df, agg)
        md += [f"## {task}", ""]
        n_task_div = int(task_df["diverged"].sum())
        md += [" ".join([f"{len(task_df)} finished run{'s' * (len(task_df) != 1)}, "
                         f"{n_task_div} diverged."] + notes), ""]
        md += [_to_markdown(table, mask), ""]
        div = task_df[task_df["diverged"].astype(bool)]
        if len(div):
            md += ["Diverged runs (excluded from the means):", ""]
            for _, r in div.iterrows():
                stop = (f"stopped at step {int(r['steps_done'])}"
                        if _finite(r["steps_done"]) else "stopped")
                planned = f" of {int(r['steps'])}" if _finite(r["steps"]) else ""
                where = Path(r["path"])
                if where.is_relative_to(root):
                    where = where.relative_to(root)
                md.append(f"- {r['optimizer']} lr={_fmt_lr(r['lr'])} seed {r['seed']}: "
                          f"{stop}{planned} (`{where.as_posix()}`)")
            md.append("")
        stem = _safe_name(task)
        curves = _plot_curves(task, task_df, agg, metrics_cache, colors,
                              plots_dir / f"{stem}_curves.png")
        lr_plot = _plot_lr(task, task_df, agg, colors, plots_dir / f"{stem}_lr.png")
        for p, alt in ((curves, "learning curves"), (lr_plot, "final metric vs learning rate")):
            if p is not None:
                rel = p.relative_to(root).as_posix()
                written[rel] = p
                md += [f"![{task}: {alt}]({rel})", ""]
        tex.append(_to_latex(table, mask, caption=_tex(
            f"{task}: mean ± std over seeds (diverged runs excluded). " + " ".join(notes)),
            label=f"tab:ddc-bench-{stem}"))

    # Plots of tasks no longer present are stale derived files: remove them.
    for p in plots_dir.iterdir():
        if p.name.endswith(_PLOT_SUFFIXES) and p.relative_to(root).as_posix() not in written:
            p.unlink()

    md_path, tex_path = root / REPORT_MD, root / SUMMARY_TEX
    results.atomic_write_text(md_path, "\n".join(md).rstrip("\n") + "\n")
    results.atomic_write_text(tex_path, "\n".join(tex))
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


if __name__ == "__main__":
    sys.exit(main())
