"""DDC — Dead-Direction Conditioners: gauge-equivariant preconditioning for Adam and Muon.

Usable on its own::

    from ddc import DDC
    optimizer = DDC(model, base="adam", lr=1e-3, weight_decay=0.1)   # model.gauges() declares the symmetries
    optimizer = DDC(model, gauges="auto", example_input=x)             # or: found by ddc.find_gauges

See ``docs/ddc.md``.

The optimizer, ``find`` and ``verify`` are imported lazily (PEP 562 module ``__getattr__``):
the baselines use ``ddc.param_groups`` and ``ddc.muon_kernels`` without importing the
optimizer, and ``from ddc import DDC`` imports it when asked. The gauge vocabulary and
the grouping rule are light and imported here (``ddc.param_groups`` is the function, as
``from .param_groups import param_groups`` binds it over the submodule of that name).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import gauges
from .gauges import (GroupedHeadRotation, GroupedHeadRotationVO, HeadRotation, HeadRotationVO, LogitShift, NormGain,
                     QKPairScale, UnitRescale)
from .param_groups import param_groups, parameter_roles

#: public name -> the submodule that defines it
_EXPORTS = {
    "DDC": "optimizer",
    "find_gauges": "find", "FoundGauges": "find",
    "verify_gauges": "verify", "GaugeDeclarationError": "verify",
}

__all__ = ["DDC", "gauges", "verify_gauges", "find_gauges", "FoundGauges", "GaugeDeclarationError",
           "param_groups", "parameter_roles", "LogitShift", "UnitRescale", "NormGain", "HeadRotation",
           "HeadRotationVO", "GroupedHeadRotation", "GroupedHeadRotationVO", "QKPairScale"]

if TYPE_CHECKING:  # pragma: no cover
    from .find import FoundGauges, find_gauges
    from .optimizer import DDC
    from .verify import GaugeDeclarationError, verify_gauges


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ddc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
