"""Gauge-invariant diagnostics of a network's dead directions (documented in ``docs/diagnostics.md``).

Two readings, both computed from the model's *declared* gauges (``model.gauges()``), so they
work on any model that declares its symmetries and never depend on where along a gauge
orbit the optimizer left the weights:

* :func:`spare_capacity` — per feed-forward layer (one per :class:`~ddc.gauges.UnitRescale`
  gauge), the fraction of units whose gauge-invariant mass is below a fraction of the
  layer's median mass, and the participation ratio (effective number of units).
* :func:`dead_direction_rates` — per channel layer (an FFN layer, or an attention layer found
  from its :class:`~ddc.gauges.HeadRotationVO` gauge) and per observable (forward second
  moment, backward second moment, directional Fisher), the log-log rate ``s`` at which the
  observable vanishes as every channel of the layer is scaled by ``t → 0`` along its
  gauge-invariant direction, the order ``k̂ = 1 + s/2`` with a confidence interval, and
  whether the cell is *read* (a clean fit matching the order the channel type predicts).

:func:`diagnostics` runs both and returns a flat ``dict[str, float]`` for a trainer's logger.
Nothing here changes the model: hooks are removed, the train/eval mode is restored, and
parameter ``.grad`` fields are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .gauges import Gauge, HeadRotationVO, NormGain, ScaleMember, UnitRescale

__all__ = [
    "OBSERVABLES", "PREDICTED_ORDER", "DEFAULT_SCALES", "ReadCriteria", "RateFit", "RateCell",
    "DeadDirectionReport", "LayerCapacity", "ChannelLayer", "channel_layers", "unit_masses",
    "spare_capacity", "fit_rate", "dead_direction_rates", "diagnostics",
]

#: The per-layer observables, in cell order (see docs/diagnostics.md for definitions).
OBSERVABLES = ("fwd", "bwd", "fisher")

#: Predicted dead-direction order k of each channel type (derivation in docs/diagnostics.md).
#: The same k holds for all three observables: each vanishes like t^(2(k-1)).
PREDICTED_ORDER = {"ffn_relu": 2, "ffn_gated": 3, "attn": 2}

#: Default channel scales t (log-spaced from 1e-2 up to the checkpoint itself, t = 1).
DEFAULT_SCALES: tuple[float, ...] = tuple(10.0 ** (-2 + 0.25 * i) for i in range(9))


@dataclass(frozen=True)
class ReadCriteria:
    """When a (layer, observable) cell counts as *read*.

    ``min_r2``: the log-log fit's coefficient of determination; ``max_ci_halfwidth``: half
    the width of the ``confidence`` interval of ``k̂``; ``tolerance``: the largest allowed
    ``|k̂ - k_predicted|``.
    """

    min_r2: float = 0.995
    max_ci_halfwidth: float = 0.1
    tolerance: float = 0.2
    confidence: float = 0.95

    def accepts(self, fit: "RateFit", predicted: int) -> bool:
        """Whether ``fit`` is clean and matches the ``predicted`` order."""
        return (math.isfinite(fit.k_hat) and fit.r2 >= self.min_r2
                and fit.k_ci <= self.max_ci_halfwidth
                and abs(fit.k_hat - predicted) <= self.tolerance)


@dataclass(frozen=True)
class RateFit:
    """Least-squares fit ``log v = log c + s log t`` and the order ``k̂ = 1 + s/2``."""

    slope: float
    slope_ci: float  # half-width of the confidence interval of the slope
    k_hat: float
    k_ci: float  # half-width of the confidence interval of k̂ (= slope_ci / 2)
    r2: float
    points: int


@dataclass(frozen=True)
class RateCell:
    """One (layer, observable) reading."""

    layer: str
    kind: str
    observable: str
    predicted_k: int
    fit: RateFit
    read: bool
    values: tuple[float, ...] = field(repr=False, default=())


@dataclass
class DeadDirectionReport:
    """All cells of a model; ``read`` of ``total`` cells were read."""

    cells: list[RateCell]
    scales: tuple[float, ...]

    @property
    def total(self) -> int:
        return len(self.cells)

    @property
    def read(self) -> int:
        return sum(c.read for c in self.cells)

    def as_metrics(self, prefix: str = "diag/") -> dict[str, float]:
        """Flat floats: ``{prefix}k/<layer>/<obs>``, ``…/ci``, ``…/r2``, ``…/read`` per cell,
        and ``{prefix}cells_read`` / ``{prefix}cells_total``."""
        out: dict[str, float] = {}
        for c in self.cells:
            key = f"{prefix}k/{c.layer}/{c.observable}"
            out[key] = c.fit.k_hat
            out[f"{key}/ci"] = c.fit.k_ci
            out[f"{key}/r2"] = c.fit.r2
            out[f"{key}/read"] = float(c.read)
        out[f"{prefix}cells_read"] = float(self.read)
        out[f"{prefix}cells_total"] = float(self.total)
        return out


@dataclass(frozen=True)
class LayerCapacity:
    """Spare feed-forward capacity of one FFN layer."""

    layer: str
    units: int
    spare_fraction: float  # fraction of units with mass < threshold * median mass
    participation_ratio: float  # (Σ m)² / Σ m², the effective number of units
    median_mass: float
    threshold: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Finding the layers from the gauges
# ---------------------------------------------------------------------------------------


@dataclass
class ChannelLayer:
    """A layer of channels (FFN units or attention heads) found from a gauge.

    ``inputs``: the layers whose outputs form the channels' whole input (``up`` and, for a
    gated unit, ``gate``; ``q``, ``k``, ``v`` for attention); scaling their outputs by ``t``
    scales every channel along its gauge-invariant direction. ``output``: the projection
    back into the residual stream (``down`` / ``o``). ``readers``: the modules that read the
    residual stream for this layer (the pre-norm of a :class:`NormGain` gauge, else the
    input layers themselves).
    """

    name: str
    kind: str
    inputs: list[nn.Module]
    output: nn.Module
    readers: list[nn.Module]
    channels: int


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """``id(param)`` → (module name, module, attribute) for every directly owned parameter."""
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    for name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (name, module, attr))
    return owners


def _model_gauges(model: nn.Module, gauges: Sequence[Gauge] | None) -> list[Gauge]:
    if gauges is not None:
        return list(gauges)
    if not callable(getattr(model, "gauges", None)):
        raise ValueError(
            f"{type(model).__name__} has no gauges() method; pass gauges=[...] explicitly "
            f"(diagnostics are computed from declared UnitRescale / HeadRotationVO gauges)"
        )
    return list(model.gauges())


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _norm_of(weight: nn.Parameter, gauges: list[Gauge], owners) -> nn.Module | None:
    """The norm of the :class:`NormGain` gauge whose consumers include ``weight``."""
    for g in gauges:
        if isinstance(g, NormGain) and any(m.param is weight and m.sign < 0 for m in g.members):
            gain = next(m.param for m in g.members if m.sign > 0)
            return owners[id(gain)][1]
    return None


def channel_layers(model: nn.Module, example_input: torch.Tensor,
                   gauges: Sequence[Gauge] | None = None) -> list[ChannelLayer]:
    """The model's channel layers, in module order.

    One per :class:`UnitRescale` gauge (``ffn_relu``, or ``ffn_gated`` when a sibling
    layer under the same parent reads the same input tensor and has as many outputs: the
    SwiGLU gate) and one per :class:`HeadRotationVO` gauge (``attn``; its siblings are
    ``q`` and ``k``). Siblings are found by one forward pass on ``example_input``.
    """
    gauges = _model_gauges(model, gauges)
    owners = _owners(model)
    modules = dict(model.named_modules())
    found: list[tuple[str, str, nn.Module, nn.Module]] = []  # (kind, name, input, output)
    for g in gauges:
        if isinstance(g, UnitRescale):
            ins = [owners[id(m.param)] for m in g.members if m.sign > 0 and m.axis == 0
                   and owners[id(m.param)][2] == "weight"]
            out = next(owners[id(m.param)] for m in g.members if m.sign < 0)
            if len(ins) != 1:
                raise ValueError(f"{g!r}: diagnostics support one input layer per unit gauge, "
                                 f"got {len(ins)}")
            found.append(("ffn", _parent(out[0]), ins[0][1], out[1]))
        elif isinstance(g, HeadRotationVO):
            v = next(owners[id(m.param)] for m in g.members if m.axis == 0
                     and owners[id(m.param)][2] == "weight")
            o = next(owners[id(m.param)] for m in g.members if m.axis == 1)
            found.append(("attn", _parent(o[0]), v[1], o[1]))
    # Siblings: Linear layers under the same parent reading the very same input tensor.
    name_of = {id(m): n for n, m in modules.items()}
    seen_input: dict[int, torch.Tensor] = {}
    candidates: dict[int, list[nn.Module]] = {}
    for _, _, first, _ in found:
        parent = modules[_parent(name_of[id(first)])]
        candidates[id(first)] = [
            c for c in parent.children()
            if isinstance(c, nn.Linear) and c is not first
            and c.out_features == getattr(first, "out_features", None)
        ]
    watched = {id(m): m for _, _, first, _ in found for m in [first, *candidates[id(first)]]}
    handles = [m.register_forward_hook(
        lambda mod, args, out: seen_input.__setitem__(id(mod), args[0])) for m in watched.values()]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    layers = []
    for kind, name, first, out in found:
        x = seen_input.get(id(first))
        sibs = [c for c in candidates[id(first)] if x is not None and seen_input.get(id(c)) is x]
        if kind == "ffn":
            kind = "ffn_gated" if sibs else "ffn_relu"
        inputs = [first, *sibs]
        norm = _norm_of(first.weight, gauges, owners)
        layers.append(ChannelLayer(name=name or name_of[id(out)], kind=kind, inputs=inputs,
                                   output=out, readers=[norm] if norm is not None else inputs,
                                   channels=_channels(kind, first, out, gauges)))
    order = {id(m): i for i, m in enumerate(modules.values())}
    return sorted(layers, key=lambda layer: order[id(layer.output)])


def _channels(kind: str, first: nn.Module, out: nn.Module, gauges: list[Gauge]) -> int:
    for g in gauges:
        if kind.startswith("ffn") and isinstance(g, UnitRescale) and any(
                m.param is out.weight for m in g.members):
            return g.size
        if kind == "attn" and isinstance(g, HeadRotationVO) and any(
                m.param is out.weight for m in g.members):
            return g.n_blocks
    raise AssertionError("channel layer without its gauge")  # unreachable by construction


# ---------------------------------------------------------------------------------------
# Spare feed-forward capacity
# ---------------------------------------------------------------------------------------


def _effective_rows(weight: torch.Tensor, bias: torch.Tensor | None,
                    norm: nn.Module | None) -> torch.Tensor:
    """Rows of the affine map from the *un-gained* normalised input to the layer's output:
    ``[W·diag(γ) | W β + b]``. Folding the norm's gain γ (and bias β) in makes the row norm
    invariant under the norm's :class:`NormGain` gauge as well as under unit rescaling."""
    w = weight.detach().flatten(1) if weight.ndim > 2 else weight.detach()
    cols = []
    b = bias.detach() if bias is not None else None
    if norm is not None:
        gamma = norm.weight.detach()
        spatial = w.shape[1] // gamma.numel()
        g = gamma.repeat_interleave(spatial) if spatial > 1 else gamma
        beta = getattr(norm, "bias", None)
        if beta is not None:
            shift = w @ (beta.detach().repeat_interleave(spatial) if spatial > 1 else beta.detach())
            b = shift if b is None else b + shift
        w = w * g
    cols.append(w)
    if b is not None:
        cols.append(b.unsqueeze(1))
    return torch.cat(cols, dim=1)


def unit_masses(model: nn.Module, gauge: UnitRescale,
                gauges: Sequence[Gauge] | None = None) -> torch.Tensor:
    """Gauge-invariant mass of every unit of ``gauge``: ``‖w_in,i‖ · ‖w_out,i‖`` (float64).

    ``w_in,i`` is row ``i`` of every input layer of the gauge (weight and bias), with the
    preceding norm's gain and bias folded in (see :func:`_effective_rows`); ``w_out,i`` is
    column ``i`` of the output layer. For SwiGLU the input layer is ``up`` only: the gate
    row is not part of the unit gauge and is left out of the mass (docs/diagnostics.md).
    """
    all_gauges = _model_gauges(model, gauges)
    owners = _owners(model)
    sq_in = torch.zeros(gauge.size, dtype=torch.float64)
    out_norm = None
    for m in gauge.members:
        name, module, attr = owners[id(m.param)]
        if m.sign > 0 and attr == "weight":
            norm = _norm_of(m.param, all_gauges, owners)
            rows = _effective_rows(m.param, getattr(module, "bias", None), norm)
            sq_in += rows.double().pow(2).sum(1).cpu()
        elif m.sign < 0:
            w = m.param.detach().double().movedim(1, 0).flatten(1)
            out_norm = w.norm(dim=1).cpu()
    assert out_norm is not None, "UnitRescale always has an output member"
    return sq_in.sqrt() * out_norm


def spare_capacity(model: nn.Module, *, threshold: float = 0.1,
                   gauges: Sequence[Gauge] | None = None) -> list[LayerCapacity]:
    """Spare capacity of each FFN layer (one per :class:`UnitRescale` gauge, in declaration
    order): the fraction of units whose mass is below ``threshold`` × the layer's median
    mass, and the participation ratio ``(Σ m_i)² / Σ m_i²`` of the masses."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1) (a fraction of the median), got {threshold}")
    all_gauges = _model_gauges(model, gauges)
    owners = _owners(model)
    out = []
    for g in all_gauges:
        if not isinstance(g, UnitRescale):
            continue
        mass = unit_masses(model, g, all_gauges)
        down = next(m.param for m in g.members if m.sign < 0)
        median = float(torch.quantile(mass, 0.5))  # the midpoint for an even count
        total_sq = float(mass.pow(2).sum())
        pr = float(mass.sum() ** 2 / total_sq) if total_sq > 0 else 0.0
        out.append(LayerCapacity(
            layer=_parent(owners[id(down)][0]) or owners[id(down)][0], units=g.size,
            spare_fraction=float((mass < threshold * median).double().mean()),
            participation_ratio=pr, median_mass=median, threshold=threshold))
    return out


# ---------------------------------------------------------------------------------------
# Rate fits
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _student_t_quantile(dof: int, confidence: float) -> float:
    """Two-sided Student-t quantile (``P(|T| ≤ q) = confidence``), by bisection on the CDF
    integrated with Simpson's rule (no SciPy needed in the library)."""
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def mass(x: float, n: int = 2000) -> float:  # P(0 ≤ T ≤ x)
        h = x / n
        f = [math.exp(log_c - (dof + 1) / 2 * math.log1p((i * h) ** 2 / dof)) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while 2 * mass(hi) < confidence:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 2 * mass(mid) < confidence else (lo, mid)
    return (lo + hi) / 2


def fit_rate(scales: Sequence[float], values: Sequence[float], confidence: float = 0.95) -> RateFit:
    """Fit ``log values = a + s log scales`` by least squares; ``k̂ = 1 + s/2``.

    The slope's confidence interval is the ordinary-least-squares one (Student t with
    ``n - 2`` degrees of freedom). Non-positive or non-finite values make the fit invalid:
    slope NaN, R² 0 (such a cell is never read).
    """
    t = torch.tensor(list(scales), dtype=torch.float64)
    v = torch.tensor(list(values), dtype=torch.float64)
    n = len(t)
    if n < 3:
        raise ValueError(f"a rate fit needs at least 3 scales, got {n}")
    if not bool(torch.isfinite(v).all() and (v > 0).all()):
        nan = float("nan")
        return RateFit(slope=nan, slope_ci=nan, k_hat=nan, k_ci=nan, r2=0.0, points=n)
    x, y = t.log(), v.log()
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc * xc).sum())
    slope = float((xc * yc).sum()) / sxx
    resid = yc - slope * xc
    ss_res, ss_tot = float((resid * resid).sum()), float((yc * yc).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    se = math.sqrt(ss_res / (n - 2) / sxx) if n > 2 else float("inf")
    ci = _student_t_quantile(n - 2, confidence) * se
    return RateFit(slope=slope, slope_ci=ci, k_hat=1.0 + slope / 2, k_ci=ci / 2, r2=r2, points=n)


# ---------------------------------------------------------------------------------------
# Dead-direction rates
# ---------------------------------------------------------------------------------------


def _scale_hook(t: torch.Tensor) -> Callable:
    # Scaling a Linear's output by t == scaling its rows and bias by t (the channel's whole
    # input), which commutes with every declared gauge (see docs/diagnostics.md). ``t`` holds
    # one scale per sample (the probe batch is repeated once per scale).
    def hook(module, args, out):
        return out * t.reshape(-1, *([1] * (out.ndim - 1)))
    return hook


def _contribution(layer: ChannelLayer, out: torch.Tensor) -> torch.Tensor:
    """The layer's output without the output projection's bias (which t does not scale)."""
    bias = getattr(layer.output, "bias", None)
    return out - bias if bias is not None else out


def _mean_sq_per_scale(x: torch.Tensor, n_scales: int) -> list[float]:
    """Per scale (contiguous chunk of the batch), the mean over tokens of the squared norm
    over the feature axis."""
    per_token = x.double().pow(2).sum(-1)
    return per_token.reshape(n_scales, -1).mean(1).tolist()


def _forward_readings(model: nn.Module, layer: ChannelLayer, t: torch.Tensor,
                      inputs: torch.Tensor, n_scales: int) -> tuple[list[float], list[float]]:
    """Forward second moment and directional (model) Fisher at every scale.

    ``inputs`` is the probe batch repeated once per scale and ``t`` the per-sample scale.
    One forward pass in forward-mode AD: ``t`` is dual with tangent ``t``, so the logits'
    tangent is ``ż = dz/dε`` along ``t → t(1 + ε)``, the layer's radial direction.
    Fisher = mean over positions of ``Var_{y~softmax(z)}(ż_y)``.
    """
    captured: dict[str, torch.Tensor] = {}
    with fwAD.dual_level():
        handles = [m.register_forward_hook(_scale_hook(fwAD.make_dual(t, t))) for m in layer.inputs]
        handles.append(layer.output.register_forward_hook(
            lambda mod, args, out: captured.__setitem__("out", fwAD.unpack_dual(out).primal)))
        try:
            logits = model(inputs)
        finally:
            for h in handles:
                h.remove()
        z, zdot = fwAD.unpack_dual(logits)
    if zdot is None:  # the logits do not depend on this layer at all
        zdot = torch.zeros_like(z)
    p = torch.softmax(z.double(), dim=-1)
    zdot = zdot.double()
    centred = zdot - (p * zdot).sum(-1, keepdim=True)
    fisher = (p * centred * centred).sum(-1).reshape(n_scales, -1).mean(1).tolist()
    return _mean_sq_per_scale(_contribution(layer, captured["out"]), n_scales), fisher


def _backward_readings(model: nn.Module, layer: ChannelLayer, t: torch.Tensor,
                       inputs: torch.Tensor, targets: torch.Tensor, n_scales: int) -> list[float]:
    """Backward second moment at every scale: mean over tokens of ``‖∂L/∂x‖²`` where ``x``
    is the residual stream entering the layer and only the path through this layer counts
    (``L`` = summed cross-entropy, so per-token gradients do not shrink with batch size;
    samples do not interact in eval mode, so each scale's chunk gets its own gradient)."""
    aliases: list[torch.Tensor] = []

    def detach_input(module, args):
        # A fresh leaf: its gradient is exactly the vector-Jacobian product through this
        # branch (the residual path keeps using the original tensor).
        alias = args[0].detach().requires_grad_(True)
        aliases.append(alias)
        return (alias, *args[1:])

    handles = [r.register_forward_pre_hook(detach_input) for r in layer.readers]
    handles += [m.register_forward_hook(_scale_hook(t)) for m in layer.inputs]
    try:
        with torch.enable_grad():
            logits = model(inputs)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()  # a low-precision loss would swamp the small-t readings
            loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum")
            grads = torch.autograd.grad(loss, aliases, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    total = None
    for g in grads:
        if g is not None:
            total = g if total is None else total + g
    if total is None:
        return [0.0] * n_scales
    return _mean_sq_per_scale(total, n_scales)


@torch.no_grad()
def dead_direction_rates(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                         scales: Sequence[float] = DEFAULT_SCALES,
                         criteria: ReadCriteria = ReadCriteria(),
                         gauges: Sequence[Gauge] | None = None,
                         layers: Sequence[ChannelLayer] | None = None) -> DeadDirectionReport:
    """Read the dead-direction order of every (channel layer, observable) cell.

    ``model(inputs)`` must return logits with the classes on the last axis and ``targets``
    the matching class indices (a language model's ``(B, T)`` next tokens, or a
    classifier's ``(B,)`` labels). For each layer and each ``t`` in ``scales`` every channel
    of that layer alone is scaled by ``t`` (the rest of the model is the checkpoint), and
    the three observables are measured; the cell's rate is fitted over ``scales``.

    Cost: per channel layer, one forward pass in forward-mode AD and one forward + backward
    pass, each on the probe batch repeated ``len(scales)`` times (so memory grows with
    ``len(scales)`` × batch: keep the probe batch small). The model runs in eval mode
    (samples must not interact: BatchNorm uses its running statistics); attention uses
    PyTorch's math kernel, which supports forward-mode AD.
    """
    scales = tuple(float(s) for s in scales)
    if len(scales) < 3 or any(not (s > 0) for s in scales):
        raise ValueError(f"scales must be at least 3 positive numbers, got {list(scales)}")
    if layers is None:
        layers = channel_layers(model, inputs, gauges)
    # Every scale in one pass: the probe batch repeated once per scale, sample j of copy i
    # scaled by scales[i] (samples never interact in eval mode).
    n = len(scales)
    ref = next(model.parameters())
    stacked = inputs.repeat(n, *([1] * (inputs.ndim - 1)))
    stacked_targets = targets.repeat(n, *([1] * (targets.ndim - 1)))
    t = torch.tensor(scales, dtype=ref.dtype, device=ref.device).repeat_interleave(len(inputs))
    was_training = model.training
    model.eval()
    cells: list[RateCell] = []
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            for layer in layers:
                fwd, fisher = _forward_readings(model, layer, t, stacked, n)
                bwd = _backward_readings(model, layer, t, stacked, stacked_targets, n)
                readings = {"fwd": fwd, "bwd": bwd, "fisher": fisher}
                k = PREDICTED_ORDER[layer.kind]
                for obs in OBSERVABLES:
                    fit = fit_rate(scales, readings[obs], criteria.confidence)
                    cells.append(RateCell(layer=layer.name, kind=layer.kind, observable=obs,
                                          predicted_k=k, fit=fit, read=criteria.accepts(fit, k),
                                          values=tuple(readings[obs])))
    finally:
        model.train(was_training)
    return DeadDirectionReport(cells=cells, scales=scales)


def diagnostics(model: nn.Module, batch: Sequence[torch.Tensor], *, threshold: float = 0.1,
                scales: Sequence[float] = DEFAULT_SCALES, criteria: ReadCriteria = ReadCriteria(),
                prefix: str = "diag/") -> dict[str, float]:
    """Every diagnostic as flat floats, for a trainer to log every N steps.

    ``batch = (inputs, targets)`` on the model's device (a probe batch; keep it fixed across
    calls so readings are comparable). Keys: ``{prefix}spare_frac/<layer>``,
    ``{prefix}eff_units/<layer>``, ``{prefix}spare_frac`` (mean over FFN layers), and the
    cells of :meth:`DeadDirectionReport.as_metrics`.
    """
    if len(batch) < 2:
        raise ValueError("batch must be (inputs, targets)")
    inputs, targets = batch[0], batch[1]
    gauges = _model_gauges(model, None)
    out: dict[str, float] = {}
    caps = spare_capacity(model, threshold=threshold, gauges=gauges)
    for c in caps:
        out[f"{prefix}spare_frac/{c.layer}"] = c.spare_fraction
        out[f"{prefix}eff_units/{c.layer}"] = c.participation_ratio
    if caps:
        out[f"{prefix}spare_frac"] = sum(c.spare_fraction for c in caps) / len(caps)
    report = dead_direction_rates(model, inputs, targets, scales=scales, criteria=criteria,
                                  gauges=gauges)
    out.update(report.as_metrics(prefix))
    return out
