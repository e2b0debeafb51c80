"""Option checking shared by the baseline builders.

A builder is ``build(model, **options)`` where ``options`` are the fields of
``configs/optimizer/NAME.yaml`` other than ``name``. Values may arrive as plain Python
objects or as OmegaConf nodes (a YAML list is an ``omegaconf.ListConfig``); the helpers
below turn them into plain ``float`` / ``int`` / ``bool`` / ``tuple`` values and raise a
``TypeError`` (wrong kind of value, unknown option) or ``ValueError`` (value out of range)
that names the optimizer and the option.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ddc.param_groups import ROLES

Builder = Callable[..., torch.optim.Optimizer]


def builder(name: str) -> Callable[[Builder], Builder]:
    """Decorate ``build(model, *, opt=default, ...)`` so that an unknown option raises a
    ``TypeError`` naming it and listing the valid ones (instead of Python's generic
    "unexpected keyword argument"), and so that a positional option is refused."""

    def wrap(fn: Builder) -> Builder:
        valid = [
            p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]

        @functools.wraps(fn)
        def build(model: nn.Module, *args: Any, **options: Any) -> torch.optim.Optimizer:
            if args:
                raise TypeError(f"optimizer {name!r}: options must be passed by keyword")
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"optimizer {name!r}: expected an nn.Module, got {type(model).__name__}"
                )
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise TypeError(
                    f"optimizer {name!r}: unknown option(s) {unknown}; "
                    f"valid options are {valid}"
                )
            return fn(model, **options)

        build.optimizer_name = name  # type: ignore[attr-defined]
        return build

    return wrap


def option_defaults(build: Builder) -> dict[str, Any]:
    """The default of every option of a builder (its keyword-only parameters)."""
    return {
        p.name: p.default
        for p in inspect.signature(inspect.unwrap(build)).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _where(opt: str, option: str) -> str:
    return f"optimizer {opt!r}: option {option!r}"


def as_float(
    opt: str,
    option: str,
    value: Any,
    *,
    low: float | None = 0.0,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval [low, high] (ends open where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_where(opt, option)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_where(opt, option)} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(
            f"{_where(opt, option)} must be {'>' if low_open else '>='} {low}, got {value}"
        )
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(
            f"{_where(opt, option)} must be {'<' if high_open else '<='} {high}, got {value}"
        )
    return value


def as_int(opt: str, option: str, value: Any, *, low: int = 0) -> int:
    """``value`` as an int >= low (a float that is an integer is refused, to catch typos)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_where(opt, option)} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{_where(opt, option)} must be >= {low}, got {value}")
    return int(value)


def as_bool(opt: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{_where(opt, option)} must be true or false, got {value!r}")
    return value


def as_choice(opt: str, option: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{_where(opt, option)} must be one of {list(choices)}, got {value!r}")
    return value


def as_float_tuple(
    opt: str, option: str, value: Any, length: int, **bounds: Any
) -> tuple[float, ...]:
    """A YAML list (or any sequence) of ``length`` numbers as a tuple of floats, each
    checked with :func:`as_float` and ``bounds``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{_where(opt, option)} must be a list of {length} numbers, got {value!r}")
    items = list(value)
    if len(items) != length:
        raise ValueError(
            f"{_where(opt, option)} must have {length} entries, got {len(items)}: {items!r}"
        )
    return tuple(as_float(opt, f"{option}[{i}]", v, **bounds) for i, v in enumerate(items))


def as_betas(opt: str, option: str, value: Any) -> tuple[float, float]:
    """Adam-style ``(beta1, beta2)``, each in [0, 1)."""
    b1, b2 = as_float_tuple(opt, option, value, 2, low=0.0, high=1.0, high_open=True)
    return b1, b2


def check_role_group(owner: str, param_group: dict[str, Any], matrix_roles: Sequence[str]) -> None:
    """Refuse a param group without a ``role`` from ``ddc.param_groups.ROLES``, or one whose
    role is in ``matrix_roles`` but holds a parameter with fewer than two dimensions.

    Call it before ``Optimizer.add_param_group``; a lone tensor or a generator in
    ``params`` is turned into a list first so that checking does not consume it."""
    role = param_group.get("role") if isinstance(param_group, dict) else None
    if role not in ROLES:
        raise ValueError(
            f"{owner} needs every param group to carry a 'role' in {ROLES} "
            f"(build the groups with ddc.param_groups.param_groups); got role={role!r}"
        )
    params = param_group["params"]
    param_group["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
    if role in matrix_roles:
        for p in params:
            if p.ndim < 2:
                raise ValueError(f"{owner} role {role!r} needs parameters with >= 2 dimensions, "
                                 f"got shape {tuple(p.shape)}")
