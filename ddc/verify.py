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
                  seed: int = 0, *, raise_on_failure: bool = True, points: int = 2) -> dict[str, dict[str, float]]:
    """Apply random elements of every declared gauge and measure what changes.

    Works on a float64 copy of ``model`` in eval mode (no dropout), so ``model`` itself is
    untouched. ``loss_fn(model, batch)`` returns the loss, or ``(loss, outputs)``.
    ``gauges`` defaults to the copy's ``gauges()``; pass a list built on ``model`` to check
    gauges declared outside it (they are mapped onto the copy).

    A gauge is proven at the model's own point and at ``points`` random points near it
    (every parameter perturbed by half its RMS; a tensor that is zero, such as a
    zero-initialised output projection or head, drawn afresh at the scale ``1/√fan_in``),
    with ``trials`` random group elements at each: a zero branch can neither hide a false
    gauge nor make a true one look broken.

    The change is measured relative to the size of what is compared (an absolute criterion
    in the units of the loss and of the outputs): ``|L(g·θ) − L(θ)| / max(|L(θ)|, |L(g·θ)|)``
    and ``max|y(g·θ) − y(θ)| / max(max|y(θ)|, max|y(g·θ)|)``, both ``≤ tol`` to pass. For a
    :class:`~ddc.gauges.LogitShift` the outputs are compared after removing their mean over
    the last axis (a logit shift moves them by a constant), their size still measured before.

    Returns ``{repr(gauge) #k: {"loss": change, "logits": change}}``, the largest over points
    and trials. Raises :class:`GaugeDeclarationError` (one line) naming the first gauge whose
    change exceeds ``tol`` (with ``raise_on_failure=False``: measures every gauge and raises
    nothing).
    """
    from .gauges import LogitShift

    work = copy.deepcopy(model).double().eval()
    declared = work.gauges() if gauges is None else rebind(gauges, model, work)
    batch = _as_float64(batch)
    generator = torch.Generator().manual_seed(seed)
    origin = [p.detach().clone() for p in work.parameters()]
    worst = [{"loss": 0.0, "logits": 0.0} for _ in declared]
    for point in range(points + 1):   # drawn one at a time: one extra copy of the parameters
        start = origin if point == 0 else _perturbed(origin, generator)
        _load(work, start)
        base_loss, base_logits = _evaluate(work, loss_fn, batch)
        for k, gauge in enumerate(declared):
            centre = isinstance(gauge, LogitShift)
            for _ in range(trials):
                gauge.act(gauge.random_element(generator))
                loss, logits = _evaluate(work, loss_fn, batch)
                _load(work, start)
                worst[k]["loss"] = max(worst[k]["loss"], _change(base_loss, loss, centre=False))
                if logits is not None and base_logits is not None:
                    worst[k]["logits"] = max(worst[k]["logits"], _change(base_logits, logits, centre))
    report: dict[str, dict[str, float]] = {}
    for k, gauge in enumerate(declared):
        name = f"{gauge!r} #{k}"
        report[name] = worst[k]
        if (worst[k]["loss"] > tol or worst[k]["logits"] > tol) and raise_on_failure:
            raise GaugeDeclarationError(
                f"declared gauge {name} is not a symmetry: a random element changes the loss by "
                f"{worst[k]['loss']:.2e} and the outputs by {worst[k]['logits']:.2e} (relative to their "
                f"size, at the model's point or a perturbed one; tolerance {tol:g})"
            )
    return report


def _change(before: torch.Tensor, after: torch.Tensor, centre: bool) -> float:
    """``max|after − before| / max(max|before|, max|after|)`` (centred on the last axis
    first when ``centre``; the size is measured before centring). 0 when both are 0."""
    if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
        return float("inf")
    size = torch.maximum(before.abs().max(), after.abs().max())
    if centre:
        before, after = before - before.mean(-1, keepdim=True), after - after.mean(-1, keepdim=True)
    change = (after - before).abs().max()
    return 0.0 if float(change) == 0.0 else float(change / size)


def _perturbed(origin: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """A random point near ``origin``: each tensor plus noise of half its RMS; a zero tensor
    (a zero-initialised branch, where a false gauge has nothing to change) drawn at the
    scale ``1/√fan_in`` (1-D: 0.1)."""
    out = []
    for p in origin:
        if not p.is_floating_point():
            out.append(p)
            continue
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
        rms = float(p.square().mean().sqrt()) if p.numel() else 0.0
        if rms > 0.0:
            out.append(p + 0.5 * rms * noise)
        else:
            fan_in = p[0].numel() if p.ndim >= 2 else 100
            out.append(noise / fan_in ** 0.5)
    return out


def _load(work: nn.Module, values: list[torch.Tensor]) -> None:
    for p, v in zip(work.parameters(), values):
        p.copy_(v)


def rebind(gauges: list[Gauge], model: nn.Module, copy_of_model: nn.Module) -> list[Gauge]:
    """``gauges``, built on ``model``'s parameters, rebuilt on the same parameters of
    ``copy_of_model`` (a ``copy.deepcopy`` of it, possibly cast: parameters in the same order)."""
    mapping = {id(p): q for p, q in zip(model.parameters(), copy_of_model.parameters())}
    rebuilt = []
    for g in gauges:
        g2 = copy.copy(g)
        g2.__dict__ = {k: _remap(v, mapping) for k, v in g.__dict__.items()}
        rebuilt.append(g2)
    return rebuilt


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
