"""Tables: the per-task "selected settings" and "all settings" tables, as cell texts with a
bold mask, and their Markdown and LaTeX renderings.

Numbers are formatted here only; which setting is selected and how the statistics are
computed live in :mod:`ddc_bench.report.selection` and :mod:`ddc_bench.report.stats`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ddc_bench.report.loading import finite as _finite
from ddc_bench.report.loading import target_text
from ddc_bench.report.stats import Comparison
from ddc_bench.results import higher_is_better

#: Marks the selected setting of each optimizer in the all-settings table.
SELECTED_MARK = "★"


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


def fmt_lr(x: float) -> str:
    return f"{x:g}" if _finite(x) else "—"


def fmt_lr_tick(x: float) -> str:
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




def _fmt_ci(mean: float, half: float) -> str:
    if not (_finite(mean) and _finite(half)):
        return "—"
    d = _decimals(mean)
    return f"[{mean - half:.{d}f}, {mean + half:.{d}f}]"


def _fmt_p(p: float) -> str:
    """``p=0.12``, ``p=0.031``, ``p<0.001``."""
    if not _finite(p):
        return "p=—"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.1 else f"p={p:.2f}"


def _target_of(task_df: pd.DataFrame) -> tuple[str, float, str | None] | None | str:
    """The task's single target (metric, value, declared mode), None when no run has one,
    "mixed" when runs disagree."""
    t = task_df[task_df["target_metric"].notna()]
    modes = t["target_mode"] if "target_mode" in t else [None] * len(t)
    pairs = {(m, float(v), md if isinstance(md, str) else None)
             for m, v, md in zip(t["target_metric"], t["target_value"], modes)}
    if not pairs:
        return None
    if len(pairs) > 1:
        return "mixed"
    return next(iter(pairs))


def _metric_header(kind: str, metric: str) -> str:
    arrow = "↑" if higher_is_better(metric) else "↓"
    if metric == "gap_loss":
        return f"gap (val−train loss) {arrow}"
    return f"{kind} {metric} {arrow}"


def _target_cells(task_df: pd.DataFrame, agg: pd.DataFrame, cells: dict[str, list[str]],
                  bold: dict[str, pd.Series], notes: list[str]) -> None:
    target = _target_of(task_df)
    if target is None:
        return
    if target == "mixed":
        t = task_df[task_df["target_metric"].notna()]
        modes = t["target_mode"] if "target_mode" in t else [None] * len(t)
        pairs = sorted({(m, float(v), md if isinstance(md, str) else "")
                        for m, v, md in zip(t["target_metric"], t["target_value"], modes)})
        notes.append("Runs of this task were given different targets ("
                     + "; ".join(target_text(m, v, md or None) for m, v, md in pairs)
                     + "); pass `--target METRIC=VALUE` to compare them on one.")
        name = "target"
    else:
        name = target_text(*target)
        notes.append(f"Target: {name}.")
    steps_h, time_h = f"steps to {name}", "time to target (s)"
    cells[steps_h] = [f"{x:,.0f}" if _finite(x) else "—" for x in agg["target_steps__mean"]]
    cells[time_h] = [_fmt_num(x) for x in agg["target_time_s__mean"]]
    cells["reached"] = [f"{k}/{n}" for k, n in zip(agg["target_reached"], agg["seeds"])]
    bold[steps_h] = _best_mask(agg["target_steps__mean"], higher=False)
    bold[time_h] = _best_mask(agg["target_time_s__mean"], higher=False)


def _finish(cells: dict[str, list[str]], bold: dict[str, pd.Series], index: pd.Index
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = pd.DataFrame(cells, index=index)
    false = pd.Series(False, index=index)
    mask = pd.DataFrame({c: bold.get(c, false) for c in table.columns}, index=index)
    return table, mask.fillna(False).astype(bool)


def all_settings_table(task_df: pd.DataFrame, agg: pd.DataFrame, chosen: dict[str, Any]
                       ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Every setting of one task: cell texts, a same-shaped bold mask, and notes. The
    selected setting of each optimizer is marked with :data:`SELECTED_MARK`; test-split
    metrics are not shown here (only for selected settings)."""
    notes: list[str] = []
    cells: dict[str, list[str]] = {}
    bold: dict[str, pd.Series] = {}
    picked = set(chosen.values())
    cells["optimizer"] = [f"{o} {SELECTED_MARK}" if i in picked else str(o)
                          for i, o in zip(agg.index, agg["optimizer"])]
    if (agg["setting"] != agg["lr"].map(lambda x: f"lr={x:g}")).any():
        cells["setting"] = list(agg["setting"].astype(str))
    cells["lr"] = [fmt_lr(x) for x in agg["lr"]]
    named = "setting" in cells and any("lr_mult=" in t for t in cells["setting"])
    if agg["lr_mult"].nunique(dropna=False) > 1 and not named:
        cells["lr_mult"] = [fmt_lr(x) for x in agg["lr_mult"]]
    if agg["weight_decay"].nunique(dropna=False) > 1:
        cells["wd"] = [fmt_lr(x) for x in agg["weight_decay"]]
    cells["seeds"] = [str(n) for n in agg["seeds"]]
    cells["diverged"] = [str(n) for n in agg["diverged"]]
    for c in agg.attrs["value_cols"]:
        kind, metric = c.split("_", 1)
        if metric.startswith("test_"):
            continue
        header = _metric_header(kind, metric)
        cells[header] = [_fmt_mean_std(m, s) for m, s in
                         zip(agg[f"{c}__mean"], agg[f"{c}__std"])]
        bold[header] = _best_mask(agg[f"{c}__mean"], higher_is_better(metric))
    _target_cells(task_df, agg, cells, bold, notes)
    cells["step time (ms) ↓"] = [_fmt_num(x) for x in agg["step_time_ms__mean"]]
    bold["step time (ms) ↓"] = _best_mask(agg["step_time_ms__mean"], higher=False)
    units = {u for u in agg["unit"] if isinstance(u, str)}
    thr = f"throughput ({units.pop()}/s) ↑" if len(units) == 1 else "throughput (units/s) ↑"
    cells[thr] = [_fmt_num(x) for x in agg["units_per_s__mean"]]
    bold[thr] = _best_mask(agg["units_per_s__mean"], higher=True)
    table, mask = _finish(cells, bold, agg.index)
    return table, mask, notes


def selected_table(agg: pd.DataFrame, chosen: dict[str, Any], ranked: list[str],
                   metric: str, comparisons: dict[str, Comparison]
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per optimizer (best first): its selected setting, the selection metric's
    mean ± std and 95% CI over seeds, the other validation metrics, test metrics (this
    table only), and Welch's test against the best optimizer's selected setting."""
    rows = agg.loc[[chosen[o] for o in ranked]]
    cells: dict[str, list[str]] = {}
    bold: dict[str, pd.Series] = {}
    cells["optimizer"] = list(rows["optimizer"].astype(str))
    cells["selected setting"] = list(rows["setting"].astype(str))
    cells["lr"] = [fmt_lr(x) for x in rows["lr"]]
    cells["seeds"] = [f"{n - d}/{n}" if d else str(n)
                      for n, d in zip(rows["seeds"], rows["diverged"])]
    key = f"final_{metric}"
    header = _metric_header("final", metric)
    cells[header] = [_fmt_mean_std(m, s) for m, s in
                     zip(rows[f"{key}__mean"], rows[f"{key}__std"])]
    bold[header] = _best_mask(rows[f"{key}__mean"], higher_is_better(metric))
    cells["95% CI"] = [_fmt_ci(m, h) for m, h in zip(rows[f"{key}__mean"], rows[f"{key}__ci95"])]
    for c in agg.attrs["value_cols"]:
        kind, m = c.split("_", 1)
        if kind != "final" or m in (metric, "gap_loss") or m.endswith("_ppl"):
            continue
        h = _metric_header("final", m) + (" (test)" if m.startswith("test_") else "")
        cells[h] = [_fmt_mean_std(a, s) for a, s in zip(rows[f"{c}__mean"], rows[f"{c}__std"])]
    verdicts, diffs = [], []
    for opt in ranked:
        cmp = comparisons.get(opt)
        if cmp is None:
            verdicts.append("best")
            diffs.append("—")
            continue
        d = _decimals(cmp.diff if cmp.diff else 1.0)
        diffs.append(f"{cmp.diff:+.{d}f}" if _finite(cmp.diff) else "—")
        within = cmp.within_noise
        verdicts.append("too few seeds" if within is None else
                        f"within seed noise ({_fmt_p(cmp.p_value)})" if within else
                        f"worse ({_fmt_p(cmp.p_value)})")
    cells["Δ vs best"] = diffs
    cells["vs best (Welch t-test)"] = verdicts
    table, mask = _finish(cells, bold, rows.index)
    return table, mask


def to_markdown(table: pd.DataFrame, mask: pd.DataFrame) -> str:
    shown = table.copy()
    for c in table.columns:
        shown[c] = [f"**{t}**" if b else t for t, b in zip(table[c], mask[c])]
    align = ["left" if c in _TEXT_COLUMNS else "right" for c in shown.columns]
    # disable_numparse: cells are already formatted ("0.9080" must not become "0.908").
    return shown.to_markdown(index=False, colalign=align, disable_numparse=True)


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}
_TEX_SYMBOLS = {"±": r"$\pm$", "—": "--", "−": "$-$", "≥": r"$\geq$", "≤": r"$\leq$",
                "↑": r"$\uparrow$", "↓": r"$\downarrow$", "×": r"$\times$",
                SELECTED_MARK: r"$\star$", "Δ": r"$\Delta$"}
#: Columns of text (left-aligned); the others hold numbers.
_TEXT_COLUMNS = ("optimizer", "variant", "setting", "selected setting",
                 "vs best (Welch t-test)")


def tex(text: str) -> str:
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))
    for sym, rep in _TEX_SYMBOLS.items():
        out = out.replace(sym, rep)
    return out


def to_latex(table: pd.DataFrame, mask: pd.DataFrame, caption: str, label: str) -> str:
    shown = pd.DataFrame({tex(c): [rf"\textbf{{{tex(t)}}}" if b else tex(t)
                                    for t, b in zip(table[c], mask[c])]
                          for c in table.columns})
    fmt = "".join("l" if c in _TEXT_COLUMNS else "r" for c in table.columns)
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

