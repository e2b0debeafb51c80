"""``gpt_lm``: a decoder-only causal language model on bytes.

The model is a pre-norm GPT (blocks from :mod:`tasks.transformer`) over the 256 byte
values. Data come from :mod:`tasks.corpus` (offline built-in corpus by default). Training
batches are random windows of ``context + 1`` bytes (inputs and targets shifted by one);
evaluation uses fixed, evenly spaced windows of each split.

Metrics: ``loss`` (mean next-byte cross-entropy, nats) and, at evaluation, ``ppl``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.base import Batch, Task, at_least_float32, shard
from tasks.config import choice, meta_param_count, resolve_config
from tasks.corpus import SOURCES, load_corpus
from tasks.transformer import MLPS, NORMS, Block, init_transformer_, make_norm

VOCAB_SIZE = 256  # byte-level
#: The metrics :meth:`GPTLMTask.evaluate` returns.
METRICS = ("loss", "ppl")

DEFAULTS: dict[str, Any] = {
    "model": {
        "depth": None, "width": None, "heads": None, "context": None,
        "rope": True, "norm": "layernorm", "mlp": "swiglu", "mlp_ratio": 4.0,
        "tied": False, "dropout": 0.0, "bias": False,
    },
    "data": {
        "source": "builtin", "files": None, "name": None, "config_name": None,
        "text_field": "text", "val_fraction": 0.1, "cache_dir": None, "eval_examples": None,
        "train_bytes": None,
    },
    "target": {"metric": "val_loss", "value": 1.5, "mode": "min"},  # see configs/task/gpt_lm.yaml
}

PRESETS: dict[str, dict[str, Any]] = {
    # ~42k parameters, 256 tokens a step: milliseconds a step (tests).
    "tiny": {"batch_size": 8, "steps": 200,
             "model": {"depth": 2, "width": 32, "heads": 2, "context": 32},
             "data": {"eval_examples": 16}},
    # ~0.86M parameters, 4k tokens a step (~0.43 s on one CPU core); val loss ~1.5
    # nats/byte after 400 AdamW steps.
    "small": {"batch_size": 32, "steps": 600,
              "model": {"depth": 4, "width": 128, "heads": 4, "context": 128},
              "data": {"eval_examples": 128}},
    # GPT-2-small shape (12 x 768, ~85M parameters), 32k tokens a step: one GPU.
    # 10k steps are ~34 passes over the built-in corpus: use data.source=hub (e.g.
    # TinyStories) for a run that does not overfit.
    "paper": {"batch_size": 32, "steps": 10000,
              "model": {"depth": 12, "width": 768, "heads": 12, "context": 1024},
              "data": {"eval_examples": 256}},
}


class GPT(nn.Module):
    """Causal byte-level transformer LM.

    Token embedding (plus a learned positional embedding when RoPE is off), pre-norm
    blocks, a final norm, then the readout ``self.readout = nn.Linear(width, vocab)``;
    with ``tied=True`` the readout is the embedding matrix and ``self.readout`` is ``None``.
    """

    def __init__(self, *, vocab: int, context: int, depth: int, width: int, heads: int,
                 rope: bool = True, norm: str = "layernorm", mlp: str = "swiglu",
                 mlp_ratio: float = 4.0, tied: bool = False, dropout: float = 0.0,
                 bias: bool = False) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.pos_embed = None if rope else nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, heads, norm=norm, mlp=mlp, mlp_ratio=mlp_ratio, causal=True,
                  rope=rope, bias=bias, dropout=dropout)
            for _ in range(depth)
        )
        self.final_norm = make_norm(norm, width, bias=bias)
        self.readout = None if tied else nn.Linear(width, vocab, bias=bias)
        init_transformer_(self, depth)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, T, vocab) for byte ids ``idx`` of shape (B, T)."""
        t = idx.shape[1]
        x = self.embed(idx)
        if self.pos_embed is not None:
            if t > self.context:
                raise ValueError(f"sequence length {t} exceeds the context {self.context}")
            x = x + self.pos_embed(torch.arange(t, device=idx.device))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        return self.readout(x) if self.readout is not None else F.linear(x, self.embed.weight)

    def gauges(self) -> list:
        """Block gauges, plus ``LogitShift`` and the final ``NormGain`` when untied (a tied
        readout is also the input embedding, which breaks both symmetries)."""
        from ddc.gauges import LogitShift, NormGain

        gauges = [g for block in self.blocks for g in block.gauges()]
        if self.readout is not None:
            gauges += [LogitShift(self.readout), NormGain(self.final_norm, [self.readout])]
        return gauges


class GPTLMTask(Task):
    """Next-byte prediction on a text corpus (see the module docstring)."""

    name = "gpt_lm"
    unit_name = "tokens"

    def __init__(self, cfg: dict[str, Any], *, num_workers: int = 0) -> None:
        self.config = resolve_config(cfg, task=self.name, defaults=DEFAULTS, presets=PRESETS)
        self.size = self.config["size"]
        self.batch_size: int = self.config["batch_size"]
        self.steps: int = self.config["steps"]
        self.target = self.config["target"]
        m, d = self.config["model"], self.config["data"]
        choice(m["norm"], NORMS, "model.norm")
        choice(m["mlp"], MLPS, "model.mlp")
        choice(d["source"], SOURCES, "data.source")
        self.context: int = int(m["context"])
        self.train_data, self.val_data, self._data_info = load_corpus(d)
        if d["train_bytes"] is not None:
            # Over-training on a small text (many epochs); validation stays the full held-out
            # split, so the validation-train gap measures memorisation of this prefix.
            n = d["train_bytes"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"task.data.train_bytes must be a positive int (bytes of the "
                                 f"training text to keep) or null (all), got {n!r}")
            self.train_data = self.train_data[:n]
            self._data_info = {**self._data_info, "train_bytes": len(self.train_data)}
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            if len(data) <= self.context + 1:
                raise ValueError(
                    f"the {split} text has {len(data)} bytes, fewer than one window of "
                    f"context + 1 = {self.context + 1}"
                )
        self._eval_windows = {
            "train": self._fixed_windows(self.train_data, d["eval_examples"]),
            "val": self._fixed_windows(self.val_data, d["eval_examples"]),
        }

    def build_model(self) -> GPT:
        m = self.config["model"]
        return GPT(vocab=VOCAB_SIZE, context=self.context, depth=m["depth"], width=m["width"],
                   heads=m["heads"], rope=m["rope"], norm=m["norm"], mlp=m["mlp"],
                   mlp_ratio=m["mlp_ratio"], tied=m["tied"], dropout=m["dropout"], bias=m["bias"])

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> Batch:
        window = data[starts[:, None] + torch.arange(self.context + 1)].long()
        return window[:, :-1], window[:, 1:]

    def _fixed_windows(self, data: torch.Tensor, n: int | None) -> Batch:
        """``n`` windows evenly spaced over ``data`` (the same at every evaluation)."""
        last = len(data) - self.context - 1
        n = min(int(n or 1), last + 1)
        starts = torch.linspace(0, last, n).round().long()
        return self._windows(data, starts)

    def train_batches(self, seed: int, *, start: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        """Endless random windows, positions drawn by a generator seeded by ``seed``
        (``start``, ``rank``, ``world_size``: see :meth:`tasks.base.Task.train_batches`)."""
        g = torch.Generator().manual_seed(seed)
        high = len(self.train_data) - self.context  # starts in [0, len - context - 1]
        for _ in range(start):  # the skipped batches' draws: microseconds each, no data
            torch.randint(0, high, (self.batch_size,), generator=g)
        while True:
            starts = torch.randint(0, high, (self.batch_size,), generator=g)
            yield self._windows(self.train_data, shard(starts, rank, world_size))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(at_least_float32(logits.flatten(0, 1)), targets.flatten()), {}

    def batch_units(self, batch: Batch) -> int:
        return int(batch[0].numel())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """``loss`` and ``ppl = exp(loss)`` over the fixed windows of ``split``."""
        if split not in self._eval_windows:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        inputs, targets = self._eval_windows[split]
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for i in range(0, len(inputs), self.batch_size):
                x = inputs[i:i + self.batch_size].to(device)
                y = targets[i:i + self.batch_size].to(device)
                logits = model(x)
                total += F.cross_entropy(at_least_float32(logits.flatten(0, 1)), y.flatten(),
                                         reduction="sum").item()
                count += y.numel()
        finally:
            model.train(was_training)
        loss = total / count
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}

    def describe(self) -> dict[str, Any]:
        m = self.config["model"]
        return {
            "params": meta_param_count(self.build_model), "vocab_size": VOCAB_SIZE, "context": self.context,
            "depth": m["depth"], "width": m["width"], "heads": m["heads"],
            "train_tokens": len(self.train_data), "val_tokens": len(self.val_data),
            "eval_windows": len(self._eval_windows["val"][0]),
            "data": self._data_info,
        }


def build(cfg: dict[str, Any], *, num_workers: int = 0) -> GPTLMTask:
    """Registry builder for ``gpt_lm``."""
    return GPTLMTask(cfg, num_workers=num_workers)
