"""Small float64 models with every gauge kind, and the equivariance harness, for the DDC tests.

Self-contained (independent of tasks/), so the optimizer's contract is tested on models
whose symmetries are known by construction.
"""

from __future__ import annotations

import collections
import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ddc.gauges import HeadRotation, HeadRotationVO, LogitShift, NormGain, UnitRescale


class ReluMLP(nn.Module):
    """x → fc_in → ReLU → [fc_hidden → ReLU] → readout: a chain of unit gauges and a logit shift."""

    def __init__(self, d_in: int = 6, hidden: int = 12, n_classes: int = 5, depth: int = 2) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_in, hidden)
        self.fc_hidden = nn.Linear(hidden, hidden) if depth == 2 else None
        self.readout = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_in(x))
        if self.fc_hidden is not None:
            h = F.relu(self.fc_hidden(h))
        return self.readout(h)

    def gauges(self):
        if self.fc_hidden is None:
            return [UnitRescale([self.fc_in], self.readout), LogitShift(self.readout)]
        return [UnitRescale([self.fc_in], self.fc_hidden), UnitRescale([self.fc_hidden], self.readout),
                LogitShift(self.readout)]


def _rope(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x: (batch, heads, time, d_head)."""
    t, d = x.shape[-2], x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    angles = torch.arange(t, dtype=x.dtype)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    if layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out.flatten(-2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class TinyTransformer(nn.Module):
    """Embedding → pre-norm block (attention, MLP) → final norm → untied readout."""

    def __init__(self, vocab: int = 11, width: int = 8, heads: int = 2, mlp: str = "swiglu",
                 norm: str = "layernorm", rope: str | None = "interleaved", bias: bool = True) -> None:
        super().__init__()
        self.heads, self.rope, self.mlp_kind = heads, rope, mlp
        make_norm = (lambda: nn.LayerNorm(width)) if norm == "layernorm" else (lambda: nn.RMSNorm(width))
        self.embed = nn.Embedding(vocab, width)
        self.norm1, self.norm2, self.norm_f = make_norm(), make_norm(), make_norm()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=bias) for _ in range(4))
        self.up = nn.Linear(width, 2 * width, bias=bias)
        self.gate = nn.Linear(width, 2 * width, bias=bias) if mlp == "swiglu" else None
        self.down = nn.Linear(2 * width, width, bias=bias)
        self.readout = nn.Linear(width, vocab, bias=bias)
        with torch.no_grad():  # non-trivial gains so the norm gauge is not at a special point
            for n in (self.norm1, self.norm2, self.norm_f):
                n.weight.uniform_(0.5, 1.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        b, t, w = x.shape
        h = self.norm1(x)
        split = lambda z: z.view(b, t, self.heads, w // self.heads).transpose(1, 2)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        if self.rope:
            q, k = _rope(q, self.rope), _rope(k, self.rope)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, w))
        h = self.norm2(x)
        if self.mlp_kind == "swiglu":
            m = F.silu(self.gate(h)) * self.up(h)
        elif self.mlp_kind == "relu":
            m = F.relu(self.up(h))
        else:
            m = F.gelu(self.up(h))
        x = x + self.down(m)
        return self.readout(self.norm_f(x))

    def gauges(self):
        g = [LogitShift(self.readout),
             NormGain(self.norm1, [self.q, self.k, self.v]),
             NormGain(self.norm2, [self.up] + ([self.gate] if self.gate is not None else [])),
             NormGain(self.norm_f, [self.readout]),
             HeadRotation(self.q, self.k, self.heads, rope=self.rope),
             HeadRotationVO(self.v, self.o, self.heads)]
        if self.mlp_kind in ("swiglu", "relu"):
            g.append(UnitRescale([self.up], self.down))
        return g


class ReluChain(nn.Module):
    """x → depth × (Linear → ReLU) → readout: every hidden layer sits in two unit gauges
    (its rows in one, its columns in the previous one), the hardest case for balancing."""

    def __init__(self, depth: int = 24, width: int = 8, d_in: int = 6, n_classes: int = 5) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.readout = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_in(x))
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.readout(h)

    def gauges(self):
        layers = [self.fc_in, *self.hidden, self.readout]
        return [UnitRescale([a], b) for a, b in zip(layers[:-1], layers[1:])] + [LogitShift(self.readout)]


def classification_loss(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), logits


def make_batches(model: nn.Module, n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        if isinstance(model, TinyTransformer):
            vocab = model.readout.out_features
            x = torch.randint(0, vocab, (3, 7), generator=g)
            y = torch.randint(0, vocab, (3, 7), generator=g)
        else:
            x = torch.randn(16, model.fc_in.in_features, generator=g, dtype=torch.float64)
            x = x.to(model.fc_in.weight.dtype)
            y = torch.randint(0, model.readout.out_features, (16,), generator=g)
        batches.append((x, y))
    return batches


def gauges_by_kind(model: nn.Module, kind: type) -> list:
    return [g for g in model.gauges() if type(g) is kind]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list,
                loss_fn: Callable = classification_loss, clip: Callable | None = None) -> None:
    """One optimizer step per batch; ``clip(model, optimizer)`` runs between backward and
    step, where a training loop's gradient clipping does."""
    for batch in batches:
        optimizer.zero_grad()
        loss_fn(model, batch)[0].backward()
        if clip is not None:
            clip(model, optimizer)
        optimizer.step()


def equivariance_deviation(model: nn.Module, make_optimizer: Callable, loss_fn: Callable, batches: list,
                           select: Callable[[nn.Module], list] | None = None, seed: int = 0,
                           clip: Callable | None = None) -> float:
    """Run ``len(batches)`` steps from θ and from g·θ; return max relative deviation between
    g·(trajectory from θ) and the trajectory from g·θ (largest over parameters).
    ``clip(model, optimizer)``, if given, runs between ``backward()`` and ``step()``, as a
    training loop's gradient clipping does."""
    select = select or (lambda m: m.gauges())
    model_a = copy.deepcopy(model).double()
    model_b = copy.deepcopy(model_a)
    generator = torch.Generator().manual_seed(seed)
    elements = [g.random_element(generator) for g in select(model_b)]
    for gauge, element in zip(select(model_b), elements):
        gauge.act(element)
    for m in (model_a, model_b):
        train_steps(m, make_optimizer(m, select(m)), batches, loss_fn, clip)
    for gauge, element in zip(select(model_a), elements):
        gauge.act(element)
    worst = 0.0
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        worst = max(worst, float((pa - pb).detach().abs().max() / pb.detach().abs().max()))
    return worst


# ------------------------------------------------------------------ counting what a step does

#: aten operators that read a tensor's value on the host (``.item()``, ``float(t)``,
#: ``.tolist()``, ``bool(t)``), or whose output shape depends on the data: on a GPU, each is
#: a device synchronisation.
HOST_READS = frozenset({"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique",
                        "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "equal",
                        "is_nonzero"})
#: aten operators that make a view or alias (no kernel, no arithmetic).
VIEW_OPS = frozenset({"view", "_unsafe_view", "slice", "select", "detach", "alias", "as_strided", "transpose",
                      "t", "unsqueeze", "squeeze", "expand", "permute", "reshape", "narrow", "unbind", "split",
                      "split_with_sizes", "unflatten", "movedim", "diagonal", "lift_fresh", "_reshape_alias",
                      "view_as_real", "view_as_complex", "chunk", "flatten"})


class StepCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active, by name. Reads of the tensors
    whose storages are in ``counters`` (an optimizer's CPU ``step`` counters, which torch's
    AdamW also reads on the host: no device synchronisation) are counted apart."""

    def __init__(self, counters: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.counters = counters
        self.counter_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        name = func._schema.name.split("::")[-1]
        if (name == "_local_scalar_dense" and args and args[0].device.type == "cpu"
                and args[0].untyped_storage().data_ptr() in self.counters):
            self.counter_reads += 1
        else:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def host_reads(self) -> int:
        return sum(n for name, n in self.ops.items() if name in HOST_READS)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def compute(self) -> int:
        """Operators that are not views or aliases."""
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS)


def count_step(optimizer: torch.optim.Optimizer, call=None) -> StepCounter:
    """The operators of one ``optimizer.step()`` (or of ``call()``, for example a clip of
    the gradients) on the gradients in place. The CPU counters of the state (``step``, and
    DDC's ``ddc_rotation_age*``: steps since a rotation basis was taken) are read apart, as
    torch's AdamW reads its step."""
    steps = frozenset(t.untyped_storage().data_ptr() for s in optimizer.state.values() for k, t in s.items()
                      if (k == "step" or str(k).startswith("ddc_rotation_age"))
                      and isinstance(t, torch.Tensor) and t.device.type == "cpu")
    counter = StepCounter(steps)
    with counter:
        (call or optimizer.step)()
    return counter
