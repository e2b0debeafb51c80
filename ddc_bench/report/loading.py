"""Loading: the finished runs under a results folder as one table (one row per run).

Only :mod:`ddc_bench.results` knows the results layout; this module flattens each run's
``summary.json`` (:class:`ddc_bench.results.Summary`) into one row and, when asked,
recomputes time/steps to a target from ``metrics.jsonl``. A run whose ``summary.json`` is
not a JSON object, or whose ``metrics.jsonl`` has undecodable bytes, is skipped and
named in the returned ``skipped`` list (the report lists them), never a crash.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pandas as pd

from ddc_bench import results

#: Leading columns of summary.csv, in order; metric columns follow, then the rest.
ID_COLUMNS = ["task", "task_size", "optimizer", "variant", "variant_keys", "lr", "base_lr",
              "lr_mult", "weight_decay", "seed", "status", "diverged", "steps", "steps_done"]
TAIL_COLUMNS = ["target_metric", "target_value", "target_mode", "target_step", "target_time_s",
                "step_time_ms", "units_per_s", "unit", "train_time_s", "wall_time_s",
                "peak_memory_mb", "git_commit", "device", "path"]
#: What identifies one setting of one optimizer (seeds are its repetitions).
GROUP_KEYS = ["optimizer", "variant", "lr", "weight_decay"]


def finite(x: Any) -> bool:
    """True for a finite number (None, NaN, inf and non-numbers are not)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def metric_sort_key(metric: str) -> tuple[int, int, str]:
    """val_* first (loss, acc, ppl, others), then test_*, gap_*, train_eval_*, the rest."""
    base_order = {"loss": 0, "acc": 1, "ppl": 2}
    for rank, prefix in enumerate(("val_", "test_", "gap_", "train_eval_")):
        if metric.startswith(prefix):
            base = metric[len(prefix):]
            return rank, base_order.get(base, 3), base
    return 4, 0, metric


def reached(value: Any, threshold: float, metric: str, mode: str | None = None) -> bool:
    """Whether ``value`` meets the target ``threshold`` of ``metric``: the training loop's
    rule (:func:`ddc_bench.results.target_reached`) with the target's declared ``mode``
    (inferred from the metric's name only where none was recorded)."""
    return finite(value) and results.target_reached(float(value), threshold,
                                                    results.target_mode(metric, mode))


def target_text(metric: str, value: float, mode: str | None = None) -> str:
    """``val_acc ≥ 0.9`` / ``val_loss ≤ 2``."""
    return f"{metric} {'≥' if results.target_mode(metric, mode) == 'max' else '≤'} {value:g}"


def normalise_target(target: dict | None) -> dict[str, float]:
    """``{metric: value}``; ``{"metric": m, "value": v}`` (the summary's shape) also works."""
    if not target:
        return {}
    if set(target) == {"metric", "value"}:
        return {str(target["metric"]): float(target["value"])}
    return {str(k): float(v) for k, v in target.items()}


def _target_from_metrics(records: list[dict[str, Any]], target: dict[str, float],
                         own: dict[str, Any]) -> dict[str, Any] | None:
    """Recompute a run's target from its evaluation lines; the first metric of ``target``
    that the run logs applies (so one call can serve val_acc and val_loss tasks). The
    direction is the run's own target ``mode`` when ``own`` (its summary's target) is on
    the same metric."""
    for metric, value in target.items():
        lines = [r for r in records if metric in r]
        if not lines:
            continue
        mode = results.target_mode(metric, own.get("mode") if own.get("metric") == metric else None)
        for r in lines:
            if reached(r[metric], value, metric, mode):
                return {"metric": metric, "value": value, "mode": mode, "step": r.get("step"),
                        "time_s": r.get("train_time_s")}
        return {"metric": metric, "value": value, "mode": mode, "step": None, "time_s": None}
    return None


def setting_labels(task_df: pd.DataFrame) -> pd.Series:
    """What distinguishes each run's setting from the others of its task, for people: the
    swept keys whose values differ between the task's runs (``lr_mult=2,
    optimizer.weight_decay=0.1``; keys every run shares, such as ``steps=600``, are left
    out); for summaries without ``variant_keys``, a ``run_name`` folder, or else the lr."""
    keys = [json.loads(v) if isinstance(v, str) else {} for v in task_df["variant_keys"]]
    names = sorted({k for d in keys for k in d})
    varying = [k for k in names if len({json.dumps(d.get(k)) for d in keys}) > 1]
    labels = []
    for d, variant, lr in zip(keys, task_df["variant"], task_df["lr"]):
        if varying:
            labels.append(", ".join(f"{k}={_fmt_key_value(d.get(k))}" for k in varying))
        elif finite(lr) and variant not in (None, results.default_variant(float(lr))) \
                and not d:
            labels.append(str(variant))  # a run_name folder
        else:
            labels.append(f"lr={float(lr):g}" if finite(lr) else str(variant))
    return pd.Series(labels, index=task_df.index, dtype=object)


def _fmt_key_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flatten(summary: dict[str, Any], target_override: dict[str, float],
             records: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {k: summary.get(k) for k in ID_COLUMNS}
    keys = summary.get("variant_keys")
    row["variant_keys"] = json.dumps(keys, sort_keys=True) if isinstance(keys, dict) else None
    # Summaries from before lr_mult: the lr is the base lr, the multiplier 1.
    if row["base_lr"] is None:
        row["base_lr"] = summary.get("lr")
    if row["lr_mult"] is None:
        row["lr_mult"] = 1.0
    row["diverged"] = bool(summary.get("diverged")) or summary.get("status") == "diverged"
    for kind in ("final", "best"):
        for metric, value in (summary.get(kind) or {}).items():
            row[f"{kind}_{metric}"] = value
    target = summary.get("target") or {}
    if target_override:
        target = _target_from_metrics(records, target_override, target) or {}
    row["target_metric"] = target.get("metric")
    row["target_value"] = target.get("value")
    row["target_mode"] = (results.target_mode(target["metric"], target.get("mode"))
                          if target.get("metric") else None)
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


def _read_run(folder: os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's summary and metric records; ``ValueError`` naming what is wrong."""
    try:
        summary = results.read_summary(folder)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{results.SUMMARY_FILE} has undecodable bytes ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{results.SUMMARY_FILE} is not valid JSON ({exc.msg})") from None
    except TypeError:  # read_summary adds "path" to what it read: not a JSON object
        raise ValueError(f"{results.SUMMARY_FILE} is not a JSON object") from None
    except OSError as exc:
        raise ValueError(f"{results.SUMMARY_FILE} cannot be read ({exc.strerror})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{results.SUMMARY_FILE} is not a JSON object")
    missing = [k for k in ("task", "optimizer") if not isinstance(summary.get(k), str)]
    if missing:
        raise ValueError(f"{results.SUMMARY_FILE} lacks {', '.join(missing)}")
    try:
        records = results.read_metrics(folder, strict=True)
    except results.MetricsFileError as exc:
        raise ValueError(str(exc)) from None
    except UnicodeDecodeError:
        raise ValueError(f"{results.METRICS_FILE} has undecodable bytes") from None
    except OSError as exc:
        raise ValueError(f"{results.METRICS_FILE} cannot be read ({exc.strerror})") from None
    return summary, records


def load_runs(root: str | os.PathLike, target: dict | None = None,
              metrics: dict[str, list[dict[str, Any]]] | None = None,
              skipped: list[str] | None = None) -> pd.DataFrame:
    """One row per finished run under ``root`` (the flattened ``summary.json``).

    ``target`` (``{metric: value}``) replaces the runs' own targets; steps and time to it
    are then recomputed from ``metrics.jsonl``. ``metrics``, when given, is filled with
    every loaded run's records (run path → records). ``skipped``, when given, receives one
    line per run that could not be read (``<folder>: <why>``); those runs are left out.
    """
    override = normalise_target(target)
    cache = metrics if metrics is not None else {}
    rows = []
    for folder in results.iter_finished_runs(root):
        try:
            summary, records = _read_run(folder)
        except ValueError as exc:
            if skipped is not None:
                skipped.append(f"{folder}: {exc}")
            continue
        cache[str(folder)] = records
        rows.append(_flatten(summary, override, records))
    if not rows:
        return pd.DataFrame(columns=ID_COLUMNS + TAIL_COLUMNS)
    df = pd.DataFrame(rows)
    metric_cols = sorted((c for c in df.columns if c.startswith(("final_", "best_"))),
                         key=lambda c: (c.startswith("best_"),
                                        metric_sort_key(c.split("_", 1)[1])))
    for c in metric_cols + ["lr", "base_lr", "lr_mult", "weight_decay", "target_value",
                            "target_time_s", "step_time_ms", "units_per_s", "train_time_s",
                            "wall_time_s", "peak_memory_mb"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("seed", "steps", "steps_done", "target_step"):  # integers, NA where missing
        col = pd.to_numeric(df[c], errors="coerce")
        if (col.dropna() % 1 == 0).all():
            df[c] = col.astype("Int64")
    df = df[ID_COLUMNS + metric_cols + TAIL_COLUMNS]
    df = df.sort_values(["task", "task_size", "optimizer", "lr", "variant", "seed"],
                        na_position="last", kind="stable").reset_index(drop=True)
    return df


def task_label(task: Any, size: Any) -> str:
    """``<task>-<size>`` (the folder name of a task's runs)."""
    return f"{task}-{size}" if size not in (None, "") and not pd.isna(size) else str(task)
