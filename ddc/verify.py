"""Numerical check of gauge declarations: a wrong declaration must fail loudly."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .gauges import Gauge


class GaugeDeclarationError(ValueError):
    """A declared gauge changes the loss or the logits: it is not a symmetry."""


def _as_float64(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_as_float64(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _as_float64(v) for k, v in batch.items()}
    return batch


def _evaluate(model: nn.Module, loss_fn: Callable, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = loss_fn(model, batch)
    if isinstance(out, tuple):
        loss, logits = out[0], out[1]
        return loss.detach(), (logits.detach() if isinstance(logits, torch.Tensor) else None)
    return out.detach(), None


@torch.no_grad()
def verify_gauges(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], batch: Any,
                  gauges: list[Gauge] | None = None, trials: int = 2, tol: float = 1e-8,
                  seed: int = 0, *, raise_on_failure: bool = True) -> dict[str, dict[str, float]]:
    """Apply random elements of every declared gauge and measure what changes.

    Works on a float64 copy of ``model`` in eval mode (no dropout), so ``model`` itself is
    untouched. ``loss_fn(model, batch)`` returns the loss, or ``(loss, logits)``.
    ``gauges`` defaults to the copy's ``gauges()``; pass a list built on ``model`` to check
    gauges declared outside it (they are mapped onto the copy).

    Returns ``{repr(gauge) #k: {"loss": rel_change, "logits": rel_change}}`` (the largest
    relative change over ``trials`` random elements; logits compared after removing their
    mean over the last axis, since a logit shift moves them by a constant). Raises
    :class:`GaugeDeclarationError` naming the first gauge whose change exceeds ``tol``
    (with ``raise_on_failure=False``: measures every gauge and raises nothing).
    """
    work = copy.deepcopy(model).double().eval()
    if gauges is None:
        declared = work.gauges()
    else:  # rebuild the given gauges on the copy's parameters
        mapping = {id(p): q for p, q in zip(model.parameters(), work.parameters())}
        declared = []
        for g in gauges:
            g2 = copy.copy(g)
            g2.__dict__ = {k: _remap(v, mapping) for k, v in g.__dict__.items()}
            declared.append(g2)
    batch = _as_float64(batch)
    base_loss, base_logits = _evaluate(work, loss_fn, batch)
    generator = torch.Generator().manual_seed(seed)
    report: dict[str, dict[str, float]] = {}
    for k, gauge in enumerate(declared):
        worst_loss, worst_logits = 0.0, 0.0
        for _ in range(trials):
            saved = [p.detach().clone() for p in work.parameters()]
            gauge.act(gauge.random_element(generator))
            loss, logits = _evaluate(work, loss_fn, batch)
            for p, s in zip(work.parameters(), saved):
                p.copy_(s)
            worst_loss = max(worst_loss, float((loss - base_loss).abs() / base_loss.abs().clamp_min(1e-30)))
            if logits is not None and base_logits is not None:
                centred = logits - logits.mean(-1, keepdim=True)
                base_centred = base_logits - base_logits.mean(-1, keepdim=True)
                change = (centred - base_centred).abs().max() / base_centred.abs().max().clamp_min(1e-30)
                worst_logits = max(worst_logits, float(change))
        name = f"{gauge!r} #{k}"
        report[name] = {"loss": worst_loss, "logits": worst_logits}
        if (worst_loss > tol or worst_logits > tol) and raise_on_failure:
            raise GaugeDeclarationError(
                f"declared gauge {name} is not a symmetry: a random element changes the loss by "
                f"{worst_loss:.2e} and the logits by {worst_logits:.2e} (relative; tolerance {tol:g})"
            )
    return report


def _remap(value: Any, mapping: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor) and id(value) in mapping:
        return mapping[id(value)]
    if isinstance(value, list):
        return [_remap(v, mapping) for v in value]
    if hasattr(value, "__dataclass_fields__") and hasattr(value, "param"):
        return dataclasses.replace(value, param=_remap(value.param, mapping))
    return value


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside wrappers that add no parameters of their own: DistributedDataParallel
    (``.module``), ``torch.compile``'s wrapper, FSDP1's wrapper. A wrapper is recognised by
    structure, not by class: no ``gauges()`` method, exactly one child module, and that child
    holds every parameter. FSDP2 (``fully_shard``) does not wrap, so it needs nothing."""
    while not hasattr(model, "gauges"):
        children = list(model.children())
        if len(children) != 1:
            break
        child = children[0]
        if {id(p) for p in child.parameters()} != {id(p) for p in model.parameters()} or not children:
            break
        model = child
    return model


def check_declarations(model: nn.Module, gauges: list[Gauge]) -> None:
    """Structural checks of gauge declarations, cheap enough for every ``DDC(model)``.

    Shapes are checked when a gauge is built; here: every gauge parameter belongs to
    ``model``, and none is shared by two modules or owned by a module registered twice
    (a tied readout, a layer applied at two places): a scaling, shift or rotation of a
    shared tensor acts at every place that uses it, which none of the gauges allows for.
    Raises :class:`GaugeDeclarationError` naming the gauge and the parameter.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{module_name}.{pname}" if module_name else pname)
    for gauge in gauges:
        for p in gauge.parameters():
            if id(p) not in names:
                raise GaugeDeclarationError(f"{gauge!r} acts on a {tuple(p.shape)} parameter that is "
                                            f"not a parameter of the model")
            places = owners.get(id(p), [])
            if len(places) > 1:
                raise GaugeDeclarationError(
                    f"{gauge!r} acts on {places[0]}, which the model also uses as {', '.join(places[1:])} "
                    f"(tied or shared); a gauge on a shared tensor is not a symmetry"
                )
