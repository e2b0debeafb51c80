"""The output of ``ddc-bench-perf``: the printed tables, ``report.md``, the CSVs and charts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ddc_bench import results
from ddc_bench.perf.charts import scaling_chart, steps_chart
from ddc_bench.perf.setup import PerfError

OUTPUT_FILES = ("report.md", "steps.csv", "steps.png", "scaling.csv", "scaling.png", "overhead.csv")


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or value != value else format(value, spec) + suffix


def steps_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The printed/markdown form of the per-optimizer rows."""
    return pd.DataFrame([{
        "task": f"{r['task']}-{r['size']}", "optimizer": r["optimizer"], "params": f"{r['params']:,}",
        "step ms": _fmt(r["step_ms"], ".3f"), "± IQR": _fmt(r["step_ms_iqr"], ".3f"),
        "step vs ref": _fmt(r["step_ms_vs_ref"], ".2f", "x"),
        "vs base": ("" if r["base"] is None else f"{r['step_vs_base']:.2f}x ({r['base']})"),
        "train step ms": _fmt(r["train_step_ms"], ".1f"),
        "train vs ref": _fmt(r["train_step_ms_vs_ref"], ".3f", "x"),
        "state MiB": _fmt(r["state_bytes"] / 2**20, ".3f"),
        "state vs ref": _fmt(r["state_bytes_vs_ref"], ".4f", "x"),
        "peak MiB": _fmt(r["peak_mib"], ".1f"),
        "peak Δ MiB": _fmt(r["peak_mib_vs_ref"], "+.1f"),
        "ops/step": _fmt(r.get("step_ops"), ".0f"),
        "syncs/step": _fmt(r.get("step_syncs"), ".2g"),
        "scalar reads/step": _fmt(r.get("step_scalar_reads"), ".2g"),
        "sweeps": r["balance_sweeps"] or "",
    } for r in rows])


def load_average() -> str:
    """The 1-minute load average and the CPU count, e.g. ``3.9 on 2 CPUs`` (n/a off Unix)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        return "n/a"


def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a markdown table (no index)."""
    return frame.to_markdown(index=False)


def write_report(out: Path, args: argparse.Namespace, command: str, header: str,
                 reference: str, device: torch.device, prov: dict[str, Any],
                 step_rows: list[dict[str, Any]], overhead_rows: list[dict[str, Any]],
                 scale_rows: list[dict[str, Any]], profile_text: str | None) -> None:
    """Print the tables and write ``report.md``, the CSVs, the charts and the profile into
    ``out`` (the caller checked that none of them exists)."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Optimizer cost: `ddc-bench-perf`\n", f"{header}  ", f"command: `{command}`\n",
          f"Reference row: `{reference}` (torch.optim.AdamW, "
          f"{'foreach=True' if device.type == 'cpu' else 'fused=True'}, adamw.yaml's hyperparameters). "
          f"Size `{args.size}`, {args.warmup} warm-up + {args.steps} timed steps per optimizer, "
          "round-robin. How each column is measured: the docstring of `ddc_bench/perf/` "
          "(`python -m pydoc ddc_bench.perf`). *ops/step*: aten operators dispatched per "
          "`optimizer.step()`; *syncs/step*: host-device synchronisations among them "
          "(scalar reads, data-dependent shapes, copies to the host of accelerator tensors; "
          "none can happen on the CPU); *scalar reads/step*: `.item()`-like reads on any "
          "device (each would wait for a GPU); means over 4 steps; a compiled step's fused "
          "kernels are not seen by the dispatcher (0).\n",
          "## Step time, state and memory\n", markdown(steps_table(step_rows)), ""]
    results.atomic_write_text(out / "steps.csv", pd.DataFrame(step_rows).to_csv(index=False))
    results.atomic_write_bytes(out / "steps.png", steps_chart(
        step_rows, reference, f"ratios to {reference}; size {args.size}, {prov['device']}"))
    md.append("![ratios](steps.png)\n")
    if overhead_rows:
        frame = pd.DataFrame([{"task": f"{r['task']}-{r['size']}", "optimizer": r["optimizer"],
                               "steps": r["steps"], "bare loop ms": f"{r['bare_ms']:.2f}",
                               "harness ms": f"{r['harness_ms']:.2f}",
                               "overhead": f"{100 * r['overhead']:+.1f}%"} for r in overhead_rows])
        results.atomic_write_text(out / "overhead.csv", pd.DataFrame(overhead_rows).to_csv(index=False))
        md += ["## Harness overhead\n", f"Method: {overhead_rows[0]['method']}; grad_clip off.\n",
               markdown(frame), ""]
        print(markdown(frame))
    if scale_rows:
        frame = pd.DataFrame(scale_rows)
        ref_ms = {(r["model"]): r["step_ms"] for r in scale_rows if r["optimizer"] == reference}
        shown = pd.DataFrame([{"model": f"{r['task']} {r['model']}", "params": f"{r['params']:,}",
                               "optimizer": r["optimizer"], "step ms": f"{r['step_ms']:.3f}",
                               "vs ref": f"{r['step_ms'] / ref_ms[r['model']]:.2f}x",
                               "state MiB": f"{r['state_bytes'] / 2**20:.3f}"} for r in scale_rows])
        results.atomic_write_text(out / "scaling.csv", frame.to_csv(index=False))
        results.atomic_write_bytes(out / "scaling.png", scaling_chart(
            scale_rows, f"{args.scale_task}: optimizer.step() vs size; {prov['device']}"))
        md += ["## Scaling\n", "optimizer.step() on the gradients of one batch (median).\n",
               markdown(shown), "", "![scaling](scaling.png)\n"]
        print(markdown(shown))
    if profile_text is not None:
        path = out / f"profile-{args.profile}.txt"
        if path.exists():
            raise PerfError(f"{path} already exists; move it away or pass another --out")
        results.atomic_write_text(path, profile_text + "\n")
        md += [f"## Profile of `{args.profile}`\n", "```", profile_text, "```", ""]
    # Other processes slow every optimizer alike (the rounds interleave them), but they widen
    # the spread; the load average says how busy the machine was.
    md.insert(2, f"load average at the end {load_average()}  ")
    results.atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    print(f"[ddc-bench-perf] wrote {out}/report.md, steps.csv, steps.png"
          + (", overhead.csv" if overhead_rows else "") + (", scaling.csv, scaling.png" if scale_rows else ""))
