"""The charts of ``ddc-bench-perf``: ratios to the reference, and step time against size."""

from __future__ import annotations

import io
from typing import Any

import pandas as pd

def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig

def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()

def steps_chart(rows: list[dict[str, Any]], reference: str, title: str) -> bytes:
    """Bar chart: step, train-step and state ratios to the reference, per task and optimizer."""
    frame = pd.DataFrame(rows)
    tasks = list(dict.fromkeys(frame["task"]))
    metrics = [("step_ms_vs_ref", "optimizer step"), ("train_step_ms_vs_ref", "training step"),
               ("state_bytes_vs_ref", "state bytes")]
    fig = _new_figure(4.2 * len(metrics), 1.0 + 0.45 * len(frame))
    for i, (key, label) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        labels = [f"{r['task']}: {r['optimizer']}" for _, r in frame.iterrows()]
        values = [float(v) if v is not None else 0.0 for v in frame[key]]
        colours = [f"C{tasks.index(t)}" for t in frame["task"]]
        ax.barh(range(len(values)), values, color=colours)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(labels if i == 0 else [""] * len(values), fontsize=8)
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
        ax.set_xlabel(f"{label} / {reference}")
        ax.set_xlim(0, max(values + [1.0]) * 1.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)

def scaling_chart(rows: list[dict[str, Any]], title: str) -> bytes:
    """Step time against parameter count (log-log), one line per optimizer."""
    frame = pd.DataFrame(rows)
    fig = _new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, part in frame.groupby("optimizer", sort=False):
        part = part.sort_values("params")
        ax.plot(part["params"], part["step_ms"], marker="o", label=name)
        for _, r in part.iterrows():
            ax.annotate(r["model"], (r["params"], r["step_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -8))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("optimizer.step() ms (median)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)
