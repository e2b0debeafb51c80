"""The one place that knows the results layout, and the one results writer.

A results root holds one folder per run::

    RESULTS_DIR/<task>-<size>/<optimizer>/<variant>/seed<S>/
        config.yaml      the fully resolved config of the run
        metrics.jsonl    one JSON object per logged step (see below)
        summary.json     written once, at the end: the run is finished when it exists

``<variant>`` is ``run_name`` when given, else ``lr<lr>`` (learning rate as written in the
config), so learning-rate sweeps land side by side. Every write is atomic (temporary
file in the same folder, then ``os.replace``).

``metrics.jsonl`` lines always hold ``step`` (optimizer steps done), ``train_time_s``
(training seconds so far, evaluation excluded) and ``lr``; training lines add ``loss``
and ``units_per_s``; evaluation lines add ``train_eval_<m>`` and ``val_<m>`` for each
metric ``m`` of the task (``loss``, ``acc``, ``ppl``) and ``gap_loss`` (val − train).

``summary.json`` keys: ``task``, ``task_size``, ``optimizer``, ``lr``, ``weight_decay``,
``seed``, ``variant``, ``steps`` (planned), ``steps_done``, ``status``
(``finished`` | ``diverged``), ``diverged`` (bool), ``final`` and ``best`` (metric name →
value, from evaluation lines), ``target`` (``metric``, ``value``, ``step``, ``time_s``;
``step`` is null when never reached), ``wall_time_s``, ``train_time_s``,
``step_time_ms``, ``units_per_s``, ``unit``, ``peak_memory_mb``, ``overrides``,
``provenance`` (``git_commit``, ``git_dirty``, ``packages``, ``device``, ``python``,
``hostname``, ``started_at``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def higher_is_better(metric: str) -> bool:
    """Accuracies are better when higher; losses, perplexities and gaps when lower."""
    return metric.endswith("acc") or metric.endswith("accuracy")


class RunExistsError(FileExistsError):
    """Raised when a run folder already holds a finished run."""


def run_dir(results_dir: str | os.PathLike, task: str, size: str, optimizer: str,
            variant: str, seed: int) -> Path:
    """The folder of one run (see the module docstring for the layout)."""
    return Path(results_dir) / f"{task}-{size}" / optimizer / variant / f"seed{seed}"


def default_variant(lr: float) -> str:
    """The variant folder name for a run without ``run_name``: ``lr<lr>``."""
    return f"lr{lr:g}"


def is_finished(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a finished run (its ``summary.json`` exists)."""
    return (Path(path) / SUMMARY_FILE).is_file()


def prepare_run_dir(path: str | os.PathLike) -> Path | None:
    """Make ``path`` ready for a new run without losing anything already there.

    A finished run is never touched: :class:`RunExistsError` is raised. An unfinished run
    (an interrupted one) is moved aside to ``<path>.interrupted-<N>``; the new location is
    returned so the caller can say so. Returns ``None`` when nothing had to be moved.
    """
    path = Path(path)
    if is_finished(path):
        raise RunExistsError(
            f"{path} already holds a finished run; choose another results_dir or run_name "
            f"(finished runs are never overwritten)"
        )
    moved = None
    if path.exists() and any(path.iterdir()):
        n = 1
        while path.with_name(f"{path.name}.interrupted-{n}").exists():
            n += 1
        moved = path.with_name(f"{path.name}.interrupted-{n}")
        path.rename(moved)
    path.mkdir(parents=True, exist_ok=True)
    return moved


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so files stay standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then
    rename), with the usual file mode (``0666 & ~umask``; a bare mkstemp file is 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as indented JSON (non-finite floats become null)."""
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl``.

    Each record is written as one complete line and flushed, so a crash leaves every line
    before it intact (appending a line is the atomic unit for a log that grows).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / METRICS_FILE
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (a torn last line is skipped)."""
    records = []
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """A run's ``summary.json``, with ``path`` added."""
    data = json.loads((Path(folder) / SUMMARY_FILE).read_text())
    data["path"] = str(folder)
    return data


def iter_finished_runs(root: str | os.PathLike) -> Iterator[Path]:
    """Every folder under ``root`` that holds a finished run, in sorted order."""
    for summary in sorted(Path(root).rglob(SUMMARY_FILE)):
        yield summary.parent
