"""The one place that knows the results layout, and the one results writer.

A results root holds one folder per run::

    RESULTS_DIR/<task>-<size>/<optimizer>/<variant>/seed<S>/
        config.yaml      the fully resolved config of the run
        metrics.jsonl    one JSON object per logged step (see below)
        summary.json     written once, at the end: the run is finished when it exists

``<variant>`` is ``run_name`` when given, else ``lr<lr>`` (learning rate as written in the
config) followed by ``,key=value`` for every other key the user overrode or swept
(:func:`variant_name`; e.g. ``lr0.001,optimizer.weight_decay=0.1``), so a sweep over any
key lands in distinct folders. ``run_name`` must stay inside ``results_dir``. Every write
is atomic (temporary file in the same folder, fsync, then ``os.replace``).

Next to the results, a run folder holds ``checkpoint.pt`` (and ``checkpoint.prev.pt``, the
one before), written every ``checkpoint_every`` steps, on SIGTERM/SIGINT and at the end
(see :mod:`ddc_bench.checkpoint`); while a run is live, ``seed<S>.lock`` next to its folder
names the process that owns it (:class:`RunLock`).

``metrics.jsonl`` lines always hold ``step`` (optimizer steps done), ``train_time_s``
(training seconds so far, evaluation excluded) and ``lr``; training lines add ``loss``
and ``units_per_s``; evaluation lines add ``train_eval_<m>`` and ``val_<m>`` for each
metric ``m`` of the task (``loss``, ``acc``, ``ppl``) and ``gap_loss`` (val − train).

``summary.json`` follows :class:`Summary` (the one schema that the runner, the loggers,
the report and the tests use).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Optional, TypedDict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
#: The checkpoint before the latest one (kept so that two are on disk).
PREV_CHECKPOINT_FILE = "checkpoint.prev.pt"
#: The W&B run id of the run, so that a resumed run logs to the same W&B run.
WANDB_ID_FILE = "wandb_id"


# --------------------------------------------------------------------------------------
# The summary schema
# --------------------------------------------------------------------------------------

class Target(TypedDict):
    """The time/steps-to-target goal and when it was first reached (``None``: never).
    ``mode``: ``"max"`` (reached when the metric is at least ``value``) or ``"min"``."""

    metric: str
    value: float
    mode: str
    step: Optional[int]
    time_s: Optional[float]


class Provenance(TypedDict):
    """Where a run came from (:func:`ddc_bench.provenance.collect`)."""

    git_commit: Optional[str]
    git_dirty: Optional[bool]
    packages: dict[str, Optional[str]]
    device: str
    python: str
    hostname: str
    started_at: str


class Hardware(TypedDict):
    """How the run was executed."""

    device: str
    autocast: Optional[str]
    compile: bool
    grad_accum: int
    #: torch CPU threads the run used (per process).
    threads: int
    #: Processes of a DDP run (1: no DDP).
    world_size: int
    #: Whether every DDP rank ended with bitwise identical parameters (``None``: no DDP).
    replicas_identical: Optional[bool]


class Summary(TypedDict):
    """``summary.json``: written once, last; a run is finished when it exists.

    ``lr`` is the effective peak learning rate (``base_lr * lr_mult``); ``variant_keys``
    are the overridden or swept config keys that name the ``<variant>`` folder (keys that
    form the rest of the path, and hardware/logger/progress keys, excluded).
    ``resumed_from`` lists the steps at which the run was resumed from a checkpoint.
    """

    task: str
    task_size: str
    optimizer: str
    lr: float
    base_lr: float
    lr_mult: float
    weight_decay: Optional[float]
    seed: int
    variant: str
    variant_keys: dict[str, Any]
    steps: int
    steps_done: int
    status: str  # "finished" | "diverged"
    diverged: bool
    final: dict[str, float]
    best: dict[str, float]
    target: Optional[Target]
    wall_time_s: float
    train_time_s: float
    step_time_ms: Optional[float]
    units_per_s: Optional[float]
    unit: str
    peak_memory_mb: float
    overrides: list[str]
    resumed_from: list[int]
    #: The last dead-direction diagnostics readings (``diag/...`` keys and their ``step``;
    #: ``ddc_bench.diagnose``), ``None`` when ``diagnostics.every`` is 0.
    diagnostics: Optional[dict[str, float]]
    provenance: Provenance
    task_info: dict[str, Any]
    hardware: Hardware


#: Every key of ``summary.json``.
SUMMARY_KEYS: frozenset[str] = frozenset(Summary.__annotations__)


def higher_is_better(metric: str) -> bool:
    """Accuracies are better when higher; losses, perplexities and gaps when lower (the
    direction of a metric without a declared target ``mode``)."""
    return metric.endswith("acc") or metric.endswith("accuracy")


def better(metric: str, new: float, old: float) -> bool:
    """Whether ``new`` is a better value of ``metric`` than ``old``."""
    return new > old if higher_is_better(metric) else new < old


def target_mode(metric: str, mode: str | None = None) -> str:
    """A target's direction: its declared ``mode`` (``"max"``/``"min"``), else the one
    :func:`higher_is_better` gives the metric (targets recorded before the mode was)."""
    if mode is not None:
        return mode
    return "max" if higher_is_better(metric) else "min"


def target_reached(value: float, threshold: float, mode: str) -> bool:
    """The one rule for "target reached": ``value`` at least (``max``) or at most
    (``min``) ``threshold``; a non-finite value never reaches it."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= threshold if mode == "max" else value <= threshold


class RunExistsError(FileExistsError):
    """Raised when a run folder already holds a finished run."""


class RunLockedError(RuntimeError):
    """Another live process owns the run folder."""


class ResultsDirError(ValueError):
    """``results_dir`` or ``run_name`` cannot hold the run (one-line message)."""


#: The longest file or folder name (bytes) of the common file systems (ext4, APFS, NTFS).
NAME_MAX = 255


def run_dir(results_dir: str | os.PathLike, task: str, size: str, optimizer: str,
            variant: str, seed: int) -> Path:
    """The folder of one run (see the module docstring for the layout).

    Raises :class:`ResultsDirError` when ``variant`` (e.g. a ``run_name``) would place the
    folder outside ``results_dir`` (``../x``, an absolute path).
    """
    root = Path(results_dir)
    folder = root / f"{task}-{size}" / optimizer / variant / f"seed{seed}"
    parts = Path(variant).parts
    if not parts or Path(variant).is_absolute() or any(p in ("..", ".") for p in parts) \
            or len(parts) != 1:
        raise ResultsDirError(
            f"invalid run_name {variant!r}: it must be a single folder name inside results_dir "
            f"(no '/', '..' or absolute path)")
    size = len(variant.encode("utf-8"))
    if size > NAME_MAX:
        raise ResultsDirError(
            f"the run's folder name {variant[:40]!r}... (run_name, or lr and the overridden "
            f"keys) is {size} bytes; folder names may have at most {NAME_MAX} bytes: set a "
            f"shorter run_name")
    return folder


def default_variant(lr: float) -> str:
    """The variant folder name for a run without ``run_name``: ``lr<lr>``."""
    return f"lr{lr:g}"


#: Longest variant folder name; longer ones are cut and end in a hash (filesystems allow 255 bytes).
MAX_VARIANT_LEN = 200


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def variant_name(lr: float, variant_keys: Mapping[str, Any]) -> str:
    """``lr<lr>``, then ``,key=value`` for each variant key in sorted order (Hydra's
    override-dirname style), sanitised into one safe folder name.

    Characters other than letters, digits and ``._=,+-`` become ``_``; a name longer than
    :data:`MAX_VARIANT_LEN` is cut and ends in a hash of the full name, so distinct keys
    always give distinct folders.
    """
    name = default_variant(lr)
    if variant_keys:
        name += "," + ",".join(f"{k}={_format_value(variant_keys[k])}" for k in sorted(variant_keys))
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > MAX_VARIANT_LEN:
        import hashlib

        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name[:MAX_VARIANT_LEN - 13] + "-" + digest
    return name


def check_results_dir(results_dir: str | os.PathLike) -> None:
    """Raise :class:`ResultsDirError` unless ``results_dir`` is (or can become) a writable
    folder: checked before any data or model is built."""
    path = Path(results_dir).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"is below {probe}, which is a file"
        raise ResultsDirError(f"results_dir={results_dir} {what}; point results_dir at a folder")
    try:  # a real write: permissions, read-only filesystems, quotas (root passes os.access)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ResultsDirError(
            f"results_dir={results_dir} is not writable ({probe}: {err.strerror or err}); "
            f"point results_dir at a writable folder") from None


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


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every OS opens folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` atomically when the block ends without error.

    The data go to a temporary file in the same folder, which is flushed, fsynced and
    renamed over ``path``; on an error (or an interrupt) the temporary file is removed and
    ``path`` keeps its old content. The file gets the usual mode (``0666 & ~umask``; a
    bare mkstemp file is 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; see :func:`atomic_writer`."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as indented JSON (non-finite floats become null)."""
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


class MetricsFileError(ValueError):
    """``metrics.jsonl`` no longer matches the checkpoint a run resumes from."""


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl``.

    Each record is written as one complete line and flushed, so a crash leaves every line
    before it intact (appending a line is the atomic unit for a log that grows).
    ``truncate_to`` (a resumed run: :meth:`offset` as saved in its checkpoint) first cuts
    the file back to that byte offset, dropping the lines written after the checkpoint,
    which the resumed run writes again identically.
    """

    def __init__(self, folder: str | os.PathLike, truncate_to: int | None = None) -> None:
        self.path = Path(folder) / METRICS_FILE
        if truncate_to is not None:
            with open(self.path, "ab") as f:
                if f.tell() < truncate_to:
                    raise MetricsFileError(
                        f"{self.path} is shorter ({f.tell()} bytes) than its checkpoint records "
                        f"({truncate_to} bytes): lines were lost after the checkpoint; restore "
                        f"the file, or resume=false to start afresh (the old folder is moved aside)")
                f.truncate(truncate_to)
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line and flush it."""
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()

    def offset(self) -> int:
        """Bytes written so far (saved in checkpoints: see ``truncate_to``)."""
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(folder: str | os.PathLike, strict: bool = False) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``. A torn line (a crash mid-write) or a
    missing file is skipped, or with ``strict`` (a finished run, whose file must be
    complete) a :class:`MetricsFileError` naming it."""
    records = []
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        if strict:
            raise MetricsFileError(f"{METRICS_FILE} is missing")
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if strict:
                raise MetricsFileError(f"{METRICS_FILE} line {number} is not a JSON record "
                                       f"(truncated or damaged)") from None
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


def iter_unfinished_runs(root: str | os.PathLike) -> Iterator[Path]:
    """Every folder under ``root`` that holds a run's config but no summary (a run that
    crashed, was stopped, or is still running), in sorted order."""
    for config in sorted(Path(root).rglob(CONFIG_FILE)):
        if not (config.parent / SUMMARY_FILE).is_file():
            yield config.parent


def last_logged_step(folder: str | os.PathLike) -> int | None:
    """The last ``step`` in a run folder's ``metrics.jsonl`` (None when there is none)."""
    steps = [r["step"] for r in read_metrics(folder) if isinstance(r.get("step"), int)]
    return steps[-1] if steps else None


def has_checkpoint(path: str | os.PathLike) -> bool:
    """True when the run folder ``path`` holds a checkpoint (the latest or the one before)."""
    path = Path(path)
    return (path / CHECKPOINT_FILE).is_file() or (path / PREV_CHECKPOINT_FILE).is_file()


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of a run folder: ``seed<S>.lock`` next to it (outside it, so that
    moving an interrupted folder aside never moves a live lock)."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}.lock")


class RunLock:
    """An exclusive lock on one run folder, held for the whole run.

    The lock is ``fcntl.flock`` on :func:`lock_path`: the kernel releases it when its
    process dies, however it dies, so a lock left by a killed run is never mistaken for a
    live one (stale locks need no clean-up). The file records the owner's pid and host;
    a second process aimed at the same folder stops with :class:`RunLockedError` naming
    the folder and that owner. Released (and the file removed) by :meth:`release`.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError` at once (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                owner = self._owner()
                raise RunLockedError(
                    f"{self.folder} is in use by another run ({owner}); wait for it to end "
                    f"or choose another results_dir or run_name") from None
            # The holder before us may have removed the file after we opened it: then we
            # locked an unlinked inode, and must retry on the file now at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def _owner(self) -> str:
        with contextlib.suppress(OSError):
            text = self.path.read_text().strip()
            if text:
                return text
        return "owner unknown"

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: see the inode check in acquire
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
