"""Plots of one task: learning curves of each optimizer's selected setting, and
learning-rate sensitivity (final metric against effective learning rate).

The performance profile across tasks is drawn by :mod:`ddc_bench.report.profile`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
from matplotlib.transforms import blended_transform_factory

from ddc_bench import results
from ddc_bench.report.loading import finite as _finite
from ddc_bench.report.selection import rows_of
from ddc_bench.report.stats import seed_stats
from ddc_bench.report.tables import fmt_lr, fmt_lr_tick
from ddc_bench.results import higher_is_better

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#7f7f7f", "#bcbd22"]


#: One colour per optimizer in every figure of every report (the DDC family in blues, so a
#: reader finds DDC by colour whichever claim or task the figure shows).
OPTIMIZER_COLORS = {"ddc": "#1f77b4", "ddc_muon": "#17becf", "adamw": "#d62728",
                    "muon": "#ff7f0e", "sgd": "#2ca02c", "adamp": "#9467bd", "scale": "#8c564b"}


def colors_for(optimizers: Iterable[str]) -> dict[str, str]:
    """Optimizer → colour: the fixed :data:`OPTIMIZER_COLORS` for known optimizers, then the
    palette's unused colours for others (in name order)."""
    names = sorted(set(optimizers))
    spare = [c for c in _PALETTE if c not in OPTIMIZER_COLORS.values()] + _PALETTE
    out, i = {}, 0
    for opt in names:
        if opt in OPTIMIZER_COLORS:
            out[opt] = OPTIMIZER_COLORS[opt]
        else:
            out[opt] = spare[i % len(spare)]
            i += 1
    return out


def ci95_rows(frame: pd.DataFrame) -> pd.Series:
    """Per row of ``frame`` (columns = seeds): the half-width of the 95% t-interval of the
    mean over the row's finite values (NaN with fewer than two); the bands of every
    figure (:func:`ddc_bench.report.stats.seed_stats`' rule)."""
    return frame.apply(lambda row: seed_stats(row.to_numpy()).ci95, axis=1)


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


def save_png(fig: Figure, path: Path) -> None:
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


def plot_curves(task: str, task_df: pd.DataFrame, agg: pd.DataFrame,
                selected: dict[str, Any], select_metric: str | None,
                metrics: dict[str, list[dict[str, Any]]], colors: dict[str, str],
                path: Path) -> Path | None:
    """Validation loss, training loss and the other validation metrics against step, for
    each optimizer's selected setting (mean over seeds, band: 95% interval of the mean)."""
    records = {p: metrics[p] if p in metrics else results.read_metrics(p)
               for p in task_df["path"]}
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

    # One line per optimizer: its selected setting (selection.select_best) when it has
    # several; an optimizer with none selected (every seed diverged) shows its first.
    chosen, notes = [], []
    for opt, g in agg.groupby("optimizer", sort=True):
        multi = len(g) > 1
        chosen.append((selected.get(str(opt), g.index[0]), multi))
        if multi:
            notes.append(str(opt))

    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, panels):
        lows, highs, ends, diverged_pts = [], [], [], []
        for idx, multi in chosen:
            row = agg.loc[idx]
            sel = rows_of(task_df, row)
            color = colors[row["optimizer"]]
            ok = sel[~sel["diverged"].astype(bool)]
            runs = {p: _series(records[p], metric) for p in ok["path"]}
            runs = {p: s for p, s in runs.items() if len(s)}
            if runs:
                frame = pd.concat(runs, axis=1).sort_index()
                mean = frame.mean(axis=1)
                half = ci95_rows(frame)  # band: the 95% interval of the mean over seeds
                label = str(row["optimizer"]) + (f" {row['setting']}" if multi else "") \
                    + f" (n={len(runs)})"
                ax.plot(mean.index, mean.to_numpy(), color=color, lw=1.8, label=label)
                if len(runs) > 1:
                    ax.fill_between(mean.index, (mean - half).to_numpy(),
                                    (mean + half).to_numpy(), color=color, alpha=0.2, lw=0)
                    lows.extend((mean - half).tolist())
                    highs.extend((mean + half).tolist())
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
    sub = "mean over seeds, band = 95% interval of the mean; diverged runs dotted, excluded from the mean"
    if notes:
        sub += f"\nselected setting of {', '.join(notes)} (best mean final {select_metric})"
    fig.suptitle(f"{task}: learning curves\n{sub}", fontsize=11)
    save_png(fig, path)
    return path


def plot_lr(task: str, task_df: pd.DataFrame, agg: pd.DataFrame, selected: dict[str, Any],
            colors: dict[str, str], path: Path) -> Path | None:
    """Learning-rate sensitivity: final validation metrics against the effective learning
    rate (``base_lr × lr_mult``), one line per optimizer (and weight decay, where it
    varies); each optimizer's selected setting is ringed."""
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
            label = opt + (f" wd={fmt_lr(wd)}" if wd_varies else "")
            mean, half = g[f"final_{metric}__mean"], g[f"final_{metric}__ci95"]
            xs = g["lr"] * dodge[(opt, wd)]
            ax.errorbar(xs, mean, yerr=half.fillna(0), color=color, marker="o", ms=5,
                        capsize=4, lw=1.6, label=label)
            for lr, m, d, n in zip(xs, mean, g["diverged"], g["seeds"]):
                if d and _finite(m):
                    ax.annotate(f"{d}/{n} div.", (lr, m), textcoords="offset points",
                                xytext=(5, 5), fontsize=7, color=color)
                elif d and not _finite(m):
                    any_all_diverged = True
                    ax.plot([lr], [0.97], transform=top, marker="x", ms=10, mew=2.2,
                            color=color, ls="none", clip_on=False)
        for opt, idx in selected.items():
            row = agg.loc[idx]
            wd = row["weight_decay"]
            m = row.get(f"final_{metric}__mean")
            key = next((k for k in dodge if k[0] == opt and (k[1] == wd or
                        (pd.isna(k[1]) and pd.isna(wd)))), None)
            if key is not None and _finite(m):
                ax.plot([row["lr"] * dodge[key]], [m], marker="o", ms=13, mfc="none",
                        mec=colors[opt], mew=1.6, ls="none")
        if selected:
            ax.plot([], [], marker="o", ms=10, mfc="none", mec="0.3", ls="none",
                    label="selected setting")
        if any_all_diverged:
            ax.plot([], [], color="0.3", marker="x", ls="none", label="all seeds diverged")
        ax.set_xscale("log")
        ax.set_xticks(tested, [fmt_lr_tick(x) for x in tested],
                      rotation=30 if len(tested) > 6 else 0)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(tested) > 1:
            span = math.log10(tested[-1] / tested[0])
            pad = 10 ** max(0.1 * span, 0.15)
            ax.set_xlim(tested[0] / pad, tested[-1] * pad)
        arrow = "higher is better" if higher_is_better(metric) else "lower is better"
        ax.set_title(f"final {metric} ({arrow})")
        ax.set_xlabel("effective learning rate = base lr × lr_mult (log scale)")
        ax.set_ylabel(f"final {metric}")
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    _legend_below(fig, axes)
    fig.suptitle(f"{task}: learning-rate sensitivity\nmean over non-diverged seeds, "
                 f"error bars = 95% interval of the mean\n(points shifted slightly along x to stay visible)",
                 fontsize=11)
    save_png(fig, path)
    return path




#: The diagnostics panels (``ddc_bench.diagnose``): key or ratio of keys, and title.
DIAG_PANELS = (("diag/cells_read", "diag/cells_total", "cells read (fraction of cells)"),
               ("diag/spare_frac", None, "spare FFN fraction (mean over layers)"))


def plot_diagnostics(task: str, task_df: pd.DataFrame, agg: pd.DataFrame,
                     selected: dict[str, Any], metrics: dict[str, list[dict[str, Any]]],
                     colors: dict[str, str], path: Path) -> Path | None:
    """Dead-direction diagnostics against step (cells read as a fraction of the cells, spare
    FFN fraction) for each optimizer's selected setting, mean over seeds with a 95% band; ``None``
    when no run logged diagnostics (``diagnostics.every=0``)."""
    records = {p: metrics[p] if p in metrics else results.read_metrics(p)
               for p in task_df["path"]}
    logged = {k for recs in records.values() for r in recs for k in r}
    panels = [pnl for pnl in DIAG_PANELS if pnl[0] in logged]
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, denominator, title) in zip(axes, panels):
        for opt, g in agg.groupby("optimizer", sort=True):
            row = agg.loc[selected.get(str(opt), g.index[0])]
            sel = rows_of(task_df, row)
            runs = {}
            for p in sel[~sel["diverged"].astype(bool)]["path"]:
                s = _series(records[p], key)
                if denominator is not None:
                    s = s / _series(records[p], denominator).reindex(s.index)
                if len(s.dropna()):
                    runs[p] = s.dropna()
            if not runs:
                continue
            frame = pd.concat(runs, axis=1).sort_index()
            mean, half = frame.mean(axis=1), ci95_rows(frame)
            color = colors[str(opt)]
            ax.plot(mean.index, mean.to_numpy(), color=color, lw=1.8, marker=".",
                    label=f"{opt} {row['setting']} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(mean.index, (mean - half).to_numpy(), (mean + half).to_numpy(),
                                color=color, alpha=0.2, lw=0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key if denominator is None else f"{key} / {denominator}")
        ax.grid(True, alpha=0.3)
    _legend_below(fig, axes)
    fig.suptitle(f"{task}: dead-direction diagnostics (ddc.diagnostics, fixed probe batch)\n"
                 "selected setting per optimizer; mean over seeds, band = 95% interval of the mean", fontsize=11)
    save_png(fig, path)
    return path
