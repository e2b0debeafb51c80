"""Where a run came from: code version, package versions, machine, start time.

Everything here is best effort and never fails a run: a value that cannot be found is
recorded as ``None`` (e.g. the git commit when the code is not a git checkout).
"""

from __future__ import annotations

import datetime as dt
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

#: The distributions whose versions are recorded in every summary.
PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "datasets", "numpy", "pandas",
            "ddc-bench")

#: The repository holding this package (a git checkout for editable installs).
REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    """Output of a read-only git command in :data:`REPO_ROOT`, or ``None`` on any failure."""
    try:
        out = subprocess.run(
            # --no-optional-locks: `git status` must not even refresh the index.
            ["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> tuple[str | None, bool | None]:
    """(commit hash, dirty flag) of :data:`REPO_ROOT`; ``(None, None)`` outside a git checkout.

    Dirty means modified tracked files or untracked, non-ignored files; a repository with no
    commit yet gives ``(None, True)``.
    """
    if _git("rev-parse", "--is-inside-work-tree") != "true":
        return None, None
    commit = _git("rev-parse", "--verify", "--quiet", "HEAD") or None
    status = _git("status", "--porcelain")
    return commit, (None if status is None else bool(status))


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU model, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def collect(device: torch.device, started_at: dt.datetime) -> dict[str, Any]:
    """The ``provenance`` block of ``summary.json``."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "packages": package_versions(),
        "device": device_name(device),
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "started_at": started_at.isoformat(timespec="seconds"),
    }
