"""Optional experiment trackers, selected by the ``logger`` config group.

The run folder (``config.yaml``, ``metrics.jsonl``, ``summary.json``) is always written by
the training loop; a tracker only mirrors it. ``logger=none`` mirrors nothing;
``logger=wandb`` logs every metrics record to Weights & Biases. ``wandb`` is imported only
when selected, and the usual ``WANDB_*`` environment variables are honoured (``WANDB_MODE``
unless ``logger.mode`` is set, ``WANDB_DIR`` else the run folder, so that nothing lands in
the working directory).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class LoggerError(RuntimeError):
    """The selected tracker cannot be used (e.g. its package is not installed)."""


class NullLogger:
    """``logger=none``: records stay in the run folder only."""

    def log(self, record: Mapping[str, Any]) -> None:
        """Mirror one metrics record (no-op)."""

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """Close the tracker; ``summary`` is ``None`` when the run failed (no-op)."""


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise LoggerError(
            "logger=wandb needs the wandb package: pip install 'ddc-bench[wandb]'"
        ) from err
    return wandb


class WandbLogger:
    """``logger=wandb``: one W&B run per benchmark run."""

    def __init__(self, logger_cfg: Mapping[str, Any], *, name: str, group: str,
                 config: Mapping[str, Any], run_folder: Path) -> None:
        wandb = _import_wandb()
        kwargs: dict[str, Any] = {
            "project": logger_cfg.get("project") or "ddc-bench",
            "entity": logger_cfg.get("entity"),
            "group": logger_cfg.get("group") or group,
            "tags": list(logger_cfg.get("tags") or []),
            "name": name,
            "config": dict(config),
            # WANDB_DIR wins; otherwise keep wandb's files inside the run folder.
            "dir": os.environ.get("WANDB_DIR") or str(run_folder),
        }
        if logger_cfg.get("mode"):
            kwargs["mode"] = logger_cfg["mode"]  # else wandb reads WANDB_MODE itself
        self.run = wandb.init(**kwargs)

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one metrics record at its ``step``."""
        data = {k: v for k, v in record.items() if k != "step"}
        self.run.log(data, step=int(record["step"]))

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """Attach the scalar parts of ``summary`` and close the W&B run."""
        if summary is not None:
            for key in ("status", "steps_done", "train_time_s", "step_time_ms", "units_per_s",
                        "peak_memory_mb"):
                self.run.summary[key] = summary.get(key)
            for key, value in (summary.get("final") or {}).items():
                self.run.summary[f"final/{key}"] = value
            target = summary.get("target") or {}
            if target:
                self.run.summary["target_step"] = target.get("step")
        self.run.finish(exit_code=0 if summary is not None else 1)


def require_logger(logger_cfg: Mapping[str, Any]) -> None:
    """Raise :class:`LoggerError` now if the selected tracker cannot be used."""
    kind = logger_cfg.get("name", "none")
    if kind == "wandb":
        _import_wandb()
    elif kind != "none":
        raise LoggerError(f"unknown logger {kind!r}; known: none, wandb")


def make_logger(logger_cfg: Mapping[str, Any], *, name: str, group: str,
                config: Mapping[str, Any], run_folder: Path) -> NullLogger | WandbLogger:
    """The tracker selected by ``logger_cfg.name`` (``none`` or ``wandb``)."""
    kind = logger_cfg.get("name", "none")
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(logger_cfg, name=name, group=group, config=config,
                           run_folder=run_folder)
    raise LoggerError(f"unknown logger {kind!r}; known: none, wandb")
