"""Gauge-invariant diagnostics of a network's feed-forward units (documented in ``docs/diagnostics.md``).

Every reading is computed from the model's *declared* gauges (``model.gauges()``): one FFN
layer per :class:`~ddc.gauges.UnitRescale` gauge, whose units each have a gauge-invariant
mass ``m_i = ‖w_in,i‖ · ‖w_out,i‖``. So readings work on any model that declares its
symmetries and never depend on where along a gauge orbit the optimizer left the weights.

* :func:`spare_capacity` — per FFN layer, the fraction of units whose mass is below
  :data:`LOW_MASS` × the layer's mean mass, and the participation ratio (effective number
  of units).
* :func:`ablation` — functional spare capacity: the change in a held-out loss when those
  low-mass units are switched off, and when every unit beyond the participation ratio
  (the ``units - PR`` lowest in mass) is switched off.
* :class:`TrajectoryRates` — the dead-direction rate along the real training trajectory:
  fed the probe batch at successive checkpoints, it follows every unit's mass and forward
  second moment; a unit whose mass falls by :attr:`ReadRule.fall` from its peak is a
  *cell*, its order ``k̂ = d log(forward second moment) / d log(mass)`` over the falling
  checkpoints is fitted with a bootstrap interval over the probe samples, and the cell is
  *read* when that interval lies within the rule's tolerance of :data:`PREDICTED_ORDER`.

:func:`diagnostics` runs them and returns a flat ``dict[str, float]`` for a trainer's
logger. Nothing here changes the model: hooks are removed, the train/eval mode is restored,
and parameter ``.grad`` fields are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .gauges import Gauge, NormGain, UnitRescale

__all__ = [
    "LOW_MASS", "PREDICTED_ORDER", "ReadRule", "LayerCapacity", "FfnLayer", "ffn_layers",
    "unit_masses", "spare_capacity", "unit_activity", "Ablation", "ablation", "UnitCell",
    "RateReport", "TrajectoryRates", "diagnostics",
]

#: A unit is *low-mass* when its mass is below this fraction of its layer's mean mass.
LOW_MASS = 0.1

#: The order k of a unit's dead direction: its contribution ``w_out,i · a_i(x)`` is
#: proportional to its mass when the unit shrinks along a fixed direction (ReLU, or a gated
#: unit's up/down pair with its gate held), so the forward second moment goes like
#: ``m² = (r²/2)²``, i.e. like ``r^(2k)`` with k = 2 in the gauge-invariant distance
#: ``r = √(2m)`` from the unit to its dead point (docs/diagnostics.md).
PREDICTED_ORDER = 2


@dataclass(frozen=True)
class ReadRule:
    """When a unit is a cell, and when a cell is *read*.

    ``fall``: a unit is a cell when its mass at the last checkpoint is at most its peak over
    the checkpoints divided by ``fall``, with at least ``min_points`` checkpoints from the
    peak on. Read: the ``confidence`` bootstrap interval of ``k̂`` (``bootstrap`` resamples
    of the probe samples) lies inside ``PREDICTED_ORDER ± tolerance``. The defaults are
    calibrated on planted units (tests/test_diagnostics.py): a unit shrunk along its
    direction during real training reads, a live or rotating unit does not.
    """

    fall: float = 2.0
    min_points: int = 3
    tolerance: float = 0.25
    confidence: float = 0.95
    bootstrap: int = 200

    def __post_init__(self) -> None:
        if not self.fall > 1.0:
            raise ValueError(f"fall must be > 1 (a factor the mass falls by), got {self.fall}")
        if self.min_points < 3:
            raise ValueError(f"min_points must be at least 3, got {self.min_points}")
        if not 0.0 < self.confidence < 1.0 or self.bootstrap < 10 or not self.tolerance > 0:
            raise ValueError("confidence must be in (0, 1), bootstrap >= 10, tolerance > 0")

    def reads(self, low: float, high: float) -> bool:
        """Whether a cell with bootstrap interval ``[low, high]`` of ``k̂`` is read."""
        return (PREDICTED_ORDER - self.tolerance <= low) and (high <= PREDICTED_ORDER + self.tolerance)


@dataclass(frozen=True)
class LayerCapacity:
    """Spare feed-forward capacity of one FFN layer."""

    layer: str
    units: int
    spare_fraction: float  # fraction of units with mass < threshold * mean mass
    participation_ratio: float  # (Σ m)² / Σ m², the effective number of units
    mean_mass: float
    threshold: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Finding the FFN layers from the gauges
# ---------------------------------------------------------------------------------------


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
            f"(diagnostics are computed from declared UnitRescale gauges)"
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



@dataclass
class FfnLayer:
    """An FFN layer found from its :class:`UnitRescale` gauge: ``output`` is the module that
    owns ``w_out`` (its input's unit axis: the last for ``Linear``, 1 for a convolution)."""

    name: str
    gauge: UnitRescale
    output: nn.Module

    @property
    def units(self) -> int:
        return self.gauge.size

    def unit_axis(self, x: torch.Tensor) -> int:
        return x.ndim - 1 if isinstance(self.output, nn.Linear) else 1


def ffn_layers(model: nn.Module, gauges: Sequence[Gauge] | None = None) -> list[FfnLayer]:
    """One :class:`FfnLayer` per :class:`UnitRescale` gauge, in declaration order; named
    after the parent of the output layer (``blocks.0.mlp``)."""
    owners = _owners(model)
    out = []
    for g in _model_gauges(model, gauges):
        if isinstance(g, UnitRescale):
            name, module, _ = owners[id(next(m.param for m in g.members if m.sign < 0))]
            out.append(FfnLayer(name=_parent(name) or name, gauge=g, output=module))
    return out


# ---------------------------------------------------------------------------------------
# Masses and spare capacity
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


def spare_capacity(model: nn.Module, *, threshold: float = LOW_MASS,
                   gauges: Sequence[Gauge] | None = None) -> list[LayerCapacity]:
    """Spare capacity of each FFN layer (one per :class:`UnitRescale` gauge, in declaration
    order): the fraction of units whose mass is below ``threshold`` × the layer's mean
    mass, and the participation ratio ``(Σ m_i)² / Σ m_i²`` of the masses."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1) (a fraction of the mean), got {threshold}")
    all_gauges = _model_gauges(model, gauges)
    owners = _owners(model)
    out = []
    for g in all_gauges:
        if not isinstance(g, UnitRescale):
            continue
        mass = unit_masses(model, g, all_gauges)
        down = next(m.param for m in g.members if m.sign < 0)
        mean = float(mass.mean())
        total_sq = float(mass.pow(2).sum())
        pr = float(mass.sum() ** 2 / total_sq) if total_sq > 0 else 0.0
        out.append(LayerCapacity(
            layer=_parent(owners[id(down)][0]) or owners[id(down)][0], units=g.size,
            spare_fraction=float((mass < threshold * mean).double().mean()),
            participation_ratio=pr, mean_mass=mean, threshold=threshold))
    return out


# ---------------------------------------------------------------------------------------
# Unit activity and ablation
# ---------------------------------------------------------------------------------------


def _out_column_norms(layer: FfnLayer) -> torch.Tensor:
    w = next(m.param for m in layer.gauge.members if m.sign < 0)
    return w.detach().double().movedim(1, 0).flatten(1).norm(dim=1)


@torch.no_grad()
def unit_activity(model: nn.Module, inputs: torch.Tensor,
                  layers: Sequence[FfnLayer] | None = None) -> dict[str, torch.Tensor]:
    """Per layer, a ``(samples, units)`` float64 tensor: each unit's forward second moment
    on each probe sample, ``mean over the sample's positions of ‖w_out,i‖² a_i(x)²`` (the
    squared norm of the unit's contribution; gauge-invariant, as ``a_i`` scales inversely
    to ``w_out,i`` under the unit gauge). One forward pass in eval mode."""
    layers = ffn_layers(model) if layers is None else list(layers)
    seen: dict[str, torch.Tensor] = {}

    def capture(layer: FfnLayer):
        def hook(module, args):
            a = args[0].detach().double().movedim(layer.unit_axis(args[0]), -1)
            seen[layer.name] = a.reshape(a.shape[0], -1, a.shape[-1]).pow(2).mean(1).cpu()
        return hook

    handles = [layer.output.register_forward_pre_hook(capture(layer)) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {layer.name: seen[layer.name] * _out_column_norms(layer).cpu().pow(2) for layer in layers}


@dataclass(frozen=True)
class Ablation:
    """Held-out loss with every FFN unit on, and its change when units are switched off:
    ``low`` = the low-mass units (below ``threshold`` × their layer's mean mass), ``tail`` =
    in each layer the ``units - round(PR)`` lowest-mass units (those beyond the effective
    number). ``*_fraction``: the share of all FFN units switched off."""

    loss: float
    low_delta: float
    low_fraction: float
    tail_delta: float
    tail_fraction: float
    threshold: float


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int,
          masks: dict[int, torch.Tensor] | None, layers: Sequence[FfnLayer]) -> float:
    handles = []
    for layer in layers:
        if masks is None:
            continue
        keep = masks[id(layer.output)]

        def hook(module, args, layer=layer, keep=keep):
            x = args[0]
            shape = [1] * x.ndim
            shape[layer.unit_axis(x)] = -1
            return (x * keep.to(x.dtype).to(x.device).reshape(shape), *args[1:])
        handles.append(layer.output.register_forward_pre_hook(hook))
    total, count = 0.0, 0
    try:
        for i in range(0, len(inputs), batch):
            logits = model(inputs[i:i + batch]).double()
            y = targets[i:i + batch]
            total += float(F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum"))
            count += y.numel()
    finally:
        for h in handles:
            h.remove()
    return total / count


@torch.no_grad()
def ablation(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
             threshold: float = LOW_MASS, batch: int = 256,
             gauges: Sequence[Gauge] | None = None) -> Ablation:
    """The :class:`Ablation` of ``model`` on held-out ``(inputs, targets)`` (logits with the
    classes on the last axis; mean cross-entropy over every target), in eval mode, in
    chunks of ``batch`` samples. A unit is switched off by zeroing its activation where the
    output layer reads it (exactly removing its contribution; gauge-invariant, since both
    the masses and the function are)."""
    all_gauges = _model_gauges(model, gauges)
    layers = ffn_layers(model, all_gauges)
    if not layers:
        raise ValueError("ablation needs FFN layers (UnitRescale gauges); the model declares none")
    low, tail = {}, {}
    n_low = n_tail = units = 0
    for layer in layers:
        mass = unit_masses(model, layer.gauge, all_gauges)
        low_off = mass < threshold * mass.mean()
        pr = float(mass.sum() ** 2 / mass.pow(2).sum()) if float(mass.pow(2).sum()) > 0 else 0.0
        tail_off = torch.zeros_like(low_off)
        tail_off[mass.argsort()[:layer.units - round(pr)]] = True
        low[id(layer.output)], tail[id(layer.output)] = ~low_off, ~tail_off
        n_low, n_tail, units = n_low + int(low_off.sum()), n_tail + int(tail_off.sum()), units + layer.units
    was_training = model.training
    model.eval()
    try:
        base = _loss(model, inputs, targets, batch, None, layers)
        low_loss = _loss(model, inputs, targets, batch, low, layers)
        tail_loss = _loss(model, inputs, targets, batch, tail, layers)
    finally:
        model.train(was_training)
    return Ablation(loss=base, low_delta=low_loss - base, low_fraction=n_low / units,
                    tail_delta=tail_loss - base, tail_fraction=n_tail / units, threshold=threshold)


# ---------------------------------------------------------------------------------------
# Dead-direction rates along the training trajectory
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitCell:
    """One falling unit: its mass fell by ``fall`` from its peak; ``k_hat`` and its bootstrap
    interval ``[low, high]`` over ``points`` checkpoints from the peak on."""

    layer: str
    unit: int
    fall: float
    k_hat: float
    low: float
    high: float
    points: int
    read: bool


@dataclass
class RateReport:
    """The cells (falling units) of a trajectory and how many were read; ``units``: all FFN
    units observed, ``checkpoints``: readings the trajectory holds."""

    cells: list[UnitCell]
    units: int
    checkpoints: int
    per_layer: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (read, cells)

    @property
    def total(self) -> int:
        return len(self.cells)

    @property
    def read(self) -> int:
        return sum(c.read for c in self.cells)

    def as_metrics(self, prefix: str = "diag/") -> dict[str, float]:
        """``{prefix}cells_read``, ``{prefix}cells_total`` (falling units), ``{prefix}units``,
        ``{prefix}checkpoints``, ``{prefix}read_frac`` and the quartiles of the cells' fitted
        orders ``{prefix}k_q25``, ``{prefix}k_median``, ``{prefix}k_q75`` (when there is a
        cell), and per layer
        ``{prefix}cells_read/<layer>``, ``{prefix}cells_total/<layer>``."""
        out = {f"{prefix}cells_read": float(self.read), f"{prefix}cells_total": float(self.total),
               f"{prefix}units": float(self.units), f"{prefix}checkpoints": float(self.checkpoints)}
        if self.total:
            out[f"{prefix}read_frac"] = self.read / self.total
            # The fitted orders themselves, so that a run whose cells are not read shows where
            # its k̂ lie (e.g. all near 3: a faster law than the predicted one).
            k = torch.tensor([c.k_hat for c in self.cells], dtype=torch.float64)
            q = torch.quantile(k, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            out[f"{prefix}k_q25"], out[f"{prefix}k_median"], out[f"{prefix}k_q75"] = (float(v) for v in q)
        for name, (read, cells) in self.per_layer.items():
            out[f"{prefix}cells_read/{name}"] = float(read)
            out[f"{prefix}cells_total/{name}"] = float(cells)
        return out


def _masked_slopes(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Least-squares slopes of ``y`` on ``x`` along dim -2 with 0/1 weights ``w`` (broadcast)."""
    n = w.sum(-2, keepdim=True).clamp_min(1)
    xm = (w * x).sum(-2, keepdim=True) / n
    ym = (w * y).sum(-2, keepdim=True) / n
    sxx = (w * (x - xm) ** 2).sum(-2)
    return (w * (x - xm) * (y - ym)).sum(-2) / sxx.clamp_min(1e-300)


class TrajectoryRates:
    """Dead-direction rates read along a training trajectory (see the module docstring).

    Call :meth:`observe` with the same probe batch at successive checkpoints (the trainer
    does, every ``diagnostics.every`` steps); :meth:`report` fits every falling unit. The
    bootstrap draws from a generator seeded with ``seed``, so reports are reproducible.
    """

    def __init__(self, rule: ReadRule = ReadRule(), seed: int = 0) -> None:
        self.rule, self.seed = rule, seed
        self.steps: list[int] = []
        self.masses: list[dict[str, torch.Tensor]] = []  # per checkpoint: layer -> (units,)
        self.activity: list[dict[str, torch.Tensor]] = []  # layer -> (samples, units)

    def observe(self, model: nn.Module, inputs: torch.Tensor, step: int,
                gauges: Sequence[Gauge] | None = None) -> None:
        """Record every unit's mass and per-sample forward second moment at ``step``."""
        all_gauges = _model_gauges(model, gauges)
        layers = ffn_layers(model, all_gauges)
        self.masses.append({layer.name: unit_masses(model, layer.gauge, all_gauges) for layer in layers})
        self.activity.append(unit_activity(model, inputs, layers))
        self.steps.append(int(step))

    def report(self) -> RateReport:
        """The cells and their readings over the checkpoints observed so far."""
        rule = self.rule
        cells: list[UnitCell] = []
        per_layer: dict[str, tuple[int, int]] = {}
        units = sum(len(m) for m in self.masses[0].values()) if self.masses else 0
        if len(self.steps) < rule.min_points:
            return RateReport(cells=[], units=units, checkpoints=len(self.steps))
        g = torch.Generator().manual_seed(self.seed)
        samples = next(iter(self.activity[0].values())).shape[0]
        resample = torch.randint(0, samples, (rule.bootstrap, samples), generator=g)
        alpha = (1.0 - rule.confidence) / 2
        for name in self.masses[0]:
            mass = torch.stack([m[name] for m in self.masses])  # (C, U)
            act = torch.stack([a[name] for a in self.activity])  # (C, S, U)
            peak = mass.argmax(0)
            idx = torch.arange(len(mass)).unsqueeze(1)
            after = idx >= peak
            fall = mass.max(0).values / mass[-1].clamp_min(1e-300)
            f = act.mean(1)
            w = (after & (f > 0) & (mass > 0)).double()
            cand = (fall >= rule.fall) & (w.sum(0) >= rule.min_points)
            read_here = 0
            if bool(cand.any()):
                x = mass[:, cand].clamp_min(1e-300).log()
                wc = w[:, cand]
                k_hat = _masked_slopes(x, f[:, cand].clamp_min(1e-300).log(), wc)
                boot = act[:, resample][..., cand].mean(2)  # (C, B, U)
                wb = (wc.unsqueeze(1) * (boot > 0)).transpose(0, 1)  # (B, C, U)
                kb = _masked_slopes(x.unsqueeze(0), boot.clamp_min(1e-300).log().transpose(0, 1), wb)
                low = torch.quantile(kb, alpha, dim=0)
                high = torch.quantile(kb, 1 - alpha, dim=0)
                for j, unit in enumerate(cand.nonzero().flatten().tolist()):
                    read = rule.reads(float(low[j]), float(high[j]))
                    read_here += read
                    cells.append(UnitCell(layer=name, unit=unit, fall=float(fall[unit]),
                                          k_hat=float(k_hat[j]), low=float(low[j]),
                                          high=float(high[j]), points=int(wc[:, j].sum()), read=read))
            per_layer[name] = (read_here, int(cand.sum()))
        return RateReport(cells=cells, units=units, checkpoints=len(self.steps), per_layer=per_layer)


# ---------------------------------------------------------------------------------------
# Everything, for a trainer
# ---------------------------------------------------------------------------------------


def diagnostics(model: nn.Module, batch: Sequence[torch.Tensor], *, step: int | None = None,
                trajectory: TrajectoryRates | None = None,
                held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                threshold: float = LOW_MASS, prefix: str = "diag/") -> dict[str, float]:
    """Every diagnostic as flat floats, for a trainer to log every N steps.

    ``batch = (inputs, targets)``: the fixed probe batch on the model's device. Keys:
    ``{prefix}spare_frac/<layer>`` and ``{prefix}eff_units/<layer>`` (:func:`spare_capacity`),
    ``{prefix}spare_frac`` and ``{prefix}eff_units_frac`` (means over layers; the latter of
    PR / units). With ``held_out`` (held-out ``(inputs, targets)``): ``{prefix}ablate/loss``,
    ``…/low_dloss``, ``…/low_frac``, ``…/tail_dloss``, ``…/tail_frac`` (:func:`ablation`).
    With ``trajectory``: the probe is observed at ``step`` and the keys of
    :meth:`RateReport.as_metrics` are added.
    """
    if len(batch) < 2:
        raise ValueError("batch must be (inputs, targets)")
    gauges = _model_gauges(model, None)
    out: dict[str, float] = {}
    caps = spare_capacity(model, threshold=threshold, gauges=gauges)
    for c in caps:
        out[f"{prefix}spare_frac/{c.layer}"] = c.spare_fraction
        out[f"{prefix}eff_units/{c.layer}"] = c.participation_ratio
    if caps:
        out[f"{prefix}spare_frac"] = sum(c.spare_fraction for c in caps) / len(caps)
        out[f"{prefix}eff_units_frac"] = sum(c.participation_ratio / c.units for c in caps) / len(caps)
    if held_out is not None and caps:
        a = ablation(model, held_out[0], held_out[1], threshold=threshold, gauges=gauges)
        out.update({f"{prefix}ablate/loss": a.loss, f"{prefix}ablate/low_dloss": a.low_delta,
                    f"{prefix}ablate/low_frac": a.low_fraction,
                    f"{prefix}ablate/tail_dloss": a.tail_delta,
                    f"{prefix}ablate/tail_frac": a.tail_fraction})
    if trajectory is not None and caps:
        trajectory.observe(model, batch[0], -1 if step is None else step, gauges)
        out.update(trajectory.report().as_metrics(prefix))
    return out
