"""The config schema and its validation, run before any training starts.

Two rules, both producing a one-line :class:`ConfigError` that names the key and the
expected type:

* **Top level** — :class:`BenchConfig` (a dataclass, the structured-config schema) types
  every top-level key of ``configs/config.yaml``. Hydra's struct mode already rejects
  unknown keys given on the command line; :func:`validate` also rejects unknown keys that
  an experiment file would otherwise add silently.
* **Group nodes** (``task``, ``optimizer``, ``hardware``, ``logger``) — no per-task or
  per-optimizer schema code: each leaf is checked against the type of its default in the
  selected group YAML (``configs/<group>/<choice>.yaml``), so adding a task or an optimizer
  needs only its YAML. Where a task YAML default is ``null`` (a field the size preset
  supplies), the preset's value in ``tasks.<name>.PRESETS[size]`` gives the type.

Why not let Hydra enforce the schema during composition? Its messages span several lines
and it cannot see the group YAMLs' types; checking the composed config here gives one
message format for the command line and for experiment files alike.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

#: The repository's ``configs/`` folder (the Hydra config path of ``ddc-bench``).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: Config groups whose nodes are checked against their YAML defaults.
GROUPS = ("task", "optimizer", "hardware", "logger")


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key and what was expected."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (see :mod:`ddc_bench.schedule`)."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = 0.05
    #: Absolute warmup length; wins over ``warmup_fraction`` when set.
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.1


@dataclass
class DiagnosticsConfig:
    """Dead-direction diagnostics logged during training (``ddc.diagnostics``; see
    :mod:`ddc_bench.diagnose`)."""

    #: Steps between readings (at the first log record at or after each multiple, and at
    #: the last step); 0 → off.
    every: int = 0
    #: Samples (sequences or images) in the fixed probe batch the readings are taken on.
    probe_batch: int = 2


@dataclass
class BenchConfig:
    """Schema of the top level of ``configs/config.yaml``.

    The group nodes are typed ``Any`` here: they are checked against their YAMLs instead.
    """

    seed: int = 0
    #: Optimizer steps; ``None`` → the task's own budget (``task.steps``).
    steps: Optional[int] = None
    results_dir: str = "results"
    #: The ``<variant>`` folder of the run; ``None`` → ``lr<lr>`` plus the overridden keys.
    run_name: Optional[str] = None
    #: Multiplies ``optimizer.lr`` (a learning-rate sweep that works for every optimizer).
    lr_mult: float = 1.0
    #: Steps between evaluations; ``None`` → about 10 evaluations per run.
    eval_every: Optional[int] = None
    log_every: int = 10
    #: Steps between checkpoints; ``None`` → at each evaluation; 0 → only on a signal and
    #: at the end.
    checkpoint_every: Optional[int] = None
    #: ``auto``: continue a run folder that holds a checkpoint, else start; ``true``: must
    #: continue; ``false``: start afresh (an unfinished folder is moved aside).
    resume: Union[bool, Literal["auto"]] = "auto"
    #: Max global gradient norm; ``None`` or 0 → no clipping.
    grad_clip: Optional[float] = 1.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    progress: bool = True
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    task: Any = None
    optimizer: Any = None
    hardware: Any = None
    logger: Any = None


# --------------------------------------------------------------------------------------
# Type checks of single values
# --------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    """Human name of a schema type: ``int``, ``int or null``, ``one of a, b``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if tp is bool:
        return "bool (true/false)"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is acceptable for schema type ``tp`` (ints count as floats)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _fail(key: str, value: Any, expected: str, where: str = "") -> ConfigError:
    shown = "null" if value is None else repr(value)
    return ConfigError(f"invalid value for '{key}': {shown} (expected {expected}{where})")


# --------------------------------------------------------------------------------------
# Top level: the dataclass schema
# --------------------------------------------------------------------------------------

def _check_dataclass(node: Mapping[str, Any], schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{full}' (known: {', '.join(fields)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                names = ", ".join(f.name for f in dataclasses.fields(tp))
                raise _fail(full, value, f"a group of keys {names}")
            _check_dataclass(value, tp, f"{full}.")
        elif tp is Any:
            continue
        elif not _matches(value, tp):
            raise _fail(full, value, _type_name(tp))


#: The largest seed NumPy accepts (``np.random.seed``: 32-bit).
MAX_SEED = 2**32 - 1


def _check_ranges(cfg: Mapping[str, Any]) -> None:
    """Value ranges the types cannot express."""
    if not 0 <= cfg["seed"] <= MAX_SEED:
        raise _fail("seed", cfg["seed"], f"an int in [0, {MAX_SEED}]")
    if not cfg["lr_mult"] > 0 or not math.isfinite(cfg["lr_mult"]):
        raise _fail("lr_mult", cfg["lr_mult"], "a positive number")
    if cfg["checkpoint_every"] is not None and cfg["checkpoint_every"] < 0:
        raise _fail("checkpoint_every", cfg["checkpoint_every"],
                    "a non-negative int (0: only on a signal and at the end) or null")
    positive = {"steps": cfg["steps"], "eval_every": cfg["eval_every"], "log_every": cfg["log_every"]}
    for key, value in positive.items():
        if value is not None and value < 1:
            raise _fail(key, value, "a positive int" + ("" if key == "log_every" else " or null"))
    if cfg["grad_clip"] is not None and not (0 <= cfg["grad_clip"] < math.inf):
        raise _fail("grad_clip", cfg["grad_clip"], "a non-negative float, or null/0 for no clipping")
    diag = cfg["diagnostics"]
    if diag["every"] < 0:
        raise _fail("diagnostics.every", diag["every"], "a non-negative int (0: off)")
    if diag["probe_batch"] < 1:
        raise _fail("diagnostics.probe_batch", diag["probe_batch"], "a positive int")
    sched = cfg["schedule"]
    if not 0.0 <= sched["warmup_fraction"] < 1.0:
        raise _fail("schedule.warmup_fraction", sched["warmup_fraction"], "a float in [0, 1)")
    if sched["warmup_steps"] is not None and sched["warmup_steps"] < 0:
        raise _fail("schedule.warmup_steps", sched["warmup_steps"], "a non-negative int or null")
    if not 0.0 <= sched["min_lr_ratio"] <= 1.0:
        raise _fail("schedule.min_lr_ratio", sched["min_lr_ratio"], "a float in [0, 1]")


# --------------------------------------------------------------------------------------
# Group nodes: each leaf against its default in the group YAML
# --------------------------------------------------------------------------------------

def group_yaml(group: str, choice: str, config_dir: Path = CONFIG_DIR) -> Path:
    """The YAML file of option ``choice`` of config group ``group``."""
    return config_dir / group / f"{choice}.yaml"


def load_group_defaults(group: str, choice: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The defaults of a group option as plain Python data (its ``defaults`` list dropped).

    A ``defaults`` list naming sibling options of the same group (``- base``) is honoured:
    those files are merged first, as Hydra would.
    """
    raw = OmegaConf.load(group_yaml(group, choice, config_dir))
    if not isinstance(raw, DictConfig):
        return {}
    merged = OmegaConf.create()
    own = OmegaConf.masked_copy(raw, [k for k in raw if k != "defaults"])
    for entry in raw.get("defaults", []) or []:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, own)
            own = None
        elif isinstance(entry, str) and group_yaml(group, entry, config_dir).is_file():
            merged = OmegaConf.merge(merged, load_group_defaults(group, entry, config_dir))
    if own is not None:
        merged = OmegaConf.merge(merged, own)
    return OmegaConf.to_container(merged, resolve=False)  # type: ignore[return-value]


def _kind_of(default: Any) -> tuple[str, Any]:
    """(expected-type name, predicate) for a YAML default value."""
    if isinstance(default, bool):
        return "bool (true/false)", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "int", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(default, str):
        # Numbers are accepted for text fields (``run_name=1``) and stored as text.
        return "str", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)
    if isinstance(default, list):
        return "list", lambda v: isinstance(v, (list, ListConfig))
    if isinstance(default, dict):
        return "a group of keys", lambda v: isinstance(v, (dict, DictConfig))
    return type(default).__name__, lambda v: isinstance(v, type(default))


def _check_against(node: Any, default: Any, key: str, source: str) -> None:
    """Check ``node`` (a composed value) against ``default`` (taken from ``source``)."""
    if default is None or node is None:
        # null default: nothing to compare against; null value: an explicit "unset",
        # legitimate for e.g. hardware.autocast=null on the cuda_bf16 profile.
        return
    expected, ok = _kind_of(default)
    if not ok(node):
        raise _fail(key, node, expected, f", as in {source}")
    if isinstance(default, dict):
        for sub, value in node.items():
            if sub not in default:
                raise ConfigError(f"unknown config key '{key}.{sub}' ({source} has no such field)")
            _check_against(value, default[sub], f"{key}.{sub}", source)
    elif isinstance(default, list) and default and len({type(d) for d in default}) == 1:
        for i, value in enumerate(node):  # a homogeneous list: every element like the first
            _check_against(value, default[0], f"{key}[{i}]", source)


def _task_presets(task_name: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """``(PRESETS, DEFAULTS)`` of the module ``tasks.<name>`` (empty when it has none).

    Task modules follow the convention of ``tasks/config.py``: ``PRESETS`` maps each size
    to the fields it supplies (the ones the YAML leaves ``null``), ``DEFAULTS`` holds the
    size-independent defaults.
    """
    try:
        module = importlib.import_module(f"tasks.{task_name}")
    except ImportError:
        return {}, {}
    return getattr(module, "PRESETS", {}) or {}, getattr(module, "DEFAULTS", {}) or {}


def _lookup(node: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _check_group(cfg_node: Any, group: str, choice: str, config_dir: Path) -> None:
    """Check every leaf of a group node against the selected option's YAML."""
    defaults = load_group_defaults(group, choice, config_dir)
    source = f"configs/{group}/{choice}.yaml"
    if not isinstance(cfg_node, Mapping):
        raise _fail(group, cfg_node, f"the {group} group; choose one with {group}=NAME")
    presets, task_defaults = _task_presets(choice) if group == "task" else ({}, {})
    size = cfg_node.get("size") if group == "task" else None

    def walk(node: Mapping[str, Any], default: Mapping[str, Any], path: list[str]) -> None:
        for sub, value in node.items():
            key = ".".join([group, *path, sub])
            if sub not in default:
                if group == "optimizer" and not path and "library" in default:
                    continue   # a library optimizer's own keyword: its builder checks it against the class
                raise ConfigError(f"unknown config key '{key}' ({source} has no such field)")
            dflt = default[sub]
            if isinstance(dflt, Mapping) and isinstance(value, Mapping):
                walk(value, dflt, [*path, sub])
            elif dflt is None and group == "task":
                # The YAML leaves preset-supplied fields null: the preset's value types it.
                preset = _lookup(presets.get(size), [*path, sub])
                where = f"the '{size}' preset of task {choice}"
                if preset is None:
                    preset, where = _lookup(task_defaults, [*path, sub]), f"task {choice}'s defaults"
                _check_against(value, preset, key, where)
            else:
                _check_against(value, dflt, key, source)

    walk(cfg_node, defaults, [])


def _coerce_text(node: DictConfig, defaults: Mapping[str, Any]) -> None:
    """Store numbers given for text fields as text (``task.data.root=123`` → ``"123"``)."""
    for key in list(node.keys()):
        value, dflt = node[key], defaults.get(key) if isinstance(defaults, Mapping) else None
        if isinstance(value, DictConfig) and isinstance(dflt, Mapping):
            _coerce_text(value, dflt)
        elif isinstance(dflt, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
            node[key] = str(value)


def _check_task_sizes(task: Mapping[str, Any]) -> None:
    """Sizes must be positive: every int (or list of ints) under ``task.model``, and
    ``task.data.eval_examples``; ``task.model.mlp_ratio`` must be > 0 (a model with no
    blocks or no width trains nothing meaningful)."""
    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for sub, value in node.items():
                walk(value, f"{key}.{sub}")
        elif isinstance(node, (list, tuple)):
            if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in node):
                raise _fail(key, list(node), "a list of positive ints")
        elif isinstance(node, int) and not isinstance(node, bool) and node < 1:
            raise _fail(key, node, "a positive int")

    walk(task.get("model") or {}, "task.model")
    ratio = (task.get("model") or {}).get("mlp_ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio <= 0:
        raise _fail("task.model.mlp_ratio", ratio, "a positive number")
    examples = (task.get("data") or {}).get("eval_examples")
    if isinstance(examples, int) and not isinstance(examples, bool) and examples < 1:
        raise _fail("task.data.eval_examples", examples, "a positive int or null (all)")
    for key in ("batch_size", "steps"):
        value = task.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise _fail(f"task.{key}", value, "a positive int")


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

def validate(cfg: DictConfig, choices: Mapping[str, Any], config_dir: Path = CONFIG_DIR) -> None:
    """Check a composed config; raise :class:`ConfigError` (one line) on the first problem.

    ``choices`` maps each config group to the selected option (Hydra's
    ``hydra.runtime.choices``). Numbers given for text fields are converted to text in
    ``cfg`` (the only change made).
    """
    for top in ("results_dir", "run_name"):  # text fields: numbers are stored as text
        if isinstance(cfg.get(top), (int, float)) and not isinstance(cfg.get(top), bool):
            cfg[top] = str(cfg[top])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    _check_dataclass(plain, BenchConfig, "")
    defaults = dataclasses.asdict(BenchConfig())
    _check_ranges({**defaults, **plain,
                   "schedule": {**defaults["schedule"], **plain.get("schedule", {})},
                   "diagnostics": {**defaults["diagnostics"], **plain.get("diagnostics", {})}})
    for group in GROUPS:
        if group not in plain:
            raise ConfigError(f"missing config group '{group}' (choose with {group}=NAME)")
        choice = choices.get(group)
        if choice is None or not group_yaml(group, choice, config_dir).is_file():
            continue  # e.g. a group node built in code; nothing to compare against
        _check_group(plain[group], group, choice, config_dir)
        _coerce_text(cfg[group], load_group_defaults(group, choice, config_dir))
    if isinstance(plain.get("task"), Mapping):
        _check_task_sizes(plain["task"])
    if isinstance(plain.get("optimizer"), Mapping):
        _check_optimizer_eps(plain["optimizer"])


def _check_optimizer_eps(optimizer: Mapping[str, Any]) -> None:
    """``eps``-like options guard a division (Adam's ``sqrt(v) + eps``, a normalisation):
    they must be positive and finite, or the first step divides by zero."""
    for key, value in optimizer.items():
        if (key == "eps" or key.endswith("_eps")) and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and not 0 < value < math.inf:
            raise _fail(f"optimizer.{key}", value, "a positive finite number")
