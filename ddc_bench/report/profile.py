"""Across tasks, AlgoPerf-style: time/steps to target and performance profiles.

Time-to-target of one optimizer on one task (AlgoPerf's external tuning, Dahl et al. 2023,
arXiv 2306.07179, Sec. 4): over the optimizer's settings, the fastest one, where a
setting's time is the **median over its seeds** of the training time at which the task's
target was first reached; a seed that diverged or never reached the target counts as
infinite (so a setting reaching it in fewer than half its seeds is infinite). Steps to
target are computed the same way. Targets come from each task's config
(``task.target``) or ``ddc-bench-report --target``.

Performance profile: with ``r = t / t_best`` per task (``t_best``: the fastest optimizer
on that task), ``rho(tau)`` is the fraction of tasks with ``r <= tau``. Its one-number
summary is the normalised area ``(1 / (tau_max - 1)) * integral_1^tau_max rho(tau) dtau``
(AlgoPerf's benchmark score, ``tau_max = 4``): 1 means fastest on every task, 0 never
within ``tau_max`` of the fastest. Tasks without a target, or where no optimizer reaches
it, carry no ratio and are left out (and listed). With one optimizer there is no profile.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

#: Largest performance ratio the profile (and its area) looks at (AlgoPerf's r_max).
TAU_MAX = 4.0


def _setting_times(task_df: pd.DataFrame, column: str) -> pd.Series:
    """Per setting (optimizer, variant, lr, weight decay): median over seeds of ``column``
    with diverged or non-reaching seeds as +inf."""
    vals = task_df[column].astype(float).where(
        task_df["target_step"].notna() & ~task_df["diverged"].astype(bool), np.inf)
    vals = vals.fillna(np.inf)
    keys = ["optimizer", "variant", "lr", "weight_decay"]
    frame = task_df[keys].assign(v=vals.to_numpy())
    return frame.groupby(keys, dropna=False)["v"].median()


def time_to_target(df: pd.DataFrame, column: str = "target_time_s") -> pd.DataFrame:
    """Tasks × optimizers: the fastest setting's median time (``column``) to the target;
    +inf when never reached; NaN when the task has no target. ``df`` is the loaded runs
    with a ``task_label`` column."""
    out: dict[str, dict[str, float]] = {}
    for task, task_df in df.groupby("task_label", sort=True):
        if task_df["target_metric"].isna().all():
            out[task] = {str(o): math.nan for o in task_df["optimizer"].unique()}
            continue
        per_setting = _setting_times(task_df, column)
        out[task] = {str(o): float(per_setting.xs(o, level="optimizer").min())
                     for o in task_df["optimizer"].unique()}
    table = pd.DataFrame(out).T.sort_index()
    return table[sorted(table.columns)] if len(table.columns) else table


def performance_ratios(times: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``r = t / t_best`` per task (rows) and optimizer (columns), inf where never reached.
    Tasks with no target or no finite time are dropped and returned by name."""
    keep, dropped = [], []
    for task, row in times.iterrows():
        finite = row[np.isfinite(row.astype(float))]
        if row.isna().all() or finite.empty or not (finite > 0).any():
            dropped.append(str(task))
        else:
            keep.append(task)
    t = times.loc[keep].astype(float)
    best = t.where(np.isfinite(t)).min(axis=1)
    return t.div(best, axis=0), dropped


def profile_area(ratios: pd.Series, tau_max: float = TAU_MAX) -> float:
    """Normalised area under one optimizer's performance profile on ``[1, tau_max]``.

    ``rho`` is a step function, so the integral is exact: each task contributes
    ``max(0, tau_max - max(r, 1)) / (tau_max - 1)``, averaged over tasks.
    """
    r = np.asarray(ratios, dtype=float)
    if r.size == 0:
        return math.nan
    r = np.where(np.isnan(r), np.inf, r)
    contrib = np.clip(tau_max - np.maximum(r, 1.0), 0.0, None) / (tau_max - 1.0)
    return float(contrib.mean())


def profile_curve(ratios: pd.Series, taus: np.ndarray) -> np.ndarray:
    """``rho(tau)`` at each of ``taus``: the fraction of tasks with ``r <= tau``."""
    r = np.asarray(ratios, dtype=float)
    return np.array([(r <= tau).mean() for tau in taus]) if r.size else np.zeros(len(taus))


def plot_profile(ratios: pd.DataFrame, areas: dict[str, float], colors: dict[str, str],
                 path: Path, save) -> Path:
    """The performance profile of every optimizer (steps drawn exactly), area in the
    legend; written with ``save(fig, path)``."""
    taus = np.unique(np.concatenate([
        [1.0, TAU_MAX], ratios.to_numpy(dtype=float).ravel()]))
    taus = taus[np.isfinite(taus) & (taus >= 1.0) & (taus <= TAU_MAX)]
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    order = sorted(ratios.columns, key=lambda o: -areas.get(o, 0.0))
    for i, opt in enumerate(order):
        rho = profile_curve(ratios[opt], taus)
        # Small vertical offsets keep coinciding curves visible.
        offset = 0.004 * (i - (len(order) - 1) / 2)
        ax.step(taus, rho + offset, where="post", color=colors[opt], lw=1.8,
                label=f"{opt} (area {areas[opt]:.3f})")
    ax.set_xscale("log")
    ticks = [1, 1.5, 2, 3, 4]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(1.0, TAU_MAX)
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("τ: time to target within τ × the fastest optimizer's (log scale)")
    ax.set_ylabel("fraction of tasks")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    n = len(ratios.index)
    fig.suptitle(f"Performance profile over {n} task{'s' * (n != 1)} "
                 f"(time to target; higher and further left is better)", fontsize=11)
    save(fig, path)
    return path
