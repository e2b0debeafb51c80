"""Building a run's task with one-line errors and no leftovers.

:func:`build_task_cleanly` turns a bad task value or an unreachable download into one
:class:`~ddc_bench.config.ConfigError` line, and removes the data folders that a failed
build created empty (a first download interrupted by a typo or a missing network must not
leave ``data/`` behind).
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ddc_bench.config import ConfigError


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _missing_dirs(paths: Sequence[Any]) -> list[Path]:
    """The topmost not-yet-existing folder of each path (what a failed build may leave)."""
    out = []
    for p in paths:
        if not p:
            continue
        path = Path(str(p)).expanduser().absolute()
        top = None
        while not path.exists() and path.parent != path:
            top, path = path, path.parent
        if top is not None:
            out.append(top)
    return out


def _remove_empty_tree(top: Path) -> None:
    """Remove ``top`` if it holds nothing but empty folders (never a file)."""
    if not top.is_dir():
        return
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def _undecodable(path: Path, encoding: str = "utf-8") -> bool:
    """Whether ``path`` is not valid ``encoding`` text (read in chunks)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except (UnicodeDecodeError, OSError):
        return True
    return False


def _dataset_problem(data: Any, err: BaseException) -> str:
    """One line for a ``datasets`` failure: the local file that is not UTF-8 text when there
    is one, else the error's own first line and its cause's."""
    files = data.get("files") if data.get("source") == "local" else None
    if files:
        if isinstance(files, (str, Path)):
            files = [files]
        paths = ([f for split in files.values() for f in ([split] if isinstance(split, str) else split)]
                 if hasattr(files, "values") else list(files))
        for path in paths:
            if Path(str(path)).is_file() and _undecodable(Path(str(path))):
                return (f"task.data.files: {path} is not UTF-8 text (task.data.source=local "
                        f"reads UTF-8 text files)")
    cause = f" ({first_line(err.__cause__)})" if err.__cause__ is not None else ""
    return f"could not load the dataset: {first_line(err)}{cause}"


@contextlib.contextmanager
def _no_dataset_progress_bars() -> Iterator[None]:
    """``datasets``' progress bars off, restored afterwards."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def build_task_cleanly(task_cfg: Any, num_workers: int, build: Callable[..., Any]) -> Any:
    """``build(task_cfg, num_workers=...)``; a bad value or an unreachable download becomes
    one :class:`ConfigError` line, and data folders the failed build created empty are removed."""
    data = task_cfg.get("data") or {}
    created = _missing_dirs([data.get("root"), data.get("cache_dir")])
    # huggingface_hub logs every retry of an unreachable Hub; the failure is reported below.
    # (Imported first: their imports set the level themselves.)
    if data.get("source") == "hub":
        for name in ("huggingface_hub", "datasets"):
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    quiet = contextlib.ExitStack()
    if data.get("source") == "local" and importlib.util.find_spec("datasets") is not None:
        quiet.enter_context(_no_dataset_progress_bars())  # "Generating train split" for local files
    try:
        return build(task_cfg, num_workers=num_workers)
    except (ValueError, TypeError) as err:  # a bad task config value (e.g. task.size=huge)
        raise ConfigError(f"task={task_cfg.get('name')}: {first_line(err)}") from None
    except FileNotFoundError:
        raise
    except OSError as err:  # URLError, ConnectionError, ...: no network or no access
        raise ConfigError(
            f"task={task_cfg.get('name')}: could not fetch the data ({first_line(err)}); "
            f"check the network, or use data that is already on disk") from None
    except Exception as err:
        if type(err).__module__.split(".")[0] == "datasets":  # e.g. DatasetGenerationError
            raise ConfigError(f"task={task_cfg.get('name')}: {_dataset_problem(data, err)}") from None
        for top in created:
            _remove_empty_tree(top)
        raise
    except BaseException:
        for top in created:
            _remove_empty_tree(top)
        raise
    finally:
        quiet.close()
        hub_log.setLevel(level)
        for top in created:  # also after the errors converted above
            if top.exists() and not any(p.is_file() for p in top.rglob("*")):
                _remove_empty_tree(top)
