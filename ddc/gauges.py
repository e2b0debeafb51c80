"""Gauge declarations: the exact continuous symmetries of a network's loss.

A gauge is a group acting on some of a model's parameters without changing the function
the model computes. Moving along such a group orbit is a *dead direction*: the loss cannot
see it. A model declares its gauges (``model.gauges()``); DDC reads the declarations, and
:func:`ddc.verify_gauges` checks them numerically.

The kinds, in PyTorch conventions (``nn.Linear`` computes ``y = W x + b`` with ``W`` of
shape out × in):

* :class:`LogitShift` — translation: adding one vector to every row of the readout ``W``
  (and one constant to every entry of ``b``) leaves softmax cross-entropy unchanged.
* :class:`UnitRescale` — for each hidden unit ``i`` of a ReLU MLP (or the linear branch
  of a SwiGLU): row ``i`` (and bias ``i``) of the input layers times ``c > 0``, column
  ``i`` of the output layer divided by ``c``.
* :class:`NormGain` — for each feature ``j`` of a normalisation (any class: torch's norms,
  a user-written RMSNorm, ``LlamaRMSNorm``): gain (and bias) ``j`` times ``c``, column
  (input channel) ``j`` of every consumer divided by ``c``. Valid only when nothing else reads the norm's output; for BatchNorm only when a
  positively homogeneous activation (ReLU) sits between the norm and its consumers.
* :class:`HeadRotation` / :class:`HeadRotationVO` — per attention head, an orthogonal
  map ``R`` applied to the query and key rows (scores ``q·k`` unchanged) or to the value
  rows and the output projection's columns. With RoPE, only rotations commuting with it
  survive: one SO(2) angle per frequency pair. ``.sliced`` builds them on any projection
  layout (separate or fused layers, ``nn.Linear`` or Hugging Face ``Conv1D``).
* :class:`GroupedHeadRotation` / :class:`GroupedHeadRotationVO` — the same under
  grouped-query attention (GQA, MQA): one rotation per key/value head, shared by the query
  rows (or output columns) of every query head in its group.
* :class:`QKPairScale` — under RoPE, a per-pair scale: a query pair times ``c``, its key
  pair divided by ``c`` (shared across a GQA group).

DDC's step enforces the shared rotations like the per-head ones: the so(d) projection of
a shared block sums the Gram and cross matrices over every block that shares it
(:func:`ddc.functional.rotation_system`); :class:`QKPairScale` joins the scale gauges'
balancing solve (:class:`ddc.layout.SharedScaleSystem`).

Every gauge can draw a random group element (:meth:`Gauge.random_element`) and apply one
to its parameters in place (:meth:`Gauge.act`), so equivariance and invariance can be
tested on any model.

Internally a gauge is described by *members*: which parameter it acts on, along which
axis, and how (see :class:`ScaleMember`, :class:`RotationMember`). The optimizer works
only with members, so new gauge classes need no optimizer code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True, eq=False)
class ScaleMember:
    """Slices of ``param`` along ``axis`` scale by ``c[i] ** sign`` (sign is +1 or -1)."""

    param: nn.Parameter
    axis: int
    sign: int


@dataclass(frozen=True, eq=False)
class RotationMember:
    """``param``'s ``axis``, reordered by ``perm`` and cut into blocks of ``block`` entries,
    is multiplied block by block by the gauge's orthogonal matrices (``x ↦ R x``)."""

    param: nn.Parameter
    axis: int
    perm: torch.Tensor
    block: int


class Gauge(ABC):
    """A declared symmetry of the loss acting on some parameters."""

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """The parameters the gauge acts on."""

    @abstractmethod
    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random group element (drawn on the CPU in float64)."""

    @abstractmethod
    def act(self, element: torch.Tensor) -> None:
        """Apply ``element`` to the parameters in place."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        return ""


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2), recognised by structure: ``y = x @ W + b`` with a
    2-D ``weight`` stored in × out and ``nf`` output features."""
    weight = getattr(module, "weight", None)
    return (isinstance(getattr(module, "nf", None), int) and isinstance(weight, torch.Tensor)
            and weight.ndim == 2 and weight.shape[1] == module.nf)


def _input_weight(module: nn.Module) -> tuple[nn.Parameter, int, int]:
    """The weight reading a layer's input features: ``(weight, axis, features)``.
    ``nn.Linear`` and ``nn.ConvNd`` (axis 1), Hugging Face ``Conv1D`` (axis 0), and
    ``nn.MultiheadAttention``'s packed ``in_proj`` (self-attention: query, key and value
    all read the same input)."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:
            raise TypeError("nn.MultiheadAttention with separate q/k/v weights (kdim/vdim) is not supported")
        return module.in_proj_weight, 1, module.embed_dim
    if isinstance(module, nn.Linear):
        return module.weight, 1, module.in_features
    if isinstance(module, _CONVS):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions are not supported as gauge members: {module}")
        return module.weight, 1, module.in_channels
    if is_conv1d(module):
        return module.weight, 0, module.weight.shape[0]
    raise TypeError(f"expected nn.Linear, nn.ConvNd or a Conv1D, got {type(module).__name__}")


def _output_weight(module: nn.Module) -> tuple[nn.Parameter, int, int]:
    """The weight writing a layer's output features: ``(weight, axis, features)``; the
    bias, if any, is ``module.bias`` along its only axis."""
    if isinstance(module, nn.Linear):
        return module.weight, 0, module.out_features
    if isinstance(module, _CONVS):
        return module.weight, 0, module.out_channels
    if is_conv1d(module):
        return module.weight, 1, module.nf
    raise TypeError(f"expected nn.Linear, nn.ConvNd or a Conv1D, got {type(module).__name__}")


def log_normal_scales(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random positive scales ``c = exp(N(0, 0.5²))``, float64: the scale gauges' random
    elements (large enough to expose any drift)."""
    return torch.exp(0.5 * torch.randn(size, generator=generator, dtype=torch.float64))


class ScaleGauge(Gauge):
    """A product of positive scalings, one per coordinate ``i < size``.

    ``level``: where DDC puts the canonical point of each coordinate's orbit, as the
    difference ``A − B`` of the squared norms of the growing and shrinking sides, in units
    of ``DDC(reference_norm=ρ)``'s ρ² (0: balanced, the minimum-norm point).
    """

    size: int
    members: list[ScaleMember]
    level: float = 0.0

    def parameters(self) -> list[nn.Parameter]:
        return [m.param for m in self.members]

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-normal scales ``c = exp(N(0, 0.5²))`` (large enough to expose any drift)."""
        return log_normal_scales(self.size, generator)

    @torch.no_grad()
    def act(self, element: torch.Tensor) -> None:
        for m in self.members:
            shape = [1] * m.param.ndim
            shape[m.axis] = self.size
            factor = element.to(m.param).reshape(shape) ** m.sign
            m.param.mul_(factor)


class UnitRescale(ScaleGauge):
    """Hidden-unit rescaling of a ReLU MLP (or the linear branch of a SwiGLU).

    Row ``i`` and bias ``i`` of every layer in ``inputs`` times ``c[i]``, column ``i`` of
    ``output`` divided by ``c[i]``. Exact because ReLU is positively homogeneous (and, for
    SwiGLU, because the product ``silu(gate x) * (up x)`` is linear in ``up``). Do not
    include a SwiGLU gate or a GELU MLP: they have no exact rescaling.
    """

    def __init__(self, inputs: list[nn.Module], output: nn.Module) -> None:
        inputs = list(inputs)
        if not inputs:
            raise ValueError("UnitRescale needs at least one input layer")
        out_weight, out_axis, self.size = _input_weight(output)
        self.members = []
        for layer in inputs:
            weight, axis, features = _output_weight(layer)
            if features != self.size:
                raise ValueError(
                    f"UnitRescale: input layer has {features} outputs but the output "
                    f"layer reads {self.size} features"
                )
            self.members.append(ScaleMember(weight, axis, +1))
            if layer.bias is not None:
                self.members.append(ScaleMember(layer.bias, 0, +1))
        self.members.append(ScaleMember(out_weight, out_axis, -1))
        self._names = (len(inputs), type(output).__name__)

    def describe(self) -> str:
        return f"units={self.size}"


def norm_affine(norm: nn.Module) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The per-feature gain (and bias) of a normalisation module, whatever its class.

    torch's LayerNorm / RMSNorm / BatchNorm / GroupNorm: ``weight`` (and ``bias``). Any other
    module (a user-written RMSNorm, Hugging Face's ``LlamaRMSNorm``): its own parameters must
    be one vector (the gain) or two of the same shape, the gain registered first or named
    ``weight`` / ``scale`` / ``gamma`` / ``gain``. :func:`ddc.find_gauges` does not use this
    naming rule: it tells gain from bias by the product in the module's autograd graph.
    Raises ``ValueError`` naming what it found otherwise.
    """
    if isinstance(norm, _NORMS) or isinstance(norm, nn.GroupNorm):
        if getattr(norm, "weight", None) is None:
            raise ValueError(f"NormGain: {type(norm).__name__} has no affine gain to scale")
        return norm.weight, getattr(norm, "bias", None)
    own = list(norm.named_parameters(recurse=False))
    if len(own) == 1 and own[0][1].ndim == 1:
        return own[0][1], None
    if len(own) == 2 and own[0][1].ndim == 1 and own[0][1].shape == own[1][1].shape:
        names = [n for n, _ in own]
        for gain_name in ("weight", "scale", "gamma", "gain"):
            if gain_name in names:
                other = names[1 - names.index(gain_name)]
                return getattr(norm, gain_name), getattr(norm, other)
        return own[0][1], own[1][1]
    raise ValueError(f"NormGain: {type(norm).__name__} is not a normalisation with a per-feature gain "
                     f"(expected one 1-D parameter, or a gain and a bias of the same shape; it has "
                     f"{[(n, tuple(p.shape)) for n, p in own]}); pass gain=... (and bias=...) explicitly")


class NormGain(ScaleGauge):
    """Per-feature scale of a normalisation's affine gain, undone by its consumers.

    ``norm``: any module computing ``gain * normalise(x) (+ bias)`` per feature: torch's
    norms, a user-written RMSNorm, Hugging Face's ``LlamaRMSNorm`` (see :func:`norm_affine`;
    ``gain=`` / ``bias=`` name the parameters explicitly).

    ``norm.weight[j]`` (and ``norm.bias[j]``) times ``c[j]``, column / input channel ``j``
    of every consumer divided by ``c[j]``. Exact when the consumers are the only readers
    of the norm's output (pre-norm transformers), or, for BatchNorm, when only a ReLU sits
    between the norm and its consumers.

    Canonical point (``level = 1``): the gain side's squared norm exceeds the consumers'
    columns' by ρ², so a gain stays near its natural scale (ρ = 1: gain 1) while its
    consumers are small, continuously down to consumers initialised at zero.
    """

    level = 1.0

    def __init__(self, norm: nn.Module, consumers: list[nn.Module], *, gain: nn.Parameter | None = None,
                 bias: nn.Parameter | None = None) -> None:
        gain, bias = norm_affine(norm) if gain is None else (gain, bias)
        if gain.ndim != 1 or (bias is not None and bias.shape != gain.shape):
            raise ValueError(f"NormGain: {type(norm).__name__}'s gain must be one vector (and its bias, "
                             f"if any, the same shape); got {tuple(gain.shape)}")
        consumers = list(consumers)
        if not consumers:
            raise ValueError("NormGain needs at least one consumer")
        self.size = gain.numel()
        self.members = [ScaleMember(gain, 0, +1)]
        if bias is not None:
            self.members.append(ScaleMember(bias, 0, +1))
        for layer in consumers:
            weight, axis, features = _input_weight(layer)
            if features != self.size:
                raise ValueError(
                    f"NormGain: consumer reads {features} features but the norm "
                    f"has {self.size}"
                )
            self.members.append(ScaleMember(weight, axis, -1))
        self._norm = type(norm).__name__

    def describe(self) -> str:
        return f"{self._norm}, features={self.size}"


class LogitShift(Gauge):
    """Translation invariance of softmax cross-entropy in the readout.

    ``W ← W + 1 aᵀ`` and ``b ← b + β 1`` leave every softmax unchanged. Declare it only for
    an untied readout trained with softmax cross-entropy.
    """

    def __init__(self, readout: nn.Linear) -> None:
        if not isinstance(readout, nn.Linear):
            raise TypeError(f"LogitShift expects the readout nn.Linear, got {type(readout).__name__}")
        self.weight = readout.weight
        self.bias = readout.bias

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A vector of length ``in_features + 1``: the row shift ``a`` then the bias shift."""
        return torch.randn(self.weight.shape[1] + 1, generator=generator, dtype=torch.float64)

    @torch.no_grad()
    def act(self, element: torch.Tensor) -> None:
        element = element.to(self.weight)
        self.weight.add_(element[:-1].unsqueeze(0))
        if self.bias is not None:
            self.bias.add_(element[-1])

    def describe(self) -> str:
        return f"vocab={self.weight.shape[0]}"


_ROPE_LAYOUTS = (None, "interleaved", "half")


def _head_permutation(n_heads: int, d_head: int, rope: str | None) -> tuple[torch.Tensor, int]:
    """Order of an axis of ``n_heads * d_head`` entries that makes each rotation block
    contiguous, and the block size: a whole head without RoPE, a frequency pair with it."""
    if rope is None:
        return torch.arange(n_heads * d_head), d_head
    if d_head % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d_head}")
    if rope == "interleaved":  # pairs (2k, 2k+1) are already adjacent
        return torch.arange(n_heads * d_head), 2
    half = d_head // 2  # pairs (k, k + d_head/2)
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return torch.cat([h * d_head + within for h in range(n_heads)]), 2


class RotationGauge(Gauge):
    """Orthogonal maps acting block by block on the members' axes (shared across members)."""

    members: list[RotationMember]
    n_blocks: int
    block: int
    special: bool  # SO(block) instead of O(block) (RoPE pairs)

    def parameters(self) -> list[nn.Parameter]:
        return [m.param for m in self.members]

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One Haar-random orthogonal matrix per block, shape (n_blocks, block, block)."""
        g = torch.randn(self.n_blocks, self.block, self.block, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        if self.special:  # flip one column where det = -1 to land in SO(block)
            flip = torch.linalg.det(q) < 0
            q[flip, :, 0] = -q[flip, :, 0]
        return q

    @torch.no_grad()
    def act(self, element: torch.Tensor) -> None:
        for m in self.members:
            blocks = to_blocks(m.param, m)
            rotated = element.to(blocks) @ blocks
            m.param.copy_(from_blocks(rotated, m, into=m.param))

    def describe(self) -> str:
        return f"blocks={self.n_blocks}x{self.block}"


def to_blocks(tensor: torch.Tensor, member: RotationMember) -> torch.Tensor:
    """View ``tensor`` (shaped like ``member.param``) as (n_blocks, block, rest)."""
    moved = tensor.movedim(member.axis, 0)
    moved = moved.index_select(0, member.perm.to(moved.device))
    return moved.reshape(-1, member.block, moved[0].numel())


def from_blocks(blocks: torch.Tensor, member: RotationMember, into: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: a tensor shaped like ``member.param``. A member whose
    ``perm`` covers only part of its axis (a slice of a packed parameter) writes its
    entries into a copy of ``into``; the rest of ``into`` is kept."""
    # No list.pop(axis): under torch.compile ``member.axis`` may be a symbolic int, which
    # Dynamo cannot use as a list index.
    axis_len = member.param.shape[member.axis]
    shape = [n for d, n in enumerate(member.param.shape) if d != member.axis]
    values = blocks.reshape([member.perm.numel()] + shape)
    if into is None:
        if member.perm.numel() != axis_len:
            raise ValueError("from_blocks: a member on a slice of its axis needs the full tensor (into=...)")
        base = values.new_empty([axis_len] + shape)
    else:
        base = into.movedim(member.axis, 0).clone()
    base[member.perm.to(values.device)] = values
    return base.movedim(0, member.axis)


def _packed_attention(attention: nn.Module) -> tuple[int, int]:
    """Width and head count of an ``nn.MultiheadAttention`` whose q/k/v projections are
    packed in ``in_proj_weight`` (rows [0, E) queries, [E, 2E) keys, [2E, 3E) values)."""
    if not isinstance(attention, nn.MultiheadAttention) or attention.in_proj_weight is None:
        raise TypeError("expected an nn.MultiheadAttention with a packed in_proj_weight (no kdim/vdim)")
    if attention.bias_k is not None or attention.bias_v is not None:
        raise ValueError("nn.MultiheadAttention with add_bias_kv has no head rotation gauge declared here")
    return attention.embed_dim, attention.num_heads


class HeadRotation(RotationGauge):
    """Per-head rotation of queries and keys: rows of ``W_q`` and ``W_k`` of head ``h``
    (and their biases) map ``v ↦ R_h v``; attention scores ``q·k`` are unchanged.

    ``rope``: ``None`` (any ``R_h`` in O(d_head)), ``"interleaved"`` (RoPE pairs
    (2k, 2k+1)) or ``"half"`` (pairs (k, k + d_head/2)); with RoPE only one SO(2) angle per
    pair commutes with the position rotation.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, n_heads: int, rope: str | None = None) -> None:
        if rope not in _ROPE_LAYOUTS:
            raise ValueError(f"HeadRotation: rope must be one of {_ROPE_LAYOUTS}, got {rope!r}")
        if q.out_features != k.out_features or q.out_features % n_heads:
            raise ValueError(
                f"HeadRotation: q and k need the same width divisible by n_heads={n_heads} "
                f"(got {q.out_features} and {k.out_features})"
            )
        d_head = q.out_features // n_heads
        perm, self.block = _head_permutation(n_heads, d_head, rope)
        self.n_blocks = q.out_features // self.block
        self.special = rope is not None
        self.members = [
            RotationMember(layer.weight if name == "weight" else layer.bias, 0, perm, self.block)
            for layer in (q, k) for name in ("weight", "bias")
            if getattr(layer, name) is not None
        ]
        self._desc = f"heads={n_heads}, d_head={d_head}, rope={rope}"

    def describe(self) -> str:
        return self._desc


    @classmethod
    def packed(cls, attention: nn.MultiheadAttention) -> HeadRotation:
        """The query/key rotations of an ``nn.MultiheadAttention`` (no RoPE): its members
        are the query and key row slices of the packed ``in_proj_weight`` (and bias)."""
        width, heads = _packed_attention(attention)
        return cls._sliced(attention.in_proj_weight, 0, attention.in_proj_bias, width, heads, "packed")

    @classmethod
    def fused(cls, qkv: nn.Module, n_heads: int) -> HeadRotation:
        """The query/key rotations of a fused projection whose outputs are ``[q | k | v]``
        (Hugging Face GPT-2's ``c_attn``, a ``Conv1D``; or an ``nn.Linear``), no RoPE."""
        weight, axis, features = _output_weight(qkv)
        if features % 3 or (features // 3) % n_heads:
            raise ValueError(f"HeadRotation.fused: {features} outputs are not 3 × a multiple of n_heads={n_heads}")
        return cls._sliced(weight, axis, qkv.bias, features // 3, n_heads, "fused")

    @classmethod
    def sliced(cls, q: nn.Module, k: nn.Module, d_head: int, n_heads: int, rope: str | None = None,
               q_offset: int = 0, k_offset: int = 0) -> HeadRotation:
        """The query/key rotations of any projection layout: queries are the output features
        ``[q_offset, q_offset + n_heads·d_head)`` of layer ``q`` (``nn.Linear`` or ``Conv1D``),
        keys likewise of ``k`` (the same layer for a fused projection)."""
        order, block = _pair_order(n_heads, d_head, rope)
        gauge = cls.__new__(cls)
        gauge.block, gauge.n_blocks, gauge.special = block, n_heads * d_head // block, rope is not None
        gauge.members = [RotationMember(p, axis, rows[order], block)
                         for layer, offset in ((q, q_offset), (k, k_offset))
                         for p, axis, rows in _slice_rows(layer, offset, n_heads * d_head)]
        gauge._desc = f"heads={n_heads}, d_head={d_head}, rope={rope}"
        return gauge

    @classmethod
    def _sliced(cls, weight: nn.Parameter, axis: int, bias: nn.Parameter | None, width: int, heads: int,
                kind: str) -> HeadRotation:
        gauge = cls.__new__(cls)
        d_head = width // heads
        gauge.block, gauge.special = d_head, False
        gauge.members = [RotationMember(p, a, torch.arange(width) + offset, d_head)
                         for offset in (0, width)
                         for p, a in ((weight, axis), (bias, 0)) if p is not None]
        gauge.n_blocks = heads
        gauge._desc = f"heads={heads}, d_head={d_head}, rope=None, {kind}"
        return gauge


class HeadRotationVO(RotationGauge):
    """Per-head rotation of values and output: rows of ``W_v`` of head ``h`` (and its bias)
    map ``v ↦ R_h v`` and the head's columns of ``W_o`` map by ``R_h`` as well
    (``W_o^h ↦ W_o^h R_hᵀ``), any ``R_h`` in O(d_head)."""

    def __init__(self, v: nn.Linear, o: nn.Linear, n_heads: int) -> None:
        if v.out_features != o.in_features or v.out_features % n_heads:
            raise ValueError(
                f"HeadRotationVO: v's outputs ({v.out_features}) must equal o's inputs "
                f"({o.in_features}) and be divisible by n_heads={n_heads}"
            )
        d_head = v.out_features // n_heads
        perm, self.block = _head_permutation(n_heads, d_head, None)
        self.n_blocks = n_heads
        self.special = False
        self.members = [RotationMember(v.weight, 0, perm, d_head)]
        if v.bias is not None:
            self.members.append(RotationMember(v.bias, 0, perm, d_head))
        self.members.append(RotationMember(o.weight, 1, perm, d_head))
        self._desc = f"heads={n_heads}, d_head={d_head}"

    @classmethod
    def packed(cls, attention: nn.MultiheadAttention) -> HeadRotationVO:
        """The value/output rotations of an ``nn.MultiheadAttention``: the value row slice
        of the packed ``in_proj_weight`` (and bias) and the columns of ``out_proj``."""
        width, heads = _packed_attention(attention)
        return cls._sliced(attention.in_proj_weight, 0, attention.in_proj_bias, attention.out_proj,
                           width, heads, "packed")

    @classmethod
    def fused(cls, qkv: nn.Module, o: nn.Module, n_heads: int) -> HeadRotationVO:
        """The value/output rotations of a fused ``[q | k | v]`` projection and the output
        projection ``o`` (Hugging Face GPT-2's ``c_attn`` and ``c_proj``)."""
        weight, axis, features = _output_weight(qkv)
        if features % 3 or (features // 3) % n_heads:
            raise ValueError(f"HeadRotationVO.fused: {features} outputs are not 3 × a multiple of n_heads={n_heads}")
        return cls._sliced(weight, axis, qkv.bias, o, features // 3, n_heads, "fused")

    @classmethod
    def sliced(cls, v: nn.Module, o: nn.Module, d_head: int, n_heads: int, v_offset: int = 0) -> HeadRotationVO:
        """The value/output rotations of any projection layout: values are the output
        features ``[v_offset, v_offset + n_heads·d_head)`` of layer ``v``; ``o`` reads them."""
        o_weight, o_axis, o_features = _input_weight(o)
        if o_features != n_heads * d_head:
            raise ValueError(f"HeadRotationVO: the output projection reads {o_features} features, "
                             f"the values have {n_heads * d_head}")
        gauge = cls.__new__(cls)
        gauge.block, gauge.n_blocks, gauge.special = d_head, n_heads, False
        gauge.members = [RotationMember(p, axis, rows, d_head) for p, axis, rows in
                         _slice_rows(v, v_offset, n_heads * d_head)]
        gauge.members.append(RotationMember(o_weight, o_axis, torch.arange(o_features), d_head))
        gauge._desc = f"heads={n_heads}, d_head={d_head}"
        return gauge

    @classmethod
    def _sliced(cls, weight: nn.Parameter, axis: int, bias: nn.Parameter | None, o: nn.Module, width: int,
                heads: int, kind: str) -> HeadRotationVO:
        o_weight, o_axis, o_features = _input_weight(o)
        if o_features != width:
            raise ValueError(f"HeadRotationVO: the output projection reads {o_features} features, "
                             f"the values have {width}")
        gauge = cls.__new__(cls)
        d_head = width // heads
        gauge.block, gauge.n_blocks, gauge.special = d_head, heads, False
        rows = torch.arange(width) + 2 * width
        gauge.members = [RotationMember(p, a, rows, d_head) for p, a in ((weight, axis), (bias, 0)) if p is not None]
        gauge.members.append(RotationMember(o_weight, o_axis, torch.arange(width), d_head))
        gauge._desc = f"heads={heads}, d_head={d_head}, {kind}"
        return gauge

    def describe(self) -> str:
        return self._desc


# ----------------------------------------------------------------------------------------
# Attention gauges on any projection layout (separate, fused, grouped-query)
# ----------------------------------------------------------------------------------------

def _slice_rows(module: nn.Module, offset: int, width: int) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """``(parameter, axis, positions)`` of the output features ``[offset, offset + width)`` of
    a ``nn.Linear`` / ``Conv1D``: its weight along the output axis and its bias, if any."""
    weight, axis, features = _output_weight(module)
    if offset < 0 or offset + width > features:
        raise ValueError(f"{type(module).__name__} has {features} outputs; features "
                         f"[{offset}, {offset + width}) do not fit")
    rows = torch.arange(offset, offset + width)
    out = [(weight, axis, rows)]
    if getattr(module, "bias", None) is not None:
        out.append((module.bias, 0, rows))
    return out


def _pair_order(n_heads: int, d_head: int, rope: str | None) -> tuple[torch.Tensor, int]:
    """As :func:`_head_permutation`, with the RoPE layout checked."""
    if rope not in _ROPE_LAYOUTS:
        raise ValueError(f"rope must be one of {_ROPE_LAYOUTS}, got {rope!r}")
    return _head_permutation(n_heads, d_head, rope)


@dataclass(frozen=True, eq=False)
class SharedRotationMember:
    """The entries ``positions`` of ``param``'s ``axis``, cut into blocks of ``block``; block
    ``j`` is multiplied by the gauge's orthogonal matrix ``share[j]`` (``x ↦ R x``). Several
    blocks may share one matrix (grouped-query attention)."""

    param: nn.Parameter
    axis: int
    positions: torch.Tensor
    block: int
    share: torch.Tensor

    @property
    def perm(self) -> torch.Tensor:
        """``positions`` under :class:`RotationMember`'s name, so the block views
        (:func:`to_blocks`, :mod:`ddc.layout`) read both kinds of member alike."""
        return self.positions


@dataclass(frozen=True, eq=False)
class SharedScaleMember:
    """The entries ``positions`` of ``param``'s ``axis`` scale by ``c[share[j]] ** sign``."""

    param: nn.Parameter
    axis: int
    positions: torch.Tensor
    share: torch.Tensor
    sign: int


def _gather(param: torch.Tensor, axis: int, positions: torch.Tensor) -> torch.Tensor:
    return param.movedim(axis, 0).index_select(0, positions.to(param.device))


def _scatter(param: torch.Tensor, axis: int, positions: torch.Tensor, values: torch.Tensor) -> None:
    param.movedim(axis, 0)[positions.to(param.device)] = values


class SharedRotation(Gauge):
    """Orthogonal matrices ``R_g`` (one per ``n_blocks``), each acting on every member block
    that shares it. The grouped-query attention gauges below are built on it.

    DDC's step enforces it as it does :class:`RotationGauge`: the second moment pooled
    over each member block, and the so(d) projection of a shared matrix solved on the
    Gram and cross matrices summed over the blocks that share it.
    """

    members: list[SharedRotationMember]
    n_blocks: int
    block: int
    special: bool

    def parameters(self) -> list[nn.Parameter]:
        return [m.param for m in self.members]

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One Haar-random matrix per shared block, (n_blocks, block, block); SO with RoPE."""
        return RotationGauge.random_element(self, generator)

    @torch.no_grad()
    def act(self, element: torch.Tensor) -> None:
        for m in self.members:
            values = _gather(m.param, m.axis, m.positions)
            blocks = values.reshape(-1, m.block, values[0].numel())
            rotated = element.to(blocks)[m.share.to(blocks.device)] @ blocks
            _scatter(m.param, m.axis, m.positions, rotated.reshape(values.shape))

    def describe(self) -> str:
        return self._desc


def _group_share(n_query: int, n_kv: int, per_head: int) -> torch.Tensor:
    """Element index of each query block: query head ``h`` reads key/value head
    ``h // (n_query // n_kv)`` (``repeat_kv`` / ``repeat_interleave`` / SDPA's ``enable_gqa``)."""
    if n_query % n_kv:
        raise ValueError(f"{n_query} query heads do not split into groups over {n_kv} key/value heads")
    heads = torch.arange(n_query) // (n_query // n_kv)
    return (heads.unsqueeze(1) * per_head + torch.arange(per_head)).reshape(-1)


class GroupedHeadRotation(SharedRotation):
    """Query/key rotations of grouped-query attention (GQA, MQA): for key head ``g`` one
    ``R_g`` acts on the key rows of head ``g`` and on the query rows of every query head in
    its group (scores ``q·k`` unchanged). ``rope``: as for :class:`HeadRotation` (one SO(2)
    angle per frequency pair, shared by the group).

    ``q`` and ``k``: the layers producing queries and keys (``nn.Linear`` or ``Conv1D``; the
    same layer for a fused projection, with ``q_offset`` / ``k_offset`` the first feature of
    each); ``d_head``: the head size; the head counts follow from the widths given."""

    def __init__(self, q: nn.Module, k: nn.Module, d_head: int, n_query: int, n_kv: int,
                 rope: str | None = None, q_offset: int = 0, k_offset: int = 0) -> None:
        order_q, self.block = _pair_order(n_query, d_head, rope)
        order_k, _ = _pair_order(n_kv, d_head, rope)
        per_head = d_head // self.block
        self.n_blocks, self.special = n_kv * per_head, rope is not None
        self.members = []
        for p, axis, rows in _slice_rows(q, q_offset, n_query * d_head):
            self.members.append(SharedRotationMember(p, axis, rows[order_q], self.block,
                                                     _group_share(n_query, n_kv, per_head)))
        for p, axis, rows in _slice_rows(k, k_offset, n_kv * d_head):
            self.members.append(SharedRotationMember(p, axis, rows[order_k], self.block,
                                                     torch.arange(self.n_blocks)))
        self._desc = f"query heads={n_query}, kv heads={n_kv}, d_head={d_head}, rope={rope}"


class GroupedHeadRotationVO(SharedRotation):
    """Value/output rotations of grouped-query attention: ``R_g`` acts on the value rows of
    key/value head ``g`` and on the output projection's columns of every query head in its
    group, any ``R_g`` in O(d_head)."""

    def __init__(self, v: nn.Module, o: nn.Module, d_head: int, n_query: int, n_kv: int,
                 v_offset: int = 0) -> None:
        self.block, self.n_blocks, self.special = d_head, n_kv, False
        o_weight, o_axis, o_features = _input_weight(o)
        if o_features != n_query * d_head:
            raise ValueError(f"GroupedHeadRotationVO: the output projection reads {o_features} features, "
                             f"the attention gives {n_query} heads × {d_head}")
        self.members = [SharedRotationMember(p, axis, rows, d_head, torch.arange(n_kv))
                        for p, axis, rows in _slice_rows(v, v_offset, n_kv * d_head)]
        self.members.append(SharedRotationMember(o_weight, o_axis, torch.arange(o_features), d_head,
                                                 _group_share(n_query, n_kv, 1)))
        self._desc = f"query heads={n_query}, kv heads={n_kv}, d_head={d_head}"


class QKPairScale(Gauge):
    """Per-pair query/key scale under RoPE: for key head ``g`` and frequency pair ``p``,
    both query rows of that pair (in every query head of ``g``'s group) times ``c``, both
    key rows divided by ``c`` (``c > 0``). RoPE rotates each pair in a plane, and a scale
    commutes with a plane rotation, so the scores ``q·k`` are unchanged.

    Arguments as for :class:`GroupedHeadRotation` (``n_query == n_kv`` for MHA); ``rope`` is
    required (without RoPE the per-pair scale is only part of a larger group, not declared).
    DDC's step enforces it with the scale gauges (:class:`ddc.layout.SharedScaleSystem`);
    its canonical point balances each pair's query rows (over the group) against its key rows.
    """

    #: The canonical point of each coordinate (as :attr:`ScaleGauge.level`): 0, balanced
    #: (the query rows of a pair, over the group, as large as its key rows).
    level = 0.0

    def __init__(self, q: nn.Module, k: nn.Module, d_head: int, n_query: int, n_kv: int,
                 rope: str, q_offset: int = 0, k_offset: int = 0) -> None:
        if rope not in ("interleaved", "half"):
            raise ValueError(f"QKPairScale needs a RoPE layout ('interleaved' or 'half'), got {rope!r}")
        order_q, _ = _pair_order(n_query, d_head, rope)
        order_k, _ = _pair_order(n_kv, d_head, rope)
        pairs = d_head // 2
        self.size = n_kv * pairs
        share_q = _group_share(n_query, n_kv, pairs).repeat_interleave(2)
        share_k = torch.arange(self.size).repeat_interleave(2)
        self.members = []
        for p, axis, rows in _slice_rows(q, q_offset, n_query * d_head):
            self.members.append(SharedScaleMember(p, axis, rows[order_q], share_q, +1))
        for p, axis, rows in _slice_rows(k, k_offset, n_kv * d_head):
            self.members.append(SharedScaleMember(p, axis, rows[order_k], share_k, -1))
        self._desc = f"query heads={n_query}, kv heads={n_kv}, d_head={d_head}, rope={rope}"

    def parameters(self) -> list[nn.Parameter]:
        return [m.param for m in self.members]

    def random_element(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Log-normal scales ``c = exp(N(0, 0.5²))``, one per (key head, pair)."""
        return log_normal_scales(self.size, generator)

    @torch.no_grad()
    def act(self, element: torch.Tensor) -> None:
        for m in self.members:
            values = _gather(m.param, m.axis, m.positions)
            factor = element.to(values)[m.share.to(values.device)] ** m.sign
            _scatter(m.param, m.axis, m.positions, values * factor.reshape([-1] + [1] * (values.ndim - 1)))

    def describe(self) -> str:
        return self._desc
