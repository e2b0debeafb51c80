"""Building a run's task with one-line errors and no leftovers.

:func:`build_task_cleanly` turns a bad task value or an unreachable download into one
:class:`~ddc_bench.config.ConfigError` line, and removes the data folders that a failed
build created empty (a first download interrupted by a typo or a missing network must not
leave ``data/`` behind).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
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
    except BaseException:
        for top in created:
            _remove_empty_tree(top)
        raise
    finally:
        hub_log.setLevel(level)
        for top in created:  # also after the errors converted above
            if top.exists() and not any(p.is_file() for p in top.rglob("*")):
                _remove_empty_tree(top)
