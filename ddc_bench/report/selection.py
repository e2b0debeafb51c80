"""Aggregation over seeds and the choice of each optimizer's setting.

A *setting* is one optimizer configuration (:data:`~ddc_bench.report.loading.GROUP_KEYS`:
optimizer × variant folder × effective lr × weight decay); its seeds are repetitions.

Selection rule (per task and optimizer): the setting with the best **validation** metric,
mean over seeds of its final value (:func:`selection_metric` names the metric), or of its
best value over the run's evaluations with ``stat="best"`` (for over-training, where the
final value rewards learning less). Settings with a diverged seed are only considered when
every setting of that optimizer has one. Test splits are never looked at. Which direction
is better comes from the one rule, :func:`ddc_bench.results.higher_is_better`.

Ties (equal means, e.g. a validation accuracy that saturates at 1.0 for several learning
rates) are NOT broken by another metric's noise (a validation loss near 1e-7): they go to
the setting whose seeds reached the task's target more often, then sooner (mean
steps-to-target); a tie that remains is reported (:func:`selection_ties`) and the smallest
lr among the tied settings is taken.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ddc_bench.report.loading import GROUP_KEYS, metric_sort_key, setting_labels
from ddc_bench.report.stats import Comparison, seed_stats, welch
from ddc_bench.results import higher_is_better


def val_metrics(task_df: pd.DataFrame) -> list[str]:
    """The validation metrics the runs of a task report (val_loss, val_acc, val_ppl, ...)."""
    names = {c.split("_", 1)[1] for c in task_df.columns
             if c.startswith("final_") and task_df[c].notna().any()}
    return sorted((m for m in names if m.startswith("val_")), key=metric_sort_key)


def metrics_of_test_split(task_df: pd.DataFrame) -> list[str]:
    """The test-split metrics the runs of a task report (shown for selected settings only)."""
    names = {c.split("_", 1)[1] for c in task_df.columns
             if c.startswith("final_") and task_df[c].notna().any()}
    return sorted((m for m in names if m.startswith("test_")), key=metric_sort_key)


def selection_metric(task_df: pd.DataFrame) -> str | None:
    """The validation metric that selects settings: the task's own target metric (its
    config's ``target.metric``) when the runs agree on one, else ``val_acc``, else
    ``val_loss``, else the first validation metric; None when there is none."""
    metrics = val_metrics(task_df)
    declared = {str(m) for m in task_df["target_metric"].dropna()}
    if len(declared) == 1:
        m = declared.pop()
        for name in (m, f"val_{m}"):
            if name in metrics:
                return name
    for m in ("val_acc", "val_loss"):
        if m in metrics:
            return m
    return metrics[0] if metrics else None


def rows_of(task_df: pd.DataFrame, setting: pd.Series) -> pd.DataFrame:
    """The runs (all seeds) of one setting (a row of :func:`aggregate_task`)."""
    sel = task_df
    for k in GROUP_KEYS:
        sel = sel[(sel[k] == setting[k]) | (sel[k].isna() & pd.isna(setting[k]))]
    return sel


def aggregate_task(task_df: pd.DataFrame) -> pd.DataFrame:
    """Per-setting statistics of one task (one row per setting).

    Means, stds (ddof=1), 95% t-intervals (``__ci95``, half-widths) and target statistics
    use the non-diverged runs only; ``seeds`` counts all runs and ``diverged`` the
    diverged ones. ``attrs``: ``value_cols``, ``metrics`` (validation), ``tests``.
    """
    metrics = val_metrics(task_df)
    tests = metrics_of_test_split(task_df)
    gap = "final_gap_loss" if "final_gap_loss" in task_df and \
        task_df["final_gap_loss"].notna().any() else None
    value_cols = [f"{k}_{m}" for m in metrics for k in ("final", "best")]
    value_cols += [f"final_{m}" for m in tests]
    if gap:
        value_cols.append(gap)
    task_df = task_df.assign(setting=setting_labels(task_df))
    out = []
    for key, g in task_df.groupby(GROUP_KEYS, dropna=False, sort=True):
        ok = g[~g["diverged"].astype(bool)]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        row["setting"] = g["setting"].iloc[0]
        row["lr_mult"] = g["lr_mult"].iloc[0]
        row["seeds"] = len(g)
        row["diverged"] = int(g["diverged"].astype(bool).sum())
        row["unit"] = next((u for u in g["unit"] if isinstance(u, str) and u), None)
        for c in value_cols:
            s = seed_stats(ok[c])
            row[f"{c}__mean"], row[f"{c}__std"] = s.mean, s.std
            row[f"{c}__ci95"], row[f"{c}__n"] = s.ci95, s.n
        hit = ok[ok["target_step"].notna()]
        row["target_reached"] = len(hit)
        row["target_steps__mean"] = hit["target_step"].mean() if len(hit) else np.nan
        row["target_time_s__mean"] = (hit["target_time_s"].mean()
                                      if hit["target_time_s"].notna().any() else np.nan)
        for c in ("step_time_ms", "units_per_s", "wall_time_s"):
            vals = ok[c].dropna()
            row[f"{c}__mean"] = vals.mean() if len(vals) else np.nan
        out.append(row)
    agg = pd.DataFrame(out)
    agg.attrs["value_cols"] = value_cols
    agg.attrs["metrics"] = metrics
    agg.attrs["tests"] = tests
    return agg


#: The statistics a setting can be selected on: the final value, or the best value over the
#: run's evaluations (mean over seeds either way).
SELECTION_STATS = ("final", "best")


def select_best(agg: pd.DataFrame, metric: str | None, stat: str = "final") -> dict[str, Any]:
    """Each optimizer's selected setting: optimizer → index into ``agg``.

    The best mean (over seeds) of ``<stat>_<metric>`` among the optimizer's settings
    without a diverged seed (all of its settings when each has one); settings with no
    finite mean are never chosen; ties as the module docstring states (target reached
    more often, then sooner; then the smallest lr, reported by :func:`selection_ties`).
    An optimizer whose every setting has no finite mean gets none.
    """
    if stat not in SELECTION_STATS:
        raise ValueError(f"selection stat {stat!r}: accepted {', '.join(SELECTION_STATS)}")
    col = f"{stat}_{metric}__mean"
    chosen: dict[str, Any] = {}
    if metric is None or col not in agg:
        return chosen
    for opt, g in agg.groupby("optimizer", sort=True):
        pool = _pool(g, col)
        if len(pool):
            chosen[str(opt)] = min(pool.index, key=lambda i: _sort_key(agg, i, metric, stat)
                                   + (float(agg.loc[i, "lr"]),))
    return chosen


def _pool(g: pd.DataFrame, col: str) -> pd.DataFrame:
    """The settings of one optimizer that selection may choose from (see select_best)."""
    clean = g[g["diverged"] == 0]
    pool = clean if clean[col].notna().any() else g
    return pool[pool[col].notna()]


def selection_ties(agg: pd.DataFrame, chosen: dict[str, Any], metric: str | None,
                   stat: str = "final") -> dict[str, list[Any]]:
    """Optimizer → the indices of the settings tied with its selected one on every rule
    of :func:`select_best` but the last (the smallest lr); only optimizers with a tie."""
    col = f"{stat}_{metric}__mean"
    ties: dict[str, list[Any]] = {}
    if metric is None or col not in agg:
        return ties
    for opt, idx in chosen.items():
        key = _sort_key(agg, idx, metric, stat)
        pool = _pool(agg[agg["optimizer"] == opt], col)
        tied = [i for i in pool.index if i != idx and _sort_key(agg, i, metric, stat) == key]
        if tied:
            ties[opt] = tied
    return ties


def _sort_key(agg: pd.DataFrame, idx: Any, metric: str, stat: str = "final"
              ) -> tuple[float, float, float]:
    """Smaller is better: the metric (negated when higher is better), then minus the seeds
    that reached the target, then the mean steps-to-target (never reached: infinite)."""
    value = float(agg.loc[idx, f"{stat}_{metric}__mean"])
    reached = agg.loc[idx, "target_reached"] if "target_reached" in agg else 0
    steps = agg.loc[idx, "target_steps__mean"] if "target_steps__mean" in agg else np.nan
    steps = float(steps) if pd.notna(steps) else np.inf
    return (-value if higher_is_better(metric) else value, -float(reached or 0), steps)


def rank_selected(agg: pd.DataFrame, chosen: dict[str, Any], metric: str,
                  stat: str = "final") -> list[str]:
    """Optimizers by their selected setting's mean, best first."""
    return sorted(chosen, key=lambda o: _sort_key(agg, chosen[o], metric, stat))


def compare_to_best(task_df: pd.DataFrame, agg: pd.DataFrame, chosen: dict[str, Any],
                    metric: str) -> dict[str, Comparison]:
    """Welch's test of each optimizer's selected setting against the best one's, on the
    per-seed final ``metric`` (non-diverged seeds): optimizer → :class:`Comparison`
    (``diff`` = this optimizer − the best). The best optimizer itself is left out."""
    ranked = rank_selected(agg, chosen, metric)
    if not ranked:
        return {}
    ok = task_df[~task_df["diverged"].astype(bool)]

    def values(opt: str) -> pd.Series:
        return rows_of(ok, agg.loc[chosen[opt]])[f"final_{metric}"]

    best = values(ranked[0])
    return {opt: welch(values(opt), best) for opt in ranked[1:]}
