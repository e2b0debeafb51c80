"""The gauge layout of one DDC instance: which gauge acts on which parameter axis.

Built once from the declarations, it holds the overlap rules (which gauges may combine on
one tensor), used by the optimizer and by :func:`ddc.find_gauges` alike, and the map from
log-scales to per-parameter factors. Imports only the gauge vocabulary and the pure rules
(:mod:`ddc.functional`), so nothing here depends on the optimizer.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import functional as F
from .gauges import (Gauge, LogitShift, QKPairScale, RotationGauge, RotationMember, ScaleGauge, SharedRotation,
                     SharedScaleMember)

__all__ = ["Frame"]


class Frame:
    """Which gauges act on which parameter axes: built once from the declarations."""

    def __init__(self, gauges: list[Gauge]) -> None:
        self.params: list[nn.Parameter] = []           # every gauged parameter, fixed order
        self.index: dict[nn.Parameter, int] = {}
        self.scale_gauges = [g for g in gauges if isinstance(g, (ScaleGauge, QKPairScale))]
        self.rotation_gauges = [g for g in gauges if isinstance(g, (RotationGauge, SharedRotation))]
        self.centred: set[int] = set()                 # parameter indices centred on axis 0
        self.scale_axes: dict[int, list[tuple[int, int, int]]] = {}   # p -> [(axis, gauge, sign)]
        self.rotation_of: dict[int, list[RotationMember]] = {}   # disjoint slices of one axis
        # Scale gauges acting on some entries of an axis, several per coordinate
        # (QKPairScale): p -> [(gauge, member)], one gauge and one axis per parameter.
        self.shared_scale_of: dict[int, list[tuple[int, SharedScaleMember]]] = {}
        self.warned_cap = False                        # the balancing cap warning is given once

        for gauge in gauges:
            if not isinstance(gauge, (ScaleGauge, QKPairScale, RotationGauge, SharedRotation, LogitShift)):
                raise TypeError(f"unsupported gauge type {type(gauge).__name__}")
            for p in gauge.parameters():
                self._add(p)
        for gauge in gauges:
            if isinstance(gauge, LogitShift):
                self.centred.update(self.index[p] for p in gauge.parameters())
        for g, gauge in enumerate(self.scale_gauges):
            for m in gauge.members:
                if isinstance(m, SharedScaleMember):
                    self.shared_scale_of.setdefault(self.index[m.param], []).append((g, m))
                    continue
                axes = self.scale_axes.setdefault(self.index[m.param], [])
                if any(axis == m.axis for axis, _, _ in axes):
                    raise ValueError(
                        f"{gauge!r} scales axis {m.axis} of a {tuple(m.param.shape)} parameter "
                        f"that another scale gauge already scales; overlapping scale gauges must "
                        f"act on different axes"
                    )
                axes.append((m.axis, g, m.sign))
                axes.sort()
                if len(axes) > 2:
                    raise ValueError(f"a parameter of shape {tuple(m.param.shape)} is scaled along "
                                     f"more than two axes; at most two are supported")
        self._check_shared_scales()
        for gauge in self.rotation_gauges:
            for m in gauge.members:
                i = self.index[m.param]
                if i in self.shared_scale_of and self.shared_scale_of[i][0][1].axis == m.axis:
                    codes = self.shared_scale_codes(i)[m.perm.to(torch.long)].reshape(-1, m.block)
                    if not bool((codes == codes[:, :1]).all()):
                        raise ValueError(f"{gauge!r} rotates entries of a {tuple(m.param.shape)} parameter that "
                                         f"a pair scale scales by different factors (a rotation block must lie "
                                         f"within one scale coordinate's entries, or outside them)")
                for other in self.rotation_of.get(i, []):
                    overlap = bool(set(other.perm.tolist()) & set(m.perm.tolist()))
                    if other.axis != m.axis or overlap:
                        raise ValueError(f"a {tuple(m.param.shape)} parameter is in two rotation gauges "
                                         f"that overlap (they may only rotate disjoint slices of one axis)")
                if any(axis == m.axis for axis, _, _ in self.scale_axes.get(i, [])):
                    raise ValueError(f"{gauge!r} rotates an axis that a scale gauge scales")
                self.rotation_of.setdefault(i, []).append(m)
        for i in self.centred:
            if any(axis == 0 for axis, _, _ in self.scale_axes.get(i, [])) or i in self.rotation_of \
                    or any(m.axis == 0 for _, m in self.shared_scale_of.get(i, [])):
                raise ValueError("LogitShift's vocabulary axis may not be scaled or rotated by another gauge")

    def _check_shared_scales(self) -> None:
        """A parameter's entries scaled by a shared scale gauge (QKPairScale): one gauge on
        one axis, disjoint entries, no other scale gauge on that axis, two scaled axes at most."""
        for i, entries in self.shared_scale_of.items():
            shape = tuple(self.params[i].shape)
            if len({g for g, _ in entries}) > 1 or len({m.axis for _, m in entries}) > 1:
                raise ValueError(f"a {shape} parameter is in two pair-scale gauges (or on two axes); "
                                 f"at most one per parameter is supported")
            axis = entries[0][1].axis
            dense = self.scale_axes.get(i, [])
            if any(a == axis for a, _, _ in dense):
                raise ValueError(f"a pair scale scales axis {axis} of a {shape} parameter that another "
                                 f"scale gauge already scales")
            if len(dense) > 1:
                raise ValueError(f"a parameter of shape {shape} is scaled along more than two axes; "
                                 f"at most two are supported")
            positions = torch.cat([m.positions for _, m in entries])
            if positions.unique().numel() != positions.numel():
                raise ValueError(f"a pair scale's members overlap on a {shape} parameter")

    def shared_scale_codes(self, i: int) -> torch.Tensor:
        """Per entry of parameter ``i``'s shared-scale axis: ``2·coordinate + (sign < 0)``
        of the shared scale gauge that scales it, −1 where none does (CPU, long)."""
        entries = self.shared_scale_of[i]
        axis = entries[0][1].axis
        codes = torch.full((self.params[i].shape[axis],), -1, dtype=torch.long)
        for _, m in entries:
            codes[m.positions.to(torch.long)] = 2 * m.share.to(torch.long) + int(m.sign < 0)
        return codes

    def _add(self, p: nn.Parameter) -> None:
        if p not in self.index:
            self.index[p] = len(self.params)
            self.params.append(p)

    def scale_tensor(self, i: int, log_scales: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
        """The factor ``S`` of parameter ``i`` (broadcastable to it), or ``None`` if unscaled
        (the :class:`ScaleGauge` kinds; a pair scale's factors come from
        :class:`ddc.layout.SharedScaleSystem`)."""
        if i in self.shared_scale_of:
            raise ValueError("Frame.scale_tensor covers the ScaleGauge kinds only; a QKPairScale's factors "
                             "come from StepLayout.scales.factors")
        factor = None
        for axis, g, sign in self.scale_axes.get(i, []):
            shape = [1] * like.ndim
            shape[axis] = -1
            f = torch.exp(sign * log_scales[g]).to(like).reshape(shape)
            factor = f if factor is None else factor * f
        return factor

    def solve_scales(self, points: list[torch.Tensor], warm: list[torch.Tensor], tol: float,
                     max_iter: int, reference_norm: float = 1.0,
                     zero_level: float = 0.0) -> tuple[list[torch.Tensor], int]:
        """Log-scales moving ``points`` (one per gauged parameter) to their canonical point
        (:func:`ddc.functional.min_norm_log_scales`). Warns once per gauge set when the
        solve stops at ``max_iter`` without reaching ``tol``. The :class:`ScaleGauge` kinds
        only (with a QKPairScale: ``StepLayout.scales.solve``)."""
        if self.shared_scale_of:
            raise ValueError("Frame.solve_scales covers the ScaleGauge kinds only; with a QKPairScale use "
                             "StepLayout.scales.solve")
        order = sorted(self.scale_axes)
        reduced, axes = [], []
        for i in order:
            x = points[i].double().square()
            gauged = [axis for axis, _, _ in self.scale_axes[i]]
            other = [d for d in range(x.ndim) if d not in gauged]
            reduced.append(x.sum(other) if other else x)
            axes.append([(g, sign) for _, g, sign in self.scale_axes[i]])
        sizes = [g.size for g in self.scale_gauges]
        levels = [g.level for g in self.scale_gauges]
        scales, steps, unsettled = F.min_norm_log_scales(reduced, axes, sizes, warm, tol, max_iter,
                                                         reference_norm, zero_level, levels)
        self.warn_unsettled(unsettled, tol, max_iter)
        return scales, steps

    def warn_unsettled(self, unsettled: list[int], tol: float, max_iter: int) -> None:
        """Warn once per gauge set, naming the scale gauges (indices ``unsettled``) whose
        balancing stopped at ``max_iter`` before reaching ``tol``."""
        if not unsettled or self.warned_cap:
            return
        self.warned_cap = True
        named = ", ".join(repr(self.scale_gauges[g]) for g in unsettled[:4])
        more = f" and {len(unsettled) - 4} more" if len(unsettled) > 4 else ""
        warnings.warn(f"DDC: balancing stopped at balance_max_iter={max_iter} Newton steps before "
                      f"reaching balance_tol={tol:g} for {named}{more}; equivariance then holds only "
                      f"to that residual. Raise balance_max_iter (warned once).", RuntimeWarning,
                      stacklevel=4)

