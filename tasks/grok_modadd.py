"""``grok_modadd``: grokking on modular arithmetic (Power et al. 2022; Nanda et al. 2023).

Every equation ``a op b = c (mod p)`` for ``op`` in ``add`` (a + b), ``sub`` (a − b),
``mul`` (a · b) and ``div`` (a · b⁻¹, with b ≠ 0 and ``p`` prime) is enumerated; a fixed
data seed splits them into ``train_fraction`` for training and the rest for validation.
Inputs are the token sequences ``[a, OP, b, EQ]`` (numbers are tokens ``0..p-1``,
``OP = p``, ``EQ = p + 1``); the model predicts ``c`` (``p`` classes) from the last
position. Fully offline.

The model is a small pre-norm transformer from :mod:`tasks.transformer` (causal as in
Power et al., learned positions, ReLU MLP by default) with an untied ``self.readout``.
Defaults follow the literature: p = 97, AdamW with weight decay 1 is the usual optimizer
(set in the optimizer config, not here), train fraction 0.5 (``small``) or 0.3 (``paper``,
Nanda et al.'s regime), batch 512. The default ``target`` (val_acc ≥ 0.99) turns runs into
steps-to-grok measurements.

Metrics: ``loss`` and ``acc`` on the full train and validation sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.base import Batch, Task, at_least_float32, shard
from tasks.config import choice, meta_param_count, resolve_config
from tasks.transformer import MLPS, NORMS, Block, init_transformer_, make_norm

OPS = ("add", "sub", "mul", "div")
SEQ_LEN = 4  # [a, OP, b, EQ]
#: The metrics :meth:`GrokModAddTask.evaluate` returns.
METRICS = ("loss", "acc")
EVAL_CHUNK = 4096

DEFAULTS: dict[str, Any] = {
    "model": {
        "depth": None, "width": None, "heads": None, "rope": False, "causal": True,
        "norm": "layernorm", "mlp": "relu", "mlp_ratio": 4.0, "dropout": 0.0, "bias": False,
    },
    "data": {"p": None, "op": "add", "train_fraction": None, "seed": 0},
    "target": {"metric": "val_acc", "value": 0.99, "mode": "max"},
}

PRESETS: dict[str, dict[str, Any]] = {
    # p = 11 (121 equations), one layer of width 32: full batch, milliseconds a step.
    "tiny": {"batch_size": 512, "steps": 300,
             "model": {"depth": 1, "width": 32, "heads": 2},
             "data": {"p": 11, "train_fraction": 0.5}},
    # The standard setup (p = 97, 2 layers × 128, 4 heads, batch 512) with half the data:
    # AdamW (lr 1e-3, wd 1) reaches val_acc 0.99 after ~600 steps (~0.1 s a step on one CPU core).
    "small": {"batch_size": 512, "steps": 2000,
              "model": {"depth": 2, "width": 128, "heads": 4},
              "data": {"p": 97, "train_fraction": 0.5}},
    # Same model, 30% of the data: the slow-grokking regime (~2200 steps with AdamW
    # lr 1e-3, wd 1); the budget leaves room for slower optimizers.
    "paper": {"batch_size": 512, "steps": 10000,
              "model": {"depth": 2, "width": 128, "heads": 4},
              "data": {"p": 97, "train_fraction": 0.3}},
}


def is_prime(n: int) -> bool:
    """Trial division (p is small)."""
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def modular_equations(p: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs ``(a, b)`` for ``op`` (``b ≠ 0`` for ``div``) in lexicographic order, and
    the answers ``a op b mod p``. Returns ``pairs`` (N, 2) and ``answers`` (N,)."""
    choice(op, OPS, "data.op")
    if p < 2:
        raise ValueError(f"task.data.p must be at least 2, got {p}")
    if op == "div" and not is_prime(p):
        raise ValueError(f"task.data.p must be prime for op=div (every b ≠ 0 invertible), got {p}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    if op == "add":
        c = (a + b) % p
    elif op == "sub":
        c = (a - b) % p
    elif op == "mul":
        c = (a * b) % p
    else:
        keep = b != 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([0] + [pow(x, -1, p) for x in range(1, p)])
        c = (a * inverse[b]) % p
    return torch.stack([a, b], dim=1), c


class GrokTransformer(nn.Module):
    """Token + learned position embedding (or RoPE), pre-norm blocks, final norm, and an
    untied ``self.readout`` over the ``p`` answers, applied at the last position."""

    def __init__(self, *, vocab: int, num_classes: int, depth: int, width: int, heads: int,
                 rope: bool = False, causal: bool = True, norm: str = "layernorm",
                 mlp: str = "relu", mlp_ratio: float = 4.0, dropout: float = 0.0,
                 bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos_embed = None if rope else nn.Embedding(SEQ_LEN, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, heads, norm=norm, mlp=mlp, mlp_ratio=mlp_ratio, causal=causal,
                  rope=rope, bias=bias, dropout=dropout)
            for _ in range(depth)
        )
        self.final_norm = make_norm(norm, width, bias=bias)
        self.readout = nn.Linear(width, num_classes, bias=bias)
        init_transformer_(self, depth)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, p) for token sequences (B, 4)."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.readout(self.final_norm(x[:, -1]))

    def gauges(self) -> list:
        """Block gauges, the final ``NormGain`` and ``LogitShift`` (untied readout)."""
        from ddc.gauges import LogitShift, NormGain

        gauges = [g for block in self.blocks for g in block.gauges()]
        return gauges + [NormGain(self.final_norm, [self.readout]), LogitShift(self.readout)]


class GrokModAddTask(Task):
    """Modular arithmetic (see the module docstring)."""

    name = "grok_modadd"
    unit_name = "samples"

    def __init__(self, cfg: dict[str, Any], *, num_workers: int = 0) -> None:
        self.config = resolve_config(cfg, task=self.name, defaults=DEFAULTS, presets=PRESETS)
        self.size = self.config["size"]
        self.steps: int = self.config["steps"]
        self.target = self.config["target"]
        m, d = self.config["model"], self.config["data"]
        choice(m["norm"], NORMS, "model.norm")
        choice(m["mlp"], MLPS, "model.mlp")
        self.p, self.op = int(d["p"]), d["op"]
        fraction = float(d["train_fraction"])
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"task.data.train_fraction must be in (0, 1), got {fraction}")
        self.op_token, self.eq_token = self.p, self.p + 1
        pairs, answers = modular_equations(self.p, self.op)
        tokens = torch.stack([pairs[:, 0], torch.full_like(pairs[:, 0], self.op_token),
                              pairs[:, 1], torch.full_like(pairs[:, 0], self.eq_token)], dim=1)
        # The split depends only on data.seed, never on the run's seed.
        g = torch.Generator().manual_seed(int(d["seed"]))
        perm = torch.randperm(len(answers), generator=g)
        n_train = int(round(fraction * len(answers)))
        if not 0 < n_train < len(answers):
            raise ValueError(f"train_fraction {fraction} leaves an empty split of {len(answers)} equations")
        train_idx, val_idx = perm[:n_train].sort().values, perm[n_train:].sort().values
        self.train_x, self.train_y = tokens[train_idx], answers[train_idx]
        self.val_x, self.val_y = tokens[val_idx], answers[val_idx]
        # A batch larger than the training set means full-batch training.
        self.batch_size: int = min(self.config["batch_size"], n_train)

    def build_model(self) -> GrokTransformer:
        m = self.config["model"]
        return GrokTransformer(vocab=self.p + 2, num_classes=self.p, depth=m["depth"],
                               width=m["width"], heads=m["heads"], rope=m["rope"],
                               causal=m["causal"], norm=m["norm"], mlp=m["mlp"],
                               mlp_ratio=m["mlp_ratio"], dropout=m["dropout"], bias=m["bias"])

    def train_batches(self, seed: int, *, start: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        """Batches of exactly ``batch_size`` examples: a seeded permutation of the training
        set is consumed in order and renewed when it runs out, so every example is seen
        once per epoch. With ``batch_size`` equal to the training set: full batch.
        (``start``, ``rank``, ``world_size``: see :meth:`tasks.base.Task.train_batches`.)"""
        n = len(self.train_y)
        if self.batch_size >= n:
            x, y = shard(self.train_x, rank, world_size), shard(self.train_y, rank, world_size)
            while True:
                yield x, y
        g = torch.Generator().manual_seed(seed)
        queue = torch.empty(0, dtype=torch.long)
        step = 0
        while True:
            if len(queue) < self.batch_size:
                queue = torch.cat([queue, torch.randperm(n, generator=g)])
            idx, queue = queue[:self.batch_size], queue[self.batch_size:]
            if step >= start:  # earlier batches are skipped: index bookkeeping only
                idx = shard(idx, rank, world_size)
                yield self.train_x[idx], self.train_y[idx]
            step += 1

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, answers = batch
        logits = at_least_float32(model(tokens))
        acc = (logits.argmax(-1) == answers).float().mean().item()
        return F.cross_entropy(logits, answers), {"acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """``loss`` and ``acc`` over the whole ``split``."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        xs, ys = (self.train_x, self.train_y) if split == "train" else (self.val_x, self.val_y)
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        try:
            for i in range(0, len(ys), EVAL_CHUNK):
                x, y = xs[i:i + EVAL_CHUNK].to(device), ys[i:i + EVAL_CHUNK].to(device)
                logits = at_least_float32(model(x))
                total_loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(-1) == y).sum().item())
        finally:
            model.train(was_training)
        return {"loss": total_loss / len(ys), "acc": correct / len(ys)}

    def describe(self) -> dict[str, Any]:
        m = self.config["model"]
        return {
            "params": meta_param_count(self.build_model), "p": self.p, "op": self.op,
            "vocab_size": self.p + 2, "train_size": len(self.train_y), "val_size": len(self.val_y),
            "depth": m["depth"], "width": m["width"], "heads": m["heads"],
        }


def build(cfg: dict[str, Any], *, num_workers: int = 0) -> GrokModAddTask:
    """Registry builder for ``grok_modadd``."""
    return GrokModAddTask(cfg, num_workers=num_workers)
