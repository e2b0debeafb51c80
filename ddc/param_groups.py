"""The project's single parameter-grouping rule.

Every optimizer in the benchmark (the baselines and DDC) groups parameters with
:func:`param_groups`, so a comparison never differs in which tensors are decayed or which
tensors count as "hidden matrices".

Roles:

* ``matrix``    the hidden matrices Muon orthogonalises, recognised by what they do, not
                by their module's class: a parameter with two or more dimensions whose name
                ends in ``weight`` (``weight``, ``in_proj_weight``), in a module that is not
                an embedding (``nn.Embedding``, ``nn.EmbeddingBag``), other than the readout:
                ``nn.Linear`` and ``nn.ConvNd`` weights, ``nn.MultiheadAttention``'s packed
                projection, Hugging Face's ``Conv1D`` (stored in × out).
* ``embedding`` every other parameter with two or more dimensions: ``nn.Embedding``
                tables, positional tables, class tokens, and a readout tied to an embedding.
* ``readout``   the weight of the model's untied output layer (``model.readout``).
* ``vector``    parameters with fewer than two dimensions: biases and norm gains.

Weight decay applies to every parameter with two or more dimensions and to nothing else.
"""

from __future__ import annotations

from typing import Any

from torch import nn

ROLES = ("matrix", "embedding", "readout", "vector")
_EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)


def parameter_roles(model: nn.Module) -> dict[nn.Parameter, str]:
    """Return the role of every trainable parameter of ``model`` (see the module docstring).

    The readout is the module a model exposes as ``model.readout`` (an ``nn.Linear``);
    a model without that attribute has no readout. A parameter shared by several modules
    (a tied readout) gets the role of the first module that owns it in ``model.modules()``.
    """
    readout = getattr(model, "readout", None)
    readout_weight = readout.weight if isinstance(readout, nn.Linear) else None
    roles: dict[nn.Parameter, str] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param in roles or not param.requires_grad:
                continue
            if param.ndim < 2:
                role = "vector"
            elif param is readout_weight and not _is_tied(model, param, module):
                role = "readout"
            elif name.endswith("weight") and not isinstance(module, _EMBEDDING_MODULES):
                role = "matrix"
            else:
                role = "embedding"
            roles[param] = role
    return roles


def _is_tied(model: nn.Module, param: nn.Parameter, owner: nn.Module) -> bool:
    """True when ``param`` is also owned by a module other than ``owner`` (weight tying)."""
    return any(
        p is param and m is not owner
        for m in model.modules()
        for p in m.parameters(recurse=False)
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into one group per role, in the order of :data:`ROLES`.

    Each group is ``{"params": [...], "weight_decay": wd, "role": role}`` where ``wd`` is
    ``weight_decay`` for parameters with two or more dimensions and ``0.0`` otherwise.
    Empty roles are left out. The extra ``role`` key travels inside ``torch.optim``
    param groups, so an optimizer can treat roles differently (Muon, SCALE, DDC-Muon).
    """
    roles = parameter_roles(model)
    groups = []
    for role in ROLES:
        params = [p for p, r in roles.items() if r == role]
        if params:
            groups.append({
                "params": params,
                "weight_decay": 0.0 if role == "vector" else weight_decay,
                "role": role,
            })
    return groups
