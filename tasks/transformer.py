"""Pre-norm transformer blocks shared by ``gpt_lm``, ``vit_cifar`` and ``grok_modadd``.

Layers are plain ``nn.Linear`` modules with separate query, key, value and output
projections (``q``, ``k``, ``v``, ``o``) and separate MLP layers (``gate``, ``up``,
``down``), so gauges and per-layer diagnostics can name every matrix. Attention runs
through ``torch.nn.functional.scaled_dot_product_attention``.

RoPE uses the *interleaved* layout: coordinates ``(2i, 2i+1)`` of each head form the
``i``-th pair, rotated by ``position * base ** (-2i / d_head)`` (as in the RoFormer paper).
The ``HeadRotation`` gauge must be told this layout (``rope="interleaved"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("layernorm", "rmsnorm")
MLPS = ("swiglu", "relu", "gelu")
ROPE_LAYOUT = "interleaved"


def make_norm(kind: str, width: int, bias: bool = True, eps: float = 1e-5) -> nn.Module:
    """A norm with an elementwise affine gain (``bias`` only applies to LayerNorm)."""
    if kind == "layernorm":
        return nn.LayerNorm(width, eps=eps, elementwise_affine=True, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(width, eps=eps, elementwise_affine=True)
    raise ValueError(f"norm must be one of {list(NORMS)}, got {kind!r}")


def apply_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding, interleaved layout, on ``x`` of shape (B, H, T, D).

    Pair ``i`` = coordinates ``(2i, 2i+1)`` at position ``t`` is rotated by the angle
    ``t * base ** (-2i / D)``::

        y[2i]   = x[2i] cos - x[2i+1] sin
        y[2i+1] = x[2i] sin + x[2i+1] cos

    The angles are computed in float32 at every call (cheap: T × D/2 entries) rather than
    cached in buffers, so casting the model to a low-precision dtype cannot degrade them.
    """
    t, d = x.shape[-2], x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d}")
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    y_even = x_even * cos - x_odd * sin
    y_odd = x_even * sin + x_odd * cos
    return torch.stack((y_even, y_odd), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v``, ``o`` projections.

    With ``bias=True`` every projection has a bias, except ``k`` when RoPE is off: a key
    bias ``b`` then adds ``q_i · b`` to all scores of query ``i``, which the softmax
    ignores, so it would be a dead parameter (gradient exactly zero, only round-off
    noise). With RoPE the key bias is rotated by position and does matter.
    """

    def __init__(self, width: int, heads: int, *, causal: bool, rope: bool, bias: bool,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        if rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.head_dim}")
        self.causal = causal
        self.rope = rope
        self.dropout = dropout
        self.q = nn.Linear(width, width, bias=bias)
        self.k = nn.Linear(width, width, bias=bias and rope)  # see the class docstring
        self.v = nn.Linear(width, width, bias=bias)
        self.o = nn.Linear(width, width, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.rope:
            q, k = apply_rope(q), apply_rope(k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.o(y))


def mlp_hidden(width: int, ratio: float, kind: str) -> int:
    """Hidden width: ``ratio * width``; for SwiGLU two thirds of that (three matrices
    instead of two keep the parameter count), rounded up to a multiple of 8."""
    hidden = ratio * width * (2 / 3 if kind == "swiglu" else 1)
    return int(8 * math.ceil(hidden / 8))


class MLP(nn.Module):
    """``swiglu``: ``down(silu(gate(x)) * up(x))``; ``relu`` / ``gelu``: ``down(act(up(x)))``."""

    def __init__(self, width: int, hidden: int, kind: str, *, bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in MLPS:
            raise ValueError(f"mlp must be one of {list(MLPS)}, got {kind!r}")
        self.kind = kind
        self.gate = nn.Linear(width, hidden, bias=bias) if kind == "swiglu" else None
        self.up = nn.Linear(width, hidden, bias=bias)
        self.down = nn.Linear(hidden, width, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "relu":
            h = F.relu(self.up(x))
        else:
            h = F.gelu(self.up(x))
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, *, norm: str = "layernorm", mlp: str = "gelu",
                 mlp_ratio: float = 4.0, causal: bool = False, rope: bool = False,
                 bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, width, bias=bias)
        self.attn = Attention(width, heads, causal=causal, rope=rope, bias=bias, dropout=dropout)
        self.norm2 = make_norm(norm, width, bias=bias)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio, mlp), mlp, bias=bias, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def gauges(self) -> list:
        """Exact symmetries inside the block (see ``ddc.gauges``).

        * ``NormGain`` of each norm: a pre-norm's output is read only by the layers
          right after it (``q, k, v`` and ``up``/``gate``); the residual stream reads
          the un-normalised ``x``.
        * ``HeadRotation`` of ``q, k`` (only pair rotations commute with RoPE) and
          ``HeadRotationVO`` of ``v, o`` per head.
        * ``UnitRescale`` of the MLP for ReLU (positively homogeneous) and SwiGLU (the
          ``up`` branch enters linearly; ``gate`` does not). GELU has none.
        """
        from ddc.gauges import HeadRotation, HeadRotationVO, NormGain, UnitRescale

        attn, mlp = self.attn, self.mlp
        mlp_inputs = [mlp.up] if mlp.gate is None else [mlp.up, mlp.gate]
        gauges = [
            NormGain(self.norm1, [attn.q, attn.k, attn.v]),
            NormGain(self.norm2, mlp_inputs),
            HeadRotation(q=attn.q, k=attn.k, n_heads=attn.heads,
                         rope=ROPE_LAYOUT if attn.rope else None),
            HeadRotationVO(v=attn.v, o=attn.o, n_heads=attn.heads),
        ]
        if mlp.kind in ("relu", "swiglu"):
            gauges.append(UnitRescale(inputs=[mlp.up], output=mlp.down))
        return gauges


def init_transformer_(model: nn.Module, depth: int, std: float = 0.02) -> None:
    """GPT-2 style initialisation, in place, drawing from torch's global RNG.

    Linear and embedding weights ~ N(0, std²); the projections that write into the
    residual stream (attention ``o`` and MLP ``down``) get ``std / sqrt(2 * depth)`` so the
    stream's variance does not grow with depth; biases are zero; norms keep gain 1, bias 0.
    """
    residual_std = std / math.sqrt(2 * max(depth, 1))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
    for module in model.modules():
        if isinstance(module, Attention):
            nn.init.normal_(module.o.weight, 0.0, residual_std)
        elif isinstance(module, MLP):
            nn.init.normal_(module.down.weight, 0.0, residual_std)

