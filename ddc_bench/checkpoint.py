"""Checkpoints of a run: written atomically, two kept, read back or refused with one line.

A checkpoint is one ``torch.save`` file in the run folder (names in
:mod:`ddc_bench.results`): ``checkpoint.pt`` is the latest, ``checkpoint.prev.pt`` the one
before. :func:`save` writes the new file completely (temporary file, fsync) before it
touches the old ones, then shifts latest → prev and new → latest by renames, so a crash at
any moment leaves at least one complete checkpoint. :func:`load` reads the latest, or the
previous one when the latest is absent (a crash between the two renames); a checkpoint
that exists but cannot be read (truncated, corrupt, another format) is a
:class:`CheckpointError`, never silently skipped, since falling back would mix old and new
results.

What a checkpoint holds is built by :mod:`ddc_bench.state` (model, optimizer, LR
schedule, step, RNG states, running metrics, the byte offset of ``metrics.jsonl``); files
are read with ``torch.load(weights_only=True)``: tensors and plain Python data only.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch

from ddc_bench import results

#: Bumped when the layout of a checkpoint changes incompatibly.
FORMAT_VERSION = 1
_NEXT_FILE = ".checkpoint.next.pt"
#: Keys every checkpoint holds.
REQUIRED_KEYS = ("format", "step", "fingerprint", "model", "optimizer", "scheduler", "rng",
                 "progress", "metrics_offset")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another config (one-line message)."""


def save(folder: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as the run's latest checkpoint, keeping the previous one.

    Returns the path of the latest checkpoint.
    """
    folder = Path(folder)
    latest, prev, new = (folder / results.CHECKPOINT_FILE, folder / results.PREV_CHECKPOINT_FILE,
                         folder / _NEXT_FILE)
    try:
        with results.atomic_writer(new) as f:
            writer = _WriteErrors(f)
            try:
                torch.save({"format": FORMAT_VERSION, **payload}, writer)
            except RuntimeError:  # torch's zip writer hides the OSError it hit ("unexpected pos")
                if writer.error is not None:
                    raise writer.error from None
                raise
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = f"{latest} is kept" if latest.exists() or prev.exists() else "no earlier checkpoint"
        raise CheckpointError(
            f"no space left on the device of {folder}: the checkpoint at step "
            f"{payload.get('step')} was not written ({kept}); free some space, then run the "
            f"same command again to resume") from None
    if latest.exists():
        os.replace(latest, prev)
    os.replace(new, latest)
    results.fsync_dir(folder)  # make the renames durable
    return latest


class _WriteErrors:
    """A binary file that remembers the first ``OSError`` its ``write`` raised."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def load(folder: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The run's latest readable checkpoint and its path (see the module docstring).

    Raises :class:`CheckpointError` when there is none or it cannot be read.
    """
    folder = Path(folder)
    latest, prev = folder / results.CHECKPOINT_FILE, folder / results.PREV_CHECKPOINT_FILE
    path = latest if latest.is_file() else prev
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no checkpoint to resume from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means: not usable
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {detail}); "
            f"resume=false starts this run afresh (the old folder is moved aside)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION \
            or any(k not in payload for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"checkpoint {path} is not a ddc-bench checkpoint of format {FORMAT_VERSION}; "
            f"resume=false starts this run afresh (the old folder is moved aside)")
    return payload, path


def remove_partial(folder: str | os.PathLike) -> None:
    """Remove a half-written checkpoint left by a crash inside :func:`save`."""
    new = Path(folder) / _NEXT_FILE
    if new.exists():
        new.unlink()
