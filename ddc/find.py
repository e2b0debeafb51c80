"""Find a model's gauges automatically: propose candidates from its dataflow, keep only
those a numerical check proves, and say what is left uncovered.

:func:`find_gauges` runs a float64 copy of the model once on an example input, recording
the autograd graph of that forward pass (the dataflow between layers, whatever Python
produced it) and every attention product (``F.scaled_dot_product_attention``, or an explicit
``matmul → softmax → matmul``). Nothing is recognised by class or attribute name. It
proposes:

* ``NormGain(norm, consumers)``: a *gain module* (a module whose own parameters are one
  vector, or a gain and a bias of one shape: torch's norms, a user-written RMSNorm,
  ``LlamaRMSNorm``; the gain is the parameter entering a product in its graph) whose output
  reaches layers (``nn.Linear``, ``nn.ConvNd``, ``Conv1D``, ``nn.MultiheadAttention``'s packed
  projection) only through reshapes and ReLUs;
* ``UnitRescale([a], b)``: layer ``a``'s output reaching layer ``b`` through reshapes, a
  ReLU, or one factor of a product (SwiGLU's ``up``; the ``gate`` goes through SiLU and is
  not proposed);
* ``LogitShift(readout)``: the linear layer producing the model's output, when the loss is
  softmax cross-entropy (``loss="cross_entropy"``) or a given loss function proves
  invariant to it;
* attention gauges, from the shapes flowing into each attention product: the layers that
  produce its queries, keys and values (separate, or one fused ``[q | k | v]`` layer) and
  the layer reading its output. Equal head counts (MHA): ``HeadRotation`` (no RoPE, then
  interleaved, then split-half RoPE pairs: the first proven is kept) and ``HeadRotationVO``;
  fewer key/value heads (GQA, MQA): ``GroupedHeadRotation`` and ``GroupedHeadRotationVO``;
  with RoPE also ``QKPairScale``. ``nn.MultiheadAttention``: the packed forms
  (``HeadRotation.packed``, ``HeadRotationVO.packed``).

Every candidate is proven by :func:`ddc.verify_gauges` at the model's point and at
perturbed points (zero tensors drawn afresh), with random group elements; what fails is
listed in :attr:`FoundGauges.rejected` with the measured change. The proven gauges are then
combined as DDC's step would (overlaps checked): a proven gauge the step cannot enforce is
listed in :attr:`FoundGauges.not_enforced`, never silently dropped. The parameters no gauge
covers (where DDC is exactly its base optimizer) are in :attr:`FoundGauges.uncovered`. The
outcome is logged once (logger ``"ddc"``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .gauges import (_CONVS, _NORMS, Gauge, GroupedHeadRotation, GroupedHeadRotationVO, HeadRotation,
                     HeadRotationVO, LogitShift, NormGain, QKPairScale, UnitRescale, _output_weight,
                     is_conv1d, norm_affine)
from .frame import Frame   # the step's own rules decide which found gauges it can enforce together
from .verify import (LOSS_REQUIRED, LOSSES, _as_float64, call_model, check_declarations, check_loss,
                     loss_function, model_output, unwrap_model, verify_gauges)

__all__ = ["find_gauges", "FoundGauges", "LOSSES", "call_model", "model_output"]

logger = logging.getLogger("ddc")

# Autograd nodes that carry a tensor's features through unchanged (up to layout) or
# through a positively homogeneous map; the walk back from a layer's input crosses them.
_TRANSPARENT = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "TransposeBackward",
                "PermuteBackward", "CloneBackward", "ToCopyBackward", "AliasBackward",
                "SqueezeBackward", "UnsqueezeBackward", "ExpandBackward",
                # linear maps along other axes (token selection, pooling); one along the
                # feature axis would break a per-feature gauge, and the proof rejects it
                "SelectBackward", "SliceBackward", "MeanBackward", "AvgPool", "AdaptiveAvgPool")
_RELU = ("ReluBackward", "ThresholdBackward")
_PRODUCT = ("MulBackward",)
# Between the score product and the softmax (scale, mask) and between the softmax and the
# value product (dropout, dtype casts): elementwise nodes an attention pattern may cross.
_SCORE_OPS = _TRANSPARENT + ("MulBackward", "DivBackward", "AddBackward", "SubBackward", "MaskedFillBackward",
                             "WhereBackward", "NativeDropoutBackward")
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax}


class FoundGauges(list):
    """The gauges :func:`find_gauges` proved and DDC's step can enforce (a list, usable as
    ``DDC(gauges=...)``), with the rest of the story:

    * ``labels``: the module names of each gauge in the list;
    * ``not_enforced``: ``(label, gauge, reason)`` for gauges proven exact that DDC's step
      cannot enforce (a kind it does not support yet, or an overlap it does not allow):
      DDC acts as its base optimizer along them;
    * ``rejected``: ``(candidate, reason)`` for every candidate that is not a symmetry (or
      could not be built);
    * ``uncovered``: names of the trainable parameters in none of the listed gauges;
    * ``readout``: the name of the linear layer producing the model's output (``None`` if
      the output is not one layer's output).
    """

    def __init__(self, gauges: list[Gauge], labels: list[str], rejected: list[tuple[str, str]],
                 not_enforced: list[tuple[str, Gauge, str]] | None = None, uncovered: list[str] | None = None,
                 readout: str | None = None) -> None:
        super().__init__(gauges)
        #: The gauges find_gauges proved (by identity): anything added to the list later is a
        #: hand declaration, which DDC proves again (``ddc.verify.verify_declarations``).
        self.proven_ids = frozenset(id(g) for g in list(gauges) + [g for _, g, _ in not_enforced or []])
        self.labels = labels
        self.rejected = rejected
        self.not_enforced = list(not_enforced or [])
        self.uncovered = list(uncovered or [])
        self.readout = readout

    @property
    def proven(self) -> list[Gauge]:
        """Every gauge proven exact: the enforced ones, then those DDC cannot enforce."""
        return list(self) + [g for _, g, _ in self.not_enforced]

    def summary(self) -> str:
        """One line per found gauge, per gauge found but not enforced, per candidate left
        out (with the reason), and one for the uncovered parameters."""
        lines = [f"found    {label}" for label in self.labels]
        lines += [f"found, not enforced by DDC {label}: {why}" for label, _, why in self.not_enforced]
        lines += [f"left out {label}: {why}" for label, why in self.rejected]
        if self.uncovered:
            lines.append(f"in no gauge (DDC = its base optimizer there): {', '.join(self.uncovered)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------

def _is_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    if isinstance(module, _CONVS):
        return module.groups == 1
    return isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None


def _is_gain_module(module: nn.Module) -> bool:
    """A module whose parameters are all its own and are one vector or two of one shape:
    the structure of a normalisation's affine part (which tensor is the gain is read from
    the graph). Whether it *is* a symmetry is left to the proof."""
    if _is_layer(module) or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    own = list(module.parameters(recurse=False))
    if not own or len(own) > 2 or len(own) != len(list(module.parameters())):
        return False
    return all(p.ndim == 1 and p.shape == own[0].shape for p in own)


class _Recorder(TorchFunctionMode):
    """Records attention products during one forward pass: SDPA calls, matmuls, softmaxes."""

    def __init__(self) -> None:
        super().__init__()
        self.sdpa: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.matmuls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.softmaxes: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            self.sdpa.append((q, k, v, out))
        elif func in _MATMULS and len(args) >= 2 and isinstance(out, torch.Tensor):
            self.matmuls.append((args[0], args[1], out))
        elif func in _SOFTMAXES and isinstance(out, torch.Tensor):
            self.softmaxes.append((args[0], out))
        return out


def _record(work: nn.Module, example: Any):
    """Run ``work`` once; return each hooked module's output tensor, each layer's input
    nodes, the output tensor, and the attention sites ``(q, k, v, out)``."""
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, list[Any]] = {}
    handles = []
    for name, module in work.named_modules():
        if not (_is_layer(module) or _is_gain_module(module)):
            continue

        def hook(mod, args, out, name=name):
            if isinstance(out, (tuple, list)):
                out = out[0] if out and isinstance(out[0], torch.Tensor) else None
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                outputs.setdefault(name, out)   # first call only: shared layers are refused anyway
            if not _is_layer(mod):
                return   # gain modules are sources of gauges, never consumers
            if isinstance(mod, nn.MultiheadAttention):
                if not (len(args) >= 3 and args[0] is args[1] is args[2]):
                    return   # not self-attention on one input: no norm gauge through it
                args = args[:1]
            inputs.setdefault(name, [a.grad_fn for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None])

        handles.append(module.register_forward_hook(hook))
    recorder = _Recorder()
    try:
        with torch.enable_grad(), recorder:
            out = model_output(call_model(work, example))
    finally:
        for h in handles:
            h.remove()
    return outputs, inputs, out, _attention_sites(recorder)


def _reach(start: Any, targets: dict[Any, Any], allowed: tuple[str, ...], limit: int = 64) -> Any:
    """Walk back from ``start`` through nodes whose type starts with one of ``allowed``;
    the value of the first node found in ``targets`` (or None)."""
    stack, seen = [start], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node in targets:
            return targets[node]
        if type(node).__name__.startswith(allowed):
            stack.extend(parent for parent, _ in node.next_functions)
    return None


def _attention_sites(recorder: _Recorder) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(q, k, v, out)`` of every attention product (``k`` with keys on the second-to-last
    axis, as SDPA takes it): SDPA calls, and explicit ``softmax(q @ kᵀ ·scale + mask) @ v``."""
    sites = [s for s in recorder.sdpa if all(isinstance(t, torch.Tensor) for t in s)]
    products = {m[2].grad_fn: m for m in recorder.matmuls if m[2].grad_fn is not None}
    for scores, probs in recorder.softmaxes:
        if scores.grad_fn is None or probs.grad_fn is None:
            continue
        first = _reach(scores.grad_fn, products, _SCORE_OPS)
        if first is None:
            continue
        for a, b, out in recorder.matmuls:
            if isinstance(a, torch.Tensor) and a.grad_fn is not None \
                    and _reach(a.grad_fn, {probs.grad_fn: True}, _SCORE_OPS) and out.grad_fn is not None:
                sites.append((first[0], first[1].transpose(-2, -1), b, out))
                break
    return sites


def _producer(tensor: torch.Tensor, producers: dict[Any, str], limit: int = 400) -> str | None:
    """The one hooked module whose output ``tensor`` is computed from without crossing any
    other parameter (reshapes, RoPE, head repeats, splits of a fused projection); None if
    there is none or several, or another parameter is used on the way."""
    found: set[str] = set()
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > limit:
            return None
        if node in producers:
            found.add(producers[node])
            continue
        for parent, _ in node.next_functions:
            if parent is not None and type(parent).__name__ == "AccumulateGrad":
                return None   # a parameter used outside any hooked layer: not traced
            stack.append(parent)
    return found.pop() if len(found) == 1 else None


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


def _gain_and_bias(module: nn.Module, output: torch.Tensor, limit: int = 64) -> tuple[str, str | None] | None:
    """Names of the gain and bias of a gain module: torch's norms by their ``weight`` and
    ``bias``; any other by the graph (the parameter entering a product is the gain, one
    entering a sum the bias). None when the graph does not say."""
    if isinstance(module, _NORMS) or isinstance(module, nn.GroupNorm):
        if getattr(module, "weight", None) is None:
            return None
        return "weight", ("bias" if getattr(module, "bias", None) is not None else None)
    names = {id(p): n for n, p in module.named_parameters(recurse=False)}
    role: dict[str, str] = {}
    stack, seen = [output.grad_fn], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for parent, _ in node.next_functions:
            variable = getattr(parent, "variable", None)
            if variable is not None and id(variable) in names:
                kind = type(node).__name__
                role[names[id(variable)]] = "gain" if kind.startswith("Mul") else \
                    ("bias" if kind.startswith(("Add", "Sub")) else "other")
            elif parent is not None:
                stack.append(parent)
    gains = [n for n, r in role.items() if r == "gain"]
    biases = [n for n, r in role.items() if r == "bias"]
    if len(gains) != 1 or len(biases) > 1 or len(role) != len(names):
        return None
    return gains[0], (biases[0] if biases else None)


# ----------------------------------------------------------------------------------------
# Proposing
# ----------------------------------------------------------------------------------------

def _features(module: nn.Module) -> int | None:
    try:
        return _output_weight(module)[2]
    except TypeError:
        return None


def _attention_candidates(site, producers, consumers_of, own, work_modules):
    """Candidates ``(group key, label, make)`` for one attention site (see the module doc)."""
    q, k, v, out = site
    names = [_producer(t, producers) for t in (q, k, v)]
    if any(n is None or not (isinstance(work_modules[n], nn.Linear) or is_conv1d(work_modules[n]))
           for n in names):
        return []
    d_qk, d_v = q.shape[-1], v.shape[-1]
    nq, nk, nv = names
    width = {n: _features(work_modules[n]) for n in names}
    # Head counts from the widths of the producing layers: a layer producing only queries
    # (keys, values) gives them directly; a fused one with the query heads seen at the product.
    heads_q = width[nq] // d_qk if nq not in (nk, nv) else (q.shape[-3] if q.ndim >= 4 else None)
    if nk not in (nq, nv):
        heads_kv = width[nk] // d_qk
    elif nv not in (nq, nk):
        heads_kv = width[nv] // d_v
    elif heads_q is not None:   # k and v from one layer (with q, or without)
        rest = width[nk] - (heads_q * d_qk if nq == nk else 0)
        heads_kv = rest // (d_qk + d_v) if rest > 0 and rest % (d_qk + d_v) == 0 else None
    else:
        heads_kv = None
    if heads_q is None or not heads_kv or heads_q % heads_kv:
        return []
    sizes = [heads_q * d_qk, heads_kv * d_qk, heads_kv * d_v]
    offsets = [sum(sizes[j] for j in range(i) if names[j] == names[i]) for i in range(3)]
    ql, kl, vl = (own[n] for n in names)
    where = f"{names[0]}, {names[1]}" if names[0] != names[1] else names[0]
    key = (names[0], names[1], offsets[0], offsets[1])
    heads = f"heads={heads_q}" + (f"/{heads_kv}" if heads_kv != heads_q else "")
    found = []
    for rope in (None, "interleaved", "half"):
        if heads_kv == heads_q:
            make = lambda r=rope: [HeadRotation.sliced(ql, kl, d_qk, heads_q, r, offsets[0], offsets[1])]
            found.append((("qk",) + key + (rope,), f"HeadRotation({where}, {heads}, rope={rope})", make))
        else:
            make = lambda r=rope: [GroupedHeadRotation(ql, kl, d_qk, heads_q, heads_kv, r, offsets[0], offsets[1])]
            found.append((("qk",) + key + (rope,), f"GroupedHeadRotation({where}, {heads}, rope={rope})", make))
    for rope in ("interleaved", "half"):
        make = lambda r=rope: [QKPairScale(ql, kl, d_qk, heads_q, heads_kv, r, offsets[0], offsets[1])]
        found.append((("pair",) + key + (rope,), f"QKPairScale({where}, {heads}, rope={rope})", make))
    for o in consumers_of.get(out.grad_fn, []):
        if not (isinstance(work_modules[o], nn.Linear) or is_conv1d(work_modules[o])):
            continue
        ol = own[o]
        if heads_kv == heads_q:
            make = lambda ol=ol: [HeadRotationVO.sliced(vl, ol, d_v, heads_q, offsets[2])]
            found.append((("vo",), f"HeadRotationVO({names[2]}, {o}, {heads})", make))
        else:
            make = lambda ol=ol: [GroupedHeadRotationVO(vl, ol, d_v, heads_q, heads_kv, offsets[2])]
            found.append((("vo",), f"GroupedHeadRotationVO({names[2]}, {o}, {heads})", make))
    return found


def find_gauges(model: nn.Module, example_input: Any, *, loss: Any = LOSS_REQUIRED, tol: float = 1e-8,
                seed: int = 0, points: int = 2, log: bool = True) -> FoundGauges:
    """Find the exact gauges of ``model`` (see the module docstring).

    Args:
        model: the model (DistributedDataParallel / compiled wrappers are looked through).
            Left unchanged: the analysis runs on a float64 copy in eval mode.
        example_input: one input batch: a tensor, a tuple or list of positional arguments,
            or a dict of keyword arguments.
        loss: required, never assumed: ``"cross_entropy"`` (softmax cross-entropy over the
            outputs' last axis: the readout's logit shift is a symmetry), ``None`` (only
            symmetries of the outputs themselves: MSE and any loss of the outputs), or a
            callable ``outputs -> scalar loss`` (run on float64 outputs; the logit shift is
            proposed and kept only if this loss is invariant to it).
        tol: largest relative change of loss and outputs a proven gauge may cause.
        seed: seed of the random points, group elements and targets used by the proof.
        points: perturbed points the proof uses besides the model's own
            (see :func:`ddc.verify_gauges`).
        log: log the outcome once (logger ``"ddc"``: a one-line count at WARNING when some
            parameters are in no gauge or a proven gauge is not enforced, the summary at INFO).

    Returns:
        :class:`FoundGauges`: the proven gauges DDC can enforce, built on ``model``'s own
        modules; the proven ones it cannot; the candidates left out with the reason; the
        parameters in no gauge.
    """
    check_loss(loss, "find_gauges")
    model = unwrap_model(model)
    work = copy.deepcopy(model).double().eval()
    example = _as_float64(example_input)
    outputs, inputs, final, sites = _record(work, example)
    producers = {t.grad_fn: name for name, t in outputs.items()}
    work_modules = dict(work.named_modules())
    own = dict(model.named_modules())

    candidates: list[tuple[Any, str, Callable[[], list[Gauge]]]] = []
    norm_consumers: dict[str, list[str]] = {}
    site_outputs = {s[3].grad_fn: s for s in sites if s[3].grad_fn is not None}
    consumers_of: dict[Any, list[str]] = {}
    for name, nodes in inputs.items():
        for node in nodes:
            for source, kinds in _sources(node, {**producers, **{n: n for n in site_outputs}}):
                if not isinstance(source, str):   # the output of an attention product
                    if not kinds:
                        consumers_of.setdefault(source, []).append(name)
                    continue
                source_module = work_modules[source]
                if _is_gain_module(source_module) and "product" not in kinds:
                    if name not in norm_consumers.setdefault(source, []):
                        norm_consumers[source].append(name)
                elif _is_layer(source_module) and not isinstance(source_module, nn.MultiheadAttention) \
                        and not isinstance(work_modules[name], nn.MultiheadAttention):
                    candidates.append((("unit", source, name), f"UnitRescale([{source}], {name})",
                                       lambda s=source, n=name: [UnitRescale([own[s]], own[n])]))
    for norm, consumers in norm_consumers.items():
        affine = _gain_and_bias(work_modules[norm], outputs[norm])
        if affine is None:
            continue
        gain, bias = (getattr(own[norm], a) if a else None for a in affine)
        candidates.append((("norm", norm), f"NormGain({norm}, {consumers})",
                           lambda n=norm, c=tuple(consumers), g=gain, b=bias:
                           [NormGain(own[n], [own[x] for x in c], gain=g, bias=b)]))
    readout = None
    if final.grad_fn is not None:
        for source, kinds in _sources(final.grad_fn, producers):
            if not kinds and (isinstance(work_modules[source], nn.Linear) or is_conv1d(work_modules[source])):
                readout = source
    if readout is not None and (loss == "cross_entropy" or callable(loss)) \
            and isinstance(work_modules[readout], nn.Linear):
        candidates.append((("shift",), f"LogitShift({readout})", lambda s=readout: [LogitShift(own[s])]))
    for site in sites:
        candidates.extend(_attention_candidates(site, producers, consumers_of, own, work_modules))
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            label = name or "the model"
            candidates.append((("qk", name), f"HeadRotation.packed({label})", lambda m=module: [HeadRotation.packed(m)]))
            candidates.append((("vo",), f"HeadRotationVO.packed({label})", lambda m=module: [HeadRotationVO.packed(m)]))

    rejected: list[tuple[str, str]] = []
    unique: dict[str, tuple[Any, Callable[[], list[Gauge]]]] = {}
    for key, label, make in candidates:   # a pair reached along several paths is proposed once
        unique.setdefault(label, (key, make))
    built: list[tuple[Any, str, Gauge]] = []
    for label, (key, make) in unique.items():
        try:
            gauges = make()
            check_declarations(model, gauges)
        except (ValueError, TypeError) as error:   # shapes, shared tensors (GaugeDeclarationError)
            rejected.append((label, str(error)))
            continue
        built.extend((key, label, g) for g in gauges)
    report = verify_gauges(model, loss_function(loss, seed), example, gauges=[g for _, _, g in built],
                           tol=tol, seed=seed, points=points, raise_on_failure=False) if built else {}

    proven: list[Gauge] = []
    labels: list[str] = []
    not_enforced: list[tuple[str, Gauge, str]] = []
    qk_rope: dict[tuple, str | None] = {}   # per q/k pair: the RoPE layout proven first
    for (key, label, gauge), change in zip(built, report.values()):
        if change["loss"] > tol or change["logits"] > tol:
            rejected.append((label, f"not a symmetry: changes the loss by {change['loss']:.1e} and the "
                                    f"outputs by {change['logits']:.1e}"))
            continue
        if key[0] == "qk" and len(key) > 2:
            if key[1:-1] in qk_rope:
                continue   # a more general RoPE layout of the same q/k was proven already
            qk_rope[key[1:-1]] = key[-1]
        if key[0] == "pair" and qk_rope.get(key[1:-1], "none") != key[-1]:
            continue   # a pair scale only under the RoPE layout its rotation was proven with
        try:
            Frame(proven + [gauge])
        except TypeError:
            not_enforced.append((label, gauge, f"DDC's step does not support {type(gauge).__name__} yet"))
            continue
        except ValueError as error:
            not_enforced.append((label, gauge, f"DDC's step cannot combine it with a gauge found earlier: {error}"))
            continue
        proven.append(gauge)
        labels.append(label)
    covered = {id(p) for g in proven for p in g.parameters()}
    uncovered = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    found = FoundGauges(proven, labels, rejected, not_enforced, uncovered, readout)
    if log:
        _log(model, found)
    return found


def _log(model: nn.Module, found: FoundGauges) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    covered = {id(p) for g in found for p in g.parameters()}
    left = sum(p.numel() for p in params if id(p) not in covered)
    total = sum(p.numel() for p in params) or 1
    line = (f"find_gauges on {type(model).__name__}: {len(found)} gauges enforced, {len(found.not_enforced)} "
            f"proven but not enforced by DDC's step, {len(found.rejected)} candidates rejected; "
            f"{len(found.uncovered)} parameter tensor(s) ({100 * left / total:.0f}% of the weights) in no "
            f"enforced gauge: there DDC is its base optimizer (AdamW / Muon). FoundGauges.summary() lists them")
    if found.uncovered or found.not_enforced:
        logger.warning(line)
    else:
        logger.info(line)
    logger.info("find_gauges on %s:\n%s", type(model).__name__, found.summary())
