"""Optional experiment trackers, selected by the ``logger`` config group.

The run folder (``config.yaml``, ``metrics.jsonl``, ``summary.json``) is always written by
the training loop; a tracker only mirrors it. ``logger=none`` mirrors nothing;
``logger=wandb`` logs every metrics record to Weights & Biases. ``wandb`` is imported only
when selected, and the usual ``WANDB_*`` environment variables are honoured (``WANDB_MODE``
unless ``logger.mode`` is set, ``WANDB_DIR`` else the run folder, so that nothing lands in
the working directory).

A resumed run logs to the same W&B run: its id is kept in the run folder
(``results.WANDB_ID_FILE``) and passed back with ``resume="allow"``. An online run without
W&B credentials (``WANDB_API_KEY`` or a ``~/.netrc`` entry, as ``wandb login`` writes)
fails before training with one line when there is no terminal to answer wandb's login
prompt, instead of waiting on it.
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ddc_bench import results


class LoggerError(RuntimeError):
    """The selected tracker cannot be used (e.g. its package is not installed)."""


class NullLogger:
    """``logger=none``: records stay in the run folder only."""

    def log(self, record: Mapping[str, Any]) -> None:
        """Mirror one metrics record (no-op)."""

    def finish(self, summary: results.Summary | None) -> None:
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
        id_file = Path(run_folder) / results.WANDB_ID_FILE
        if id_file.is_file():  # a resumed run: continue the same W&B run
            kwargs.update(id=id_file.read_text().strip(), resume="allow")
        self.run = wandb.init(**kwargs)
        if not id_file.is_file() and getattr(self.run, "id", None):
            results.atomic_write_text(id_file, f"{self.run.id}\n")

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one metrics record at its ``step``."""
        data = {k: v for k, v in record.items() if k != "step"}
        self.run.log(data, step=int(record["step"]))

    def finish(self, summary: results.Summary | None) -> None:
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


def _wandb_mode(logger_cfg: Mapping[str, Any]) -> str:
    return str(logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "online")


def wandb_credentials_found() -> bool:
    """Whether W&B credentials are configured: ``WANDB_API_KEY``, or a netrc entry for the
    W&B host (``WANDB_BASE_URL``, default api.wandb.ai), where ``wandb login`` stores them."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def require_logger(logger_cfg: Mapping[str, Any]) -> None:
    """Raise :class:`LoggerError` now if the selected tracker cannot be used."""
    kind = logger_cfg.get("name", "none")
    if kind == "wandb":
        _import_wandb()
        mode = _wandb_mode(logger_cfg)
        if mode not in ("offline", "disabled", "dryrun") and not wandb_credentials_found() \
                and not sys.stdin.isatty():
            raise LoggerError(
                "logger=wandb is online but no W&B credentials were found and there is no "
                "terminal to log in from; run `wandb login`, set WANDB_API_KEY, or log "
                "locally with logger.mode=offline")
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
