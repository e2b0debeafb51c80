"""What an optimizer step dispatches: aten operators and host-device synchronisations.

:class:`OpCounter` is a ``TorchDispatchMode`` that counts every aten operator dispatched
while it is active (one ``torch._foreach_mul_`` over 50 tensors is one operator; 50
``mul_`` calls are 50, which is what launch overhead scales with). Among them it counts
the *scalar reads* (``aten._local_scalar_dense``: ``.item()``, ``bool(tensor)``,
``float(tensor)``) and the *synchronisations*: operators that make the host wait for an
accelerator: a scalar read of, an operator with a data-dependent output shape on, or a
copy to the host from a tensor that is not on the CPU. On the CPU nothing needs to wait,
so synchronisations are 0 there; the scalar reads say what would wait on a GPU if those
tensors lived there. A step compiled by ``torch.compile`` runs as fused kernels below the
dispatcher: its operators are not seen (counted 0).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators whose result the host must read (``aten._local_scalar_dense``) or whose output
#: shape depends on the data (the host waits for it to allocate the output).
WAITING_OPS = frozenset({"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select",
                         "aten.unique", "aten._unique2", "aten.unique_consecutive",
                         "aten.unique_dim", "aten.repeat_interleave", "aten.equal"})
#: Copies that reach the host when their source is on an accelerator.
COPY_OPS = frozenset({"aten._to_copy", "aten.copy_", "aten.to"})


def _devices(tree: Any) -> set[str]:
    return {t.device.type for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten operators (:attr:`ops`, by name), scalar reads and
    host-device synchronisations while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.scalar_reads = 0
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        inputs = _devices((args, kwargs)) - {"meta"}
        on_accelerator = bool(inputs - {"cpu"})
        if name == "aten._local_scalar_dense":
            self.scalar_reads += 1
        out = func(*args, **kwargs)
        if name in WAITING_OPS and on_accelerator:
            self.syncs += 1
        elif name in COPY_OPS and on_accelerator and "cpu" in _devices(out if name != "aten.copy_" else args[0]):
            self.syncs += 1
        return out

    @property
    def total(self) -> int:
        """Every dispatched operator."""
        return sum(self.ops.values())


def count_step(step: Any) -> OpCounter:
    """Run ``step()`` once under an :class:`OpCounter`; return the counter."""
    with OpCounter() as counter:
        step()
    return counter
