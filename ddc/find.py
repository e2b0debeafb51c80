"""Find a model's gauges automatically: propose candidates from its dataflow, keep only
those a numerical check proves.

:func:`find_gauges` runs the model once on an example input and reads the autograd graph
of that forward pass (the dataflow between layers, whatever Python produced it: no
tracing restrictions on control flow). From it, it proposes:

* ``NormGain(norm, consumers)``: a LayerNorm / RMSNorm / BatchNorm whose output reaches
  layers (``nn.Linear``, ``nn.ConvNd``, ``nn.MultiheadAttention``'s packed projection)
  only through reshapes and ReLUs;
* ``UnitRescale([a], b)``: layer ``a``'s output reaching layer ``b`` through reshapes, a
  ReLU, or one factor of a product (SwiGLU's ``up``; the ``gate`` goes through SiLU and
  is not proposed);
* ``LogitShift(readout)``: the linear layer producing the model's output, when the loss
  is softmax cross-entropy;
* ``HeadRotation`` / ``HeadRotationVO``: attention modules with separate ``q, k, v, o``
  (or ``q_proj, k_proj, v_proj, o_proj / out_proj``) layers and a head count attribute
  (``heads``, ``n_heads``, ``num_heads``, ``n_head``); the RoPE layout is found by trying
  no RoPE, then interleaved pairs, then split halves. For ``nn.MultiheadAttention`` the
  members are row slices of its packed ``in_proj_weight`` (``HeadRotation.packed``,
  ``HeadRotationVO.packed``); for a fused ``c_attn`` / ``c_proj`` pair with ``[q | k | v]``
  outputs (Hugging Face GPT-2, ``Conv1D`` layers stored in × out) they are column slices
  (``HeadRotation.fused``, ``HeadRotationVO.fused``).

Every candidate is then checked by :func:`ddc.verify_gauges` (random group elements must
leave the loss and the outputs unchanged to ``tol``); what fails is left out and listed
in :attr:`FoundGauges.rejected` with the measured change. The gauges that survive are
finally combined as DDC would (overlaps checked); a candidate that conflicts with one
kept earlier is listed too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gauges import (_CONVS, _NORMS, Gauge, HeadRotation, HeadRotationVO, LogitShift, NormGain,
                     UnitRescale, is_conv1d)
from .verify import GaugeDeclarationError, check_declarations, unwrap_model, verify_gauges

__all__ = ["find_gauges", "FoundGauges"]

LOSSES = ("cross_entropy", None)
_HEAD_ATTRIBUTES = ("heads", "n_heads", "num_heads", "n_head")
_ATTENTION_NAMES = (("q", "k", "v", "o"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                    ("q_proj", "k_proj", "v_proj", "out_proj"))
# Autograd nodes that carry a tensor's features through unchanged (up to layout) or
# through a positively homogeneous map; the walk back from a layer's input crosses them.
_TRANSPARENT = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "TransposeBackward",
                "PermuteBackward", "CloneBackward", "ToCopyBackward", "AliasBackward",
                "SqueezeBackward", "UnsqueezeBackward", "ExpandBackward")
_RELU = ("ReluBackward", "ThresholdBackward")
_PRODUCT = ("MulBackward",)


class FoundGauges(list):
    """The gauges :func:`find_gauges` proved (a list, usable as ``DDC(gauges=...)``), with
    ``rejected``: ``(candidate, reason)`` for every candidate it could not prove."""

    def __init__(self, gauges: list[Gauge], labels: list[str], rejected: list[tuple[str, str]]) -> None:
        super().__init__(gauges)
        self.labels = labels        # the module names of each found gauge, as in the summary
        self.rejected = rejected

    def summary(self) -> str:
        """One line per found gauge and per candidate left out (with the reason)."""
        lines = [f"found    {label}" for label in self.labels]
        lines += [f"left out {label}: {why}" for label, why in self.rejected]
        return "\n".join(lines)


def _is_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    if isinstance(module, _CONVS):
        return module.groups == 1
    return isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None


def _output_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _record_dataflow(work: nn.Module, example_input: Any) -> tuple[dict[str, Any], dict[str, list[Any]], Any]:
    """Run ``work`` once; return each hooked module's output node, each layer's input
    nodes, and the model output's node."""
    outputs: dict[str, Any] = {}
    inputs: dict[str, list[Any]] = {}
    handles = []
    for name, module in work.named_modules():
        if not (_is_layer(module) or isinstance(module, _NORMS)):
            continue

        def hook(mod, args, out, name=name):
            tensor = _output_tensor(out)
            if tensor is not None and tensor.grad_fn is not None:
                outputs.setdefault(name, tensor.grad_fn)   # first call only: shared layers are refused anyway
            if not _is_layer(mod):
                return   # norms are sources of gauges, never consumers
            if isinstance(mod, nn.MultiheadAttention):
                if not (len(args) >= 3 and args[0] is args[1] is args[2]):
                    return   # not self-attention on one input: no norm gauge through it
                args = args[:1]
            inputs.setdefault(name, [a.grad_fn for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None])

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = work(*example_input) if isinstance(example_input, tuple) else work(example_input)
    finally:
        for h in handles:
            h.remove()
    tensor = _output_tensor(out)
    return outputs, inputs, (tensor.grad_fn if tensor is not None else None)


def _sources(start: Any, producers: dict[Any, str]) -> list[tuple[str, set[str]]]:
    """Walk back from autograd node ``start`` through transparent nodes, ReLUs and
    products; return the modules whose outputs are reached, with the kinds of node
    crossed (``"relu"``, ``"product"``)."""
    found: list[tuple[str, set[str]]] = []
    stack = [(start, frozenset())]
    seen = set()
    while stack:
        node, kinds = stack.pop()
        if node is None or (id(node), kinds) in seen:
            continue
        seen.add((id(node), kinds))
        if node in producers:
            found.append((producers[node], set(kinds)))
            continue
        kind = type(node).__name__.rstrip("0123456789")
        if kind.startswith(_TRANSPARENT):
            extra = kinds
        elif kind.startswith(_RELU):
            extra = kinds | {"relu"}
        elif kind.startswith(_PRODUCT):
            extra = kinds | {"product"}
        else:
            continue
        for parent, _ in node.next_functions:
            stack.append((parent, extra))
    return found


def _default_loss(loss: str | None) -> Callable[[nn.Module, Any], Any]:
    def evaluate(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        example, targets = batch
        out = _output_tensor(model(*example) if isinstance(example, tuple) else model(example))
        if loss == "cross_entropy":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)), out
        return out.square().mean(), out
    return evaluate


def find_gauges(model: nn.Module, example_input: Any, *, loss: str | None = "cross_entropy",
                tol: float = 1e-8, seed: int = 0) -> FoundGauges:
    """Find the exact gauges of ``model`` (see the module docstring).

    Args:
        model: the model (DistributedDataParallel / compiled wrappers are looked through).
            Left unchanged: the analysis runs on a float64 copy in eval mode.
        example_input: one input batch (a tensor, or a tuple of positional arguments).
        loss: ``"cross_entropy"`` (softmax cross-entropy on the output's last axis: the
            readout's logit shift is a symmetry) or ``None`` (only symmetries of the output
            itself).
        tol: largest relative change of loss and outputs a proven gauge may cause.
        seed: seed of the random group elements and targets used by the check.

    Returns:
        :class:`FoundGauges`: the proven gauges, built on ``model``'s own modules, and the
        candidates left out with the reason.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    model = unwrap_model(model)
    work = copy.deepcopy(model).double().eval()
    example = _to_float64(example_input)
    outputs, inputs, final = _record_dataflow(work, example)
    producers = {node: name for name, node in outputs.items()}
    work_modules = dict(work.named_modules())
    own = dict(model.named_modules())

    candidates: list[tuple[str, Callable[[], list[Gauge]]]] = []
    norm_consumers: dict[str, list[str]] = {}
    for name, nodes in inputs.items():
        for node in nodes:
            for source, kinds in _sources(node, producers):
                source_module = work_modules[source]
                if isinstance(source_module, _NORMS) and "product" not in kinds:
                    if name not in norm_consumers.setdefault(source, []):
                        norm_consumers[source].append(name)
                elif _is_layer(source_module) and not isinstance(source_module, nn.MultiheadAttention) \
                        and not isinstance(work_modules[name], nn.MultiheadAttention):
                    candidates.append((f"UnitRescale([{source}], {name})",
                                       lambda s=source, n=name: [UnitRescale([own[s]], own[n])]))
    for norm, consumers in norm_consumers.items():
        if getattr(work_modules[norm], "weight", None) is None:
            continue
        candidates.append((f"NormGain({norm}, {consumers})",
                           lambda n=norm, c=tuple(consumers): [NormGain(own[n], [own[x] for x in c])]))
    if loss == "cross_entropy" and final is not None:
        for source, kinds in _sources(final, producers):
            if not kinds and isinstance(work_modules[source], nn.Linear):
                candidates.append((f"LogitShift({source})", lambda s=source: [LogitShift(own[s])]))
    for name, module in model.named_modules():
        heads = next((getattr(module, a) for a in _HEAD_ATTRIBUTES if isinstance(getattr(module, a, None), int)), None)
        if heads is None:
            continue
        for names in _ATTENTION_NAMES:
            layers = [getattr(module, n, None) for n in names]
            if all(isinstance(layer, nn.Linear) for layer in layers):
                q, k, v, o = layers
                prefix = f"{name}." if name else ""
                for rope in (None, "interleaved", "half"):
                    candidates.append((f"HeadRotation({prefix}{names[0]}, {prefix}{names[1]}, heads={heads}, rope={rope})",
                                       lambda q=q, k=k, h=heads, r=rope: [HeadRotation(q, k, h, rope=r)]))
                candidates.append((f"HeadRotationVO({prefix}{names[2]}, {prefix}{names[3]}, heads={heads})",
                                   lambda v=v, o=o, h=heads: [HeadRotationVO(v, o, h)]))
                break
        qkv, out = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
        if qkv is not None and out is not None and _is_layer(qkv) and _is_layer(out) \
                and not hasattr(module, "q_attn"):   # fused [q | k | v] (GPT-2); not cross-attention
            prefix = f"{name}." if name else ""
            candidates.append((f"HeadRotation.fused({prefix}c_attn, heads={heads})",
                               lambda m=qkv, h=heads: [HeadRotation.fused(m, h)]))
            candidates.append((f"HeadRotationVO.fused({prefix}c_attn, {prefix}c_proj, heads={heads})",
                               lambda m=qkv, o=out, h=heads: [HeadRotationVO.fused(m, o, h)]))

    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            label = name or "the model"
            candidates.append((f"HeadRotation.packed({label})", lambda m=module: [HeadRotation.packed(m)]))
            candidates.append((f"HeadRotationVO.packed({label})", lambda m=module: [HeadRotationVO.packed(m)]))
    rejected: list[tuple[str, str]] = []
    unique = dict(candidates)   # a pair reached along several paths is proposed once
    built: list[tuple[str, Gauge]] = []
    for label, make in unique.items():
        try:
            gauges = make()
            check_declarations(model, gauges)
        except (ValueError, TypeError) as error:   # shapes, shared tensors (GaugeDeclarationError)
            rejected.append((label, str(error)))
            continue
        built.extend((label, g) for g in gauges)
    batch = (example, _targets(work, example, seed) if loss == "cross_entropy" else None)
    report = verify_gauges(model, _default_loss(loss), batch, gauges=[g for _, g in built], tol=tol,
                           seed=seed, raise_on_failure=False) if built else {}
    proven: list[Gauge] = []
    labels: list[str] = []
    rotated: set[str] = set()
    from .frame import Frame as _Frame   # the optimizer's own overlap rules decide what combines
    for (label, gauge), change in zip(built, report.values()):
        if change["loss"] > tol or change["logits"] > tol:
            rejected.append((label, f"not a symmetry: changes the loss by {change['loss']:.1e} and the "
                                    f"outputs by {change['logits']:.1e}"))
            continue
        if label.startswith("HeadRotation(") and label.split(", heads")[0] in rotated:
            continue   # a more general RoPE layout of the same q/k was proven already
        try:
            _Frame(proven + [gauge])
        except ValueError as error:
            rejected.append((label, f"conflicts with a gauge found earlier: {error}"))
            continue
        proven.append(gauge)
        labels.append(label)
        if label.startswith("HeadRotation("):
            rotated.add(label.split(", heads")[0])
    return FoundGauges(proven, labels, rejected)


def _to_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_to_float64(v) for v in value)
    return value


@torch.no_grad()
def _targets(work: nn.Module, example: Any, seed: int) -> torch.Tensor:
    out = _output_tensor(work(*example) if isinstance(example, tuple) else work(example))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, out.shape[-1], out.shape[:-1], generator=generator).to(out.device)
