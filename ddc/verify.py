"""Numerical check of gauge declarations: a wrong declaration must fail loudly."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gauges import Gauge

logger = logging.getLogger("ddc")

#: The accepted string/None values of ``loss`` (a callable ``outputs -> loss`` is accepted too).
LOSSES = ("cross_entropy", None)
#: ``loss``'s default: no loss is assumed, so leaving it out where it is needed is an error naming the choices.
LOSS_REQUIRED = "required"
_LOSS_HELP = ("'cross_entropy' (softmax cross-entropy over the outputs' last axis: the readout's logit "
              "shift is a symmetry), None (only symmetries of the outputs themselves, e.g. an MSE "
              "regressor), or a callable outputs -> loss (scalar tensor; the logit shift is proposed and "
              "kept only if this loss proves invariant to it)")


class GaugeDeclarationError(ValueError):
    """A declared gauge changes the loss or the logits: it is not a symmetry."""


def check_loss(loss: Any, who: str) -> None:
    """Raise ``ValueError`` (one line, naming ``who`` and the accepted values) unless ``loss``
    is one of :data:`LOSSES` or a callable: the loss decides which gauges exist, so it is
    never assumed."""
    if not (callable(loss) or (isinstance(loss, (str, type(None))) and loss in LOSSES)):
        given = "nothing" if isinstance(loss, str) and loss == LOSS_REQUIRED else repr(loss)
        raise ValueError(f"{who} needs the training loss, since it decides which gauges exist "
                         f"(no loss is assumed): loss= {_LOSS_HELP}; got {given}")


def _as_float64(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_as_float64(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _as_float64(v) for k, v in batch.items()}
    return batch


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model`` applied to ``example_input``: a tensor (or any single object) is one
    argument, a tuple or list the positional arguments, a dict the keyword arguments
    (a tokenizer's output for a Hugging Face model)."""
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def model_output(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: the tensor itself, the first element of a
    tuple or list, ``out["logits"]`` / ``out.logits`` (Hugging Face). Raises ``ValueError``
    (one line) for anything else."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(f"the model's output is a {type(out).__name__} without logits; find_gauges needs a tensor, "
                     f"a tuple/list starting with one, or an object with a .logits tensor")


def loss_function(loss: Any, seed: int = 0) -> Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]:
    """``loss`` (one of :data:`LOSSES` or a callable ``outputs -> loss``) as the
    ``loss_fn(model, example_input) -> (loss, outputs)`` that :func:`verify_gauges` takes.
    ``"cross_entropy"`` scores random class labels (the same at every call: drawn with
    ``seed`` from the outputs' shape); with ``None`` the loss stands in as the outputs' mean
    square (every output is compared anyway)."""
    def evaluate(model: nn.Module, example_input: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = model_output(call_model(model, example_input))
        if isinstance(loss, str) and loss == "cross_entropy":
            generator = torch.Generator().manual_seed(seed)
            targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=generator).to(out.device)
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)), out
        if callable(loss):
            return loss(out), out
        return out.square().mean(), out
    return evaluate


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
    names = {id(p): n for n, p in work.named_parameters()}
    for k, gauge in enumerate(declared):
        name = f"{gauge!r} #{k}"
        report[name] = worst[k]
        if (worst[k]["loss"] > tol or worst[k]["logits"] > tol) and raise_on_failure:
            acting_on = ", ".join(dict.fromkeys(names.get(id(p), f"a {tuple(p.shape)} tensor")
                                                for p in gauge.parameters()))
            raise GaugeDeclarationError(
                f"declared gauge {name} on {acting_on} is not a symmetry: a random element changes the loss by "
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


def verify_declarations(model: nn.Module | None, gauges: list[Gauge] | None, example_input: Any = None,
                        loss: Any = LOSS_REQUIRED, *, tol: float = 1e-8, seed: int = 0, points: int = 2) -> None:
    """The check DDC runs on its gauges at construction: a wrong declaration is refused there.

    * Structure (:func:`check_declarations`), whenever ``model`` is known.
    * Gauges that :func:`ddc.find_gauges` proved (the members of a
      :class:`~ddc.find.FoundGauges`, on the same loss and input) are not proven again.
    * Every other gauge (declared by hand, or by the model's ``gauges()``): given
      ``example_input`` (one input batch, as for ``find_gauges``) and ``loss`` (then
      required: ``"cross_entropy"``, ``None`` or a callable ``outputs -> loss``), proven by
      :func:`verify_gauges` with its own random elements, at the model's point and at
      ``points`` perturbed ones; a false one raises :class:`GaugeDeclarationError` (one line
      naming the gauge, the parameters it acts on and the measured loss change).
      Without ``example_input`` (or without a model to run), one WARNING on the ``"ddc"``
      logger says that they were not verified and how to verify them.
    """
    proven = getattr(gauges, "proven_ids", frozenset())   # a FoundGauges knows what it proved
    gauges = list(gauges or [])
    if model is not None:
        check_declarations(model, gauges)
    declared = [g for g in gauges if id(g) not in proven]
    if not declared:
        return
    if model is None or example_input is None:
        how = "DDC(model, ..., example_input=, loss=)" if model is None else "example_input= and loss= to DDC"
        logger.warning("DDC: %d declared gauge(s) not verified (%s); a wrong declaration would be enforced "
                       "silently. Pass %s (it then proves each one), or run ddc.verify_gauges(model, loss_fn, "
                       "batch)", len(declared), "parameters given, not a model to run" if model is None
                       else "no example_input given", how)
        return
    check_loss(loss, "DDC, to verify the declared gauges on example_input,")
    verify_gauges(model, loss_function(loss, seed), example_input, gauges=declared, tol=tol,
                  seed=seed, points=points)


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
