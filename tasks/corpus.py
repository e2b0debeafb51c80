"""Byte-level text corpora for ``gpt_lm``: built-in (offline), local files, or the Hub.

Every source yields two ``uint8`` tensors of UTF-8 bytes, ``train`` and ``val``; the
vocabulary is the 256 byte values, so no tokenizer is ever downloaded.

* ``builtin``: the source text of Python's standard library, concatenated in sorted
  module order (``sys.stdlib_module_names``), built once and cached. No network. The
  bytes depend on the Python build (they are the files of this interpreter's stdlib), so
  :func:`builtin_corpus` names the cache file after the exact Python version and
  :func:`describe` reports a SHA-256 to tell corpora apart.
* ``local``: text files loaded with ``datasets.load_dataset("text", ...)``.
* ``hub``: ``datasets.load_dataset(name, config_name)``.

Validation text is the dataset's ``validation`` split when it has one, otherwise the last
``val_fraction`` of the training text.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

#: Bump when the recipe of the built-in corpus changes (it is part of the cache name).
BUILTIN_VERSION = 1
#: Standard-library packages left out of the built-in corpus: the regression-test suite
#: (not part of every install) and the codec tables of ``encodings`` (megabytes of hex).
BUILTIN_EXCLUDED_MODULES = frozenset({"test", "encodings"})
#: Directories skipped inside packages (test suites shipped with some packages).
BUILTIN_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
SOURCES = ("builtin", "local", "hub")


def default_cache_dir() -> Path:
    """``$DDC_BENCH_CACHE``, else ``$XDG_CACHE_HOME/ddc_bench``, else ``~/.cache/ddc_bench``."""
    if os.environ.get("DDC_BENCH_CACHE"):
        return Path(os.environ["DDC_BENCH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ddc_bench"


def stdlib_source_files() -> list[tuple[str, Path]]:
    """The standard library's ``.py`` files, as ``(relative name, path)``, in corpus order.

    Modules are visited in sorted order of ``sys.stdlib_module_names``; a package
    contributes all its ``.py`` files in sorted path order. Built-in (C) modules have no
    source and are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, Path]] = []
    for name in sorted(sys.stdlib_module_names):
        if name in BUILTIN_EXCLUDED_MODULES:
            continue
        module_file, package_dir = root / f"{name}.py", root / name
        if module_file.is_file():
            files.append((module_file.relative_to(root).as_posix(), module_file))
        elif (package_dir / "__init__.py").is_file():
            for path in sorted(package_dir.rglob("*.py")):
                rel = path.relative_to(root)
                if BUILTIN_EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]):
                    files.append((rel.as_posix(), path))
    return files


def build_builtin_corpus() -> bytes:
    """The built-in corpus: each stdlib source file, preceded by a ``# file: NAME`` line."""
    parts = []
    for rel, path in stdlib_source_files():
        text = path.read_bytes()
        parts.append(b"# file: " + rel.encode() + b"\n" + text.rstrip(b"\n") + b"\n\n")
    return b"".join(parts)


def builtin_corpus(cache_dir: str | os.PathLike | None = None) -> tuple[bytes, Path]:
    """The built-in corpus and its cache file, building and caching it on first use."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    version = ".".join(map(str, sys.version_info[:3]))
    path = cache / f"stdlib-corpus-v{BUILTIN_VERSION}-py{version}.txt"
    if path.is_file():
        return path.read_bytes(), path
    data = build_builtin_corpus()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic write: concurrent runs may build the same cache file at once.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return data, path


def to_tensor(data: bytes | bytearray) -> torch.Tensor:
    """Bytes as a ``uint8`` tensor (``bytes`` are copied so the tensor is writable; a
    ``bytearray`` is shared, not copied)."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)


def split_tail(data: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the last ``val_fraction`` of ``data`` for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"task.data.val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(round(len(data) * (1.0 - val_fraction)))
    return data[:cut], data[cut:]


def _join_texts(texts: Iterable[str], out: bytearray) -> None:
    """Append documents to ``out`` as UTF-8, ending each with a newline if it lacks one."""
    for text in texts:
        if text:
            out += text.encode("utf-8")
            if not text.endswith("\n"):
                out += b"\n"


def _dataset_bytes(ds: Any, split: str, field: str) -> bytearray:
    """The text column of ``ds[split]`` joined into one buffer, read in chunks of rows so
    a large dataset (TinyStories: ~2 GB) is never held twice as Python strings."""
    if field not in ds[split].column_names:
        raise ValueError(
            f"split {split!r} has no column {field!r} (columns: {ds[split].column_names}); "
            f"set task.data.text_field"
        )
    out = bytearray()
    for rows in ds[split].select_columns([field]).iter(batch_size=10_000):
        _join_texts(rows[field], out)
    return out


def _normalise_files(files: Any) -> list[str] | dict[str, list[str]]:
    """``task.data.files`` as a list of paths, or a dict split → list of paths (e.g.
    ``{train: [a.txt], validation: [b.txt]}``), the two forms ``load_dataset`` accepts."""
    if isinstance(files, (str, os.PathLike)):
        return [str(files)]
    if isinstance(files, dict):
        return {str(split): [str(f) for f in _normalise_files(fs)] for split, fs in files.items()}
    return [str(f) for f in files]


def load_corpus(data_cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train and validation byte tensors for ``task.data``, and facts for ``describe()``."""
    source = data_cfg["source"]
    info: dict[str, Any] = {"source": source}
    if source == "builtin":
        raw, path = builtin_corpus(data_cfg.get("cache_dir"))
        info.update(cache_file=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                    python=".".join(map(str, sys.version_info[:3])))
        train, val = split_tail(to_tensor(raw), data_cfg["val_fraction"])
        return train, val, info
    if source not in ("local", "hub"):
        raise ValueError(f"task.data.source must be one of {list(SOURCES)}, got {source!r}")

    import datasets  # heavy import, only when needed

    field = data_cfg["text_field"]
    if source == "local":
        files = data_cfg.get("files")
        if not files:
            raise ValueError("task.data.source=local needs task.data.files (a list of text files)")
        files = _normalise_files(files)
        missing = [f for split_files in (files.values() if isinstance(files, dict) else [files])
                   for f in split_files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"task.data.files not found: {missing}")
        # One row per file (sample_by="document"): line breaks are kept as in the file.
        ds = datasets.load_dataset("text", data_files=files, sample_by="document",
                                   cache_dir=data_cfg.get("cache_dir"))
        info["files"] = files
    else:
        if not data_cfg.get("name"):
            raise ValueError("task.data.source=hub needs task.data.name (e.g. roneneldan/TinyStories)")
        ds = datasets.load_dataset(data_cfg["name"], data_cfg.get("config_name"),
                                   cache_dir=data_cfg.get("cache_dir"))
        info.update(name=data_cfg["name"], config_name=data_cfg.get("config_name"))
    if "train" not in ds:
        raise ValueError(f"the dataset has no 'train' split (splits: {list(ds)})")
    train = to_tensor(_dataset_bytes(ds, "train", field))
    if "validation" in ds:
        val = to_tensor(_dataset_bytes(ds, "validation", field))
        info["val_split"] = "validation"
    else:
        train, val = split_tail(train, data_cfg["val_fraction"])
        info["val_split"] = f"last {data_cfg['val_fraction']:g} of train"
    return train, val, info
