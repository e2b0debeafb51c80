"""DDC — Dead-Direction Conditioners: gauge-equivariant preconditioning for Adam and Muon.

Usable on its own::

    from ddc import DDC
    optimizer = DDC(model, base="adam", lr=1e-3, weight_decay=0.1)   # model.gauges() declares the symmetries
    optimizer = DDC(model, gauges="auto", example_input=x)             # or: found by ddc.find_gauges

See ``docs/ddc.md``.
"""

from . import gauges
from .find import FoundGauges, find_gauges
from .gauges import (GroupedHeadRotation, GroupedHeadRotationVO, HeadRotation, HeadRotationVO, LogitShift, NormGain,
                     QKPairScale, UnitRescale)
from .optimizer import DDC
from .param_groups import param_groups, parameter_roles
from .verify import GaugeDeclarationError, verify_gauges

__all__ = [
    "DDC", "gauges", "verify_gauges", "find_gauges", "FoundGauges", "GaugeDeclarationError", "param_groups", "parameter_roles",
    "LogitShift", "UnitRescale", "NormGain", "HeadRotation", "HeadRotationVO",
    "GroupedHeadRotation", "GroupedHeadRotationVO", "QKPairScale",
]
