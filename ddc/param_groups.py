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
* ``readout``   the weight of the model's untied output layer (:func:`output_layer`: the last
                linear map into the loss, ``model.readout`` when the model names it).
* ``vector``    parameters with fewer than two dimensions: biases and norm gains.

For a Muon-based optimizer (``muon=True``: the ``muon`` baseline and DDC with
``base="muon"``) the weight of the model's *input layer* (:func:`input_layer`: a ViT patch
embedding, a ConvNet stem) is ``embedding`` rather than ``matrix``, so it takes the AdamW
step: Muon's authors keep embeddings, the first layer and the classifier head on AdamW
(KellerJordan/Muon README: "for a ConvNet, you should use Muon to optimize all the
convolutional filters except the first one, and AdamW to optimize everything else"). This
is the one place that rule lives.

Weight decay applies to every parameter with two or more dimensions and to nothing else.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .gauges import is_conv1d

ROLES = ("matrix", "embedding", "readout", "vector")
_EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)
_INPUT_LAYER_TYPES = (nn.Embedding, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def input_layer(model: nn.Module) -> nn.Module | None:
    """The model's input layer: the first ``nn.Embedding`` / ``nn.Linear`` / ``nn.ConvNd`` in
    ``model.modules()`` (registration) order, or None when there is none.

    Registration order is forward order in every model of this benchmark (and in
    torchvision's): the token embedding of the GPT and grokking transformers, ``patch_embed``
    of the ViT, ``stem_conv`` of the ResNet. A model that registers a hidden layer before
    its input layer defeats this rule; check it with this function.
    """
    return next((m for m in model.modules() if isinstance(m, _INPUT_LAYER_TYPES)), None)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's readout, the last linear map into the loss: ``model.readout`` when the
    model has that attribute (``None`` there means no readout of its own, e.g. a readout
    tied to the embedding), else the last ``nn.Linear`` or Hugging Face ``Conv1D`` in
    ``model.modules()`` (registration) order, or None when there is none.

    Registration order is forward order in the models of this benchmark, in torchvision's
    classifiers (``fc``, ``heads.head``, ``classifier[-1]``) and in Hugging Face's task
    models (``lm_head``, ``classifier``), as for :func:`input_layer`; ``tests/test_find_gauges_structure.py``
    checks it against the layer :func:`ddc.find_gauges` sees producing the output
    (``FoundGauges.readout``). A model for which it is wrong (a bare encoder whose last
    registered Linear is a pooler it does not return) names its readout with a
    ``readout`` attribute.
    """
    if hasattr(model, "readout"):
        return model.readout if isinstance(model.readout, nn.Module) else None
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            last = module
    return last


def parameter_roles(model: nn.Module, muon: bool = False) -> dict[nn.Parameter, str]:
    """Return the role of every trainable parameter of ``model`` (see the module docstring).

    The readout is :func:`output_layer`'s weight. A parameter shared by several modules
    (a tied readout) gets the role of the first module that owns it in ``model.modules()``.
    ``muon=True``: the grouping of a Muon-based optimizer, where the weight of
    :func:`input_layer` is ``embedding`` (AdamW) instead of ``matrix``.
    """
    readout = output_layer(model)
    readout_weight = getattr(readout, "weight", None)
    first = getattr(input_layer(model), "weight", None) if muon else None
    roles: dict[nn.Parameter, str] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param in roles or not param.requires_grad:
                continue
            if param.ndim < 2:
                role = "vector"
            elif param is readout_weight and not _is_tied(model, param, module):
                role = "readout"
            elif name.endswith("weight") and not isinstance(module, _EMBEDDING_MODULES) and param is not first:
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


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into one group per role, in the order of :data:`ROLES`.

    Each group is ``{"params": [...], "weight_decay": wd, "role": role}`` where ``wd`` is
    ``weight_decay`` for parameters with two or more dimensions and ``0.0`` otherwise.
    Empty roles are left out. The extra ``role`` key travels inside ``torch.optim``
    param groups, so an optimizer can treat roles differently (Muon, SCALE, DDC-Muon).
    ``muon``: as for :func:`parameter_roles` (the input layer's weight, moved to the
    ``embedding`` group, comes first in it).
    """
    roles = parameter_roles(model, muon=muon)
    layer = input_layer(model) if muon else None
    moved = getattr(layer, "weight", None) if not isinstance(layer, _EMBEDDING_MODULES) else None
    groups = []
    for role in ROLES:
        params = [p for p, r in roles.items() if r == role]
        if role == "embedding" and any(p is moved for p in params):
            params = [moved] + [p for p in params if p is not moved]
        if params:
            groups.append({
                "params": params,
                "weight_decay": 0.0 if role == "vector" else weight_decay,
                "role": role,
            })
    return groups
